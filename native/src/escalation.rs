//! Knowing when not to know: how sure the local model is, which questions go to a cloud
//! model, and what the NPC says when none may.
//!
//! Three signals feed the decision:
//! - **Knowledge match** ([`knowledge_match`]): how well the player's line matches anything the
//!   persona knows. For tiny models this is the signal that carries the decision (their token
//!   probabilities do not separate right from invented answers; see the README).
//! - **Token confidence** ([`ReplyConfidence`]): per-token probability and entropy of the local
//!   reply, from the logits, reported on every local reply.
//! - **Refusals** ([`is_refusal`]): an explicit "I don't know" in a reply.
//!
//! The [`EscalationConfig`] (global, in [`RuntimeConfig`](crate::RuntimeConfig)) and a
//! persona's optional [`PersonaEscalation`] decide; spend caps, a rate limit and `offline`
//! mode bound it. When a question should escalate but may not, or the cloud fails, the NPC
//! says its fallback line in character: never an error string, never a hang.
//!
//! What the cloud does with a line is its [`CloudRole`]: answer as the NPC from a compressed
//! persona prompt, or supply only the fact, which opens a local reply and which the NPC
//! remembers.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use crate::cost::PriceTable;
use crate::persona::Persona;
use crate::prompt::Turn;
use crate::protocol::{
    CloudUsage, Event, FinishReason, NpcError, NpcId, ReplySource, ReplyStats, RequestId,
};

/// The line an NPC says when a question should go to the cloud but cannot.
pub const DEFAULT_FALLBACK_LINE: &str = "I couldn't say, traveller.";

/// More ways to say "I don't know", taken in turn after the fallback line (never the same
/// line twice in a row) by NPCs whose persona gives no `dont_know` lines of its own; the
/// model also gets one of them as an example in the don't-know reminder.
pub const DEFAULT_DONT_KNOW: &[&str] = &[
    "I don't know, I'm afraid.",
    "Couldn't tell you.",
    "No idea, friend.",
    "I've never heard of it.",
    "That I wouldn't know.",
];

/// Lines whose best knowledge match is below this get the don't-know reminder: the model is
/// told that what it knows may not answer the line, and to say so if it does not (see
/// [`unfamiliar`]). Chosen on the evaluation's `dev` split.
pub const DONT_KNOW_BELOW: f32 = 0.5;

// ---------------------------------------------------------------------------------------------
// Token confidence

/// How sure the local model was of the tokens of one reply, from its logits (before sampling
/// transformations such as temperature).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplyConfidence {
    /// Tokens scored.
    pub tokens: usize,
    /// Mean natural-log probability per token.
    pub mean_logprob: f32,
    /// 10th-percentile token probability (the lowest-quantile signal of cascade work).
    pub p10_prob: f32,
    /// Lowest token probability.
    pub min_prob: f32,
    /// Mean entropy of the next-token distribution, in nats.
    pub mean_entropy: f32,
}

/// Log-probability of `token` and the entropy (nats) of the distribution given by `logits`.
/// `None` when the token is out of range or the logits are not finite. Logits more than 24
/// below the best are left out of the sums (together they weigh less than 10⁻⁵ of it).
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

// ---------------------------------------------------------------------------------------------
// Refusals and knowledge match

/// Whether a reply says, in so many words, that the speaker does not know.
#[must_use]
pub fn is_refusal(reply: &str) -> bool {
    const PHRASES: &[&str] = &[
        "i don't know",
        "i do not know",
        "i dont know",
        "i'm not sure",
        "i am not sure",
        "i couldn't say",
        "i could not say",
        "i can't say",
        "i cannot say",
        "no idea",
        "i have no knowledge",
        "i'm afraid i can't",
        "i am unable to",
        "i'm unable to",
        "can't help you with that",
        "never heard of",
    ];
    let lower = reply.to_lowercase().replace('’', "'");
    PHRASES.iter().any(|phrase| lower.contains(phrase))
}

/// Words too common to say what a question is about.
const STOPWORDS: &[&str] = &[
    "a",
    "about",
    "an",
    "and",
    "any",
    "are",
    "at",
    "be",
    "can",
    "could",
    "did",
    "do",
    "does",
    "for",
    "from",
    "have",
    "how",
    "i",
    "in",
    "is",
    "it",
    "its",
    "know",
    "me",
    "much",
    "my",
    "of",
    "on",
    "or",
    "please",
    "should",
    "tell",
    "that",
    "the",
    "there",
    "this",
    "to",
    "was",
    "what",
    "when",
    "where",
    "which",
    "who",
    "why",
    "will",
    "with",
    "would",
    "you",
    "your",
    "yours",
    "many",
    "some",
    "get",
    "go",
    "does",
    "has",
    "had",
    "were",
    "been",
    "being",
    "them",
    "they",
    "he",
    "she",
    "his",
    "her",
    "we",
    "us",
    "our",
    "if",
    "so",
    "than",
    "then",
    "just",
    "like",
    // Greetings and small talk: nothing to look up.
    "hello",
    "hi",
    "hey",
    "greetings",
    "morning",
    "evening",
    "thanks",
    "thank",
    "bye",
    "goodbye",
    "good",
    "afternoon",
    "farewell",
    "cheers",
    "friend",
    "sorry",
    "again",
    "see",
    "soon",
    "yes",
    "no",
    "ok",
    "okay",
    "well",
    "fine",
    "doing",
    "today",
    "there",
    "sir",
];

/// Whether `word` (lower case) is too common to say what a line is about.
pub(crate) fn is_stopword(word: &str) -> bool {
    STOPWORDS.contains(&word)
}

/// Lower-case content words, with a plural `s` stripped.
fn content_words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .map(|word| word.trim_matches('\'').to_lowercase())
        .map(|word| word.strip_suffix("'s").map(str::to_owned).unwrap_or(word))
        .filter(|word| word.len() > 1 && !STOPWORDS.contains(&word.as_str()))
        .map(|word| {
            if word.len() > 3 && word.ends_with('s') && !word.ends_with("ss") {
                word[..word.len() - 1].to_owned()
            } else {
                word
            }
        })
        .collect()
}

/// How well `question` matches the best of `documents`: the share of the question's content
/// words found in one document, 0..=1. `None` when the question has no content words
/// (greetings, small talk), so there is nothing to match.
///
/// The runtime matches the persona's facts, the lore entries BM25 retrieves for the line (the
/// retriever picks the candidates; this share scores them, on the same 0..=1 scale for every
/// persona, where BM25's own scores depend on the corpus) and the questions the NPC learned
/// answers to. The policy only takes the resulting `Option<f32>`.
#[must_use]
pub fn knowledge_match<S: AsRef<str>>(documents: &[S], question: &str) -> Option<f32> {
    let words = content_words(question);
    if words.is_empty() {
        return None;
    }
    let best = documents
        .iter()
        .map(|doc| shared_words(&words, doc.as_ref()))
        .max()
        .unwrap_or(0);
    Some(best as f32 / words.len() as f32)
}

/// How many of `words` (content words, see [`content_words`]) are content words of
/// `document`.
fn shared_words(words: &[String], document: &str) -> usize {
    let document = content_words(document);
    words.iter().filter(|w| document.contains(w)).count()
}

/// The content words (see [`knowledge_match`]) and numbers of `texts`: everything an NPC has
/// heard of.
pub fn vocabulary<'a>(
    texts: impl IntoIterator<Item = &'a str>,
) -> std::collections::HashSet<String> {
    texts
        .into_iter()
        .flat_map(|text| content_words(text).into_iter().chain(numbers(text)))
        .collect()
}

