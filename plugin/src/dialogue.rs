//! Dialogue components and the messages and events a game uses to talk to NPCs.
//!
//! Streams are [`Message`]s (read every frame): [`PlayerSaid`] in, [`NpcReplyDelta`] out.
//! Moments are [`EntityEvent`]s targeted at the NPC, for observers: [`NpcReplied`],
//! [`NpcReplyCancelled`], [`NpcPersonaApplied`].

use bevy::prelude::*;
use npc_native::{ModelError, ModelInfo, NpcError, ReplyStats, StateError};

use crate::persona::Persona;

/// Marks an entity as an NPC that talks, with the persona it speaks as.
///
/// Spawning it is enough: its persona is sent to the worker once loaded, and again whenever
/// the file changes. Despawning it makes the worker forget the conversation.
#[derive(Component, Clone, Debug)]
#[require(DialogueHistory, NpcState)]
pub struct Npc {
    /// The persona asset (`*.persona.ron`).
    pub persona: Handle<Persona>,
}

impl Npc {
    /// An NPC speaking as `persona`.
    #[must_use]
    pub fn new(persona: Handle<Persona>) -> Self {
        Self { persona }
    }
}

/// Where an NPC is in a conversation.
#[derive(Component, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NpcState {
    /// Not replying.
    #[default]
    Idle,
    /// The player spoke; no reply token yet.
    Thinking,
    /// Reply tokens are streaming.
    Speaking,
}

/// Who said a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speaker {
    /// The player.
    Player,
    /// The NPC.
    Npc,
}

/// One line of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialogueLine {
    /// Who said it.
    pub speaker: Speaker,
    /// What was said.
    pub text: String,
}

/// The conversation as the game shows it: player lines when sent, NPC lines when complete.
#[derive(Component, Clone, Debug, Default)]
pub struct DialogueHistory {
    /// Oldest first.
    pub lines: Vec<DialogueLine>,
}

/// The player says something to an NPC. Write it with a `MessageWriter<PlayerSaid>`.
#[derive(Message, Clone, Debug)]
pub struct PlayerSaid {
    /// The NPC addressed.
    pub npc: Entity,
    /// What the player said.
    pub text: String,
}

/// Stop an NPC's reply in flight (the player walked away).
#[derive(Message, Clone, Copy, Debug)]
pub struct CancelReply {
    /// The NPC.
    pub npc: Entity,
}

/// More of an NPC's reply, as it is generated.
#[derive(Message, Clone, Debug)]
pub struct NpcReplyDelta {
    /// The NPC speaking.
    pub npc: Entity,
    /// The new text.
    pub text: String,
}

/// An NPC finished its reply.
#[derive(EntityEvent, Clone, Debug)]
pub struct NpcReplied {
    /// The NPC.
    pub entity: Entity,
    /// The whole reply.
    pub text: String,
    /// Tokens, timing and why it ended.
    pub stats: ReplyStats,
}

/// An NPC's reply was cancelled (see [`CancelReply`]).
#[derive(EntityEvent, Clone, Copy, Debug)]
pub struct NpcReplyCancelled {
    /// The NPC.
    pub entity: Entity,
}

/// The worker accepted an NPC's persona (first load or hot reload); the next reply uses it.
#[derive(EntityEvent, Clone, Copy, Debug)]
pub struct NpcPersonaApplied {
    /// The NPC.
    pub entity: Entity,
    /// Tokens in the persona's system prompt.
    pub prefix_tokens: usize,
}

/// Save an NPC's conversation and KV state to `path` (for example from the game's own save
/// system, one file per NPC). Answered by [`NpcStateSaved`] or [`NpcAiError::SaveFailed`].
#[derive(Message, Clone, Debug)]
pub struct SaveNpcState {
    /// The NPC.
    pub npc: Entity,
    /// The file to write (atomically: a failed save keeps the previous file).
    pub path: std::path::PathBuf,
}

/// Restore an NPC's conversation and KV state from `path`, so its first reply after a
/// reload costs only the new tokens. Waits for the NPC's persona if it is still loading.
/// Answered by [`NpcStateLoaded`] or [`NpcAiError::LoadFailed`].
#[derive(Message, Clone, Debug)]
pub struct LoadNpcState {
    /// The NPC.
    pub npc: Entity,
    /// The file to read.
    pub path: std::path::PathBuf,
}

