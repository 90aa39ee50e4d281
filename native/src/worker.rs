//! The worker thread: owns llama.cpp, drains the inbox, decodes every NPC with pending work
//! in one batch per step, samples, and streams events out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::Read;
use std::num::NonZeroU32;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::actions::{self, NpcActions};
use crate::config::{KvPrecision, RuntimeConfig};
use crate::escalation::{Escalator, NpcProfile, TokenConfidence};
use crate::guard::{ReplyGuard, SecretGuard};
use crate::knowledge::Knowledge;
use crate::kv_cache::{DiskConfig, KvCacheManager, SeqSnapshot, seq_id};
use crate::persist::{self, StateIdentity};
use crate::persona::Persona;
use crate::prompt::{PromptBuilder, Turn};
use crate::protocol::{
    CloudUsage, DebugHook, Event, FinishReason, ModelError, ModelInfo, NpcError, NpcId, Priority,
    ReplySource, ReplyStats, Request, RequestId, SayOptions,
};
use crate::sampling::{SamplingParams, StopFilter};
use crate::summarizer::Summarizer;

/// llama.cpp's `LLAMA_FLASH_ATTN_TYPE_ENABLED`.
const FLASH_ATTENTION_ENABLED: i32 = 1;
/// `LLAMA_FLASH_ATTN_TYPE_DISABLED`.
const FLASH_ATTENTION_DISABLED: i32 = 0;

/// How long an idle worker waits on its inbox before looking for a fact the cloud supplied.
const CLOUD_POLL: Duration = Duration::from_millis(5);

/// Most prompt tokens one prewarm step computes: a player line that arrives meanwhile waits at
/// most this long (about 0.2 s with the default model on 2 cores).
const PREWARM_CHUNK: usize = 32;

/// Importance of a fact the cloud supplied, as the NPC remembers it (mid-scale: recalled
/// when a line shares its words, not always).
const LEARNED_FACT_IMPORTANCE: u8 = 5;

/// llama.cpp's backend may be initialised once per process at a time; every runtime in the
/// process shares this one, and it lives until the process exits.
pub(crate) fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND
        .get_or_init(|| LlamaBackend::init().expect("the llama backend is only initialised here"))
}

/// Entry point of the worker thread. Never panics out: a panic becomes [`Event::WorkerDied`].
pub(crate) fn run(config: RuntimeConfig, inbox: Receiver<Request>, events: Sender<Event>) {
    let outcome = catch_unwind(AssertUnwindSafe(|| serve(&config, &inbox, &events)));
    if let Err(panic) = outcome {
        let reason = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        tracing::error!("npc_native worker died: {reason}");
        let _ = events.send(Event::WorkerDied { reason });
    }
}

fn serve(config: &RuntimeConfig, inbox: &Receiver<Request>, events: &Sender<Event>) {
    let started = Instant::now();
    if !config.llama_logs {
        llama_cpp_2::send_logs_to_tracing(
            llama_cpp_2::LogOptions::default().with_logs_enabled(false),
        );
    }
    let loaded = config
        .model_file()
        .and_then(|path| Ok((load_model(config, &path)?, path)));
    let (model, model_path) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => return serve_without_model(&error, inbox, events),
    };
    let catalog = model_path
        .file_name()
        .and_then(|name| crate::catalog::by_file_name(&name.to_string_lossy()));
    if let Some(entry) = catalog {
        check_catalog_expectations(&model, entry);
    }
    let threads = config.effective_threads();
    let threads_i32 = i32::try_from(threads).unwrap_or(i32::MAX);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.context_size * config.slots))
        .with_n_seq_max(config.slots)
        .with_kv_unified(false)
        .with_n_batch(config.batch_size)
        .with_n_ubatch(config.effective_ubatch_size())
        .with_n_threads(threads_i32)
        .with_n_threads_batch(threads_i32);
    let params = match config.kv_precision {
        // llama.cpp's CPU flash attention takes a different kernel for one sequence's single
        // query (the keys split across threads) than for several sequences at once.
        KvPrecision::F16 if config.reproducible_batching_applies() => {
            params.with_flash_attention_policy(FLASH_ATTENTION_DISABLED)
        }
        KvPrecision::F16 => params,
        // Quantized V needs flash attention; K follows V so both halves shrink alike.
        precision => {
            let kind = match precision {
                KvPrecision::Q4_0 => KvCacheType::Q4_0,
                _ => KvCacheType::Q8_0,
            };
            params
                .with_flash_attention_policy(FLASH_ATTENTION_ENABLED)
                .with_type_k(kind)
                .with_type_v(kind)
        }
    };
    let mut ctx = match model.new_context(backend(), params) {
        Ok(ctx) => ctx,
        Err(err) => {
            return serve_without_model(&ModelError::Context(err.to_string()), inbox, events);
        }
    };
    warm_up(&model, &mut ctx);
    let prompts = PromptBuilder::new(&model);
    let context_per_npc = (ctx.n_ctx() / config.slots) as usize;
    let info = ModelInfo {
        path: model_path.clone(),
        catalog_id: catalog.map(|entry| entry.id),
        n_params: model.n_params(),
        context_per_npc: u32::try_from(context_per_npc).unwrap_or(u32::MAX),
        slots: config.slots,
        threads,
        gpu_layers: config.effective_gpu_layers().min(model.n_layer() + 1),
        has_chat_template: prompts.has_model_template,
        load_time: started.elapsed(),
    };
    let identity = StateIdentity {
        format: persist::FORMAT_VERSION,
        // The file was readable a moment ago; if that changed, saved KV just never matches.
        model: persist::model_fingerprint(&model_path).unwrap_or_default(),
        template: persist::text_hash(&prompts.template_text),
        context_per_npc: info.context_per_npc,
        kv_precision: config.kv_precision.name().to_owned(),
    };
    tracing::info!(?info, "model loaded");
    let _ = events.send(Event::ModelLoaded(info));
    let batch_size = config.batch_size as usize;
    let mut engine = Engine {
        config,
        model: &model,
        ctx,
        prompts,
        events,
        context_per_npc,
        kv: KvCacheManager::new(
            config.slots,
            config.kv_reuse,
            config.evicted_kv_bytes,
            DiskConfig {
                budget: config.evicted_kv_disk_bytes,
                dir: config.eviction_dir.clone(),
            },
        ),
        identity,
        batch: LlamaBatch::new(batch_size, i32::try_from(config.slots).unwrap_or(1)),
        npcs: HashMap::new(),
        queue: VecDeque::new(),
        active: Vec::new(),
        escalator: Escalator::new(&config.escalation),
        summarizer: Summarizer::new(threads),
        prewarm: VecDeque::new(),
    };
    engine.run(inbox);
}

/// One throwaway decode at load time, so the first player line does not pay for llama.cpp's
/// first-run costs (buffer allocation, cold caches).
fn warm_up(model: &LlamaModel, ctx: &mut LlamaContext<'_>) {
    let mut batch = LlamaBatch::new(1, 1);
    if batch.add(model.vocab().bos(), 0, &[0], true).is_ok() {
        let _ = ctx.decode(&mut batch);
    }
    ctx.clear_kv_cache();
}

