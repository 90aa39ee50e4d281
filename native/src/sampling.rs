//! Sampling settings (runtime defaults and per-persona overrides), the llama.cpp sampler chain
//! they build, and the stop-string filter that keeps stop text out of a streamed reply.

use llama_cpp_2::sampling::LlamaSampler;
use serde::{Deserialize, Serialize};

use crate::types::FieldError;

/// Complete sampling settings for one reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Softmax temperature; `0.0` picks the most likely token every time (greedy).
    pub temperature: f32,
    /// Keep only this many most likely tokens before the other filters (`0` disables it).
    /// Also keeps sampling fast: the later filters then sort 40 candidates, not the vocabulary.
    pub top_k: i32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability adds up to this.
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one.
    pub min_p: f32,
    /// Penalty for repeating recent tokens; `1.0` disables it.
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: i32,
    /// Random seed. `Some` makes replies reproducible: the same seed and conversation give
    /// the same text. `None` draws a fresh seed per reply.
    pub seed: Option<u32>,
    /// Upper bound on the reply length in tokens.
    pub max_tokens: u32,
    /// Generation stops before any of these strings; they never reach the game.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: None,
            max_tokens: 128,
            stop: Vec::new(),
        }
    }
}

/// Per-persona sampling settings; each `None` falls back to the runtime's [`SamplingParams`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingOverrides {
    /// See [`SamplingParams::temperature`].
    pub temperature: Option<f32>,
    /// See [`SamplingParams::top_k`].
    pub top_k: Option<i32>,
    /// See [`SamplingParams::top_p`].
    pub top_p: Option<f32>,
    /// See [`SamplingParams::min_p`].
    pub min_p: Option<f32>,
    /// See [`SamplingParams::repeat_penalty`].
    pub repeat_penalty: Option<f32>,
    /// See [`SamplingParams::repeat_last_n`].
    pub repeat_last_n: Option<i32>,
    /// See [`SamplingParams::seed`].
    pub seed: Option<u32>,
    /// See [`SamplingParams::max_tokens`].
    pub max_tokens: Option<u32>,
    /// Added to [`SamplingParams::stop`].
    pub stop: Vec<String>,
}

impl SamplingOverrides {
    /// These overrides applied on top of `base`.
    #[must_use]
    pub fn apply_to(&self, base: &SamplingParams) -> SamplingParams {
        let mut stop = base.stop.clone();
        stop.extend(
            self.stop
                .iter()
                .filter(|s| !stop_contains(&base.stop, s))
                .cloned(),
        );
        SamplingParams {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_k: self.top_k.unwrap_or(base.top_k),
            top_p: self.top_p.unwrap_or(base.top_p),
            min_p: self.min_p.unwrap_or(base.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(base.repeat_penalty),
            repeat_last_n: self.repeat_last_n.unwrap_or(base.repeat_last_n),
            seed: self.seed.or(base.seed),
            max_tokens: self.max_tokens.unwrap_or(base.max_tokens),
            stop,
        }
    }

    /// Range checks; the error names the field.
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        self.apply_to(&SamplingParams::default()).validate()
    }
}

fn stop_contains(list: &[String], s: &str) -> bool {
    list.iter().any(|item| item == s)
}

/// Most stop strings a persona or config may set.
const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
const MAX_STOP_BYTES: usize = 64;