/// Let an NPC tell one of its secrets from now on, when the story allows it: the secret whose
/// text contains `secret` (case-insensitive; it must name exactly one) becomes that NPC's
/// knowledge, kept across persona reloads and saved with its state. Until then the secret
/// guard keeps it out of every reply. Send it once the NPC's persona is applied
/// ([`NpcPersonaApplied`]). Answered by [`NpcSecretRevealed`] or
/// [`NpcAiError::RevealFailed`].
#[derive(Message, Clone, Debug)]
pub struct RevealSecret {
    /// The NPC.
    pub npc: Entity,
    /// The secret's text, or a part of it that names one secret.
    pub secret: String,
}

/// A secret became an NPC's knowledge ([`RevealSecret`]).
#[derive(EntityEvent, Clone, Debug)]
pub struct NpcSecretRevealed {
    /// The NPC.
    pub entity: Entity,
    /// The secret, as the persona wrote it.
    pub secret: String,
}

/// An NPC's state was saved.
#[derive(EntityEvent, Clone, Debug)]
pub struct NpcStateSaved {
    /// The NPC.
    pub entity: Entity,
    /// The file written.
    pub path: std::path::PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
}

/// An NPC's state was loaded. The conversation always is; the KV state only when the file
/// matches the running model, template and context (else it is recomputed, see `kv_note`).
#[derive(EntityEvent, Clone, Debug)]
pub struct NpcStateLoaded {
    /// The NPC.
    pub entity: Entity,
    /// Turns of conversation restored.
    pub turns: usize,
    /// Tokens of KV state restored.
    pub kv_tokens: usize,
    /// Why the KV state was recomputed instead, if it was.
    pub kv_note: Option<String>,
    /// Why the NPC's memories and summary were not restored as saved, if they were not
    /// (the conversation is restored either way).
    pub mind_note: Option<String>,
}

/// The model is loaded and NPCs can talk.
#[derive(Message, Clone, Debug)]
pub struct ModelLoaded(pub ModelInfo);

/// The model could not be loaded; every reply will fail with an error.
#[derive(Message, Clone, Debug)]
pub struct ModelFailed(pub ModelError);

/// Something went wrong; the game keeps running. Read these to show or log problems.
#[derive(Message, Clone, Debug, thiserror::Error)]
pub enum NpcAiError {
    /// A [`PlayerSaid`] or [`CancelReply`] named an entity that is not an [`Npc`].
    #[error("entity {0} is not an NPC")]
    UnknownNpc(Entity),
    /// A reply failed (empty or too long line, context overflow, model unavailable…).
    #[error("reply of NPC {npc} failed: {error}")]
    ReplyFailed {
        /// The NPC.
        npc: Entity,
        /// Why.
        error: NpcError,
    },
    /// A persona file failed to load or reload; an NPC using it keeps its last good persona.
    #[error("persona {path} failed to load: {message}")]
    PersonaLoad {
        /// The asset path.
        path: String,
        /// What is wrong, with line and column.
        message: String,
    },
    /// The worker refused a persona (for example, it overflows the context).
    #[error("persona of NPC {npc} was rejected: {error}")]
    PersonaRejected {
        /// The NPC.
        npc: Entity,
        /// Why.
        error: NpcError,
    },
    /// A [`RevealSecret`] named no single secret of the NPC (or the NPC is unknown).
    #[error("revealing a secret of NPC {npc} failed: {error}")]
    RevealFailed {
        /// The NPC.
        npc: Entity,
        /// Why.
        error: NpcError,
    },
    /// Saving an NPC's state failed; the previous file is intact.
    #[error("saving NPC {npc} failed: {error}")]
    SaveFailed {
        /// The NPC.
        npc: Entity,
        /// Why.
        error: StateError,
    },
    /// Loading an NPC's state failed; the NPC keeps what it had.
    #[error("loading NPC {npc} failed: {error}")]
    LoadFailed {
        /// The NPC.
        npc: Entity,
        /// Why.
        error: StateError,
    },
    /// The model failed to load (also sent as [`ModelFailed`]).
    #[error("{0}")]
    ModelFailed(ModelError),
    /// The worker thread stopped; no more replies will come.
    #[error("the NPC worker died: {reason}")]
    WorkerDied {
        /// What it said as it died.
        reason: String,
    },
}

pub(crate) fn plugin(app: &mut App) {
    app.add_message::<PlayerSaid>()
        .add_message::<CancelReply>()
        .add_message::<SaveNpcState>()
        .add_message::<LoadNpcState>()
        .add_message::<RevealSecret>()
        .add_message::<NpcReplyDelta>()
        .add_message::<ModelLoaded>()
        .add_message::<ModelFailed>()
        .add_message::<NpcAiError>();
}
