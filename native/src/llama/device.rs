//! Where the model runs: on the GPU with the layers that fit, or on the CPU with the reason.
//!
//! A game runs on whatever GPU its player has. A GPU backend that finds no device, a model
//! that does not fit the device's free memory, a load or a KV cache allocation that fails on
//! the device: each is a reason to run on the CPU instead, said in
//! [`ModelInfo::cpu_fallback`](crate::ModelInfo::cpu_fallback), never a failed load.

use std::ffi::CString;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::{LlamaBackendDeviceType, list_llama_ggml_backend_devices};

use super::model::check_gguf;
use super::{backend, load_model, worker_context_params};
use crate::config::{GPU_BACKEND, RuntimeConfig};
use crate::types::ModelError;

/// What [`ModelInfo::device`](crate::ModelInfo::device) says of a model on the CPU.
pub(crate) const CPU_DEVICE: &str = "CPU";

/// What [`ModelInfo::device`](crate::ModelInfo::device) says when no weights are loaded
/// ([`RemoteConfig::local_model`](crate::RemoteConfig::local_model) off).
pub(crate) const NO_DEVICE: &str = "none";

/// Memory left free on each device when the layers are fitted: other programs' and the
/// game's own (textures, the frame) use the GPU too.
const FIT_MARGIN_BYTES: usize = 512 * 1024 * 1024;

/// llama.cpp's `GGML_LOG_LEVEL_ERROR`: the fit's own progress lines are debug output.
const LOG_LEVEL_ERROR: u32 = 4;

/// A loaded model and where it runs.
pub(crate) struct Placed {
    /// The model.
    pub(crate) model: LlamaModel,
    /// The configuration the worker runs with: the one given, with
    /// [`gpu_layers`](RuntimeConfig::gpu_layers) set to the layers loaded (0 on the CPU), so
    /// every default that depends on the device (micro-batch, reproducible batching, step
    /// time) follows where the model really is.
    pub(crate) config: RuntimeConfig,
    /// The device, as [`ModelInfo::device`](crate::ModelInfo::device) reports it.
    pub(crate) device: String,
    /// Why the model runs on the CPU although GPU layers were asked for.
    pub(crate) cpu_fallback: Option<String>,
}

/// Loads the model where `config` asks: on the CPU when it asks for no GPU layer; else on the
/// GPU, as many layers as it names or (`gpu_layers: None`) as fit the device's free memory,
/// falling back to the CPU when that cannot be done. File errors (missing, not GGUF) are not
/// retried: the CPU would refuse the file as well.
/// The model file's vocabulary and chat template alone, no weights (a runtime whose every
/// reply comes from the inference server), checked as a full load is.
pub(crate) fn load_vocabulary(config: &RuntimeConfig, path: &Path) -> Result<Placed, ModelError> {
    config.validate().map_err(ModelError::Config)?;
    check_gguf(path)?;
    let params = LlamaModelParams::default().with_vocab_only(true);
    let model = LlamaModel::load_from_file(backend(), path, &params).map_err(|err| {
        ModelError::LoadFailed {
            path: path.to_path_buf(),
            reason: err.to_string(),
        }
    })?;
    Ok(Placed {
        model,
        config: config.clone().with_gpu_layers(0),
        device: NO_DEVICE.to_owned(),
        cpu_fallback: None,
    })
}

