#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod actions;
#[cfg(feature = "cloud")]
pub mod cloud;
mod config;
pub mod cost;
mod engine;
pub mod escalation;
pub mod guard;
mod kv;
mod llama;
mod logits;
mod mind;
mod persona;
mod protocol;
mod retrieval;
mod sampling;
mod text;
mod types;

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

/// The model catalog: every model the project can fetch (`cargo xtask setup --model ID`),
/// with its source, hashes, size, licence and chat-template expectations. See the
/// `npc_catalog` crate.
pub use npc_catalog as catalog;

pub use actions::{ActionCall, ActionSpec, ActionValue, ParamKind, ParamSpec};
pub use config::{
    Backend, CPU_UBATCH, GPU_BACKEND, KvPrecision, ModelSource, RemoteConfig, RuntimeConfig,
    default_assets_dir,
};
pub use cost::{CostMeter, CostTotals, PriceTable, SpeechStats};
pub use escalation::{
    CloudConfig, CloudRole, EscalationConfig, PersonaEscalation, ReplyConfidence,
};
pub use llama::adapter::{SyntheticAdapter, write_synthetic_adapter};
pub use mind::knowledge::{DEFAULT_RECALL, DEFAULT_RETRIEVE};
pub use mind::memory::Memory;
pub use persona::{
    MAX_ADAPTER_SCALE, MAX_PERSONA_BYTES, Persona, PersonaAdapter, PersonaError, VoiceSettings,
    first_person,
};
pub use protocol::{
    CloudUsage, DebugHook, Event, FinishReason, ModelError, ModelInfo, NpcError, NpcId, Priority,
    ReplySource, ReplyStats, ReplyTiming, Request, RequestId, SayOptions, StateError,
};
pub use retrieval::lore::{
    LoreBook, LoreEntry, LoreHit, LoreIndex, MAX_LORE_BYTES, terms as lore_terms,
};
pub use sampling::{SamplingOverrides, SamplingParams};
pub use types::FieldError;
pub use types::Turn;

/// Speech in and out (feature `voice`): the `npc-voice` helper client, speech synthesis with
/// sentence streaming, and the Whisper model converter. See the `npc_voice` crate.
#[cfg(feature = "voice")]
pub use npc_voice as voice;

/// A running worker thread that owns the model. Cheap to talk to: every method only sends
/// on a channel, and [`Runtime::events`] is read with `try_recv`/`try_iter` from a game loop
/// or with `recv` from a tool.
///
/// Dropping the runtime asks the worker to stop and waits for it to finish its current step.
pub struct Runtime {
    requests: Sender<Request>,
    events: Receiver<Event>,
    next_request: AtomicU64,
    worker: Option<JoinHandle<()>>,
    /// Set when the runtime is dropped: a model load in progress gives up at once.
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// The worker is gone (it died or shut down); the request was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the npc_native worker is not running")]
pub struct WorkerGone;

impl Runtime {
    /// Starts the worker thread, which loads the model in the background and then reports
    /// [`Event::ModelLoaded`] or [`Event::ModelFailed`]. Returns at once.
    ///
    /// # Panics
    /// If the operating system cannot spawn a thread.
    #[must_use]
    pub fn start(config: RuntimeConfig) -> Self {
        let (requests, inbox) = crossbeam_channel::unbounded();
        let (event_sender, events) = crossbeam_channel::unbounded();
        let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = std::sync::Arc::clone(&stopping);
        let worker = std::thread::Builder::new()
            .name("npc_native worker".into())
            .spawn(move || engine::run(config, inbox, event_sender, stop))
            .expect("failed to spawn the npc_native worker thread");
        Self {
            requests,
            events,
            next_request: AtomicU64::new(1),
            worker: Some(worker),
            stopping,
        }
    }

    /// Sends a raw request.
    ///
    /// # Errors
    /// [`WorkerGone`] if the worker has stopped.
    pub fn send(&self, request: Request) -> Result<(), WorkerGone> {
        self.requests.send(request).map_err(|_| WorkerGone)
    }

    /// Gives `npc` a persona (or replaces it, keeping the conversation).
    ///
    /// # Errors
    /// [`WorkerGone`] if the worker has stopped.
    pub fn set_persona(&self, npc: NpcId, persona: Persona) -> Result<(), WorkerGone> {
        self.send(Request::SetPersona {
            npc,
            persona: Box::new(persona),
        })
    }

