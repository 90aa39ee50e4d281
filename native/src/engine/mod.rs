//! The worker thread: owns llama.cpp, drains the inbox, decodes every NPC with pending work
//! in one batch per step, samples, and streams events out.
//!
//! - [`sequence`]: what is kept per NPC (`Conversation`), per waiting line (`Queued`) and per
//!   reply being produced (`Job`);
//! - [`handlers`]: the answer to each [`Request`];
//! - [`batch`]: admission, prompt building, batch filling, decoding and sampling;
//! - [`finish`]: the end of a reply;
//! - [`background`]: prewarm and summaries, when nothing else is waiting;
//! - [`remote`]: replies the inference server generates ([`RuntimeConfig::remote`]).

mod background;
mod batch;
mod finish;
mod handlers;
mod remote;
mod scheduler;
mod sequence;

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, select};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;

use crate::actions;
use crate::config::RuntimeConfig;
use crate::escalation::Escalator;
use crate::kv::cache::{DiskConfig, KvCacheManager, probe_layout};
use crate::kv::layout::KvLayout;
use crate::kv::persist::{self, StateIdentity};
use crate::llama::adapter::Adapters;
use crate::llama::prompt::PromptBuilder;
use crate::llama::{self, backend};
use crate::mind::summarizer::Summarizer;
use crate::protocol::{DebugHook, Event, ModelError, ModelInfo, NpcError, NpcId, Request};

use remote::RemoteReplies;
use scheduler::{LineQueue, StepBudget};
use sequence::{Conversation, Job, Prewarm};

/// How long an idle worker waits on its inbox before looking for a fact the cloud supplied.
const CLOUD_POLL: Duration = Duration::from_millis(5);
/// How long an idle worker with remote replies in flight waits for a request or a piece
/// before looking round (both wake it at once; this only bounds the wait).
const REMOTE_POLL: Duration = Duration::from_secs(1);

/// Entry point of the worker thread. Never panics out: a panic becomes [`Event::WorkerDied`].
pub(crate) fn run(
    config: RuntimeConfig,
    inbox: Receiver<Request>,
    events: Sender<Event>,
    stopping: Arc<AtomicBool>,
) {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        serve(&config, &inbox, &events, &stopping);
    }));
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

fn serve(
    config: &RuntimeConfig,
    inbox: &Receiver<Request>,
    events: &Sender<Event>,
    stopping: &Arc<AtomicBool>,
) {
    let started = Instant::now();
    if !config.llama_logs {
        llama_cpp_2::send_logs_to_tracing(
            llama_cpp_2::LogOptions::default().with_logs_enabled(false),
        );
    }
    // A runtime whose every reply comes from the inference server reads the model's
    // vocabulary and template alone (`RemoteConfig::local_model` off). Without the `cloud`
    // feature there is no server client, so the model is loaded in full.
    let remote_only = config
        .remote
        .as_ref()
        .is_some_and(|remote| !remote.local_model);
    if remote_only && cfg!(not(feature = "cloud")) {
        tracing::warn!(
            "RemoteConfig::local_model is off, but npc_native was built without the `cloud` \
             feature (its HTTP client): the local model is loaded and answers every NPC"
        );
    }
    let remote_only = remote_only && cfg!(feature = "cloud");
    let loaded = config.model_file().and_then(|path| {
        let placed = if remote_only {
            llama::load_vocabulary(config, &path)?
        } else {
            llama::load_placed(config, &path, stopping)?
        };
        Ok((placed, path))
    });
    let (placed, model_path) = match loaded {
        Ok(loaded) => loaded,
        // The game is quitting: the load was abandoned, nobody waits for its outcome.
        Err(_) if stopping.load(Ordering::Relaxed) => return,
        Err(error) => return serve_without_model(&error, inbox, events),
    };
    let llama::Placed {
        mut model,
        config,
        device,
        cpu_fallback,
    } = placed;
    // From here on, the configuration as placed: its `gpu_layers` are the ones loaded.
    let config = &config;
    let catalog = model_path
        .file_name()
        .and_then(|name| crate::catalog::by_file_name(&name.to_string_lossy()));
    if let Some(entry) = catalog {
        llama::check_catalog_expectations(&model, entry);
    }
    let threads = config.effective_threads();
    // Adapters load into the model, which must not be borrowed by a context yet; a
    // vocabulary has no tensors to adapt.
    let adapters = if remote_only {
        Adapters::none()
    } else {
        Adapters::load(
            &mut model,
            &model_path,
            &config.adapters,
            &config.assets_dir,
            |file| persist::model_fingerprint(file).unwrap_or_default(),
        )
    };
    let model = model;
    let (ctx, step_budget, layout) = if remote_only {
        let layout = Err("no local model".to_owned());
        (None, None, layout)
    } else {
        let Some(local) = start_context(config, &model, stopping, inbox, events) else {
            return;
        };
        let (ctx, step_budget, layout) = local;
        (Some(ctx), step_budget, layout)
    };
    let prompts = PromptBuilder::new(&model);
    // Without a context, what one would give each NPC: the server's slots are sized alike.
    let context_per_npc = ctx.as_ref().map_or(config.context_size as usize, |ctx| {
        (ctx.n_ctx() / config.slots) as usize
    });
    let info = ModelInfo {
        path: model_path.clone(),
        catalog_id: catalog.map(|entry| entry.id),
        n_params: model.n_params(),
        context_per_npc: u32::try_from(context_per_npc).unwrap_or(u32::MAX),
        slots: config.slots,
        threads,
        gpu_layers: config.effective_gpu_layers().min(model.n_layer() + 1),
        device,
        cpu_fallback,
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
        adapter: String::new(),
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
            context_per_npc,
            layout,
        ),
        identity,
        batch: LlamaBatch::new(batch_size, i32::try_from(config.slots).unwrap_or(1)),
        npcs: HashMap::new(),
        queue: LineQueue::default(),
        active: Vec::new(),
        escalator: Escalator::new(&config.escalation),
        summarizer: if remote_only {
            Summarizer::off()
        } else {
            Summarizer::new(threads)
        },
        prewarm: VecDeque::new(),
        step_budget,
        sampling_threads: config.effective_sampling_threads().max(1) as usize,
        stopping: Arc::clone(stopping),
        remote: config.remote.as_ref().and_then(RemoteReplies::new),
        adapters,
    };
    engine.run(inbox);
}

