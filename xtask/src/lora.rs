//! The trained LoRA adapters: `tools/lora/train.py` on the CPU, from the pairs in
//! `tools/lora/<style>/` and a shipped persona, for a catalog model.
//!
//! An adapter is never committed or downloaded: setup trains it once and caches it under a
//! name keyed by the sha256 of everything that makes it (the script, its pinned packages, the
//! pairs, the persona, the tokenizing example, the base model and the training settings), so
//! a changed input trains a new one and an unchanged one costs nothing. Training is not
//! bit-reproducible across CPUs (XLA's float sums), so the key is the inputs', not the
//! output's. The trainer's Python packages (jax and its dependencies, about 140 MB) are
//! installed from PyPI by pinned hash into the cache, never into the system's Python.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use npc_catalog::CatalogModel;
use sha2::{Digest, Sha256};

use crate::{Result, cache_dir, cargo, place, project_root, run};

/// An adapter the project trains: its style directory under `tools/lora/` and the training
/// settings `train.py` gets.
pub struct Style {
    /// `tools/lora/<name>/pairs.txt` holds its pairs; the adapter is
    /// `assets/adapters/<name>.<model id>.gguf`.
    pub name: &'static str,
    /// The persona it is trained under, from the project root.
    pub persona: &'static str,
    /// Arguments for `train.py` beyond the model, data and output, per catalog model id (a
    /// model it lists none for is not trained: settings are tuned per model).
    pub settings: &'static [(&'static str, &'static [&'static str])],
}

impl Style {
    /// The training settings for `model`.
    fn settings_for(&self, model: &CatalogModel) -> Result<&'static [&'static str]> {
        self.settings
            .iter()
            .find(|(id, _)| *id == model.id)
            .map(|(_, settings)| *settings)
            .ok_or_else(|| {
                format!(
                    "the {} adapter has no training settings for {} (xtask/src/lora.rs)",
                    self.name, model.id
                )
            })
    }
}

/// Replies that open with "Arr," in an old sailor's words: the RPG ferrywoman's adapter,
/// and the tests' trained one.
pub const SEA_TALK: Style = Style {
    name: "sea-talk",
    persona: "assets/personas/ferrywoman.persona.ron",
    settings: &[
        // Every layer adapted: 40 steps, about 2 minutes on 2 cores.
        (
            "smollm2-135m",
            &[
                "--rank", "8", "--steps", "40", "--batch", "8", "--lr", "3e-3",
            ],
        ),
        // The last 8 of 28 layers: 30 steps, about 5 minutes on 2 cores.
        (
            "qwen2.5-coder-1.5b",
            &[
                "--rank",
                "8",
                "--steps",
                "30",
                "--batch",
                "8",
                "--lr",
                "3e-3",
                "--first-layer",
                "20",
            ],
        ),
    ],
};

/// `assets/adapters/<style>.<model id>.gguf`, trained first unless cached.
pub fn ensure(style: &Style, model: &CatalogModel, model_path: &Path) -> Result<PathBuf> {
    let root = project_root();
    let tools = root.join("tools/lora");
    let dir = tools.join(style.name);
    let inputs = [
        tools.join("train.py"),
        tools.join("requirements.txt"),
        dir.join("pairs.txt"),
        root.join(style.persona),
        root.join("examples/lora_data.rs"),
    ];
    let mut key = Sha256::new();
    for input in &inputs {
        let bytes = fs::read(input).map_err(|e| format!("cannot read {}: {e}", input.display()))?;
        key.update(Sha256::digest(&bytes));
    }
    key.update(model.sha256.as_bytes());
    let settings = style.settings_for(model)?;
    key.update(settings.join(" ").as_bytes());
    let key = format!("{:x}", key.finalize());
    let adapters = cache_dir().join("adapters");
    fs::create_dir_all(&adapters)
        .map_err(|e| format!("cannot create {}: {e}", adapters.display()))?;
    let cached = adapters.join(format!("{}.{}.{}.gguf", style.name, model.id, &key[..16]));
    let label = format!("[setup adapter] {} for {}", style.name, model.id);
    if cached.is_file() {
        println!("{label}: cached ({})", cached.display());
    } else {
        let python = python_packages(&tools.join("requirements.txt"))?;
        println!("{label}: tokenizing the pairs");
        let data = adapters.join(format!("{}.{}.examples.txt", style.name, model.id));
        run(cargo()
            .args([
                "run",
                "--release",
                "--quiet",
                "-p",
                "npc_native",
                // The features the tests build with: the same artifacts serve both.
                "--features",
                "cloud",
                "--example",
                "lora_data",
                "--",
            ])
            .arg(model_path)
            .arg(root.join(style.persona))
            .arg(dir.join("pairs.txt"))
            .arg(&data))?;
        println!("{label}: training on the CPU (a few minutes)");
        let partial = cached.with_extension("partial");
        run(Command::new("python3")
            .arg(tools.join("train.py"))
            .arg("--model")
            .arg(model_path)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&partial)
            .args(["--name", style.name])
            .args(settings)
            .env("PYTHONPATH", &python)
            .env("PYTHONDONTWRITEBYTECODE", "1"))?;
        fs::rename(&partial, &cached)
            .map_err(|e| format!("cannot rename {}: {e}", partial.display()))?;
    }
    let target = root
        .join("assets/adapters")
        .join(format!("{}.{}.gguf", style.name, model.id));
    place(&cached, &target)?;
    println!("{label}: {}", target.display());
    Ok(target)
}

/// The trainer's packages installed into `cache/lora-python/<hash of requirements>`, where
/// `PYTHONPATH` finds them.
fn python_packages(requirements: &Path) -> Result<PathBuf> {
    let text = fs::read(requirements)
        .map_err(|e| format!("cannot read {}: {e}", requirements.display()))?;
    let key = format!("{:x}", Sha256::digest(&text));
    let dir = cache_dir().join("lora-python").join(&key[..16]);
    let done = dir.join(".installed");
    if done.is_file() {
        return Ok(dir);
    }
    println!(
        "[setup adapter] installing the trainer's Python packages (jax, numpy, gguf; about 140 MB from PyPI, every wheel's sha256 pinned)"
    );
    let _ = fs::remove_dir_all(&dir);
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
            "--no-deps",
            "--require-hashes",
            "--only-binary=:all:",
            "--target",
        ])
        .arg(&dir)
        .arg("-r")
        .arg(requirements))?;
    fs::write(&done, "").map_err(|e| format!("cannot write {}: {e}", done.display()))?;
    Ok(dir)
}
