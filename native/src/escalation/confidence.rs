//! How sure the local model was of a reply: per-token log-probability and entropy from the
//! logits, summarised into a [`ReplyConfidence`].

use crate::types::ReplyConfidence;

/// Log-probability of `token` and the entropy (nats) of the distribution given by `logits`.
/// `None` when the token is out of range or the logits are not finite. Logits more than 24
/// below the best count as 24 below it (together they weigh less than 10⁻⁵ of it).
#[must_use]
pub fn token_logprob_entropy(logits: &[f32], token: usize) -> Option<(f32, f32)> {
    let chosen = *logits.get(token)?;
    let scan = crate::logits::LogitScan::of(logits)?;
    if !chosen.is_finite() {
        return None;
    }
    #[allow(clippy::cast_possible_truncation)]
    Some((scan.logprob(chosen) as f32, scan.entropy as f32))
}

/// Accumulates token confidence while a reply is generated (one call per sampled token).
#[derive(Clone, Debug, Default)]
pub(crate) struct TokenConfidence {
    logprobs: Vec<f32>,
    entropy_sum: f64,
}

impl TokenConfidence {
    /// Scores the token just sampled from `logits`.
    pub(crate) fn observe(&mut self, logits: &[f32], token: i32) {
        let Ok(token) = usize::try_from(token) else {
            return;
        };
        if let Some((logprob, entropy)) = token_logprob_entropy(logits, token) {
            self.logprobs.push(logprob);
            self.entropy_sum += f64::from(entropy);
        }
    }

    /// The reply's confidence, or `None` before any token.
    pub(crate) fn summary(&self) -> Option<ReplyConfidence> {
        summarize(&self.logprobs, self.entropy_sum)
    }
}

fn summarize(logprobs: &[f32], entropy_sum: f64) -> Option<ReplyConfidence> {
    if logprobs.is_empty() {
        return None;
    }
    let n = logprobs.len();
    let mut sorted = logprobs.to_vec();
    sorted.sort_by(f32::total_cmp);
    let p10 = sorted[(n - 1) / 10].exp();
    Some(ReplyConfidence {
        tokens: n,
        mean_logprob: logprobs.iter().sum::<f32>() / n as f32,
        p10_prob: p10,
        min_prob: sorted[0].exp(),
        mean_entropy: (entropy_sum / n as f64) as f32,
    })
}