/// The worker's context, warmed up, with its step budget and KV layout; `None` when the game
/// quit meanwhile or the context could not be made (then the runtime serves without a model).
fn start_context<'m>(
    config: &RuntimeConfig,
    model: &'m LlamaModel,
    stopping: &Arc<AtomicBool>,
    inbox: &Receiver<Request>,
    events: &Sender<Event>,
) -> Option<(
    LlamaContext<'m>,
    Option<StepBudget>,
    Result<KvLayout, String>,
)> {
    let params = llama::worker_context_params(config);
    // Each step below takes from milliseconds to a second on a large context: a game that
    // quits meanwhile is not kept waiting for the rest.
    let quitting = || stopping.load(Ordering::Relaxed);
    if quitting() {
        return None;
    }
    let mut ctx = match model.new_context(backend(), params) {
        Ok(ctx) => ctx,
        Err(err) => {
            serve_without_model(&ModelError::Context(err.to_string()), inbox, events);
            return None;
        }
    };
    if quitting() {
        return None;
    }
    llama::warm_up(model, &mut ctx);
    if quitting() {
        return None;
    }
    // On a GPU a full batch takes milliseconds, and a first decode's kernel set-up would make
    // the timing wrong: the limit is for CPU runs.
    let step_budget = config
        .max_step_time
        .filter(|_| config.effective_gpu_layers() == 0)
        .map(|limit| step_budget(&mut ctx, limit, config.batch_size as usize));
    if quitting() {
        return None;
    }
    let layout = probe_layout(&mut ctx);
    if let Err(reason) = &layout {
        tracing::warn!("saved and evicted KV states will be recomputed, not restored: {reason}");
    }
    Some((ctx, step_budget, layout))
}

/// Tokens sampled to time prompt processing at start-up.
const CALIBRATION_TOKENS: usize = 32;

