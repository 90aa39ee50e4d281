#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod actions;
mod bridge;
mod cost;
mod dialogue;
mod persona;
#[cfg(feature = "voice")]
pub mod voice;

use std::path::PathBuf;

use bevy::prelude::*;
use npc_native::{Runtime, RuntimeConfig, SamplingParams};

pub use actions::{ActionOutcome, NpcActionRequested};
pub use bridge::{NpcAiStatus, RuntimeHandle};
pub use cost::NpcCostMeter;
pub use dialogue::{
    CancelReply, DialogueHistory, DialogueLine, LoadNpcState, ModelFailed, ModelLoaded, Npc,
    NpcAiError, NpcPersonaApplied, NpcReplied, NpcReplyCancelled, NpcReplyDelta, NpcSecretRevealed,
    NpcState, NpcStateLoaded, NpcStateSaved, PlayerSaid, RevealSecret, SaveNpcState, Speaker,
};
pub use npc_native;
pub use persona::{Persona, PersonaLoadError, PersonaLoader};
#[cfg(feature = "voice")]
pub use voice::{
    NpcSpeechAudio, NpcVoicePlugin, SpeechBuffer, SpeechOutput, VoiceInput, VoiceProblem,
};

/// What a game needs: `use bevy_npc_ai::prelude::*;`.
pub mod prelude {
    pub use crate::{
        ActionOutcome, CancelReply, DialogueHistory, LoadNpcState, ModelFailed, ModelLoaded, Npc,
        NpcActionRequested, NpcAiError, NpcAiPlugin, NpcAiStatus, NpcAiSystems, NpcCostMeter,
        NpcPersonaApplied, NpcReplied, NpcReplyCancelled, NpcReplyDelta, NpcSecretRevealed,
        NpcState, NpcStateLoaded, NpcStateSaved, Persona, PlayerSaid, RevealSecret, SaveNpcState,
    };
    pub use npc_native::{ActionCall, ActionValue, RemoteConfig, ReplyStats, SamplingParams};
}

/// The plugin's systems, in order, all in `Update`. Order your own systems around them:
/// write [`PlayerSaid`] before [`NpcAiSystems::SendRequests`], read replies after
/// [`NpcAiSystems::ReceiveEvents`].
#[derive(SystemSet, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NpcAiSystems {
    /// Personas, player lines and cancellations go to the worker.
    SendRequests,
    /// The worker's events become messages and entity events.
    ReceiveEvents,
}

/// Adds NPC conversations on a local model to an app.
///
/// ```no_run
/// use bevy::prelude::*;
/// use bevy_npc_ai::prelude::*;
///
/// App::new()
///     .add_plugins((MinimalPlugins, AssetPlugin::default()))
///     .add_plugins(NpcAiPlugin::default().with_threads(2).with_context_size(2048))
///     .run();
/// ```
///
/// Files are found the way Bevy finds assets: the model (a catalog model's
/// `models/<file name>`, or a relative path given to [`NpcAiPlugin::with_model`]) and persona
/// lore files are looked for in the `AssetPlugin`'s folder (`assets/` under
/// `$BEVY_ASSET_ROOT`, `$CARGO_MANIFEST_DIR` under `cargo run`, or beside the executable), so
/// a game started from any working directory finds them. Add the `AssetPlugin` (or
/// `DefaultPlugins`) before this plugin; [`NpcAiPlugin::with_assets_dir`] overrides the folder.
#[derive(Clone, Debug, Default)]
pub struct NpcAiPlugin {
    config: RuntimeConfig,
    /// The asset folder was set explicitly (not taken from the `AssetPlugin`).
    assets_dir_set: bool,
}

impl NpcAiPlugin {
    /// A plugin running the given runtime configuration. Its `assets_dir` is kept if it is not
    /// the default; otherwise the `AssetPlugin`'s folder is used.
    #[must_use]
    pub fn from_config(config: RuntimeConfig) -> Self {
        let assets_dir_set = config.assets_dir != npc_native::default_assets_dir();
        Self {
            config,
            assets_dir_set,
        }
    }

    /// Sets the GGUF model file. A relative path is relative to the asset folder, like any
    /// asset path (`"models/my-model.gguf"`); an absolute one is used as it is. Default: the
    /// catalog's default model (see [`npc_native::catalog::DEFAULT_MODEL`]).
    #[must_use]
    pub fn with_model(mut self, path: impl Into<PathBuf>) -> Self {
        self.config = self.config.with_model(path);
        self
    }

    /// Sets the model to a catalog model by id (`"qwen2.5-coder-0.5b"`; the ids are in
    /// [`npc_native::catalog::MODELS`]). Its file is `models/<file name>` in the asset folder,
    /// where `cargo xtask setup --model ID` puts it. An unknown id arrives as [`ModelFailed`].
    #[must_use]
    pub fn with_catalog_model(mut self, id: impl Into<String>) -> Self {
        self.config = self.config.with_catalog_model(id);
        self
    }