/// The numbers in `text`, in digits: those written in digits ("10,000" is one) and those
/// spelled out ("three hundred and forty" is 340, as the speech evaluation's
/// [`normalize`](npc_voice::wer::normalize) writes them).
fn numbers(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_ascii_digit() || c == ','))
        .map(|n| n.trim_matches(',').replace(',', ""))
        .filter(|n| !n.is_empty())
        .chain(
            npc_voice::wer::normalize(text)
                .into_iter()
                .filter(|w| w.chars().all(|c| c.is_ascii_digit())),
        )
}

/// Whether `line` asks something (a question mark, or it opens with a question word):
/// only questions can be about what an NPC does not know.
fn is_question(line: &str) -> bool {
    const OPENERS: &[&str] = &[
        "what", "who", "whom", "whose", "where", "when", "why", "how", "which", "can", "could",
        "do", "does", "did", "is", "are", "was", "were", "will", "would", "should", "have", "has",
    ];
    line.contains('?')
        || line.split_whitespace().next().is_some_and(|w| {
            OPENERS.contains(
                &w.trim_matches(|c: char| !c.is_alphanumeric())
                    .to_lowercase()
                    .as_str(),
            )
        })
}

/// Whether `line` is probably about something the NPC does not know: it is a question, and
/// its best knowledge match over `documents` is below [`DONT_KNOW_BELOW`] or it names
/// something (a capitalised word that does not open a sentence) found nowhere in the NPC's
/// `vocabulary`. Lines with no content words (greetings, small talk) are never unfamiliar.
#[must_use]
pub fn unfamiliar<S: AsRef<str>>(
    documents: &[S],
    vocabulary: &std::collections::HashSet<String>,
    line: &str,
) -> bool {
    unfamiliar_names(documents, vocabulary, line).is_some()
}

/// As [`unfamiliar`], with the names in `line` the NPC never heard of (content words, lower
/// case; empty when the line is unfamiliar for its low match alone). `None`: familiar.
pub(crate) fn unfamiliar_names<S: AsRef<str>>(
    documents: &[S],
    vocabulary: &std::collections::HashSet<String>,
    line: &str,
) -> Option<Vec<String>> {
    let score = knowledge_match(documents, line)?;
    if !is_question(line) {
        return None;
    }
    // What the NPC learned since its persona was set (the documents) counts as heard of.
    let learned = self::vocabulary(documents.iter().map(AsRef::as_ref));
    let known = |w: &String| vocabulary.contains(w) || learned.contains(w);
    let mut names = Vec::new();
    let mut opens_sentence = true;
    for word in line.split_whitespace() {
        let bare = word.trim_matches(|c: char| !c.is_alphanumeric());
        let named =
            !opens_sentence && bare.chars().next().is_some_and(char::is_uppercase) && bare != "I";
        if named {
            names.extend(content_words(bare).into_iter().filter(|w| !known(w)));
        }
        opens_sentence = word.ends_with(['.', '!', '?', ':']);
    }
    (score < DONT_KNOW_BELOW || !names.is_empty()).then_some(names)
}

/// Whether `reply` stays inside what the NPC could know: every specific it states (a number,
/// a capitalised name that does not open a sentence) is in its `vocabulary` or in `heard`
/// (the player's line and the conversation), and at most one other word is new to both
/// (frequent English words aside). Names in `unknown` (those the player asked about that the
/// NPC never heard of) count as new even though the player said them: "Flour costs 4 silver
/// in Saltmere" states what the NPC cannot know. An explicit "I don't know" is always
/// grounded. Used on replies to unfamiliar lines ([`unfamiliar`]): an ungrounded one is
/// replaced by a don't-know line.
#[must_use]
pub fn grounded(
    reply: &str,
    vocabulary: &std::collections::HashSet<String>,
    heard: &[&str],
    unknown: &[String],
) -> bool {
    if is_refusal(reply) {
        return true;
    }
    let heard: std::collections::HashSet<String> = heard
        .iter()
        .flat_map(|t| content_words(t).into_iter().chain(numbers(t)))
        .filter(|w| !unknown.contains(w))
        .collect();
    if numbers(reply).any(|n| !vocabulary.contains(&n) && !heard.contains(&n)) {
        return false;
    }
    let known = |word: &str| vocabulary.contains(word) || heard.contains(word);
    let mut new_words = 0;
    let mut opens_sentence = true;
    for raw in reply.split_whitespace() {
        let bare = raw.trim_matches(|c: char| !c.is_alphanumeric());
        let named =
            !opens_sentence && bare.chars().next().is_some_and(char::is_uppercase) && bare != "I";
        opens_sentence = raw.ends_with(['.', '!', '?', ':', '"']);
        for word in content_words(bare) {
            if known(&word) || crate::guard::is_common(&word) {
                continue;
            }
            if named || word.chars().any(|c| c.is_ascii_digit()) {
                return false;
            }
            new_words += 1;
        }
    }
    new_words <= 1
}

/// What a persona knows, as documents for [`knowledge_match`]: its knowledge entries, goals,
/// name, role and greeting (secrets are left out: the NPC must not answer about them).
#[must_use]
pub fn persona_documents(persona: &Persona) -> Vec<String> {
    let mut docs = persona.knowledge.clone();
    docs.extend(persona.goals.iter().cloned());
    docs.push(format!("{} {}", persona.name, persona.role));
    docs.push(persona.personality.clone());
    docs.push(persona.greeting.clone());
    docs.retain(|doc| !doc.trim().is_empty());
    docs
}

// ---------------------------------------------------------------------------------------------
// Configuration

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
    /// logits do not separate right from invented answers (see the README); this is for
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
    /// A question about something the NPC may not know ([`unfamiliar`]: little of it matches
    /// the persona, its lore and what it learned, or it names something the NPC never heard
    /// of) gets a short reminder before it in the prompt: say you don't know if you don't
    /// (with one of the persona's `dont_know` lines as an example). On by default. On the
    /// evaluation's `dev` split (greedy, Qwen2.5-Coder-1.5B) it took explicit don't-knows from
    /// 11 to 13 of 16 out-of-knowledge questions, in-knowledge answers unchanged
    /// (`NPC_EVAL_WITHOUT=reminder`, see the README).
    pub dont_know_reminder: bool,
    /// Replies to such questions are held back until complete, and replaced by one of the
    /// persona's `dont_know` lines when they state something the NPC cannot know
    /// ([`grounded`]: a number or a name it never heard of, or several new words). On by
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
    /// the game ([`ReplySource::Cloud`]). The prompt tells it to say it does not know what the
    /// game's world did not tell it; a reply whose first sentence says so is never streamed:
    /// the NPC says its own don't-know line instead ([`ReplySource::Fallback`], the call's
    /// tokens in [`ReplyStats::cloud_fact`]). The first sentence (at most 64 characters) is
    /// held back until it is in, then the reply streams on as it arrives.
    #[default]
    Speak,
    /// The cloud model supplies only the missing fact: it gets a short prompt (the NPC's
    /// name and role and the player's line) and answers in one plain sentence of at most
    /// [`EscalationConfig::fact_max_tokens`] tokens (a sentence the limit cut short is
    /// dropped). The local model then answers ([`ReplySource::Informed`]): the fact is a note
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
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(m) = self.min_knowledge_match
            && !(0.0..=1.0).contains(&m)
        {
            return Err(("min_knowledge_match", format!("{m} is outside 0..=1")));
        }
        if let Some(m) = self.min_confidence
            && !(0.0..=1.0).contains(&m)
        {
            return Err(("min_confidence", format!("{m} is outside 0..=1")));
        }
        if self
            .fallback_line
            .as_deref()
            .is_some_and(|l| l.trim().is_empty())
        {
            return Err(("fallback_line", "the fallback line is empty".into()));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Routing

/// Why a line was routed to the cloud.
#[derive(Clone, Debug, PartialEq)]
pub enum EscalationReason {
    /// The line names a topic that always escalates.
    AlwaysTopic(String),
    /// The line's best knowledge match is below the threshold.
    LowKnowledgeMatch(f32),
    /// The local reply's 10th-percentile token probability is below the threshold.
    LowConfidence(f32),
    /// The local reply said it did not know.
    Refusal,
}

/// Why an escalation did not reach the cloud (the NPC said its fallback line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// Offline mode.
    Offline,
    /// No cloud endpoint configured, or built without the `cloud` feature.
    NoCloud,
    /// The rate limit was reached.
    RateLimited,
    /// A spend cap was reached.
    SpendCap,
}

