//! Many NPCs replying at once: aggregate generation tokens/s for 1, 4, 8 and 16 NPCs, each
//! with a ~1,000-token context, decoded together in one batch per step vs one NPC after
//! another, and against llama.cpp's own `llama-batched-bench -npp 1000 -ntg 64 -npl N`.
//!
//! ```text
//! cargo xtask bench        # or: NPC_AI_PEER_BIN=<llama.cpp build/bin> cargo bench -p npc_native --bench batching
//! NPC_BENCH_HOST_ONLY=1 cargo bench -p npc_native --bench batching   # the host-time table alone
//! ```
//!
//! A last table splits each step into llama.cpp's `decode` and the runtime's own work around
//! it (`ReplyTiming::steps` and `step_host`) with the default settings, against every reply's
//! confidence scored (`RuntimeConfig::confidence_for_every_reply`) on the default sampling
//! threads and on the worker thread alone, in interleaved triples.
//!
//! These shared 2-core machines drift by ±20 % over minutes, so the peer and the runtime are
//! measured in pairs, one right after the other, for every size and [`REPS`] times over; each
//! ratio is the median of its pairs. Every timed round starts from the same state: the NPCs'
//! ~1,000-token conversations are computed once, saved with [`Runtime::save_npc`] and loaded
//! back before each round, sent together with the round's lines so that every NPC's line
//! starts in the same step (the table prints how far apart their first tokens came). Without llama.cpp's tools (`NPC_AI_PEER_BIN` unset) the peer is a
//! bare `llama-cpp-2` batched loop in a child process, driven the way `llama-batched-bench`
//! drives llama.cpp.

#[path = "model.rs"]
mod model;
#[path = "peer.rs"]
mod peer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use npc_native::{Event, NpcId, Persona, Runtime, RuntimeConfig};
use peer::{Pairs, median};

