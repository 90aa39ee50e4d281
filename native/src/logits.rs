//! Work over a step's logits (one float per vocabulary entry: 151,936 for Qwen2.5), done once
//! per generated token, so it is written to stay a small fraction of the decode: passes the
//! compiler vectorizes, no allocation per token.
//!
//! - [`LogitScan`]: the maximum, the softmax normalizer and the entropy, for the token
//!   confidence the escalation reads.
//! - [`top_candidates`]: the few tokens a sampler chain can pick from (a chain that starts with
//!   top-k, or with a repeat penalty before top-k or greedy), so that llama.cpp's chain runs
//!   over them instead of over the whole vocabulary.

use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;

/// Logits more than this far below the best one count in the normalizer as if they were
/// exactly this far below (so the exponential needs no range check): each weighs at most
/// e⁻²⁴ ≈ 4·10⁻¹¹ of the best token, 6·10⁻⁶ of it summed over 151,936 entries, so the
/// log-probability moves by under 10⁻⁵ nats and the entropy by under 2·10⁻⁴.
pub(crate) const NEGLIGIBLE_LOGIT: f32 = 24.0;

/// Lanes the passes below work in (the compiler maps them onto SIMD registers).
const LANES: usize = 16;

/// The maximum of `logits`, ignoring NaN; `-inf` for an empty slice.
pub(crate) fn max_logit(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &logit) in lanes.iter_mut().zip(chunk) {
            // A comparison, not `f32::max`: it vectorizes (NaN compares false and is skipped).
            if logit > *lane {
                *lane = logit;
            }
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &logit in lanes.iter().chain(chunks.remainder()) {
        if logit > max {
            max = logit;
        }
    }
    max
}

/// `e^x` for `x` in `[-NEGLIGIBLE_LOGIT, 0]`, to under 5·10⁻⁶ relative: `x·log₂e = n + f`
/// with `n` an integer and `|f| ≤ 1/2`, a degree-4 polynomial for `2^f` (fitted for the least
/// worst-case relative error over that range, 2.6·10⁻⁶), and `2^n` built in the exponent
/// bits. Rounding `x·log₂e` to f32 adds up to 1.7·10⁻⁶ more at the far end of the range
/// (4.3·10⁻⁶ in all at -24). Branch-free, so a loop over it vectorizes.
///
/// The score needs no more: its f32 lanes, each summing about 9,500 terms, round the sums by
/// more than that (the scan's error against f64 is the same as with a degree-6 polynomial).
/// Reducing in base 2 (one multiply, no two-part `ln 2`), two fewer polynomial terms and the
/// clamp below cut the scan of 151,936 logits from 116 to 75 µs on an AMD EPYC core, the
/// logits in cache (docs/benchmarks.md, "Host work per step").
#[inline(always)]
fn exp_negative(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Round to nearest by adding and removing 1.5·2²³ (no libm call, so it vectorizes on any
    // x86-64; `f32::round` needs SSE4.1 to be inlined).
    const ROUND: f32 = 12_582_912.0;
    let t = x * LOG2E;
    let rounded = t + ROUND;
    let f = t - (rounded - ROUND);
    let p = 0.999_999_3
        + f * (0.693_121_85 + f * (0.240_247_44 + f * (0.055_917_677 + f * 0.009_570_022)));
    // `rounded` is ROUND + n exactly (its unit in the last place is 1), so its low bits hold
    // n: 2^n comes from integer operations alone. A float-to-integer cast (`n as i32`)
    // saturates and checks for NaN in Rust, which kept this loop from vectorizing and made
    // the whole scan 2.6x slower. n ≥ -35 here, so the biased exponent stays in range.
    let biased = rounded
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    p * scale
}

/// What one pass over a step's logits says about the distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LogitScan {
    /// The largest logit.
    pub(crate) max: f32,
    /// `log Σ exp(logit - max)`, each logit at most [`NEGLIGIBLE_LOGIT`] below the max.
    pub(crate) log_z: f64,
    /// Entropy of the distribution, in nats.
    pub(crate) entropy: f64,
}

impl LogitScan {
    /// Scans `logits`; `None` if they hold no finite maximum.
    pub(crate) fn of(logits: &[f32]) -> Option<Self> {
        let max = max_logit(logits);
        if !max.is_finite() {
            return None;
        }
        // Σ e^d and Σ e^d·d with d = logit - max, in f32 lanes summed in f64 at the end.
        let mut sums = [0f32; LANES];
        let mut weighted = [0f32; LANES];
        let floor = -NEGLIGIBLE_LOGIT;
        let term = |logit: f32| {
            // Far-below logits (and NaN, which `max` drops: it compares false) count as
            // `floor` below the best. A comparison, not `f32::max`, whose NaN rule costs
            // two more vector instructions a lane.
            let d = logit - max;
            let d = if d > floor { d } else { floor };
            let e = exp_negative(d);
            (e, e * d)
        };
        let mut chunks = logits.chunks_exact(LANES);
        for chunk in &mut chunks {
            for ((sum, weight), &logit) in sums.iter_mut().zip(weighted.iter_mut()).zip(chunk) {
                let (e, ed) = term(logit);
                *sum += e;
                *weight += ed;
            }
        }
        let (mut sum, mut weight) = (0f64, 0f64);
        for (s, w) in sums.iter().zip(&weighted) {
            sum += f64::from(*s);
            weight += f64::from(*w);
        }
        for &logit in chunks.remainder() {
            let (e, ed) = term(logit);
            sum += f64::from(e);
            weight += f64::from(ed);
        }
        let log_z = sum.ln();
        Some(Self {
            max,
            log_z,
            entropy: (log_z - weight / sum).max(0.0),
        })
    }