    /// The player says `text` to `npc`. The reply streams as [`Event::Delta`]s and ends with
    /// one [`Event::Replied`], [`Event::Cancelled`] or [`Event::Failed`] carrying the
    /// returned id.
    ///
    /// # Errors
    /// [`WorkerGone`] if the worker has stopped.
    pub fn say(&self, npc: NpcId, text: impl Into<String>) -> Result<RequestId, WorkerGone> {
        self.say_with(npc, text, SayOptions::default())
    }

    /// [`Runtime::say`] with a priority and a deadline.
    ///
    /// # Errors
    /// [`WorkerGone`] if the worker has stopped.
    pub fn say_with(
        &self,
        npc: NpcId,
        text: impl Into<String>,
        options: SayOptions,
    ) -> Result<RequestId, WorkerGone> {
        let request = self.new_request_id();
        self.send(Request::Say {
            npc,
            request,
            text: text.into(),
            options,
            sent: std::time::Instant::now(),
        })?;
        Ok(request)
    }

    /// Stops `npc`'s reply in flight.
    ///
    /// # Errors
    /// [`WorkerGone`] if the worker has stopped.
    pub fn cancel(&self, npc: NpcId) -> Result<(), WorkerGone> {
        self.send(Request::Cancel { npc })
    }

    /// Saves `npc`'s conversation and KV state to `path` (written atomically). Answered by
    /// [`Event::NpcSaved`] or [`Event::NpcSaveFailed`].
    ///
    /// # Errors
    /// [`WorkerGone`] if the worker has stopped.
    pub fn save_npc(
        &self,
        npc: NpcId,
        path: impl Into<std::path::PathBuf>,
    ) -> Result<(), WorkerGone> {
        self.send(Request::SaveNpc {
            npc,
            path: path.into(),
        })
    }

    /// Restores `npc`'s conversation and KV state from `path`; set its persona first.
    /// Answered by [`Event::NpcLoaded`] or [`Event::NpcLoadFailed`].
    ///
    /// # Errors
    /// [`WorkerGone`] if the worker has stopped.
    pub fn load_npc(
        &self,
        npc: NpcId,
        path: impl Into<std::path::PathBuf>,
    ) -> Result<(), WorkerGone> {
        self.send(Request::LoadNpc {
            npc,
            path: path.into(),
        })
    }

    /// Tells `npc` what became of the action it asked for ([`Event::ActionRequested`]): the
    /// note is read by the NPC before the player's next line.
    ///
    /// # Errors
    /// [`WorkerGone`] if the worker has stopped.
    pub fn action_outcome(
        &self,
        npc: NpcId,
        action: ActionCall,
        approved: bool,
        reason: impl Into<String>,
    ) -> Result<(), WorkerGone> {
        self.send(Request::ActionOutcome {
            npc,
            action,
            approved,
            reason: reason.into(),
        })
    }

    /// Gives `npc` a long-term memory (`importance` 1-10) that later prompts recall when
    /// relevant and saves keep. Answered by [`Event::Remembered`] or
    /// [`Event::RememberFailed`].
    ///
    /// # Errors
    /// [`WorkerGone`] if the worker has stopped.
    pub fn remember(
        &self,
        npc: NpcId,
        text: impl Into<String>,
        importance: u8,
    ) -> Result<(), WorkerGone> {
        self.send(Request::Remember {
            npc,
            text: text.into(),
            importance,
        })
    }

    /// Lets `npc` tell the secret whose text contains `secret` from now on (the story allows
    /// it): it becomes knowledge for that NPC, kept across persona reloads and saved with its
    /// state. Answered by [`Event::SecretRevealed`] or [`Event::RevealFailed`].
    ///
    /// # Errors
    /// [`WorkerGone`] if the worker has stopped.
    pub fn reveal_secret(&self, npc: NpcId, secret: impl Into<String>) -> Result<(), WorkerGone> {
        self.send(Request::RevealSecret {
            npc,
            secret: secret.into(),
        })
    }

    /// Asks what `npc` has learned; answered by [`Event::Mind`].
    ///
    /// # Errors
    /// [`WorkerGone`] if the worker has stopped.
    pub fn inspect(&self, npc: NpcId) -> Result<(), WorkerGone> {
        self.send(Request::Inspect { npc })
    }