const SIZES: [usize; 4] = [1, 4, 8, 16];
const GENERATE: u32 = 64;
/// Context tokens per NPC: a ~1,000-token conversation, a line and a reply fit.
const CONTEXT: u32 = 1536;
/// Measurement pairs (peer, runtime) per size.
const REPS: usize = 5;
/// Triples (default settings, every reply scored, that on one sampling thread) per size for
/// the host-time table.
const HOST_REPS: usize = 3;
/// The peer's prompt, and the context the runtime's NPCs hold when the timed line arrives.
const PEER_PROMPT: usize = 1000;
/// The sentence the NPCs' ~1,000-token history repeats.
const HISTORY: &str = "The caravan from Riverford brought news of wolves and rain. ";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model() -> PathBuf {
    model::path()
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

/// One round: the same line to each NPC at once, waiting for every reply.
struct Round {
    /// Tokens generated, all NPCs together.
    tokens: usize,
    /// From the first reply token of any NPC to the last of all.
    seconds: f64,
    /// The largest prompt (context before the reply) among the NPCs.
    context: usize,
    /// Between the first streamed text of the first NPC and that of the last: how far the
    /// NPCs' replies started apart (0 when all lines went into the same step).
    spread: f64,
    /// Per step that carried generated tokens, averaged over the NPCs: seconds inside
    /// llama.cpp's `decode`, and the runtime's own work around it (filling the batch, every
    /// NPC's sampling, confidence, text, stop filter, guard and events).
    decode_per_step: f64,
    host_per_step: f64,
    /// Per NPC and step: seconds picking the token, scoring its confidence, and turning it
    /// into text (detokenizing, stop filter, guard, the delta event).
    sampling_per_token: f64,
    confidence_per_token: f64,
    text_per_token: f64,
}

/// Sends `npcs` their saved states (`restore`, if any) and then the line, all at once: the
/// worker handles a load before it looks at its inbox again, so by the time it steps every
/// line is waiting and all of them start in the same step, as the peer's sequences do.
fn round(runtime: &Runtime, npcs: &[NpcId], restore: Option<&[PathBuf]>, line: &str) -> Round {
    if let Some(files) = restore {
        for (&npc, file) in npcs.iter().zip(files) {
            runtime.load_npc(npc, file).unwrap();
        }
    }
    let requests: Vec<_> = npcs
        .iter()
        .map(|&npc| runtime.say(npc, line).unwrap())
        .collect();
    let (mut tokens, mut first, mut last, mut context) = (0, f64::MAX, 0f64, 0);
    let mut started: Vec<std::time::Instant> = Vec::new();
    let mut seen = Vec::new();
    let mut done = 0;
    let (mut decode, mut host, mut steps) = (0.0, 0.0, 0u32);
    let (mut sampling, mut confidence, mut text) = (0.0, 0.0, 0.0);
    while done < requests.len() {
        match next(runtime) {
            Event::NpcLoaded {
                kv_tokens, kv_note, ..
            } => assert!(kv_tokens > 0, "KV state restored: {kv_note:?}"),
            Event::Delta { request, .. } if !seen.contains(&request) => {
                seen.push(request);
                started.push(std::time::Instant::now());
            }
            Event::Replied { request, stats, .. } if requests.contains(&request) => {
                let start = stats.time_to_first_token.as_secs_f64();
                first = first.min(start);
                last = last.max(start + stats.generation_time.as_secs_f64());
                tokens += stats.generated_tokens;
                context = context.max(stats.prompt_tokens);
                decode += stats.timing.decode.as_secs_f64();
                host += stats.timing.step_host.as_secs_f64();
                steps += stats.timing.steps;
                sampling += stats.timing.sampling.as_secs_f64();
                confidence += stats.timing.confidence.as_secs_f64();
                text += (stats.timing.text + stats.timing.guard).as_secs_f64();
                done += 1;
            }
            Event::Failed { error, .. } => panic!("{error}"),
            Event::NpcLoadFailed { error, .. } => panic!("{error}"),
            _ => {}
        }
    }
    let spread = match (started.iter().min(), started.iter().max()) {
        (Some(a), Some(b)) => (*b - *a).as_secs_f64(),
        _ => 0.0,
    };
    let sampled = tokens.max(1) as f64;
    let steps = f64::from(steps.max(1));
    Round {
        tokens,
        seconds: last - first,
        context,
        spread,
        decode_per_step: decode / steps,
        host_per_step: host / steps,
        sampling_per_token: sampling / sampled,
        confidence_per_token: confidence / sampled,
        text_per_token: text / sampled,
    }
}

/// [`SIZES`]'s largest number of NPCs, each holding a ~1,000-token conversation, saved to
/// files so every timed round can start from exactly that state.
struct Group {
    npcs: Vec<NpcId>,
    files: Vec<PathBuf>,
}

impl Group {
    fn prepare(runtime: &Runtime, first_id: u64, dir: &Path) -> Self {
        let npcs: Vec<NpcId> = (0..*SIZES.last().unwrap() as u64)
            .map(|k| NpcId(first_id + k))
            .collect();
        for &npc in &npcs {
            runtime.set_persona(npc, persona()).unwrap();
            assert!(matches!(next(runtime), Event::PersonaAccepted { .. }));
        }
        let history = HISTORY.repeat(history_repeats(runtime, first_id + 1000));
        round(runtime, &npcs, None, &history);
        let files: Vec<PathBuf> = npcs
            .iter()
            .map(|npc| dir.join(format!("npc-{}.state", npc.0)))
            .collect();
        for (&npc, file) in npcs.iter().zip(&files) {
            runtime.save_npc(npc, file).unwrap();
            match next(runtime) {
                Event::NpcSaved { kv_tokens, .. } => assert!(kv_tokens > 0, "KV saved"),
                other => panic!("save failed: {other:?}"),
            }
        }
        Group { npcs, files }
    }

    /// Gives `runtime` (another runtime on the same model and context) the same NPCs, to
    /// load the same saved states.
    fn adopt(&self, runtime: &Runtime) {
        for &npc in &self.npcs {
            runtime.set_persona(npc, persona()).unwrap();
            assert!(matches!(next(runtime), Event::PersonaAccepted { .. }));
        }
    }

    /// NPCs `range` and their saved states.
    fn slice(&self, range: std::ops::Range<usize>) -> (&[NpcId], &[PathBuf]) {
        (&self.npcs[range.clone()], &self.files[range])
    }
}

/// How many repetitions of [`HISTORY`] make the timed line arrive at ~[`PEER_PROMPT`] tokens
/// of context (the persona, the history line, a 64-token reply, the timed line): measured
/// with two probe lines, since it depends on the model's tokenizer. The table prints the
/// context each NPC really had.
fn history_repeats(runtime: &Runtime, probe: u64) -> usize {
    let prompt = |npc: u64, repeats: usize| {
        let npc = NpcId(npc);
        runtime.set_persona(npc, persona()).unwrap();
        let request = runtime.say(npc, HISTORY.repeat(repeats)).unwrap();
        let tokens = loop {
            match next(runtime) {
                Event::Replied {
                    request: r, stats, ..
                } if r == request => break stats.prompt_tokens,
                Event::Failed { error, .. } => panic!("{error}"),
                _ => {}
            }
        };
        runtime.forget(npc).unwrap();
        tokens
    };
    let (ten, twenty) = (prompt(probe, 10), prompt(probe + 1, 20));
    let per_repeat = (twenty - ten) as f64 / 10.0;
    let base = ten as f64 - 10.0 * per_repeat;
    // Room left for the reply and the timed line (about 25 tokens).
    let target = PEER_PROMPT as f64 - f64::from(GENERATE) - 25.0;
    ((target - base) / per_repeat).round().max(1.0) as usize
}

/// The peer's generation rate for `n` sequences: `llama-batched-bench` when built, else the
/// bare loop.
fn peer_rate(threads: u32, n: usize, flash_attention: bool) -> f64 {
    match peer::bin_dir() {
        Some(dir) => peer::llama_batched_bench(&dir, &model(), threads, flash_attention, n),
        None => bare_in_child(threads, n, flash_attention),
    }
}

/// The bare peer in a child process (llama.cpp's thread pool is per process): llama-cpp-2
/// driven directly, the way `llama-batched-bench -pps` drives llama.cpp. One context of the
/// runtime's shape; a [`PEER_PROMPT`]-token prompt computed once and copied to `n`
/// sequences; then [`GENERATE`] steps decoding one token for every sequence in one batch,
/// greedy. Prints `BARE tok/s`.
fn bare(threads: u32, n: usize, flash_attention: bool) {
    use llama_cpp_2::context::params::LlamaContextParams;
    use llama_cpp_2::llama_backend::LlamaBackend;
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::model::LlamaModel;
    use llama_cpp_2::model::params::LlamaModelParams;
    use llama_cpp_2::sampling::LlamaSampler;
    use std::num::NonZeroU32;
    use std::time::Instant;

    let backend = LlamaBackend::init().expect("backend");
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    let model =
        LlamaModel::load_from_file(&backend, model(), &LlamaModelParams::default()).expect("model");
    let threads = i32::try_from(threads).unwrap_or(1);
    let max = *SIZES.last().unwrap();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(CONTEXT * max as u32))
        .with_n_seq_max(max as u32)
        .with_kv_unified(false)
        .with_n_batch(512)
        .with_n_ubatch(512)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_flash_attention_policy(i32::from(flash_attention));
    let mut ctx = model.new_context(&backend, params).expect("context");
    let tokens = model.vocab().tokenize(
        "The caravan from Riverford brought news of wolves and rain. "
            .repeat(90)
            .as_bytes(),
        true,
        false,
    );
    let prompt = &tokens[..PEER_PROMPT];
    let mut batch = LlamaBatch::new(512, max as i32);
    for start in (0..PEER_PROMPT).step_by(512) {
        let end = (start + 512).min(PEER_PROMPT);
        batch.clear();
        for (at, &token) in prompt.iter().enumerate().take(end).skip(start) {
            batch
                .add(token, at as i32, &[0], at + 1 == PEER_PROMPT)
                .unwrap();
        }
        ctx.decode(&mut batch).unwrap();
    }
    let first = LlamaSampler::greedy().sample(&ctx, batch.n_tokens() - 1);
    for seq in 1..n {
        ctx.copy_kv_cache_seq(0, seq as i32, None, None).unwrap();
    }
    let mut samplers: Vec<LlamaSampler> = (0..n).map(|_| LlamaSampler::greedy()).collect();
    let mut next_tokens = vec![first; n];
    let started = Instant::now();
    for step in 0..GENERATE as usize {
        batch.clear();
        for (seq, &token) in next_tokens.iter().enumerate() {
            batch
                .add(token, (PEER_PROMPT + step) as i32, &[seq as i32], true)
                .unwrap();
        }
        ctx.decode(&mut batch).unwrap();
        for (seq, (sampler, token)) in samplers.iter_mut().zip(&mut next_tokens).enumerate() {
            *token = sampler.sample(&ctx, seq as i32);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("BARE {}", (n * GENERATE as usize) as f64 / seconds);
}

fn bare_in_child(threads: u32, n: usize, flash_attention: bool) -> f64 {
    let output = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args([
            "--bare",
            &threads.to_string(),
            &n.to_string(),
            if flash_attention { "1" } else { "0" },
        ])
        .output()
        .expect("run the bare loop");
    assert!(
        output.status.success(),
        "bare loop failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("BARE "))
        .expect("the bare loop prints its rate")
        .trim()
        .parse()
        .expect("a rate")
}

/// What one size measured: (runtime batched, peer) pairs, and the runtime one NPC at a time.
#[derive(Default)]
struct Row {
    batched: Pairs,
    sequential: Vec<f64>,
    context: usize,
    /// The widest first-token spread of its batched rounds, seconds.
    spread: f64,
}

/// Measures every size [`REPS`] times, each runtime round right after its peer's.
fn measure(runtime: &Runtime, group: &Group, threads: u32, fa: bool, sequential: bool) -> Vec<Row> {
    // Long enough that every reply runs to its 64 tokens, as the peer's sequences do.
    let line = "Say every number from 1 to 300, separated by commas, and nothing else.";
    let mut rows: Vec<Row> = SIZES.iter().map(|_| Row::default()).collect();
    for _ in 0..REPS {
        for (&n, row) in SIZES.iter().zip(&mut rows) {
            let peer = peer_rate(threads, n, fa);
            let (npcs, files) = group.slice(0..n);
            let batched = round(runtime, npcs, Some(files), line);
            let rate = batched.tokens as f64 / batched.seconds;
            row.context = row.context.max(batched.context);
            row.spread = row.spread.max(batched.spread);
            row.batched.push(rate, peer);
            if sequential {
                let (mut tokens, mut seconds) = (0, 0.0);
                for k in 0..n {
                    let (npc, file) = group.slice(k..k + 1);
                    let alone = round(runtime, npc, Some(file), line);
                    tokens += alone.tokens;
                    seconds += alone.seconds;
                }
                row.sequential.push(tokens as f64 / seconds);
            }
        }
    }
    rows
}

/// Batched rounds on `plain` (the default settings: no reply scored), `scored` (every
/// reply's confidence scored, the default sampling threads) and `alone` (every reply scored,
/// sampling on the worker thread), in interleaved triples: per size, the median decode and
/// host time per step of each, and the ratios of their host times (medians of the triples).
fn host_table(plain: &Runtime, scored: &Runtime, alone: &Runtime, group: &Group, threads: u32) {
    let line = "Say every number from 1 to 300, separated by commas, and nothing else.";
    let mut rows: Vec<Vec<[Round; 3]>> = SIZES.iter().map(|_| Vec::new()).collect();
    for _ in 0..HOST_REPS {
        for (&n, row) in SIZES.iter().zip(&mut rows) {
            let (npcs, files) = group.slice(0..n);
            row.push([plain, scored, alone].map(|runtime| round(runtime, npcs, Some(files), line)));
        }
    }
    let sampling = RuntimeConfig::new(model()).effective_sampling_threads();
    println!(
        "\nHost work per step (outside llama.cpp's decode), {threads} decode threads: the \
         default settings, against every reply's confidence scored ({sampling} sampling \
         threads), and that on the worker alone; medians of {HOST_REPS} interleaved triples:\n"
    );
    println!(
        "| NPCs | decode per step (ms) | host per step (µs) | host share of the step | per NPC: sampling / text (µs) | every reply scored: host (µs) | ratio (range) | per NPC: confidence (µs) | scored, sampling on the worker alone: host (µs) | ratio (range) |"
    );
    println!("|---|---:|---:|---:|---|---:|---|---:|---:|---|");
    for (&n, row) in SIZES.iter().zip(&rows) {
        let of = |runtime: usize, value: fn(&Round) -> f64| {
            median(row.iter().map(|r| value(&r[runtime])).collect())
        };
        let (decode, host) = (of(0, |r| r.decode_per_step), of(0, |r| r.host_per_step));
        // The median and range of `runtime`'s host time over `base`'s, triple by triple.
        let ratio = |runtime: usize, base: usize| {
            let ratios: Vec<f64> = row
                .iter()
                .map(|r| r[runtime].host_per_step / r[base].host_per_step)
                .collect();
            let (low, high) = ratios
                .iter()
                .fold((f64::MAX, 0f64), |(l, h), &r| (l.min(r), h.max(r)));
            format!("{:.2} ({low:.2}–{high:.2})", median(ratios.clone()))
        };
        println!(
            "| {n} | {:.1} | {:.0} | {:.2} % | {:.0} / {:.0} | {:.0} | {} | {:.0} | {:.0} | {} |",
            decode * 1e3,
            host * 1e6,
            100.0 * host / (host + decode),
            of(0, |r| r.sampling_per_token) * 1e6,
            of(0, |r| r.text_per_token) * 1e6,
            of(1, |r| r.host_per_step) * 1e6,
            ratio(1, 0),
            of(1, |r| r.confidence_per_token) * 1e6,
            of(2, |r| r.host_per_step) * 1e6,
            ratio(2, 1),
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--bare") {
        return bare(
            args[at + 1].parse().unwrap(),
            args[at + 2].parse().unwrap(),
            args[at + 3] == "1",
        );
    }
    assert!(model().is_file(), "run `cargo xtask setup` first");
    // No prewarm: every round starts from loaded states, and the setup reads its events in
    // order.
    let config = RuntimeConfig::new(model())
        .with_prewarm(false)
        .with_slots(*SIZES.last().unwrap() as u32)
        .with_context_size(CONTEXT)
        .with_max_line_chars(20_000);
    let threads = config.effective_threads();
    let peer_name = if peer::bin_dir().is_some() {
        "llama-batched-bench S_TG"
    } else {
        "bare llama-cpp-2 batched loop"
    };
    let dir = std::env::temp_dir().join(format!("npc-batching-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");

    let runtime = Runtime::start(config.clone());
    assert!(matches!(next(&runtime), Event::ModelLoaded(_)));
    let group = Group::prepare(&runtime, 1, &dir);
    let host_only = std::env::var_os("NPC_BENCH_HOST_ONLY").is_some();
    let rows = if host_only {
        Vec::new()
    } else {
        measure(&runtime, &group, threads, false, true)
    };
    {
        let scored = config.clone().with_confidence_for_every_reply(true);
        let alone = Runtime::start(scored.clone().with_sampling_threads(1));
        let scored = Runtime::start(scored);
        for other in [&scored, &alone] {
            assert!(matches!(next(other), Event::ModelLoaded(_)));
            group.adopt(other);
        }
        host_table(&runtime, &scored, &alone, &group, threads);
    }
    drop(runtime);
    if host_only {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }

    println!(
        "{}, {threads} threads, {GENERATE} greedy tokens per reply; medians of {REPS} \
         pairs, each runtime round measured right after its peer's\n",
        model::name()
    );
    println!(
        "| NPCs | context per NPC | first-token spread (ms) | batched: tok/s total | per NPC | one after another: tok/s total | batched / one after another | {peer_name} -fa 0 (peer: {PEER_PROMPT} tokens) | runtime / peer (range) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (&n, row) in SIZES.iter().zip(&rows) {
        let (batched, sequential) = (row.batched.ours(), median(row.sequential.clone()));
        println!(
            "| {n} | {} | {:.0} | {batched:.0} | {:.1} | {sequential:.0} | {:.2}× | {:.1} | {} |",
            row.context,
            row.spread * 1e3,
            batched / n as f64,
            batched / sequential,
            row.batched.peer(),
            row.batched.ratio()
        );
    }

    // Reproducible batching off: flash attention on, as llama.cpp chooses for this build.
    // Saved states carry the context's shape, so this runtime prepares its own.
    let runtime = Runtime::start(config.with_reproducible_batching(false));
    assert!(matches!(next(&runtime), Event::ModelLoaded(_)));
    let group = Group::prepare(&runtime, 100, &dir);
    let rows = measure(&runtime, &group, threads, true, false);
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
    println!("\nReproducible batching off (flash attention on):\n");
    println!(
        "| NPCs | context per NPC | first-token spread (ms) | batched: tok/s total | per NPC | {peer_name} -fa 1 | runtime / peer (range) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (&n, row) in SIZES.iter().zip(&rows) {
        let batched = row.batched.ours();
        println!(
            "| {n} | {} | {:.0} | {batched:.0} | {:.1} | {:.1} | {} |",
            row.context,
            row.spread * 1e3,
            batched / n as f64,
            row.batched.peer(),
            row.batched.ratio()
        );
    }
}
