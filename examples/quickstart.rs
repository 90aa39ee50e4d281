//! The README's "Using it in a Bevy game" example, as a program: the default model and the
//! blacksmith's persona, found in the asset folder the way Bevy finds it (`assets/` beside
//! the executable, or under `$BEVY_ASSET_ROOT`, or under the crate under `cargo run`), so it
//! works from any working directory, as a shipped game is started. Every failure is printed
//! and ends the program with an error: nothing fails silently.
//!
//! ```text
//! cargo run --release -p bevy_npc_ai --example quickstart -- "How much is a horseshoe?"
//! ```

use bevy::prelude::*;
use bevy_npc_ai::prelude::*;

fn main() -> AppExit {
    let line = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "How much is a horseshoe?".into());
    App::new()
        .add_plugins((MinimalPlugins, AssetPlugin::default()))
        .add_plugins(NpcAiPlugin::default())
        .insert_resource(Line(line))
        .add_systems(
            Startup,
            |mut commands: Commands, assets: Res<AssetServer>| {
                commands.spawn(Npc::new(assets.load("personas/blacksmith.persona.ron")));
            },
        )
        .add_systems(Update, talk.before(NpcAiSystems::SendRequests))
        .add_systems(Update, (show, fail).after(NpcAiSystems::ReceiveEvents))
        .add_observer(|reply: On<NpcReplied>, mut exit: MessageWriter<AppExit>| {
            println!("\n[{:.0} tok/s]", reply.stats.tokens_per_second());
            exit.write(AppExit::Success);
        })
        .run()
}

/// What the player says.
#[derive(Resource)]
struct Line(String);

fn talk(npcs: Query<Entity, Added<Npc>>, line: Res<Line>, mut say: MessageWriter<PlayerSaid>) {
    for npc in &npcs {
        say.write(PlayerSaid {
            npc,
            text: line.0.clone(),
        });
    }
}

fn show(mut deltas: MessageReader<NpcReplyDelta>) {
    for delta in deltas.read() {
        print!("{}", delta.text);
    }
}

/// A missing model, a broken persona, a refused line: say so and stop.
fn fail(mut errors: MessageReader<NpcAiError>, mut exit: MessageWriter<AppExit>) {
    for error in errors.read() {
        eprintln!("npc error: {error}");
        exit.write(AppExit::error());
    }
}
