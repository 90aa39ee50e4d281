//! LoRA adapters: checked against the base model before llama.cpp sees them, loaded once
//! at start-up, shared by every NPC that names one, and set on the context per decode.
//!
//! llama.cpp applies a context's adapters to every token of a `decode` call, so NPCs on
//! different adapters cannot share one: a step decodes them in one call per adapter
//! (`crate::engine`), and [`AdapterKey`] is what it groups them by. Changing the context's
//! adapter makes llama.cpp reserve its compute graph again on the next decode; the batching
//! bench's adapter table measures what that costs.

use std::path::{Path, PathBuf};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};

use super::gguf::{self, GGML_F32, Header, WriteTensor, WriteValue};
use crate::types::NpcError;

/// ggml's type ids an adapter's tensors may have: F32, F16, BF16, and the quantized types
/// of blocks of 32 values (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) where the rows are whole blocks.
const GGML_F16: u32 = 1;
const GGML_BF16: u32 = 30;
const GGML_BLOCKS_OF_32: [u32; 5] = [2, 3, 6, 7, 8];

/// Which adapter, at which strength, an NPC's reply runs through; `None` where it is used
/// is the base model (a scale of 0 is the base model too: llama.cpp leaves such an adapter
/// out of the set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct AdapterKey {
    /// Index in [`Adapters`].
    index: usize,
    /// The scale's bits (a float compared exactly).
    scale: u32,
}

/// The runtime's declared adapters ([`RuntimeConfig::adapters`](crate::RuntimeConfig::adapters)).
pub(crate) struct Adapters {
    entries: Vec<Entry>,
    /// What the context has set now.
    current: Option<AdapterKey>,
    /// Decode steps since the context's adapter last changed.
    steps: u32,
}

struct Entry {
    /// As declared.
    declared: PathBuf,
    /// The file, resolved against the asset folder and canonical where it exists.
    file: PathBuf,
    /// The file's fingerprint: what a state file records of the adapter its KV was computed
    /// with.
    fingerprint: String,
    /// The loaded adapter, or why it could not be loaded.
    adapter: Result<LlamaLoraAdapter, String>,
}

impl Adapters {
    /// No adapter.
    pub(crate) fn none() -> Self {
        Self {
            entries: Vec::new(),
            current: None,
            steps: 0,
        }
    }

    /// Checks and loads every declared adapter into `model` (before any context exists). An
    /// adapter that fails is kept with its reason: a persona naming it is rejected with it,
    /// and the rest of the runtime works. `fingerprint` names a file's contents (what a state
    /// file records of the adapter its KV was computed with).
    pub(crate) fn load(
        model: &mut LlamaModel,
        model_path: &Path,
        declared: &[PathBuf],
        assets_dir: &Path,
        fingerprint: impl Fn(&Path) -> String,
    ) -> Self {
        if declared.is_empty() {
            return Self::none();
        }
        let base = Header::read(model_path);
        let entries = declared
            .iter()
            .map(|path| {
                let file = resolve(assets_dir, path);
                let adapter = match &base {
                    Ok(base) => check_adapter(base, &file).and_then(|()| {
                        model
                            .lora_adapter_init(&file)
                            .map_err(|err| format!("llama.cpp did not load it: {err}"))
                    }),
                    Err(err) => Err(format!("the model's header is unreadable: {err}")),
                };
                match &adapter {
                    Ok(_) => tracing::info!("LoRA adapter {} loaded", path.display()),
                    Err(reason) => {
                        tracing::warn!("LoRA adapter {} not loaded: {reason}", path.display());
                    }
                }
                Entry {
                    declared: path.clone(),
                    fingerprint: fingerprint(&file),
                    file,
                    adapter,
                }
            })
            .collect();
        Self {
            entries,
            current: None,
            steps: 0,
        }
    }

    /// The key of the adapter at `path` (a persona's, relative to `assets_dir`) at `scale`
    /// (`None`: the base model, as for scale 0), or why it cannot be used. Paths match when
    /// they are the same as declared or name the same file.
    pub(crate) fn resolve(
        &self,
        path: &str,
        scale: f32,
        assets_dir: &Path,
    ) -> Result<Option<AdapterKey>, NpcError> {
        let rejected = |reason: String| NpcError::Adapter {
            path: PathBuf::from(path),
            reason,
        };
        let file = resolve(assets_dir, Path::new(path));
        let index = self
            .entries
            .iter()
            .position(|entry| entry.declared == Path::new(path) || entry.file == file)
            .ok_or_else(|| {
                rejected(
                    "not among the runtime's adapters (RuntimeConfig::adapters); adapters are \
                     declared up front because llama.cpp loads them before the worker's \
                     context exists"
                        .to_owned(),
                )
            })?;
        if let Err(reason) = &self.entries[index].adapter {
            return Err(rejected(reason.clone()));
        }
        Ok((scale != 0.0).then_some(AdapterKey {
            index,
            scale: scale.to_bits(),
        }))
    }

