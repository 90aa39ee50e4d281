//! NPCs served remotely (a real `llama-server` with `--parallel N`, [`RemoteConfig`]) against
//! the same NPCs in-process, same model, same prompts, same greedy sampling: for 1, 4, 8 and
//! 16 NPCs talking at once, generated tokens per second and time to first token (ratio
//! remote / in-process per row, in interleaved pairs), and the server's prefix-cache share of
//! the prompt tokens from each NPC's second turn on (its own `timings.cache_n`), in all and
//! turn by turn.
//!
//! ```text
//! cargo xtask bench -- --bench serving    # builds llama-server; or, with it built:
//! NPC_AI_LLAMA_SERVER=<path> cargo bench -p npc_native --features cloud --bench serving
//! ```
//! `NPC_BENCH_MODEL=<catalog id>` picks the model (default: the catalog's default model);
//! `NPC_BENCH_NPCS=1,4` the rows. On one machine the server and the game share the cores, so
//! this measures what the remote path costs (HTTP, JSON, a thread per line, the server's own
//! scheduling) rather than what a serving cluster gains; `docs/serving.md` sizes that.

#[path = "model.rs"]
mod model;
#[path = "peer.rs"]
mod peer;
#[path = "../tests/common/servers.rs"]
mod servers;

use std::time::{Duration, Instant};

use npc_native::{
    CloudConfig, Event, NpcId, Persona, RemoteConfig, ReplySource, Runtime, RuntimeConfig,
};
use peer::Pairs;
use servers::LlamaServer;

const PAIRS: usize = 2;
/// Context per NPC, in-process and per server slot.
const CONTEXT: usize = 1024;
const MAX_TOKENS: u32 = 32;
const LINES: [&str; 5] = [
    "Hello there. Who are you?",
    "What do you do here all day?",
    "Tell me something about the village.",
    "Is there anything you need help with?",
    "Thank you. Farewell for now.",
];

fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

fn personas() -> Vec<Persona> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/personas");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the shipped personas")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".persona.ron"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let source = std::fs::read_to_string(path).expect("readable persona");
            let mut persona = Persona::from_ron(&source, None).expect("shipped persona parses");
            persona.sampling.temperature = Some(0.0);
            persona.sampling.max_tokens = Some(MAX_TOKENS);
            persona
        })
        // One on a LoRA adapter (the RPG's ferrywoman) would stay local: the server has none.
        .filter(|persona| persona.adapter.is_none())
        .collect()
}

/// What one run measured.
#[derive(Default)]
struct Run {
    generated: usize,
    wall: Duration,
    first_token: Vec<f64>,
    /// Prompt and cached tokens of every NPC's reply, per turn.
    turns: [(usize, usize); LINES.len()],
    /// Every reply's prompt tokens, and the replies.
    prompt: usize,
    replies: usize,
    sources_ok: bool,
}

impl Run {
    fn tokens_per_second(&self) -> f64 {
        self.generated as f64 / self.wall.as_secs_f64()
    }

    fn first_token_ms(&self) -> f64 {
        1000.0 * peer::median(self.first_token.clone())
    }
}

/// `npcs` NPCs each say [`LINES`] in turn, all at once per turn; `remote`: served by it.
fn talk(npcs: usize, remote: Option<&LlamaServer>) -> Run {
    let mut config = RuntimeConfig::new(model::path())
        .with_slots(u32::try_from(npcs).unwrap_or(1))
        .with_context_size(u32::try_from(CONTEXT).unwrap_or(1024))
        .with_assets_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets"))
        .with_prewarm(false);
    if let Some(server) = remote {
        let mut endpoint = CloudConfig::new(server.base_url(), "default");
        endpoint.read_timeout = Duration::from_secs(300);
        endpoint.total_timeout = Duration::from_secs(600);
        config = config.with_remote(RemoteConfig::for_server(endpoint).with_local_fallback(false));
    }
    let runtime = Runtime::start(config);
    loop {
        match runtime.events().recv() {
            Ok(Event::ModelLoaded(_)) => break,
            Ok(Event::ModelFailed(error)) => panic!("{error}"),
            Ok(_) => {}
            Err(_) => panic!("the worker stopped"),
        }
    }
    let personas = personas();
    for npc in 0..npcs {
        runtime
            .set_persona(NpcId(npc as u64), personas[npc % personas.len()].clone())
            .expect("worker");
    }
    // The other backend's replies must not appear (don't-know lines, source Fallback, may).
    let other = if remote.is_some() {
        ReplySource::Local
    } else {
        ReplySource::Remote
    };
    let mut run = Run {
        sources_ok: true,
        ..Run::default()
    };
    for (turn, line) in LINES.iter().enumerate() {
        let started = Instant::now();
        for npc in 0..npcs {
            runtime.say(NpcId(npc as u64), *line).expect("worker");
        }
        let mut replied = 0;
        while replied < npcs {
            match runtime.events().recv_timeout(Duration::from_secs(600)) {
                Ok(Event::Replied { stats, .. }) => {
                    replied += 1;
                    run.replies += 1;
                    run.prompt += stats.prompt_tokens;
                    run.generated += stats.generated_tokens;
                    run.first_token
                        .push(stats.time_to_first_token.as_secs_f64());
                    run.sources_ok &= stats.source != other;
                    run.turns[turn].0 += stats.prompt_tokens;
                    run.turns[turn].1 += stats.cached_tokens;
                }
                Ok(Event::Failed { error, .. }) => panic!("a line failed: {error}"),
                Ok(Event::PersonaRejected { error, .. }) => panic!("{error}"),
                Ok(_) => {}
                Err(err) => panic!("no reply: {err}"),
            }
        }
        run.wall += started.elapsed();
    }
    run
}

