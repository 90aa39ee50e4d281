//! The KV cache manager: which NPC conversation lives in which sequence of the shared
//! llama.cpp context, and which tokens that sequence already holds.
//!
//! A new turn computes only the tokens past the longest common prefix with what the
//! sequence already holds: the persona and earlier turns are never computed twice while
//! the NPC keeps its slot. When every slot is taken, the least recently used idle
//! conversation loses its slot (its text is kept; its KV is recomputed when it speaks again).

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::token::LlamaToken;

use crate::protocol::NpcId;

#[derive(Debug, Default)]
struct Slot {
    owner: Option<NpcId>,
    /// Tokens whose keys and values are in this sequence, in position order.
    tokens: Vec<LlamaToken>,
    last_used: u64,
    busy: bool,
}

/// Sequence slots of one context.
#[derive(Debug)]
pub(crate) struct KvCacheManager {
    slots: Vec<Slot>,
    clock: u64,
}

impl KvCacheManager {
    pub(crate) fn new(slots: u32) -> Self {
        Self {
            slots: (0..slots).map(|_| Slot::default()).collect(),
            clock: 0,
        }
    }

    /// A slot for `npc` for one reply, marked busy: its own if it has one, else a free one,
    /// else the least recently used idle one (evicted). `None` when every slot is busy.
    pub(crate) fn acquire(&mut self, ctx: &mut LlamaContext<'_>, npc: NpcId) -> Option<usize> {
        let index = self
            .slots
            .iter()
            .position(|slot| slot.owner == Some(npc) && !slot.busy)
            .or_else(|| self.slots.iter().position(|slot| slot.owner.is_none()))
            .or_else(|| {
                self.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, slot)| !slot.busy)
                    .min_by_key(|(_, slot)| slot.last_used)
                    .map(|(index, _)| index)
            })?;
        if self.slots[index].owner != Some(npc) {
            self.clear(ctx, index);
            self.slots[index].owner = Some(npc);
        }
        self.clock += 1;
        let slot = &mut self.slots[index];
        slot.busy = true;
        slot.last_used = self.clock;
        Some(index)
    }

    /// Prepares slot `index` to continue into `prompt`: keeps the longest common prefix,
    /// drops the rest. Returns how many prompt tokens are already cached. At least the
    /// last prompt token is always left to compute, since its logits start the reply.
    pub(crate) fn reuse_prefix(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        index: usize,
        prompt: &[LlamaToken],
    ) -> usize {
        let slot = &self.slots[index];
        let common = slot
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len().saturating_sub(1));
        if common < slot.tokens.len() {
            let removed = u32::try_from(common)
                .ok()
                .and_then(|p0| ctx.kv_cache_seq_rm(seq_id(index), Some(p0), None).ok());
            if removed.is_none() {
                self.clear(ctx, index);
                return 0;
            }
            self.slots[index].tokens.truncate(common);
        }
        common
    }

    /// Records tokens just decoded into slot `index`.
    pub(crate) fn push(&mut self, index: usize, token: LlamaToken) {
        self.slots[index].tokens.push(token);
    }

    /// The slot's reply is over; it stays resident until evicted.
    pub(crate) fn release(&mut self, index: usize) {
        self.slots[index].busy = false;
    }

    /// Empties slot `index` and its sequence (after a failed decode, or to evict it).
    pub(crate) fn clear(&mut self, ctx: &mut LlamaContext<'_>, index: usize) {
        let slot = &mut self.slots[index];
        if !slot.tokens.is_empty() {
            // Removing a whole sequence cannot fail for a valid id.
            let _ = ctx.clear_kv_cache_seq(u32::try_from(index).ok(), None, None);
        }
        slot.tokens.clear();
        slot.owner = None;
        slot.busy = false;
    }

    /// Drops everything an NPC has cached.
    pub(crate) fn forget(&mut self, ctx: &mut LlamaContext<'_>, npc: NpcId) {
        if let Some(index) = self.slots.iter().position(|slot| slot.owner == Some(npc)) {
            self.clear(ctx, index);
        }
    }
}

/// The llama.cpp sequence id of slot `index`.
pub(crate) fn seq_id(index: usize) -> i32 {
    i32::try_from(index).expect("slots are limited to 64")
}
