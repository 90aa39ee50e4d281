//! The messages that cross the channel between a game and the worker thread.
//!
//! Every [`Request::Say`] ends in exactly one terminal [`Event`]: [`Event::Replied`],
//! [`Event::Cancelled`] or [`Event::Failed`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::actions::ActionCall;
use crate::persona::Persona;

/// Identifies one NPC conversation. The Bevy plugin uses the entity's bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NpcId(pub u64);

/// Identifies one player line and the reply to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// What a game asks of the worker.
#[derive(Debug)]
pub enum Request {
    /// Gives an NPC its persona, or replaces it (hot reload). The conversation is kept.
    /// Answered by [`Event::PersonaAccepted`] or [`Event::PersonaRejected`].
    SetPersona {
        /// The NPC.
        npc: NpcId,
        /// Who the NPC is.
        persona: Box<Persona>,
    },
    /// The player says `text` to `npc`; the NPC replies.
    Say {
        /// The NPC addressed.
        npc: NpcId,
        /// Chosen by the sender; repeated on every event about this reply.
        request: RequestId,
        /// What the player said.
        text: String,
        /// Scheduling: priority and deadline.
        options: SayOptions,
        /// When the game sent it; the deadline counts from here.
        sent: Instant,
    },
    /// Stops the NPC's reply in flight (or queued). Answered by [`Event::Cancelled`].
    Cancel {
        /// The NPC whose reply to stop.
        npc: NpcId,
    },
    /// Writes the NPC's conversation and KV state to `path` (atomically). Answered by
    /// [`Event::NpcSaved`] or [`Event::NpcSaveFailed`].
    SaveNpc {
        /// The NPC.
        npc: NpcId,
        /// The file to write.
        path: PathBuf,
    },
    /// Restores the NPC's conversation and KV state from `path`. The NPC must have its persona.
    /// Answered by [`Event::NpcLoaded`] or [`Event::NpcLoadFailed`].
    LoadNpc {
        /// The NPC.
        npc: NpcId,
        /// The file to read.
        path: PathBuf,
    },
    /// What the game did with an [`Event::ActionRequested`]. The NPC reads it as a note
    /// before the player's next line, so it can speak of it.
    ActionOutcome {
        /// The NPC that asked.
        npc: NpcId,
        /// The action it asked for.
        action: ActionCall,
        /// Whether the game carried it out.
        approved: bool,
        /// Why (optional; "you have no gold", "the gate is already open").
        reason: String,
    },
    /// Gives the NPC a long-term memory ("the player saved the mill"). The most relevant
    /// memories enter later prompts and are saved with the NPC. Answered by
    /// [`Event::Remembered`], or [`Event::RememberFailed`] for an unknown NPC or empty text.
    Remember {
        /// The NPC.
        npc: NpcId,
        /// The fact, as a sentence.
        text: String,
        /// 1 (trivia) to 10 (life-changing); clamped to that range.
        importance: u8,
    },
    /// Lets the NPC tell one of its secrets from now on (the story allows it): the secret
    /// whose text contains `secret` (case-insensitive; it must match exactly one) becomes
    /// knowledge for that NPC, saved with its state. Answered by [`Event::SecretRevealed`] or
    /// [`Event::RevealFailed`].
    RevealSecret {
        /// The NPC.
        npc: NpcId,
        /// The secret's text, or a part of it that names one secret.
        secret: String,
    },
    /// Asks what the NPC has learned (memories and summary), for debug overlays and tools.
    /// Answered by [`Event::Mind`], or [`Event::RememberFailed`] for an unknown NPC.
    Inspect {
        /// The NPC.
        npc: NpcId,
    },
    /// Forgets an NPC: its persona, conversation and cache.
    Forget {
        /// The NPC.
        npc: NpcId,
    },
    /// Stops the worker after the current step.
    Shutdown,
    /// Fault injection for tests of the game-facing side. Not for games.
    #[doc(hidden)]
    Debug(DebugHook),
}

/// Who goes first when several NPCs have work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// NPC-to-NPC chatter and other work nobody is waiting for: yields to everything else.
    Background,
    /// The default.
    #[default]
    Normal,
    /// The NPC the player is talking to: its prompt is processed first.
    Player,
}

