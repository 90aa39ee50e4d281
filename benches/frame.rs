//! The game's frame: time the plugin's own systems take per frame in a headless app with 50
//! NPCs, 8 of them generating replies all the time, over 2,000 frames at 60 Hz.
//!
//! ```text
//! cargo bench -p bevy_npc_ai --bench frame
//! ```
//! The span timed runs from just before `NpcAiSystems::SendRequests` to just after
//! `NpcAiSystems::ReceiveEvents`, on a single-threaded `Update` schedule with nothing else
//! in it.

#[path = "model.rs"]
mod model;
use std::time::{Duration, Instant};

use bevy::ecs::schedule::SingleThreadedExecutor;
use bevy::prelude::*;
use bevy_npc_ai::prelude::*;

const NPCS: usize = 50;
const TALKING: usize = 8;
const FRAMES: usize = 2000;

#[derive(Resource, Default)]
struct Timing {
    started: Option<Instant>,
    frames: Vec<Duration>,
    deltas: usize,
}

fn start_timer(mut timing: ResMut<Timing>) {
    timing.started = Some(Instant::now());
}

fn stop_timer(mut timing: ResMut<Timing>, mut deltas: MessageReader<NpcReplyDelta>) {
    let elapsed = timing.started.take().map(|t| t.elapsed());
    timing.deltas += deltas.read().count();
    if let Some(elapsed) = elapsed {
        timing.frames.push(elapsed);
    }
}

fn main() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut app = App::new();
    app.add_plugins((
        MinimalPlugins,
        AssetPlugin {
            file_path: format!("{root}/assets"),
            ..default()
        },
        NpcAiPlugin::default()
            .with_model(model::path())
            .with_slots(TALKING as u32)
            .with_context_size(1024),
    ))
    .edit_schedule(Update, |schedule| {
        schedule.set_executor(SingleThreadedExecutor::new());
    })
    .init_resource::<Timing>()
    .add_systems(Update, start_timer.before(NpcAiSystems::SendRequests))
    .add_systems(Update, stop_timer.after(NpcAiSystems::ReceiveEvents));

    let names = ["blacksmith", "innkeeper", "guard", "healer"];
    let npcs: Vec<Entity> = (0..NPCS)
        .map(|i| {
            let handle = app
                .world()
                .resource::<AssetServer>()
                .load(format!("personas/{}.persona.ron", names[i % names.len()]));
            app.world_mut().spawn(Npc::new(handle)).id()
        })
        .collect();
    // Wait for the model and the personas (not timed).
    for _ in 0..2000 {
        app.update();
        if matches!(app.world().resource::<NpcAiStatus>(), NpcAiStatus::Ready(_)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    app.world_mut().resource_mut::<Timing>().frames.clear();

    let frame = Duration::from_micros(16_667);
    for _ in 0..FRAMES {
        let started = Instant::now();
        // Keep 8 NPCs talking: whoever is idle gets a new line.
        for &npc in &npcs[..TALKING] {
            if *app.world().get::<NpcState>(npc).unwrap() == NpcState::Idle {
                app.world_mut().write_message(PlayerSaid {
                    npc,
                    text: "Tell me a story about the village.".into(),
                });
            }
        }
        app.update();
        if let Some(rest) = frame.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }

    let timing = app.world().resource::<Timing>();
    let mut micros: Vec<f64> = timing
        .frames
        .iter()
        .map(|d| d.as_secs_f64() * 1e6)
        .collect();
    micros.sort_by(f64::total_cmp);
    let quantile = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
    println!(
        "{NPCS} NPCs, {TALKING} generating, {} frames at 60 Hz, {} reply deltas delivered\n",
        micros.len(),
        timing.deltas
    );
    println!("| plugin systems per frame | p50 | p99 | max |");
    println!("|---|---|---|---|");
    println!(
        "| time (µs) | {:.1} | {:.1} | {:.1} |",
        quantile(0.5),
        quantile(0.99),
        quantile(1.0)
    );
}
