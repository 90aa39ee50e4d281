//! Work done when no reply waits: prewarming NPCs' prompt prefixes, then model-written
//! summaries.

use crate::kv::cache::seq_id;
use crate::protocol::{Event, NpcId};

use super::{Engine, pos};

/// Most prompt tokens one prewarm step computes: a player line that arrives meanwhile waits at
/// most this long (about 0.2 s with the default model on 2 cores).
const PREWARM_CHUNK: usize = 32;

impl Engine<'_, '_> {
    /// One chunk of the oldest prewarm ([`RuntimeConfig::prewarm`]): up to
    /// [`PREWARM_CHUNK`] tokens of the NPC's prompt prefix into its KV sequence. Returns
    /// `false` when no prewarm was waiting.
    pub(super) fn step_prewarm(&mut self) -> bool {
        while let Some(front) = self.prewarm.front() {
            let npc = front.npc;
            match self.prewarm_chunk(npc) {
                Ok(None) => return true,
                Ok(Some(prefix_tokens)) => {
                    let done = self.prewarm.pop_front().expect("front exists");
                    self.emit(Event::Prewarmed {
                        npc,
                        prefix_tokens,
                        computed_tokens: done.computed,
                    });
                }
                Err(why) => {
                    self.prewarm.pop_front();
                    tracing::debug!("NPC {npc:?}: no prewarm ({why})");
                }
            }
        }
        false
    }

    /// Computes the next chunk of `npc`'s prefix. `Ok(Some(tokens))` when the whole prefix
    /// is cached, `Ok(None)` after a chunk, `Err` when the prewarm is dropped.
    pub(super) fn prewarm_chunk(&mut self, npc: NpcId) -> Result<Option<usize>, String> {
        let conversation = self.npcs.get(&npc).ok_or("the NPC is gone")?;
        let target = conversation
            .knowledge
            .stable_prefix(
                &self.prompts,
                self.model,
                &conversation.system,
                &conversation.turns,
            )
            .map_err(|err| err.to_string())?;
        let adapter = conversation.adapter;
        let tag = self.adapters.tag(adapter);
        let room = self
            .context_per_npc
            .saturating_sub(conversation.sampling.max_tokens as usize);
        if target.is_empty() || target.len() >= room {
            return Err(format!(
                "a prefix of {} tokens leaves no room",
                target.len()
            ));
        }
        let ctx = self.ctx.as_mut().ok_or("no local model")?;
        let slot = self.kv.acquire_unused(ctx, npc).ok_or("no free KV slot")?;
        let held = self.kv.tokens_under(slot, &tag);
        let common = held.iter().zip(&target).take_while(|(a, b)| a == b).count();
        let cached = if common == target.len() {
            // Already there (this NPC's cache may hold more: never cut it back).
            common
        } else {
            self.kv
                .reuse_prefix_leaving(ctx, slot, &target, &tag, 0)
                .cached
        };
        if cached >= target.len() {
            self.kv.release(slot);
            return Ok(Some(target.len()));
        }
        let end = target.len().min(cached + PREWARM_CHUNK);
        self.batch.clear();
        for (at, &token) in target.iter().enumerate().take(end).skip(cached) {
            if self
                .batch
                .add(token, pos(at), &[seq_id(slot)], false)
                .is_err()
            {
                self.kv.release(slot);
                return Err("the batch is smaller than a prewarm chunk".into());
            }
        }
        if let Err(err) = self.adapters.apply(ctx, adapter) {
            self.kv.release(slot);
            return Err(format!("the LoRA adapter could not be set: {err}"));
        }
        let decoded = ctx.decode(&mut self.batch);
        self.kv.decoded();
        if let Err(err) = decoded {
            self.kv.clear(ctx, slot);
            return Err(format!("decode failed: {err}"));
        }
        for &token in &target[cached..end] {
            self.kv.push(slot, token);
        }
        self.kv.release(slot);
        if let Some(prewarm) = self.prewarm.front_mut() {
            prewarm.computed += end - cached;
        }
        Ok(None)
    }

    /// Drops `npc`'s prewarm, if it has one waiting (it is about to speak or be replaced).
    pub(super) fn drop_prewarm(&mut self, npc: NpcId) {
        self.prewarm.retain(|prewarm| prewarm.npc != npc);
    }

    /// Whether a summary job is running or due.
    pub(super) fn summary_work(&self) -> bool {
        self.summarizer.busy()
            || (self.summarizer.available()
                && self
                    .npcs
                    .iter()
                    .any(|(&npc, c)| c.knowledge.summary_due(npc, &c.turns).is_some()))
    }

    /// One small step of the summary job, starting the next due one if none runs.
    pub(super) fn step_summary(&mut self) {
        let finished = if let Some(npc) = self.summarizer.running_npc() {
            if !self.npcs.contains_key(&npc) {
                self.summarizer.cancel(npc);
                return;
            }
            self.summarizer.step(self.model, &self.prompts)
        } else {
            if !self.summarizer.available() {
                return;
            }
            // Lowest NPC id first, so the order does not depend on the map.
            let due = self
                .npcs
                .iter()
                .filter_map(|(&npc, c)| c.knowledge.summary_due(npc, &c.turns))
                .min_by_key(|input| input.npc.0);
            let Some(input) = due else { return };
            self.summarizer.start(self.model, &self.prompts, input)
        };
        let Some(done) = finished else { return };
        let Some(conversation) = self.npcs.get_mut(&done.npc) else {
            return;
        };
        let changed = conversation
            .knowledge
            .apply_written(&conversation.turns, &done);
        if changed || conversation.knowledge.summary.written_turns == done.to {
            self.emit(Event::SummaryWritten {
                npc: done.npc,
                summarised_turns: done.to,
                text: done.text,
            });
        }
    }
}
