//! What the engine keeps per NPC and per line: the conversation, a line waiting for a slot,
//! a reply being produced, a prewarm.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::token::LlamaToken;

use crate::actions::{self, NpcActions};
use crate::escalation::{NpcProfile, TokenConfidence};
use crate::guard::{ReplyGuard, SecretGuard};
use crate::llama::adapter::AdapterKey;
use crate::llama::prompt::Turn;
use crate::mind::knowledge::{ChatParts, Knowledge};
use crate::persona::Persona;
use crate::protocol::{CloudUsage, NpcId, Priority, ReplyStats, RequestId, SayOptions};
use crate::sampling::{SamplingParams, StopFilter};

/// An NPC the worker knows: persona, sampling and conversation.
pub(super) struct Conversation {
    /// The persona as the game set it (before revealed secrets joined its knowledge).
    pub(super) persona: Persona,
    /// What its replies are checked against: secrets not yet revealed, the prompt's framing.
    pub(super) guard: Arc<SecretGuard>,
    /// The deflection said last, so the next one differs.
    pub(super) last_deflection: Option<usize>,
    /// How many don't-know reminders it had: which of its `dont_know` lines is the next
    /// example.
    pub(super) dont_know_hints: usize,
    /// Every content word of its persona and lore: a line naming something else is about
    /// what it does not know.
    pub(super) vocabulary: HashSet<String>,
    pub(super) system: String,
    pub(super) sampling: SamplingParams,
    pub(super) turns: Vec<Turn>,
    /// Declared game actions, their grammar, outcomes to tell (see `crate::actions`).
    pub(super) actions: NpcActions,
    /// Escalation settings and what the persona knows.
    pub(super) profile: NpcProfile,
    /// Lore, memories, summary and budget.
    pub(super) knowledge: Knowledge,
    /// The LoRA adapter its replies run through (`None`: the base model); a reply keeps
    /// the one it started with.
    pub(super) adapter: Option<AdapterKey>,
}

impl Conversation {
    /// The next of this NPC's don't-know lines (its persona's `dont_know`, else
    /// [`DEFAULT_DONT_KNOW`](crate::escalation::DEFAULT_DONT_KNOW)), in turn.
    pub(super) fn next_dont_know(&mut self) -> String {
        let own = &self.profile.dont_know;
        let line = if own.is_empty() {
            let defaults = crate::escalation::DEFAULT_DONT_KNOW;
            defaults[self.dont_know_hints % defaults.len()].to_owned()
        } else {
            own[self.dont_know_hints % own.len()].clone()
        };
        self.dont_know_hints += 1;
        line
    }
}

/// What one `decode` call of a step carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// The next token of every speaking NPC, and prompt chunks.
    Both,
    /// Only the next token of every speaking NPC.
    Generated,
    /// Only prompt chunks.
    Prompts,
}

/// One reply being produced, whoever produces it: the text so far through the stop filter
/// and the secret guard, its stats, and what decides how it ends. The local model's
/// [`Job`]s and the inference server's replies (`super::remote`) share it, and end through
/// the same code (`Engine::finish_reply`).
pub(super) struct Reply {
    pub(super) npc: NpcId,
    pub(super) request: RequestId,
    pub(super) line: String,
    pub(super) filter: StopFilter,
    pub(super) max_tokens: u32,
    pub(super) stats: ReplyStats,
    pub(super) received: Instant,
    pub(super) first_token_at: Option<Instant>,
    pub(super) priority: Priority,
    pub(super) deadline: Option<Instant>,
    /// Probability and entropy of each sampled token: local replies a confidence threshold
    /// reads, or all of them with [`RuntimeConfig::confidence_for_every_reply`]; `None`:
    /// not scored.
    ///
    /// [`RuntimeConfig::confidence_for_every_reply`]: crate::RuntimeConfig::confidence_for_every_reply
    pub(super) confidence: Option<TokenConfidence>,
    /// Text is held back until the reply is complete: its confidence decides whether it stays
    /// local (`escalate_held`), or it answers an unfamiliar line (`check_grounding`).
    pub(super) hold: bool,
    pub(super) escalate_held: bool,
    /// The reply answers a line about something the NPC may not know: if it states what the
    /// NPC could not know, a don't-know line replaces it.
    pub(super) check_grounding: bool,
    /// The names in the line the NPC never heard of (see `escalation::grounded`).
    pub(super) unknown: Vec<String>,
    /// The cloud's fact this reply opens with; the NPC remembers it when the reply is done
    /// (if the cloud supplied it for this reply).
    pub(super) fact: Option<String>,
    /// The secret guard over this reply's text.
    pub(super) guard: ReplyGuard,
    pub(super) secrets: Arc<SecretGuard>,
    /// What the NPC says instead of the rest of a reply the guard stopped.
    pub(super) deflection: Option<String>,
}

