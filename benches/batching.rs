//! Many NPCs replying at once: aggregate generation tokens/s for 1, 4, 8 and 16 NPCs, each
//! with a ~1,000-token context, decoded together in one batch per step vs one NPC after
//! another, on the same runtime in one run.
//!
//! ```text
//! cargo bench -p npc_native --bench batching
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use npc_native::{Event, NpcId, Persona, Runtime, RuntimeConfig};

const SIZES: [usize; 4] = [1, 4, 8, 16];
const GENERATE: u32 = 64;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn persona() -> Persona {
    let source = std::fs::read_to_string(root().join("assets/personas/innkeeper.persona.ron"))
        .expect("persona");
    let mut persona = Persona::from_ron(&source, None).expect("persona parses");
    persona.sampling.temperature = Some(0.0);
    persona.sampling.repeat_penalty = Some(1.0);
    persona.sampling.max_tokens = Some(GENERATE);
    persona
}

fn next(runtime: &Runtime) -> Event {
    runtime
        .events()
        .recv_timeout(Duration::from_secs(900))
        .expect("worker answers")
}

/// Sends one line to each NPC at once and waits for every reply. Returns generated tokens
/// and the seconds from the first reply token to the last.
fn round(runtime: &Runtime, npcs: &[NpcId], line: &str) -> (usize, f64) {
    let requests: Vec<_> = npcs
        .iter()
        .map(|&npc| runtime.say(npc, line).unwrap())
        .collect();
    let (mut tokens, mut first, mut last) = (0, f64::MAX, 0f64);
    let mut done = 0;
    while done < requests.len() {
        match next(runtime) {
            Event::Replied { request, stats, .. } if requests.contains(&request) => {
                let start = stats.time_to_first_token.as_secs_f64();
                first = first.min(start);
                last = last.max(start + stats.generation_time.as_secs_f64());
                tokens += stats.generated_tokens;
                done += 1;
            }
            Event::Failed { error, .. } => panic!("{error}"),
            _ => {}
        }
    }
    (tokens, last - first)
}

fn main() {
    let model = root().join(npc_native::DEFAULT_MODEL_PATH);
    assert!(model.is_file(), "run `cargo xtask setup` first");
    let max = *SIZES.last().unwrap();
    let config = RuntimeConfig::new(model)
        .with_slots(max as u32)
        .with_context_size(1536)
        .with_max_line_chars(20_000);
    let threads = config.effective_threads();
    let runtime = Runtime::start(config);
    assert!(matches!(next(&runtime), Event::ModelLoaded(_)));
    let npcs: Vec<NpcId> = (0..max as u64).map(NpcId).collect();
    for &npc in &npcs {
        runtime.set_persona(npc, persona()).unwrap();
        assert!(matches!(next(&runtime), Event::PersonaAccepted { .. }));
    }
    // Give every NPC a ~1,000-token conversation (not timed): prefilled together.
    let history = "The caravan from Riverford brought news of wolves and rain. ".repeat(65);
    round(&runtime, &npcs, &history);

    println!(
        "Default model, {threads} threads, {GENERATE} tokens per reply, ~1,000 tokens of context per NPC\n"
    );
    println!(
        "| NPCs | batched: tok/s total | per NPC | one after another: tok/s total | batched / sequential |"
    );
    println!("|---|---|---|---|---|");
    let line = "Count from one to one hundred: 1, 2, 3, 4, 5, ...";
    for &n in &SIZES {
        let group = &npcs[..n];
        let (tokens, seconds) = round(&runtime, group, line);
        let batched = tokens as f64 / seconds;
        let (mut seq_tokens, mut seq_seconds) = (0, 0.0);
        for &npc in group {
            let (t, s) = round(&runtime, &[npc], line);
            seq_tokens += t;
            seq_seconds += s;
        }
        let sequential = seq_tokens as f64 / seq_seconds;
        println!(
            "| {n} | {batched:.0} | {:.1} | {sequential:.0} | {:.2}× |",
            batched / n as f64,
            batched / sequential
        );
    }
}
