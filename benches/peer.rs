//! llama.cpp's own benchmark tools, run as child processes of a bench so their numbers come
//! from the same run as the runtime's. `cargo xtask bench` builds them (cached) and passes
//! their directory in `NPC_AI_PEER_BIN`; a bench run without them prints "not built".
// Each bench uses the tool it compares against.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory holding `llama-bench` and `llama-batched-bench`, if they were built.
pub fn bin_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("NPC_AI_PEER_BIN").map(PathBuf::from)?;
    dir.join("llama-bench").is_file().then_some(dir)
}

fn output(command: &mut Command) -> String {
    let out = command.output().expect("run a llama.cpp tool");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        command.get_program(),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `llama-bench -p 512 -n 0` and `llama-bench -p 0 -n 128 -d <depth>` with `-fa 0|1`, one
/// repetition each (callers pair it with one of their own; see [`Pairs`]): (prompt
/// processing tok/s from an empty context, generation tok/s after `depth` tokens of
/// context). The depth lets generation start from as much context as the runtime's does:
/// attention over it is part of each token's cost.
pub fn llama_bench(
    dir: &Path,
    model: &Path,
    threads: u32,
    flash_attention: bool,
    depth: usize,
) -> (f64, f64) {
    let run = |args: &[&str]| {
        let text = output(
            Command::new(dir.join("llama-bench"))
                .arg("-m")
                .arg(model)
                .args(args)
                .args(["-r", "1", "-o", "csv", "-fa"])
                .arg(if flash_attention { "1" } else { "0" })
                .arg("-t")
                .arg(threads.to_string()),
        );
        let mut lines = text
            .lines()
            .filter(|l| l.starts_with('"') || l.contains("avg_ts"));
        let header: Vec<String> = lines
            .next()
            .expect("csv header")
            .split(',')
            .map(|f| f.trim_matches('"').to_owned())
            .collect();
        let rate = header
            .iter()
            .position(|h| h == "avg_ts")
            .expect("avg_ts column");
        let row = lines.next().expect("one result row");
        let fields: Vec<&str> = row.split(',').map(|f| f.trim_matches('"')).collect();
        fields[rate].parse::<f64>().expect("avg_ts")
    };
    let depth = depth.to_string();
    (
        run(&["-p", "512", "-n", "0"]),
        run(&["-p", "0", "-n", "128", "-d", &depth]),
    )
}

/// `llama-batched-bench -npp 1000 -ntg 64 -npl <sequences> -pps -fa 0|1`: its generation
/// rate S_TG (tok/s, all sequences together). `-pps` computes the 1,000-token prompt once and
/// copies it to every sequence, which leaves each sequence's generation (attention over its own
/// 1,000 tokens) as it would be with distinct prompts and saves minutes of prompt processing.
pub fn llama_batched_bench(
    dir: &Path,
    model: &Path,
    threads: u32,
    flash_attention: bool,
    sequences: usize,
) -> f64 {
    let text = output(
        Command::new(dir.join("llama-batched-bench"))
            .arg("-m")
            .arg(model)
            .args([
                "-c", "17408", "-b", "2048", "-npp", "1000", "-ntg", "64", "-pps",
            ])
            .arg("-npl")
            .arg(sequences.to_string())
            .arg("-fa")
            .arg(if flash_attention { "1" } else { "0" })
            .arg("-t")
            .arg(threads.to_string()),
    );
    // | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    text.lines()
        .find_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let rows: usize = cells.get(3)?.parse().ok()?;
            let rate = cells.get(8)?.parse().ok()?;
            (rows == sequences).then_some(rate)
        })
        .expect("llama-batched-bench printed its row")
}

/// The median of `values` (the upper one of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Measurements taken in pairs, the runtime's right after its peer's, so that the ratio of
/// each pair is free of the drift these shared machines show over minutes (up to ±20 %).
#[derive(Default)]
pub struct Pairs {
    ours: Vec<f64>,
    peer: Vec<f64>,
}

impl Pairs {
    /// Records one pair.
    pub fn push(&mut self, ours: f64, peer: f64) {
        self.ours.push(ours);
        self.peer.push(peer);
    }

    /// The runtime's median.
    pub fn ours(&self) -> f64 {
        median(self.ours.clone())
    }

    /// The peer's median.
    pub fn peer(&self) -> f64 {
        median(self.peer.clone())
    }

    /// The median of the pairs' ratios, with their range: `0.97 (0.93–1.01)`.
    pub fn ratio(&self) -> String {
        let ratios: Vec<f64> = self
            .ours
            .iter()
            .zip(&self.peer)
            .map(|(o, p)| o / p)
            .collect();
        let (low, high) = ratios
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        format!("{:.2} ({low:.2}–{high:.2})", median(ratios))
    }
}

/// Where the runtime's generated tokens spent their time, summed over several replies (from
/// [`npc_native::ReplyTiming`]): the table row says, per generated token, how long llama.cpp's
/// decode took and how long each part of the runtime's own work.
#[derive(Default)]
pub struct Breakdown {
    tokens: usize,
    intervals: usize,
    generation: std::time::Duration,
    decode: std::time::Duration,
    sampling: std::time::Duration,
    confidence: std::time::Duration,
    text: std::time::Duration,
}

impl Breakdown {
    /// Adds one reply.
    pub fn add(&mut self, stats: &npc_native::ReplyStats) {
        self.tokens += stats.generated_tokens;
        self.intervals += stats.generated_tokens.saturating_sub(1);
        self.generation += stats.generation_time;
        self.decode += stats.timing.decode;
        self.sampling += stats.timing.sampling;
        self.confidence += stats.timing.confidence;
        self.text += stats.timing.text;
    }

    /// The header of [`Breakdown::row`]'s table.
    pub fn header() -> &'static str {
        "| reply | per token (µs) | decode (llama.cpp) | sampling | confidence | text and events | rest of the step | host share | peer per token (µs) |\n|---|---|---|---|---|---|---|---|---|"
    }

    /// One row: `what`, then per-token microseconds; `peer_tok_s` is the peer's speed.
    ///
    /// A reply of n tokens has n − 1 intervals between its first and last token, each one
    /// decode (of the token before) and one pick (sampling, confidence, text) of the next:
    /// the decode time is over n − 1 decodes, the picks over n tokens.
    pub fn row(&self, what: &str, peer_tok_s: f64) -> String {
        let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / self.tokens.max(1) as f64;
        let intervals = self.intervals.max(1) as f64;
        let decode = self.decode.as_secs_f64() * 1e6 / intervals;
        let total = self.generation.as_secs_f64() * 1e6 / intervals;
        let parts = decode + per(self.sampling) + per(self.confidence) + per(self.text);
        let host = total - decode;
        let peer = if peer_tok_s > 0.0 {
            format!("{:.0}", 1e6 / peer_tok_s)
        } else {
            "not run".into()
        };
        format!(
            "| {what} | {total:.0} | {decode:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} % | {peer} |",
            per(self.sampling),
            per(self.confidence),
            per(self.text),
            (total - parts).max(0.0),
            100.0 * host / total.max(f64::MIN_POSITIVE),
        )
    }
}