/// How a reply is scheduled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SayOptions {
    /// Who goes first.
    pub priority: Priority,
    /// Time allowed from the moment the game sends the request. A reply not started by then fails
    /// with [`NpcError::DeadlineExceeded`]; one in progress ends with
    /// [`FinishReason::Deadline`] and the text so far.
    pub deadline: Option<Duration>,
}

/// Fault-injection hooks; they exist so tests can prove the game survives a stuck or dead
/// worker.
#[doc(hidden)]
#[derive(Debug)]
pub enum DebugHook {
    /// The worker blocks until this channel yields or disconnects.
    WaitFor(Receiver<()>),
    /// The worker panics.
    Panic,
}

/// What the worker tells the game.
// `Replied` carries its stats inline: an event crosses the channel once, and boxing them
// would cost an allocation per reply and a field access the game writes everywhere.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The model is loaded; requests will be served.
    ModelLoaded(ModelInfo),
    /// The model could not be loaded; every request will fail with
    /// [`NpcError::ModelUnavailable`].
    ModelFailed(ModelError),
    /// A persona was accepted.
    PersonaAccepted {
        /// The NPC.
        npc: NpcId,
        /// Tokens in the persona's system prompt (its cacheable prefix).
        prefix_tokens: usize,
    },
    /// A persona was refused; the NPC keeps its previous persona, if any.
    PersonaRejected {
        /// The NPC.
        npc: NpcId,
        /// Why.
        error: NpcError,
    },
    /// More of a reply, as it is generated.
    Delta {
        /// The NPC speaking.
        npc: NpcId,
        /// The reply this belongs to.
        request: RequestId,
        /// The new text.
        text: String,
    },
    /// A reply is complete.
    Replied {
        /// The NPC speaking.
        npc: NpcId,
        /// The reply.
        request: RequestId,
        /// The whole reply text.
        text: String,
        /// Why and how it ended.
        stats: ReplyStats,
    },
    /// The NPC's reply asks the game to act: always an action its persona declares, with
    /// every parameter in type. Sent just before the reply's [`Event::Replied`] (whose text
    /// holds only the spoken part). Answer with [`Request::ActionOutcome`].
    ActionRequested {
        /// The NPC asking.
        npc: NpcId,
        /// The reply it came with.
        request: RequestId,
        /// The action and its arguments.
        action: ActionCall,
    },
    /// A reply was cancelled before it completed; it is not added to the conversation.
    Cancelled {
        /// The NPC.
        npc: NpcId,
        /// The reply.
        request: RequestId,
    },
    /// A request failed; the NPC and the runtime carry on.
    Failed {
        /// The NPC.
        npc: NpcId,
        /// The request.
        request: RequestId,
        /// Why.
        error: NpcError,
    },
    /// An NPC's state was saved.
    NpcSaved {
        /// The NPC.
        npc: NpcId,
        /// The file written.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// Tokens of KV state included (0 if the NPC had none resident).
        kv_tokens: usize,
    },
    /// An NPC's state could not be saved; any previous file at `path` is intact.
    NpcSaveFailed {
        /// The NPC.
        npc: NpcId,
        /// The file.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// An NPC's state was loaded. Its conversation is always restored; its KV state only
    /// when the file matches this model, template and context shape, otherwise it is
    /// recomputed on the next turn and `kv_note` says why.
    NpcLoaded {
        /// The NPC.
        npc: NpcId,
        /// Turns of conversation restored.
        turns: usize,
        /// Tokens of KV state restored (0 when recomputing).
        kv_tokens: usize,
        /// Why the KV state was not restored, if it was not.
        kv_note: Option<String>,
        /// Why the NPC's memories and summary were not restored as saved, if they were not
        /// (a damaged memory section: the NPC keeps what still parsed, else starts with an
        /// empty mind; the conversation is restored either way).
        mind_note: Option<String>,
    },
    /// An NPC's state could not be loaded; the NPC keeps what it had.
    NpcLoadFailed {
        /// The NPC.
        npc: NpcId,
        /// Why.
        error: String,
    },
    /// A memory was stored.
    Remembered {
        /// The NPC.
        npc: NpcId,
        /// Memories the NPC now holds.
        memories: usize,
    },
    /// What an NPC has learned, answering [`Request::Inspect`].
    Mind {
        /// The NPC.
        npc: NpcId,
        /// Its long-term memories, oldest first.
        memories: Vec<crate::Memory>,
        /// The rolling summary's kept sentences, oldest first.
        summary: Vec<String>,
        /// Leading turns of the conversation the summary stands for (no longer verbatim in
        /// the prompt).
        summarised_turns: usize,
        /// Lore entries the NPC can search.
        lore_entries: usize,
        /// With `compress_lore`: lore tokens before and after compression, and whether the
        /// compressed text came from the disk cache.
        lore_compression: Option<(usize, usize, bool)>,
        /// What the model wrote about the summarised turns, once its background job is done
        /// (see [`Event::SummaryWritten`]).
        written_summary: Option<String>,
    },
    /// The model finished writing its part of an NPC's rolling summary, in the background
    /// (it never runs while a reply is queued or in progress). The summary block in the
    /// NPC's prompt changes with it, once, and then stays the same until more turns are
    /// folded.
    SummaryWritten {
        /// The NPC.
        npc: NpcId,
        /// Leading turns of the conversation the written summary covers.
        summarised_turns: usize,
        /// The validated text; `None` when the model's output was refused (empty, an echo
        /// of its instructions, a loop), and the summary keeps its extractive facts alone.
        text: Option<String>,
    },
    /// An NPC's prompt prefix (its system prompt and earlier turns) is in its KV cache, computed
    /// in the background after its persona was set ([`RuntimeConfig::prewarm`](crate::RuntimeConfig::prewarm)),
    /// so the player's next line costs only its own tokens. Not sent when the player spoke
    /// first (the reply computes the prefix itself) or when no KV slot was free.
    Prewarmed {
        /// The NPC.
        npc: NpcId,
        /// Tokens of the prefix now cached.
        prefix_tokens: usize,
        /// Of those, the tokens this prewarm computed (the rest were cached already, or
        /// copied from another NPC's shared preamble).
        computed_tokens: usize,
    },
    /// A memory could not be stored (or an NPC inspected).
    RememberFailed {
        /// The NPC.
        npc: NpcId,
        /// Why.
        error: NpcError,
    },
    /// A secret became knowledge ([`Request::RevealSecret`]): the NPC may tell it now.
    SecretRevealed {
        /// The NPC.
        npc: NpcId,
        /// The secret, as its persona wrote it.
        secret: String,
    },
    /// [`Request::RevealSecret`] failed: unknown NPC, or no single secret matched.
    RevealFailed {
        /// The NPC.
        npc: NpcId,
        /// Why.
        error: NpcError,
    },
    /// The worker thread stopped unexpectedly. Nothing more will be served.
    WorkerDied {
        /// What it said as it died.
        reason: String,
    },
}

