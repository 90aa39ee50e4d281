//! The KV cache manager: which NPC conversation lives in which sequence of the shared
//! llama.cpp context, and which tokens that sequence already holds.
//!
//! A new turn computes only the tokens past the longest common prefix with what the
//! sequence already holds: the persona and earlier turns are never computed twice while
//! the NPC keeps its slot. When every slot is taken, the least recently used idle
//! conversation loses its slot: its KV state moves to RAM (up to a byte budget), past that
//! the least recently evicted states move on to files on disk (up to a second budget), and
//! a state is restored when its NPC speaks again. Past both budgets the oldest state is
//! dropped: the conversation text is kept and its KV recomputed.

use std::collections::VecDeque;
use std::fs;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use crate::kv::layout::KvLayout;
use crate::types::NpcId;

/// A sequence's KV state outside the context: the tokens it holds, the adapter they were
/// computed with and llama.cpp's bytes.
#[derive(Debug, Default)]
pub(crate) struct SeqSnapshot {
    pub(crate) tokens: Vec<LlamaToken>,
    /// The LoRA adapter's tag (`Adapters::tag` in `crate::llama::adapter`): empty for the
    /// base model.
    pub(crate) adapter: String,
    pub(crate) bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct Slot {
    owner: Option<NpcId>,
    /// Tokens whose keys and values are in this sequence, in position order.
    tokens: Vec<LlamaToken>,
    /// The LoRA adapter they were computed with (empty: the base model). Keys and values
    /// depend on it: a prompt under another adapter reuses none of them.
    adapter: String,
    last_used: u64,
    busy: bool,
    /// Keys and values were copied from another sequence; llama.cpp moves the bytes at the
    /// start of the next decode, so until then the sequence cannot be snapshotted.
    copy_pending: bool,
}

/// Fewest extra prompt tokens another NPC's sequence must offer before its whole KV buffer
/// is copied (cheaper than computing them only past a few dozen tokens).
const MIN_SHARED_GAIN: usize = 32;

/// How a prompt's start was found in the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PrefixReuse {
    /// Prompt tokens already in the sequence: not computed again.
    pub(crate) cached: usize,
    /// Of those, tokens copied from another NPC's sequence (the shared preamble).
    pub(crate) copied: usize,
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
    disk: DiskTier,
    /// Cells one sequence holds.
    context: usize,
    /// What every snapshot must look like before llama.cpp gets it (see [`KvLayout`]); the
    /// error says why none can be restored.
    layout: Result<KvLayout, String>,
}

/// Where evicted KV state goes when RAM is full.
#[derive(Debug, Clone)]
pub(crate) struct DiskConfig {
    /// Bytes of files allowed; 0 disables the disk tier.
    pub(crate) budget: u64,
    /// The directory, created on first use; `None` picks one under the temporary directory.
    pub(crate) dir: Option<PathBuf>,
}

/// Evicted states on disk: the tokens stay in RAM (4 bytes each), the KV bytes in a file.
#[derive(Debug)]
struct DiskTier {
    config: DiskConfig,
    /// Distinguishes this runtime's files from another's in the same directory.
    instance: u64,
    dir: Option<PathBuf>,
    files: VecDeque<DiskState>,
    bytes: u64,
    next_file: u64,
}

#[derive(Debug)]
struct DiskState {
    owner: NpcId,
    tokens: Vec<LlamaToken>,
    adapter: String,
    path: PathBuf,
    len: u64,
    sha256: [u8; 32],
}

impl DiskTier {
    fn new(config: DiskConfig) -> Self {
        static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Self {
            config,
            instance: INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            dir: None,
            files: VecDeque::new(),
            bytes: 0,
            next_file: 0,
        }
    }

