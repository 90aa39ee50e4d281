//! The cost meter: what conversations cost, local and cloud, per NPC and in total.
//!
//! The meter is a plain struct fed with the [`ReplyStats`] of every [`Event::Replied`]
//! (see [`CostMeter::record_event`]); it never talks to the worker. Local compute is priced
//! at a configurable hardware cost per hour ([`PriceTable::local_per_hour`]), so local replies
//! are never counted as free; cloud tokens are priced per million input and output tokens.
//!
//! [`Event::Replied`]: crate::Event::Replied

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

pub use crate::config::PriceTable;
use crate::protocol::{Event, NpcId, ReplySource, ReplyStats};

/// Counters for one NPC, or for all of them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CostTotals {
    /// Replies recorded.
    pub replies: u64,
    /// Replies produced by the local model.
    pub local_replies: u64,
    /// Replies produced by the cloud model.
    pub cloud_replies: u64,
    /// Replies the local model produced from a fact the cloud supplied
    /// ([`ReplySource::Informed`]); their tokens count on both sides.
    pub informed_replies: u64,
    /// Replies that were the persona's fallback line (escalation refused or the cloud
    /// failed).
    pub fallback_replies: u64,
    /// Prompt tokens the local model computed.
    pub prefilled_tokens: u64,
    /// Prompt tokens reused from the KV cache (not computed again).
    pub reused_tokens: u64,
    /// Tokens the local model generated.
    pub generated_tokens: u64,
    /// Wall time the local model spent on replies (prompt plus generation; for informed
    /// replies, from the fact opening the reply to its end).
    pub local_compute: Duration,
    /// Prompt tokens sent to the cloud.
    pub cloud_input_tokens: u64,
    /// Completion tokens received from the cloud.
    pub cloud_output_tokens: u64,
    /// Sentences synthesised into speech locally.
    pub spoken_sentences: u64,
    /// Characters of those sentences (what a cloud voice bills).
    pub spoken_characters: u64,
    /// Length of the audio synthesised.
    pub spoken_audio: Duration,
    /// Wall time the local synthesiser spent on it.
    pub speech_compute: Duration,
}

/// One sentence synthesised into speech, for [`CostMeter::record_speech`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpeechStats {
    /// Characters of the sentence.
    pub characters: u64,
    /// Length of its audio.
    pub audio: Duration,
    /// Time the synthesiser took.
    pub synthesis: Duration,
}

impl SpeechStats {
    /// The stats of `text` spoken as `audio_seconds` of audio in `synthesis`.
    #[must_use]
    pub fn new(text: &str, audio_seconds: f64, synthesis: Duration) -> Self {
        Self {
            characters: text.chars().count() as u64,
            audio: Duration::from_secs_f64(audio_seconds.max(0.0)),
            synthesis,
        }
    }
}

impl CostTotals {
    fn add_speech(&mut self, speech: &SpeechStats) {
        self.spoken_sentences += 1;
        self.spoken_characters += speech.characters;
        self.spoken_audio += speech.audio;
        self.speech_compute += speech.synthesis;
    }

    /// Cost of the local speech synthesis at `prices` (its compute time at the local rate).
    #[must_use]
    pub fn speech_cost(&self, prices: &PriceTable) -> f64 {
        prices.local_cost(self.speech_compute)
    }

    /// What the same characters would have cost on the cloud voice of `prices`.
    #[must_use]
    pub fn cloud_speech_equivalent(&self, prices: &PriceTable) -> f64 {
        prices.cloud_speech_cost(self.spoken_characters)
    }

    /// Synthesis time over audio length (below 1 is faster than real time; 0 before any
    /// speech).
    #[must_use]
    pub fn speech_real_time_factor(&self) -> f64 {
        let audio = self.spoken_audio.as_secs_f64();
        if audio > 0.0 {
            self.speech_compute.as_secs_f64() / audio
        } else {
            0.0
        }
    }