    /// Sets the folder the model and lore files are found in, instead of the `AssetPlugin`'s.
    #[must_use]
    pub fn with_assets_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config = self.config.with_assets_dir(dir);
        self.assets_dir_set = true;
        self
    }

    /// Sets the decode threads (default: the available cores).
    #[must_use]
    pub fn with_threads(mut self, threads: u32) -> Self {
        self.config = self.config.with_threads(threads);
        self
    }

    /// Sets the context size per NPC conversation, in tokens.
    #[must_use]
    pub fn with_context_size(mut self, tokens: u32) -> Self {
        self.config = self.config.with_context_size(tokens);
        self
    }

    /// Sets how many NPC conversations stay resident and decode together.
    #[must_use]
    pub fn with_slots(mut self, slots: u32) -> Self {
        self.config = self.config.with_slots(slots);
        self
    }

    /// Sets the layers offloaded to a GPU (needs a GPU feature).
    #[must_use]
    pub fn with_gpu_layers(mut self, layers: u32) -> Self {
        self.config = self.config.with_gpu_layers(layers);
        self
    }

    /// Sets the sampling defaults that personas override.
    #[must_use]
    pub fn with_sampling(mut self, sampling: SamplingParams) -> Self {
        self.config = self.config.with_sampling(sampling);
        self
    }

    /// Sets the world preamble every NPC's system prompt starts with; computed once and
    /// shared by every NPC's KV cache (see [`RuntimeConfig::preamble`]).
    #[must_use]
    pub fn with_preamble(mut self, preamble: impl Into<String>) -> Self {
        self.config = self.config.with_preamble(preamble);
        self
    }

    /// Sets the number format of the KV cache (see [`npc_native::KvPrecision`]).
    #[must_use]
    pub fn with_kv_precision(mut self, precision: npc_native::KvPrecision) -> Self {
        self.config = self.config.with_kv_precision(precision);
        self
    }

    /// Turns reproducible batching on or off (on by default): with it, an NPC's seeded reply
    /// does not depend on which other NPCs talk at the same time (see
    /// [`RuntimeConfig::reproducible_batching`]).
    #[must_use]
    pub fn with_reproducible_batching(mut self, on: bool) -> Self {
        self.config = self.config.with_reproducible_batching(on);
        self
    }

    /// Sets the escalation policy (routing hard questions to a cloud model).
    #[must_use]
    pub fn with_escalation(mut self, escalation: npc_native::EscalationConfig) -> Self {
        self.config = self.config.with_escalation(escalation);
        self
    }

    /// Has an inference server generate NPC replies (see [`npc_native::RemoteConfig`]; the
    /// `cloud` feature carries its HTTP client). The game's code does not change: the same
    /// components, messages and events.
    #[must_use]
    pub fn with_remote(mut self, remote: npc_native::RemoteConfig) -> Self {
        self.config = self.config.with_remote(remote);
        self
    }

    /// Declares a LoRA adapter (a GGUF file in the asset folder) that personas may name with
    /// `adapter: Some((path: "adapters/pirate.gguf", scale: 1.0))`; it is checked against the
    /// model and loaded once, when the model loads (see
    /// [`RuntimeConfig::adapters`](npc_native::RuntimeConfig::adapters)).
    #[must_use]
    pub fn with_adapter(mut self, path: impl Into<PathBuf>) -> Self {
        self.config = self.config.with_adapter(path);
        self
    }

    /// The runtime configuration this plugin will start.
    #[must_use]
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }
}

impl Plugin for NpcAiPlugin {
    fn build(&self, app: &mut App) {
        app.configure_sets(
            Update,
            (NpcAiSystems::SendRequests, NpcAiSystems::ReceiveEvents).chain(),
        )
        .add_plugins((dialogue::plugin, persona::plugin, actions::plugin));
        let mut config = self.config.clone();
        if !self.assets_dir_set {
            config.assets_dir = asset_folder(app);
        }
        bridge::plugin(app, Runtime::start(config));
    }
}

/// The folder the app's `AssetPlugin` reads: its `file_path` under Bevy's base path (an
/// absolute `file_path` stands alone). Without an `AssetPlugin` yet, Bevy's default folder.
pub(crate) fn asset_folder(app: &App) -> PathBuf {
    match app.get_added_plugins::<AssetPlugin>().first() {
        Some(assets) => {
            bevy::asset::io::file::FileAssetReader::get_base_path().join(&assets.file_path)
        }
        None => npc_native::default_assets_dir(),
    }
}