/// Where one line goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Route {
    /// The local model answers.
    Local,
    /// The cloud model answers.
    Cloud(EscalationReason),
    /// The NPC says its fallback line.
    Fallback(EscalationReason, Blocked),
}

/// What the worker keeps per NPC for routing.
#[derive(Clone, Debug, Default)]
pub(crate) struct NpcProfile {
    pub(crate) settings: PersonaEscalation,
    pub(crate) documents: Vec<String>,
    /// "Name, role": who the cloud supplies a fact for ([`CloudRole::Inform`]).
    pub(crate) identity: String,
    /// Who the NPC is and how it talks, for the cloud ([`CloudRole::Speak`]).
    pub(crate) header: String,
    /// The persona's knowledge entries, of which the cloud gets those the line mentions.
    pub(crate) knowledge: Vec<String>,
    /// How the NPC says it does not know (the persona's `dont_know`, else the defaults).
    pub(crate) dont_know: Vec<String>,
}

impl NpcProfile {
    pub(crate) fn new(persona: &Persona) -> Self {
        let identity = format!("{}, {}", persona.name.trim(), persona.role.trim());
        let mut header = format!(
            "You are {identity}. Stay in character and answer in one or two short sentences."
        );
        for (title, body) in [
            ("Personality", &persona.personality),
            ("Speech style", &persona.speech_style),
        ] {
            if !body.trim().is_empty() {
                header.push_str(&format!("\n\n{title}: {}", body.trim()));
            }
        }
        Self {
            settings: persona.escalation.clone(),
            documents: persona_documents(persona),
            identity,
            header,
            knowledge: persona
                .knowledge
                .iter()
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .collect(),
            dont_know: persona.dont_know.clone(),
        }
    }

    /// The persona prompt the cloud gets when it speaks as the NPC, compressed: who the NPC
    /// is and how it talks, and the (at most [`CLOUD_KNOWLEDGE`]) knowledge entries that
    /// share the most words with `line`. Secrets, goals, actions and the world preamble are
    /// not sent.
    fn cloud_prompt(&self, line: &str) -> String {
        let words = content_words(line);
        let mut scored: Vec<(usize, &String)> = self
            .knowledge
            .iter()
            .map(|entry| (shared_words(&words, entry), entry))
            .filter(|(shared, _)| *shared > 0)
            .collect();
        // Most shared words first; the persona's order among equals.
        scored.sort_by_key(|(shared, _)| std::cmp::Reverse(*shared));
        let mut prompt = self.header.clone();
        if !scored.is_empty() {
            prompt.push_str("\n\nWhat you know:");
            for (_, entry) in scored.into_iter().take(CLOUD_KNOWLEDGE) {
                prompt.push_str("\n- ");
                prompt.push_str(entry);
            }
        }
        prompt.push_str("\n\n");
        prompt.push_str(CLOUD_DONT_KNOW);
        prompt
    }
}

/// Most knowledge entries sent to the cloud with one escalated line.
const CLOUD_KNOWLEDGE: usize = 3;

/// The last paragraph of the cloud's persona prompt ([`CloudRole::Speak`]): a line escalates
/// because the NPC was not told the answer, and the cloud was not told the game's world
/// either. Without it the stand-in cloud (Qwen2.5-Coder-1.5B) invented an answer to 26 of the
/// 26 made-up-world questions of `tests/data/escalation.ron` it was sent; with it, it says
/// "I don't know" (which the NPC then says in its own words) and still answers what the real
/// world knows (README, "Knowing when not to know").
const CLOUD_DONT_KNOW: &str = "You were asked something you were not told about. If the \
    answer is common knowledge in the real world, give it. If it is about people, places or \
    events of your own world, you cannot know it: answer only \"I don't know.\"";

/// Most characters of a cloud reply's opening held back while it may still turn out to be an
/// "I don't know" ([`OpeningHold`]).
const OPENING_CHARS: usize = 64;

/// Holds back the opening of a streamed cloud reply ([`CloudRole::Speak`]) until its first
/// sentence (or [`OPENING_CHARS`]) is in: a reply that opens with "I don't know" is replaced
/// by the NPC's own don't-know line, so the player never sees the cloud's; any other reply
/// then streams on as it arrives.
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "cloud"), allow(dead_code))]
pub(crate) struct OpeningHold {
    held: String,
    decided: Option<bool>,
}

#[cfg_attr(not(feature = "cloud"), allow(dead_code))]
impl OpeningHold {
    /// Takes one streamed piece; returns what to send the player now (empty while holding,
    /// and for every piece of a refusal).
    pub(crate) fn push(&mut self, delta: &str) -> String {
        match self.decided {
            Some(true) => String::new(),
            Some(false) => delta.to_owned(),
            None => {
                self.held.push_str(delta);
                let sentence_done = self.held.char_indices().any(|(at, c)| {
                    matches!(c, '.' | '!' | '?' | '\n')
                        && self.held[at + c.len_utf8()..]
                            .chars()
                            .next()
                            .is_some_and(char::is_whitespace)
                });
                if sentence_done || self.held.len() >= OPENING_CHARS {
                    self.decide()
                } else {
                    String::new()
                }
            }
        }
    }

    /// At the end of the stream: what is still held, to send (empty for a refusal).
    pub(crate) fn finish(&mut self) -> String {
        if self.decided.is_none() {
            self.decide()
        } else {
            String::new()
        }
    }

    /// Whether the reply opened with "I don't know" (known once decided).
    pub(crate) fn refused(&self) -> bool {
        self.decided == Some(true)
    }

    fn decide(&mut self) -> String {
        let refused = is_refusal(&self.held);
        self.decided = Some(refused);
        if refused {
            String::new()
        } else {
            std::mem::take(&mut self.held)
        }
    }
}

/// How an NPC remembers a fact the cloud supplied for `line` ([`CloudRole::Inform`]).
pub(crate) fn learned_memory(line: &str, fact: &str) -> String {
    format!("{LEARNED_PREFIX}{line}{LEARNED_MIDDLE}{fact}")
}

const LEARNED_PREFIX: &str = "Asked \"";
const LEARNED_MIDDLE: &str = "\", you found out: ";

/// The question and the fact of a memory made by [`learned_memory`].
fn learned(memory: &str) -> Option<(&str, &str)> {
    memory
        .strip_prefix(LEARNED_PREFIX)?
        .split_once(LEARNED_MIDDLE)
}

