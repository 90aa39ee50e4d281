//! The end of a reply: the guard's last word, the held-reply checks, the turn the
//! conversation keeps, the action it asked for, and the events.

use std::time::Instant;

use crate::actions;
use crate::escalation::{Decision, TokenConfidence};
use crate::guard::ReplyGuard;
use crate::llama::prompt::Turn;
use crate::protocol::{Event, FinishReason, NpcError, ReplySource};

use super::Engine;
use super::sequence::{Job, Reply};

/// Importance of a fact the cloud supplied, as the NPC remembers it (mid-scale: recalled
/// when a line shares its words, not always).
const LEARNED_FACT_IMPORTANCE: u8 = 5;

impl Engine<'_, '_> {
    /// A local reply ended (`reason`): its sequence slot is free, then
    /// [`Engine::finish_reply`].
    pub(super) fn finish(&mut self, job: Job, reason: FinishReason) {
        self.kv.release(job.slot);
        self.finish_reply(job.reply, reason);
    }

    /// A reply ended (`reason`): the stop filter's and the guard's last text goes out (or,
    /// for a held reply, the checks decide what does), then [`Engine::conclude`].
    pub(super) fn finish_reply(&mut self, mut job: Reply, mut reason: FinishReason) {
        let tail = job.filter.finish();
        let guard_started = Instant::now();
        let mut tail = job.guard.push(&job.secrets, &tail);
        tail.push_str(&job.guard.finish(&job.secrets));
        if let Some(breach) = job.guard.breach() {
            reason = FinishReason::Guarded;
            let deflection = self.npcs.get_mut(&job.npc).map(|c| {
                let (at, line) = c.guard.deflection(c.last_deflection);
                c.last_deflection = Some(at);
                line.to_owned()
            });
            tracing::info!("NPC {:?}: the guard stopped a reply ({breach:?})", job.npc);
            tail = match &deflection {
                Some(d) if job.guard.released().trim().is_empty() => d.clone(),
                Some(d) if job.guard.released().ends_with(char::is_whitespace) => d.clone(),
                Some(d) => format!(" {d}"),
                None => String::new(),
            };
            job.deflection = deflection;
        }
        job.stats.timing.guard += guard_started.elapsed();
        job.stats.finish = reason;
        job.stats.confidence = job.confidence.as_ref().and_then(TokenConfidence::summary);
        let out = if job.hold {
            // Nothing was streamed: the whole reply goes out now, if it stays.
            match self.settle_held(&mut job) {
                Some(text) => text,
                None => return,
            }
        } else {
            tail
        };
        if !out.is_empty() {
            self.emit(Event::Delta {
                npc: job.npc,
                request: job.request,
                text: out,
            });
        }
        self.conclude(job);
    }

    /// A held reply is complete: `None` when its confidence sends the line to the cloud (or
    /// the fallback line) instead; else the text to send, the NPC's don't-know line when
    /// the grounding check finds it stated what it cannot know.
    fn settle_held(&mut self, job: &mut Reply) -> Option<String> {
        let text = job.spoken();
        let decision = match self.npcs.get(&job.npc) {
            Some(c) if job.escalate_held => self.escalator.second_opinion(
                job.npc,
                job.request,
                &job.line,
                &text,
                job.stats.confidence.as_ref(),
                &c.profile,
                &c.turns,
                self.events,
            ),
            _ => Decision::Local,
        };
        match decision {
            Decision::Local => {}
            Decision::Cloud => return None,
            Decision::Fallback(said) => {
                self.reply_with_fallback(job.npc, job.request, job.line.clone(), said);
                return None;
            }
        }
        if job.check_grounding
            && let Some(c) = self.npcs.get_mut(&job.npc)
        {
            let started = Instant::now();
            let mut heard: Vec<&str> = vec![job.line.as_str()];
            for turn in &c.turns {
                heard.extend([turn.player.as_str(), turn.npc.as_str()]);
            }
            if !crate::escalation::grounded(&text, &c.vocabulary, &heard, &job.unknown) {
                tracing::info!(
                    "NPC {:?}: a reply stated what it cannot know: {text:?}",
                    job.npc
                );
                job.deflection = Some(c.next_dont_know());
                job.guard = ReplyGuard::default();
                job.stats.source = ReplySource::Fallback;
            }
            job.stats.timing.routing += started.elapsed();
        }
        Some(job.spoken())
    }

    /// The one end of every reply, local or remote: the conversation keeps the turn (and a
    /// fact the cloud supplied for it), the game gets the action it asked for and the reply.
    fn conclude(&mut self, job: Reply) {
        let text = job.spoken();
        let turn_text = job.turn_text();
        let mut action = None;
        if let Some(conversation) = self.npcs.get_mut(&job.npc) {
            if job.deflection.is_none() {
                action = actions::parse_action(&conversation.actions.specs, job.filter.hidden());
            }
            conversation.knowledge.learn_from(&job.line);
            if let Some(fact) = job.fact.as_ref().filter(|_| job.stats.cloud_fact.is_some()) {
                conversation.knowledge.memories.remember(
                    &crate::escalation::learned_memory(&job.line, fact),
                    LEARNED_FACT_IMPORTANCE,
                );
            }
            conversation.turns.push(self.prompts.sanitize_turn(Turn {
                player: job.line,
                npc: turn_text,
            }));
        }
        if let Some(action) = action {
            self.emit(Event::ActionRequested {
                npc: job.npc,
                request: job.request,
                action,
            });
        }
        self.emit(Event::Replied {
            npc: job.npc,
            request: job.request,
            text,
            stats: job.stats,
        });
    }

    /// A decode failed: the batch's state is unknown, so every active reply fails and its
    /// sequence is cleared (to be recomputed on the next turn).
    pub(super) fn fail_all(&mut self, reason: &str) {
        self.fail_active(reason, |_| true);
    }

    /// The active replies `pick` chooses fail with `reason`; their sequences are cleared
    /// (to be recomputed on the next turn) and the rest go on.
    pub(super) fn fail_active(&mut self, reason: &str, pick: impl Fn(&Job) -> bool) {
        tracing::error!("npc_native: {reason}");
        let (failed, kept): (Vec<Job>, Vec<Job>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|job| pick(job));
        self.active = kept;
        for job in failed {
            if let Some(ctx) = self.ctx.as_mut() {
                self.kv.clear(ctx, job.slot);
            }
            self.emit(Event::Failed {
                npc: job.npc,
                request: job.request,
                error: NpcError::Inference(reason.to_owned()),
            });
        }
    }
}
