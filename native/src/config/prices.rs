//! What tokens and compute cost: the prices the cost meter ([`CostMeter`](crate::CostMeter))
//! and the escalation spend caps apply.

use std::time::Duration;

/// Prices the meter applies, in one currency (US dollars by default).
#[derive(Clone, Debug, PartialEq)]
pub struct PriceTable {
    /// Currency symbol or code used when printing.
    pub currency: String,
    /// Cloud input (prompt) tokens, per million.
    pub cloud_input_per_million: f64,
    /// Cloud output (completion) tokens, per million.
    pub cloud_output_per_million: f64,
    /// Hardware cost of running the local model, per hour of compute. Local speech
    /// synthesis is priced at the same rate.
    pub local_per_hour: f64,
    /// A cloud text-to-speech voice, per million characters: what the characters the NPCs
    /// spoke locally would have cost there (the meter's comparison; nothing is paid).
    pub cloud_speech_per_million_chars: f64,
    /// The studio's own inference server ([`RemoteConfig`](crate::RemoteConfig)), per
    /// million tokens it computes (prompt tokens its prefix cache did not hold, and output
    /// tokens). Default 0: what a serving cluster costs is the studio's to set
    /// (`docs/serving.md` shows how to size it).
    pub remote_per_million: f64,
}

impl Default for PriceTable {
    /// GPT-4-Turbo-class cloud prices (US$10 per million input tokens, US$30 per million
    /// output tokens, OpenAI's list price for `gpt-4-turbo`) and a consumer GPU at US$0.34
    /// per hour (an RTX 4090 rented on RunPod's community cloud), and a cloud voice at US$15
    /// per million characters (OpenAI's list price for `tts-1`, the cheapest of the big
    /// providers' neural voices; ElevenLabs charges 10–20× that); see docs/benchmarks.md,
    /// sections "Cost meter" and "Voice" for the sources.
    fn default() -> Self {
        Self {
            currency: "$".into(),
            cloud_input_per_million: 10.0,
            cloud_output_per_million: 30.0,
            local_per_hour: 0.34,
            cloud_speech_per_million_chars: 15.0,
            remote_per_million: 0.0,
        }
    }
}

impl PriceTable {
    /// Cost of `input` prompt and `output` completion tokens sent to the cloud.
    #[must_use]
    pub fn cloud_cost(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.cloud_input_per_million
            + output as f64 * self.cloud_output_per_million)
            / 1e6
    }

    /// Cost of `tokens` computed on the studio's inference server.
    #[must_use]
    pub fn remote_cost(&self, tokens: u64) -> f64 {
        tokens as f64 * self.remote_per_million / 1e6
    }

    /// What `characters` of speech would cost on the cloud voice.
    #[must_use]
    pub fn cloud_speech_cost(&self, characters: u64) -> f64 {
        characters as f64 * self.cloud_speech_per_million_chars / 1e6
    }

    /// Cost of `compute` spent on the local model.
    #[must_use]
    pub fn local_cost(&self, compute: Duration) -> f64 {
        compute.as_secs_f64() / 3600.0 * self.local_per_hour
    }
}
