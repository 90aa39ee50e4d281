//! [`RuntimeConfig`]: which model, how many threads, how much context.

use std::path::PathBuf;

use crate::sampling::SamplingParams;

/// How the runtime loads and runs its model. Build it with the `with_*` methods.
#[derive(Clone, Debug, PartialEq)]
pub struct RuntimeConfig {
    /// The GGUF model file.
    pub model_path: PathBuf,
    /// Decode threads; `None` uses the machine's available cores. More threads than cores
    /// makes decoding several times slower, so do not oversubscribe.
    pub threads: Option<u32>,
    /// Context tokens per NPC conversation (persona + history + reply).
    pub context_size: u32,
    /// How many NPC conversations keep their KV cache in the context at once and can be
    /// decoded in one batch.
    pub slots: u32,
    /// Most tokens one decode call may carry (long prompts are split into chunks of this size).
    pub batch_size: u32,
    /// Layers offloaded to the GPU; `None` means all of them when a GPU backend (`cuda`,
    /// `vulkan`, `metal`) is compiled in, and none otherwise.
    pub gpu_layers: Option<u32>,
    /// Sampling defaults; personas override them field by field.
    pub sampling: SamplingParams,
    /// Longest player line accepted, in characters.
    pub max_line_chars: usize,
    /// Most prompt tokens processed per step while another NPC is generating: a long prompt
    /// then advances in chunks between that NPC's tokens instead of freezing its speech.
    pub prefill_chunk: u32,
    /// Let llama.cpp print its own log lines to stderr.
    pub llama_logs: bool,
    /// Reuse each NPC's cached tokens across turns (the default). `false` recomputes every
    /// prompt from scratch: only useful as a benchmark baseline.
    pub kv_reuse: bool,
    /// RAM for KV state of NPCs evicted from their slot, in bytes. Past it, the least
    /// recently evicted state is dropped (and recomputed when that NPC speaks again).
    pub evicted_kv_bytes: usize,
    /// The folder persona lore files ([`Persona::lore`](crate::Persona::lore)) are relative
    /// to. Default `assets`, Bevy's asset folder.
    pub assets_dir: PathBuf,
    /// Where compressed lore is cached ([`Persona::compress_lore`](crate::Persona)). Default
    /// `$XDG_CACHE_HOME/bevy_npc_ai/compressed-lore` (or `~/.cache/…`).
    pub cache_dir: PathBuf,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            model_path: PathBuf::from(crate::DEFAULT_MODEL_PATH),
            threads: None,
            context_size: 2048,
            slots: 4,
            batch_size: 512,
            gpu_layers: None,
            sampling: SamplingParams::default(),
            max_line_chars: 2000,
            prefill_chunk: 128,
            llama_logs: false,
            kv_reuse: true,
            evicted_kv_bytes: 256 << 20,
            assets_dir: PathBuf::from("assets"),
            cache_dir: crate::compress::default_cache_dir(),
        }
    }
}

impl RuntimeConfig {
    /// A configuration for the model at `path`, with defaults for everything else.
    #[must_use]
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            ..Self::default()
        }
    }

    /// Sets the model file.
    #[must_use]
    pub fn with_model(mut self, path: impl Into<PathBuf>) -> Self {
        self.model_path = path.into();
        self
    }

    /// Sets the number of decode threads.
    #[must_use]
    pub fn with_threads(mut self, threads: u32) -> Self {
        self.threads = Some(threads);
        self
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

    /// Lets llama.cpp log to stderr (off by default: it is verbose).
    #[must_use]
    pub fn with_llama_logs(mut self, enabled: bool) -> Self {
        self.llama_logs = enabled;
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
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        })
    }

    /// Layers to offload: the configured number, else all (GPU build) or none (CPU build).
    #[must_use]
    pub fn effective_gpu_layers(&self) -> u32 {
        self.gpu_layers.unwrap_or(if crate::GPU_BACKEND.is_some() {
            u32::MAX
        } else {
            0
        })
    }

    /// Checks the numbers before any of them reach llama.cpp.
    ///
    /// # Errors
    /// A sentence naming the offending setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.threads == Some(0) {
            return Err("threads must be at least 1".into());
        }
        if self.context_size < 64 {
            return Err(format!(
                "context_size {} is below 64 tokens",
                self.context_size
            ));
        }
        if !(1..=64).contains(&self.slots) {
            return Err(format!("slots {} is outside 1..=64", self.slots));
        }
        if self.context_size.checked_mul(self.slots).is_none() {
            return Err("context_size × slots overflows".into());
        }
        if self.batch_size < self.slots {
            // Every generating NPC puts one token in each batch.
            return Err(format!(
                "batch_size {} is below slots {}",
                self.batch_size, self.slots
            ));
        }
        if self.max_line_chars == 0 {
            return Err("max_line_chars must be at least 1".into());
        }
        self.sampling
            .validate()
            .map_err(|(field, message)| format!("sampling.{field}: {message}"))
    }
}