    /// What KV computed with `key` is tagged with: empty for the base model, else the
    /// adapter file's fingerprint and the scale. Sequences with different tags never share
    /// keys and values, and a state file's KV is restored only under its own tag.
    pub(crate) fn tag(&self, key: Option<AdapterKey>) -> String {
        key.map(|key| {
            format!(
                "{}@{}",
                self.entries[key.index].fingerprint,
                f32::from_bits(key.scale)
            )
        })
        .unwrap_or_default()
    }

    /// The context's adapter set to `key`'s (nothing to do when it already is).
    ///
    /// # Errors
    /// llama.cpp refused the set.
    pub(crate) fn apply(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        key: Option<AdapterKey>,
    ) -> Result<(), String> {
        if self.current == key {
            return Ok(());
        }
        let result = match key {
            Some(key) => match &mut self.entries[key.index].adapter {
                Ok(adapter) => ctx
                    .lora_adapter_set(adapter, f32::from_bits(key.scale))
                    .map_err(|err| err.to_string()),
                Err(reason) => Err(reason.clone()),
            },
            None => match self
                .entries
                .iter_mut()
                .find_map(|e| e.adapter.as_mut().ok())
            {
                Some(any) => ctx.lora_adapter_remove(any).map_err(|err| err.to_string()),
                None => Ok(()),
            },
        };
        if result.is_ok() {
            self.current = key;
            self.steps = 0;
        }
        result
    }

    /// The adapter the context has set now.
    pub(crate) fn current(&self) -> Option<AdapterKey> {
        self.current
    }

    /// Steps decoded under the current adapter since it was set.
    pub(crate) fn steps(&self) -> u32 {
        self.steps
    }

    /// Counts a step decoded under the current adapter.
    pub(crate) fn stepped(&mut self) {
        self.steps = self.steps.saturating_add(1);
    }
}

/// `path` in the asset folder (an absolute path as it is), canonical where it exists.
fn resolve(assets_dir: &Path, path: &Path) -> PathBuf {
    let joined = assets_dir.join(path);
    joined.canonicalize().unwrap_or(joined)
}

/// Why the file at `path` is not a LoRA adapter llama.cpp can apply to the model whose
/// header is `base`: the checks llama.cpp's loader makes, made first so that each failure has
/// its own words.
pub(crate) fn check_adapter(base: &Header, path: &Path) -> Result<(), String> {
    if !path.is_file() {
        return Err("no such file".to_owned());
    }
    let adapter = Header::read(path)?;
    match adapter.text("general.type") {
        Some("adapter") => {}
        Some(other) => return Err(format!("it is a {other}, not an adapter (general.type)")),
        None => return Err("it is not an adapter (no general.type)".to_owned()),
    }
    match adapter.text("adapter.type") {
        Some("lora") => {}
        Some(other) => return Err(format!("it is a {other} adapter, not a LoRA")),
        None => return Err("it names no adapter.type".to_owned()),
    }
    let arch = adapter.text("general.architecture").unwrap_or("no");
    let base_arch = base.text("general.architecture").unwrap_or("unknown");
    if arch != base_arch {
        return Err(format!(
            "it was made for a {arch} model; the model is {base_arch}"
        ));
    }
    if adapter.number("adapter.lora.alpha").is_none() {
        return Err("it has no adapter.lora.alpha".to_owned());
    }
    let mut pairs = 0;
    for (name, a) in &adapter.tensors {
        if name.ends_with("_norm.weight") {
            // llama.cpp ignores norm vectors in adapters.
            continue;
        }
        if name.ends_with(".lora_b") {
            if !adapter
                .tensors
                .contains_key(&name.replace(".lora_b", ".lora_a"))
            {
                return Err(format!("{name} has no lora_a beside it"));
            }
            continue;
        }
        let Some(target) = name.strip_suffix(".lora_a") else {
            return Err(format!("it holds {name}, which is not a LoRA tensor"));
        };
        let b = adapter
            .tensors
            .get(&format!("{target}.lora_b"))
            .ok_or_else(|| format!("{name} has no lora_b beside it"))?;
        let weight = base.tensors.get(target).ok_or_else(|| {
            format!("the model has no tensor {target} (was it made for another model?)")
        })?;
        for (part, info) in [("lora_a", a), ("lora_b", b)] {
            let usable = match info.kind {
                GGML_F32 | GGML_F16 | GGML_BF16 => true,
                kind if GGML_BLOCKS_OF_32.contains(&kind) => info.shape[0] % 32 == 0,
                _ => false,
            };
            if info.shape.len() != 2 || !usable {
                return Err(format!(
                    "{target}.{part} is not a 2-D tensor of F32, F16, BF16 or whole blocks of \
                     Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0"
                ));
            }
        }
        let [a_in, a_rank] = [a.shape[0], a.shape[1]];
        let [b_rank, b_out] = [b.shape[0], b.shape[1]];
        let fits = if target == "token_embd.weight" {
            // llama.cpp's embedding adapter is stored the other way round.
            weight.shape[0] == b_out && weight.shape.get(1) == Some(&a_rank)
        } else {
            weight.shape[0] == a_in && weight.shape.get(1) == Some(&b_out) && a_rank == b_rank
        };
        if !fits || a_rank == 0 {
            return Err(format!(
                "{target}'s pieces ({a_in}×{a_rank} and {b_rank}×{b_out}) do not fit the \
                 model's {:?} (was it made for another model?)",
                weight.shape
            ));
        }
        pairs += 1;
    }
    if pairs == 0 {
        return Err("it holds no LoRA tensor pair".to_owned());
    }
    Ok(())
}