/// Facts about the loaded model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// The file loaded.
    pub path: PathBuf,
    /// The catalog model this file is (by file name), if it is one.
    pub catalog_id: Option<&'static str>,
    /// Model parameters.
    pub n_params: u64,
    /// Context tokens available to each NPC conversation.
    pub context_per_npc: u32,
    /// Sequences (NPC conversations) that can be decoded together.
    pub slots: u32,
    /// Threads used for decoding.
    pub threads: u32,
    /// Layers offloaded to a GPU.
    pub gpu_layers: u32,
    /// `false` if the GGUF had no chat template and ChatML was used instead.
    pub has_chat_template: bool,
    /// Time spent loading.
    pub load_time: Duration,
}

/// Why a model could not be loaded.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// No file at the path (the message says how to get it for a catalog model).
    #[error("model file not found: {}{}", .0.display(), not_found_hint(.0))]
    NotFound(PathBuf),
    /// [`RuntimeConfig::with_catalog_model`](crate::RuntimeConfig::with_catalog_model) named
    /// an id the catalog does not have.
    #[error("no model {id:?} in the catalog; it has {known}", id = .0, known = catalog_ids())]
    UnknownCatalogModel(String),
    /// The file exists but does not start with the GGUF magic bytes.
    #[error("{0} is not a GGUF model file")]
    NotGguf(PathBuf),
    /// llama.cpp refused the file (corrupt, truncated or unsupported).
    #[error("llama.cpp could not load {path}: {reason}")]
    LoadFailed {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The model loaded but a context could not be created (often: not enough memory).
    #[error("could not create an inference context: {0}")]
    Context(String),
    /// The configuration makes no sense.
    #[error("invalid runtime configuration: {0}")]
    Config(String),
}

