//! Mono PCM buffers: WAV parsing and resampling.

/// Mono audio.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pcm {
    /// Samples per second.
    pub sample_rate: u32,
    /// Samples in `[-1, 1]`.
    pub samples: Vec<f32>,
}

impl Pcm {
    /// Length in seconds.
    #[must_use]
    pub fn seconds(&self) -> f64 {
        if self.sample_rate == 0 {
            0.0
        } else {
            self.samples.len() as f64 / f64::from(self.sample_rate)
        }
    }

    /// Root-mean-square level.
    #[must_use]
    pub fn rms(&self) -> f32 {
        if self.samples.is_empty() {
            return 0.0;
        }
        (self.samples.iter().map(|s| s * s).sum::<f32>() / self.samples.len() as f32).sqrt()
    }

    /// Parses a RIFF/WAVE file of 16-bit integer or 32-bit float PCM, mixing channels down
    /// to mono. A data chunk whose declared length runs past the end (as when a tool streams
    /// WAV to a pipe and cannot seek back to fix the header) is read to the end of the input.
    pub fn from_wav(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
            return Err("not a RIFF/WAVE file".into());
        }
        let mut pos = 12;
        let mut format = None;
        while pos + 8 <= bytes.len() {
            let id = &bytes[pos..pos + 4];
            let declared = u32::from_le_bytes([
                bytes[pos + 4],
                bytes[pos + 5],
                bytes[pos + 6],
                bytes[pos + 7],
            ]) as usize;
            let body = &bytes[pos + 8..];
            let len = declared.min(body.len());
            match id {
                b"fmt " if len >= 16 => {
                    let u16_at = |i: usize| u16::from_le_bytes([body[i], body[i + 1]]);
                    let rate = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
                    format = Some((u16_at(0), u16_at(2), rate, u16_at(14)));
                }
                b"data" => {
                    let (tag, channels, rate, bits) =
                        format.ok_or("WAV data before its fmt chunk")?;
                    let channels = usize::from(channels.max(1));
                    let frames: Vec<f32> = match (tag, bits) {
                        (1, 16) => body[..len - len % 2]
                            .chunks_exact(2)
                            .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
                            .collect(),
                        (3, 32) => body[..len - len % 4]
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect(),
                        _ => {
                            return Err(format!(
                                "unsupported WAV encoding (format {tag}, {bits} bits)"
                            ));
                        }
                    };
                    let samples = frames
                        .chunks_exact(channels)
                        .map(|frame| frame.iter().sum::<f32>() / channels as f32)
                        .collect();
                    return Ok(Self {
                        sample_rate: rate,
                        samples,
                    });
                }
                _ => {}
            }
            pos += 8 + len + len % 2;
        }
        Err("WAV file has no data chunk".into())
    }

    /// This audio as a RIFF/WAVE file: mono, 16-bit integer PCM, samples clamped to `[-1, 1]`.
    #[must_use]
    pub fn to_wav(&self) -> Vec<u8> {
        let data_len = u32::try_from(self.samples.len() * 2).unwrap_or(u32::MAX - 1);
        let samples = &self.samples[..data_len as usize / 2];
        let mut out = Vec::with_capacity(44 + data_len as usize);
        out.extend_from_slice(b"RIFF");
        out.extend_from_slice(&data_len.saturating_add(36).to_le_bytes());
        out.extend_from_slice(b"WAVEfmt ");
        out.extend_from_slice(&16u32.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes()); // integer PCM
        out.extend_from_slice(&1u16.to_le_bytes()); // mono
        out.extend_from_slice(&self.sample_rate.to_le_bytes());
        out.extend_from_slice(&self.sample_rate.saturating_mul(2).to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes()); // bytes per frame
        out.extend_from_slice(&16u16.to_le_bytes());
        out.extend_from_slice(b"data");
        out.extend_from_slice(&data_len.to_le_bytes());
        for sample in samples {
            // In range after the clamp, so the cast cannot wrap.
            #[allow(clippy::cast_possible_truncation)]
            let value = (sample.clamp(-1.0, 1.0) * 32767.0).round() as i16;
            out.extend_from_slice(&value.to_le_bytes());
        }
        out
    }

    /// This audio at `rate` samples per second (windowed-sinc interpolation, low-passed at the
    /// lower of the two Nyquist frequencies so downsampling does not alias).
    #[must_use]
    pub fn resampled(&self, rate: u32) -> Self {
        if rate == self.sample_rate || self.samples.is_empty() || self.sample_rate == 0 || rate == 0
        {
            return Self {
                sample_rate: rate,
                samples: self.samples.clone(),
            };
        }
        const HALF_TAPS: i64 = 16;
        let ratio = f64::from(rate) / f64::from(self.sample_rate);
        let cutoff = ratio.min(1.0);
        let out_len = (self.samples.len() as f64 * ratio).round() as usize;
        let src = &self.samples;
        let samples = (0..out_len)
            .map(|i| {
                let t = i as f64 / ratio;
                let centre = t.floor() as i64;
                let mut acc = 0.0f64;
                let mut norm = 0.0f64;
                for j in centre - HALF_TAPS + 1..=centre + HALF_TAPS {
                    let x = t - j as f64;
                    let arg = std::f64::consts::PI * x * cutoff;
                    let sinc = if arg.abs() < 1e-9 {
                        1.0
                    } else {
                        arg.sin() / arg
                    };
                    let window = 0.5 + 0.5 * (std::f64::consts::PI * x / HALF_TAPS as f64).cos();
                    let weight = sinc * window;
                    norm += weight;
                    if let Some(&s) = usize::try_from(j).ok().and_then(|j| src.get(j)) {
                        acc += weight * f64::from(s);
                    }
                }
                if norm.abs() > 1e-9 {
                    (acc / norm) as f32
                } else {
                    0.0
                }
            })
            .collect();
        Self {
            sample_rate: rate,
            samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav16(rate: u32, samples: &[i16], declared: Option<u32>) -> Vec<u8> {
        let data_len = declared.unwrap_or((samples.len() * 2) as u32);
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&(36 + data_len).to_le_bytes());
        out.extend_from_slice(b"WAVEfmt ");
        out.extend_from_slice(&16u32.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&rate.to_le_bytes());
        out.extend_from_slice(&(rate * 2).to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&16u16.to_le_bytes());
        out.extend_from_slice(b"data");
        out.extend_from_slice(&data_len.to_le_bytes());
        for s in samples {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out
    }

    #[test]
    fn parses_wav_including_streamed_headers() {
        let pcm = Pcm::from_wav(&wav16(22050, &[0, 16384, -32768], None)).unwrap();
        assert_eq!(pcm.sample_rate, 22050);
        assert_eq!(pcm.samples, vec![0.0, 0.5, -1.0]);
        let streamed = Pcm::from_wav(&wav16(22050, &[0, 16384], Some(u32::MAX))).unwrap();
        assert_eq!(streamed.samples, vec![0.0, 0.5]);
        assert!(Pcm::from_wav(b"RIFF....AVI ").is_err());
        assert!(Pcm::from_wav(&[]).is_err());
    }

    #[test]
    fn written_wav_reads_back() {
        let pcm = Pcm {
            sample_rate: 16_000,
            samples: vec![0.0, 0.5, -0.25, 1.0, -1.0, 2.0],
        };
        let back = Pcm::from_wav(&pcm.to_wav()).unwrap();
        assert_eq!(back.sample_rate, 16_000);
        assert_eq!(back.samples.len(), 6);
        let expected = [0.0, 0.5, -0.25, 1.0, -1.0, 1.0];
        for (got, want) in back.samples.iter().zip(expected) {
            assert!((got - want).abs() < 1e-3, "{got} vs {want}");
        }
        assert_eq!(
            Pcm::from_wav(&Pcm::default().to_wav()).unwrap().samples,
            Vec::<f32>::new()
        );
    }

    #[test]
    fn resampling_keeps_length_and_a_tone_below_nyquist() {
        let rate = 22050;
        let tone: Vec<f32> = (0..rate)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / rate as f32).sin() * 0.5)
            .collect();
        let pcm = Pcm {
            sample_rate: rate,
            samples: tone,
        };
        let down = pcm.resampled(16_000);
        assert_eq!(down.samples.len(), 16_000);
        assert!(
            (down.rms() - pcm.rms()).abs() < 0.01,
            "{} vs {}",
            down.rms(),
            pcm.rms()
        );
        // A 10 kHz tone is above the new Nyquist (8 kHz) and must be filtered out.
        let high: Vec<f32> = (0..rate)
            .map(|i| (2.0 * std::f32::consts::PI * 10_000.0 * i as f32 / rate as f32).sin() * 0.5)
            .collect();
        let filtered = Pcm {
            sample_rate: rate,
            samples: high,
        }
        .resampled(16_000);
        assert!(filtered.rms() < 0.05, "aliasing: {}", filtered.rms());
    }
}
