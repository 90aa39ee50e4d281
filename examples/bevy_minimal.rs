//! The smallest Bevy game with a talking NPC: headless, one question, the reply streamed to
//! stdout, then exit.
//!
//! ```text
//! cargo run --release --example bevy_minimal -- "How much is a horseshoe?"
//! ```

use std::io::Write;

use bevy::prelude::*;
use bevy_npc_ai::prelude::*;

/// The player's question, from the command line.
#[derive(Resource)]
struct Question(String);

fn main() -> AppExit {
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "How much is a horseshoe?".to_owned());
    // This example lives in the workspace: point Bevy and the plugin at the project's assets.
    let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");
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
        .insert_resource(Question(question))
        .add_systems(Startup, spawn_blacksmith)
        .add_systems(Update, ask.before(NpcAiSystems::SendRequests))
        .add_systems(
            Update,
            (print_reply, quit_on_error).after(NpcAiSystems::ReceiveEvents),
        )
        .add_observer(finish)
        .run()
}

fn spawn_blacksmith(mut commands: Commands, assets: Res<AssetServer>) {
    commands.spawn(Npc::new(assets.load("personas/blacksmith.persona.ron")));
}

fn ask(
    npcs: Query<Entity, Added<Npc>>,
    question: Res<Question>,
    mut say: MessageWriter<PlayerSaid>,
) {
    for npc in &npcs {
        println!("> {}", question.0);
        say.write(PlayerSaid {
            npc,
            text: question.0.clone(),
        });
    }
}

fn print_reply(mut deltas: MessageReader<NpcReplyDelta>) {
    for delta in deltas.read() {
        print!("{}", delta.text);
        let _ = std::io::stdout().flush();
    }
}

fn finish(reply: On<NpcReplied>, mut exit: MessageWriter<AppExit>) {
    println!(
        "\n[{} tokens, {:.1} tok/s, first token after {} ms]",
        reply.stats.generated_tokens,
        reply.stats.tokens_per_second(),
        reply.stats.time_to_first_token.as_millis()
    );
    exit.write(AppExit::Success);
}

fn quit_on_error(mut errors: MessageReader<NpcAiError>, mut exit: MessageWriter<AppExit>) {
    for error in errors.read() {
        eprintln!("error: {error}");
        exit.write(AppExit::error());
    }
}
