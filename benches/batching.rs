//! Many NPCs replying at once: aggregate generation tokens/s for 1, 4, 8 and 16 NPCs, each
//! with a ~1,000-token context, decoded together in one batch per step vs one NPC after
//! another, on the same runtime in one run.
//!
//! ```text
//! cargo xtask bench        # or: cargo bench -p npc_native --bench batching
//! ```
//! Beside it, in the same run: a bare llama-cpp-2 batched loop (a child process) and, under
//! `cargo xtask bench`, llama.cpp's own `llama-batched-bench -npp 1000 -ntg 64 -npl 1,4,8,16`.

#[path = "peer.rs"]
mod peer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use npc_native::{Event, NpcId, Persona, Runtime, RuntimeConfig};

const SIZES: [usize; 4] = [1, 4, 8, 16];
const GENERATE: u32 = 64;
/// Context tokens per NPC: a ~1,000-token conversation, a line and a reply fit.
const CONTEXT: u32 = 1536;

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

/// A fresh NPC (never seen before) with a ~1,000-token conversation already in its KV cache.
fn fresh_npcs(runtime: &Runtime, next_id: &mut u64, n: usize) -> Vec<NpcId> {
    let npcs: Vec<NpcId> = (0..n)
        .map(|_| {
            *next_id += 1;
            NpcId(*next_id)
        })
        .collect();
    for &npc in &npcs {
        runtime.set_persona(npc, persona()).unwrap();
        assert!(matches!(next(runtime), Event::PersonaAccepted { .. }));
    }
    // Not timed: prefilled together, replied to, so the timed turn starts from ~1,000 tokens.
    let history = "The caravan from Riverford brought news of wolves and rain. ".repeat(65);
    round(runtime, &npcs, &history);
    npcs
}