/// What to do about a missing model file: fetch it (a catalog model) or ship it.
fn not_found_hint(path: &std::path::Path) -> String {
    let catalog = path
        .file_name()
        .and_then(|name| crate::catalog::by_file_name(&name.to_string_lossy()));
    match catalog {
        Some(model) => format!(
            " (catalog model {}: `cargo xtask setup --model {}` fetches it in this project; a \
             shipped game puts it at {} in its asset folder, beside the executable)",
            model.id,
            model.id,
            model.asset_path()
        ),
        None => String::new(),
    }
}

fn catalog_ids() -> String {
    let ids: Vec<&str> = crate::catalog::MODELS.iter().map(|m| m.id).collect();
    ids.join(", ")
}

/// Why a request failed. None of these stop the runtime.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum NpcError {
    /// The model is not loaded (it failed, see [`Event::ModelFailed`]).
    #[error("the model is not available: {0}")]
    ModelUnavailable(String),
    /// No persona was set for this NPC.
    #[error("unknown NPC {0:?}: set its persona first")]
    UnknownNpc(NpcId),
    /// The player line is empty or only whitespace.
    #[error("the player said nothing")]
    EmptyLine,
    /// The player line is longer than [`RuntimeConfig::max_line_chars`](crate::RuntimeConfig).
    #[error("the player line has {chars} characters; the limit is {limit}")]
    LineTooLong {
        /// Characters in the line.
        chars: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The prompt cannot fit the NPC's context even with all history dropped.
    #[error("the prompt needs {needed} tokens but the context holds {available}")]
    ContextOverflow {
        /// Tokens the smallest possible prompt plus the reply budget needs.
        needed: usize,
        /// Tokens of context per NPC.
        available: usize,
    },
    /// The persona is invalid.
    #[error("invalid persona: {0}")]
    InvalidPersona(String),
    /// The NPC already has a reply in flight; cancel it or wait.
    #[error("the NPC is already replying")]
    Busy,
    /// [`Request::RevealSecret`] named no secret of the NPC, or more than one.
    #[error("{0}")]
    NoSuchSecret(String),
    /// llama.cpp failed while decoding.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The reply's deadline passed before it could start.
    #[error("the deadline passed before the reply could start")]
    DeadlineExceeded,
    /// The runtime is shutting down.
    #[error("the runtime is shutting down")]
    ShuttingDown,
}

/// How a reply went.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplyStats {
    /// Why generation stopped.
    pub finish: FinishReason,
    /// Tokens in the whole prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens already in the KV cache and not computed again.
    pub cached_tokens: usize,
    /// Of `cached_tokens`, those copied from another NPC's sequence rather than kept from
    /// this NPC's own earlier turns: the world preamble every NPC shares, computed once.
    pub shared_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// From the request reaching the worker to the first reply token. For
    /// [`ReplySource::Informed`]: from the line going to the cloud to the fact opening the
    /// reply.
    pub time_to_first_token: Duration,
    /// From the first reply token to the last (for [`ReplySource::Informed`], the local
    /// prefill included).
    pub generation_time: Duration,
    /// Older turns dropped to make the prompt fit the context (or the persona's prompt
    /// budget); with lore or memory in use they are summarised, not forgotten.
    pub dropped_turns: usize,
    /// Who produced the reply. For [`ReplySource::Cloud`], `prompt_tokens` and
    /// `generated_tokens` are the cloud's own counts and `cached_tokens` is 0.
    pub source: ReplySource,
    /// How sure the local model was of its tokens (`None` for cloud and fallback replies).
    pub confidence: Option<crate::escalation::ReplyConfidence>,
    /// Lore entries placed before the player's line.
    pub lore_entries: usize,
    /// Retrieved lore entries left out to stay inside the budget.
    pub dropped_lore: usize,
    /// Memories of the player placed before the line.
    pub memories: usize,
    /// Recalled memories left out to stay inside the budget.
    pub dropped_memories: usize,
    /// For [`ReplySource::Informed`]: what the cloud spent supplying the fact the local
    /// model voiced (the other counts are the local model's). For a
    /// [`ReplySource::Fallback`] after the cloud said it did not know either: what that call
    /// cost. `None` otherwise.
    pub cloud_fact: Option<CloudUsage>,
    /// Where the worker's time for this reply went (zero for cloud and fallback replies).
    pub timing: ReplyTiming,
}