/// The cached share of the prompt tokens from the second turn on, then turn by turn:
/// `86.0 % (84.1 / 87.9)`.
fn shares(turns: &[(usize, usize)]) -> String {
    let share = |prompt: usize, cached: usize| 100.0 * cached as f64 / prompt.max(1) as f64;
    let later = &turns[1..];
    let (prompt, cached) = later
        .iter()
        .fold((0, 0), |(p, c), turn| (p + turn.0, c + turn.1));
    let each: Vec<String> = later
        .iter()
        .map(|&(p, c)| format!("{:.1}", share(p, c)))
        .collect();
    format!("{:.1} % ({})", share(prompt, cached), each.join(" / "))
}

fn main() {
    let rows: Vec<usize> = std::env::var("NPC_BENCH_NPCS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 8, 16]);
    println!(
        "Remote (llama-server --parallel N, {} threads) vs in-process, {}; {} turns of \
         {MAX_TOKENS} greedy tokens per NPC, {PAIRS} interleaved pairs per row",
        threads(),
        model::name(),
        LINES.len()
    );
    println!(
        "| NPCs | in-process tok/s | remote tok/s | ratio | in-process first token (ms) | \
         remote first token (ms) | ratio | server cache share, turn ≥ 2 (turn 2 / 3 / …) | \
         in-process KV reuse, turn ≥ 2 (turn 2 / 3 / …) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut sizes = Vec::new();
    for &npcs in &rows {
        let mut speed = Pairs::default();
        let mut first = Pairs::default();
        // Prompt and cached tokens per turn, over the pairs: remote, in-process.
        let mut turns = [[(0, 0); LINES.len()]; 2];
        let (mut all_prompt, mut generated, mut replies) = (0, 0, 0);
        for _ in 0..PAIRS {
            let local = talk(npcs, None);
            let server =
                LlamaServer::start_serving(&model::path(), None, threads(), npcs, npcs * CONTEXT);
            let remote = talk(npcs, Some(&server));
            drop(server);
            assert!(
                local.sources_ok && remote.sources_ok,
                "a reply came from elsewhere"
            );
            speed.push(remote.tokens_per_second(), local.tokens_per_second());
            first.push(remote.first_token_ms(), local.first_token_ms());
            for (sums, run) in turns.iter_mut().zip([&remote, &local]) {
                for (sum, turn) in sums.iter_mut().zip(&run.turns) {
                    *sum = (sum.0 + turn.0, sum.1 + turn.1);
                }
            }
            all_prompt += remote.prompt;
            generated += remote.generated;
            replies += remote.replies;
        }
        sizes.push((
            npcs,
            all_prompt / replies.max(1),
            generated / replies.max(1),
        ));
        println!(
            "| {npcs} | {:.1} | {:.1} | {} | {:.0} | {:.0} | {} | {} | {} |",
            speed.peer(),
            speed.ours(),
            speed.ratio(),
            first.peer(),
            first.ours(),
            first.ratio(),
            shares(&turns[0]),
            shares(&turns[1]),
        );
    }
    for (npcs, prompt, generated) in sizes {
        println!(
            "{npcs} NPCs: {prompt} prompt tokens and {generated} generated per remote reply \
             (means; for sizing, docs/serving.md)"
        );
    }
}
