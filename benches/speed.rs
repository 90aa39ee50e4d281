//! Single-NPC speed of the runtime on the default model, measured through the public API as a
//! game sees it, beside a bare `llama-cpp-2` decode loop on the same model, threads and
//! machine in the same run (the ratio is the runtime's overhead).
//!
//! ```text
//! cargo xtask bench            # or: cargo bench -p npc_native --bench speed
//! ```
//! Prints markdown tables. Threads default to the machine's cores (`NPC_BENCH_THREADS`
//! overrides). Under `cargo xtask bench`, llama.cpp's own `llama-bench -p 512 -n 128` runs in
//! the same run and a second table sets the runtime's greedy speed beside it. A third table
//! measures what a persona's action grammar costs; `cargo bench -p npc_native --bench speed --
//! grammar` prints only that one.

#[path = "model.rs"]
mod model;
#[path = "peer.rs"]
mod peer;

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use npc_native::{Event, NpcId, Persona, ReplyStats, Runtime, RuntimeConfig};
use peer::{Breakdown, Pairs, median};

/// Pairs per measurement; `NPC_BENCH_RUNS` overrides it (for a quick look, not a table).
fn runs() -> usize {
    std::env::var("NPC_BENCH_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(9)
}
const CONTEXT: u32 = 2048;
const GENERATE: usize = 128;
/// The line both generation measurements answer.
const COUNT: &str = "Say every number from 1 to 300, separated by commas, and nothing else.";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model() -> PathBuf {
    model::path()
}

/// The peer: llama-cpp-2 used directly, as its examples do. Prompt processing of `prompt`
/// tokens in one batch; then, from `context` tokens, generation of [`GENERATE`] tokens with
/// the same sampler chain the runtime builds for temperature 0.7.
fn bare_loop(threads: u32, prompt: usize, context: usize, runs: usize) -> (f64, f64) {
    let backend = LlamaBackend::init().expect("no other backend is alive yet");
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    let model =
        LlamaModel::load_from_file(&backend, model(), &LlamaModelParams::default()).expect("model");
    let threads = i32::try_from(threads).unwrap_or(1);
    // Flash attention as the runtime's default configuration has it (off, for reproducible
    // batching).
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(CONTEXT))
        .with_n_batch(1024)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_flash_attention_policy(0);
    let mut ctx = model.new_context(&backend, params).expect("context");
    let tokens = model.vocab().tokenize(
        "The caravan from Riverford brought news of wolves and rain. "
            .repeat(64)
            .as_bytes(),
        true,
        false,
    );
    let tokens = &tokens[..prompt.min(tokens.len())];
    let mut batch = LlamaBatch::new(1024, 1);
    // Warm-up, as the runtime does at load.
    batch.add(tokens[0], 0, &[0], true).unwrap();
    ctx.decode(&mut batch).unwrap();
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        ctx.clear_kv_cache();
        batch.clear();
        batch.add_sequence(tokens, 0, false).unwrap();
        let started = Instant::now();
        ctx.decode(&mut batch).unwrap();
        pp.push(tokens.len() as f64 / started.elapsed().as_secs_f64());
        ctx.clear_kv_cache();
        batch.clear();
        batch.add_sequence(&tokens[..context], 0, false).unwrap();
        ctx.decode(&mut batch).unwrap();
        let mut sampler = LlamaSampler::chain_simple([
            LlamaSampler::penalties(model.n_vocab(), 64, 1.1, 0.0, 0.0),
            LlamaSampler::top_k(40),
            LlamaSampler::top_p(0.9, 1),
            LlamaSampler::min_p(0.05, 1),
            LlamaSampler::temp(0.7),
            LlamaSampler::dist(1),
        ]);
        let mut last = batch.n_tokens() - 1;
        let started = Instant::now();
        for position in context..context + GENERATE {
            let token = sampler.sample(&ctx, last);
            batch.clear();
            batch
                .add(token, i32::try_from(position).unwrap(), &[0], true)
                .unwrap();
            ctx.decode(&mut batch).unwrap();
            last = 0;
        }
        tg.push(GENERATE as f64 / started.elapsed().as_secs_f64());
    }
    (median(pp), median(tg))
}