/// The peer in a child process: llama-cpp-2 driven directly, the way llama.cpp's
/// `llama-batched-bench` drives llama.cpp: `n` sequences of `PROMPT` prompt tokens in one
/// context of the same shape as the runtime's, then [`GENERATE`] steps decoding one token
/// for every sequence in one batch, greedy. Prints `BARE n tok/s`.
fn bare(threads: u32, max: usize) {
    use llama_cpp_2::context::params::LlamaContextParams;
    use llama_cpp_2::llama_backend::LlamaBackend;
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::model::LlamaModel;
    use llama_cpp_2::model::params::LlamaModelParams;
    use llama_cpp_2::sampling::LlamaSampler;
    use std::num::NonZeroU32;
    use std::time::Instant;

    const PROMPT: usize = 1000;
    let backend = LlamaBackend::init().expect("backend");
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    let model = LlamaModel::load_from_file(
        &backend,
        root().join(npc_native::DEFAULT_MODEL_PATH),
        &LlamaModelParams::default(),
    )
    .expect("model");
    let threads = i32::try_from(threads).unwrap_or(1);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(CONTEXT * max as u32))
        .with_n_seq_max(max as u32)
        .with_kv_unified(false)
        .with_n_batch(512)
        .with_n_ubatch(512)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        // As the runtime's default (reproducible batching) has it.
        .with_flash_attention_policy(0);
    let mut ctx = model.new_context(&backend, params).expect("context");
    let tokens = model.vocab().tokenize(
        "The caravan from Riverford brought news of wolves and rain. "
            .repeat(80)
            .as_bytes(),
        true,
        false,
    );
    let prompt = &tokens[..PROMPT];
    let mut batch = LlamaBatch::new(512, max as i32);
    for &n in &SIZES {
        ctx.clear_kv_cache();
        let mut samplers: Vec<LlamaSampler> = (0..n).map(|_| LlamaSampler::greedy()).collect();
        let mut next_tokens = Vec::with_capacity(n);
        for (seq, sampler) in samplers.iter_mut().enumerate() {
            for start in (0..PROMPT).step_by(512) {
                let end = (start + 512).min(PROMPT);
                batch.clear();
                for (at, &token) in prompt.iter().enumerate().take(end).skip(start) {
                    batch
                        .add(token, at as i32, &[seq as i32], at + 1 == PROMPT)
                        .unwrap();
                }
                ctx.decode(&mut batch).unwrap();
            }
            next_tokens.push(sampler.sample(&ctx, batch.n_tokens() - 1));
        }
        let started = Instant::now();
        for step in 0..GENERATE as usize {
            batch.clear();
            for (seq, &token) in next_tokens.iter().enumerate() {
                batch
                    .add(token, (PROMPT + step) as i32, &[seq as i32], true)
                    .unwrap();
            }
            ctx.decode(&mut batch).unwrap();
            for (seq, (sampler, token)) in samplers.iter_mut().zip(&mut next_tokens).enumerate() {
                *token = sampler.sample(&ctx, seq as i32);
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        println!("BARE {n} {}", (n * GENERATE as usize) as f64 / seconds);
    }
}

fn bare_in_child(threads: u32, max: usize) -> Vec<f64> {
    let output = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args(["--bare", &threads.to_string(), &max.to_string()])
        .output()
        .expect("run the bare loop");
    assert!(
        output.status.success(),
        "bare loop failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.strip_prefix("BARE "))
        .map(|rest| rest.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--bare") {
        return bare(args[at + 1].parse().unwrap(), args[at + 2].parse().unwrap());
    }
    let model = root().join(npc_native::DEFAULT_MODEL_PATH);
    assert!(model.is_file(), "run `cargo xtask setup` first");
    let max = *SIZES.last().unwrap();
    let config = RuntimeConfig::new(model)
        .with_slots(max as u32)
        .with_context_size(CONTEXT)
        .with_max_line_chars(20_000);
    let threads = config.effective_threads();
    // The peers first, in their own processes (llama.cpp's thread pool is per process).
    let bare = bare_in_child(threads, max);
    let peer_rows = |flash_attention: bool| {
        peer::bin_dir()
            .map(|dir| {
                peer::llama_batched_bench(
                    &dir,
                    &root().join(npc_native::DEFAULT_MODEL_PATH),
                    threads,
                    flash_attention,
                )
            })
            .unwrap_or_default()
    };
    let (peer_off, peer_on) = (peer_rows(false), peer_rows(true));
    let runtime = Runtime::start(config.clone());
    assert!(matches!(next(&runtime), Event::ModelLoaded(_)));

    println!(
        "Default model, {threads} threads, {GENERATE} tokens per reply, ~1,000 tokens of context per NPC\n"
    );
    println!(
        "| NPCs | batched: tok/s total | per NPC | one after another: tok/s total | batched / sequential | bare llama-cpp-2 batched loop | runtime / bare | llama-batched-bench -fa 0 S_TG | runtime / llama-batched-bench |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let line = "Count from one to one hundred: 1, 2, 3, 4, 5, ...";
    let mut next_id = 0;
    let peer_cell = |rows: &[(usize, f64)], n: usize, ours: f64| {
        rows.iter()
            .find(|&&(sequences, _)| sequences == n)
            .map_or("not built | |".to_owned(), |&(_, rate)| {
                format!("{rate:.1} | {:.2}", ours / rate)
            })
    };
    for (&n, bare) in SIZES.iter().zip(bare) {
        // Fresh NPCs for each measurement, so every timed turn starts from the same context.
        let group = fresh_npcs(&runtime, &mut next_id, n);
        let (tokens, seconds) = round(&runtime, &group, line);
        let batched = tokens as f64 / seconds;
        let (mut seq_tokens, mut seq_seconds) = (0, 0.0);
        for _ in 0..n {
            let npc = fresh_npcs(&runtime, &mut next_id, 1);
            let (t, s) = round(&runtime, &npc, line);
            seq_tokens += t;
            seq_seconds += s;
        }
        let sequential = seq_tokens as f64 / seq_seconds;
        println!(
            "| {n} | {batched:.0} | {:.1} | {sequential:.0} | {:.2}× | {bare:.0} | {:.2} | {} |",
            batched / n as f64,
            batched / sequential,
            batched / bare,
            peer_cell(&peer_off, n, batched)
        );
    }
    drop(runtime);

    // Reproducible batching off: flash attention on, as llama.cpp chooses for this build.
    let runtime = Runtime::start(config.with_reproducible_batching(false));
    assert!(matches!(next(&runtime), Event::ModelLoaded(_)));
    println!("\nReproducible batching off (flash attention on):\n");
    println!(
        "| NPCs | batched: tok/s total | per NPC | llama-batched-bench -fa 1 S_TG | runtime / llama-batched-bench |"
    );
    println!("|---|---|---|---|---|");
    for &n in &SIZES {
        let group = fresh_npcs(&runtime, &mut next_id, n);
        let (tokens, seconds) = round(&runtime, &group, line);
        let batched = tokens as f64 / seconds;
        println!(
            "| {n} | {batched:.0} | {:.1} | {} |",
            batched / n as f64,
            peer_cell(&peer_on, n, batched)
        );
    }
}
