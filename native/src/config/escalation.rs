//! How escalation to a cloud model is configured: the endpoint ([`CloudConfig`]), the
//! runtime's policy ([`EscalationConfig`]), what the cloud does ([`CloudRole`]) and a
//! persona's own settings ([`PersonaEscalation`]). The policy itself lives in
//! [`escalation`](crate::escalation).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PriceTable;
use crate::types::FieldError;

/// The line an NPC says when a question should go to the cloud but cannot.
pub const DEFAULT_FALLBACK_LINE: &str = "I couldn't say, traveller.";

/// An API key for the cloud model. It never appears in `Debug` output, logs or saves.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    #[must_use]
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, for the `Authorization` header only.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Where and how to reach an OpenAI-compatible `/v1/chat/completions` endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct CloudConfig {
    /// Base URL up to and including `/v1` (e.g. `https://api.openai.com/v1`).
    pub base_url: String,
    /// The model name sent in each request.
    pub model: String,
    /// Bearer token, if the server needs one.
    pub api_key: Option<ApiKey>,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
    /// Time allowed for the response headers, and between two reads of the stream.
    pub read_timeout: Duration,
    /// Time allowed for one whole attempt, stream included.
    pub total_timeout: Duration,
    /// Retries after the first attempt, on 429, 5xx, connection errors and timeouts (only
    /// while nothing has been streamed yet).
    pub max_retries: u32,
    /// Wait before the first retry; doubled at each further one (a `Retry-After` header,
    /// when shorter than 30 s, is honoured instead).
    pub backoff: Duration,
}

impl CloudConfig {
    /// An endpoint at `base_url` serving `model`, without a key, with default timeouts.
    #[must_use]
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(20),
            total_timeout: Duration::from_secs(60),
            max_retries: 2,
            backoff: Duration::from_millis(500),
        }
    }

    /// Sets the API key.
    #[must_use]
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(ApiKey::new(key));
        self
    }

    /// Reads `NPC_AI_CLOUD_URL` (default `https://api.openai.com/v1`), `NPC_AI_CLOUD_MODEL`
    /// (default `gpt-4o-mini`) and `NPC_AI_CLOUD_KEY`. `None` when neither a URL nor a key is
    /// set.
    #[must_use]
    pub fn from_env() -> Option<Self> {
        let url = std::env::var("NPC_AI_CLOUD_URL").ok();
        let key = std::env::var("NPC_AI_CLOUD_KEY")
            .ok()
            .filter(|k| !k.is_empty());
        if url.is_none() && key.is_none() {
            return None;
        }
        let model = std::env::var("NPC_AI_CLOUD_MODEL").unwrap_or_else(|_| "gpt-4o-mini".into());
        let mut config = Self::new(
            url.unwrap_or_else(|| "https://api.openai.com/v1".into()),
            model,
        );
        config.api_key = key.map(ApiKey::new);
        Some(config)
    }
}

/// The runtime-wide policy for questions the NPC may not know. Routing to a cloud is off by
/// default (every reply is local); the don't-know reminder and the grounding check are on.
#[derive(Clone, Debug, PartialEq)]
pub struct EscalationConfig {
    /// Whether questions may be routed at all (personas may opt out).
    pub enabled: bool,
    /// No cloud calls: questions that would escalate get the fallback line.
    pub offline: bool,
    /// The cloud endpoint; `None` (or a build without the `cloud` feature) behaves as offline.
    pub cloud: Option<CloudConfig>,
    /// Escalate when the best knowledge match of the line is below this (0..=1).
    pub min_knowledge_match: f32,
    /// Escalate when a local reply's 10th-percentile token probability is below this; also
    /// escalates local replies that say they do not know. `None` (the default) streams
    /// local replies as generated; `Some` holds each local reply back until it is complete
    /// (the game gets it as one delta), since it may be replaced. For tiny models the
    /// logits do not separate right from invented answers (see docs/benchmarks.md); this is for
    /// larger ones.
    pub min_confidence: Option<f32>,
    /// Lines containing any of these words or phrases always escalate.
    pub always_topics: Vec<String>,
    /// Lines containing any of these never escalate (checked first).
    pub never_topics: Vec<String>,
    /// Most cloud spend in any trailing hour, in the price table's currency.
    pub max_spend_per_hour: f64,
    /// Most cloud spend in any trailing 24 hours.
    pub max_spend_per_day: f64,
    /// Most escalations started in any trailing minute.
    pub max_escalations_per_minute: u32,
    /// Prices used for the spend caps.
    pub prices: PriceTable,
    /// Most completion tokens asked of the cloud per reply.
    pub cloud_max_tokens: u32,
    /// Conversation turns sent to the cloud with the persona prompt (the oldest are dropped);
    /// [`CloudRole::Speak`] only.
    pub cloud_history_turns: usize,
    /// What the cloud does with an escalated line; personas may override it.
    pub cloud_role: CloudRole,
    /// Most completion tokens asked of the cloud for a fact ([`CloudRole::Inform`]).
    pub fact_max_tokens: u32,
    /// What NPCs say when a question should escalate but cannot; personas may override it.
    pub fallback_line: String,
    /// A question about something the NPC may not know ([`unfamiliar`](crate::escalation::unfamiliar): little of it matches
    /// the persona, its lore and what it learned, or it names something the NPC never heard
    /// of) gets a short reminder before it in the prompt: say you don't know if you don't
    /// (with one of the persona's `dont_know` lines as an example). On by default. On the
    /// evaluation's `dev` split (greedy, Qwen2.5-Coder-1.5B) it took explicit don't-knows from
    /// 11 to 13 of 16 out-of-knowledge questions, in-knowledge answers unchanged
    /// (`NPC_EVAL_WITHOUT=reminder`, see docs/dialogue.md).
    pub dont_know_reminder: bool,
    /// Replies to such questions are held back until complete, and replaced by one of the
    /// persona's `dont_know` lines when they state something the NPC cannot know
    /// ([`grounded`](crate::escalation::grounded): a number or a name it never heard of, or several new words). On by
    /// default; the cost is that these replies do not stream (the game gets them whole).
    pub grounding_check: bool,
}