/// One run of [`bare_loop`] in a child process.
fn peer_in_child(threads: u32, prompt: usize, context: usize) -> (f64, f64) {
    let output = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args([
            "--peer",
            &threads.to_string(),
            &prompt.to_string(),
            &context.to_string(),
        ])
        .output()
        .expect("run the peer");
    assert!(
        output.status.success(),
        "peer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let numbers: Vec<f64> = text
        .lines()
        .find_map(|line| line.strip_prefix("PEER "))
        .expect("the peer prints its numbers")
        .split_whitespace()
        .map(|n| n.parse().expect("a number"))
        .collect();
    (numbers[0], numbers[1])
}

fn persona(max_tokens: u32, temperature: f32, seed: u32) -> Persona {
    let source = std::fs::read_to_string(root().join("assets/personas/innkeeper.persona.ron"))
        .expect("persona");
    let mut persona = Persona::from_ron(&source, None).expect("persona parses");
    persona.sampling.max_tokens = Some(max_tokens);
    persona.sampling.temperature = Some(temperature);
    persona.sampling.seed = Some(seed);
    persona
}

/// Waits for the reply the way a game does: draining the channel once per 60 Hz frame
/// (the worker measures its own timings, so the polling does not blur them).
fn reply(runtime: &Runtime, npc: NpcId, line: &str) -> ReplyStats {
    let request = runtime.say(npc, line).expect("worker running");
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(16));
        for event in runtime.events().try_iter() {
            match event {
                Event::Replied {
                    request: r, stats, ..
                } if r == request => return stats,
                Event::Failed { error, .. } => panic!("{error}"),
                _ => {}
            }
        }
    }
    panic!("no reply within 300 s");
}