/// The question of a memory made by [`learned_memory`]: what routing matches a new line
/// against (the fact's own words would make unrelated questions look known).
pub(crate) fn learned_question(memory: &str) -> Option<&str> {
    learned(memory).map(|(question, _)| question)
}

/// The fact the NPC learned for a question that holds every content word of `line` (the
/// same question, asked again): it opens the local reply again, at no cloud cost. The most
/// recent such memory wins.
pub(crate) fn learned_answer<'m>(memories: &[&'m str], line: &str) -> Option<&'m str> {
    memories.iter().rev().find_map(|memory| {
        let (question, fact) = learned(memory)?;
        (knowledge_match(&[question], line)? >= 1.0).then_some(fact)
    })
}

/// A fact the cloud supplied for a line ([`CloudRole::Inform`]), waiting for the worker to
/// have the local model voice it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Informed {
    pub(crate) npc: NpcId,
    pub(crate) request: RequestId,
    pub(crate) line: String,
    pub(crate) fact: String,
    pub(crate) usage: CloudUsage,
    /// When the line was sent to the cloud: the reply's time to first token counts from here.
    pub(crate) asked: Instant,
}

/// `text` without a sentence the token limit cut short (`truncated`): up to its last `.`,
/// `!` or `?` followed by a space or the end. Text with no complete sentence is kept whole.
#[cfg_attr(not(feature = "cloud"), allow(dead_code))]
pub(crate) fn complete_sentences(text: &str, truncated: bool) -> &str {
    if !truncated {
        return text;
    }
    let mut ends = text.char_indices().filter(|&(at, c)| {
        matches!(c, '.' | '!' | '?')
            && text[at + c.len_utf8()..]
                .chars()
                .next()
                .is_none_or(char::is_whitespace)
    });
    match ends.next_back() {
        Some((at, c)) => &text[..at + c.len_utf8()],
        None => text,
    }
}

/// The prompt that asks the cloud for the fact behind `line`, for the NPC `identity`.
fn fact_prompt(identity: &str, line: &str) -> Vec<(String, String)> {
    vec![
        (
            "system".to_owned(),
            format!(
                "You supply facts to a game character, {identity}, who was asked something \
                 they do not know. Answer the question in one short, plain sentence of fact, \
                 without role-play. If it cannot be known, answer: I don't know."
            ),
        ),
        ("user".to_owned(), line.to_owned()),
    ]
}

fn mentions(line: &str, topics: &[String]) -> Option<String> {
    let lower = line.to_lowercase();
    topics
        .iter()
        .find(|topic| !topic.trim().is_empty() && lower.contains(&topic.trim().to_lowercase()))
        .cloned()
}

/// Whether `line` should escalate, before any spend or rate check. `knowledge` is the best
/// knowledge-match score (from [`knowledge_match`] or a lore retriever).
#[must_use]
pub fn should_escalate(
    config: &EscalationConfig,
    persona: &PersonaEscalation,
    line: &str,
    knowledge: Option<f32>,
) -> Option<EscalationReason> {
    if !persona.enabled.unwrap_or(config.enabled) {
        return None;
    }
    if mentions(line, &persona.never_topics)
        .or_else(|| mentions(line, &config.never_topics))
        .is_some()
    {
        return None;
    }
    if let Some(topic) =
        mentions(line, &persona.always_topics).or_else(|| mentions(line, &config.always_topics))
    {
        return Some(EscalationReason::AlwaysTopic(topic));
    }
    let threshold = persona
        .min_knowledge_match
        .unwrap_or(config.min_knowledge_match);
    match knowledge {
        Some(score) if score < threshold => Some(EscalationReason::LowKnowledgeMatch(score)),
        _ => None,
    }
}

/// State shared between the worker and the cloud threads.
#[derive(Default)]
struct Shared {
    /// The cloud reply each NPC has in flight. Cancelling removes the entry: its thread
    /// then stops and sends nothing more.
    in_flight: HashMap<NpcId, RequestId>,
    /// Turns finished by the cloud, not yet added to the worker's conversations.
    finished: Vec<(NpcId, Turn)>,
    /// Facts the cloud supplied, not yet taken by the worker. Their NPCs stay in
    /// `in_flight` (busy, cancellable) until the worker takes them.
    informed: Vec<Informed>,
    /// (when, cost) of each escalation; estimates until the cloud reports its usage.
    spend: VecDeque<(Instant, f64, RequestId)>,
    /// When each escalation started, for the rate limit.
    started: VecDeque<Instant>,
    /// Fallback lines said per NPC: which one is next.
    fallbacks: HashMap<NpcId, usize>,
}