    fn add(&mut self, stats: &ReplyStats) {
        self.replies += 1;
        if let Some(fact) = stats.cloud_fact {
            self.cloud_input_tokens += fact.prompt_tokens;
            self.cloud_output_tokens += fact.completion_tokens;
        }
        match stats.source {
            ReplySource::Local | ReplySource::Informed => {
                if stats.source == ReplySource::Local {
                    self.local_replies += 1;
                } else {
                    self.informed_replies += 1;
                }
                let prompt = stats.prompt_tokens as u64;
                let cached = (stats.cached_tokens as u64).min(prompt);
                self.prefilled_tokens += prompt - cached;
                self.reused_tokens += cached;
                self.generated_tokens += stats.generated_tokens as u64;
                self.local_compute += if stats.source == ReplySource::Informed {
                    // Its time to first token is the cloud's: the local work came after.
                    stats.generation_time
                } else {
                    stats.time_to_first_token + stats.generation_time
                };
            }
            ReplySource::Cloud => {
                self.cloud_replies += 1;
                self.cloud_input_tokens += stats.prompt_tokens as u64;
                self.cloud_output_tokens += stats.generated_tokens as u64;
            }
            ReplySource::Fallback => self.fallback_replies += 1,
        }
    }

    /// Cost of the local compute at `prices`.
    #[must_use]
    pub fn local_cost(&self, prices: &PriceTable) -> f64 {
        prices.local_cost(self.local_compute)
    }

    /// Cost of the cloud tokens at `prices`.
    #[must_use]
    pub fn cloud_cost(&self, prices: &PriceTable) -> f64 {
        prices.cloud_cost(self.cloud_input_tokens, self.cloud_output_tokens)
    }

    /// Local model, cloud and local speech cost at `prices`.
    #[must_use]
    pub fn total_cost(&self, prices: &PriceTable) -> f64 {
        self.local_cost(prices) + self.cloud_cost(prices) + self.speech_cost(prices)
    }

    /// Share of prompt tokens served from the KV cache, 0..=1.
    #[must_use]
    pub fn reuse_ratio(&self) -> f64 {
        let all = self.prefilled_tokens + self.reused_tokens;
        if all == 0 {
            0.0
        } else {
            self.reused_tokens as f64 / all as f64
        }
    }
}

/// Counts tokens, compute time and cloud spend per NPC and in total, and projects them to a
/// cost per player-hour.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CostMeter {
    /// The prices applied.
    pub prices: PriceTable,
    total: CostTotals,
    per_npc: BTreeMap<NpcId, CostTotals>,
}

impl CostMeter {
    /// A meter with the given prices.
    #[must_use]
    pub fn new(prices: PriceTable) -> Self {
        Self {
            prices,
            ..Self::default()
        }
    }

    /// Records one finished reply.
    pub fn record(&mut self, npc: NpcId, stats: &ReplyStats) {
        self.total.add(stats);
        self.per_npc.entry(npc).or_default().add(stats);
    }

    /// Records one sentence `npc` spoke (synthesised locally).
    pub fn record_speech(&mut self, npc: NpcId, speech: &SpeechStats) {
        self.total.add_speech(speech);
        self.per_npc.entry(npc).or_default().add_speech(speech);
    }

    /// Records the event if it is an [`Event::Replied`]; other events are ignored. Returns
    /// whether it was recorded.
    pub fn record_event(&mut self, event: &Event) -> bool {
        if let Event::Replied { npc, stats, .. } = event {
            self.record(*npc, stats);
            true
        } else {
            false
        }
    }

    /// Totals over every NPC.
    #[must_use]
    pub fn total(&self) -> &CostTotals {
        &self.total
    }

    /// Totals for one NPC, if it has replied.
    #[must_use]
    pub fn npc(&self, npc: NpcId) -> Option<&CostTotals> {
        self.per_npc.get(&npc)
    }

    /// Every NPC that has replied, with its totals, in id order.
    pub fn npcs(&self) -> impl Iterator<Item = (NpcId, &CostTotals)> {
        self.per_npc.iter().map(|(npc, totals)| (*npc, totals))
    }

    /// Mean cost of one reply so far (0 before the first).
    #[must_use]
    pub fn cost_per_reply(&self) -> f64 {
        if self.total.replies == 0 {
            0.0
        } else {
            self.total.total_cost(&self.prices) / self.total.replies as f64
        }
    }

    /// Projected cost of a player-hour at `interactions_per_hour` replies (the seed workload
    /// is 5 a minute, 300 an hour), from the mean cost of the replies recorded so far.
    #[must_use]
    pub fn per_player_hour(&self, interactions_per_hour: f64) -> f64 {
        self.cost_per_reply() * interactions_per_hour
    }

    /// Forgets everything recorded; keeps the prices.
    pub fn reset(&mut self) {
        self.total = CostTotals::default();
        self.per_npc.clear();
    }

    /// A printable report projected at `interactions_per_hour`.
    #[must_use]
    pub fn report(&self, interactions_per_hour: f64) -> CostReport<'_> {
        CostReport {
            meter: self,
            interactions_per_hour,
        }
    }
}