/// The smallest persona: a prompt of a few dozen tokens, greedy, no repeat penalty — the
/// runtime's closest match to llama-bench's generation from an empty context.
fn minimal(max_tokens: u32) -> Persona {
    let mut persona = Persona::from_ron(r#"(name: "Mira", role: "a villager")"#, None)
        .expect("minimal persona parses");
    persona.sampling.max_tokens = Some(max_tokens);
    persona.sampling.temperature = Some(0.0);
    persona.sampling.repeat_penalty = Some(1.0);
    persona
}

/// The runtime measured the way `llama-bench -p 512` and `-n 128` measure llama.cpp, one
/// repetition: a cold 512-token prompt (`line` sizes it, see [`line_for_512`]), and
/// [`GENERATE`] greedy tokens from the minimal persona's short context. Returns (pp, tg)
/// tok/s, the context before generation and the greedy reply's stats.
fn like_llama_bench(runtime: &Runtime, line: &str) -> (f64, f64, usize, ReplyStats) {
    let stats = reply(runtime, fresh(runtime, minimal(1)), line);
    assert_eq!(
        stats.prompt_tokens, 512,
        "the prompt is sized to llama-bench's"
    );
    let pp = stats.prompt_tokens as f64 / stats.time_to_first_token.as_secs_f64();
    let stats = reply(runtime, fresh(runtime, minimal(GENERATE as u32)), COUNT);
    assert_eq!(
        stats.generated_tokens, GENERATE,
        "greedy counting runs to max_tokens"
    );
    (pp, stats.tokens_per_second(), stats.prompt_tokens, stats)
}

/// A line that makes the minimal persona's whole prompt 512 tokens: one token per
/// repetition, after learning the persona's own share.
fn line_for_512(runtime: &Runtime) -> String {
    let probe = reply(runtime, fresh(runtime, minimal(1)), &" rain".repeat(100));
    " rain".repeat(512 + 100 - probe.prompt_tokens)
}

/// [`like_llama_bench`] [`runs`] times, each right after one repetition of `llama-bench`
/// with the same flash-attention setting. Returns (pp pairs, tg pairs, generation depth,
/// where the greedy tokens' time went); without llama.cpp's tools the pairs hold only the
/// runtime's numbers (peer 0).
fn against_llama_bench(
    runtime: &Runtime,
    flash_attention: bool,
    threads: u32,
) -> (Pairs, Pairs, usize, Breakdown) {
    let line = line_for_512(runtime);
    // The minimal persona's context before generation, for llama-bench's `-d`.
    let depth = reply(runtime, fresh(runtime, minimal(1)), COUNT).prompt_tokens;
    let (mut pp, mut tg) = (Pairs::default(), Pairs::default());
    let mut breakdown = Breakdown::default();
    for _ in 0..runs() {
        let (peer_pp, peer_tg) = peer::bin_dir().map_or((0.0, 0.0), |dir| {
            peer::llama_bench(&dir, &model(), threads, flash_attention, depth)
        });
        let (ours_pp, ours_tg, context, stats) = like_llama_bench(runtime, &line);
        breakdown.add(&stats);
        assert_eq!(
            context, depth,
            "generation starts from the depth llama-bench was given"
        );
        pp.push(ours_pp, peer_pp);
        tg.push(ours_tg, peer_tg);
    }
    (pp, tg, depth, breakdown)
}

/// What the action grammar costs: the blacksmith with its declared actions (every reply
/// sampled under their grammar) against the same persona without them, greedy, in pairs.
/// Returns the pairs (with, without) and the tokens each reply generated (last run).
fn action_grammar(runtime: &Runtime) -> (Pairs, usize, usize) {
    let source = std::fs::read_to_string(root().join("assets/personas/blacksmith.persona.ron"))
        .expect("persona");
    let persona = |actions: bool| {
        let mut persona = Persona::from_ron(&source, None).expect("persona parses");
        persona.sampling.temperature = Some(0.0);
        persona.sampling.max_tokens = Some(64);
        if !actions {
            persona.actions.clear();
        }
        persona
    };
    let line = "Tell me everything about your forge and your prices, in detail.";
    let mut pairs = Pairs::default();
    let (mut with_tokens, mut without_tokens) = (0, 0);
    for _ in 0..runs() {
        let without = reply(runtime, fresh(runtime, persona(false)), line);
        let with = reply(runtime, fresh(runtime, persona(true)), line);
        pairs.push(with.tokens_per_second(), without.tokens_per_second());
        (with_tokens, without_tokens) = (with.generated_tokens, without.generated_tokens);
    }
    (pairs, with_tokens, without_tokens)
}

/// A new NPC with `persona`, so nothing of it is cached.
fn fresh(runtime: &Runtime, persona: Persona) -> NpcId {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1_000);
    let npc = NpcId(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    runtime.set_persona(npc, persona).unwrap();
    npc
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--peer") {
        let number = |k: usize| args[at + k].parse::<usize>().expect("peer argument");
        let (pp, tg) = bare_loop(number(1) as u32, number(2), number(3), 1);
        println!("PEER {pp} {tg}");
        return;
    }
    // Every measurement is of a cold NPC: no prewarm may compute its prompt early.
    let mut config = RuntimeConfig::new(model())
        .with_prewarm(false)
        .with_slots(1)
        .with_context_size(CONTEXT)
        .with_max_line_chars(10_000);
    if let Some(threads) = std::env::var("NPC_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        config = config.with_threads(threads);
    }
    let threads = config.effective_threads();
    let reproducible = config.reproducible_batching_applies();
    if args.iter().any(|a| a == "grammar") {
        let runtime = Runtime::start(config);
        match runtime.events().recv().expect("worker") {
            Event::ModelLoaded(_) => {}
            other => panic!("model did not load: {other:?}"),
        }
        let (grammar, with_tokens, without_tokens) = action_grammar(&runtime);
        return print_grammar(&grammar, with_tokens, without_tokens);
    }

    // A ~700-token player line: prompt processing dominates its time to first token.
    let long_line = "The caravan from Riverford brought news of wolves, of rain, and of a merchant who sells blue glass. ".repeat(22);
    // The peer runs in a child process of this bench: llama.cpp's backend is one per process,
    // and an idle OpenMP thread team left behind by one user slows the next one down.
    let config_off = config.clone().with_reproducible_batching(false);
    let runtime = Runtime::start(config);
    match runtime.events().recv().expect("worker") {
        Event::ModelLoaded(_) => {}
        other => panic!("model did not load: {other:?}"),
    }
    // The peer processes a prompt as long as the runtime's (which depends on the tokenizer).
    let peer_prompt =
        reply(&runtime, fresh(&runtime, persona(1, 0.0, 1)), &long_line).prompt_tokens;
    let peer_context = 256;
    let (mut prefill, mut sampled) = (Pairs::default(), Pairs::default());
    let mut sampled_breakdown = Breakdown::default();
    let (mut prompt_tokens, mut context_at_generation) = (0, 0);
    for run in 0..runs() {
        let (bare_pp, bare_tg) = peer_in_child(threads, peer_prompt, peer_context);
        // A fresh NPC each time, so nothing is cached.
        let stats = reply(&runtime, fresh(&runtime, persona(1, 0.0, 1)), &long_line);
        prompt_tokens = stats.prompt_tokens;
        prefill.push(
            stats.prompt_tokens as f64 / stats.time_to_first_token.as_secs_f64(),
            bare_pp,
        );
        // Sampling may end a reply early; the bare loop always makes GENERATE tokens, so
        // seeds are tried until a reply runs as long.
        let stats = (0..20)
            .find_map(|attempt| {
                let npc = fresh(
                    &runtime,
                    persona(GENERATE as u32, 0.7, run as u32 * 100 + attempt),
                );
                let stats = reply(&runtime, npc, COUNT);
                (stats.generated_tokens == GENERATE).then_some(stats)
            })
            .expect("one of 20 seeds samples a full-length reply");
        context_at_generation = stats.prompt_tokens;
        sampled_breakdown.add(&stats);
        sampled.push(stats.tokens_per_second(), bare_tg);
    }
    assert_eq!(
        prompt_tokens, peer_prompt,
        "the peer processed a prompt of the same length"
    );
    let (pp_off, tg_off, depth, greedy_breakdown) = against_llama_bench(&runtime, false, threads);
    let (grammar, with_tokens, without_tokens) = action_grammar(&runtime);
    drop(runtime);
    // The same measurement with reproducible batching off: flash attention as llama.cpp
    // chooses it (on, for this CPU build).
    let fast = Runtime::start(config_off);
    match fast.events().recv().expect("worker") {
        Event::ModelLoaded(_) => {}
        other => panic!("model did not load: {other:?}"),
    }
    let (pp_on, tg_on, _, _) = against_llama_bench(&fast, true, threads);
    drop(fast);

    println!(
        "{}, {threads} threads, {CONTEXT}-token context; medians of {} pairs, each runtime measurement right after its peer's (ratio: median of the pairs' ratios, and their range)\n",
        model::name(),
        runs()
    );
    println!("| measure | bevy_npc_ai runtime | bare llama-cpp-2 loop | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| prompt processing, {prompt_tokens} tokens, cold (tok/s) | {:.0} | {:.0} | {} |",
        prefill.ours(),
        prefill.peer(),
        prefill.ratio()
    );
    println!(
        "| generation, temperature 0.7, top-k 40, top-p, min-p, repeat penalty (tok/s) | {:.0} | {:.0} | {} |",
        sampled.ours(),
        sampled.peer(),
        sampled.ratio()
    );
    println!(
        "\nRuntime: default configuration (reproducible batching: flash attention off); prompt \
         processing is prompt tokens over time to first token (rendering, tokenizing and \
         scheduling included); generation is from {context_at_generation} tokens of context, \
         {GENERATE} tokens, while a 60 Hz loop drains the events. Peer: flash attention off, \
         from {peer_context} tokens, {GENERATE} tokens."
    );

    println!("\n## Against llama.cpp's llama-bench, same run\n");
    println!(
        "| measure | runtime, default ({}) | llama-bench -fa 0 | ratio | runtime, reproducible batching off | llama-bench -fa 1 | ratio |",
        if reproducible {
            "flash attention off"
        } else {
            "reproducible batching does not apply here: flash attention as llama.cpp chooses"
        }
    );
    println!("|---|---|---|---|---|---|---|");
    let built = peer::bin_dir().is_some();
    let cells = |pairs: &Pairs| {
        if built {
            format!(
                "{:.0} | {:.1} | {}",
                pairs.ours(),
                pairs.peer(),
                pairs.ratio()
            )
        } else {
            format!("{:.0} | not built |", pairs.ours())
        }
    };
    println!(
        "| prompt processing, 512 tokens, cold (tok/s) | {} | {} |",
        cells(&pp_off),
        cells(&pp_on)
    );
    println!(
        "| generation, greedy, {GENERATE} tokens after {depth} of context (tok/s) | {} | {} |",
        cells(&tg_off),
        cells(&tg_on)
    );
    if !built {
        println!("\n(llama.cpp's tools run under `cargo xtask bench`, which builds them.)");
    }
    println!(
        "\nRuntime: a minimal persona (a few dozen prompt tokens), greedy, no repeat penalty; \
         prompt processing over time to first token, generation after the first token. \
         llama-bench: `-p 512 -n 0`, and `-p 0 -n 128 -d {depth}` so that it generates from as \
         much context; one repetition right before each of the runtime's. It does not sample."
    );

    print_grammar(&grammar, with_tokens, without_tokens);

    println!("\n## Where a generated token's time goes\n");
    println!("{}", Breakdown::header());
    println!(
        "{}",
        sampled_breakdown.row(
            "temperature 0.7, top-k 40, top-p, min-p, repeat penalty (peer: bare loop)",
            sampled.peer()
        )
    );
    println!(
        "{}",
        greedy_breakdown.row(
            "greedy, no repeat penalty (peer: llama-bench -fa 0)",
            tg_off.peer()
        )
    );
    println!(
        "\nMeans over the runs above, per generated token, from each reply's `ReplyStats::timing`: \
         decode is the time inside llama.cpp's decode calls; sampling the sampler chain; \
         confidence the token's probability and entropy (0 by default, where no threshold \
         reads it: `RuntimeConfig::confidence_for_every_reply`); text detokenizing, the stop filter \
         and the delta event; the rest of the step is the worker's loop (inbox, scheduling, \
         batch building). Host share: everything but decode, of the time per token."
    );
}

fn print_grammar(grammar: &Pairs, with_tokens: usize, without_tokens: usize) {
    println!("\n## The action grammar ({} pairs)\n", runs());
    println!(
        "| blacksmith, greedy, up to 64 tokens | with its actions (grammar) | without actions | ratio (range) |"
    );
    println!("|---|---|---|---|");
    println!(
        "| generation (tok/s) | {:.0} ({with_tokens} tokens) | {:.0} ({without_tokens} tokens) | {} |",
        grammar.ours(),
        grammar.peer(),
        grammar.ratio()
    );
}