/// The worker's escalation state: spend, rate limit, cloud replies in flight.
pub(crate) struct Escalator {
    config: EscalationConfig,
    shared: Arc<Mutex<Shared>>,
    #[cfg(feature = "cloud")]
    client: Option<Arc<crate::cloud::CloudClient>>,
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
const MINUTE: Duration = Duration::from_secs(60);

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A cloud thread that panicked mid-update leaves counters that are still usable.
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Escalator {
    pub(crate) fn new(config: &EscalationConfig) -> Self {
        Self {
            config: config.clone(),
            shared: Arc::default(),
            #[cfg(feature = "cloud")]
            client: config
                .cloud
                .clone()
                .map(|c| Arc::new(crate::cloud::CloudClient::new(c))),
        }
    }

    fn cloud_available(&self) -> bool {
        #[cfg(feature = "cloud")]
        {
            self.client.is_some()
        }
        #[cfg(not(feature = "cloud"))]
        {
            false
        }
    }

    /// Whether an escalation for `reason` may reach the cloud now; reserves its estimated
    /// spend and a rate-limit slot when it may.
    fn admit(
        &self,
        reason: EscalationReason,
        prompt_chars: usize,
        max_tokens: u32,
        request: RequestId,
    ) -> Route {
        if self.config.offline {
            return Route::Fallback(reason, Blocked::Offline);
        }
        if !self.cloud_available() {
            return Route::Fallback(reason, Blocked::NoCloud);
        }
        let now = Instant::now();
        let mut shared = lock(&self.shared);
        while shared
            .started
            .front()
            .is_some_and(|&t| now.duration_since(t) >= MINUTE)
        {
            shared.started.pop_front();
        }
        while shared
            .spend
            .front()
            .is_some_and(|&(t, _, _)| now.duration_since(t) >= DAY)
        {
            shared.spend.pop_front();
        }
        if shared.started.len() >= self.config.max_escalations_per_minute as usize {
            return Route::Fallback(reason, Blocked::RateLimited);
        }
        // About four characters a token; the whole completion budget is assumed.
        let estimate = self
            .config
            .prices
            .cloud_cost((prompt_chars / 4) as u64, u64::from(max_tokens));
        let day: f64 = shared.spend.iter().map(|(_, c, _)| c).sum();
        let hour: f64 = shared
            .spend
            .iter()
            .filter(|(t, _, _)| now.duration_since(*t) < HOUR)
            .map(|(_, c, _)| c)
            .sum();
        if hour + estimate > self.config.max_spend_per_hour
            || day + estimate > self.config.max_spend_per_day
        {
            return Route::Fallback(reason, Blocked::SpendCap);
        }
        shared.started.push_back(now);
        shared.spend.push_back((now, estimate, request));
        Route::Cloud(reason)
    }

    /// Whether `npc` has a cloud reply in flight.
    pub(crate) fn busy(&self, npc: NpcId) -> bool {
        lock(&self.shared).in_flight.contains_key(&npc)
    }

    /// Whether any cloud call is in flight or its fact waits (the worker then polls
    /// [`Escalator::take_informed`] instead of blocking on its inbox).
    pub(crate) fn awaiting_cloud(&self) -> bool {
        !lock(&self.shared).in_flight.is_empty()
    }

    /// Facts the cloud supplied since the last call, for lines still wanted (not
    /// cancelled); their NPCs are no longer busy with the cloud.
    pub(crate) fn take_informed(&self) -> Vec<Informed> {
        let mut shared = lock(&self.shared);
        let informed = std::mem::take(&mut shared.informed);
        informed
            .into_iter()
            .filter(|i| {
                let live = shared.in_flight.get(&i.npc) == Some(&i.request);
                if live {
                    shared.in_flight.remove(&i.npc);
                }
                live
            })
            .collect()
    }

    /// The cloud role for an NPC.
    fn role(&self, profile: &NpcProfile) -> CloudRole {
        profile
            .settings
            .cloud_role
            .unwrap_or(self.config.cloud_role)
    }

    /// Cloud turns finished since the last call, to add to the conversations.
    pub(crate) fn take_finished(&self) -> Vec<(NpcId, Turn)> {
        std::mem::take(&mut lock(&self.shared).finished)
    }

    /// Cancels `npc`'s cloud reply, if any, answering [`Event::Cancelled`] now.
    pub(crate) fn cancel(&self, npc: NpcId, events: &Sender<Event>) {
        // Removing the entry frees the NPC at once; its thread stops at its next read.
        let mut shared = lock(&self.shared);
        if let Some(request) = shared.in_flight.remove(&npc) {
            let _ = events.send(Event::Cancelled { npc, request });
        }
    }

    /// Fails every cloud reply in flight (the runtime is shutting down).
    pub(crate) fn shut_down(&self, events: &Sender<Event>) {
        let mut shared = lock(&self.shared);
        for (npc, request) in shared.in_flight.drain() {
            let _ = events.send(Event::Failed {
                npc,
                request,
                error: NpcError::ShuttingDown,
            });
        }
    }

    /// The fallback line for an NPC, in turn: its persona's `dont_know` lines if it has
    /// some, else its (or the runtime's) fallback line and [`DEFAULT_DONT_KNOW`]; never the
    /// same line twice in a row.
    pub(crate) fn fallback_line(&self, npc: NpcId, profile: &NpcProfile) -> String {
        let mut lines = profile.dont_know.clone();
        if lines.is_empty() {
            lines.push(
                profile
                    .settings
                    .fallback_line
                    .clone()
                    .unwrap_or_else(|| self.config.fallback_line.clone()),
            );
            lines.extend(DEFAULT_DONT_KNOW.iter().map(|&l| l.to_owned()));
        }
        let mut shared = lock(&self.shared);
        let said = shared.fallbacks.entry(npc).or_default();
        let line = lines[*said % lines.len()].clone();
        *said += 1;
        line
    }

    /// Answers with the fallback line: one delta, then the reply.
    pub(crate) fn reply_with_fallback(
        events: &Sender<Event>,
        npc: NpcId,
        request: RequestId,
        line: String,
    ) {
        let _ = events.send(Event::Delta {
            npc,
            request,
            text: line.clone(),
        });
        let _ = events.send(Event::Replied {
            npc,
            request,
            text: line,
            stats: fallback_stats(),
        });
    }

    /// Routes one player line: `false` leaves it to the local model; `true` means the cloud
    /// or the fallback line answers it (events and the conversation turn follow from here),
    /// or the cloud supplies a fact for the local model ([`Escalator::take_informed`]).
    /// `known` are more documents that count as knowledge: the lore retrieved for the line
    /// and the questions the NPC learned answers to.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn divert(
        &self,
        npc: NpcId,
        request: RequestId,
        line: &str,
        profile: &NpcProfile,
        turns: &[Turn],
        known: &[&str],
        events: &Sender<Event>,
    ) -> bool {
        let documents: Vec<&str> = profile
            .documents
            .iter()
            .map(String::as_str)
            .chain(known.iter().copied())
            .collect();
        let knowledge = knowledge_match(&documents, line);
        let reason = should_escalate(&self.config, &profile.settings, line, knowledge);
        self.dispatch(reason, npc, request, line, profile, turns, events)
    }

    /// Whether this NPC's lines are routed at all (the persona may opt out of the runtime's
    /// setting); [`Escalator::divert`] is only worth its documents when they are.
    pub(crate) fn routes(&self, profile: &NpcProfile) -> bool {
        profile.settings.enabled.unwrap_or(self.config.enabled)
    }

    /// The don't-know reminder and the grounding check ([`EscalationConfig`]).
    pub(crate) fn dont_know_policy(&self) -> (bool, bool) {
        (self.config.dont_know_reminder, self.config.grounding_check)
    }

    /// Whether replies of this NPC are held back until their confidence is known (only
    /// when a confidence threshold is set: holding costs the streaming of local replies).
    pub(crate) fn holds(&self, profile: &NpcProfile) -> bool {
        self.routes(profile)
            && profile
                .settings
                .min_confidence
                .or(self.config.min_confidence)
                .is_some()
    }

    /// After a held local reply: `true` when its confidence or an explicit "I don't know"
    /// sends the line to the cloud (or the fallback line) instead; `false` keeps it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn second_opinion(
        &self,
        npc: NpcId,
        request: RequestId,
        line: &str,
        reply: &str,
        confidence: Option<&ReplyConfidence>,
        profile: &NpcProfile,
        turns: &[Turn],
        events: &Sender<Event>,
    ) -> bool {
        let threshold = profile
            .settings
            .min_confidence
            .or(self.config.min_confidence);
        let settings = &profile.settings;
        if mentions(line, &settings.never_topics)
            .or_else(|| mentions(line, &self.config.never_topics))
            .is_some()
        {
            return false;
        }
        let reason = if is_refusal(reply) {
            Some(EscalationReason::Refusal)
        } else {
            match (threshold, confidence) {
                (Some(min), Some(c)) if c.p10_prob < min => {
                    Some(EscalationReason::LowConfidence(c.p10_prob))
                }
                _ => None,
            }
        };
        self.dispatch(reason, npc, request, line, profile, turns, events)
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        reason: Option<EscalationReason>,
        npc: NpcId,
        request: RequestId,
        line: &str,
        profile: &NpcProfile,
        turns: &[Turn],
        events: &Sender<Event>,
    ) -> bool {
        let Some(reason) = reason else {
            return false;
        };
        let role = self.role(profile);
        let (messages, max_tokens) = match role {
            CloudRole::Speak => {
                let keep = turns.len().saturating_sub(self.config.cloud_history_turns);
                let mut messages = vec![("system".to_owned(), profile.cloud_prompt(line))];
                for turn in &turns[keep..] {
                    // Without the local model's action calls: the cloud gets no actions.
                    let spoken = turn.npc.split(crate::actions::ACTION_MARKER).next();
                    messages.push(("user".to_owned(), turn.player.clone()));
                    messages.push(("assistant".to_owned(), spoken.unwrap_or("").to_owned()));
                }
                messages.push(("user".to_owned(), line.to_owned()));
                (messages, self.config.cloud_max_tokens)
            }
            CloudRole::Inform => (
                fact_prompt(&profile.identity, line),
                self.config.fact_max_tokens,
            ),
        };
        let chars = messages.iter().map(|(_, c)| c.len()).sum();
        let fallback = self.fallback_line(npc, profile);
        match self.admit(reason, chars, max_tokens, request) {
            Route::Local => false,
            Route::Cloud(reason) => {
                tracing::info!("NPC {npc:?}: escalating to the cloud ({reason:?}, {role:?})");
                self.start_cloud(
                    CloudCall {
                        npc,
                        request,
                        player_line: line.to_owned(),
                        messages,
                        max_tokens,
                        role,
                        fallback,
                        asked: Instant::now(),
                    },
                    events.clone(),
                );
                true
            }
            Route::Fallback(reason, blocked) => {
                tracing::info!(
                    "NPC {npc:?}: would escalate ({reason:?}) but {blocked:?}; fallback line"
                );
                lock(&self.shared).finished.push((
                    npc,
                    Turn {
                        player: line.to_owned(),
                        npc: fallback.clone(),
                    },
                ));
                Self::reply_with_fallback(events, npc, request, fallback);
                true
            }
        }
    }

    /// Starts a cloud call on its own thread. When the cloud fails before saying anything,
    /// the NPC says the call's fallback line instead.
    fn start_cloud(&self, call: CloudCall, events: Sender<Event>) {
        let CloudCall {
            npc,
            request,
            player_line,
            fallback,
            ..
        } = call.clone();
        #[cfg(feature = "cloud")]
        if let Some(client) = self.client.clone() {
            lock(&self.shared).in_flight.insert(npc, request);
            let shared = Arc::clone(&self.shared);
            let prices = self.config.prices.clone();
            let spawned = std::thread::Builder::new()
                .name("npc_native cloud".into())
                .spawn({
                    let events = events.clone();
                    move || run_cloud_job(&client, &shared, &call, &prices, &events)
                });
            if spawned.is_ok() {
                return;
            }
            tracing::warn!("could not spawn a cloud thread; answering with the fallback line");
            lock(&self.shared).in_flight.remove(&npc);
        }
        #[cfg(not(feature = "cloud"))]
        drop(call);
        let mut shared = lock(&self.shared);
        shared.finished.push((
            npc,
            Turn {
                player: player_line,
                npc: fallback.clone(),
            },
        ));
        drop(shared);
        Self::reply_with_fallback(&events, npc, request, fallback);
    }
}