/// Where a local reply's time on the worker went, summed over the steps it took part in.
///
/// `decode` is llama.cpp's; everything else is the runtime's own work on the worker thread
/// (its host work), which a benchmark compares against a bare llama.cpp loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyTiming {
    /// Building the prompt: retrieval, memories, rendering the chat template, tokenizing,
    /// aligning with the KV cache, setting up the sampler.
    pub prompt: Duration,
    /// Inside llama.cpp's `decode` calls that carried this reply's prompt tokens. A call that
    /// carried several NPCs counts in full for each of them.
    pub prefill: Duration,
    /// Inside llama.cpp's `decode` calls that carried this reply's generated tokens (as for
    /// `prefill`, a shared call counts in full).
    pub decode: Duration,
    /// Picking each token: the sampler chain over the logits, and the action grammar.
    pub sampling: Duration,
    /// Scoring each token's probability and entropy (the escalation's confidence signal).
    pub confidence: Duration,
    /// Turning tokens into text: detokenizing, the stop-string filter, sending deltas.
    pub text: Duration,
    /// Deciding where the line goes: the knowledge match against the persona, its retrieved
    /// lore and what it learned ([`escalation`](crate::escalation)).
    pub routing: Duration,
    /// The secret guard: checking the streamed text against the persona's secrets and the
    /// system prompt ([`guard`](crate::guard)).
    pub guard: Duration,
}

impl ReplyTiming {
    /// The runtime's own work: everything but `prefill` and `decode`.
    #[must_use]
    pub fn host(&self) -> Duration {
        self.prompt + self.sampling + self.confidence + self.text + self.routing + self.guard
    }
}

/// Tokens one cloud call spent, as the server counted them (or estimated when it reports no
/// usage).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloudUsage {
    /// Prompt tokens sent.
    pub prompt_tokens: u64,
    /// Completion tokens received.
    pub completion_tokens: u64,
}

/// Who produced a reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ReplySource {
    /// The local model.
    #[default]
    Local,
    /// The cloud model the question was escalated to, speaking as the NPC
    /// ([`CloudRole::Speak`](crate::escalation::CloudRole::Speak)).
    Cloud,
    /// The local model, voicing a fact it asked the cloud model for
    /// ([`CloudRole::Inform`](crate::escalation::CloudRole::Inform)); the cloud's tokens are in
    /// [`ReplyStats::cloud_fact`].
    Informed,
    /// The persona's in-character fallback line: escalation was not allowed or the cloud
    /// failed.
    Fallback,
}

impl ReplyStats {
    /// The stats of a reply from `source` that has not started: nothing counted yet, and it
    /// ends its turn unless something else ends it first.
    #[must_use]
    pub fn new(source: ReplySource) -> Self {
        Self {
            finish: FinishReason::EndOfTurn,
            prompt_tokens: 0,
            cached_tokens: 0,
            shared_tokens: 0,
            lore_entries: 0,
            dropped_lore: 0,
            memories: 0,
            dropped_memories: 0,
            generated_tokens: 0,
            time_to_first_token: Duration::ZERO,
            generation_time: Duration::ZERO,
            dropped_turns: 0,
            source,
            confidence: None,
            cloud_fact: None,
            timing: ReplyTiming::default(),
        }
    }

    /// Generated tokens per second, after the first token.
    #[must_use]
    pub fn tokens_per_second(&self) -> f64 {
        let secs = self.generation_time.as_secs_f64();
        if self.generated_tokens < 2 || secs <= 0.0 {
            0.0
        } else {
            (self.generated_tokens - 1) as f64 / secs
        }
    }
}

/// Why a reply ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn.
    EndOfTurn,
    /// A stop string was reached.
    StopString,
    /// The token limit was reached.
    MaxTokens,
    /// The NPC's context filled up.
    ContextFull,
    /// The request's deadline passed; the text so far is the reply.
    Deadline,
    /// The secret guard stopped the reply: it was giving a secret away or repeating the
    /// NPC's instructions. The text released before that stays, and the NPC ends with one
    /// of its deflections ([`Persona::deflections`](crate::Persona::deflections)).
    Guarded,
}
