//! What [`RuntimeConfig::max_step_time`] buys and costs, on the default model: how long
//! quitting the game (dropping the runtime) waits while four NPCs process their prompts, and
//! how long a 500-token prompt takes to its first token, with the limit (500 ms) and without
//! it (every step filled to the 512-token batch), in interleaved pairs.
//!
//! ```text
//! cargo bench -p npc_native --bench exit        # NPC_BENCH_MODEL=<catalog id> for another
//! ```
//! llama.cpp cannot stop a `decode` once it started, so the worker (and a game's exit) waits
//! for the step in progress; the limit keeps steps short by cutting prompt chunks to the
//! tokens that a timing at start-up says fit in it.

#[path = "model.rs"]
mod model;
#[path = "peer.rs"]
mod peer;

use std::time::{Duration, Instant};

use npc_native::{Event, NpcId, Persona, Runtime, RuntimeConfig};
use peer::Pairs;

const LIMIT: Duration = Duration::from_millis(500);
const PAIRS: usize = 4;

fn start(limit: Option<Duration>) -> Runtime {
    let runtime = Runtime::start(
        RuntimeConfig::new(model::path())
            .with_max_step_time(limit)
            .with_prewarm(false)
            .with_slots(4),
    );
    loop {
        match runtime.events().recv() {
            Ok(Event::ModelLoaded(_)) => return runtime,
            Ok(Event::ModelFailed(error)) => panic!("{error}"),
            Ok(_) => {}
            Err(_) => panic!("the worker stopped"),
        }
    }
}

fn persona(max_tokens: u32) -> Persona {
    let source = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../assets/personas/blacksmith.persona.ron"),
    )
    .expect("the shipped blacksmith");
    let mut persona = Persona::from_ron(&source, Some("blacksmith")).expect("it parses");
    persona.sampling.max_tokens = Some(max_tokens);
    persona
}

/// A line of about 200 tokens, different per NPC and pair (no cache helps).
fn long_line(npc: u64, pair: usize) -> String {
    format!(
        "Number {npc}-{pair}. {}",
        "Tell me about the village. ".repeat(25)
    )
}

/// Seconds `drop` takes `wait` after four NPCs were given long lines.
fn quit_while_prompting(limit: Option<Duration>, pair: usize, wait: Duration) -> f64 {
    let runtime = start(limit);
    for npc in 0..4 {
        runtime
            .set_persona(NpcId(npc), persona(80))
            .expect("worker");
    }
    for npc in 0..4 {
        runtime
            .say(NpcId(npc), long_line(npc, pair))
            .expect("worker");
    }
    std::thread::sleep(wait);
    let quitting = Instant::now();
    drop(runtime);
    quitting.elapsed().as_secs_f64()
}

/// Seconds from a long line to its first token, and the prompt's tokens.
fn first_token(limit: Option<Duration>, pair: usize) -> (f64, usize) {
    let runtime = start(limit);
    runtime.set_persona(NpcId(0), persona(8)).expect("worker");
    let sent = Instant::now();
    runtime.say(NpcId(0), long_line(0, pair)).expect("worker");
    let mut first = None;
    loop {
        match runtime.events().recv().expect("worker") {
            Event::Delta { .. } if first.is_none() => first = Some(sent.elapsed()),
            Event::Replied { stats, .. } => {
                let first = first.unwrap_or_else(|| sent.elapsed());
                return (first.as_secs_f64(), stats.prompt_tokens);
            }
            Event::Failed { error, .. } => panic!("{error}"),
            _ => {}
        }
    }
}

fn main() {
    let model = model::catalog_model();
    println!(
        "# Quitting while NPCs process prompts, {}\n",
        model.display_name
    );
    let mut quits = Pairs::default();
    let mut worst = (0f64, 0f64);
    for pair in 0..PAIRS {
        // From early in the first step to well into the prompts.
        let wait = Duration::from_millis(700 + 600 * pair as u64);
        let (with, without) = if pair % 2 == 0 {
            let with = quit_while_prompting(Some(LIMIT), pair, wait);
            (with, quit_while_prompting(None, pair, wait))
        } else {
            let without = quit_while_prompting(None, pair, wait);
            (quit_while_prompting(Some(LIMIT), pair, wait), without)
        };
        worst = (worst.0.max(with), worst.1.max(without));
        quits.push(with, without);
    }
    let mut firsts = Pairs::default();
    let mut tokens = 0;
    for pair in 0..PAIRS {
        let (with, n) = first_token(Some(LIMIT), pair);
        let (without, _) = first_token(None, pair);
        tokens = n;
        firsts.push(with, without);
    }
    println!(
        "| measurement | max_step_time 500 ms | no limit (512-token steps) | ratio (median of pairs, range) |"
    );
    println!("|---|---:|---:|---|");
    println!(
        "| quitting while 4 NPCs prompt: median drop (s) | {:.2} | {:.2} | {} |",
        quits.ours(),
        quits.peer(),
        quits.ratio()
    );
    println!(
        "| quitting: slowest drop of {PAIRS} (s) | {:.2} | {:.2} | |",
        worst.0, worst.1
    );
    println!(
        "| first token of a {tokens}-token prompt (s) | {:.2} | {:.2} | {} |",
        firsts.ours(),
        firsts.peer(),
        firsts.ratio()
    );
}
