//! The context-compression eval: the seed workload (Brom the blacksmith with 6,000+ tokens of
//! Oakvale lore and the 30-turn conversation in `tests/data/oakvale_conversation.ron`), run
//! twice on the same model:
//!
//! - **full context**: all lore in the system prompt and the whole conversation verbatim every
//!   turn. Its prompt length per turn is exactly what a naive runtime (no cache) computes each
//!   turn; the run itself uses the KV cache so that it finishes on a 2-core machine, which does
//!   not change what the model sees.
//! - **ours**: lore retrieval into the new turn, memories, the rolling summary under a prompt
//!   budget, and the KV cache.
//!
//! It prints prompt tokens computed per interaction and the fact-retention accuracy of both.
//! Run: `cargo bench -p npc_native --bench context`.

#[path = "model.rs"]
mod model;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use npc_native::{Event, LoreBook, NpcId, Persona, ReplyStats, Runtime, RuntimeConfig};
use serde::Deserialize;

#[derive(Deserialize)]
struct Workload {
    turns: Vec<Line>,
}

#[derive(Deserialize)]
struct Line {
    say: String,
    #[serde(default)]
    expect: Vec<String>,
    #[serde(default)]
    about: Option<About>,
}

#[derive(Clone, Copy, Deserialize, PartialEq)]
enum About {
    Lore,
    Player,
}

const LORE: &str = "lore/oakvale.lore.ron";
const MAX_TOKENS: u32 = 32;
/// Our prompt budget: a conversation longer than this is summarised.
const BUDGET: u32 = 1200;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn next(runtime: &Runtime) -> Event {
    runtime
        .events()
        .recv_timeout(Duration::from_secs(1800))
        .expect("worker answers")
}

fn start(config: RuntimeConfig) -> Runtime {
    let runtime = Runtime::start(config);
    match next(&runtime) {
        Event::ModelLoaded(_) => runtime,
        other => panic!("model did not load: {other:?}"),
    }
}

fn blacksmith() -> Persona {
    let source = std::fs::read_to_string(root().join("assets/personas/blacksmith.persona.ron"))
        .expect("persona");
    let mut persona = Persona::from_ron(&source, None).expect("persona parses");
    persona.sampling.temperature = Some(0.0);
    persona.sampling.max_tokens = Some(MAX_TOKENS);
    persona
}

fn accept(runtime: &Runtime, npc: NpcId, persona: Persona) -> usize {
    runtime.set_persona(npc, persona).expect("worker running");
    match next(runtime) {
        Event::PersonaAccepted { prefix_tokens, .. } => prefix_tokens,
        other => panic!("persona refused: {other:?}"),
    }
}

struct Run {
    stats: Vec<ReplyStats>,
    right: Vec<Option<bool>>,
    replies: Vec<String>,
    wall: Duration,
}

fn converse(runtime: &Runtime, npc: NpcId, workload: &Workload) -> Run {
    let started = Instant::now();
    let mut run = Run {
        stats: Vec::new(),
        right: Vec::new(),
        replies: Vec::new(),
        wall: Duration::ZERO,
    };
    for line in &workload.turns {
        let request = runtime.say(npc, line.say.as_str()).expect("worker running");
        let (text, stats) = loop {
            match next(runtime) {
                Event::Replied {
                    request: r,
                    text,
                    stats,
                    ..
                } if r == request => break (text, stats),
                Event::Failed { error, .. } => panic!("{:?}: {error}", line.say),
                _ => {}
            }
        };
        let lower = text.to_lowercase();
        run.right.push((!line.expect.is_empty()).then(|| {
            line.expect
                .iter()
                .any(|answer| lower.contains(&answer.to_lowercase()))
        }));
        eprintln!(
            "turn {:>2}: {} prompt tokens, {} cached",
            run.stats.len() + 1,
            stats.prompt_tokens,
            stats.cached_tokens
        );
        run.replies.push(text);
        run.stats.push(stats);
    }
    run.wall = started.elapsed();
    run
}

fn accuracy(run: &Run, workload: &Workload, about: About) -> String {
    let marks: Vec<bool> = workload
        .turns
        .iter()
        .zip(&run.right)
        .filter(|(line, _)| line.about == Some(about))
        .filter_map(|(_, right)| *right)
        .collect();
    let right = marks.iter().filter(|&&r| r).count();
    format!(
        "{right}/{} ({:.0}%)",
        marks.len(),
        100.0 * right as f64 / marks.len().max(1) as f64
    )
}