/// Checks the file before llama.cpp sees it (llama.cpp may abort on some bad input), then
/// loads it.
fn load_model(config: &RuntimeConfig, path: &Path) -> Result<LlamaModel, ModelError> {
    config.validate().map_err(ModelError::Config)?;
    check_gguf(path)?;
    let params = LlamaModelParams::default().with_n_gpu_layers(config.effective_gpu_layers());
    LlamaModel::load_from_file(backend(), path, &params).map_err(|err| ModelError::LoadFailed {
        path: path.to_path_buf(),
        reason: err.to_string(),
    })
}

/// A file named like a catalog model should be that model: a vocabulary or end-of-turn token
/// other than the catalog's means another file under its name (the runtime still uses it,
/// with the template the file carries, and warns).
fn check_catalog_expectations(model: &LlamaModel, entry: &crate::catalog::CatalogModel) {
    if let Some(mismatch) = catalog_mismatch(model, entry) {
        tracing::warn!(
            "{} is named like the catalog's {} but does not match it ({mismatch}): is it \
             another file?",
            entry.file_name,
            entry.id
        );
    }
}

/// How `model` differs from what the catalog says of `entry`, if it does.
fn catalog_mismatch(model: &LlamaModel, entry: &crate::catalog::CatalogModel) -> Option<String> {
    let expected = &entry.chat_template;
    if model.n_vocab() != expected.vocab_size {
        return Some(format!(
            "vocabulary of {} tokens, expected {}",
            model.n_vocab(),
            expected.vocab_size
        ));
    }
    let end_of_turn = LlamaToken(expected.end_of_turn_id);
    let vocab = model.vocab();
    let text = String::from_utf8_lossy(&vocab.token_to_piece(end_of_turn, true, None)).into_owned();
    if !vocab.is_eog(end_of_turn) || text != expected.end_of_turn {
        return Some(format!(
            "token {} is {text:?}, expected the end of turn {}",
            expected.end_of_turn_id, expected.end_of_turn
        ));
    }
    None
}

fn check_gguf(path: &Path) -> Result<(), ModelError> {
    let mut file = File::open(path).map_err(|_| ModelError::NotFound(path.to_path_buf()))?;
    if !file.metadata().is_ok_and(|meta| meta.is_file()) {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == b"GGUF" => Ok(()),
        _ => Err(ModelError::NotGguf(path.to_path_buf())),
    }
}

/// After a failed load: report it, then answer every request with an error until shutdown.
fn serve_without_model(error: &ModelError, inbox: &Receiver<Request>, events: &Sender<Event>) {
    tracing::error!("npc_native: {error}");
    let _ = events.send(Event::ModelFailed(error.clone()));
    let unavailable = || NpcError::ModelUnavailable(error.to_string());
    while let Ok(request) = inbox.recv() {
        let event = match request {
            Request::SetPersona { npc, .. } => Event::PersonaRejected {
                npc,
                error: unavailable(),
            },
            Request::SaveNpc { npc, path } => Event::NpcSaveFailed {
                npc,
                path,
                error: unavailable().to_string(),
            },
            Request::LoadNpc { npc, .. } => Event::NpcLoadFailed {
                npc,
                error: unavailable().to_string(),
            },
            Request::Say { npc, request, .. } => Event::Failed {
                npc,
                request,
                error: unavailable(),
            },
            Request::Remember { npc, .. } | Request::Inspect { npc } => Event::RememberFailed {
                npc,
                error: unavailable(),
            },
            Request::RevealSecret { npc, .. } => Event::RevealFailed {
                npc,
                error: unavailable(),
            },
            Request::Cancel { .. } | Request::Forget { .. } | Request::ActionOutcome { .. } => {
                continue;
            }
            Request::Shutdown => return,
            Request::Debug(hook) => {
                run_debug_hook(hook);
                continue;
            }
        };
        if events.send(event).is_err() {
            return;
        }
    }
}

fn run_debug_hook(hook: DebugHook) {
    match hook {
        DebugHook::WaitFor(gate) => {
            let _ = gate.recv();
        }
        DebugHook::Panic => panic!("panic injected by DebugHook::Panic"),
    }
}

/// An NPC the worker knows: persona, sampling and conversation.
struct Conversation {
    /// The persona as the game set it (before revealed secrets joined its knowledge).
    persona: Persona,
    /// What its replies are checked against: secrets not yet revealed, the prompt's framing.
    guard: Arc<SecretGuard>,
    /// The deflection said last, so the next one differs.
    last_deflection: Option<usize>,
    /// How many don't-know reminders it had: which of its `dont_know` lines is the next
    /// example.
    dont_know_hints: usize,
    /// Every content word of its persona and lore: a line naming something else is about
    /// what it does not know.
    vocabulary: HashSet<String>,
    system: String,
    sampling: SamplingParams,
    turns: Vec<Turn>,
    /// Declared game actions, their grammar, outcomes to tell (see `crate::actions`).
    actions: NpcActions,
    /// Escalation settings and what the persona knows.
    profile: NpcProfile,
    /// Lore, memories, summary and budget.
    knowledge: Knowledge,
}

