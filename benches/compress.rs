//! The token-level lore compressor (`compress_lore`, the LLMLingua idea) on the shipped lore
//! (`assets/lore/oakvale.lore.ron`): how many tokens it keeps, and what it costs when a persona
//! is set, cold (the model scores every lore token) and warm (the result comes from the disk
//! cache), next to setting the same persona without compression. All rows run in one process
//! on one model, side by side.
//!
//! Run: `cargo bench -p npc_native --bench compress`.

#[path = "model.rs"]
mod model;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use npc_native::{Event, NpcId, Persona, Runtime, RuntimeConfig};

const LORE: &str = "lore/oakvale.lore.ron";
/// Warm and uncompressed loads are repeated and the median reported.
const REPEATS: usize = 5;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn next(runtime: &Runtime) -> Event {
    runtime
        .events()
        .recv_timeout(Duration::from_secs(3600))
        .expect("worker answers")
}

fn blacksmith(keep: Option<f32>) -> Persona {
    let source = std::fs::read_to_string(root().join("assets/personas/blacksmith.persona.ron"))
        .expect("persona");
    let mut persona = Persona::from_ron(&source, None).expect("persona parses");
    persona.lore = Some(LORE.into());
    persona.compress_lore = keep;
    persona
}

/// Time from sending the persona to its acceptance.
fn set(runtime: &Runtime, persona: Persona) -> Duration {
    let started = Instant::now();
    runtime
        .set_persona(NpcId(1), persona)
        .expect("worker running");
    match next(runtime) {
        Event::PersonaAccepted { .. } => started.elapsed(),
        other => panic!("persona refused: {other:?}"),
    }
}

/// Lore tokens before and after, and whether they came from the cache.
fn compression(runtime: &Runtime) -> (usize, usize, bool) {
    runtime.inspect(NpcId(1)).expect("worker running");
    match next(runtime) {
        Event::Mind {
            lore_compression, ..
        } => lore_compression.expect("the lore was compressed"),
        other => panic!("unexpected {other:?}"),
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

fn main() {
    let model = model::path();
    let cache = std::env::temp_dir().join(format!("npc-compress-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let load_before = load_average();
    let runtime = Runtime::start(
        RuntimeConfig::new(&model)
            .with_assets_dir(root().join("assets"))
            .with_cache_dir(&cache)
            .with_prewarm(false),
    );
    let info = match next(&runtime) {
        Event::ModelLoaded(info) => info,
        other => panic!("model did not load: {other:?}"),
    };

    let plain = median(
        (0..REPEATS)
            .map(|_| set(&runtime, blacksmith(None)))
            .collect(),
    );
    let mut rows = Vec::new();
    for keep in [0.5_f32, 0.3] {
        let cold = set(&runtime, blacksmith(Some(keep)));
        let (before, after, cached) = compression(&runtime);
        assert!(!cached, "a fresh cache directory");
        let warm = median(
            (0..REPEATS)
                .map(|_| set(&runtime, blacksmith(Some(keep))))
                .collect(),
        );
        assert_eq!(compression(&runtime), (before, after, true));
        rows.push((keep, before, after, cold, warm));
    }
    drop(runtime);
    let _ = std::fs::remove_dir_all(&cache);

    println!(
        "token-level lore compression: {LORE}, {}, {} threads; load average {load_before} before, {} after\n",
        model::name(),
        info.threads,
        load_average()
    );
    println!(
        "| keep | lore tokens before | after | after / before | set persona: cold (scores every token) | warm (disk cache) | uncompressed | cold / uncompressed | warm / uncompressed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (keep, before, after, cold, warm) in rows {
        println!(
            "| {keep} | {before} | {after} | {:.3} | {} | {} | {} | {:.0}x | {:.2}x |",
            after as f64 / before as f64,
            ms(cold),
            ms(warm),
            ms(plain),
            cold.as_secs_f64() / plain.as_secs_f64(),
            warm.as_secs_f64() / plain.as_secs_f64(),
        );
    }
    println!(
        "\ncold: once per lore version and model (a fresh cache directory); warm and uncompressed: median of {REPEATS}."
    );
}
