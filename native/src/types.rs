//! The plain data every layer shares: ids, scheduling options, errors, reply stats and a
//! conversation's turn. Depends on nothing else in the crate.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Identifies one NPC conversation. The Bevy plugin uses the entity's bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NpcId(pub u64);

/// Identifies one player line and the reply to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

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
    Config(FieldError),
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
    /// The model is not loaded (it failed, see [`Event::ModelFailed`](crate::Event::ModelFailed)).
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
    /// The persona's LoRA adapter ([`Persona::adapter`](crate::Persona::adapter)) cannot be
    /// used: not declared in [`RuntimeConfig::adapters`](crate::RuntimeConfig::adapters), not a
    /// GGUF LoRA, or made for another model.
    #[error("adapter {}: {reason}", path.display())]
    Adapter {
        /// The adapter file, as the persona names it.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The NPC already has a reply in flight; cancel it or wait.
    #[error("the NPC is already replying")]
    Busy,
    /// [`Request::RevealSecret`](crate::Request::RevealSecret) named no secret of the NPC, or more than one.
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

/// A persona file that could not be read: where, and why.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct PersonaError {
    /// The file the error is in, when known.
    pub file: Option<String>,
    /// 1-based line of the error (0 when the error is about the whole file).
    pub line: usize,
    /// 1-based column of the error (0 when the error is about the whole file).
    pub column: usize,
    /// The field the error concerns, when one can be named.
    pub field: Option<String>,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for PersonaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.as_deref().unwrap_or("<persona>"))?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One exchange of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    /// What the player said.
    pub player: String,
    /// What the NPC answered.
    pub npc: String,
}

/// A setting out of range or malformed: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field, as written in a persona file or a config (`sampling.top_k`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// `field` is wrong: `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error for a field inside `section` (`sampling` + `top_k`).
    #[must_use]
    pub fn within(self, section: &str) -> Self {
        Self {
            field: format!("{section}.{}", self.field),
            message: self.message,
        }
    }
}

/// Why an NPC's state could not be saved ([`Event::NpcSaveFailed`](crate::Event)) or loaded
/// ([`Event::NpcLoadFailed`](crate::Event)). A failed save keeps the previous file; a failed
/// load leaves the NPC as it was.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StateError {
    /// The request was refused: no such NPC, it is busy, or no model is loaded.
    #[error(transparent)]
    Refused(#[from] NpcError),
    /// The file could not be read, or written.
    #[error("cannot {} {}: {message}", if *.writing { "write" } else { "read" }, .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// A save (`true`) or a load.
        writing: bool,
        /// What the system said.
        message: String,
    },
    /// The file is not an NPC state file.
    #[error("{} is not an NPC state file", .0.display())]
    NotAStateFile(PathBuf),
    /// The file ends early, or its conversation section is damaged.
    #[error("{} is damaged: {reason}", .path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
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
    /// How sure the local model was of its tokens: for local replies a confidence threshold
    /// reads ([`EscalationConfig::min_confidence`](crate::EscalationConfig::min_confidence)),
    /// or every local reply with
    /// [`RuntimeConfig::confidence_for_every_reply`](crate::RuntimeConfig::confidence_for_every_reply);
    /// `None` otherwise, and for cloud, server and fallback replies.
    pub confidence: Option<ReplyConfidence>,
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
    /// The `decode` calls that carried this reply's generated tokens: the steps `decode`
    /// and `step_host` are summed over.
    pub steps: u32,
    /// Outside `decode` in those same calls: filling the batch, recording what it computed,
    /// and picking, scoring and streaming the next token of every NPC in the call (a call
    /// that carried several NPCs counts in full for each, like `decode`). Divided by
    /// `steps`, the host time of a step; it overlaps `sampling`, `confidence` and `text`.
    pub step_host: Duration,
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
    /// The runtime's inference server ([`RemoteConfig`](crate::RemoteConfig)), from the
    /// prompt the local model would have had: `prompt_tokens` and `generated_tokens` are the
    /// server's counts, `cached_tokens` what its prefix cache held (when it reports it).
    Remote,
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
    /// The inference server's stream broke after part of the reply
    /// ([`ReplySource::Remote`]); the text so far is the reply.
    Interrupted,
    /// The secret guard stopped the reply: it was giving a secret away or repeating the
    /// NPC's instructions. The text released before that stays, and the NPC ends with one
    /// of its deflections ([`Persona::deflections`](crate::Persona::deflections)).
    Guarded,
}

/// How sure the local model was of the tokens of one reply, from its logits (before sampling
/// transformations such as temperature).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplyConfidence {
    /// Tokens scored.
    pub tokens: usize,
    /// Mean natural-log probability per token.
    pub mean_logprob: f32,
    /// 10th-percentile token probability (the lowest-quantile signal of cascade work).
    pub p10_prob: f32,
    /// Lowest token probability.
    pub min_prob: f32,
    /// Mean entropy of the next-token distribution, in nats.
    pub mean_entropy: f32,
}