pub(crate) fn load_placed(
    config: &RuntimeConfig,
    path: &Path,
    stopping: &Arc<AtomicBool>,
) -> Result<Placed, ModelError> {
    let on_cpu = |reason: Option<String>| {
        if let Some(reason) = &reason {
            tracing::warn!("the model runs on the CPU: {reason}");
        }
        let config = config.clone().with_gpu_layers(0);
        let model = load_model(&config, path, stopping)?;
        Ok(Placed {
            model,
            config,
            device: CPU_DEVICE.to_owned(),
            cpu_fallback: reason,
        })
    };
    if config.effective_gpu_layers() == 0 {
        return on_cpu(None);
    }
    let Some(backend_name) = GPU_BACKEND else {
        return on_cpu(Some(
            "this build has no GPU backend (features cuda, vulkan, metal)".to_owned(),
        ));
    };
    let Some(gpu) = gpu_device() else {
        return on_cpu(Some(format!("the {backend_name} backend found no GPU")));
    };
    // Checked before the fit reads the file, as before any load: a fit and a load would fail
    // on bad settings with a worse message, and llama.cpp aborts on some bad files.
    config.validate().map_err(ModelError::Config)?;
    check_gguf(path)?;
    let layers = match config.gpu_layers {
        Some(layers) => layers,
        None => match fitted_layers(config, path) {
            Ok(0) => return on_cpu(Some(format!("no layer fits in the free memory of {gpu}"))),
            Ok(layers) => layers,
            Err(reason) => return on_cpu(Some(format!("fitting the model to {gpu}: {reason}"))),
        },
    };
    let gpu_config = config.clone().with_gpu_layers(layers);
    let model = match load_model(&gpu_config, path, stopping) {
        Ok(model) => model,
        Err(err) if stopping.load(Ordering::Relaxed) => return Err(err),
        Err(ModelError::LoadFailed { reason, .. }) => {
            return on_cpu(Some(format!("loading on {gpu} failed: {reason}")));
        }
        Err(err) => return Err(err),
    };
    // The KV cache and the compute buffers are allocated with the context: a device with
    // room for the weights but not for them fails here, and the CPU is tried instead. The
    // probe's buffers are freed before the worker makes its own context.
    let probe = model
        .new_context(backend(), worker_context_params(&gpu_config))
        .map(drop)
        .map_err(|err| err.to_string());
    if let Err(err) = probe {
        drop(model);
        return on_cpu(Some(format!("the context does not fit on {gpu}: {err}")));
    }
    Ok(Placed {
        model,
        config: gpu_config,
        device: gpu,
        cpu_fallback: None,
    })
}

/// The first GPU llama.cpp's backends found, as "name (description)"; `None` without one.
/// With several, llama.cpp splits the layers over all of them and this names the first.
fn gpu_device() -> Option<String> {
    let gpus: Vec<_> = list_llama_ggml_backend_devices()
        .into_iter()
        .filter(|device| {
            matches!(
                device.device_type,
                LlamaBackendDeviceType::Gpu | LlamaBackendDeviceType::IntegratedGpu
            )
        })
        .collect();
    let first = gpus.first()?;
    let more = match gpus.len() {
        1 => String::new(),
        n => format!(" and {} more", n - 1),
    };
    Some(format!("{} ({}){more}", first.name, first.description))
}

/// The layers of the model at `path` that fit the GPUs' free memory beside the worker's KV
/// cache and compute buffers (llama.cpp's own fit, which measures them without allocating);
/// `u32::MAX` when all of them do. The fit puts its own log callback in llama.cpp's
/// process-wide slot while it runs and restores the previous one after; a second runtime
/// loading at the same moment logs through it meanwhile.
fn fitted_layers(config: &RuntimeConfig, path: &Path) -> Result<u32, String> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| "the model path holds a NUL byte".to_owned())?;
    let mut cparams = worker_context_params(config);
    let n_ctx = cparams.n_ctx().map_or(0, std::num::NonZeroU32::get);
    let mut params = pin!(LlamaModelParams::default());
    let mut margins = vec![FIT_MARGIN_BYTES; llama_cpp_2::max_devices()];
    params
        .as_mut()
        .fit_params(&path, &mut cparams, &mut margins, n_ctx, LOG_LEVEL_ERROR)
        .map_err(|err| err.to_string())?;
    // A negative count is llama.cpp's "all of them".
    Ok(u32::try_from(params.n_gpu_layers()).unwrap_or(u32::MAX))
}