    /// Writes `snapshot` to a file, dropping the oldest files past the budget. Returns
    /// `false` (the state is then dropped) when it does not fit or cannot be written.
    fn store(&mut self, owner: NpcId, snapshot: SeqSnapshot) -> bool {
        let len = snapshot.bytes.len() as u64;
        if len > self.config.budget {
            return false;
        }
        let dir = match &self.dir {
            Some(dir) => dir.clone(),
            None => {
                let dir = self.config.dir.clone().unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("bevy_npc_ai-kv-{}", std::process::id()))
                });
                if let Err(err) = fs::create_dir_all(&dir) {
                    tracing::warn!("cannot create {} for evicted KV: {err}", dir.display());
                    return false;
                }
                self.dir = Some(dir.clone());
                dir
            }
        };
        while self.bytes + len > self.config.budget {
            let Some(dropped) = self.files.pop_front() else {
                break;
            };
            self.remove(&dropped);
        }
        self.next_file += 1;
        let path = dir.join(format!(
            "runtime{}-npc{}-{}.kv",
            self.instance, owner.0, self.next_file
        ));
        if let Err(err) = fs::write(&path, &snapshot.bytes) {
            tracing::warn!("cannot write evicted KV to {}: {err}", path.display());
            let _ = fs::remove_file(&path);
            return false;
        }
        self.bytes += len;
        self.files.push_back(DiskState {
            owner,
            tokens: snapshot.tokens,
            adapter: snapshot.adapter,
            path,
            len,
            sha256: Sha256::digest(&snapshot.bytes).into(),
        });
        true
    }

    /// Takes `owner`'s state off disk: `None` if it has none there or the file no longer
    /// holds what was written (it is then dropped and the KV recomputed).
    fn take(&mut self, owner: NpcId) -> Option<SeqSnapshot> {
        let at = self.files.iter().position(|state| state.owner == owner)?;
        let state = self.files.remove(at).expect("position is in range");
        let bytes = fs::read(&state.path);
        self.remove(&state);
        match bytes {
            Ok(bytes) if Sha256::digest(&bytes).as_slice() == state.sha256 => Some(SeqSnapshot {
                tokens: state.tokens,
                adapter: state.adapter,
                bytes,
            }),
            Ok(_) => {
                tracing::warn!(
                    "evicted KV in {} changed on disk; recomputing",
                    state.path.display()
                );
                None
            }
            Err(err) => {
                tracing::warn!(
                    "cannot read evicted KV {}: {err}; recomputing",
                    state.path.display()
                );
                None
            }
        }
    }

    /// A copy of `owner`'s state on disk, left in place.
    fn peek(&self, owner: NpcId) -> Option<SeqSnapshot> {
        let state = self.files.iter().find(|state| state.owner == owner)?;
        let bytes = fs::read(&state.path).ok()?;
        (Sha256::digest(&bytes).as_slice() == state.sha256).then(|| SeqSnapshot {
            tokens: state.tokens.clone(),
            adapter: state.adapter.clone(),
            bytes,
        })
    }

    fn forget(&mut self, owner: NpcId) {
        if let Some(at) = self.files.iter().position(|state| state.owner == owner) {
            let state = self.files.remove(at).expect("position is in range");
            self.remove(&state);
        }
    }

    fn remove(&mut self, state: &DiskState) {
        self.bytes -= state.len;
        let _ = fs::remove_file(&state.path);
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        for state in std::mem::take(&mut self.files) {
            let _ = fs::remove_file(&state.path);
        }
        // Only a directory this runtime made for itself is removed (and only if empty).
        if let (None, Some(dir)) = (&self.config.dir, &self.dir) {
            let _ = fs::remove_dir(dir);
        }
    }
}

impl KvCacheManager {
    pub(crate) fn new(
        slots: u32,
        reuse: bool,
        ram_budget: usize,
        disk: DiskConfig,
        context: usize,
        layout: Result<KvLayout, String>,
    ) -> Self {
        Self {
            context,
            layout,
            slots: (0..slots).map(|_| Slot::default()).collect(),
            clock: 0,
            reuse,
            evicted: VecDeque::new(),
            evicted_bytes: 0,
            ram_budget,
            disk: DiskTier::new(disk),
        }
    }

    /// A slot for `npc` for one reply, marked busy: its own if it has one, else a free one,
    /// else the least recently used idle one (evicted). `None` when every slot is busy.
    pub(crate) fn acquire(&mut self, ctx: &mut LlamaContext<'_>, npc: NpcId) -> Option<usize> {
        self.acquire_with(ctx, npc, true)
    }