impl SamplingParams {
    /// Range checks, so that llama.cpp is never handed values it would abort on.
    ///
    /// # Errors
    /// The offending field and what is wrong with it.
    pub fn validate(&self) -> Result<(), FieldError> {
        let finite_in = |field, value: f32, low: f32, high: f32| {
            if value.is_finite() && (low..=high).contains(&value) {
                Ok(())
            } else {
                Err(FieldError::new(
                    field,
                    format!("{value} is outside {low}..={high}"),
                ))
            }
        };
        finite_in("temperature", self.temperature, 0.0, 5.0)?;
        finite_in("top_p", self.top_p, 0.0, 1.0)?;
        finite_in("min_p", self.min_p, 0.0, 1.0)?;
        finite_in("repeat_penalty", self.repeat_penalty, 0.5, 3.0)?;
        if self.top_k < 0 {
            return Err(FieldError::new("top_k", "must not be negative"));
        }
        if self.repeat_last_n < 0 {
            return Err(FieldError::new("repeat_last_n", "must not be negative"));
        }
        if self.max_tokens == 0 {
            return Err(FieldError::new("max_tokens", "must be at least 1"));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(FieldError::new("stop", "stop strings must not be empty"));
        }
        // The stop filter holds back as many bytes as the longest one, and checks each.
        if self.stop.len() > MAX_STOP_STRINGS || self.stop.iter().any(|s| s.len() > MAX_STOP_BYTES)
        {
            return Err(FieldError::new(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_BYTES} bytes"
                ),
            ));
        }
        Ok(())
    }

    /// How many of the best tokens [`SamplingParams::sampler`]'s chain needs to see to pick
    /// exactly as it would from the whole vocabulary; `None` when it needs them all (top-p or
    /// min-p without top-k normalise over every token).
    ///
    /// The repeat penalty only lowers the logits of the tokens in its window (at most
    /// `repeat_last_n` of them), so the best `k` after it are among the best
    /// `k + repeat_last_n` before it.
    pub(crate) fn candidates_needed(&self) -> Option<usize> {
        let penalized = if self.has_repeat_penalty() {
            usize::try_from(self.repeat_last_n).unwrap_or(0)
        } else {
            0
        };
        if self.temperature <= 0.0 {
            Some(1 + penalized)
        } else if self.top_k > 0 {
            Some(
                usize::try_from(self.top_k)
                    .unwrap_or(usize::MAX)
                    .saturating_add(penalized),
            )
        } else {
            None
        }
    }

    fn has_repeat_penalty(&self) -> bool {
        (self.repeat_penalty - 1.0).abs() > f32::EPSILON && self.repeat_last_n > 0
    }

    /// The llama.cpp sampler chain for these settings. `fallback_seed` is used when
    /// [`SamplingParams::seed`] is `None`.
    pub(crate) fn sampler(&self, n_vocab: i32, fallback_seed: u32) -> LlamaSampler {
        let mut chain = Vec::with_capacity(5);
        if self.has_repeat_penalty() {
            chain.push(LlamaSampler::penalties(
                n_vocab,
                self.repeat_last_n,
                self.repeat_penalty,
                0.0,
                0.0,
            ));
        }
        if self.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            if self.top_k > 0 {
                chain.push(LlamaSampler::top_k(self.top_k));
            }
            chain.push(LlamaSampler::top_p(self.top_p, 1));
            chain.push(LlamaSampler::min_p(self.min_p, 1));
            chain.push(LlamaSampler::temp(self.temperature));
            chain.push(LlamaSampler::dist(self.seed.unwrap_or(fallback_seed)));
        }
        LlamaSampler::chain_simple(chain)
    }
}

/// Turns a stream of token bytes into text deltas: holds back incomplete UTF-8 and any tail
/// that could be the start of a stop string, and ends the reply at the first stop string.
#[derive(Debug)]
pub(crate) struct StopFilter {
    stop: Vec<String>,
    pending_bytes: Vec<u8>,
    /// Decoded text not yet released because it may begin a stop string.
    held: String,
    /// Everything released so far.
    released: String,
    /// From the first of these markers on, text is kept back from the stream (a game action,
    /// see `crate::actions`); empty releases everything.
    hide_from: Vec<String>,
    /// Text at and after the first marker, never released.
    hidden: String,
    /// A stop string was reached: nothing after it is ever released.
    stopped: bool,
}

impl StopFilter {
    pub(crate) fn new(stop: Vec<String>) -> Self {
        Self {
            stop,
            pending_bytes: Vec::new(),
            held: String::new(),
            released: String::new(),
            hide_from: Vec::new(),
            hidden: String::new(),
            stopped: false,
        }
    }

    /// Keeps everything from the first of `markers` on out of the stream and the reply text;
    /// read it with [`StopFilter::hidden`].
    pub(crate) fn with_hidden_tail(mut self, markers: Vec<String>) -> Self {
        self.hide_from = markers;
        self
    }

    /// The text kept back by [`StopFilter::with_hidden_tail`] (empty if no marker came).
    pub(crate) fn hidden(&self) -> &str {
        &self.hidden
    }