/// What [`write_synthetic_adapter`] writes.
#[derive(Clone, Debug)]
pub struct SyntheticAdapter {
    /// The low-rank update's rank (a multiple of 32 when `quantized`).
    pub rank: u32,
    /// Store the weights as Q4_1 (default) rather than F32. On the CPU, llama.cpp multiplies
    /// F32 and F16 weights by kernels whose rounding depends on how many tokens a decode
    /// holds, so an NPC on an F32 adapter may reply differently (at a near-tie) when its
    /// prompt is computed in other chunks or beside other NPCs; quantized weights take the
    /// same integer dot products whatever the batch, as the base model's do.
    pub quantized: bool,
    /// The adapted weights: the names of the model's tensors without the layer
    /// (`"attn_q.weight"`, `"attn_v.weight"`, `"ffn_down.weight"`), or whole names
    /// (`"blk.0.attn_k.weight"`).
    pub targets: Vec<String>,
    /// How much the update moves each adapted projection's output, relative to its input's
    /// size at scale 1 (about 0.1 changes a few words of a reply, 1 changes most of them).
    pub strength: f32,
    /// The random weights' seed: the same seed writes the same file.
    pub seed: u64,
}

impl Default for SyntheticAdapter {
    fn default() -> Self {
        Self {
            rank: 32,
            quantized: true,
            targets: vec!["attn_q.weight".into(), "attn_v.weight".into()],
            strength: 0.5,
            seed: 1,
        }
    }
}

/// Writes a LoRA adapter of random low-rank weights for the model at `model` to `out`: a
/// real GGUF LoRA (llama.cpp loads and applies it like a trained one) that teaches the model
/// nothing. For tests and benchmarks of the adapter machinery: what it costs, that mixed
/// batches equal solo replies, that a state file names its adapter. Returns the tensor
/// pairs written.
///
/// # Errors
/// The model's header is unreadable, no tensor matches `targets`, or `out` cannot be
/// written.
pub fn write_synthetic_adapter(
    model: &Path,
    out: &Path,
    settings: &SyntheticAdapter,
) -> Result<usize, String> {
    let base = Header::read(model).map_err(|err| format!("{}: {err}", model.display()))?;
    let arch = base
        .text("general.architecture")
        .ok_or_else(|| format!("{} names no architecture", model.display()))?;
    let rank = u64::from(settings.rank.max(1));
    if settings.quantized && rank % 32 != 0 {
        return Err(format!(
            "a quantized adapter's rank is a multiple of 32, not {rank}"
        ));
    }
    let mut names: Vec<&String> = base
        .tensors
        .keys()
        .filter(|name| {
            settings
                .targets
                .iter()
                .any(|t| *name == t || name.ends_with(&format!(".{t}")))
        })
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(format!(
            "{} has no tensor named {:?}",
            model.display(),
            settings.targets
        ));
    }
    let mut random = Random(settings.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut tensors = Vec::new();
    for name in &names {
        let shape = &base.tensors[*name].shape;
        let (inputs, outputs) = (shape[0], shape.get(1).copied().unwrap_or(1));
        // A·x has entries about the size of x's; B then scales them to `strength` of it
        // (alpha = rank, so llama.cpp's alpha / rank is 1).
        #[allow(clippy::cast_precision_loss)]
        let (a_std, b_std) = (
            1.0 / (inputs as f32).sqrt(),
            settings.strength / (rank as f32).sqrt(),
        );
        let mut values = |count: u64, std: f32| -> Vec<f32> {
            (0..count).map(|_| random.normal() * std).collect()
        };
        if settings.quantized && inputs % 32 != 0 {
            return Err(format!(
                "{name} has {inputs} inputs, not whole blocks of 32"
            ));
        }
        tensors.push(WriteTensor {
            name: format!("{name}.lora_a"),
            shape: vec![inputs, rank],
            values: values(inputs * rank, a_std),
            q4_1: settings.quantized,
        });
        tensors.push(WriteTensor {
            name: format!("{name}.lora_b"),
            shape: vec![rank, outputs],
            values: values(rank * outputs, b_std),
            q4_1: settings.quantized,
        });
    }
    #[allow(clippy::cast_precision_loss)]
    let alpha = rank as f32;
    gguf::write(
        out,
        &[
            ("general.architecture", WriteValue::Text(arch)),
            ("general.type", WriteValue::Text("adapter")),
            (
                "general.name",
                WriteValue::Text("synthetic LoRA (random weights)"),
            ),
            ("adapter.type", WriteValue::Text("lora")),
            ("adapter.lora.alpha", WriteValue::F32(alpha)),
        ],
        &tensors,
    )
    .map_err(|err| format!("{}: {err}", out.display()))?;
    Ok(names.len())
}

