//! What the per-NPC KV cache buys, on the default model:
//!
//! 1. **Turn cost over a long conversation**: time to first token of each of 20 turns with one
//!    NPC, with KV reuse vs the same engine with it disabled (full prompt every turn).
//! 2. **Resume after reload**: an NPC with a ~2,000-token history; time to first token after
//!    loading its saved state vs after recomputing it (the same file with its KV section
//!    damaged, which the runtime detects and recomputes), and the state size per 1,000 tokens,
//!    for f16 and q8_0 keys and values.
//! 3. **Shared preamble**: a new NPC's first reply when another NPC's sequence already holds
//!    the world preamble (copied, not computed) vs in a runtime where no other NPC is resident.
//! 4. **Prewarm**: the first line's time to first token when the worker computed the persona
//!    in the background after it was set, against the later turns of the same conversation.
//!
//! The first three turn prewarm off ([`RuntimeConfig::prewarm`]), so that what they measure
//! is the first reply computing its own prompt.
//!
//! ```text
//! cargo bench -p npc_native --bench kv_cache
//! ```
//! Each configuration runs in a child process of this bench, one after the other (llama.cpp
//! keeps per-thread state that would otherwise leak from one measurement into the next).

#[path = "model.rs"]
mod model;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use npc_native::{Event, KvPrecision, NpcId, Persona, ReplyStats, Runtime, RuntimeConfig};