/// A [`CostMeter`] formatted as a small table (see [`CostMeter::report`]).
pub struct CostReport<'a> {
    meter: &'a CostMeter,
    interactions_per_hour: f64,
}

impl fmt::Display for CostReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.meter;
        let c = &m.prices.currency;
        writeln!(
            f,
            "{:<10} {:>7} {:>6} {:>6} {:>8} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>11}",
            "npc",
            "replies",
            "local",
            "cloud",
            "informed",
            "prefilled",
            "reused",
            "generated",
            "local s",
            "cloud in",
            "cloud out",
            "cost"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: String, t: &CostTotals| {
            writeln!(
                f,
                "{:<10} {:>7} {:>6} {:>6} {:>8} {:>9} {:>8} {:>9} {:>9.2} {:>9} {:>9} {:>10.6}{c}",
                name,
                t.replies,
                t.local_replies,
                t.cloud_replies,
                t.informed_replies,
                t.prefilled_tokens,
                t.reused_tokens,
                t.generated_tokens,
                t.local_compute.as_secs_f64(),
                t.cloud_input_tokens,
                t.cloud_output_tokens,
                t.total_cost(&m.prices)
            )
        };
        for (npc, totals) in m.npcs() {
            row(f, format!("{}", npc.0), totals)?;
        }
        row(f, "total".into(), m.total())?;
        write!(
            f,
            "local {:.6}{c} + cloud {:.6}{c}; {:.4}{c} per player-hour at {} replies/hour \
             (local at {}{c}/h, cloud {}{c}/{}{c} per M tokens in/out)",
            m.total().local_cost(&m.prices),
            m.total().cloud_cost(&m.prices),
            m.per_player_hour(self.interactions_per_hour),
            self.interactions_per_hour,
            m.prices.local_per_hour,
            m.prices.cloud_input_per_million,
            m.prices.cloud_output_per_million
        )?;
        let t = m.total();
        if t.spoken_sentences > 0 {
            let local = t.speech_cost(&m.prices);
            let cloud = t.cloud_speech_equivalent(&m.prices);
            write!(
                f,
                "\nspeech: {} sentences, {} characters, {:.1} s of audio synthesised in {:.1} s \
                 (real-time factor {:.2}), {local:.6}{c} of local compute; on a cloud voice at \
                 {}{c} per M characters: {cloud:.6}{c}",
                t.spoken_sentences,
                t.spoken_characters,
                t.spoken_audio.as_secs_f64(),
                t.speech_compute.as_secs_f64(),
                t.speech_real_time_factor(),
                m.prices.cloud_speech_per_million_chars,
            )?;
            if local > 0.0 {
                write!(f, " (local = 1/{:.0} of it)", cloud / local)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::CloudUsage;

    fn stats(source: ReplySource, prompt: usize, cached: usize, generated: usize) -> ReplyStats {
        ReplyStats {
            prompt_tokens: prompt,
            cached_tokens: cached,
            generated_tokens: generated,
            time_to_first_token: Duration::from_millis(500),
            generation_time: Duration::from_millis(1500),
            ..ReplyStats::new(source)
        }
    }

    #[test]
    fn local_and_cloud_replies_are_counted_apart_per_npc() {
        let mut meter = CostMeter::default();
        meter.record(NpcId(1), &stats(ReplySource::Local, 300, 200, 50));
        meter.record(NpcId(1), &stats(ReplySource::Cloud, 1000, 0, 100));
        meter.record(NpcId(2), &stats(ReplySource::Local, 120, 0, 40));
        meter.record(NpcId(2), &stats(ReplySource::Fallback, 0, 0, 0));
        let t = meter.total();
        assert_eq!((t.replies, t.local_replies, t.cloud_replies), (4, 2, 1));
        assert_eq!(t.fallback_replies, 1);
        assert_eq!((t.prefilled_tokens, t.reused_tokens), (220, 200));
        assert_eq!(t.generated_tokens, 90);
        assert_eq!((t.cloud_input_tokens, t.cloud_output_tokens), (1000, 100));
        assert_eq!(t.local_compute, Duration::from_secs(4));
        let one = meter.npc(NpcId(1)).expect("npc 1 replied");
        assert_eq!((one.replies, one.prefilled_tokens), (2, 100));
        // $10/M in, $30/M out: 1000 in + 100 out = 0.01 + 0.003.
        assert!((t.cloud_cost(&meter.prices) - 0.013).abs() < 1e-12);
        // 4 s of a $0.34/h GPU.
        assert!((t.local_cost(&meter.prices) - 4.0 / 3600.0 * 0.34).abs() < 1e-12);
        let per_hour = meter.per_player_hour(300.0);
        assert!((per_hour - t.total_cost(&meter.prices) / 4.0 * 300.0).abs() < 1e-9);
        let report = meter.report(300.0).to_string();
        assert!(report.contains("total"), "{report}");
    }

    #[test]
    fn speech_is_counted_priced_locally_and_compared_with_a_cloud_voice() {
        let mut meter = CostMeter::default();
        let sentence = "Welcome to my forge, traveller.";
        let speech = SpeechStats::new(sentence, 2.0, Duration::from_millis(200));
        assert_eq!(speech.characters, 31);
        meter.record_speech(NpcId(1), &speech);
        meter.record_speech(NpcId(1), &speech);
        let t = meter.total();
        assert_eq!((t.spoken_sentences, t.spoken_characters), (2, 62));
        assert_eq!(t.spoken_audio, Duration::from_secs(4));
        assert!((t.speech_real_time_factor() - 0.1).abs() < 1e-9);
        // 0.4 s at $0.34/h, against 62 characters at $15/M.
        assert!((t.speech_cost(&meter.prices) - 0.4 / 3600.0 * 0.34).abs() < 1e-12);
        assert!((t.cloud_speech_equivalent(&meter.prices) - 62.0 * 15e-6).abs() < 1e-12);
        assert!((t.total_cost(&meter.prices) - t.speech_cost(&meter.prices)).abs() < 1e-12);
        let report = meter.report(300.0).to_string();
        assert!(
            report.contains("speech: 2 sentences, 62 characters"),
            "{report}"
        );
        assert!(report.contains("local = 1/"), "{report}");
        assert_eq!(meter.npc(NpcId(1)).map(|n| n.spoken_sentences), Some(2));
    }

    #[test]
    fn an_informed_reply_counts_the_local_model_and_the_clouds_fact() {
        let mut meter = CostMeter::default();
        let mut informed = stats(ReplySource::Informed, 200, 150, 30);
        informed.cloud_fact = Some(CloudUsage {
            prompt_tokens: 60,
            completion_tokens: 12,
        });
        meter.record(NpcId(1), &informed);
        // A fact the cloud did not know: the fallback line, but the tokens were paid for.
        let mut unknown = stats(ReplySource::Fallback, 0, 0, 0);
        unknown.cloud_fact = Some(CloudUsage {
            prompt_tokens: 55,
            completion_tokens: 5,
        });
        meter.record(NpcId(1), &unknown);
        let t = meter.total();
        assert_eq!(
            (t.informed_replies, t.local_replies, t.cloud_replies),
            (1, 0, 0)
        );
        assert_eq!(t.fallback_replies, 1);
        assert_eq!((t.prefilled_tokens, t.reused_tokens), (50, 150));
        assert_eq!(t.generated_tokens, 30);
        assert_eq!((t.cloud_input_tokens, t.cloud_output_tokens), (115, 17));
        // The informed reply's 1.5 s after its opening; its 0.5 s to the opening was the
        // cloud's.
        assert_eq!(t.local_compute, Duration::from_millis(1500));
    }

    #[test]
    fn the_seed_workload_on_the_cloud_costs_what_the_guide_says() {
        // 5 interactions a minute, 8K tokens in and 500 out each, at GPT-4-Turbo prices.
        let mut meter = CostMeter::default();
        meter.record(NpcId(1), &stats(ReplySource::Cloud, 8000, 0, 500));
        let per_hour = meter.per_player_hour(300.0);
        assert!((per_hour - 28.5).abs() < 1e-9, "{per_hour}");
    }

    #[test]
    fn other_events_and_cached_counts_above_the_prompt_are_harmless() {
        let mut meter = CostMeter::default();
        assert!(!meter.record_event(&Event::Cancelled {
            npc: NpcId(1),
            request: crate::RequestId(1)
        }));
        meter.record(NpcId(1), &stats(ReplySource::Local, 10, 50, 1));
        assert_eq!(meter.total().prefilled_tokens, 0);
        assert_eq!(meter.total().reused_tokens, 10);
        assert_eq!(
            meter.cost_per_reply(),
            meter.total().total_cost(&meter.prices)
        );
        meter.reset();
        assert_eq!(meter.total().replies, 0);
        assert_eq!(meter.per_player_hour(300.0), 0.0);
    }
}