fn mean(values: impl Iterator<Item = usize>) -> f64 {
    let values: Vec<usize> = values.collect();
    values.iter().sum::<usize>() as f64 / values.len().max(1) as f64
}

fn main() {
    let model = model::path();
    let workload: Workload = ron::Options::default()
        .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
        .from_str(
            &std::fs::read_to_string(root().join("tests/data/oakvale_conversation.ron"))
                .expect("workload"),
        )
        .expect("workload parses");
    let book = LoreBook::load(&root().join("assets").join(LORE)).expect("lore parses");

    // Ours: retrieval, memory, summary, budget, KV cache, default context.
    // No prewarm: every prompt token a turn costs is counted in that turn.
    let ours_runtime = start(
        RuntimeConfig::new(&model)
            .with_assets_dir(root().join("assets"))
            .with_prewarm(false),
    );
    let plain_prefix = accept(&ours_runtime, NpcId(1), blacksmith());
    let mut persona = blacksmith();
    persona.lore = Some(LORE.into());
    persona.prompt_budget = Some(BUDGET);
    accept(&ours_runtime, NpcId(1), persona);
    let ours = converse(&ours_runtime, NpcId(1), &workload);
    drop(ours_runtime);

    // Full context: every lore entry in the system prompt, the whole conversation verbatim.
    let full_runtime = start(
        RuntimeConfig::new(&model)
            .with_context_size(12_288)
            .with_slots(1)
            .with_prewarm(false),
    );
    let mut persona = blacksmith();
    persona
        .knowledge
        .extend(book.entries.iter().map(|entry| entry.text.clone()));
    let full_prefix = accept(&full_runtime, NpcId(1), persona);
    let full = converse(&full_runtime, NpcId(1), &workload);
    drop(full_runtime);

    let lore_tokens = full_prefix - plain_prefix;
    println!(
        "seed workload: {} lore entries, {lore_tokens} lore tokens; {} turns; {}, greedy, replies ≤ {MAX_TOKENS} tokens\n",
        book.entries.len(),
        workload.turns.len(),
        model::name()
    );
    println!(
        "turn | full: prompt | ours: prompt | ours: cached | ours: computed | lore | memories | summarised turns | ours right | full right"
    );
    println!("---|---|---|---|---|---|---|---|---|---");
    for (at, (o, f)) in ours.stats.iter().zip(&full.stats).enumerate() {
        let mark = |right: Option<bool>| match right {
            Some(true) => "yes",
            Some(false) => "no",
            None => "",
        };
        println!(
            "{} | {} | {} | {} | {} | {} | {} | {} | {} | {}",
            at + 1,
            f.prompt_tokens,
            o.prompt_tokens,
            o.cached_tokens,
            o.prompt_tokens - o.cached_tokens,
            o.lore_entries,
            o.memories,
            o.dropped_turns,
            mark(ours.right[at]),
            mark(full.right[at]),
        );
    }

    let naive = mean(full.stats.iter().map(|s| s.prompt_tokens));
    let full_cached = mean(full.stats.iter().map(|s| s.prompt_tokens - s.cached_tokens));
    let ours_computed = mean(ours.stats.iter().map(|s| s.prompt_tokens - s.cached_tokens));
    println!(
        "\n| context | prompt tokens computed per interaction (mean of {} turns) | vs naive | lore facts right | player facts (20+ turns back) right | wall time |",
        workload.turns.len()
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| naive: all lore + whole conversation every turn, no cache | {naive:.0} | 1.000 | same prompts as full context | same prompts as full context | not run (would recompute every prompt) |",
    );
    println!(
        "| full context + KV cache | {full_cached:.0} | {:.3} | {} | {} | {:.0} s |",
        full_cached / naive,
        accuracy(&full, &workload, About::Lore),
        accuracy(&full, &workload, About::Player),
        full.wall.as_secs_f64(),
    );
    println!(
        "| ours: retrieval + memories + summary (budget {BUDGET}) + KV cache | {ours_computed:.0} | {:.3} | {} | {} | {:.0} s |",
        ours_computed / naive,
        accuracy(&ours, &workload, About::Lore),
        accuracy(&ours, &workload, About::Player),
        ours.wall.as_secs_f64(),
    );
    println!("\nreplies (ours | full):");
    for (at, line) in workload.turns.iter().enumerate() {
        if line.about.is_some() {
            println!(
                "{:>2}. {}\n    ours: {}\n    full: {}",
                at + 1,
                line.say,
                ours.replies[at].replace('\n', " "),
                full.replies[at].replace('\n', " ")
            );
        }
    }
}
