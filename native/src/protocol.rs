//! The messages that cross the channel between a game and the worker thread.
//!
//! Every [`Request::Say`] ends in exactly one terminal [`Event`]: [`Event::Replied`],
//! [`Event::Cancelled`] or [`Event::Failed`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::actions::ActionCall;
use crate::persona::Persona;
pub use crate::types::{
    CloudUsage, FinishReason, ModelError, NpcError, NpcId, Priority, ReplySource, ReplyStats,
    ReplyTiming, RequestId, SayOptions, StateError,
};

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
        error: StateError,
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
        error: StateError,
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
        memories: Vec<crate::mind::memory::Memory>,
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
    /// Layers offloaded to a GPU: 0 on the CPU. With
    /// [`RuntimeConfig::gpu_layers`](crate::RuntimeConfig::gpu_layers) unset on a GPU build,
    /// the layers that fit the device's free memory beside the KV cache.
    pub gpu_layers: u32,
    /// Where the model runs: `"CPU"`, or the GPU as llama.cpp names it, e.g.
    /// `"Vulkan0 (AMD Radeon RX 7600 (RADV NAVI33))"`; `"none"` when only its vocabulary and
    /// template were read, every reply coming from the inference server
    /// ([`RemoteConfig::local_model`](crate::RemoteConfig::local_model) off).
    pub device: String,
    /// Why the model runs on the CPU although GPU layers were asked for (no GPU backend
    /// compiled in, no device found, the model or its KV cache did not fit, the load on the
    /// device failed); `None` when it runs where it was asked to.
    pub cpu_fallback: Option<String>,
    /// `false` if the GGUF had no chat template and ChatML was used instead.
    pub has_chat_template: bool,
    /// Time spent loading.
    pub load_time: Duration,
}

impl ModelInfo {
    /// Whether the model's weights were loaded, so the runtime can generate replies itself:
    /// `false` when only its vocabulary and template were read
    /// ([`RemoteConfig::local_model`](crate::RemoteConfig::local_model) off).
    #[must_use]
    pub fn generates_locally(&self) -> bool {
        self.device != crate::llama::NO_DEVICE
    }
}
