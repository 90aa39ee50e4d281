//! The RPG demo: a top-down village drawn with shapes and text, four villagers from the
//! shipped persona files, conversations streamed into speech bubbles, and actions that change
//! the world (the blacksmith's wares in the inventory bar, the guard's gate).
//!
//! ```sh
//! cargo run --release -p bevy_npc_ai --example rpg --features demo
//! cargo run --release -p bevy_npc_ai --example rpg --features demo -- --model qwen2.5-coder-0.5b
//! cargo run --release -p bevy_npc_ai --example rpg --features demo -- --model other.gguf
//! # Scripted: walk to the blacksmith, ask for a horseshoe, save a screenshot, exit.
//! cargo run --release -p bevy_npc_ai --example rpg --features demo -- --script shot.png
//! ```
//!
//! WASD walks, E talks to the villager in reach, Enter sends the typed line, Esc leaves,
//! F3 shows tokens/s, KV-cache reuse and pending requests.

mod game;
mod view;

use std::path::PathBuf;
use std::process::ExitCode;

use bevy::prelude::*;
use bevy::window::WindowResolution;
use bevy_npc_ai::prelude::*;

struct Args {
    /// A catalog id or a GGUF file; `None` is the catalog's default model.
    model: Option<String>,
    threads: Option<u32>,
    script: Option<PathBuf>,
    max_frames: u32,
    seed: u32,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: None,
        threads: None,
        script: None,
        max_frames: 20_000,
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = Some(value()?),
            "--threads" => {
                args.threads = Some(value()?.parse().map_err(|e| format!("--threads: {e}"))?);
            }
            "--script" => args.script = Some(value()?.into()),
            "--max-frames" => {
                args.max_frames = value()?.parse().map_err(|e| format!("--max-frames: {e}"))?;
            }
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--help" | "-h" => {
                return Err(
                    "usage: rpg [--model ID|FILE.gguf] [--threads N] [--seed N] \
                            [--script SHOT.png [--max-frames N]]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
    };
    let mut ai = NpcAiPlugin::default()
        .with_context_size(1536)
        .with_sampling(SamplingParams {
            seed: Some(args.seed),
            ..SamplingParams::default()
        });
    if let Some(threads) = args.threads {
        ai = ai.with_threads(threads);
    }
    match args.model {
        Some(id) if bevy_npc_ai::npc_native::catalog::find(&id).is_some() => {
            ai = ai.with_catalog_model(id);
        }
        // A file named on the command line is relative to the working directory.
        Some(file) => match std::path::absolute(&file) {
            Ok(path) => ai = ai.with_model(path),
            Err(err) => {
                eprintln!("--model {file}: {err}");
                return ExitCode::FAILURE;
            }
        },
        None => {}
    }
    let mut app = App::new();
    app.add_plugins(
        DefaultPlugins
            .set(AssetPlugin {
                file_path: root().join("assets").to_string_lossy().into_owned(),
                ..default()
            })
            .set(WindowPlugin {
                primary_window: Some(Window {
                    title: "bevy_npc_ai — Oakvale".into(),
                    resolution: WindowResolution::new(view::WINDOW.0, view::WINDOW.1),
                    resizable: false,
                    ..default()
                }),
                ..default()
            }),
    )
    .add_plugins(ai)
    .add_plugins((game::VillageGamePlugin, view::VillageViewPlugin));
    if let Some(path) = args.script {
        app.insert_resource(game::Script::blacksmith_visit())
            .insert_resource(view::ScreenshotPlan {
                path,
                max_frames: args.max_frames,
                frames: 0,
                requested: false,
            });
    }
    match app.run() {
        AppExit::Success => ExitCode::SUCCESS,
        AppExit::Error(_) => ExitCode::FAILURE,
    }
}