    /// Forgets `npc` entirely.
    ///
    /// # Errors
    /// [`WorkerGone`] if the worker has stopped.
    pub fn forget(&self, npc: NpcId) -> Result<(), WorkerGone> {
        self.send(Request::Forget { npc })
    }

    /// A fresh request id, for callers that build [`Request::Say`] themselves.
    pub fn new_request_id(&self) -> RequestId {
        RequestId(self.next_request.fetch_add(1, Ordering::Relaxed))
    }

    /// The worker's events. Never blocks unless you call a blocking method on it.
    #[must_use]
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Whether the worker thread has ended (shut down or died).
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.worker.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for Runtime {
    /// Stops the worker and waits for it to end: a model still loading stops at its next
    /// tensor (llama.cpp's progress callback), a reply in progress after its current step. The
    /// worker is joined, never left running: a thread inside llama.cpp while the process exits
    /// is how engine plugins crash on quit.
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.requests.send(Request::Shutdown);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// The module layers of `docs/architecture.md`: a module uses only modules of its own layer
/// or below, and none reaches itself through others (no import cycle). Read from the sources
/// (test modules, comments and string literals left out).
#[cfg(test)]
mod layering {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    const LAYERS: &[(&str, u8)] = &[
        ("types", 0),
        ("text", 0),
        ("logits", 0),
        ("sampling", 1),
        ("config", 1),
        ("llama", 2),
        ("actions", 2),
        ("cloud", 2),
        ("retrieval", 3),
        ("persona", 4),
        ("mind", 5),
        ("guard", 5),
        ("kv", 6),
        ("protocol", 6),
        ("cost", 7),
        ("escalation", 8),
        ("engine", 9),
    ];

    /// The top-level module a source file belongs to.
    fn module_of(src: &Path, file: &Path) -> String {
        let rel = file.strip_prefix(src).expect("under src");
        let first = rel.components().next().expect("a component");
        first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned()
    }

    /// The code of a file without its test module, comments and string literals.
    fn code(text: &str) -> String {
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let mut out = String::new();
        for line in text.lines() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            let mut in_string = false;
            let mut escaped = false;
            for c in line.chars() {
                if in_string {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        in_string = false;
                    }
                } else if c == '"' {
                    in_string = true;
                } else {
                    out.push(c);
                }
            }
            out.push('\n');
        }
        out
    }

    /// The crate's top-level modules `code` names (`crate::x`, `crate::{x, y}`).
    fn uses(code: &str) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .map(str::trim)
                    .collect(),
                None => vec![rest],
            };
            for name in names {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
        found
    }

    fn sources(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                sources(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }

    #[test]
    fn every_module_uses_only_its_layer_or_below() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut checked = BTreeSet::new();
        let mut wrong = Vec::new();
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            let module = module_of(&src, &file);
            if module == "lib" || file.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let layer = *layers
                .get(module.as_str())
                .unwrap_or_else(|| panic!("module `{module}` has no layer in LAYERS"));
            checked.insert(module.clone());
            let text = std::fs::read_to_string(&file).expect("read source");
            let code = code(&text);
            // `crate::Name` goes through lib.rs's re-exports, past the check: name the module.
            if code
                .match_indices("crate::")
                .any(|(at, _)| code[at + 7..].starts_with(|c: char| c.is_ascii_uppercase()))
            {
                wrong.push(format!(
                    "{} names an item through the crate root",
                    file.display()
                ));
            }
            for used in uses(&code) {
                if used == module || used == "catalog" {
                    continue;
                }
                if layers.contains_key(used.as_str()) {
                    graph
                        .entry(module.clone())
                        .or_default()
                        .insert(used.clone());
                }
                match layers.get(used.as_str()) {
                    Some(&l) if l <= layer => {}
                    Some(&l) => wrong.push(format!(
                        "{} (layer {layer}) uses `{used}` (layer {l})",
                        file.display()
                    )),
                    None => {}
                }
            }
        }
        // Within one layer too: no module reaches itself through others.
        for start in graph.keys() {
            let mut seen = BTreeSet::new();
            let mut stack: Vec<&String> = graph[start].iter().collect();
            while let Some(next) = stack.pop() {
                if next == start {
                    wrong.push(format!("`{start}` is part of an import cycle"));
                    break;
                }
                if seen.insert(next) {
                    stack.extend(graph.get(next).into_iter().flatten());
                }
            }
        }
        assert_eq!(checked.len(), LAYERS.len(), "every layer's module exists");
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
