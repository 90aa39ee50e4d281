//! The KV cache manager: which NPC conversation lives in which sequence of the shared
//! llama.cpp context, and which tokens that sequence already holds.
//!
//! A new turn computes only the tokens past the longest common prefix with what the
//! sequence already holds: the persona and earlier turns are never computed twice while
//! the NPC keeps its slot. When every slot is taken, the least recently used idle
//! conversation loses its slot: its KV state moves to RAM (up to a byte budget, least
//! recently evicted dropped first) and is restored when it speaks again; past the budget its
//! text is kept and its KV recomputed.

use std::collections::VecDeque;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::token::LlamaToken;

use crate::protocol::NpcId;

/// A sequence's KV state outside the context: the tokens it holds and llama.cpp's bytes.
#[derive(Debug, Default)]
pub(crate) struct SeqSnapshot {
    pub(crate) tokens: Vec<LlamaToken>,
    pub(crate) bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct Slot {
    owner: Option<NpcId>,
    /// Tokens whose keys and values are in this sequence, in position order.
    tokens: Vec<LlamaToken>,
    last_used: u64,
    busy: bool,
}

/// Sequence slots of one context, and the snapshots of evicted ones.
#[derive(Debug)]
pub(crate) struct KvCacheManager {
    slots: Vec<Slot>,
    clock: u64,
    /// `false` disables prefix reuse (every turn recomputes its whole prompt): the baseline
    /// that benchmarks compare against.
    reuse: bool,
    evicted: VecDeque<(NpcId, SeqSnapshot)>,
    evicted_bytes: usize,
    ram_budget: usize,
}

impl KvCacheManager {
    pub(crate) fn new(slots: u32, reuse: bool, ram_budget: usize) -> Self {
        Self {
            slots: (0..slots).map(|_| Slot::default()).collect(),
            clock: 0,
            reuse,
            evicted: VecDeque::new(),
            evicted_bytes: 0,
            ram_budget,
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
            self.evict(ctx, index);
            self.slots[index].owner = Some(npc);
            if let Some(at) = self.evicted.iter().position(|(owner, _)| *owner == npc) {
                let (_, snapshot) = self.evicted.remove(at).expect("position is in range");
                self.evicted_bytes -= snapshot.bytes.len();
                self.restore(ctx, index, snapshot);
            }
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
        if !self.reuse {
            self.clear_tokens(ctx, index);
            return 0;
        }
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
                self.clear_tokens(ctx, index);
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
        self.clear_tokens(ctx, index);
        let slot = &mut self.slots[index];
        slot.owner = None;
        slot.busy = false;
    }

    /// Empties the sequence of slot `index`, keeping its owner.
    fn clear_tokens(&mut self, ctx: &mut LlamaContext<'_>, index: usize) {
        let slot = &mut self.slots[index];
        if !slot.tokens.is_empty() {
            // Removing a whole sequence cannot fail for a valid id.
            let _ = ctx.clear_kv_cache_seq(u32::try_from(index).ok(), None, None);
        }
        slot.tokens.clear();
    }

    /// Moves slot `index`'s state to RAM (if it has an owner and fits the budget), then
    /// empties the slot.
    fn evict(&mut self, ctx: &mut LlamaContext<'_>, index: usize) {
        let owner = self.slots[index].owner.filter(|_| self.ram_budget > 0);
        let snapshot = owner.and_then(|owner| Some((owner, self.snapshot_slot(ctx, index)?)));
        if let Some((owner, snapshot)) = snapshot {
            self.evicted_bytes += snapshot.bytes.len();
            self.evicted.push_back((owner, snapshot));
            while self.evicted_bytes > self.ram_budget {
                let Some((_, dropped)) = self.evicted.pop_front() else {
                    break;
                };
                self.evicted_bytes -= dropped.bytes.len();
            }
        }
        self.clear(ctx, index);
    }

    /// Drops everything an NPC has cached.
    pub(crate) fn forget(&mut self, ctx: &mut LlamaContext<'_>, npc: NpcId) {
        if let Some(index) = self.slots.iter().position(|slot| slot.owner == Some(npc)) {
            self.clear(ctx, index);
        }
        if let Some(at) = self.evicted.iter().position(|(owner, _)| *owner == npc) {
            let (_, dropped) = self.evicted.remove(at).expect("position is in range");
            self.evicted_bytes -= dropped.bytes.len();
        }
    }

    /// The KV state `npc` has, wherever it is (a slot or RAM), without disturbing it.
    pub(crate) fn snapshot(&self, ctx: &LlamaContext<'_>, npc: NpcId) -> Option<SeqSnapshot> {
        if let Some(index) = self.slots.iter().position(|slot| slot.owner == Some(npc)) {
            return self.snapshot_slot(ctx, index);
        }
        self.evicted
            .iter()
            .find(|(owner, _)| *owner == npc)
            .map(|(_, s)| SeqSnapshot {
                tokens: s.tokens.clone(),
                bytes: s.bytes.clone(),
            })
    }

    fn snapshot_slot(&self, ctx: &LlamaContext<'_>, index: usize) -> Option<SeqSnapshot> {
        let tokens = &self.slots[index].tokens;
        if tokens.is_empty() {
            return None;
        }
        let flags = LlamaStateSeqFlags::empty();
        let size = ctx.state_seq_get_size_ext(seq_id(index), flags);
        let mut bytes = vec![0u8; size];
        // SAFETY: `bytes` holds exactly the size llama.cpp reported for this sequence.
        let written =
            unsafe { ctx.state_seq_get_data_ext(bytes.as_mut_ptr(), seq_id(index), flags) };
        (written == size).then(|| SeqSnapshot {
            tokens: tokens.clone(),
            bytes,
        })
    }

    /// Puts a snapshot into the (empty) sequence of slot `index`. Returns `false`, leaving
    /// the slot empty, if llama.cpp refuses it.
    fn restore(&mut self, ctx: &mut LlamaContext<'_>, index: usize, snapshot: SeqSnapshot) -> bool {
        // SAFETY: snapshots come from `snapshot_slot` of this context, or from a state file
        // whose checksum and identity (model, template, context shape) were verified.
        let restored = unsafe {
            ctx.state_seq_set_data_ext(&snapshot.bytes, seq_id(index), LlamaStateSeqFlags::empty())
        };
        if restored {
            self.slots[index].tokens = snapshot.tokens;
        } else {
            let _ = ctx.clear_kv_cache_seq(u32::try_from(index).ok(), None, None);
        }
        restored
    }

    /// Gives `npc` the state in `snapshot` (from a save file), replacing what it had.
    ///
    /// # Errors
    /// Why the state could not be put in place: every slot is busy replying, or llama.cpp
    /// refused the bytes. The NPC then has no KV state and recomputes on its next turn.
    pub(crate) fn load(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        npc: NpcId,
        snapshot: SeqSnapshot,
    ) -> Result<(), &'static str> {
        self.forget(ctx, npc);
        let Some(index) = self.acquire(ctx, npc) else {
            return Err("every KV slot is busy replying");
        };
        let restored = self.restore(ctx, index, snapshot);
        self.release(index);
        if restored {
            Ok(())
        } else {
            Err("llama.cpp refused the saved KV state")
        }
    }
}

/// The llama.cpp sequence id of slot `index`.
pub(crate) fn seq_id(index: usize) -> i32 {
    i32::try_from(index).expect("slots are limited to 64")
}
