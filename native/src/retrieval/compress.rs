//! Token-level compression of lore (the LLMLingua idea): the local model scores how
//! surprising each token of an entry is given the tokens before it, and only the most
//! informative fraction is kept, in order. Predictable tokens ("the", the second half of a
//! common word) go; names and numbers, which the model cannot guess, stay. Tokens with a
//! digit are always kept, since a price the model cannot read back is a wrong answer.
//!
//! It runs once, when a persona with `compress_lore` is set, in a small context of its own,
//! and its result is cached on disk under a key of the model, the ratio and the texts, so a
//! game pays the cost once per lore version.

use std::path::Path;

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use sha2::{Digest, Sha256};

/// Tokens per entry scored at most; longer entries keep their tail uncompressed.
const MAX_ENTRY_TOKENS: usize = 1024;

/// What a compression run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Compressed {
    /// One text per input text, in order.
    pub(crate) texts: Vec<String>,
    /// Tokens before and after.
    pub(crate) tokens_before: usize,
    pub(crate) tokens_after: usize,
    /// Whether the result came from the disk cache.
    pub(crate) from_cache: bool,
}

/// Compresses each text to about `keep` (0 < keep ≤ 1) of its tokens, using `cache` if it
/// holds this exact job. `model_id` identifies the model (its fingerprint).
pub(crate) fn compress(
    model: &LlamaModel,
    model_id: &str,
    texts: &[String],
    keep: f32,
    threads: u32,
    cache: &Path,
) -> Result<Compressed, String> {
    let mut hasher = Sha256::new();
    hasher.update(model_id.as_bytes());
    hasher.update(keep.to_le_bytes());
    for text in texts {
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
    }
    let key: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let file = cache.join(format!("{key}.ron"));
    if let Some(cached) = std::fs::read_to_string(&file)
        .ok()
        .and_then(|text| ron::from_str::<(Vec<String>, usize, usize)>(&text).ok())
        .filter(|(cached, _, _)| cached.len() == texts.len())
    {
        return Ok(Compressed {
            texts: cached.0,
            tokens_before: cached.1,
            tokens_after: cached.2,
            from_cache: true,
        });
    }
    let result = compress_uncached(model, texts, keep, threads)?;
    // A cache that cannot be written only costs time next load.
    if std::fs::create_dir_all(cache).is_ok()
        && let Ok(text) =
            ron::to_string(&(&result.texts, result.tokens_before, result.tokens_after))
    {
        let partial = cache.join(format!("{key}.ron.partial"));
        if std::fs::write(&partial, text).is_ok() {
            let _ = std::fs::rename(&partial, &file);
        }
    }
    Ok(result)
}

fn compress_uncached(
    model: &LlamaModel,
    texts: &[String],
    keep: f32,
    threads: u32,
) -> Result<Compressed, String> {
    let size = u32::try_from(MAX_ENTRY_TOKENS + 8).expect("small");
    let params = crate::llama::context_params(size, size, size, 1, threads.max(1));
    let mut ctx = model
        .new_context(crate::llama::backend(), params)
        .map_err(|err| format!("no context for compression: {err}"))?;
    let mut batch = LlamaBatch::new(MAX_ENTRY_TOKENS + 8, 1);
    let vocab = model.vocab();
    let mut result = Compressed::default();
    for text in texts {
        let tokens = vocab.tokenize(text.as_bytes(), false, false);
        let scored = tokens.len().min(MAX_ENTRY_TOKENS);
        result.tokens_before += tokens.len();
        if scored < 4 {
            result.tokens_after += tokens.len();
            result.texts.push(text.clone());
            continue;
        }
        ctx.clear_kv_cache();
        batch.clear();
        // BOS first, so the first text token is scored too.
        let bos = vocab.bos();
        batch
            .add(bos, 0, &[0], true)
            .map_err(|err| err.to_string())?;
        for (at, &token) in tokens[..scored].iter().enumerate() {
            let last = at + 1 == scored;
            batch
                .add(
                    token,
                    i32::try_from(at + 1).unwrap_or(i32::MAX),
                    &[0],
                    !last,
                )
                .map_err(|err| err.to_string())?;
        }
        ctx.decode(&mut batch)
            .map_err(|err| format!("compression decode failed: {err}"))?;
        // Surprisal of token `at` comes from the logits at the position before it.
        let mut surprisal: Vec<(f32, usize)> = (0..scored)
            .map(|at| {
                let logits = ctx.get_logits_ith(i32::try_from(at).unwrap_or(0));
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let log_sum = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
                let token = usize::try_from(tokens[at].0).unwrap_or(0);
                (log_sum - logits.get(token).copied().unwrap_or(max), at)
            })
            .collect();
        let pieces: Vec<String> = tokens
            .iter()
            .map(|&token| {
                String::from_utf8_lossy(&vocab.token_to_piece(token, true, None)).into_owned()
            })
            .collect();
        let mut kept = vec![false; tokens.len()];
        for (at, piece) in pieces.iter().enumerate() {
            // Digits always; the unscored tail always.
            kept[at] = at >= scored || piece.chars().any(|c| c.is_ascii_digit());
        }
        let target = ((scored as f32) * keep).ceil() as usize;
        surprisal.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut count = kept[..scored].iter().filter(|&&k| k).count();
        for &(_, at) in &surprisal {
            if count >= target {
                break;
            }
            if !kept[at] {
                kept[at] = true;
                count += 1;
            }
        }
        let compressed: String = pieces
            .iter()
            .zip(&kept)
            .filter(|(_, keep)| **keep)
            .map(|(piece, _)| piece.as_str())
            .collect();
        result.tokens_after += kept.iter().filter(|&&k| k).count();
        result.texts.push(compressed.trim().to_owned());
    }
    Ok(result)
}
