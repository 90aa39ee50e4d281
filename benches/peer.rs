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

/// `llama-bench -p 512 -n 128 -fa 0|1`: (prompt processing tok/s, generation tok/s).
pub fn llama_bench(dir: &Path, model: &Path, threads: u32, flash_attention: bool) -> (f64, f64) {
    let text = output(
        Command::new(dir.join("llama-bench"))
            .arg("-m")
            .arg(model)
            .args(["-p", "512", "-n", "128", "-o", "csv", "-fa"])
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
    let column = |name: &str| header.iter().position(|h| h == name).expect(name);
    let (prompt, generated, rate) = (column("n_prompt"), column("n_gen"), column("avg_ts"));
    let (mut pp, mut tg) = (0.0, 0.0);
    for line in lines {
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        let value: f64 = fields[rate].parse().expect("avg_ts");
        if fields[prompt] == "512" {
            pp = value;
        } else if fields[generated] == "128" {
            tg = value;
        }
    }
    (pp, tg)
}

/// `llama-batched-bench -npp 1000 -ntg 64 -npl 1,4,8,16 -fa 0|1`: (sequences, S_TG tok/s)
/// per row.
pub fn llama_batched_bench(
    dir: &Path,
    model: &Path,
    threads: u32,
    flash_attention: bool,
) -> Vec<(usize, f64)> {
    let text = output(
        Command::new(dir.join("llama-batched-bench"))
            .arg("-m")
            .arg(model)
            .args([
                "-c", "17408", "-b", "2048", "-npp", "1000", "-ntg", "64", "-npl", "1,4,8,16",
                "-fa",
            ])
            .arg(if flash_attention { "1" } else { "0" })
            .arg("-t")
            .arg(threads.to_string()),
    );
    // | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    text.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let sequences = cells.get(3)?.parse().ok()?;
            let rate = cells.get(8)?.parse().ok()?;
            Some((sequences, rate))
        })
        .collect()
}
