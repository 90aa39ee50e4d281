//! Per-NPC LoRA adapters: 16 NPCs replying at once over 1, 2, 4 and 8 distinct adapters vs
//! the same 16 NPCs on the base model, in one run and in interleaved pairs; then the same
//! adapter groups each in its own process (one adapter per process, the deployment without
//! per-NPC adapters), all at once.
//!
//! ```text
//! cargo bench -p npc_native --bench adapters                              # the default model
//! NPC_BENCH_MODEL=smollm2-135m cargo bench -p npc_native --bench adapters # the test model
//! ```
//!
//! The adapters are synthetic (`npc_native::write_synthetic_adapter`, rank 8 on every
//! layer's `attn_q` and `attn_v`): the cost of an adapter does not depend on what it learned.
//! NPCs on different adapters cannot share a `decode` call (llama.cpp applies a context's
//! adapter to every token of a call), and each change of the context's adapter makes
//! llama.cpp rebuild its graphs: the runtime decodes one adapter's NPCs for
//! `RuntimeConfig::adapter_slice_steps` steps (default 1: each adapter one step in turn)
//! before the next adapter's; the table compares that with a slice of 8, in interleaved
//! pairs too. Every NPC keeps its KV slot between rounds, in the runtimes and in the child
//! processes alike. Rates are generated tokens over the window from the first reply token of any NPC to
//! the last of all; every reply runs to its 32 tokens.

#[path = "model.rs"]
mod model;
#[path = "peer.rs"]
mod peer;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use npc_native::{
    Event, NpcId, Persona, PersonaAdapter, Runtime, RuntimeConfig, SyntheticAdapter,
    write_synthetic_adapter,
};
use peer::{Pairs, median};

const NPCS: usize = 16;
const ADAPTER_COUNTS: [usize; 4] = [1, 2, 4, 8];
const GENERATE: u32 = 32;
/// Interleaved pairs (base model, adapters) per adapter count.
const REPS: usize = 3;
const CONTEXT: u32 = 1024;
/// The longer slice compared with the default one.
const LONGER_SLICE: u32 = 8;
/// Long enough that every reply runs to its [`GENERATE`] tokens.
const LINE: &str = "Say every number from 1 to 300, separated by commas, and nothing else.";

fn persona(adapter: Option<usize>) -> Persona {
    let source = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/personas/innkeeper.persona.ron"),
    )
    .expect("persona");
    let mut persona = Persona::from_ron(&source, None).expect("persona parses");
    persona.sampling.temperature = Some(0.0);
    persona.sampling.repeat_penalty = Some(1.0);
    persona.sampling.max_tokens = Some(GENERATE);
    persona.adapter = adapter.map(|index| PersonaAdapter {
        path: adapter_name(index),
        scale: 1.0,
    });
    persona
}

fn adapter_name(index: usize) -> String {
    format!("adapter-{index}.gguf")
}

