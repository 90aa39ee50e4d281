//! [`RuntimeConfig`]: which model, how many threads, how much context.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub(crate) mod escalation;
mod prices;
pub(crate) mod remote;

pub use prices::PriceTable;
pub use remote::{Backend, RemoteConfig};

/// The GPU backend compiled in (`cuda`, `vulkan` or `metal` feature), if any.
pub const GPU_BACKEND: Option<&str> = if cfg!(feature = "cuda") {
    Some("cuda")
} else if cfg!(feature = "vulkan") {
    Some("vulkan")
} else if cfg!(feature = "metal") {
    Some("metal")
} else {
    None
};

use crate::sampling::SamplingParams;
use crate::types::FieldError;

/// Number format of the keys and values in the KV cache.
///
/// Smaller formats hold more NPCs in the same memory and make saved NPC state (and RAM or
/// disk eviction) proportionally smaller, at a small cost in reply quality. Quantized values
/// need llama.cpp's flash attention, which the runtime enables for them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KvPrecision {
    /// 16-bit floats: llama.cpp's default, exact.
    #[default]
    F16,
    /// 8-bit blocks: about half the bytes of `F16`, nearly lossless.
    Q8_0,
    /// 4-bit blocks: about a quarter of the bytes of `F16`, noticeably lossy on small models.
    Q4_0,
}

impl KvPrecision {
    /// Short lowercase name, as used in benchmark tables and state-file headers.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }
}

/// Tokens per model pass on the CPU when [`RuntimeConfig::ubatch_size`] is not set.
pub const CPU_UBATCH: u32 = 128;

/// Which model the runtime loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A model of the [catalog](crate::catalog) by id (`qwen2.5-coder-1.5b`): the file
    /// `models/<file name>` in [`RuntimeConfig::assets_dir`], where `cargo xtask setup --model
    /// ID` puts it and where a shipped game puts it beside its other assets.
    Catalog(String),
    /// A GGUF file. A relative path is relative to [`RuntimeConfig::assets_dir`], as Bevy's
    /// asset paths are; an absolute one is used as it is.
    File(PathBuf),
}

impl Default for ModelSource {
    /// The catalog's default model ([`catalog::DEFAULT_MODEL`](crate::catalog::DEFAULT_MODEL)).
    fn default() -> Self {
        Self::Catalog(crate::catalog::DEFAULT_MODEL.id.to_owned())
    }
}

/// The folder a game's assets are read from when nothing says otherwise, found the way Bevy
/// finds its asset folder: `assets/` under `$BEVY_ASSET_ROOT` if set, else under
/// `$CARGO_MANIFEST_DIR` (set by `cargo run`), else beside the executable. So a game started
/// from a launcher or a shortcut, in any working directory, finds the same files.
#[must_use]
pub fn default_assets_dir() -> PathBuf {
    let base = std::env::var_os("BEVY_ASSET_ROOT")
        .or_else(|| std::env::var_os("CARGO_MANIFEST_DIR"))
        .map(PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(Path::to_path_buf))
        })
        .unwrap_or_default();
    base.join("assets")
}