impl Conversation {
    /// The next of this NPC's don't-know lines (its persona's `dont_know`, else
    /// [`DEFAULT_DONT_KNOW`](crate::escalation::DEFAULT_DONT_KNOW)), in turn.
    fn next_dont_know(&mut self) -> String {
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
enum Phase {
    /// The next token of every speaking NPC, and prompt chunks.
    Both,
    /// Only the next token of every speaking NPC.
    Generated,
    /// Only prompt chunks.
    Prompts,
}

/// One reply being produced.
struct Job {
    npc: NpcId,
    request: RequestId,
    line: String,
    slot: usize,
    /// Prompt tokens not yet decoded.
    pending: Vec<LlamaToken>,
    pending_from: usize,
    /// Prompt tokens placed in the batch being decoded.
    in_batch: usize,
    /// Position of the next token in the sequence.
    n_past: usize,
    /// Sampled, streamed, not yet decoded.
    next_token: Option<LlamaToken>,
    /// Index in the current batch whose logits this job samples from.
    logits_at: Option<i32>,
    /// Its `next_token` is in the batch being decoded.
    token_in_batch: bool,
    sampler: actions::ReplySampler,
    filter: StopFilter,
    max_tokens: u32,
    stats: ReplyStats,
    received: Instant,
    first_token_at: Option<Instant>,
    priority: Priority,
    deadline: Option<Instant>,
    /// Probability and entropy of each sampled token.
    confidence: TokenConfidence,
    /// Text is held back until the reply is complete: its confidence decides whether it stays
    /// local (`escalate_held`), or it answers an unfamiliar line (`check_grounding`).
    hold: bool,
    escalate_held: bool,
    /// The reply answers a line about something the NPC may not know: if it states what the
    /// NPC could not know, a don't-know line replaces it.
    check_grounding: bool,
    /// The names in the line the NPC never heard of (see `escalation::grounded`).
    unknown: Vec<String>,
    /// The cloud's fact this reply opens with; the NPC remembers it when the reply is done
    /// (if the cloud supplied it for this reply).
    fact: Option<String>,
    /// The secret guard over this reply's text.
    guard: ReplyGuard,
    secrets: Arc<SecretGuard>,
    /// What the NPC says instead of the rest of a reply the guard stopped.
    deflection: Option<String>,
}

impl Job {
    /// What the player got: the text the guard released, and the deflection if it stopped
    /// the reply.
    fn spoken(&self) -> String {
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
    fn turn_text(&self) -> String {
        if self.deflection.is_some() {
            self.spoken()
        } else {
            actions::turn_text(self.filter.text(), self.filter.hidden())
        }
    }
}

/// A reply waiting for a free slot.
struct Queued {
    npc: NpcId,
    request: RequestId,
    line: String,
    options: SayOptions,
    /// When the reply must have started, counted from when the game sent the line.
    deadline: Option<Instant>,
    received: Instant,
    /// The fact the cloud supplied for this line
    /// ([`CloudRole::Inform`](crate::escalation::CloudRole::Inform)), now or for the same
    /// question before.
    fact: Option<String>,
    /// What the cloud spent on it (set even when the fact was unusable).
    cloud_fact: Option<CloudUsage>,
    /// The don't-know reminder for a line that matches nothing the NPC knows.
    hint: Option<String>,
    /// The names in the line the NPC never heard of.
    unknown: Vec<String>,
    /// Time spent deciding where the line goes.
    routing: Duration,
}

struct Engine<'m, 'e> {
    config: &'e RuntimeConfig,
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    prompts: PromptBuilder,
    events: &'e Sender<Event>,
    context_per_npc: usize,
    kv: KvCacheManager,
    identity: StateIdentity,
    batch: LlamaBatch<'static>,
    npcs: HashMap<NpcId, Conversation>,
    queue: VecDeque<Queued>,
    active: Vec<Job>,
    /// Routing to the cloud, spend and rate limits.
    escalator: Escalator,
    /// Model-written summaries, run when nothing else is (see `crate::summarizer`).
    summarizer: Summarizer<'m>,
    /// NPCs whose prompt prefix is to be computed before they are spoken to, oldest first
    /// (see [`RuntimeConfig::prewarm`]).
    prewarm: VecDeque<Prewarm>,
}

/// A prewarm in progress: the NPC and the tokens it has computed so far.
struct Prewarm {
    npc: NpcId,
    computed: usize,
}

impl Engine<'_, '_> {
    fn run(&mut self, inbox: &Receiver<Request>) {
        loop {
            // Idle: block until there is work. Busy: take what has arrived, then step.
            if self.active.is_empty()
                && self.queue.is_empty()
                && self.prewarm.is_empty()
                && !self.summary_work()
            {
                // A cloud call in flight may hand over a fact: wait for it in short naps.
                let next = if self.escalator.awaiting_cloud() {
                    match inbox.recv_timeout(CLOUD_POLL) {
                        Ok(request) => Some(request),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                } else {
                    match inbox.recv() {
                        Ok(request) => Some(request),
                        Err(_) => return,
                    }
                };
                if let Some(request) = next
                    && !self.handle(request)
                {
                    return;
                }
            }
            loop {
                match inbox.try_recv() {
                    Ok(request) => {
                        if !self.handle(request) {
                            return self.shut_down();
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            self.absorb_informed();
            self.admit_queued();
            if !self.active.is_empty() {
                self.step();
            } else if self.queue.is_empty() && !self.step_prewarm() {
                // Lowest priority: only when no reply is waiting or in progress.
                self.step_summary();
            }
        }
    }

    /// One chunk of the oldest prewarm ([`RuntimeConfig::prewarm`]): up to
    /// [`PREWARM_CHUNK`] tokens of the NPC's prompt prefix into its KV sequence. Returns
    /// `false` when no prewarm was waiting.
    fn step_prewarm(&mut self) -> bool {
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
    fn prewarm_chunk(&mut self, npc: NpcId) -> Result<Option<usize>, String> {
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
        let room = self
            .context_per_npc
            .saturating_sub(conversation.sampling.max_tokens as usize);
        if target.is_empty() || target.len() >= room {
            return Err(format!(
                "a prefix of {} tokens leaves no room",
                target.len()
            ));
        }
        let slot = self
            .kv
            .acquire_unused(&mut self.ctx, npc)
            .ok_or("no free KV slot")?;
        let held = self.kv.tokens(slot);
        let common = held.iter().zip(&target).take_while(|(a, b)| a == b).count();
        let cached = if common == target.len() {
            // Already there (this NPC's cache may hold more: never cut it back).
            common
        } else {
            self.kv
                .reuse_prefix_leaving(&mut self.ctx, slot, &target, 0)
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
        let decoded = self.ctx.decode(&mut self.batch);
        self.kv.decoded();
        if let Err(err) = decoded {
            self.kv.clear(&mut self.ctx, slot);
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
    fn drop_prewarm(&mut self, npc: NpcId) {
        self.prewarm.retain(|prewarm| prewarm.npc != npc);
    }

    /// Whether a summary job is running or due.
    fn summary_work(&self) -> bool {
        self.summarizer.busy()
            || (self.summarizer.available()
                && self
                    .npcs
                    .iter()
                    .any(|(&npc, c)| c.knowledge.summary_due(npc, &c.turns).is_some()))
    }

    /// One small step of the summary job, starting the next due one if none runs.
    fn step_summary(&mut self) {
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

    /// Returns `false` on shutdown.
    fn handle(&mut self, request: Request) -> bool {
        match request {
            Request::SetPersona { npc, persona } => self.set_persona(npc, &persona),
            Request::Say {
                npc,
                request,
                text,
                options,
                sent,
            } => self.say(npc, request, text, options, sent),
            Request::Cancel { npc } => self.cancel(npc),
            Request::Remember {
                npc,
                text,
                importance,
            } => self.remember(npc, &text, importance),
            Request::Inspect { npc } => self.inspect(npc),
            Request::RevealSecret { npc, secret } => self.reveal_secret(npc, &secret),
            Request::SaveNpc { npc, path } => self.save_npc(npc, path),
            Request::LoadNpc { npc, path } => self.load_npc(npc, &path),
            Request::ActionOutcome {
                npc,
                action,
                approved,
                reason,
            } => {
                let note = self
                    .prompts
                    .sanitize(&actions::outcome_note(&action, approved, &reason));
                if let Some(conversation) = self.npcs.get_mut(&npc) {
                    conversation.actions.notes.push(note);
                }
            }
            Request::Forget { npc } => {
                self.drop_prewarm(npc);
                self.cancel(npc);
                self.summarizer.cancel(npc);
                self.npcs.remove(&npc);
                self.kv.forget(&mut self.ctx, npc);
            }
            Request::Shutdown => return false,
            Request::Debug(hook) => run_debug_hook(hook),
        }
        true
    }

    fn emit(&self, event: Event) {
        // The game may have dropped its receiver while shutting down; nothing to do then.
        let _ = self.events.send(event);
    }

    fn shut_down(&mut self) {
        self.escalator.shut_down(self.events);
        for job in std::mem::take(&mut self.active) {
            self.emit(Event::Failed {
                npc: job.npc,
                request: job.request,
                error: NpcError::ShuttingDown,
            });
        }
        for queued in std::mem::take(&mut self.queue) {
            self.emit(Event::Failed {
                npc: queued.npc,
                request: queued.request,
                error: NpcError::ShuttingDown,
            });
        }
    }

    fn set_persona(&mut self, npc: NpcId, persona: &Persona) {
        match self.apply_persona(npc, persona) {
            Ok(prefix_tokens) => self.emit(Event::PersonaAccepted { npc, prefix_tokens }),
            Err(error) => self.emit(Event::PersonaRejected { npc, error }),
        }
    }

    /// Sets (or reloads) `npc`'s persona, keeping its conversation, what it learned and the
    /// secrets the game revealed; returns the system prompt's token count.
    fn apply_persona(&mut self, npc: NpcId, base: &Persona) -> Result<usize, NpcError> {
        let revealed = self
            .npcs
            .get(&npc)
            .map(|c| c.knowledge.revealed.clone())
            .unwrap_or_default();
        let persona = &base.with_revealed(&revealed);
        let result = persona
            .validate()
            .map_err(|err| NpcError::InvalidPersona(err.to_string()))
            .and_then(|()| {
                let sampling = persona.sampling.apply_to(&self.config.sampling);
                let system = self.prompts.sanitize(&with_preamble(
                    &self.config.preamble,
                    &persona.system_prompt(),
                ));
                // The persona must leave room for a short line and a whole reply.
                let (tokens, _) = self.prompts.fit(
                    self.model,
                    &system,
                    &[],
                    "Hello.",
                    self.context_per_npc,
                    sampling.max_tokens as usize,
                )?;
                let grammar = actions::action_grammar(&persona.actions);
                // Built once here so a grammar llama.cpp refuses rejects the persona.
                if let Some(grammar) = &grammar {
                    LlamaSampler::grammar(self.model, grammar, "root").map_err(|err| {
                        NpcError::InvalidPersona(format!("action grammar refused: {err}"))
                    })?;
                }
                let mut knowledge = Knowledge::for_persona(persona, &self.config.assets_dir)?;
                if let Some(budget) = knowledge.budget().filter(|&b| b < tokens.len()) {
                    return Err(NpcError::InvalidPersona(format!(
                        "prompt_budget is {budget} tokens but the persona alone needs {} \
                         (its system prompt and a one-word line)",
                        tokens.len()
                    )));
                }
                if let Some(keep) = persona.compress_lore {
                    knowledge
                        .compress(
                            self.model,
                            &self.identity.model,
                            keep,
                            self.config.effective_threads(),
                            &self.config.cache_dir,
                        )
                        .map_err(NpcError::Inference)?;
                }
                Ok((system, sampling, tokens.len(), grammar, knowledge))
            });
        let (system, sampling, prefix_tokens, grammar, mut knowledge) = result?;
        let profile = NpcProfile::new(persona);
        let guard = Arc::new(if self.config.guard {
            // The world preamble is public (what every NPC may say), not the NPC's framing.
            SecretGuard::new(
                persona,
                knowledge
                    .lore
                    .entries()
                    .iter()
                    .map(|e| e.text.as_str())
                    .chain([self.config.preamble.as_str()]),
                &persona.system_prompt(),
            )
        } else {
            SecretGuard::off()
        });
        let vocabulary = crate::escalation::vocabulary(
            profile
                .documents
                .iter()
                .map(String::as_str)
                .chain([persona.speech_style.as_str()])
                .chain(knowledge.lore.entries().iter().flat_map(|e| {
                    [e.title.as_str(), e.text.as_str()]
                        .into_iter()
                        .chain(e.keywords.iter().map(String::as_str))
                })),
        );
        let old = self.npcs.remove(&npc);
        let notes = old.as_ref().map(|c| c.actions.notes.clone());
        let (last_deflection, dont_know_hints) = old
            .as_ref()
            .map_or((None, 0), |c| (c.last_deflection, c.dont_know_hints));
        let (turns, old_knowledge) = old.map(|c| (c.turns, c.knowledge)).unwrap_or_default();
        knowledge.carry_over(old_knowledge);
        self.npcs.insert(
            npc,
            Conversation {
                persona: base.clone(),
                guard,
                last_deflection,
                dont_know_hints,
                vocabulary,
                system,
                sampling,
                turns,
                actions: NpcActions {
                    specs: persona.actions.clone(),
                    grammar,
                    notes: notes.unwrap_or_default(),
                },
                profile,
                knowledge,
            },
        );
        if self.config.prewarm && self.config.kv_reuse {
            self.drop_prewarm(npc);
            self.prewarm.push_back(Prewarm { npc, computed: 0 });
        }
        Ok(prefix_tokens)
    }

    /// Makes one of `npc`'s secrets knowledge ([`Request::RevealSecret`]).
    fn reveal_secret(&mut self, npc: NpcId, query: &str) {
        let fail = |engine: &Self, error| engine.emit(Event::RevealFailed { npc, error });
        let Some(conversation) = self.npcs.get(&npc) else {
            return fail(self, NpcError::UnknownNpc(npc));
        };
        let base = conversation.persona.clone();
        let current = base.with_revealed(&conversation.knowledge.revealed);
        let secret = match current.find_secret(query) {
            Ok(secret) => secret.to_owned(),
            Err(message) => return fail(self, NpcError::NoSuchSecret(message)),
        };
        if let Some(conversation) = self.npcs.get_mut(&npc) {
            conversation.knowledge.revealed.push(secret.clone());
        }
        match self.apply_persona(npc, &base) {
            Ok(_) => self.emit(Event::SecretRevealed { npc, secret }),
            Err(error) => {
                // The persona was accepted before; only the new prompt can fail to fit.
                if let Some(conversation) = self.npcs.get_mut(&npc) {
                    conversation.knowledge.revealed.retain(|r| *r != secret);
                }
                fail(self, error);
            }
        }
    }

    fn save_npc(&mut self, npc: NpcId, path: std::path::PathBuf) {
        self.absorb_cloud_turns();
        let Some(conversation) = self.npcs.get(&npc) else {
            let error = NpcError::UnknownNpc(npc).to_string();
            return self.emit(Event::NpcSaveFailed { npc, path, error });
        };
        let snapshot = self.kv.snapshot(&self.ctx, npc).unwrap_or_default();
        let tokens: Vec<i32> = snapshot.tokens.iter().map(|t| t.0).collect();
        match persist::save(
            &path,
            &self.identity,
            &conversation.turns,
            &tokens,
            &snapshot.bytes,
            &persist::SavedMind {
                memories: conversation.knowledge.memories.clone(),
                summary: conversation.knowledge.summary.clone(),
                revealed: conversation.knowledge.revealed.clone(),
            },
        ) {
            Ok(bytes) => self.emit(Event::NpcSaved {
                npc,
                path,
                bytes,
                kv_tokens: tokens.len(),
            }),
            Err(err) => {
                tracing::warn!("saving NPC {npc:?} to {} failed: {err}", path.display());
                self.emit(Event::NpcSaveFailed {
                    npc,
                    path,
                    error: err.to_string(),
                });
            }
        }
    }

    fn load_npc(&mut self, npc: NpcId, path: &Path) {
        let fail = |engine: &Self, error: String| engine.emit(Event::NpcLoadFailed { npc, error });
        if !self.npcs.contains_key(&npc) {
            return fail(self, NpcError::UnknownNpc(npc).to_string());
        }
        if self.active.iter().any(|job| job.npc == npc)
            || self.queue.iter().any(|q| q.npc == npc)
            || self.escalator.busy(npc)
        {
            return fail(self, NpcError::Busy.to_string());
        }
        self.absorb_cloud_turns();
        // The loaded state is what the NPC continues from.
        self.drop_prewarm(npc);
        // A summary job for the old conversation is moot; the loaded one gets its own.
        self.summarizer.cancel(npc);
        let loaded = match persist::load(path, &self.identity) {
            Ok(loaded) => loaded,
            Err(error) => return fail(self, error),
        };
        let mut kv_note = None;
        let mut kv_tokens = 0;
        match loaded.kv {
            Ok((tokens, bytes)) if !tokens.is_empty() => {
                let n_vocab = self.model.n_vocab();
                if tokens.len() >= self.context_per_npc
                    || tokens.iter().any(|&t| t < 0 || t >= n_vocab)
                {
                    kv_note = Some("saved tokens do not fit this model or context".to_owned());
                    self.kv.forget(&mut self.ctx, npc);
                } else {
                    kv_tokens = tokens.len();
                    let tokens = tokens.into_iter().map(LlamaToken).collect();
                    let snapshot = SeqSnapshot { tokens, bytes };
                    if let Err(reason) = self.kv.load(&mut self.ctx, npc, snapshot) {
                        kv_tokens = 0;
                        kv_note = Some(reason.to_owned());
                    }
                }
            }
            Ok(_) => self.kv.forget(&mut self.ctx, npc),
            Err(reason) => {
                self.kv.forget(&mut self.ctx, npc);
                kv_note = Some(reason);
            }
        }
        if let Some(note) = &kv_note {
            tracing::warn!(
                "NPC {npc:?}: KV state in {} not restored ({note}); it will be recomputed",
                path.display()
            );
        }
        let mind_note = loaded.mind_note;
        if let Some(note) = &mind_note {
            tracing::warn!("NPC {npc:?}: {note} in {}", path.display());
        }
        let turns = loaded.turns.len();
        let mut reveals_changed = None;
        if let Some(conversation) = self.npcs.get_mut(&npc) {
            conversation.turns = loaded.turns;
            let mind = loaded.mind.unwrap_or_default();
            conversation.knowledge.memories = mind.memories;
            conversation.knowledge.summary = mind.summary;
            // Saved text is the player's file: it enters prompts only sanitized.
            conversation.knowledge.sanitize(&self.prompts);
            if conversation.knowledge.revealed != mind.revealed {
                // Only secrets of this persona count (`Persona::with_revealed`).
                conversation.knowledge.revealed = mind.revealed;
                reveals_changed = Some(conversation.persona.clone());
            }
        }
        if let Some(persona) = reveals_changed
            && let Err(error) = self.apply_persona(npc, &persona)
        {
            tracing::warn!("NPC {npc:?}: the saved reveals do not fit its persona ({error})");
        }
        self.emit(Event::NpcLoaded {
            npc,
            turns,
            kv_tokens,
            kv_note,
            mind_note,
        });
    }

    fn say(
        &mut self,
        npc: NpcId,
        request: RequestId,
        text: String,
        options: SayOptions,
        sent: Instant,
    ) {
        let fail = |engine: &Self, error| {
            engine.emit(Event::Failed {
                npc,
                request,
                error,
            })
        };
        let line = self.prompts.sanitize(text.trim());
        let chars = text.chars().count();
        if line.trim().is_empty() {
            return fail(self, NpcError::EmptyLine);
        }
        if chars > self.config.max_line_chars {
            return fail(
                self,
                NpcError::LineTooLong {
                    chars,
                    limit: self.config.max_line_chars,
                },
            );
        }
        if !self.npcs.contains_key(&npc) {
            return fail(self, NpcError::UnknownNpc(npc));
        }
        if self.active.iter().any(|job| job.npc == npc)
            || self.queue.iter().any(|q| q.npc == npc)
            || self.escalator.busy(npc)
        {
            return fail(self, NpcError::Busy);
        }
        self.absorb_cloud_turns();
        // The reply computes the prefix itself.
        self.drop_prewarm(npc);
        let routing_started = Instant::now();
        let Some(c) = self.npcs.get_mut(&npc) else {
            return;
        };
        let known = c.knowledge.routing_documents(&line);
        if self.escalator.routes(&c.profile)
            && self.escalator.divert(
                npc,
                request,
                &line,
                &c.profile,
                &c.turns,
                &known,
                self.events,
            )
        {
            return;
        }
        // A line about something the NPC does not know gets a reminder to say so.
        let documents: Vec<&str> = c
            .profile
            .documents
            .iter()
            .map(String::as_str)
            .chain(known.iter().copied())
            .collect();
        let unknown = crate::escalation::unfamiliar_names(&documents, &c.vocabulary, &line);
        let hint = unknown.as_ref().map(|_| {
            let example = c.next_dont_know();
            format!(
                "(What you know may not answer this. If it does not, say that you don't know, \
                 in your own words (for example: \"{example}\"), and make nothing up.)"
            )
        });
        let routing = routing_started.elapsed();
        // The same question as one the cloud answered before: its fact opens the reply again.
        let learned = self.npcs.get(&npc).and_then(|c| {
            crate::escalation::learned_answer(&c.knowledge.memories.texts(), &line)
                .map(str::to_owned)
        });
        // Highest priority first, first come first served within a priority.
        let at = self
            .queue
            .iter()
            .position(|q| q.options.priority < options.priority)
            .unwrap_or(self.queue.len());
        self.queue.insert(
            at,
            Queued {
                npc,
                request,
                line,
                options,
                deadline: options.deadline.map(|d| sent + d),
                received: Instant::now(),
                fact: learned,
                cloud_fact: None,
                hint,
                unknown: unknown.unwrap_or_default(),
                routing,
            },
        );
    }

    /// Queues a local reply for each fact the cloud supplied, with the fact before the line.
    fn absorb_informed(&mut self) {
        for informed in self.escalator.take_informed() {
            let Some(conversation) = self.npcs.get(&informed.npc) else {
                continue;
            };
            // Nothing in it may end the reply or open an action call.
            let mut fact = self.prompts.sanitize(&informed.fact);
            for marker in conversation
                .sampling
                .stop
                .iter()
                .map(String::as_str)
                .chain([actions::ACTION_MARKER.trim()])
            {
                if let Some(at) = fact.find(marker) {
                    fact.truncate(at);
                }
            }
            let fact = Some(fact.trim().to_owned()).filter(|fact| !fact.is_empty());
            if fact.is_none() {
                // Nothing usable: the local model answers the line on its own.
                tracing::info!("NPC {:?}: the cloud's fact was unusable", informed.npc);
            }
            // Ahead of every waiting line: the player has waited for the cloud already.
            self.queue.push_front(Queued {
                npc: informed.npc,
                request: informed.request,
                line: informed.line,
                options: SayOptions::default(),
                deadline: None,
                received: informed.asked,
                fact,
                cloud_fact: Some(informed.usage),
                hint: None,
                unknown: Vec::new(),
                routing: Duration::ZERO,
            });
        }
    }

    /// Adds the turns the cloud (or the fallback line) answered to their conversations.
    fn absorb_cloud_turns(&mut self) {
        for (npc, turn) in self.escalator.take_finished() {
            if let Some(conversation) = self.npcs.get_mut(&npc) {
                conversation.turns.push(turn);
            }
        }
    }

    fn remember(&mut self, npc: NpcId, text: &str, importance: u8) {
        let text = self.prompts.sanitize(text.trim());
        let Some(conversation) = self.npcs.get_mut(&npc) else {
            let error = NpcError::UnknownNpc(npc);
            return self.emit(Event::RememberFailed { npc, error });
        };
        if text.trim().is_empty() {
            let error = NpcError::EmptyLine;
            return self.emit(Event::RememberFailed { npc, error });
        }
        let memories = conversation.knowledge.memories.remember(&text, importance);
        self.emit(Event::Remembered { npc, memories });
    }

    fn inspect(&self, npc: NpcId) {
        let Some(conversation) = self.npcs.get(&npc) else {
            let error = NpcError::UnknownNpc(npc);
            return self.emit(Event::RememberFailed { npc, error });
        };
        let knowledge = &conversation.knowledge;
        self.emit(Event::Mind {
            npc,
            memories: knowledge.memories.memories.clone(),
            summary: knowledge.summary.facts.clone(),
            summarised_turns: knowledge.summary.turns,
            lore_entries: knowledge.lore.len(),
            lore_compression: knowledge.compression(),
            written_summary: Some(knowledge.summary.written.clone()).filter(|w| !w.is_empty()),
        });
    }

    fn cancel(&mut self, npc: NpcId) {
        self.escalator.cancel(npc, self.events);
        if let Some(at) = self.queue.iter().position(|q| q.npc == npc) {
            let queued = self.queue.remove(at).expect("position is in range");
            self.emit(Event::Cancelled {
                npc,
                request: queued.request,
            });
        }
        if let Some(at) = self.active.iter().position(|job| job.npc == npc) {
            let job = self.active.swap_remove(at);
            self.kv.release(job.slot);
            self.emit(Event::Cancelled {
                npc,
                request: job.request,
            });
        }
    }

    /// Moves queued replies into free slots, building their prompts.
    fn admit_queued(&mut self) {
        while let Some(queued) = self.queue.front() {
            let npc = queued.npc;
            let Some(slot) = self.kv.acquire(&mut self.ctx, npc) else {
                return;
            };
            let queued = self.queue.pop_front().expect("front exists");
            match self.start_job(queued, slot) {
                Ok(job) => self.active.push(job),
                Err((request, error)) => {
                    self.kv.release(slot);
                    self.emit(Event::Failed {
                        npc,
                        request,
                        error,
                    });
                }
            }
        }
    }

    fn start_job(&mut self, queued: Queued, slot: usize) -> Result<Job, (RequestId, NpcError)> {
        let Queued {
            npc,
            request,
            line,
            options,
            deadline,
            received,
            fact,
            cloud_fact,
            hint,
            unknown,
            routing,
        } = queued;
        let Some(conversation) = self.npcs.get_mut(&npc) else {
            return Err((request, NpcError::UnknownNpc(npc)));
        };
        let prompt_started = Instant::now();
        // A line the cloud was asked about is not sent to the cloud again, and a reply that
        // opens with a fact has streamed already.
        let escalate_held =
            cloud_fact.is_none() && fact.is_none() && self.escalator.holds(&conversation.profile);
        // `hint` marks a line about something the NPC may not know.
        let (remind, check) = self.escalator.dont_know_policy();
        // A reply that opens with a fact the cloud supplied is grounded in it.
        let check_grounding = check && hint.is_some() && fact.is_none();
        let line = conversation.actions.take_notes_into(line);
        let sampling = conversation.sampling.clone();
        let assembled = conversation
            .knowledge
            .assemble(
                &self.prompts,
                self.model,
                &conversation.system,
                &conversation.turns,
                &line,
                fact.as_deref(),
                hint.as_deref().filter(|_| remind),
                self.context_per_npc,
                sampling.max_tokens as usize,
            )
            .map_err(|error| (request, error))?;
        let dropped_turns = conversation.knowledge.summary.turns;
        let prompt = align_with_cache(
            self.model,
            self.kv.tokens(slot),
            assembled.tokens,
            // The respelling stays inside the persona's prompt budget too.
            self.context_per_npc
                .saturating_sub(sampling.max_tokens as usize)
                .min(conversation.knowledge.budget().unwrap_or(usize::MAX)),
        );
        let reuse = self.kv.reuse_prefix(&mut self.ctx, slot, &prompt);
        let cached = reuse.cached;
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            ^ (request.0 as u32);
        let mut filter = actions::filter(
            &conversation.actions,
            StopFilter::new(sampling.stop.clone()),
        );
        let mut opened_at = None;
        let mut guard = ReplyGuard::default();
        if let Some(fact) = &fact {
            // The reply opens with the fact (the prompt ends with it): the game gets it now,
            // and this is its first token.
            let (opening, _) = filter.push(fact.as_bytes());
            let opening = guard.push(&conversation.guard, &opening);
            if !opening.is_empty() {
                opened_at = Some(Instant::now());
                let _ = self.events.send(Event::Delta {
                    npc,
                    request,
                    text: opening,
                });
            }
        }
        Ok(Job {
            npc,
            request,
            line,
            slot,
            pending_from: cached,
            in_batch: 0,
            n_past: cached,
            next_token: None,
            logits_at: None,
            token_in_batch: false,
            sampler: actions::ReplySampler::new(
                self.model,
                conversation.actions.grammar.as_deref(),
                sampling.sampler(self.model.n_vocab(), seed),
                sampling.candidates_needed(),
            ),
            filter,
            max_tokens: sampling.max_tokens,
            stats: ReplyStats {
                finish: FinishReason::EndOfTurn,
                prompt_tokens: prompt.len(),
                cached_tokens: cached,
                shared_tokens: reuse.copied,
                generated_tokens: 0,
                time_to_first_token: opened_at.map_or(Duration::ZERO, |at| at - received),
                generation_time: Default::default(),
                dropped_turns,
                source: if cloud_fact.is_some() {
                    ReplySource::Informed
                } else {
                    ReplySource::Local
                },
                confidence: None,
                cloud_fact,
                lore_entries: assembled.lore_entries,
                dropped_lore: assembled.dropped_lore,
                memories: assembled.memories,
                dropped_memories: assembled.dropped_memories,
                timing: crate::protocol::ReplyTiming {
                    prompt: prompt_started.elapsed(),
                    routing,
                    ..Default::default()
                },
            },
            confidence: TokenConfidence::default(),
            hold: escalate_held || check_grounding,
            escalate_held,
            check_grounding,
            unknown,
            fact,
            guard,
            secrets: conversation.guard.clone(),
            deflection: None,
            pending: prompt,
            received,
            first_token_at: opened_at,
            priority: options.priority,
            deadline,
        })
    }

    /// One decode over every active job: one token for each job that is generating, then
    /// prompt chunks for jobs still prefilling, up to the batch size.
    fn step(&mut self) {
        self.enforce_deadlines();
        if self.active.is_empty() {
            return;
        }
        // Generated tokens enter the batch in sequence order: llama.cpp splits a
        // multi-sequence batch into one micro-batch per run of consecutive sequence ids, so an
        // unordered batch would decode one NPC at a time.
        self.active.sort_by_key(|job| job.slot);
        let generating = self
            .active
            .iter()
            .filter(|job| job.next_token.is_some())
            .count();
        let prompting = self
            .active
            .iter()
            .any(|job| job.next_token.is_none() && job.pending_from < job.pending.len());
        if self.config.reproducible_batching_applies() && generating > 0 && prompting {
            // A micro-batch that mixes prompt tokens with generated ones computes the prompt's
            // keys and values differently (in the last bits) from one that holds prompt tokens
            // alone, so they go to llama.cpp in two calls.
            self.decode(Phase::Generated, generating);
            self.decode(Phase::Prompts, generating);
        } else {
            self.decode(Phase::Both, generating);
        }
    }

    /// One `decode` call: the next token of every speaking NPC and/or prompt chunks, then
    /// sampling for every NPC whose logits it produced.
    fn decode(&mut self, phase: Phase, generating: usize) {
        let capacity = self.config.batch_size as usize;
        // While any NPC is mid-sentence, prompts advance in small chunks, so a long prompt
        // does not freeze its speech for seconds.
        let prefill_capacity = if generating > 0 {
            capacity.min(generating + self.config.prefill_chunk as usize)
        } else {
            capacity
        };
        self.batch.clear();
        let mut used = 0;
        for job in &mut self.active {
            job.logits_at = None;
            job.token_in_batch = false;
            if phase == Phase::Prompts {
                continue;
            }
            if let Some(token) = job.next_token {
                let added = self
                    .batch
                    .add(token, pos(job.n_past), &[seq_id(job.slot)], true);
                debug_assert!(added.is_ok(), "batch holds one token per slot");
                job.logits_at = Some(i32::try_from(used).unwrap_or(i32::MAX));
                job.token_in_batch = true;
                used += 1;
            }
        }
        if phase != Phase::Generated {
            // Prompt chunks go to the most important NPC first.
            let mut by_priority: Vec<usize> = (0..self.active.len()).collect();
            by_priority.sort_by_key(|&at| std::cmp::Reverse(self.active[at].priority));
            for at in by_priority {
                let job = &mut self.active[at];
                if job.next_token.is_some()
                    || job.pending_from >= job.pending.len()
                    || used >= prefill_capacity
                {
                    continue;
                }
                let end = job
                    .pending
                    .len()
                    .min(job.pending_from + (prefill_capacity - used));
                job.in_batch = end - job.pending_from;
                for index in job.pending_from..end {
                    let last = index + 1 == job.pending.len();
                    let position = pos(job.n_past + index - job.pending_from);
                    let _ = self
                        .batch
                        .add(job.pending[index], position, &[seq_id(job.slot)], last);
                    if last {
                        job.logits_at = Some(i32::try_from(used).unwrap_or(i32::MAX));
                    }
                    used += 1;
                }
            }
        }
        if used == 0 {
            return;
        }
        let decode_started = Instant::now();
        let decoded = self.ctx.decode(&mut self.batch);
        let decode_time = decode_started.elapsed();
        // Pending sequence copies ran at the start of the decode, whatever its outcome.
        self.kv.decoded();
        if let Err(err) = decoded {
            return self.fail_all(&format!("decode failed: {err}"));
        }
        // The batch is in the KV cache now: record what each sequence holds.
        let mut finished = Vec::new();
        for (at, job) in self.active.iter_mut().enumerate() {
            if job.token_in_batch {
                job.stats.timing.decode += decode_time;
            } else if job.in_batch > 0 {
                job.stats.timing.prefill += decode_time;
            }
            if std::mem::take(&mut job.token_in_batch) {
                if let Some(token) = job.next_token.take() {
                    self.kv.push(job.slot, token);
                    job.n_past += 1;
                }
            } else if job.in_batch > 0 {
                let added = std::mem::take(&mut job.in_batch);
                for &token in &job.pending[job.pending_from..job.pending_from + added] {
                    self.kv.push(job.slot, token);
                }
                job.pending_from += added;
                job.n_past += added;
            }
            let Some(index) = job.logits_at else { continue };
            let sampling_started = Instant::now();
            let sampled = job.sampler.sample(&self.ctx, index);
            let scoring_started = Instant::now();
            job.stats.timing.sampling += scoring_started - sampling_started;
            let Some(token) = sampled else {
                // The action grammar allows no token at all: the reply ends here.
                finished.push((at, FinishReason::EndOfTurn));
                continue;
            };
            job.confidence
                .observe(self.ctx.get_logits_ith(index), token.0);
            let now = Instant::now();
            job.stats.timing.confidence += now - scoring_started;
            if job.first_token_at.is_none() {
                job.stats.time_to_first_token = now - job.received;
            }
            let first = *job.first_token_at.get_or_insert(now);
            let vocab = self.model.vocab();
            if vocab.is_eog(token) || vocab.is_control(token) {
                finished.push((at, FinishReason::EndOfTurn));
                continue;
            }
            // Up to the last token of the reply: the end-of-turn token is not one, and
            // neither is the decode before it (tokens per second counts n - 1 intervals).
            job.stats.generation_time = now - first;
            job.stats.generated_tokens += 1;
            let (text, stopped) = job.filter.push(&vocab.token_to_piece(token, false, None));
            let guard_started = Instant::now();
            let text = job.guard.push(&job.secrets, &text);
            job.stats.timing.guard += guard_started.elapsed();
            if !text.is_empty() && !job.hold {
                let _ = self.events.send(Event::Delta {
                    npc: job.npc,
                    request: job.request,
                    text,
                });
            }
            job.stats.timing.text += now.elapsed();
            if job.guard.breach().is_some() {
                finished.push((at, FinishReason::Guarded));
            } else if stopped {
                finished.push((at, FinishReason::StopString));
            } else if job.stats.generated_tokens >= job.max_tokens as usize {
                finished.push((at, FinishReason::MaxTokens));
            } else if job.n_past + 1 >= self.context_per_npc {
                finished.push((at, FinishReason::ContextFull));
            } else {
                job.next_token = Some(token);
            }
        }
        // Remove from the back so earlier indices stay valid.
        for (at, reason) in finished.into_iter().rev() {
            let job = self.active.swap_remove(at);
            self.finish(job, reason);
        }
    }

    /// Queued replies past their deadline fail; replies in progress end with what they have.
    fn enforce_deadlines(&mut self) {
        let now = Instant::now();
        let expired = |received: Instant, options: &SayOptions| {
            options.deadline.is_some_and(|d| now >= received + d)
        };
        while let Some(at) = self
            .queue
            .iter()
            .position(|q| expired(q.received, &q.options))
        {
            let queued = self.queue.remove(at).expect("position is in range");
            self.emit(Event::Failed {
                npc: queued.npc,
                request: queued.request,
                error: NpcError::DeadlineExceeded,
            });
        }
        while let Some(at) = self
            .active
            .iter()
            .position(|job| job.deadline.is_some_and(|d| now >= d))
        {
            let job = self.active.swap_remove(at);
            if job.stats.generated_tokens == 0 {
                // Nothing said yet: no reply to keep.
                self.kv.release(job.slot);
                self.emit(Event::Failed {
                    npc: job.npc,
                    request: job.request,
                    error: NpcError::DeadlineExceeded,
                });
            } else {
                self.finish(job, FinishReason::Deadline);
            }
        }
    }

    fn finish(&mut self, mut job: Job, mut reason: FinishReason) {
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
        if job.hold {
            return self.finish_held(job, reason);
        }
        if !tail.is_empty() {
            self.emit(Event::Delta {
                npc: job.npc,
                request: job.request,
                text: tail,
            });
        }
        self.kv.release(job.slot);
        job.stats.finish = reason;
        job.stats.confidence = job.confidence.summary();
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
            conversation.turns.push(Turn {
                player: job.line,
                npc: turn_text,
            });
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

    /// A held reply is complete: the cloud (or the fallback line) replaces it, or it goes
    /// out now as one delta.
    fn finish_held(&mut self, mut job: Job, reason: FinishReason) {
        self.kv.release(job.slot);
        let mut text = job.spoken();
        job.stats.finish = reason;
        job.stats.confidence = job.confidence.summary();
        if job.escalate_held
            && let Some(c) = self.npcs.get(&job.npc)
            && self.escalator.second_opinion(
                job.npc,
                job.request,
                &job.line,
                &text,
                job.stats.confidence.as_ref(),
                &c.profile,
                &c.turns,
                self.events,
            )
        {
            return;
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
                text = c.next_dont_know();
                job.deflection = Some(text.clone());
                job.guard = ReplyGuard::default();
                job.stats.source = ReplySource::Fallback;
            }
            job.stats.timing.routing += started.elapsed();
        }
        if !text.is_empty() {
            self.emit(Event::Delta {
                npc: job.npc,
                request: job.request,
                text: text.clone(),
            });
        }
        let turn_text = job.turn_text();
        if let Some(conversation) = self.npcs.get_mut(&job.npc) {
            conversation.knowledge.learn_from(&job.line);
            conversation.turns.push(Turn {
                player: job.line,
                npc: turn_text,
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
    fn fail_all(&mut self, reason: &str) {
        tracing::error!("npc_native: {reason}");
        for job in std::mem::take(&mut self.active) {
            self.kv.clear(&mut self.ctx, job.slot);
            self.emit(Event::Failed {
                npc: job.npc,
                request: job.request,
                error: NpcError::Inference(reason.to_owned()),
            });
        }
    }
}

/// Re-tokenizing a reply's text does not always give back the tokens that were sampled (a
/// byte-pair vocabulary spells many texts in several ways), and a prompt that spells an
/// earlier reply differently would recompute everything after the first difference. Where
/// `prompt` leaves the cached tokens but the cached tokens spell the same bytes, they are
/// kept and only the rest of the prompt's text is tokenized again.
///
/// The respelling may take more tokens than the prompt's own spelling (grammar-constrained
/// action lines are often sampled a few letters at a time); it is kept only while it leaves
/// `limit` tokens or fewer, the context less the reply's room. Those tokens are cached, so
/// they cost nothing to compute.
fn align_with_cache(
    model: &LlamaModel,
    cached: &[LlamaToken],
    prompt: Vec<LlamaToken>,
    limit: usize,
) -> Vec<LlamaToken> {
    let common = cached
        .iter()
        .zip(&prompt)
        .take_while(|(a, b)| a == b)
        .count();
    if common == cached.len() || common == prompt.len() {
        return prompt;
    }
    let vocab = model.vocab();
    let mut rest = Vec::new();
    for &token in &prompt[common..] {
        vocab.token_to_piece_into(token, &mut rest, true, None);
    }
    let (mut spelled, mut take, mut matched) = (Vec::new(), 0, 0);
    for (at, &token) in cached[common..].iter().enumerate() {
        vocab.token_to_piece_into(token, &mut spelled, true, None);
        if !rest.starts_with(&spelled) {
            break;
        }
        (take, matched) = (at + 1, spelled.len());
    }
    if take == 0 {
        return prompt;
    }
    let Ok(tail) = std::str::from_utf8(&rest[matched..]) else {
        return prompt;
    };
    let mut aligned = prompt[..common].to_vec();
    aligned.extend_from_slice(&cached[common..common + take]);
    aligned.extend(vocab.tokenize(tail.as_bytes(), false, true));
    if aligned.len() > limit.max(prompt.len()) {
        return prompt;
    }
    aligned
}

/// The world preamble, then the persona: every NPC's prompt starts with the same tokens.
fn with_preamble(preamble: &str, persona: &str) -> String {
    let preamble = preamble.trim();
    if preamble.is_empty() {
        persona.to_owned()
    } else {
        format!("{preamble}\n\n{persona}")
    }
}

fn pos(n: usize) -> i32 {
    i32::try_from(n).expect("positions are bounded by the context size")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every catalog model whose file the setup fetched matches its entry (vocabulary size,
    /// end-of-turn token), and a file under another model's entry does not.
    #[test]
    fn the_fetched_catalog_models_match_their_entries() {
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets");
        let params = LlamaModelParams::default().with_vocab_only(true);
        let mut checked = 0;
        for entry in crate::catalog::MODELS {
            let path = assets.join(entry.asset_path());
            if !path.is_file() {
                continue;
            }
            let model = LlamaModel::load_from_file(backend(), &path, &params).unwrap();
            assert_eq!(catalog_mismatch(&model, entry), None, "{}", entry.id);
            let other = crate::catalog::MODELS
                .iter()
                .find(|other| other.chat_template != entry.chat_template)
                .unwrap();
            assert!(
                catalog_mismatch(&model, other).is_some(),
                "{} as {}",
                entry.id,
                other.id
            );
            checked += 1;
        }
        // `cargo xtask test` fetches the default and the test model.
        assert!(
            checked >= 2,
            "only {checked} catalog models are in {}",
            assets.display()
        );
    }
}
