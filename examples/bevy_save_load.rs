//! Saving and loading an NPC with the game: talk to the blacksmith, save its state from the
//! game's own save step, "quit", spawn the NPC again, load the state and talk on. The reply
//! after the load computes only the new line's tokens: the conversation and its KV cache
//! came back from the file.
//!
//! ```text
//! cargo run --release --example bevy_save_load
//! ```

use std::io::Write;
use std::path::PathBuf;

use bevy::prelude::*;
use bevy_npc_ai::prelude::*;

/// Where this example's "save game" keeps the blacksmith.
#[derive(Resource)]
struct SaveFile(PathBuf);

/// Status lines from observers, printed after the frame's streamed text (observers run while
/// the plugin receives events, before this example's own systems print the deltas).
#[derive(Resource, Default)]
struct Log(Vec<String>);

/// How far the scripted session is.
#[derive(Resource, Default, PartialEq, Eq, Debug)]
enum Step {
    #[default]
    Talking,
    Saving,
    Reloading,
    TalkingAgain,
}

fn main() -> AppExit {
    let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");
    let save = std::env::temp_dir().join("bevy_npc_ai-example-blacksmith.npcstate");
    App::new()
        .add_plugins((
            MinimalPlugins,
            AssetPlugin {
                file_path: assets.into(),
                ..default()
            },
        ))
        // The default catalog model, found in the AssetPlugin's folder (`models/`).
        .add_plugins(NpcAiPlugin::default())
        .insert_resource(SaveFile(save))
        .init_resource::<Step>()
        .init_resource::<Log>()
        .add_systems(Startup, spawn_blacksmith)
        .add_systems(Update, greet.before(NpcAiSystems::SendRequests))
        .add_systems(
            Update,
            (print_reply, print_log, quit_on_error)
                .chain()
                .after(NpcAiSystems::ReceiveEvents),
        )
        .add_observer(replied)
        .add_observer(saved)
        .add_observer(loaded)
        .run()
}

fn spawn_blacksmith(mut commands: Commands, assets: Res<AssetServer>) {
    commands.spawn(Npc::new(assets.load("personas/blacksmith.persona.ron")));
}

/// The first conversation starts as soon as the NPC exists.
fn greet(npcs: Query<Entity, Added<Npc>>, step: Res<Step>, mut says: MessageWriter<PlayerSaid>) {
    if *step == Step::Talking {
        for npc in &npcs {
            let text = "Good morning! I am Aria, a traveller from Riverford.";
            println!("> {text}");
            says.write(PlayerSaid {
                npc,
                text: text.to_owned(),
            });
        }
    }
}

fn print_reply(mut deltas: MessageReader<NpcReplyDelta>) {
    for delta in deltas.read() {
        print!("{}", delta.text);
        let _ = std::io::stdout().flush();
    }
}

fn print_log(mut log: ResMut<Log>) {
    for line in log.0.drain(..) {
        println!("{line}");
    }
}

fn replied(
    reply: On<NpcReplied>,
    mut log: ResMut<Log>,
    mut step: ResMut<Step>,
    file: Res<SaveFile>,
    mut save: MessageWriter<SaveNpcState>,
    mut exit: MessageWriter<AppExit>,
) {
    log.0.push(format!(
        "\n[{} prompt tokens, {} of them from the cache, {} computed]",
        reply.stats.prompt_tokens,
        reply.stats.cached_tokens,
        reply.stats.prompt_tokens - reply.stats.cached_tokens
    ));
    match *step {
        // The game's save step: one message per NPC worth keeping.
        Step::Talking => {
            *step = Step::Saving;
            save.write(SaveNpcState {
                npc: reply.entity,
                path: file.0.clone(),
            });
        }
        Step::TalkingAgain => {
            exit.write(AppExit::Success);
        }
        _ => {}
    }
}

fn saved(
    saved: On<NpcStateSaved>,
    mut log: ResMut<Log>,
    mut commands: Commands,
    assets: Res<AssetServer>,
    mut step: ResMut<Step>,
    mut load: MessageWriter<LoadNpcState>,
) {
    log.0.push(format!(
        "[saved {} bytes to {}; the game quits and starts again]",
        saved.bytes,
        saved.path.display()
    ));
    // A new session: the old entity is gone, a new one is spawned from the same persona and
    // given its saved state back.
    commands.entity(saved.entity).despawn();
    let npc = commands
        .spawn(Npc::new(assets.load("personas/blacksmith.persona.ron")))
        .id();
    *step = Step::Reloading;
    load.write(LoadNpcState {
        npc,
        path: saved.path.clone(),
    });
}

fn loaded(
    loaded: On<NpcStateLoaded>,
    mut log: ResMut<Log>,
    mut step: ResMut<Step>,
    mut says: MessageWriter<PlayerSaid>,
) {
    log.0.push(format!(
        "[loaded {} turns and {} tokens of KV state{}]",
        loaded.turns,
        loaded.kv_tokens,
        loaded
            .kv_note
            .as_ref()
            .map(|note| format!(" ({note}; recomputing)"))
            .unwrap_or_default()
    ));
    *step = Step::TalkingAgain;
    log.0.push("> Do you remember my name?".to_owned());
    says.write(PlayerSaid {
        npc: loaded.entity,
        text: "Do you remember my name?".to_owned(),
    });
}

fn quit_on_error(mut errors: MessageReader<NpcAiError>, mut exit: MessageWriter<AppExit>) {
    for error in errors.read() {
        eprintln!("error: {error}");
        exit.write(AppExit::error());
    }
}