/// How the runtime loads and runs its model. Build it with the `with_*` methods.
#[derive(Clone, Debug, PartialEq)]
pub struct RuntimeConfig {
    /// The model: a catalog id (the default: the catalog's default model) or a GGUF file.
    /// [`RuntimeConfig::model_file`] says where it is looked for.
    pub model: ModelSource,
    /// Decode threads; `None` uses the machine's available cores. More threads than cores
    /// makes decoding several times slower, so do not oversubscribe.
    pub threads: Option<u32>,
    /// Threads that pick the next tokens of a step's NPCs (sampler chain, action grammar,
    /// confidence); `None`: the machine's cores, at most 4. Only a step with at least 4
    /// replies a thread whose pick passes over the whole vocabulary (the confidence score,
    /// or no top-k) spreads them out: a pick among the best few candidates alone costs less
    /// than the hand-over. They run between decodes, when llama.cpp's CPU threads have ended,
    /// so they do not compete with them. `1` samples on the worker thread alone.
    pub sampling_threads: Option<u32>,
    /// Context tokens per NPC conversation (persona + history + reply).
    pub context_size: u32,
    /// How many NPC conversations keep their KV cache in the context at once and can be
    /// decoded in one batch.
    pub slots: u32,
    /// Most tokens one decode call may carry (long prompts are split into chunks of this size).
    pub batch_size: u32,
    /// Tokens llama.cpp computes in one pass of the model (a decode call of more is split into
    /// passes); `None`: 512 with layers on a GPU, [`CPU_UBATCH`] otherwise.
    ///
    /// llama.cpp's compute buffer holds one row of logits per token of a pass: for Qwen2.5's
    /// 151,936-token vocabulary that is 317 MB at 512 tokens, about 80 MB at 128. On 2 CPU
    /// cores prompt processing is as fast at 128 as at 512 (`llama-bench -ub`, docs/guide.md
    /// "Models"), so CPU runs take the smaller buffer; GPUs gain from larger passes.
    pub ubatch_size: Option<u32>,
    /// Layers offloaded to the GPU. `None`: on a build with a GPU backend (`cuda`, `vulkan`,
    /// `metal`), as many as fit the device's free memory beside the KV cache and compute
    /// buffers (llama.cpp's fit, leaving 512 MiB for the game); none on a CPU build. When
    /// the GPU cannot be used (no device, out of memory, a failed load), the model runs on
    /// the CPU and [`ModelInfo::cpu_fallback`](crate::ModelInfo::cpu_fallback) says why.
    pub gpu_layers: Option<u32>,
    /// Sampling defaults; personas override them field by field.
    pub sampling: SamplingParams,
    /// Longest player line accepted, in characters.
    pub max_line_chars: usize,
    /// Most prompt tokens processed per step while another NPC is generating: a long prompt
    /// then advances in chunks between that NPC's tokens instead of freezing its speech.
    pub prefill_chunk: u32,
    /// Longest one `decode` step should take. The prompt tokens that fit it are found at
    /// start-up (a 32-token decode is timed, and the count rounded down to a power of two,
    /// at least 16), and prompt chunks are cut to that; when another process slows the
    /// cores (a step over 1.5× the limit) the count drops to what fits at the speed seen,
    /// and comes back up (to the start-up count) after 16 full steps in a row that ran fast
    /// enough for twice their tokens. It bounds how long quitting
    /// the game waits for the worker (llama.cpp cannot stop a decode once it started: on
    /// two CPU cores and the default model a 512-token step takes about 3 s) and how long
    /// one NPC's long prompt holds up the others. Default 500 ms: there, quitting while four
    /// NPCs process their prompts took 0.23 s (median) instead of 2.42 s, and a 503-token
    /// prompt's first token came 1.04× later (`cargo bench -p npc_native --bench exit`).
    /// `None` fills every step up to the batch size. With a small model the count reaches the
    /// batch size and nothing changes; with layers on a GPU (where a 512-token step takes
    /// milliseconds) it is not applied.
    pub max_step_time: Option<Duration>,
    /// Let llama.cpp print its own log lines to stderr.
    pub llama_logs: bool,
    /// Compute an NPC's system prompt into its KV cache as soon as it gets its persona (at
    /// spawn and after a hot reload), in the background, so the player's first line costs
    /// only its own tokens (on by default). It runs only while no reply is queued or in
    /// progress, in small chunks with the inbox read between them, and only into a free KV
    /// slot or the NPC's own: it never pushes another conversation out.
    pub prewarm: bool,
    /// Reuse each NPC's cached tokens across turns (the default). `false` recomputes every
    /// prompt from scratch: only useful as a benchmark baseline.
    pub kv_reuse: bool,
    /// RAM for KV state of NPCs evicted from their slot, in bytes. Past it, the least
    /// recently evicted state is dropped (and recomputed when that NPC speaks again).
    pub evicted_kv_bytes: usize,
    /// Disk for KV state evicted past [`evicted_kv_bytes`](Self::evicted_kv_bytes), in bytes:
    /// the least recently evicted state moves from RAM to a file in
    /// [`eviction_dir`](Self::eviction_dir) instead of being dropped. `0` disables it.
    pub evicted_kv_disk_bytes: u64,
    /// Directory for KV state evicted to disk; `None` uses a per-process directory in the
    /// system's temporary directory. Files are deleted when restored, forgotten or at shutdown.
    pub eviction_dir: Option<PathBuf>,
    /// Number format of the KV cache (see [`KvPrecision`]).
    pub kv_precision: KvPrecision,
    /// Flash attention on or off; `None` (the default) leaves it to llama.cpp (on where the
    /// device supports it), except that [`reproducible_batching`](Self::reproducible_batching)
    /// turns it off on the CPU; `Some(true)` wins over that (reproducible batching then does
    /// not apply). A quantized KV cache needs it on. Off is a way round a
    /// driver whose flash-attention kernels fail: Mesa 22.3's software Vulkan driver
    /// (lavapipe) crashed in them with several NPCs in a batch (`cargo xtask gpu-check`).
    pub flash_attention: Option<bool>,
    /// Make an NPC's reply independent of which other NPCs are decoded in the same steps
    /// (on by default): with the same seed, a reply is the same token for token whether its
    /// NPC speaks alone or beside others.
    ///
    /// llama.cpp computes the same numbers in the last bits differently depending on the
    /// batch's shape, and greedy or seeded sampling turns a near-tie into a different word.
    /// With this on, the CPU build avoids the two shape-dependent paths measured here:
    /// flash attention is off (its CPU kernel splits one sequence's single query across
    /// threads but not several sequences' queries), and prompt tokens never share a
    /// `decode` call with generated ones (each step makes two calls when both are waiting).
    /// What it costs is flash attention's effect on llama.cpp itself: against llama.cpp with
    /// the same setting the runtime measures the same ratio either way (docs/benchmarks.md, "Measured
    /// speed"), and on 2 CPU cores flash attention off was faster in some runs and slower in
    /// others.
    /// It applies to the f16 KV cache of a CPU run: a quantized cache
    /// ([`KvPrecision::Q8_0`], [`KvPrecision::Q4_0`]) needs flash attention, and with layers
    /// on a GPU it is ignored (GPU kernels give no such guarantee; see
    /// [`reproducible_batching_applies`](Self::reproducible_batching_applies)).
    pub reproducible_batching: bool,
    /// Text every NPC's system prompt starts with: the world, its rules, how NPCs speak.
    ///
    /// Being the same for every NPC, its tokens are computed once and copied into each new
    /// NPC's sequence instead of being computed again.
    pub preamble: String,
    /// Routing of hard questions to a cloud model (off by default), and the don't-know
    /// reminder and grounding check for questions the NPC may not know (on).
    pub escalation: escalation::EscalationConfig,
    /// An inference server that generates the replies of every NPC (or of the personas that
    /// ask for it), instead of the local model: see [`RemoteConfig`]. `None` (default): all
    /// replies are local.
    pub remote: Option<RemoteConfig>,
    /// The secret guard over every reply ([`crate::guard`]): on by default. Off, replies
    /// stream exactly as the model writes them (for benchmarks and tests of raw generation).
    pub guard: bool,
    /// Score the token confidence of every local reply into
    /// [`ReplyStats::confidence`](crate::ReplyStats::confidence). Off (default), only the
    /// replies a confidence threshold reads are scored
    /// ([`EscalationConfig::min_confidence`](crate::EscalationConfig::min_confidence), or a
    /// persona's own): the score is a pass of exponentials over the whole vocabulary for
    /// every token, more host time than picking the token (on the default model, 44–102 µs a
    /// token against 21–40 on the two 2-core machines measured; docs/benchmarks.md, "Host
    /// work per step"). On, for a game or tool that studies the signal, as the project's
    /// evaluation does.
    pub confidence_for_every_reply: bool,
    /// The game's asset folder: a catalog model and a relative model path are found in it, and
    /// persona lore files ([`Persona::lore`](crate::Persona::lore)) are relative to it.
    /// Default: [`default_assets_dir`], the folder Bevy's `AssetPlugin` reads by default (the
    /// Bevy plugin sets it to the `AssetPlugin`'s folder).
    pub assets_dir: PathBuf,
    /// Where compressed lore is cached ([`Persona::compress_lore`](crate::Persona)). Default
    /// `$XDG_CACHE_HOME/bevy_npc_ai/compressed-lore` (or `~/.cache/…`).
    pub cache_dir: PathBuf,
    /// LoRA adapters (GGUF) personas may name ([`Persona::adapter`](crate::Persona::adapter)),
    /// relative to [`assets_dir`](Self::assets_dir) or absolute. Each is checked against the
    /// model and loaded once, at start-up, and shared by every NPC that names it; a persona
    /// that names one not declared here is rejected. Declared up front because llama.cpp
    /// loads an adapter into the model, which `llama-cpp-2` allows only before the worker's
    /// context exists (`LlamaModel::lora_adapter_init` takes the model mutably). Default:
    /// none.
    pub adapters: Vec<PathBuf>,
    /// Steps the context keeps one LoRA adapter while NPCs on other adapters are replying
    /// too (see [`adapters`](Self::adapters)): NPCs on different adapters cannot share a
    /// decode, so each adapter's NPCs advance for this many steps in turn. 1 (default) gives
    /// every NPC a token in every round of adapters, at one adapter switch per step; each
    /// switch makes llama.cpp rebuild its compute graphs, which a longer slice does fewer
    /// times (on a CPU the adapter bench finds no difference between 1 and 8; a GPU, whose
    /// steps are short, is unmeasured).
    ///
    /// Priorities and deadlines hold within each adapter's share: a line with a slot waits
    /// at most `(adapters with replies in progress - 1) * adapter_slice_steps` steps for its
    /// adapter's turn, and with `a` adapters replying, each of their NPCs gets a token about
    /// every `a` steps.
    pub adapter_slice_steps: u32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            model: ModelSource::default(),
            threads: None,
            sampling_threads: None,
            context_size: 2048,
            slots: 4,
            batch_size: 512,
            ubatch_size: None,
            gpu_layers: None,
            sampling: SamplingParams::default(),
            max_line_chars: 2000,
            prefill_chunk: 128,
            max_step_time: Some(Duration::from_millis(500)),
            llama_logs: false,
            prewarm: true,
            guard: true,
            confidence_for_every_reply: false,
            kv_reuse: true,
            evicted_kv_bytes: 256 << 20,
            evicted_kv_disk_bytes: 4 << 30,
            eviction_dir: None,
            reproducible_batching: true,
            kv_precision: KvPrecision::F16,
            flash_attention: None,
            preamble: String::new(),
            escalation: escalation::EscalationConfig::default(),
            remote: None,
            assets_dir: default_assets_dir(),
            cache_dir: default_cache_dir(),
            adapters: Vec::new(),
            adapter_slice_steps: 1,
        }
    }
}

