//! The mel filterbank whisper.cpp reads from the model file.
//!
//! Whisper was trained on log-mel features computed with librosa's filterbank: Slaney's mel
//! scale (linear below 1 kHz, logarithmic above) and Slaney area normalisation. The
//! CTranslate2 package does not carry the filters, so they are computed here.

/// A `n_mel × n_fft` filterbank, row-major (one row per mel band over the FFT bins).
#[derive(Debug, Clone, PartialEq)]
pub struct MelFilters {
    /// Number of mel bands.
    pub n_mel: usize,
    /// Number of FFT bins (`1 + window / 2`).
    pub n_fft: usize,
    /// `n_mel * n_fft` weights.
    pub data: Vec<f32>,
}

const F_SP: f64 = 200.0 / 3.0;
const MIN_LOG_HZ: f64 = 1000.0;
const MIN_LOG_MEL: f64 = MIN_LOG_HZ / F_SP;

fn log_step() -> f64 {
    6.4f64.ln() / 27.0
}

fn hz_to_mel(hz: f64) -> f64 {
    if hz >= MIN_LOG_HZ {
        MIN_LOG_MEL + (hz / MIN_LOG_HZ).ln() / log_step()
    } else {
        hz / F_SP
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    if mel >= MIN_LOG_MEL {
        MIN_LOG_HZ * (log_step() * (mel - MIN_LOG_MEL)).exp()
    } else {
        F_SP * mel
    }
}

impl MelFilters {
    /// librosa's `filters.mel(sr=sample_rate, n_fft=window, n_mels=n_mel)` with its defaults
    /// (`fmin = 0`, `fmax = sample_rate / 2`, `htk = False`, `norm = "slaney"`).
    #[must_use]
    pub fn slaney(sample_rate: u32, window: usize, n_mel: usize) -> Self {
        let n_fft = 1 + window / 2;
        let sr = f64::from(sample_rate);
        let fft_freqs: Vec<f64> = (0..n_fft).map(|k| k as f64 * sr / window as f64).collect();
        let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(sr / 2.0));
        let mel_freqs: Vec<f64> = (0..n_mel + 2)
            .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mel + 1) as f64))
            .collect();
        let mut data = Vec::with_capacity(n_mel * n_fft);
        for band in 0..n_mel {
            let (left, centre, right) = (mel_freqs[band], mel_freqs[band + 1], mel_freqs[band + 2]);
            let norm = 2.0 / (right - left);
            for &f in &fft_freqs {
                let rising = (f - left) / (centre - left);
                let falling = (right - f) / (right - centre);
                data.push((rising.min(falling).max(0.0) * norm) as f32);
            }
        }
        Self { n_mel, n_fft, data }
    }

    /// The filters Whisper uses: 16 kHz audio, 400-sample window, `n_mel` bands (80 for all
    /// models before large-v3).
    #[must_use]
    pub fn whisper(n_mel: usize) -> Self {
        Self::slaney(16_000, 400, n_mel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_librosa_reference_values() {
        let filters = MelFilters::whisper(80);
        assert_eq!((filters.n_mel, filters.n_fft), (80, 201));
        // librosa.filters.mel(sr=16000, n_fft=400, n_mels=80)[0, :3]
        assert_eq!(filters.data[0], 0.0);
        assert!(
            (filters.data[1] - 0.024_862_59).abs() < 1e-7,
            "{}",
            filters.data[1]
        );
        assert_eq!(filters.data[2], 0.0);
    }

    #[test]
    fn bands_are_ordered_triangles_of_equal_area() {
        let filters = MelFilters::whisper(80);
        let mut last_peak = 0;
        for band in 0..80 {
            let row = &filters.data[band * 201..(band + 1) * 201];
            assert!(row.iter().all(|&w| w >= 0.0));
            let peak = (0..201).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            assert!(
                peak >= last_peak,
                "band {band} peaks at {peak} before {last_peak}"
            );
            last_peak = peak;
        }
        // Slaney normalisation: each triangle integrates (over Hz) to about 1 once bands are
        // several bins wide (sampling a narrow triangle on 40 Hz bins errs by a few per cent).
        let bin_hz = 16_000.0 / 400.0;
        for band in 40..80 {
            let area: f32 = filters.data[band * 201..(band + 1) * 201]
                .iter()
                .sum::<f32>()
                * bin_hz;
            assert!((area - 1.0).abs() < 0.1, "band {band} area {area}");
        }
    }
}