    /// [`acquire`](Self::acquire) without evicting anyone: `npc`'s own slot or a free one.
    /// For background work (a prewarm), which must not push a conversation out of its slot.
    pub(crate) fn acquire_unused(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        npc: NpcId,
    ) -> Option<usize> {
        self.acquire_with(ctx, npc, false)
    }

    fn acquire_with(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        npc: NpcId,
        evict: bool,
    ) -> Option<usize> {
        let index = self
            .slots
            .iter()
            .position(|slot| slot.owner == Some(npc) && !slot.busy)
            .or_else(|| self.slots.iter().position(|slot| slot.owner.is_none()))
            .or_else(|| {
                self.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, slot)| evict && !slot.busy)
                    .min_by_key(|(_, slot)| slot.last_used)
                    .map(|(index, _)| index)
            })?;
        if self.slots[index].owner != Some(npc) {
            self.evict(ctx, index);
            self.slots[index].owner = Some(npc);
            if let Some(at) = self.evicted.iter().position(|(owner, _)| *owner == npc) {
                let (_, snapshot) = self.evicted.remove(at).expect("position is in range");
                self.evicted_bytes -= snapshot.bytes.len();
                self.restore_evicted(ctx, index, npc, snapshot);
            } else if let Some(snapshot) = self.disk.take(npc) {
                self.restore_evicted(ctx, index, npc, snapshot);
            }
        }
        self.clock += 1;
        let slot = &mut self.slots[index];
        slot.busy = true;
        slot.last_used = self.clock;
        Some(index)
    }

    /// Prepares slot `index` to continue into `prompt`: keeps the longest common prefix,
    /// drops the rest. When another slot shares a longer start with `prompt` (the world
    /// preamble every NPC begins with), that sequence is copied in instead. At least the
    /// last prompt token is always left to compute, since its logits start the reply. Only
    /// tokens computed with the same `adapter` (its tag; empty for the base model) count.
    pub(crate) fn reuse_prefix(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        index: usize,
        prompt: &[LlamaToken],
        adapter: &str,
    ) -> PrefixReuse {
        self.reuse_prefix_leaving(ctx, index, prompt, adapter, 1)
    }

    /// [`reuse_prefix`](Self::reuse_prefix) that leaves at least `uncomputed` tokens of
    /// `prompt` to compute: 1 for a reply (its last token's logits start it), 0 for a prewarm,
    /// which only fills the cache.
    pub(crate) fn reuse_prefix_leaving(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        index: usize,
        prompt: &[LlamaToken],
        adapter: &str,
        uncomputed: usize,
    ) -> PrefixReuse {
        if self.slots[index].adapter != adapter {
            // Computed under another adapter (the persona changed it): nothing is reusable.
            self.clear_tokens(ctx, index);
            adapter.clone_into(&mut self.slots[index].adapter);
        }
        if !self.reuse {
            self.clear_tokens(ctx, index);
            return PrefixReuse::default();
        }
        let usable = prompt.len().saturating_sub(uncomputed);
        let common_with = |tokens: &[LlamaToken]| {
            tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(usable)
        };
        let common = common_with(&self.slots[index].tokens);
        let donor = self
            .slots
            .iter()
            .enumerate()
            .filter(|(other, slot)| {
                *other != index && !slot.copy_pending && slot.adapter == adapter
            })
            .map(|(other, slot)| (other, common_with(&slot.tokens)))
            .max_by_key(|&(_, shared)| shared)
            .filter(|&(_, shared)| shared >= common + MIN_SHARED_GAIN);
        if let Some((donor, shared)) = donor
            && self.copy_from(ctx, donor, index, shared)
        {
            return PrefixReuse {
                cached: shared,
                copied: shared,
            };
        }
        let slot = &self.slots[index];
        if common < slot.tokens.len() {
            let removed = u32::try_from(common)
                .ok()
                .and_then(|p0| ctx.kv_cache_seq_rm(seq_id(index), Some(p0), None).ok());
            if removed.is_none() {
                self.clear_tokens(ctx, index);
                return PrefixReuse::default();
            }
            self.slots[index].tokens.truncate(common);
        }
        PrefixReuse {
            cached: common,
            copied: 0,
        }
    }

    /// Replaces slot `to`'s sequence with the first `keep` tokens of slot `from`'s.
    ///
    /// With one KV stream per sequence, llama.cpp copies only whole sequences across streams
    /// (a partial range aborts the process), so the whole sequence is copied and its tail
    /// then removed. Returns `false`, leaving `to` empty, if llama.cpp refuses.
    fn copy_from(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        from: usize,
        to: usize,
        keep: usize,
    ) -> bool {
        self.clear_tokens(ctx, to);
        let Ok(p0) = u32::try_from(keep) else {
            return false;
        };
        let copied = ctx
            .copy_kv_cache_seq(seq_id(from), seq_id(to), None, None)
            .is_ok()
            && ctx.kv_cache_seq_rm(seq_id(to), Some(p0), None).is_ok();
        if !copied {
            let _ = ctx.clear_kv_cache_seq(u32::try_from(to).ok(), None, None);
            return false;
        }
        let tokens = self.slots[from].tokens[..keep].to_vec();
        let slot = &mut self.slots[to];
        slot.tokens = tokens;
        slot.copy_pending = true;
        true
    }

    /// Makes llama.cpp carry out pending sequence copies now, with a one-token decode into
    /// the empty slot `scratch` (then emptied again). Needed before bytes are written into a
    /// sequence directly: a copy carried out later would overwrite them.
    fn flush_copies(&mut self, ctx: &mut LlamaContext<'_>, scratch: usize) {
        if !self.slots.iter().any(|slot| slot.copy_pending) {
            return;
        }
        let mut batch = LlamaBatch::new(1, 1);
        let flushed = batch
            .add(LlamaToken(0), 0, &[seq_id(scratch)], false)
            .is_ok()
            && ctx.decode(&mut batch).is_ok();
        let _ = ctx.clear_kv_cache_seq(u32::try_from(scratch).ok(), None, None);
        if flushed {
            self.decoded();
        } else {
            // The copies did not happen: forget what those slots were to receive.
            for index in 0..self.slots.len() {
                if self.slots[index].copy_pending {
                    self.clear_tokens(ctx, index);
                    self.slots[index].copy_pending = false;
                }
            }
        }
    }

    /// A decode has run: llama.cpp has carried out every pending sequence copy.
    pub(crate) fn decoded(&mut self) {
        for slot in &mut self.slots {
            slot.copy_pending = false;
        }
    }

    /// The tokens slot `index` holds, in position order, if they were computed under
    /// `adapter` (its tag), else none.
    pub(crate) fn tokens_under(&self, index: usize, adapter: &str) -> &[LlamaToken] {
        let slot = &self.slots[index];
        if slot.adapter == adapter {
            &slot.tokens
        } else {
            &[]
        }
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
        if !slot.tokens.is_empty() || slot.copy_pending {
            // Removing a whole sequence cannot fail for a valid id.
            let _ = ctx.clear_kv_cache_seq(u32::try_from(index).ok(), None, None);
        }
        slot.tokens.clear();
    }

    /// Moves slot `index`'s state to RAM (if it has an owner and fits the budget), then
    /// empties the slot.
    fn evict(&mut self, ctx: &mut LlamaContext<'_>, index: usize) {
        let keep = self.ram_budget > 0 || self.disk.config.budget > 0;
        let owner = self.slots[index].owner.filter(|_| keep);
        let snapshot = owner.and_then(|owner| Some((owner, self.snapshot_slot(ctx, index)?)));
        if let Some((owner, snapshot)) = snapshot {
            self.evicted_bytes += snapshot.bytes.len();
            self.evicted.push_back((owner, snapshot));
            while self.evicted_bytes > self.ram_budget {
                let Some((owner, oldest)) = self.evicted.pop_front() else {
                    break;
                };
                self.evicted_bytes -= oldest.bytes.len();
                self.disk.store(owner, oldest);
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
        self.disk.forget(npc);
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
                adapter: s.adapter.clone(),
                bytes: s.bytes.clone(),
            })
            .or_else(|| self.disk.peek(npc))
    }

    // The crate's one exception to `unsafe_code = "deny"`: llama-cpp-2 exposes a sequence's
    // state only through raw-buffer calls. Both calls below are bounded by what llama.cpp
    // reports (see their SAFETY notes).
    #[allow(unsafe_code)]
    fn snapshot_slot(&self, ctx: &LlamaContext<'_>, index: usize) -> Option<SeqSnapshot> {
        let tokens = &self.slots[index].tokens;
        if tokens.is_empty() || self.slots[index].copy_pending {
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
            adapter: self.slots[index].adapter.clone(),
            bytes,
        })
    }

    /// Puts a snapshot into the (empty) sequence of slot `index`. On error (the bytes do not
    /// have this context's layout, or llama.cpp refuses them) the slot is left empty and
    /// its NPC recomputes.
    #[allow(unsafe_code)]
    fn restore(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        index: usize,
        snapshot: SeqSnapshot,
    ) -> Result<(), String> {
        let layout = self.layout.as_ref().map_err(String::clone)?;
        layout
            .check(&snapshot.bytes, snapshot.tokens.len(), self.context)
            .map_err(|e| format!("the saved KV state does not fit this model: {e}"))?;
        self.flush_copies(ctx, index);
        // SAFETY: the bytes have this context's layout (checked above: every count, size and
        // position against a probe of this context); llama.cpp bounds-checks its reads too.
        let restored = unsafe {
            ctx.state_seq_set_data_ext(&snapshot.bytes, seq_id(index), LlamaStateSeqFlags::empty())
        };
        if restored {
            self.slots[index].tokens = snapshot.tokens;
            self.slots[index].adapter = snapshot.adapter;
            Ok(())
        } else {
            let _ = ctx.clear_kv_cache_seq(u32::try_from(index).ok(), None, None);
            Err("llama.cpp refused the saved KV state".into())
        }
    }

    /// Brings back `npc`'s evicted state; one that cannot be restored (a disk file changed
    /// under the runtime) is recomputed on its next turn.
    fn restore_evicted(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        index: usize,
        npc: NpcId,
        snapshot: SeqSnapshot,
    ) {
        if let Err(reason) = self.restore(ctx, index, snapshot) {
            tracing::warn!("NPC {npc:?}: evicted KV state not restored ({reason}); recomputing");
        }
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
    ) -> Result<(), String> {
        self.forget(ctx, npc);
        let Some(index) = self.acquire(ctx, npc) else {
            return Err("every KV slot is busy replying".into());
        };
        let restored = self.restore(ctx, index, snapshot);
        self.release(index);
        restored
    }
}