impl RuntimeConfig {
    /// A configuration for the GGUF file at `path` (relative paths are relative to
    /// [`assets_dir`](Self::assets_dir)), with defaults for everything else.
    #[must_use]
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self::default().with_model(model_path)
    }

    /// Sets the model file (relative paths are relative to [`assets_dir`](Self::assets_dir)).
    #[must_use]
    pub fn with_model(mut self, path: impl Into<PathBuf>) -> Self {
        self.model = ModelSource::File(path.into());
        self
    }

    /// Sets the model to a [catalog](crate::catalog) model by id (`"qwen2.5-coder-0.5b"`).
    /// An unknown id is reported when the runtime starts, as
    /// [`ModelError::UnknownCatalogModel`](crate::types::ModelError::UnknownCatalogModel).
    #[must_use]
    pub fn with_catalog_model(mut self, id: impl Into<String>) -> Self {
        self.model = ModelSource::Catalog(id.into());
        self
    }

    /// The model file this configuration loads: a catalog model's `models/<file name>` or a
    /// relative path, in [`assets_dir`](Self::assets_dir); an absolute path as it is.
    ///
    /// # Errors
    /// [`ModelError::UnknownCatalogModel`](crate::types::ModelError::UnknownCatalogModel) for an id
    /// the catalog does not have.
    pub fn model_file(&self) -> Result<PathBuf, crate::types::ModelError> {
        match &self.model {
            ModelSource::Catalog(id) => crate::catalog::find(id)
                .map(|model| self.assets_dir.join(model.asset_path()))
                .ok_or_else(|| crate::types::ModelError::UnknownCatalogModel(id.clone())),
            ModelSource::File(path) => Ok(self.assets_dir.join(path)),
        }
    }

    /// Sets the number of decode threads.
    #[must_use]
    pub fn with_threads(mut self, threads: u32) -> Self {
        self.threads = Some(threads);
        self
    }

    /// Sets the threads that sample a step's NPCs ([`RuntimeConfig::sampling_threads`]).
    #[must_use]
    pub fn with_sampling_threads(mut self, threads: u32) -> Self {
        self.sampling_threads = Some(threads.max(1));
        self
    }

    /// The sampling threads: the configured number, else the machine's cores, at most 4.
    #[must_use]
    pub fn effective_sampling_threads(&self) -> u32 {
        self.sampling_threads
            .unwrap_or_else(|| available_cores().min(4))
    }

    /// Sets the context size per NPC conversation, in tokens.
    #[must_use]
    pub fn with_context_size(mut self, tokens: u32) -> Self {
        self.context_size = tokens;
        self
    }

    /// Sets how many NPC conversations stay resident and decode together.
    #[must_use]
    pub fn with_slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Sets the number of layers offloaded to the GPU.
    #[must_use]
    pub fn with_gpu_layers(mut self, layers: u32) -> Self {
        self.gpu_layers = Some(layers);
        self
    }

    /// Sets the sampling defaults.
    #[must_use]
    pub fn with_sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    /// Sets the longest accepted player line, in characters.
    #[must_use]
    pub fn with_max_line_chars(mut self, chars: usize) -> Self {
        self.max_line_chars = chars;
        self
    }

    /// Sets [`max_step_time`](Self::max_step_time) (`None`: no limit but the batch size).
    #[must_use]
    pub fn with_max_step_time(mut self, limit: Option<Duration>) -> Self {
        self.max_step_time = limit;
        self
    }

    /// Lets llama.cpp log to stderr (off by default: it is verbose).
    #[must_use]
    pub fn with_llama_logs(mut self, enabled: bool) -> Self {
        self.llama_logs = enabled;
        self
    }

    /// Turns [`prewarm`](Self::prewarm) on (default) or off.
    #[must_use]
    pub fn with_prewarm(mut self, enabled: bool) -> Self {
        self.prewarm = enabled;
        self
    }

    /// Turns KV reuse across turns on (default) or off (a benchmark baseline).
    #[must_use]
    pub fn with_kv_reuse(mut self, enabled: bool) -> Self {
        self.kv_reuse = enabled;
        self
    }

    /// Sets the RAM budget for evicted NPCs' KV state, in bytes.
    #[must_use]
    pub fn with_evicted_kv_bytes(mut self, bytes: usize) -> Self {
        self.evicted_kv_bytes = bytes;
        self
    }

    /// Sets the disk budget for evicted KV state (see [`Self::evicted_kv_disk_bytes`]).
    #[must_use]
    pub fn with_evicted_kv_disk_bytes(mut self, bytes: u64) -> Self {
        self.evicted_kv_disk_bytes = bytes;
        self
    }

    /// Sets the directory for KV state evicted to disk.
    #[must_use]
    pub fn with_eviction_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.eviction_dir = Some(dir.into());
        self
    }

    /// Sets the KV cache's number format.
    #[must_use]
    pub fn with_kv_precision(mut self, precision: KvPrecision) -> Self {
        self.kv_precision = precision;
        self
    }

    /// Whether [`reproducible_batching`](Self::reproducible_batching) takes effect: it is on,
    /// the KV cache is f16, [`flash_attention`](Self::flash_attention) is not forced on and
    /// no layer runs on a GPU.
    #[must_use]
    pub fn reproducible_batching_applies(&self) -> bool {
        self.reproducible_batching
            && self.kv_precision == KvPrecision::F16
            && self.flash_attention != Some(true)
            && self.effective_gpu_layers() == 0
    }

    /// Declares a LoRA adapter personas may name (see [`adapters`](Self::adapters)).
    #[must_use]
    pub fn with_adapter(mut self, path: impl Into<PathBuf>) -> Self {
        self.adapters.push(path.into());
        self
    }

    /// Sets [`adapter_slice_steps`](Self::adapter_slice_steps).
    #[must_use]
    pub fn with_adapter_slice_steps(mut self, steps: u32) -> Self {
        self.adapter_slice_steps = steps;
        self
    }

    /// Turns flash attention on or off (see [`flash_attention`](Self::flash_attention)).
    #[must_use]
    pub fn with_flash_attention(mut self, on: bool) -> Self {
        self.flash_attention = Some(on);
        self
    }

    /// Turns [`reproducible_batching`](Self::reproducible_batching) on or off.
    #[must_use]
    pub fn with_reproducible_batching(mut self, on: bool) -> Self {
        self.reproducible_batching = on;
        self
    }

    /// Sets the world preamble every NPC's system prompt starts with.
    #[must_use]
    pub fn with_preamble(mut self, preamble: impl Into<String>) -> Self {
        self.preamble = preamble.into();
        self
    }

    /// Sets the escalation policy (see [`EscalationConfig`](crate::EscalationConfig)).
    #[must_use]
    pub fn with_escalation(mut self, escalation: escalation::EscalationConfig) -> Self {
        self.escalation = escalation;
        self
    }

    /// Generates NPC replies on an inference server (see [`RemoteConfig`]); the local model
    /// stays loaded for tokenizing, summaries and fallback.
    #[must_use]
    pub fn with_remote(mut self, remote: RemoteConfig) -> Self {
        self.remote = Some(remote);
        self
    }

    /// Turns the secret guard on or off (see [`RuntimeConfig::guard`]).
    #[must_use]
    pub fn with_guard(mut self, on: bool) -> Self {
        self.guard = on;
        self
    }

    /// Scores every local reply's token confidence, or only those a threshold reads (see
    /// [`RuntimeConfig::confidence_for_every_reply`]).
    #[must_use]
    pub fn with_confidence_for_every_reply(mut self, on: bool) -> Self {
        self.confidence_for_every_reply = on;
        self
    }

    /// Sets the folder persona lore files are read from.
    #[must_use]
    pub fn with_assets_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.assets_dir = dir.into();
        self
    }

    /// Sets where compressed lore is cached.
    #[must_use]
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = dir.into();
        self
    }

    /// Threads to use: the configured number, else the available cores.
    #[must_use]
    pub fn effective_threads(&self) -> u32 {
        self.threads.unwrap_or_else(available_cores)
    }

    /// Tokens per model pass: the configured number, else 512 with layers on a GPU and
    /// [`CPU_UBATCH`] on the CPU; never more than [`batch_size`](Self::batch_size).
    #[must_use]
    pub fn effective_ubatch_size(&self) -> u32 {
        let default = if self.effective_gpu_layers() > 0 {
            512
        } else {
            CPU_UBATCH
        };
        self.ubatch_size.unwrap_or(default).min(self.batch_size)
    }

    /// Sets the tokens per model pass (see [`ubatch_size`](Self::ubatch_size)).
    #[must_use]
    pub fn with_ubatch_size(mut self, tokens: u32) -> Self {
        self.ubatch_size = Some(tokens);
        self
    }

    /// Layers to offload as far as the configuration says: the configured number, else all
    /// (GPU build; the load fits them to the device) or none (CPU build).
    #[must_use]
    pub fn effective_gpu_layers(&self) -> u32 {
        self.gpu_layers
            .unwrap_or(if GPU_BACKEND.is_some() { u32::MAX } else { 0 })
    }

    /// Checks the numbers before any of them reach llama.cpp.
    ///
    /// # Errors
    /// A [`FieldError`] naming the offending setting.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.threads == Some(0) {
            return Err(FieldError::new("threads", "must be at least 1"));
        }
        if self.flash_attention == Some(false) && self.kv_precision != KvPrecision::F16 {
            return Err(FieldError::new(
                "flash_attention",
                "a quantized KV cache (kv_precision Q8_0 or Q4_0) needs flash attention on",
            ));
        }
        if self.adapter_slice_steps == 0 {
            return Err(FieldError::new("adapter_slice_steps", "must be at least 1"));
        }
        if self.context_size < 64 {
            return Err(FieldError::new(
                "context_size",
                format!("{} is below 64 tokens", self.context_size),
            ));
        }
        if !(1..=64).contains(&self.slots) {
            return Err(FieldError::new(
                "slots",
                format!("{} is outside 1..=64", self.slots),
            ));
        }
        if self.context_size.checked_mul(self.slots).is_none() {
            return Err(FieldError::new(
                "context_size",
                "context_size × slots overflows",
            ));
        }
        if self.batch_size < self.slots {
            // Every generating NPC puts one token in each batch.
            return Err(FieldError::new(
                "batch_size",
                format!("{} is below slots {}", self.batch_size, self.slots),
            ));
        }
        if let Some(ubatch) = self.ubatch_size
            && ubatch < self.slots
        {
            return Err(FieldError::new(
                "ubatch_size",
                format!("{ubatch} is below slots {}", self.slots),
            ));
        }
        if self.max_line_chars == 0 {
            return Err(FieldError::new("max_line_chars", "must be at least 1"));
        }
        self.sampling.validate().map_err(|e| e.within("sampling"))
    }
}

/// Where compressed lore is cached: `$XDG_CACHE_HOME/bevy_npc_ai/compressed-lore`, else
/// `$HOME/.cache/…`, else the system's temporary directory.
pub(crate) fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("bevy_npc_ai")
        .join("compressed-lore")
}

/// The cores this process may use (1 when the system cannot say).
fn available_cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}