/// The prompt tokens one step may take to stay within `limit`, as a start-up timing finds
/// them: a 32-token decode is timed (into sequence 0, then cleared) and the tokens that fit
/// `limit` at that speed (at least 16, at most `batch`) start the [`StepBudget`], which
/// follows the machine's speed from there. A short decode is slower per token than a long
/// one, so the estimate errs towards shorter steps.
fn step_budget(ctx: &mut LlamaContext<'_>, limit: Duration, batch: usize) -> StepBudget {
    let mut calibration = LlamaBatch::new(CALIBRATION_TOKENS, 1);
    let unmeasured = StepBudget::new(limit, batch);
    for at in 0..CALIBRATION_TOKENS {
        let token = llama_cpp_2::token::LlamaToken(i32::try_from(at).unwrap_or(0));
        if calibration.add(token, pos(at), &[0], false).is_err() {
            return unmeasured;
        }
    }
    let started = Instant::now();
    let decoded = ctx.decode(&mut calibration);
    let took = started.elapsed();
    let _ = ctx.clear_kv_cache_seq(Some(0), None, None);
    if decoded.is_err() || took.is_zero() {
        return unmeasured;
    }
    let fits = limit.as_secs_f64() / (took.as_secs_f64() / CALIBRATION_TOKENS as f64);
    let budget = StepBudget::new(limit, (fits as usize).min(batch));
    tracing::debug!(
        "a step takes at most {} prompt tokens ({took:?} for {CALIBRATION_TOKENS})",
        budget.tokens()
    );
    budget
}

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
                error: unavailable().into(),
            },
            Request::LoadNpc { npc, .. } => Event::NpcLoadFailed {
                npc,
                error: unavailable().into(),
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

struct Engine<'m, 'e> {
    config: &'e RuntimeConfig,
    model: &'m LlamaModel,
    /// The context the local model decodes in; `None` on a runtime whose replies all come
    /// from the inference server ([`RemoteConfig::local_model`](crate::RemoteConfig) off).
    ctx: Option<LlamaContext<'m>>,
    prompts: PromptBuilder,
    events: &'e Sender<Event>,
    context_per_npc: usize,
    kv: KvCacheManager,
    identity: StateIdentity,
    batch: LlamaBatch<'static>,
    npcs: HashMap<NpcId, Conversation>,
    /// Lines waiting for a KV slot.
    queue: LineQueue,
    active: Vec<Job>,
    /// Routing to the cloud, spend and rate limits.
    escalator: Escalator,
    /// Model-written summaries, run when nothing else is (see `crate::mind::summarizer`).
    summarizer: Summarizer<'m>,
    /// NPCs whose prompt prefix is to be computed before they are spoken to, oldest first
    /// (see [`RuntimeConfig::prewarm`]).
    prewarm: VecDeque<Prewarm>,
    /// Most prompt tokens one step takes ([`RuntimeConfig::max_step_time`]); `None`: no
    /// limit but the batch.
    step_budget: Option<StepBudget>,
    /// Threads that sample a step's NPCs ([`RuntimeConfig::sampling_threads`]).
    sampling_threads: usize,
    /// Set when the game drops the runtime: a step of two decodes stops after the first.
    stopping: Arc<AtomicBool>,
    /// Replies the inference server generates ([`RuntimeConfig::remote`]); `None` without
    /// one.
    remote: Option<RemoteReplies>,
    /// The declared LoRA adapters ([`RuntimeConfig::adapters`]) and the one the context has
    /// set.
    adapters: Adapters,
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
                let pieces = self
                    .remote
                    .as_ref()
                    .filter(|r| r.in_flight())
                    .map(|r| r.pieces.clone());
                let next = if let Some(pieces) = pieces {
                    // Remote replies stream in: wake for their pieces too.
                    let nap = if self.escalator.awaiting_cloud() {
                        CLOUD_POLL
                    } else {
                        REMOTE_POLL
                    };
                    select! {
                        recv(inbox) -> request => match request {
                            Ok(request) => Some(request),
                            Err(_) => return,
                        },
                        recv(pieces) -> piece => {
                            if let Ok(piece) = piece {
                                self.on_piece(piece);
                            }
                            None
                        },
                        default(nap) => None,
                    }
                } else if self.escalator.awaiting_cloud() {
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
            self.absorb_remote();
            self.admit_queued();
            if !self.active.is_empty() {
                self.step();
            } else if self.queue.is_empty() && !self.step_prewarm() {
                // Lowest priority: only when no reply is waiting or in progress.
                self.step_summary();
            }
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
                self.forget_kv(npc);
            }
            Request::Shutdown => return false,
            Request::Debug(hook) => run_debug_hook(hook),
        }
        true
    }

    /// Whether `npc` has a line waiting, a reply in progress or a cloud call in flight.
    fn busy(&self, npc: NpcId) -> bool {
        self.active.iter().any(|job| job.npc == npc)
            || self.queue.holds(npc)
            || self.escalator.busy(npc)
            || self.remote.as_ref().is_some_and(|r| r.busy(npc))
    }

    fn emit(&self, event: Event) {
        // The game may have dropped its receiver while shutting down; nothing to do then.
        let _ = self.events.send(event);
    }

    fn shut_down(&mut self) {
        self.escalator.shut_down(self.events);
        for (npc, request) in self
            .remote
            .as_mut()
            .map(RemoteReplies::stop_all)
            .unwrap_or_default()
        {
            self.emit(Event::Failed {
                npc,
                request,
                error: NpcError::ShuttingDown,
            });
        }
        for job in std::mem::take(&mut self.active) {
            self.emit(Event::Failed {
                npc: job.npc,
                request: job.request,
                error: NpcError::ShuttingDown,
            });
        }
        for queued in self.queue.take_all() {
            self.emit(Event::Failed {
                npc: queued.npc,
                request: queued.request,
                error: NpcError::ShuttingDown,
            });
        }
    }
}

/// Why a line cannot reach the local model of a runtime that loads none.
fn no_local_model() -> NpcError {
    NpcError::ModelUnavailable(
        "this runtime loads no local model (RemoteConfig::local_model is off)".to_owned(),
    )
}

fn pos(n: usize) -> i32 {
    i32::try_from(n).expect("positions are bounded by the context size")
}