/// The layout every snapshot of `ctx` must have: the state of a one-token sequence, written
/// by this context into sequence 0 (then cleared). Run once, before any NPC has a slot.
#[allow(unsafe_code)]
pub(crate) fn probe_layout(ctx: &mut LlamaContext<'_>) -> Result<KvLayout, String> {
    let mut batch = LlamaBatch::new(1, 1);
    batch
        .add(LlamaToken(0), 0, &[0], false)
        .map_err(|e| e.to_string())?;
    ctx.decode(&mut batch)
        .map_err(|e| format!("the KV layout probe did not decode: {e}"))?;
    let flags = LlamaStateSeqFlags::empty();
    let size = ctx.state_seq_get_size_ext(0, flags);
    let mut bytes = vec![0u8; size];
    // SAFETY: `bytes` holds exactly the size llama.cpp reported for this sequence.
    let written = unsafe { ctx.state_seq_get_data_ext(bytes.as_mut_ptr(), 0, flags) };
    let _ = ctx.clear_kv_cache_seq(Some(0), None, None);
    if written != size {
        return Err("llama.cpp did not write the KV layout probe".into());
    }
    KvLayout::from_probe(&bytes)
}

/// The llama.cpp sequence id of slot `index`.
pub(crate) fn seq_id(index: usize) -> i32 {
    i32::try_from(index).expect("slots are limited to 64")
}
