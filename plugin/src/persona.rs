//! Persona assets: `*.persona.ron` files loaded by [`PersonaLoader`], hot reloaded when
//! edited. A broken edit keeps the last good persona live and is reported as
//! [`NpcAiError::PersonaLoad`](crate::dialogue::NpcAiError::PersonaLoad).

use bevy::asset::io::Reader;
use bevy::asset::{AssetLoadError, AssetLoadFailedEvent, AssetLoader, LoadContext};
use bevy::prelude::*;

use crate::dialogue::NpcAiError;

/// Who an NPC is, loaded from a `*.persona.ron` file (see [`npc_native::Persona`] for the
/// fields). Give it to an NPC with [`Npc::new`](crate::dialogue::Npc::new).
#[derive(Asset, TypePath, Clone, Debug, PartialEq, Deref)]
pub struct Persona(pub npc_native::Persona);

/// Loads [`Persona`] assets from `*.persona.ron` files.
#[derive(Default, TypePath)]
pub struct PersonaLoader;

/// Why a persona file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PersonaLoadError {
    /// The file could not be read.
    #[error("could not read {path}: {source}")]
    Io {
        /// The asset path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid persona; the error names file, line, column and field.
    #[error(transparent)]
    Parse(#[from] npc_native::PersonaError),
}

impl AssetLoader for PersonaLoader {
    type Asset = Persona;
    type Settings = ();
    type Error = PersonaLoadError;

    async fn load(
        &self,
        reader: &mut dyn Reader,
        _settings: &(),
        load_context: &mut LoadContext<'_>,
    ) -> Result<Persona, PersonaLoadError> {
        let path = load_context.path().to_string();
        let mut bytes = Vec::new();
        reader
            .read_to_end(&mut bytes)
            .await
            .map_err(|source| PersonaLoadError::Io {
                path: path.clone(),
                source,
            })?;
        let source = String::from_utf8_lossy(&bytes);
        Ok(Persona(npc_native::Persona::from_ron(
            &source,
            Some(&path),
        )?))
    }

    fn extensions(&self) -> &[&str] {
        &["persona.ron"]
    }
}

/// Registers the asset and its loader, and reports load failures.
pub(crate) fn plugin(app: &mut App) {
    app.init_asset::<Persona>()
        .init_asset_loader::<PersonaLoader>()
        .add_systems(
            Update,
            report_persona_load_failures.in_set(crate::NpcAiSystems::ReceiveEvents),
        );
}

/// Turns Bevy's asset load failures into [`NpcAiError::PersonaLoad`]. On a failed hot
/// reload Bevy keeps the previous asset, so the NPC keeps its last good persona.
fn report_persona_load_failures(
    mut failures: MessageReader<AssetLoadFailedEvent<Persona>>,
    mut errors: MessageWriter<NpcAiError>,
) {
    for failure in failures.read() {
        // Our own error says file, line, column and field; Bevy's wrapper adds a backtrace.
        let message = match &failure.error {
            AssetLoadError::AssetLoaderError(err) => err
                .error()
                .downcast_ref::<PersonaLoadError>()
                .map_or_else(|| err.error().to_string(), ToString::to_string),
            other => other.to_string(),
        };
        warn!("persona {} failed to load: {message}", failure.path);
        errors.write(NpcAiError::PersonaLoad {
            path: failure.path.to_string(),
            message,
        });
    }
}