    /// Feeds one token's bytes. Returns the text that is now safe to show and whether a stop
    /// string was reached (in which case the reply is complete).
    pub(crate) fn push(&mut self, bytes: &[u8]) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.pending_bytes.extend_from_slice(bytes);
        // Valid text goes on; each invalid sequence (not merely incomplete) becomes U+FFFD, as
        // `String::from_utf8_lossy` would make of the whole reply; an incomplete character at
        // the end waits for the next token.
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.pending_bytes) {
                Ok(valid) => {
                    text.push_str(valid);
                    self.pending_bytes.clear();
                    break;
                }
                Err(err) => {
                    let valid = err.valid_up_to();
                    text.push_str(&String::from_utf8_lossy(&self.pending_bytes[..valid]));
                    match err.error_len() {
                        Some(invalid) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            self.pending_bytes.drain(..valid + invalid);
                        }
                        None => {
                            self.pending_bytes.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        self.push_text(&text)
    }

    fn push_text(&mut self, text: &str) -> (String, bool) {
        if !self.hidden.is_empty() {
            self.hidden.push_str(text);
            return (String::new(), false);
        }
        self.held.push_str(text);
        self.split_hidden();
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min()
        {
            self.held.truncate(at);
            self.stopped = true;
            // Bytes of the stop's token after the stop string are not the reply's.
            self.pending_bytes.clear();
            return (self.release_all(), true);
        }
        let markers = self.hide_from.iter().filter(|_| self.hidden.is_empty());
        let keep = self
            .stop
            .iter()
            .chain(markers)
            .map(|stop| partial_suffix_len(&self.held, stop))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out: String = self.held.drain(..cut).collect();
        self.released.push_str(&out);
        (out, false)
    }

    /// Releases whatever is held (the reply ended for another reason).
    pub(crate) fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        if !self.pending_bytes.is_empty() {
            let text = String::from_utf8_lossy(&self.pending_bytes).into_owned();
            self.pending_bytes.clear();
            if self.hidden.is_empty() {
                self.held.push_str(&text);
            } else {
                self.hidden.push_str(&text);
            }
        }
        self.split_hidden();
        if self.hidden.is_empty() {
            // A reply that ends on the start of a marker ("\n" of "\n[ACTION] ") was about to
            // write what is never shown: that start stays hidden too.
            let start = self
                .hide_from
                .iter()
                .filter_map(|marker| {
                    (1..marker.len())
                        .rev()
                        .filter(|&n| marker.is_char_boundary(n))
                        .find(|&n| self.held.ends_with(&marker[..n]))
                })
                .max();
            if let Some(n) = start {
                self.hidden = self.held.split_off(self.held.len() - n);
            }
        }
        self.release_all()
    }

    /// Moves the held text from the first hide marker on into `hidden`.
    fn split_hidden(&mut self) {
        let first = self
            .hide_from
            .iter()
            .filter_map(|marker| self.held.find(marker.as_str()))
            .min();
        if let Some(at) = first {
            self.hidden = self.held.split_off(at);
        }
    }

    fn release_all(&mut self) -> String {
        let out = std::mem::take(&mut self.held);
        self.released.push_str(&out);
        out
    }

    /// The full text released so far.
    pub(crate) fn text(&self) -> &str {
        &self.released
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`
/// (ending on a char boundary of `text`).
fn partial_suffix_len(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&len| {
            text.is_char_boundary(text.len() - len)
                && stop.is_char_boundary(len)
                && text.ends_with(&stop[..len])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_fall_back_to_defaults() {
        let base = SamplingParams::default();
        let overrides = SamplingOverrides {
            temperature: Some(0.0),
            stop: vec!["Player:".into()],
            ..Default::default()
        };
        let merged = overrides.apply_to(&base);
        assert_eq!(merged.temperature, 0.0);
        assert_eq!(merged.top_p, base.top_p);
        assert_eq!(merged.stop, vec!["Player:".to_string()]);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = SamplingParams {
            min_p: f32::NAN,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "min_p");
        let bad = SamplingParams {
            max_tokens: 0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "max_tokens");
    }

    #[test]
    fn stop_string_split_across_tokens_never_leaks() {
        let mut filter = StopFilter::new(vec!["\nPlayer:".into()]);
        let mut shown = String::new();
        for piece in ["Hello", " there", "\nPla", "yer: hi"] {
            let (text, stopped) = filter.push(piece.as_bytes());
            shown.push_str(&text);
            if stopped {
                assert_eq!(shown, "Hello there");
                assert_eq!(filter.text(), "Hello there");
                return;
            }
        }
        panic!("stop string not detected");
    }

    #[test]
    fn nothing_after_a_stop_string_is_released_not_even_half_a_character() {
        // Found by the property tests: the stop's token ended in the first byte of a
        // two-byte character, and `finish` released it as U+FFFD after the stop.
        let mut filter = StopFilter::new(vec!["END".into()]);
        assert_eq!(filter.push(b"fine END\xc2"), ("fine ".to_owned(), true));
        assert_eq!(filter.finish(), "");
        assert_eq!(filter.push(b"more"), (String::new(), true));
        assert_eq!(filter.text(), "fine ");
        // An invalid byte before a valid two-byte character split over tokens: one U+FFFD
        // and the character, as `from_utf8_lossy` reads the whole.
        let mut filter = StopFilter::new(Vec::new());
        let (a, _) = filter.push(b"a\x80\xc2");
        let (b, _) = filter.push(b"\x80b");
        assert_eq!(format!("{a}{b}{}", filter.finish()), "a\u{fffd}\u{80}b");
    }

    #[test]
    fn held_prefix_is_released_when_it_turns_out_harmless() {
        let mut filter = StopFilter::new(vec!["END".into()]);
        assert_eq!(filter.push(b"the EN").0, "the ");
        assert!(filter.push(b"D").1);
        let mut filter = StopFilter::new(vec!["END".into()]);
        filter.push(b"the EN");
        assert_eq!(filter.push(b"gine").0, "ENgine");
    }

    #[test]
    fn hidden_tail_never_streams() {
        let mut filter =
            StopFilter::new(vec!["Player:".into()]).with_hidden_tail(vec!["\n[ACTION] ".into()]);
        let mut shown = String::new();
        for piece in [
            "Here",
            " you go.",
            "\n",
            "[ACT",
            "ION] give(",
            "item=\"x\")",
        ] {
            let (text, stopped) = filter.push(piece.as_bytes());
            assert!(!stopped);
            shown.push_str(&text);
        }
        shown.push_str(&filter.finish());
        assert_eq!(shown, "Here you go.");
        assert_eq!(filter.text(), "Here you go.");
        assert_eq!(filter.hidden(), "\n[ACTION] give(item=\"x\")");
    }

    #[test]
    fn multibyte_characters_split_across_tokens() {
        let mut filter = StopFilter::new(Vec::new());
        let bytes = "é".as_bytes();
        assert_eq!(filter.push(&bytes[..1]).0, "");
        assert_eq!(filter.push(&bytes[1..]).0, "é");
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Text with multi-byte characters and the stop string's pieces in it.
        fn text() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![
                    Just("é".to_owned()),
                    Just("🔥".to_owned()),
                    Just("\n".to_owned()),
                    Just("Pla".to_owned()),
                    Just("yer:".to_owned()),
                    Just("[ACT".to_owned()),
                    "[a-z ]{1,4}",
                ],
                0..24,
            )
            .prop_map(|parts| parts.concat())
        }

        /// Cuts `bytes` at the given points (anywhere, also inside a character).
        fn chunks(bytes: &[u8], cuts: &[proptest::sample::Index]) -> Vec<Vec<u8>> {
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            at.push(0);
            at.push(bytes.len());
            at.sort_unstable();
            at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn the_released_text_does_not_depend_on_where_tokens_split_it(
                text in text(),
                cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
            ) {
                let stop = "\nPlayer:";
                let expected = text.find(stop).map_or(text.as_str(), |at| &text[..at]);
                let mut filter = StopFilter::new(vec![stop.into()]);
                let mut shown = String::new();
                let mut stopped = false;
                for chunk in chunks(text.as_bytes(), &cuts) {
                    let (out, done) = filter.push(&chunk);
                    shown.push_str(&out);
                    if done {
                        stopped = true;
                        break;
                    }
                }
                if !stopped {
                    shown.push_str(&filter.finish());
                }
                prop_assert_eq!(&shown, expected);
                prop_assert_eq!(stopped, text.contains(stop));
            }

            #[test]
            fn a_hidden_tail_never_streams_wherever_it_is_split(
                text in text(),
                cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
            ) {
                let marker = "\n[ACT";
                let mut filter = StopFilter::new(Vec::new()).with_hidden_tail(vec![marker.into()]);
                let mut shown = String::new();
                for chunk in chunks(text.as_bytes(), &cuts) {
                    shown.push_str(&filter.push(&chunk).0);
                }
                shown.push_str(&filter.finish());
                let visible = text.find(marker).map_or(text.as_str(), |at| &text[..at]);
                // Nothing at or after the marker is shown; a reply ending on the marker's
                // first bytes keeps those back too.
                prop_assert!(visible.starts_with(&shown), "{:?} shown of {:?}", shown, text);
                prop_assert!(!shown.contains(marker));
                prop_assert!(visible.len() - shown.len() < marker.len());
            }

            #[test]
            fn arbitrary_bytes_never_panic_or_stall(
                bytes in proptest::collection::vec(any::<u8>(), 0..256),
                cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
            ) {
                let mut filter = StopFilter::new(vec!["\u{fffd}x".into(), "END".into()]);
                let mut shown = String::new();
                for chunk in chunks(&bytes, &cuts) {
                    let (out, done) = filter.push(&chunk);
                    shown.push_str(&out);
                    if done {
                        break;
                    }
                }
                shown.push_str(&filter.finish());
                // Exactly what the whole reply reads as (each invalid sequence one U+FFFD, as
                // `from_utf8_lossy` makes it), up to the first stop string, wherever the
                // tokens split it: nothing held for ever, nothing doubled.
                let lossy = String::from_utf8_lossy(&bytes);
                let expected = ["\u{fffd}x", "END"]
                    .iter()
                    .filter_map(|stop| lossy.find(stop))
                    .min()
                    .map_or(&*lossy, |at| &lossy[..at]);
                prop_assert_eq!(shown, expected);
            }
        }
    }
}