fn next(runtime: &Runtime) -> Event {
    runtime
        .events()
        .recv_timeout(Duration::from_secs(900))
        .expect("worker answers")
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One round: [`LINE`] to every NPC in `npcs` at once. Returns the tokens generated and the
/// generation window (first reply token of any NPC, last of all) in seconds since the epoch.
fn round(runtime: &Runtime, npcs: &[NpcId]) -> (usize, f64, f64) {
    let sent = now();
    let requests: Vec<_> = npcs
        .iter()
        .map(|&npc| runtime.say(npc, LINE).unwrap())
        .collect();
    let (mut tokens, mut first, mut last, mut done) = (0, f64::MAX, 0f64, 0);
    while done < requests.len() {
        match next(runtime) {
            Event::Replied { request, stats, .. } if requests.contains(&request) => {
                let start = sent + stats.time_to_first_token.as_secs_f64();
                first = first.min(start);
                last = last.max(start + stats.generation_time.as_secs_f64());
                tokens += stats.generated_tokens;
                done += 1;
            }
            Event::Failed { error, .. } => panic!("{error}"),
            _ => {}
        }
    }
    (tokens, first, last)
}

fn config(dir: &Path, adapters: usize) -> RuntimeConfig {
    let mut config = RuntimeConfig::new(model::path())
        .with_assets_dir(dir)
        .with_prewarm(false)
        .with_guard(false)
        .with_slots(NPCS as u32)
        .with_context_size(CONTEXT);
    for index in 0..adapters {
        config = config.with_adapter(adapter_name(index));
    }
    config
}

fn start(config: RuntimeConfig) -> Runtime {
    let runtime = Runtime::start(config);
    match next(&runtime) {
        Event::ModelLoaded(_) => runtime,
        other => panic!("model did not load: {other:?}"),
    }
}

/// Gives `npcs` their personas (NPC `j` on adapter `adapter(j)`) and has each reply once, so
/// that the timed rounds compute only their new line.
fn prepare(runtime: &Runtime, npcs: &[NpcId], adapter: impl Fn(usize) -> Option<usize>) {
    for (j, &npc) in npcs.iter().enumerate() {
        runtime.set_persona(npc, persona(adapter(j))).unwrap();
        match next(runtime) {
            Event::PersonaAccepted { .. } => {}
            other => panic!("persona not accepted: {other:?}"),
        }
    }
    round(runtime, npcs);
}

/// The child process of the one-process-per-adapter comparison: `NPCS / groups` NPCs on
/// adapter `index`, `threads` threads. Prints `ready`, waits for a line on stdin, runs one
/// round, prints `tokens first last`.
fn child(dir: &Path, index: usize, groups: usize, threads: u32) {
    let runtime = start(
        config(dir, groups)
            .with_threads(threads)
            .with_slots((NPCS / groups) as u32),
    );
    let npcs: Vec<NpcId> = (0..(NPCS / groups) as u64).map(NpcId).collect();
    prepare(&runtime, &npcs, |_| Some(index));
    println!("ready");
    let mut go = String::new();
    std::io::stdin().lock().read_line(&mut go).unwrap();
    let (tokens, first, last) = round(&runtime, &npcs);
    println!("{tokens} {first} {last}");
}

/// The adapter groups of `groups` each in its own child process, all started together:
/// aggregate tokens/s over their joint window.
fn processes(dir: &Path, groups: usize, threads: u32) -> f64 {
    let exe = std::env::current_exe().unwrap();
    let per = (threads / groups as u32).max(1);
    let mut children: Vec<_> = (0..groups)
        .map(|index| {
            Command::new(&exe)
                .args(["--child", &dir.display().to_string()])
                .args([index.to_string(), groups.to_string(), per.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("the bench runs itself as a child")
        })
        .collect();
    let mut outputs: Vec<_> = children
        .iter_mut()
        .map(|c| std::io::BufReader::new(c.stdout.take().unwrap()))
        .collect();
    for output in &mut outputs {
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
    }
    for child in &mut children {
        writeln!(child.stdin.as_mut().unwrap()).unwrap();
    }
    let (mut tokens, mut first, mut last) = (0usize, f64::MAX, 0f64);
    for output in &mut outputs {
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        let parts: Vec<f64> = line
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        tokens += parts[0] as usize;
        first = first.min(parts[1]);
        last = last.max(parts[2]);
    }
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    tokens as f64 / (last - first)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        return child(
            Path::new(&args[at + 1]),
            args[at + 2].parse().unwrap(),
            args[at + 3].parse().unwrap(),
            args[at + 4].parse().unwrap(),
        );
    }
    let dir: PathBuf =
        std::env::temp_dir().join(format!("npc-adapter-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let most = *ADAPTER_COUNTS.last().unwrap();
    for index in 0..most {
        let settings = SyntheticAdapter {
            seed: index as u64 + 1,
            strength: 0.1,
            ..SyntheticAdapter::default()
        };
        write_synthetic_adapter(&model::path(), &dir.join(adapter_name(index)), &settings)
            .expect("a synthetic adapter");
    }
    let config = config(&dir, most);
    let threads = config.effective_threads();
    let slice = config.adapter_slice_steps;
    // Every NPC keeps its KV slot (no eviction between rounds, as in the child processes):
    // the adapter sets in one runtime, the base-model NPCs in another; and the adapter sets
    // on a runtime with a longer slice.
    let slots = (NPCS * ADAPTER_COUNTS.len()) as u32;
    let runtime = start(config.clone().with_slots(slots));
    let on_base = start(config.clone());
    let longer = start(
        config
            .with_slots(slots)
            .with_adapter_slice_steps(LONGER_SLICE),
    );
    // One group of 16 NPCs on the base model, and one per adapter count.
    let base: Vec<NpcId> = (0..NPCS as u64).map(NpcId).collect();
    prepare(&on_base, &base, |_| None);
    let sets: Vec<Vec<NpcId>> = ADAPTER_COUNTS
        .iter()
        .enumerate()
        .map(|(set, &k)| {
            let npcs: Vec<NpcId> = (0..NPCS as u64)
                .map(|j| NpcId(100 * (set as u64 + 1) + j))
                .collect();
            prepare(&runtime, &npcs, |j| Some(j % k));
            prepare(&longer, &npcs, |j| Some(j % k));
            npcs
        })
        .collect();
    let rate = |runtime: &Runtime, npcs: &[NpcId]| {
        let (tokens, first, last) = round(runtime, npcs);
        tokens as f64 / (last - first)
    };
    let mut rows: Vec<Pairs> = ADAPTER_COUNTS.iter().map(|_| Pairs::default()).collect();
    let mut sliced: Vec<Pairs> = ADAPTER_COUNTS.iter().map(|_| Pairs::default()).collect();
    for _ in 0..REPS {
        for ((set, row), sliced) in sets.iter().zip(&mut rows).zip(&mut sliced) {
            let base_rate = rate(&on_base, &base);
            let on_adapters = rate(&runtime, set);
            let longer_slice = rate(&longer, set);
            row.push(on_adapters, base_rate);
            sliced.push(longer_slice, on_adapters);
        }
    }
    drop(runtime);
    drop(on_base);
    drop(longer);
    let mut separate: Vec<Vec<f64>> = ADAPTER_COUNTS.iter().map(|_| Vec::new()).collect();
    for _ in 0..REPS {
        for (&k, out) in ADAPTER_COUNTS.iter().zip(&mut separate) {
            out.push(processes(&dir, k, threads));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "\n{}, {threads} threads, {NPCS} NPCs, {GENERATE} greedy tokens each; medians of {REPS} \
         interleaved pairs\n",
        model::name()
    );
    println!(
        "| adapters | NPCs per adapter | on adapters (slice {slice}): tok/s | base model: tok/s | adapters / base (range) | round of steps vs base, per extra adapter (ms) | slice {LONGER_SLICE}: tok/s | slice {LONGER_SLICE} / slice {slice} (range) | one process per adapter: tok/s | in one runtime / processes |"
    );
    println!("|---|---:|---:|---:|---|---:|---:|---|---:|---:|");
    for (((&k, row), separate), sliced) in
        ADAPTER_COUNTS.iter().zip(&rows).zip(&separate).zip(&sliced)
    {
        let (ours, base) = (row.ours(), row.peer());
        // Every NPC takes one token per round of the adapters: the time of a round, from
        // the rate over the NPCs, less the base model's, per adapter beyond the first.
        let round_time = |rate: f64| NPCS as f64 / rate;
        let added = (round_time(ours) - round_time(base)) * 1e3 / (k.max(2) - 1) as f64;
        let added = format!("{added:.1}");
        let processes = median(separate.clone());
        println!(
            "| {k} | {} | {ours:.0} | {base:.0} | {} | {added} | {:.0} | {} | {processes:.0} | {:.2}× |",
            NPCS / k,
            row.ratio(),
            sliced.ours(),
            sliced.ratio(),
            ours / processes
        );
    }
}