/// Stats of a fallback reply: nothing computed, nothing sent.
fn fallback_stats() -> ReplyStats {
    ReplyStats::new(ReplySource::Fallback)
}

/// One cloud call: what to send, and what to do with its answer.
#[derive(Clone)]
#[cfg_attr(not(feature = "cloud"), allow(dead_code))]
struct CloudCall {
    npc: NpcId,
    request: RequestId,
    player_line: String,
    /// (role, content) pairs.
    messages: Vec<(String, String)>,
    max_tokens: u32,
    role: CloudRole,
    fallback: String,
    asked: Instant,
}

/// Body of a cloud thread: stream the reply (or fetch the fact), then finish exactly once
/// (unless cancelled, in which case the worker already answered). A fact is handed to the
/// worker, whose local reply finishes the line.
#[cfg(feature = "cloud")]
fn run_cloud_job(
    client: &crate::cloud::CloudClient,
    shared: &Mutex<Shared>,
    job: &CloudCall,
    prices: &PriceTable,
    events: &Sender<Event>,
) {
    let started = Instant::now();
    let mut first_at: Option<Instant> = None;
    let speak = job.role == CloudRole::Speak;
    let live = |shared: &Shared| shared.in_flight.get(&job.npc) == Some(&job.request);
    let cancelled = || !live(&lock(shared));
    let mut opening = OpeningHold::default();
    let send = |text: String, first_at: &mut Option<Instant>| {
        if !text.is_empty() {
            first_at.get_or_insert_with(Instant::now);
            let _ = events.send(Event::Delta {
                npc: job.npc,
                request: job.request,
                text,
            });
        }
    };
    let result = client.chat_stream(&job.messages, job.max_tokens, &cancelled, &mut |delta| {
        let guard = lock(shared);
        let live = live(&guard);
        if live && speak {
            send(opening.push(delta), &mut first_at);
        }
        live
    });
    let mut guard = lock(shared);
    if !live(&guard) {
        // Cancelled, or the runtime shut down: the worker has answered already.
        return;
    }
    let usage = result.as_ref().ok().map(|reply| CloudUsage {
        prompt_tokens: reply.prompt_tokens.unwrap_or(reply.estimated_prompt_tokens),
        completion_tokens: reply
            .completion_tokens
            .unwrap_or(reply.streamed_chunks as u64),
    });
    if let Some(usage) = usage
        && let Some(entry) = guard.spend.iter_mut().find(|e| e.2 == job.request)
    {
        // Replace this escalation's estimate by its actual cost.
        entry.1 = prices.cloud_cost(usage.prompt_tokens, usage.completion_tokens);
    }
    if speak && result.is_ok() {
        // The end of a reply shorter than its held opening.
        send(opening.finish(), &mut first_at);
    }
    if !speak || opening.refused() {
        match &result {
            Ok(reply) if !speak && !reply.text.trim().is_empty() && !is_refusal(&reply.text) => {
                // The NPC stays busy (and cancellable) until the worker takes the fact.
                guard.informed.push(Informed {
                    npc: job.npc,
                    request: job.request,
                    line: job.player_line.clone(),
                    fact: complete_sentences(reply.text.trim(), reply.truncated).to_owned(),
                    usage: usage.unwrap_or_default(),
                    asked: job.asked,
                });
                return;
            }
            Ok(_) => tracing::info!(
                "NPC {:?}: the cloud did not know either; answering with the fallback line",
                job.npc
            ),
            Err(error) => tracing::warn!(
                "NPC {:?}: cloud fact failed ({error}); answering with the fallback line",
                job.npc
            ),
        }
        guard.in_flight.remove(&job.npc);
        guard.finished.push((
            job.npc,
            Turn {
                player: job.player_line.clone(),
                npc: job.fallback.clone(),
            },
        ));
        drop(guard);
        let mut stats = fallback_stats();
        // What the cloud was paid for an answer it could not give.
        stats.cloud_fact = usage;
        let _ = events.send(Event::Delta {
            npc: job.npc,
            request: job.request,
            text: job.fallback.clone(),
        });
        let _ = events.send(Event::Replied {
            npc: job.npc,
            request: job.request,
            text: job.fallback.clone(),
            stats,
        });
        return;
    }
    guard.in_flight.remove(&job.npc);
    let (text, stats) = match result {
        Ok(reply) if !reply.text.trim().is_empty() => {
            let (prompt, completion) = usage
                .map(|u| (u.prompt_tokens, u.completion_tokens))
                .unwrap_or_default();
            let now = Instant::now();
            let first = first_at.unwrap_or(now);
            let stats = ReplyStats {
                finish: if reply.truncated {
                    FinishReason::MaxTokens
                } else {
                    FinishReason::EndOfTurn
                },
                prompt_tokens: usize::try_from(prompt).unwrap_or(usize::MAX),
                generated_tokens: usize::try_from(completion).unwrap_or(usize::MAX),
                time_to_first_token: first - started,
                generation_time: now - first,
                ..ReplyStats::new(ReplySource::Cloud)
            };
            (reply.text.trim().to_owned(), stats)
        }
        other => {
            if let Err(error) = &other {
                tracing::warn!(
                    "NPC {:?}: cloud reply failed ({error}); answering with the fallback line",
                    job.npc
                );
            }
            if first_at.is_some() {
                // Part of a reply was streamed before the failure: keep it, as a deadline
                // keeps a local reply's text so far.
                let partial = match &other {
                    Err(crate::cloud::CloudError::Interrupted { partial, .. }) => partial.clone(),
                    _ => String::new(),
                };
                if !partial.trim().is_empty() {
                    let mut stats = fallback_stats();
                    stats.source = ReplySource::Cloud;
                    stats.finish = FinishReason::Deadline;
                    guard.finished.push((
                        job.npc,
                        Turn {
                            player: job.player_line.clone(),
                            npc: partial.trim().to_owned(),
                        },
                    ));
                    let _ = events.send(Event::Replied {
                        npc: job.npc,
                        request: job.request,
                        text: partial.trim().to_owned(),
                        stats,
                    });
                    return;
                }
            }
            let _ = events.send(Event::Delta {
                npc: job.npc,
                request: job.request,
                text: job.fallback.clone(),
            });
            (job.fallback.clone(), fallback_stats())
        }
    };
    guard.finished.push((
        job.npc,
        Turn {
            player: job.player_line.clone(),
            npc: text.clone(),
        },
    ));
    let _ = events.send(Event::Replied {
        npc: job.npc,
        request: job.request,
        text,
        stats,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprob_and_entropy_match_a_hand_computed_softmax() {
        // Two equal logits and one far below: p ≈ 0.5 each, entropy ≈ ln 2.
        let logits = [3.0, 3.0, -50.0];
        let (logprob, entropy) = token_logprob_entropy(&logits, 0).unwrap();
        assert!((logprob - 0.5f32.ln()).abs() < 1e-5, "{logprob}");
        assert!((entropy - 2f32.ln()).abs() < 1e-5, "{entropy}");
        let (sure, flat) = token_logprob_entropy(&[10.0, -10.0], 0).unwrap();
        assert!(sure > -1e-6 && flat < 1e-6);
        assert_eq!(token_logprob_entropy(&logits, 3), None);
        assert_eq!(token_logprob_entropy(&[f32::NAN, 1.0], 0), None);
    }

    #[test]
    fn leaving_out_negligible_logits_changes_nothing_measurable() {
        // A vocabulary-sized spread of logits (deterministic), most far below the top.
        let logits: Vec<f32> = (0..49_152u32)
            .map(|i| {
                let x = (i.wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32;
                12.0 - 40.0 * x
            })
            .collect();
        let exact = |token: usize| {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (mut sum, mut weighted) = (0.0f64, 0.0f64);
            for &l in &logits {
                let shifted = f64::from(l - max);
                sum += shifted.exp();
                weighted += shifted.exp() * shifted;
            }
            let log_z = sum.ln();
            (
                f64::from(logits[token] - max) - log_z,
                log_z - weighted / sum,
            )
        };
        for token in [0, 7, 40_000] {
            let (logprob, entropy) = token_logprob_entropy(&logits, token).unwrap();
            let (want_logprob, want_entropy) = exact(token);
            assert!(
                (f64::from(logprob) - want_logprob).abs() < 1e-5,
                "{logprob} vs {want_logprob}"
            );
            assert!(
                (f64::from(entropy) - want_entropy).abs() < 1e-5,
                "{entropy} vs {want_entropy}"
            );
        }
    }

    #[test]
    fn confidence_summary_takes_the_low_quantile() {
        let mut conf = TokenConfidence::default();
        assert_eq!(conf.summary(), None);
        for p in [0.9f32, 0.8, 0.1, 0.95, 0.99, 0.7, 0.6, 0.85, 0.9, 0.92, 0.3] {
            // logits whose softmax gives p to token 0 and 1-p to token 1.
            conf.observe(&[p.ln(), (1.0 - p).ln()], 0);
        }
        let s = conf.summary().unwrap();
        assert_eq!(s.tokens, 11);
        assert!((s.min_prob - 0.1).abs() < 1e-4, "{s:?}");
        assert!((s.p10_prob - 0.3).abs() < 1e-4, "{s:?}");
        assert!(s.mean_logprob < 0.0 && s.mean_entropy > 0.0);
        conf.observe(&[1.0], -1); // ignored
        assert_eq!(conf.summary().unwrap().tokens, 11);
    }

    #[test]
    fn refusals_are_detected() {
        assert!(is_refusal("Hmm. I don't know, friend."));
        assert!(is_refusal("I’m not sure about that."));
        assert!(is_refusal("I couldn't say, traveller."));
        assert!(!is_refusal("An iron sword costs 40 gold."));
    }

    #[test]
    fn knowledge_match_separates_known_from_unknown() {
        let docs = [
            "An iron sword costs 40 gold.",
            "Your apprentice is a boy named Pip.",
        ];
        assert_eq!(
            knowledge_match(&docs, "How much is an iron sword?"),
            Some(1.0)
        );
        assert!(knowledge_match(&docs, "Who is your apprentice?").unwrap() >= 0.5);
        assert_eq!(
            knowledge_match(&docs, "What is the capital of France?"),
            Some(0.0)
        );
        assert_eq!(knowledge_match(&docs, "Hello!"), None);
        assert_eq!(knowledge_match(&docs, "Good morning!"), None);
        assert_eq!(knowledge_match(&docs, "Thank you, friend."), None);
        assert_eq!(knowledge_match::<&str>(&[], "Swords?"), Some(0.0));
    }

    #[test]
    fn policy_respects_topics_thresholds_and_opt_out() {
        let mut config = EscalationConfig::enabled(None);
        config.always_topics = vec!["dragon".into()];
        config.never_topics = vec!["weather".into()];
        let persona = PersonaEscalation::default();
        assert_eq!(should_escalate(&config, &persona, "hi", None), None);
        assert!(matches!(
            should_escalate(&config, &persona, "Tell me of the Dragon", Some(1.0)),
            Some(EscalationReason::AlwaysTopic(_))
        ));
        assert_eq!(
            should_escalate(&config, &persona, "dragon weather?", Some(0.0)),
            None
        );
        assert!(matches!(
            should_escalate(&config, &persona, "x", Some(0.1)),
            Some(EscalationReason::LowKnowledgeMatch(_))
        ));
        assert_eq!(should_escalate(&config, &persona, "x", Some(0.5)), None);
        let opt_out = PersonaEscalation {
            enabled: Some(false),
            ..PersonaEscalation::default()
        };
        assert_eq!(
            should_escalate(&config, &opt_out, "dragon", Some(0.0)),
            None
        );
        config.enabled = false;
        assert_eq!(
            should_escalate(&config, &persona, "dragon", Some(0.0)),
            None
        );
    }

    #[test]
    fn a_truncated_fact_keeps_its_complete_sentences() {
        let cut = "The forest is far. It lies beyond the river and the";
        assert_eq!(complete_sentences(cut, true), "The forest is far.");
        assert_eq!(complete_sentences(cut, false), cut);
        assert_eq!(
            complete_sentences("It costs 3.5 gold and", true),
            "It costs 3.5 gold and"
        );
        assert_eq!(complete_sentences("Why? Because", true), "Why?");
        assert_eq!(complete_sentences("", true), "");
    }

    #[test]
    fn learned_facts_route_by_their_question_only() {
        let memory = learned_memory("Who rules the north?", "Queen Maud, since the war.");
        assert_eq!(learned_question(&memory), Some("Who rules the north?"));
        assert_eq!(learned_question("The player is called Aria."), None);
        let memories = [memory.as_str(), "The player is called Aria."];
        let fact = Some("Queen Maud, since the war.");
        assert_eq!(learned_answer(&memories, "Who rules the North?"), fact);
        assert_eq!(learned_answer(&memories, "So who rules the north?"), fact);
        assert_eq!(
            learned_answer(&memories, "Who rules the north and the south?"),
            None
        );
        assert_eq!(learned_answer(&memories, "Hello!"), None);
    }

    #[test]
    fn the_cloud_gets_a_compressed_persona() {
        let persona = Persona::from_ron(
            r#"(name: "Brom", role: "the blacksmith", personality: "Gruff.",
                speech_style: "Short sentences.",
                knowledge: ["A horseshoe costs 3 gold.", "An iron sword costs 40 gold.",
                            "Pip is the apprentice."],
                secrets: ["You owe Marta 12 gold."], goals: ["Sell swords."])"#,
            None,
        )
        .unwrap();
        let prompt = NpcProfile::new(&persona).cloud_prompt("Tell me about your swords.");
        assert!(
            prompt.starts_with("You are Brom, the blacksmith."),
            "{prompt}"
        );
        assert!(prompt.contains("Short sentences."), "{prompt}");
        assert!(prompt.contains("An iron sword costs 40 gold."), "{prompt}");
        for left_out in ["horseshoe", "Pip", "Marta", "Sell swords"] {
            assert!(!prompt.contains(left_out), "{left_out} in {prompt}");
        }
        // It ends by telling the cloud to say it does not know what the NPC was not told.
        assert!(prompt.ends_with(CLOUD_DONT_KNOW), "{prompt}");
    }

    fn miller_documents() -> (Vec<String>, std::collections::HashSet<String>) {
        let docs = vec![
            "A sack of wheat flour costs 4 silver.".to_owned(),
            "My library holds three hundred and forty books.".to_owned(),
            "The far bank leads to the road to Marrowby.".to_owned(),
        ];
        let vocabulary = vocabulary(docs.iter().map(String::as_str));
        (docs, vocabulary)
    }

    #[test]
    fn paraphrases_that_share_words_are_familiar_and_unknown_names_are_not() {
        let (docs, vocabulary) = miller_documents();
        // In the words of the fact, or half of them: the model answers as usual.
        assert!(!unfamiliar(
            &docs,
            &vocabulary,
            "How much is a sack of wheat flour?"
        ));
        assert!(!unfamiliar(
            &docs,
            &vocabulary,
            "What does wheat cost by the sack?"
        ));
        // Nothing it knows, or a place it never heard of: the reminder and the check.
        assert!(unfamiliar(
            &docs,
            &vocabulary,
            "Who was the first king of this realm?"
        ));
        assert!(unfamiliar(
            &docs,
            &vocabulary,
            "What does flour cost in Saltmere?"
        ));
        assert!(!unfamiliar(
            &docs,
            &vocabulary,
            "What does flour cost in Marrowby?"
        ));
        // Greetings and statements are never about what it does not know.
        assert!(!unfamiliar(&docs, &vocabulary, "Good morning!"));
        assert!(!unfamiliar(&docs, &vocabulary, "I like your mill."));
    }

    #[test]
    fn a_reply_is_grounded_when_its_specifics_are_known() {
        let (_, vocabulary) = miller_documents();
        let line = "How many books are on your shelves?";
        assert!(grounded(
            "I keep 340 books here.",
            &vocabulary,
            &[line],
            &[]
        ));
        assert!(grounded(
            "Three hundred and forty, reader.",
            &vocabulary,
            &[line],
            &[]
        ));
        assert!(grounded(
            "I don't know, I'm afraid.",
            &vocabulary,
            &[line],
            &[]
        ));
        // A number, a name or several words from nowhere: invented.
        assert!(!grounded(
            "I keep 500 books here.",
            &vocabulary,
            &[line],
            &[]
        ));
        let king = ["Who was king?"];
        assert!(!grounded(
            "The first king was King Arthur.",
            &vocabulary,
            &king,
            &[]
        ));
        let fireball = ["How do you cast a fireball?"];
        assert!(!grounded(
            "You need a magic staff to summon it.",
            &vocabulary,
            &fireball,
            &[]
        ));
        // What the player said counts as heard, but not a name the NPC never heard of.
        assert!(grounded(
            "Arthur, you say?",
            &vocabulary,
            &["Do you know Arthur?"],
            &[]
        ));
        let saltmere = ["What does flour cost in Saltmere?"];
        let unknown = unfamiliar_names(&miller_documents().0, &vocabulary, saltmere[0]).unwrap();
        assert_eq!(unknown, ["saltmere"]);
        assert!(!grounded(
            "Flour costs 4 silver in Saltmere.",
            &vocabulary,
            &saltmere,
            &unknown
        ));
        let spelled: Vec<String> = numbers("nineteen years and forty-two days").collect();
        assert_eq!(spelled, ["19", "42"]);
    }

    #[test]
    fn a_cloud_reply_streams_after_its_opening_and_a_refusal_never_does() {
        let mut hold = OpeningHold::default();
        assert_eq!(hold.push("The capital"), "");
        assert_eq!(hold.push(" is Paris."), "");
        // The first sentence is in once something follows it.
        assert_eq!(hold.push(" It has"), "The capital is Paris. It has");
        assert_eq!(hold.push(" a river."), " a river.");
        assert_eq!(hold.finish(), "");
        assert!(!hold.refused());

        let mut hold = OpeningHold::default();
        for piece in ["I don't", " know", ".", " Ask", " the mayor."] {
            assert_eq!(hold.push(piece), "", "{piece:?}");
        }
        assert_eq!(hold.finish(), "");
        assert!(hold.refused());

        // A reply shorter than one sentence is decided at the end.
        let mut hold = OpeningHold::default();
        assert_eq!(hold.push("Paris"), "");
        assert_eq!(hold.finish(), "Paris");
        let mut hold = OpeningHold::default();
        assert_eq!(hold.push("No idea"), "");
        assert_eq!(hold.finish(), "");
        assert!(hold.refused());

        // A long opening without a sentence end is not held past OPENING_CHARS.
        let mut hold = OpeningHold::default();
        let long = "word ".repeat(OPENING_CHARS / 5 + 1);
        assert_eq!(hold.push(&long), long);
        // "3.5" is no sentence end.
        let mut hold = OpeningHold::default();
        assert_eq!(hold.push("It weighs 3.5"), "");
    }

    #[test]
    fn fallback_lines_take_turns() {
        let escalator = Escalator::new(&EscalationConfig::default());
        let profile = NpcProfile::default();
        let said: Vec<String> = (0..3)
            .map(|_| escalator.fallback_line(NpcId(1), &profile))
            .collect();
        assert_eq!(said[0], DEFAULT_FALLBACK_LINE);
        assert!(said.windows(2).all(|w| w[0] != w[1]), "{said:?}");
        let own = NpcProfile {
            dont_know: vec!["Ask Bessa.".into(), "Not my trade.".into()],
            ..NpcProfile::default()
        };
        let said: Vec<String> = (0..3)
            .map(|_| escalator.fallback_line(NpcId(2), &own))
            .collect();
        assert_eq!(said, ["Ask Bessa.", "Not my trade.", "Ask Bessa."]);
    }

    #[test]
    fn the_api_key_is_redacted_in_debug_output() {
        let config = CloudConfig::new("http://127.0.0.1:1/v1", "m").with_api_key("sk-secret-123");
        let shown = format!(
            "{config:?} {:?}",
            EscalationConfig::enabled(Some(config.clone()))
        );
        assert!(!shown.contains("sk-secret-123"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