impl Default for EscalationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            offline: false,
            cloud: None,
            min_knowledge_match: 0.3,
            min_confidence: None,
            always_topics: Vec::new(),
            never_topics: Vec::new(),
            max_spend_per_hour: 0.50,
            max_spend_per_day: 5.0,
            max_escalations_per_minute: 6,
            prices: PriceTable::default(),
            cloud_max_tokens: 128,
            cloud_history_turns: 1,
            cloud_role: CloudRole::default(),
            fact_max_tokens: 40,
            fallback_line: DEFAULT_FALLBACK_LINE.into(),
            dont_know_reminder: true,
            grounding_check: true,
        }
    }
}

impl EscalationConfig {
    /// Routing on, to `cloud` (or `None`: routing on, answers out of knowledge fall back).
    #[must_use]
    pub fn enabled(cloud: Option<CloudConfig>) -> Self {
        Self {
            enabled: true,
            cloud,
            ..Self::default()
        }
    }
}

/// What the cloud model does with an escalated line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloudRole {
    /// The cloud model answers as the NPC: it gets the persona prompt, compressed (who the
    /// NPC is, how it talks, and at most three of its knowledge entries, those that share
    /// the most words with the line; no secrets, goals, actions or world preamble), the last
    /// [`EscalationConfig::cloud_history_turns`] turns and the line, and its reply streams to
    /// the game ([`ReplySource::Cloud`](crate::ReplySource::Cloud)). The prompt tells it to say it does not know what the
    /// game's world did not tell it; a reply whose first sentence says so is never streamed:
    /// the NPC says its own don't-know line instead ([`ReplySource::Fallback`](crate::ReplySource::Fallback), the call's
    /// tokens in [`ReplyStats::cloud_fact`](crate::ReplyStats::cloud_fact)). The first sentence (at most 64 characters) is
    /// held back until it is in, then the reply streams on as it arrives.
    #[default]
    Speak,
    /// The cloud model supplies only the missing fact: it gets a short prompt (the NPC's
    /// name and role and the player's line) and answers in one plain sentence of at most
    /// [`EscalationConfig::fact_max_tokens`] tokens (a sentence the limit cut short is
    /// dropped). The local model then answers ([`ReplySource::Informed`](crate::ReplySource::Informed)): the fact is a note
    /// before the line and opens the reply, the model going on in character after it. The
    /// NPC remembers the fact: the same question asked again stays local and opens with it. A fraction of
    /// [`CloudRole::Speak`]'s cloud tokens; the fact is in the cloud's words, and the reply
    /// starts after the cloud's answer. A fact that says it is unknown gets the fallback
    /// line.
    Inform,
}

/// A persona's own escalation settings (the optional `escalation` section of a persona
/// file); unset fields use the runtime's [`EscalationConfig`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PersonaEscalation {
    /// `false` keeps this NPC local whatever the runtime says.
    pub enabled: Option<bool>,
    /// Overrides [`EscalationConfig::min_knowledge_match`].
    pub min_knowledge_match: Option<f32>,
    /// Overrides [`EscalationConfig::min_confidence`].
    pub min_confidence: Option<f32>,
    /// More words or phrases that always escalate for this NPC.
    pub always_topics: Vec<String>,
    /// More words or phrases that never escalate for this NPC.
    pub never_topics: Vec<String>,
    /// What this NPC says when it cannot answer.
    pub fallback_line: Option<String>,
    /// Overrides [`EscalationConfig::cloud_role`].
    pub cloud_role: Option<CloudRole>,
}

impl PersonaEscalation {
    /// Checks ranges.
    ///
    /// # Errors
    /// The field and what is wrong with it.
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(m) = self.min_knowledge_match
            && !(0.0..=1.0).contains(&m)
        {
            return Err(FieldError::new(
                "min_knowledge_match",
                format!("{m} is outside 0..=1"),
            ));
        }
        if let Some(m) = self.min_confidence
            && !(0.0..=1.0).contains(&m)
        {
            return Err(FieldError::new(
                "min_confidence",
                format!("{m} is outside 0..=1"),
            ));
        }
        if self
            .fallback_line
            .as_deref()
            .is_some_and(|l| l.trim().is_empty())
        {
            return Err(FieldError::new(
                "fallback_line",
                "the fallback line is empty",
            ));
        }
        Ok(())
    }
}