const QUESTIONS: [&str; 20] = [
    "Good morning!",
    "What is your name?",
    "What do you sell?",
    "How much is an iron sword?",
    "And a horseshoe?",
    "Where does your iron come from?",
    "Is the mine dangerous?",
    "Who is your apprentice?",
    "When is the forge open?",
    "Do you make shields?",
    "How much is a steel shield?",
    "Can you repair my armour?",
    "What do you think of the innkeeper?",
    "Have you seen any wolves?",
    "What is the best weapon for a traveller?",
    "Do you need help with anything?",
    "Could I bring you some ore?",
    "What would you pay for it?",
    "Thank you, friend.",
    "Farewell, Brom.",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn blacksmith(max_tokens: u32) -> Persona {
    greedy("blacksmith", max_tokens)
}

fn greedy(name: &str, max_tokens: u32) -> Persona {
    let source =
        std::fs::read_to_string(root().join(format!("assets/personas/{name}.persona.ron")))
            .expect("persona");
    let mut persona = Persona::from_ron(&source, None).expect("persona parses");
    persona.sampling.temperature = Some(0.0);
    persona.sampling.max_tokens = Some(max_tokens);
    persona
}

fn start(config: RuntimeConfig) -> Runtime {
    let runtime = Runtime::start(config);
    match runtime.events().recv().expect("worker") {
        Event::ModelLoaded(_) => runtime,
        other => panic!("model did not load: {other:?}"),
    }
}

fn next(runtime: &Runtime) -> Event {
    runtime
        .events()
        .recv_timeout(Duration::from_secs(600))
        .expect("worker answers")
}

fn reply(runtime: &Runtime, npc: NpcId, line: &str) -> ReplyStats {
    let request = runtime.say(npc, line).expect("worker running");
    loop {
        match next(runtime) {
            Event::Replied {
                request: r, stats, ..
            } if r == request => return stats,
            Event::Failed { error, .. } => panic!("{error}"),
            _ => {}
        }
    }
}

fn config(context: u32) -> RuntimeConfig {
    RuntimeConfig::new(model::path())
        .with_slots(1)
        .with_context_size(context)
        .with_prewarm(false)
}

/// Child: the blacksmith gets his persona, the worker prewarms it, then 6 turns; prints
/// `PREWARM prompt_tokens cached_tokens ttft_ms` per turn (the first line first).
fn prewarm() {
    let runtime = start(config(4096).with_prewarm(true));
    let npc = NpcId(1);
    runtime.set_persona(npc, blacksmith(48)).unwrap();
    loop {
        match next(&runtime) {
            Event::Prewarmed { .. } => break,
            Event::PersonaRejected { error, .. } => panic!("{error}"),
            _ => {}
        }
    }
    for question in &QUESTIONS[..6] {
        print_turn("PREWARM", &reply(&runtime, npc, question));
    }
}

/// One turn as a child prints it: `TAG prompt_tokens cached_tokens ttft_ms`.
fn print_turn(tag: &str, stats: &ReplyStats) {
    println!(
        "{tag} {} {} {:.1}",
        stats.prompt_tokens,
        stats.cached_tokens,
        stats.time_to_first_token.as_secs_f64() * 1e3
    );
}

/// Child: 20 turns; prints `TURN prompt_tokens cached_tokens ttft_ms` per turn.
fn turns(reuse: bool) {
    let runtime = start(config(4096).with_kv_reuse(reuse));
    let npc = NpcId(1);
    runtime.set_persona(npc, blacksmith(48)).unwrap();
    for question in QUESTIONS {
        print_turn("TURN", &reply(&runtime, npc, question));
    }
}

/// Child: builds a ~2,000-token history, saves it, then measures the first reply after a
/// load that restores the KV state and after one that must recompute it.
fn resume(precision: KvPrecision) {
    let dir = std::env::temp_dir().join(format!("npc-kv-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let runtime = start(config(4096).with_kv_precision(precision));
    let npc = NpcId(1);
    runtime.set_persona(npc, blacksmith(96)).unwrap();
    let mut history = 0;
    for question in QUESTIONS.iter().cycle() {
        let stats = reply(&runtime, npc, question);
        history = stats.prompt_tokens + stats.generated_tokens;
        if history >= 2000 {
            break;
        }
    }
    let saved = dir.join("npc.state");
    runtime.save_npc(npc, &saved).unwrap();
    let (bytes, kv_tokens) = match next(&runtime) {
        Event::NpcSaved {
            bytes, kv_tokens, ..
        } => (bytes, kv_tokens),
        other => panic!("{other:?}"),
    };
    // The same file with one byte of its KV section flipped: the checksum catches it and
    // the runtime recomputes the conversation from its text.
    let mut damaged = std::fs::read(&saved).unwrap();
    // The KV section is nearly all of the file (the conversation and the NPC's memories are
    // small sections around it), so its middle byte is inside it.
    let middle = damaged.len() / 2;
    damaged[middle] ^= 1;
    let recompute = dir.join("recompute.state");
    std::fs::write(&recompute, damaged).unwrap();

    let line = "Tell me one more thing about the mine.";
    let (mut restored_ms, mut recomputed_ms) = (Vec::new(), Vec::new());
    let mut computed_after_load = 0;
    for run in 0..3u64 {
        for (file, times) in [(&saved, &mut restored_ms), (&recompute, &mut recomputed_ms)] {
            let other = NpcId(100 + run * 2 + u64::from(file == &recompute));
            runtime.set_persona(other, blacksmith(8)).unwrap();
            runtime.load_npc(other, file).unwrap();
            let _ = next(&runtime); // PersonaAccepted
            match next(&runtime) {
                Event::NpcLoaded { .. } => {}
                other => panic!("{other:?}"),
            }
            let stats = reply(&runtime, other, line);
            times.push(stats.time_to_first_token.as_secs_f64() * 1e3);
            if file == &saved {
                computed_after_load = stats.prompt_tokens - stats.cached_tokens;
            }
            runtime.forget(other).unwrap();
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "RESUME {history} {kv_tokens} {bytes} {:.1} {:.1} {computed_after_load}",
        median(restored_ms),
        median(recomputed_ms)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn preamble() -> String {
    std::fs::read_to_string(root().join("assets/world/oakvale.preamble.txt")).expect("preamble")
}

/// Child: the innkeeper's first reply, after the blacksmith's (`with` another NPC resident
/// to copy the preamble from) or alone. Prints `SHARED prompt computed copied ttft_ms`.
fn shared(with_donor: bool) {
    let runtime = start(config(2048).with_slots(4).with_preamble(preamble()));
    if with_donor {
        runtime.set_persona(NpcId(1), blacksmith(8)).unwrap();
        reply(&runtime, NpcId(1), "Good morning!");
    }
    runtime
        .set_persona(NpcId(2), greedy("innkeeper", 8))
        .unwrap();
    let stats = reply(&runtime, NpcId(2), "Good morning!");
    println!(
        "SHARED {} {} {} {:.1}",
        stats.prompt_tokens,
        stats.prompt_tokens - stats.cached_tokens,
        stats.shared_tokens,
        stats.time_to_first_token.as_secs_f64() * 1e3
    );
}

fn child(args: &[&str]) -> Vec<Vec<f64>> {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .output()
        .expect("run child");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| {
            ["TURN ", "RESUME ", "SHARED ", "PREWARM "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map(|n| n.parse().unwrap())
                .collect()
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--turns") => return turns(args[2] == "on"),
        Some("--resume") => {
            return resume(match args[2].as_str() {
                "q8_0" => KvPrecision::Q8_0,
                _ => KvPrecision::F16,
            });
        }
        Some("--shared") => return shared(args[2] == "with"),
        Some("--prewarm") => return prewarm(),
        _ => {}
    }
    let model = model::path();
    assert!(model.is_file(), "run `cargo xtask setup` first");
    let threads = config(4096).effective_threads();
    let cached = child(&["--turns", "on"]);
    let full = child(&["--turns", "off"]);
    println!("## Turn cost over a long conversation\n");
    println!(
        "{}, {threads} threads, greedy, one NPC, 20 turns (replies up to 48 tokens).\n",
        model::name()
    );
    println!(
        "| turn | prompt tokens | computed with KV reuse | TTFT with reuse (ms) | TTFT, full prompt each turn (ms) | full / reuse |"
    );
    println!("|---|---|---|---|---|---|");
    for (turn, (c, f)) in cached.iter().zip(&full).enumerate() {
        if turn == 0 || turn == 4 || turn == 9 || turn == 14 || turn == 19 {
            println!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1}× |",
                turn + 1,
                c[0],
                c[0] - c[1],
                c[2],
                f[2],
                f[2] / c[2]
            );
        }
    }
    let (first, last) = (&cached[0], &cached[cached.len() - 1]);
    println!(
        "\nWith reuse, TTFT(turn 20) / TTFT(turn 1) = {:.2}; at turn 20 the full prompt takes {:.1}× longer.\n",
        last[2] / first[2],
        full[full.len() - 1][2] / last[2]
    );
    println!("## Resume after reload\n");
    println!(
        "| KV values | history tokens | KV tokens saved | file size | per 1,000 tokens | tokens computed after load | TTFT after load (ms) | TTFT recomputing (ms) | recompute / load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for precision in [KvPrecision::F16, KvPrecision::Q8_0] {
        let resume = &child(&["--resume", precision.name()])[0];
        println!(
            "| {} | {:.0} | {:.0} | {:.1} MB | {:.1} MB | {:.0} | {:.0} | {:.0} | {:.1}× |",
            precision.name(),
            resume[0],
            resume[1],
            resume[2] / 1e6,
            resume[2] / 1e6 / resume[1] * 1000.0,
            resume[5],
            resume[3],
            resume[4],
            resume[4] / resume[3]
        );
    }
    let with = &child(&["--shared", "with"])[0];
    let alone = &child(&["--shared", "without"])[0];
    println!("\n## Shared world preamble\n");
    println!(
        "The innkeeper's first reply, with `assets/world/oakvale.preamble.txt` before its persona; 4 slots.\n"
    );
    println!("| | prompt tokens | computed | copied from another NPC | TTFT (ms) |");
    println!("|---|---|---|---|---|");
    for (label, row) in [
        ("the blacksmith's sequence is resident", with),
        ("no other NPC resident", alone),
    ] {
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} | {:.0} |",
            row[0], row[1], row[2], row[3]
        );
    }
    println!(
        "\nCopying the preamble: first-reply TTFT {:.1}× lower.",
        alone[3] / with[3]
    );

    let warm = child(&["--prewarm"]);
    println!("\n## Prewarm: the persona computed before the player speaks\n");
    println!(
        "The blacksmith's persona is set, the worker computes it in the background \
         (`Event::Prewarmed`), then the player speaks; greedy, replies up to 48 tokens.\n"
    );
    println!("| turn | prompt tokens | computed | TTFT (ms) | TTFT without prewarm (ms) |");
    println!("|---|---|---|---|---|");
    for (turn, row) in warm.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            turn + 1,
            row[0],
            row[0] - row[1],
            row[2],
            cached[turn][2]
        );
    }
    let mut later: Vec<f64> = warm[1..].iter().map(|row| row[2]).collect();
    later.sort_by(f64::total_cmp);
    let later = later[later.len() / 2];
    println!(
        "\nFirst line after prewarm: TTFT {:.0} ms, {:.2}× the median of turns 2-{} ({later:.0} ms; target ≤ 1.5×). Without prewarm the first line took {:.0} ms ({:.1}× that median).",
        warm[0][2],
        warm[0][2] / later,
        warm.len(),
        cached[0][2],
        cached[0][2] / later
    );
}
