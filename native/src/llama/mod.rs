//! llama.cpp, behind the few calls the runtime makes: the process-wide backend, model
//! loading with the checks llama.cpp does not make, and context parameters.

pub(crate) mod adapter;
mod device;
mod gguf;
mod model;
pub(crate) mod prompt;

use std::num::NonZeroU32;
use std::sync::OnceLock;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;

pub(crate) use device::{NO_DEVICE, Placed, load_placed, load_vocabulary};
pub(crate) use model::{check_catalog_expectations, load_model};

use crate::config::{KvPrecision, RuntimeConfig};

/// llama.cpp's `LLAMA_FLASH_ATTN_TYPE_ENABLED`.
pub(crate) const FLASH_ATTENTION_ENABLED: i32 = 1;
/// `LLAMA_FLASH_ATTN_TYPE_DISABLED`.
pub(crate) const FLASH_ATTENTION_DISABLED: i32 = 0;

/// llama.cpp's backend may be initialised once per process at a time; every runtime in the
/// process shares this one, and it lives until the process exits.
pub(crate) fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND
        .get_or_init(|| LlamaBackend::init().expect("the llama backend is only initialised here"))
}

/// The parameters of a context with room for `sequences` sequences of `n_ctx / sequences`
/// tokens, decoding up to `batch` tokens per call in micro-batches of `ubatch`, on
/// `threads` threads: one helper for the worker's, the summarizer's and the compressor's.
pub(crate) fn context_params(
    n_ctx: u32,
    batch: u32,
    ubatch: u32,
    sequences: u32,
    threads: u32,
) -> LlamaContextParams {
    let threads = i32::try_from(threads).unwrap_or(i32::MAX).max(1);
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_seq_max(sequences)
        .with_n_batch(batch)
        .with_n_ubatch(ubatch)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
}

/// The worker's context for `config`: every slot's conversation, kept apart (not unified),
/// with the KV precision's and the flash-attention setting's attention kernels.
pub(crate) fn worker_context_params(config: &RuntimeConfig) -> LlamaContextParams {
    let params = context_params(
        config.context_size * config.slots,
        config.batch_size,
        config.effective_ubatch_size(),
        config.slots,
        config.effective_threads(),
    )
    .with_kv_unified(false);
    match config.kv_precision {
        // llama.cpp's CPU flash attention takes a different kernel for one sequence's single
        // query (the keys split across threads) than for several sequences at once.
        KvPrecision::F16 if config.reproducible_batching_applies() => {
            params.with_flash_attention_policy(FLASH_ATTENTION_DISABLED)
        }
        KvPrecision::F16 => match config.flash_attention {
            Some(true) => params.with_flash_attention_policy(FLASH_ATTENTION_ENABLED),
            Some(false) => params.with_flash_attention_policy(FLASH_ATTENTION_DISABLED),
            None => params,
        },
        // Quantized V needs flash attention; K follows V so both halves shrink alike.
        precision => {
            let kind = match precision {
                KvPrecision::Q4_0 => KvCacheType::Q4_0,
                _ => KvCacheType::Q8_0,
            };
            params
                .with_flash_attention_policy(FLASH_ATTENTION_ENABLED)
                .with_type_k(kind)
                .with_type_v(kind)
        }
    }
}

/// One throwaway decode at load time, so the first player line does not pay for llama.cpp's
/// first-run costs (buffer allocation, cold caches).
pub(crate) fn warm_up(model: &LlamaModel, ctx: &mut LlamaContext<'_>) {
    let mut batch = LlamaBatch::new(1, 1);
    if batch.add(model.vocab().bos(), 0, &[0], true).is_ok() {
        let _ = ctx.decode(&mut batch);
    }
    ctx.clear_kv_cache();
}
