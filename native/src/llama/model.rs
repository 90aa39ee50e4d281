//! Loading a model: the file is checked before llama.cpp sees it.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

use crate::config::RuntimeConfig;
use crate::types::ModelError;

/// Checks the file before llama.cpp sees it (llama.cpp may abort on some bad input), then
/// loads it; gives up as soon as `stopping` is set (the game is quitting).
pub(crate) fn load_model(
    config: &RuntimeConfig,
    path: &Path,
    stopping: &Arc<AtomicBool>,
) -> Result<LlamaModel, ModelError> {
    config.validate().map_err(ModelError::Config)?;
    check_gguf(path)?;
    let stop = Arc::clone(stopping);
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(config.effective_gpu_layers())
        .with_progress_callback(move |_| !stop.load(Ordering::Relaxed));
    LlamaModel::load_from_file(super::backend(), path, &params).map_err(|err| {
        ModelError::LoadFailed {
            path: path.to_path_buf(),
            reason: err.to_string(),
        }
    })
}

/// A file named like a catalog model should be that model: a vocabulary or end-of-turn token
/// other than the catalog's means another file under its name (the runtime still uses it,
/// with the template the file carries, and warns).
pub(crate) fn check_catalog_expectations(model: &LlamaModel, entry: &crate::catalog::CatalogModel) {
    if let Some(mismatch) = catalog_mismatch(model, entry) {
        tracing::warn!(
            "{} is named like the catalog's {} but does not match it ({mismatch}): is it \
             another file?",
            entry.file_name,
            entry.id
        );
    }
}

/// How `model` differs from what the catalog says of `entry`, if it does.
fn catalog_mismatch(model: &LlamaModel, entry: &crate::catalog::CatalogModel) -> Option<String> {
    let expected = &entry.chat_template;
    if model.n_vocab() != expected.vocab_size {
        return Some(format!(
            "vocabulary of {} tokens, expected {}",
            model.n_vocab(),
            expected.vocab_size
        ));
    }
    let end_of_turn = LlamaToken(expected.end_of_turn_id);
    let vocab = model.vocab();
    let text = String::from_utf8_lossy(&vocab.token_to_piece(end_of_turn, true, None)).into_owned();
    if !vocab.is_eog(end_of_turn) || text != expected.end_of_turn {
        return Some(format!(
            "token {} is {text:?}, expected the end of turn {}",
            expected.end_of_turn_id, expected.end_of_turn
        ));
    }
    None
}

/// The file at `path` exists and starts with the GGUF magic bytes.
pub(crate) fn check_gguf(path: &Path) -> Result<(), ModelError> {
    let mut file = File::open(path).map_err(|_| ModelError::NotFound(path.to_path_buf()))?;
    if !file.metadata().is_ok_and(|meta| meta.is_file()) {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == b"GGUF" => Ok(()),
        _ => Err(ModelError::NotGguf(path.to_path_buf())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every catalog model whose file the setup fetched matches its entry (vocabulary size,
    /// end-of-turn token), and a file under another model's entry does not.
    #[test]
    fn the_fetched_catalog_models_match_their_entries() {
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets");
        let params = LlamaModelParams::default().with_vocab_only(true);
        let mut checked = 0;
        for entry in crate::catalog::MODELS {
            let path = assets.join(entry.asset_path());
            if !path.is_file() {
                continue;
            }
            let model =
                LlamaModel::load_from_file(crate::llama::backend(), &path, &params).unwrap();
            assert_eq!(catalog_mismatch(&model, entry), None, "{}", entry.id);
            let other = crate::catalog::MODELS
                .iter()
                .find(|other| other.chat_template != entry.chat_template)
                .unwrap();
            assert!(
                catalog_mismatch(&model, other).is_some(),
                "{} as {}",
                entry.id,
                other.id
            );
            checked += 1;
        }
        // `cargo xtask test` fetches the default and the test model.
        assert!(
            checked >= 2,
            "only {checked} catalog models are in {}",
            assets.display()
        );
    }
}
