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
//! # Villagers speak (the blacksmith and the guard with a Piper neural voice); hold Tab to
//! # talk to the villager you face (needs `cargo build --release -p npc_voice_helper`).
//! cargo run --release -p bevy_npc_ai --example rpg --features demo -- --voice
//! # The villagers' replies come from an inference server (llama-server, vLLM; see
//! # docs/serving.md); the local model stays loaded and answers if the server fails
//! # (with NPC_AI_REMOTE_ONLY=1 only its vocabulary is read, and a villager the server cannot
//! # answer says its don't-know line).
//! cargo run --release -p bevy_npc_ai --example rpg --features demo,cloud -- \
//!     --remote http://127.0.0.1:8080/v1
//! ```
//!
//! WASD walks, E talks to the villager in reach, Enter sends the typed line, Esc leaves,
//! F3 shows tokens/s, KV-cache reuse, pending requests and what speech cost.

mod game;
mod view;

use std::path::PathBuf;
use std::process::ExitCode;

use bevy::prelude::*;
use bevy::window::WindowResolution;
use bevy_npc_ai::prelude::*;
use bevy_npc_ai::{NpcVoicePlugin, VoiceInput, VoiceProblem};

struct Args {
    /// A catalog id or a GGUF file; `None` is the catalog's default model.
    model: Option<String>,
    threads: Option<u32>,
    script: Option<PathBuf>,
    max_frames: u32,
    seed: u32,
    /// `--voice`: villagers speak their lines; push-to-talk on Tab.
    voice: bool,
    /// `--remote URL`: an inference server generates the villagers' replies.
    remote: Option<String>,
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
        voice: false,
        remote: None,
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
            "--voice" => args.voice = true,
            "--remote" if cfg!(feature = "cloud") => args.remote = Some(value()?),
            "--remote" => return Err("--remote needs a build with `--features cloud`".into()),
            "--help" | "-h" => {
                return Err(
                    "usage: rpg [--model ID|FILE.gguf] [--threads N] [--seed N] [--voice] \
                            [--remote URL] [--script SHOT.png [--max-frames N]]"
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
        })
        // Mags speaks through it; made for the default model (another model refuses it, and
        // her persona with it).
        .with_adapter(game::FERRY_ADAPTER);
    if !root().join("assets").join(game::FERRY_ADAPTER).is_file() {
        eprintln!(
            "assets/{} is missing (`cargo xtask setup` trains it): Mags the ferrywoman will not talk",
            game::FERRY_ADAPTER
        );
    }
    if let Some(threads) = args.threads {
        ai = ai.with_threads(threads);
    }
    if let Some(url) = args.remote {
        // The model name and key, when the server needs them: NPC_AI_REMOTE_MODEL, _KEY;
        // NPC_AI_REMOTE_ONLY=1: no local weights.
        ai = ai.with_remote(RemoteConfig::from_env_at(url));
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
    if args.voice {
        app.add_plugins(NpcVoicePlugin::default().with_push_to_talk(KeyCode::Tab))
            .add_systems(Update, (voice_target, note_speech));
    }
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

/// Push-to-talk addresses the villager the player is talking to.
fn voice_target(conversation: Res<game::Conversation>, mut input: ResMut<VoiceInput>) {
    if input.target != conversation.with {
        input.target = conversation.with;
    }
}

/// In a scripted run, notes beside the screenshot what was spoken (`SHOT.speech.txt`: the
/// sentences and characters synthesised, and every voice problem).
fn note_speech(
    plan: Option<Res<view::ScreenshotPlan>>,
    meter: Res<NpcCostMeter>,
    mut problems: MessageReader<VoiceProblem>,
    mut seen: Local<Vec<String>>,
    mut written: Local<(u64, usize)>,
) {
    seen.extend(problems.read().map(|p| p.0.clone()));
    let Some(plan) = plan else { return };
    let spoken = meter.total();
    if *written == (spoken.spoken_sentences, seen.len()) {
        return;
    }
    *written = (spoken.spoken_sentences, seen.len());
    let mut note = format!(
        "spoken {} {}\n",
        spoken.spoken_sentences, spoken.spoken_characters
    );
    for problem in seen.iter().map(String::as_str) {
        note.push_str(&format!("problem {problem}\n"));
    }
    if let Err(err) = std::fs::write(plan.path.with_extension("speech.txt"), note) {
        error!("cannot write the speech note: {err}");
    }
}