/// xorshift64* with Box–Muller: reproducible normal values without a dependency.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A uniform value in (0, 1].
    #[allow(clippy::cast_precision_loss)]
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 1.0) / (1u64 << 24) as f32
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_model() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../assets")
            .join(crate::catalog::TEST_MODEL.asset_path())
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("npc-adapter-{}-{name}", std::process::id()))
    }

    /// A synthetic adapter passes the checks; one changed in each way llama.cpp would refuse
    /// fails them with its own reason.
    #[test]
    fn adapters_are_checked_against_the_model() {
        let model = test_model();
        let base = Header::read(&model).unwrap();
        let good = temp("good.gguf");
        let pairs = write_synthetic_adapter(&model, &good, &SyntheticAdapter::default()).unwrap();
        assert_eq!(pairs, 60, "attn_q and attn_v of 30 layers");
        check_adapter(&base, &good).unwrap();

        let mut other_arch = base.clone();
        other_arch.metadata.insert(
            "general.architecture".into(),
            gguf::Value::Text("qwen2".into()),
        );
        let err = check_adapter(&other_arch, &good).unwrap_err();
        assert!(err.contains("made for a llama model"), "{err}");

        let mut smaller = base.clone();
        smaller
            .tensors
            .get_mut("blk.3.attn_v.weight")
            .unwrap()
            .shape = vec![576, 64];
        let err = check_adapter(&smaller, &good).unwrap_err();
        assert!(err.contains("blk.3.attn_v.weight"), "{err}");

        let err = check_adapter(&base, &model).unwrap_err();
        assert!(err.contains("not an adapter"), "{err}");
        let err = check_adapter(&base, &temp("missing.gguf")).unwrap_err();
        assert!(err.contains("no such file"), "{err}");
        let text = temp("text.gguf");
        std::fs::write(&text, "not a model").unwrap();
        let err = check_adapter(&base, &text).unwrap_err();
        assert!(err.contains("not a GGUF"), "{err}");
        for path in [good, text] {
            std::fs::remove_file(path).unwrap();
        }
    }

    /// The same settings write the same bytes; another seed other weights.
    #[test]
    fn synthetic_adapters_are_reproducible() {
        let model = test_model();
        let (one, two, three) = (temp("one.gguf"), temp("two.gguf"), temp("three.gguf"));
        let settings = SyntheticAdapter {
            targets: vec!["blk.0.attn_k.weight".into()],
            ..SyntheticAdapter::default()
        };
        for (path, seed) in [(&one, 1), (&two, 1), (&three, 2)] {
            let settings = SyntheticAdapter {
                seed,
                ..settings.clone()
            };
            assert_eq!(write_synthetic_adapter(&model, path, &settings), Ok(1));
        }
        let read = |path: &PathBuf| std::fs::read(path).unwrap();
        assert_eq!(read(&one), read(&two));
        assert_ne!(read(&one), read(&three));
        for path in [one, two, three] {
            std::fs::remove_file(path).unwrap();
        }
    }
}