impl Reply {
    /// What the player got: the text the guard released, and the deflection if it stopped
    /// the reply.
    pub(super) fn spoken(&self) -> String {
        let released = self.guard.released().trim_end();
        match &self.deflection {
            Some(deflection) if released.is_empty() => deflection.clone(),
            Some(deflection) => format!("{released} {deflection}"),
            None => released.to_owned(),
        }
        .trim()
        .to_owned()
    }

    /// What the conversation keeps of the reply: as generated (see [`actions::turn_text`]),
    /// or as spoken when the guard stopped it.
    pub(super) fn turn_text(&self) -> String {
        if self.deflection.is_some() {
            self.spoken()
        } else {
            actions::turn_text(self.filter.text(), self.filter.hidden())
        }
    }

    /// Takes the next piece of the reply's bytes through the stop filter and the guard;
    /// returns the text the player may see now (nothing while the reply is held) and
    /// whether a stop string ended it.
    pub(super) fn push(&mut self, bytes: &[u8]) -> (String, bool) {
        let (text, stopped) = self.filter.push(bytes);
        let guard_started = Instant::now();
        let text = self.guard.push(&self.secrets, &text);
        self.stats.timing.guard += guard_started.elapsed();
        (if self.hold { String::new() } else { text }, stopped)
    }
}

/// One reply the local model is producing: its [`Reply`], and where it stands in its KV
/// sequence.
pub(super) struct Job {
    pub(super) reply: Reply,
    pub(super) slot: usize,
    /// Prompt tokens not yet decoded.
    pub(super) pending: Vec<LlamaToken>,
    pub(super) pending_from: usize,
    /// Prompt tokens placed in the batch being decoded.
    pub(super) in_batch: usize,
    /// Position of the next token in the sequence.
    pub(super) n_past: usize,
    /// Sampled, streamed, not yet decoded.
    pub(super) next_token: Option<LlamaToken>,
    /// Index in the current batch whose logits this job samples from.
    pub(super) logits_at: Option<i32>,
    /// Its `next_token` is in the batch being decoded.
    pub(super) token_in_batch: bool,
    pub(super) sampler: actions::ReplySampler,
    /// The LoRA adapter this reply runs through: its decodes are in its adapter's call.
    pub(super) adapter: Option<AdapterKey>,
}

impl std::ops::Deref for Job {
    type Target = Reply;

    fn deref(&self) -> &Reply {
        &self.reply
    }
}

impl std::ops::DerefMut for Job {
    fn deref_mut(&mut self) -> &mut Reply {
        &mut self.reply
    }
}

/// A reply waiting for a free slot.
#[derive(Clone)]
pub(super) struct Queued {
    pub(super) npc: NpcId,
    pub(super) request: RequestId,
    pub(super) line: String,
    pub(super) options: SayOptions,
    /// When the line fails if it has not started (the game's send time plus its
    /// [`SayOptions::deadline`]; see `scheduler`).
    pub(super) deadline: Option<Instant>,
    /// When the worker took the line: its time to first token counts from here.
    pub(super) received: Instant,
    /// The fact the cloud supplied for this line
    /// ([`CloudRole::Inform`](crate::escalation::CloudRole::Inform)), now or for the same
    /// question before.
    pub(super) fact: Option<String>,
    /// What the cloud spent on it (set even when the fact was unusable).
    pub(super) cloud_fact: Option<CloudUsage>,
    /// The don't-know reminder for a line that matches nothing the NPC knows.
    pub(super) hint: Option<String>,
    /// The names in the line the NPC never heard of.
    pub(super) unknown: Vec<String>,
    /// Time spent deciding where the line goes.
    pub(super) routing: Duration,
    /// The inference server failed on this line: the local model answers it, whatever the
    /// NPC's backend.
    pub(super) local_only: bool,
}

/// A line's prompt, ready for the local model (tokens) or a server (chat messages).
pub(super) struct Prepared {
    pub(super) tokens: Vec<LlamaToken>,
    /// The same prompt before the chat template.
    #[cfg_attr(not(feature = "cloud"), allow(dead_code))]
    pub(super) chat: ChatParts,
    pub(super) sampling: SamplingParams,
    /// The NPC's action grammar (GBNF), if it declares actions.
    pub(super) grammar: Option<String>,
    /// Most tokens the prompt may take: the context less the reply's room, within the
    /// persona's budget.
    pub(super) budget: usize,
}

/// A prewarm in progress: the NPC and the tokens it has computed so far.
pub(super) struct Prewarm {
    pub(super) npc: NpcId,
    pub(super) computed: usize,
}
