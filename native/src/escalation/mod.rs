//! Knowing when not to know: how sure the local model is, which questions go to a cloud
//! model, and what the NPC says when none may.
//!
//! Three signals feed the decision:
//! - **Knowledge match** ([`knowledge_match`]): how well the player's line matches anything the
//!   persona knows. For tiny models this is the signal that carries the decision (their token
//!   probabilities do not separate right from invented answers; see docs/benchmarks.md).
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

mod cloud_job;
mod confidence;
mod escalator;
mod profile;
#[cfg(test)]
mod tests;

pub(crate) use crate::mind::memory::{learned_answer, learned_memory};
#[cfg(test)]
use cloud_job::{OPENING_CHARS, OpeningHold, complete_sentences};
pub(crate) use confidence::TokenConfidence;
pub use confidence::token_logprob_entropy;
pub(crate) use escalator::{Decision, Escalator};
pub(crate) use profile::NpcProfile;

pub use crate::config::escalation::{
    ApiKey, CloudConfig, CloudRole, DEFAULT_FALLBACK_LINE, EscalationConfig, PersonaEscalation,
};
use crate::persona::Persona;
pub(crate) use crate::text::unfamiliar_names;
pub use crate::text::{
    DONT_KNOW_BELOW, grounded, is_refusal, knowledge_match, unfamiliar, vocabulary,
};
pub use crate::types::ReplyConfidence;

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