    /// The log-probability of a token with this logit.
    pub(crate) fn logprob(&self, logit: f32) -> f64 {
        f64::from(logit - self.max) - self.log_z
    }
}

/// Fills `out` with the `k` highest logits' tokens (all of them if `k` reaches the
/// vocabulary size), in token-id order as llama.cpp lays out a full candidate array, so a
/// sampler chain breaks ties the same way.
///
/// One pass with a rising bar: blocks of [`LANES`] logits whose best is below the bar are
/// skipped after one vectorized comparison; the others add their tokens at or above the
/// bar, and whenever `4k` tokens are held, the `k`-th best of them becomes the new bar.
/// The bar quickly reaches the top of the distribution, so nearly every block is skipped.
pub(crate) fn top_candidates(logits: &[f32], k: usize, out: &mut Vec<LlamaTokenData>) {
    out.clear();
    let k = k.max(1);
    let best_first = |a: &LlamaTokenData, b: &LlamaTokenData| b.logit().total_cmp(&a.logit());
    let mut bar = f32::NEG_INFINITY;
    for (block, chunk) in logits.chunks(LANES).enumerate() {
        // `fold`, not `any`: no early exit, so the comparisons vectorize.
        #[allow(clippy::unnecessary_fold)]
        if !chunk
            .iter()
            .fold(false, |seen, &logit| seen | (logit >= bar))
        {
            continue;
        }
        for (at, &logit) in chunk.iter().enumerate() {
            if logit >= bar {
                #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
                let id = (block * LANES + at) as i32;
                out.push(LlamaTokenData::new(LlamaToken(id), logit, 0.0));
            }
        }
        if out.len() >= 4 * k {
            // The k best so far are the first k; the k-th is the new bar. Ties with it may
            // join later: the final cut below keeps exactly `k`.
            out.select_nth_unstable_by(k - 1, best_first);
            out.truncate(k);
            bar = out[k - 1].logit();
        }
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, best_first);
        out.truncate(k);
    }
    out.sort_unstable_by_key(|data| data.id().0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: f64 throughout, every logit.
    fn exact(logits: &[f32]) -> (f64, f64, f64) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        let weighted: f64 = logits
            .iter()
            .map(|&l| {
                let d = f64::from(l - max);
                d.exp() * d
            })
            .sum();
        (f64::from(max), sum.ln(), sum.ln() - weighted / sum)
    }

    /// A vocabulary-sized spread of logits, deterministic.
    fn spread(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 * 30.0 - 10.0
            })
            .collect()
    }

    #[test]
    fn exp_is_accurate_over_its_range() {
        let mut x = -NEGLIGIBLE_LOGIT;
        while x <= 0.0 {
            let (got, want) = (f64::from(exp_negative(x)), f64::from(x).exp());
            assert!((got - want).abs() <= 5e-6 * want, "{x}: {got} vs {want}");
            x += 0.001;
        }
    }

    #[test]
    fn the_scan_matches_the_exact_sums() {
        for (n, seed) in [(151_936, 1), (49_152, 2), (37, 3), (1, 4)] {
            let mut logits = spread(n, seed);
            if n > 10 {
                logits[n / 3] = 31.5; // one clear favourite
            }
            let scan = LogitScan::of(&logits).unwrap();
            let (max, log_z, entropy) = exact(&logits);
            assert_eq!(f64::from(scan.max), max);
            assert!(
                (scan.log_z - log_z).abs() < 1e-4,
                "{n}: {} vs {log_z}",
                scan.log_z
            );
            assert!(
                (scan.entropy - entropy).abs() < 1e-3,
                "{n}: {} vs {entropy}",
                scan.entropy
            );
        }
        assert_eq!(LogitScan::of(&[f32::NAN, f32::NAN]), None);
        assert_eq!(LogitScan::of(&[]), None);
        let with_nan = LogitScan::of(&[1.0, f32::NAN, 3.0]).unwrap();
        assert_eq!(with_nan.max, 3.0);
    }

    #[test]
    fn the_top_candidates_are_the_k_best_in_id_order() {
        let mut out = Vec::new();
        for (k, seed) in [(1, 7), (40, 8), (104, 9), (5000, 10)] {
            let mut logits = spread(151_936, seed);
            // A peaked distribution as well as a flat one.
            if seed % 2 == 0 {
                for (at, logit) in logits.iter_mut().enumerate().step_by(997) {
                    *logit = 40.0 + (at % 13) as f32;
                }
            }
            top_candidates(&logits, k, &mut out);
            assert_eq!(out.len(), k);
            let mut sorted: Vec<f32> = logits.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            assert!(out.iter().all(|d| d.logit() >= kth));
            assert!(out.windows(2).all(|w| w[0].id().0 < w[1].id().0));
        }
        // Fewer logits than asked for: all of them.
        top_candidates(&[0.5, -100.0, f32::NAN, 2.0], 10, &mut out);
        assert_eq!(out.len(), 3, "NaN is never a candidate");
    }
}
