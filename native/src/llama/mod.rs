//! llama.cpp, behind the few calls the runtime makes: the process-wide backend, model
//! loading with the checks llama.cpp does not make, and context parameters.

mod model;
pub(crate) mod prompt;

use std::num::NonZeroU32;
use std::sync::OnceLock;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;

pub(crate) use model::{check_catalog_expectations, load_model};

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

/// One throwaway decode at load time, so the first player line does not pay for llama.cpp's
/// first-run costs (buffer allocation, cold caches).
pub(crate) fn warm_up(model: &LlamaModel, ctx: &mut LlamaContext<'_>) {
    let mut batch = LlamaBatch::new(1, 1);
    if batch.add(model.vocab().bos(), 0, &[0], true).is_ok() {
        let _ = ctx.decode(&mut batch);
    }
    ctx.clear_kv_cache();
}
