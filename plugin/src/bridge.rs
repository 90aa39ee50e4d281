//! The two systems that cross the channel to the worker, and the [`RuntimeHandle`] resource.
//!
//! Neither system ever blocks: requests are channel sends, events are drained with
//! `try_recv`.

use bevy::asset::LoadState;
use bevy::ecs::system::SystemParam;
use bevy::platform::collections::{HashMap, HashSet};
use bevy::prelude::*;
use crossbeam_channel::TryRecvError;
use npc_native::{Event, ModelError, ModelInfo, NpcError, NpcId, Runtime};

use crate::NpcAiSystems;
use crate::dialogue::{
    CancelReply, DialogueHistory, DialogueLine, LoadNpcState, ModelFailed, ModelLoaded, Npc,
    NpcAiError, NpcPersonaApplied, NpcReplied, NpcReplyCancelled, NpcReplyDelta, NpcState,
    NpcStateLoaded, NpcStateSaved, PlayerSaid, SaveNpcState, Speaker,
};
use crate::persona::Persona;

/// The running [`Runtime`]. Games rarely need it; it is public for tools and tests.
#[derive(Resource)]
pub struct RuntimeHandle {
    runtime: Runtime,
    /// The persona asset each NPC was last given.
    sent_personas: HashMap<Entity, AssetId<Persona>>,
    /// Lines and loads for NPCs whose persona is still loading, sent once it has been.
    waiting: Vec<Waiting>,
    worker_died: bool,
}

impl RuntimeHandle {
    /// The runtime, to send raw [`npc_native::Request`]s.
    #[must_use]
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }
}

/// What the plugin knows about the model.
#[derive(Resource, Clone, Debug, Default, PartialEq)]
pub enum NpcAiStatus {
    /// The worker is loading the model.
    #[default]
    Loading,
    /// The model is loaded.
    Ready(ModelInfo),
    /// The model failed to load.
    Failed(ModelError),
    /// The worker stopped.
    WorkerDied(String),
}

/// The NPC id the worker knows an entity by.
pub(crate) fn npc_id(entity: Entity) -> NpcId {
    NpcId(entity.to_bits())
}

fn entity_of(npc: NpcId) -> Option<Entity> {
    Entity::try_from_bits(npc.0)
}

pub(crate) fn plugin(app: &mut App, runtime: Runtime) {
    app.insert_resource(RuntimeHandle {
        runtime,
        sent_personas: HashMap::default(),
        waiting: Vec::new(),
        worker_died: false,
    })
    .init_resource::<NpcAiStatus>()
    .init_resource::<crate::NpcCostMeter>()
    .add_systems(
        Update,
        (
            (send_personas, send_player_lines, send_reveals)
                .chain()
                .in_set(NpcAiSystems::SendRequests),
            receive_runtime_events.in_set(NpcAiSystems::ReceiveEvents),
        ),
    )
    .add_observer(forget_despawned_npc);
}

/// Sends each NPC's persona when it first loads and whenever its file changes.
fn send_personas(
    mut handle: ResMut<RuntimeHandle>,
    mut asset_events: MessageReader<AssetEvent<Persona>>,
    personas: Res<Assets<Persona>>,
    npcs: Query<(Entity, &Npc)>,
) {
    let modified: HashSet<AssetId<Persona>> = asset_events
        .read()
        .filter_map(|event| match event {
            AssetEvent::Modified { id } => Some(*id),
            _ => None,
        })
        .collect();
    let handle = &mut *handle;
    for (entity, npc) in &npcs {
        let id = npc.persona.id();
        let stale = handle.sent_personas.get(&entity) != Some(&id) || modified.contains(&id);
        if !stale {
            continue;
        }
        let Some(persona) = personas.get(id) else {
            continue; // Still loading; tried again next frame.
        };
        if handle
            .runtime
            .set_persona(npc_id(entity), persona.0.clone())
            .is_ok()
        {
            handle.sent_personas.insert(entity, id);
        }
    }
}

/// Forwards [`RevealSecret`](crate::RevealSecret) messages to the worker.
fn send_reveals(
    handle: Res<RuntimeHandle>,
    mut reveals: MessageReader<crate::RevealSecret>,
    npcs: Query<(), With<Npc>>,
    mut errors: MessageWriter<NpcAiError>,
) {
    for reveal in reveals.read() {
        if !npcs.contains(reveal.npc) {
            errors.write(NpcAiError::UnknownNpc(reveal.npc));
            continue;
        }
        // A stopped worker is reported once, as `WorkerDied`.
        let _ = handle
            .runtime
            .reveal_secret(npc_id(reveal.npc), reveal.secret.clone());
    }
}

/// A request that needs the NPC's persona in the worker first.
enum Waiting {
    Line(PlayerSaid),
    Load(LoadNpcState),
}

impl Waiting {
    fn npc(&self) -> Entity {
        match self {
            Waiting::Line(line) => line.npc,
            Waiting::Load(load) => load.npc,
        }
    }
}

/// What the game asked of the worker this frame.
#[derive(SystemParam)]
struct GameRequests<'w, 's> {
    lines: MessageReader<'w, 's, PlayerSaid>,
    loads: MessageReader<'w, 's, LoadNpcState>,
    saves: MessageReader<'w, 's, SaveNpcState>,
    cancels: MessageReader<'w, 's, CancelReply>,
}

/// Forwards player lines, state loads and saves, and cancellations to the worker. A line or
/// load for an NPC whose persona is still loading waits (in order) until it has been sent.
fn send_player_lines(
    mut handle: ResMut<RuntimeHandle>,
    mut requests: GameRequests,
    asset_server: Res<AssetServer>,
    mut npcs: Query<(&Npc, &mut NpcState, &mut DialogueHistory)>,
    mut errors: MessageWriter<NpcAiError>,
) {
    let handle = &mut *handle;
    let waiting = std::mem::take(&mut handle.waiting);
    let arrived = requests
        .loads
        .read()
        .cloned()
        .map(Waiting::Load)
        .chain(requests.lines.read().cloned().map(Waiting::Line));
    for request in waiting.into_iter().chain(arrived) {
        let entity = request.npc();
        let Ok((npc, mut state, mut history)) = npcs.get_mut(entity) else {
            errors.write(NpcAiError::UnknownNpc(entity));
            continue;
        };
        if !handle.sent_personas.contains_key(&entity) {
            if let LoadState::Failed(error) = asset_server.load_state(npc.persona.id()) {
                let error = NpcError::InvalidPersona(error.to_string());
                errors.write(match request {
                    Waiting::Line(_) => NpcAiError::ReplyFailed { npc: entity, error },
                    Waiting::Load(_) => NpcAiError::LoadFailed {
                        npc: entity,
                        error: error.into(),
                    },
                });
            } else {
                handle.waiting.push(request);
            }
            continue;
        }
        let sent = match request {
            Waiting::Line(line) => {
                handle
                    .runtime
                    .say(npc_id(entity), line.text.clone())
                    .map(|_| {
                        *state = NpcState::Thinking;
                        history.lines.push(DialogueLine {
                            speaker: Speaker::Player,
                            text: line.text,
                        });
                    })
            }
            Waiting::Load(load) => handle.runtime.load_npc(npc_id(entity), load.path),
        };
        if sent.is_err() {
            report_worker_gone(handle, &mut errors);
        }
    }
    for SaveNpcState { npc, path } in requests.saves.read() {
        if !npcs.contains(*npc) {
            errors.write(NpcAiError::UnknownNpc(*npc));
        } else if handle.runtime.save_npc(npc_id(*npc), path.clone()).is_err() {
            report_worker_gone(handle, &mut errors);
        }
    }
    for CancelReply { npc } in requests.cancels.read() {
        if !npcs.contains(*npc) {
            errors.write(NpcAiError::UnknownNpc(*npc));
        } else if handle.runtime.cancel(npc_id(*npc)).is_err() {
            report_worker_gone(handle, &mut errors);
        }
    }
}

fn report_worker_gone(handle: &mut RuntimeHandle, errors: &mut MessageWriter<NpcAiError>) {
    if !handle.worker_died {
        handle.worker_died = true;
        errors.write(NpcAiError::WorkerDied {
            reason: "the worker is not running".into(),
        });
    }
}

/// The messages the worker's events become.
#[derive(SystemParam)]
struct WorkerMessages<'w> {
    deltas: MessageWriter<'w, NpcReplyDelta>,
    loaded: MessageWriter<'w, ModelLoaded>,
    failed: MessageWriter<'w, ModelFailed>,
    errors: MessageWriter<'w, NpcAiError>,
}

/// Drains the worker's events into messages, entity events and component changes.
fn receive_runtime_events(
    mut commands: Commands,
    mut handle: ResMut<RuntimeHandle>,
    mut status: ResMut<NpcAiStatus>,
    mut npcs: Query<(&mut NpcState, &mut DialogueHistory), With<Npc>>,
    mut out: WorkerMessages,
    mut meter: ResMut<crate::NpcCostMeter>,
) {
    loop {
        let event = match handle.runtime.events().try_recv() {
            Ok(event) => event,
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => {
                if !handle.worker_died {
                    *status = NpcAiStatus::WorkerDied("the worker thread ended".into());
                }
                report_worker_gone(&mut handle, &mut out.errors);
                return;
            }
        };
        match event {
            Event::ModelLoaded(info) => {
                *status = NpcAiStatus::Ready(info.clone());
                out.loaded.write(ModelLoaded(info));
            }
            Event::ModelFailed(error) => {
                *status = NpcAiStatus::Failed(error.clone());
                out.failed.write(ModelFailed(error.clone()));
                out.errors.write(NpcAiError::ModelFailed(error));
            }
            Event::NpcSaved {
                npc, path, bytes, ..
            } => {
                if let Some(entity) = live(npc, &npcs) {
                    commands.trigger(NpcStateSaved {
                        entity,
                        path,
                        bytes,
                    });
                }
            }
            Event::NpcSaveFailed { npc, error, .. } => {
                if let Some(entity) = live(npc, &npcs) {
                    out.errors
                        .write(NpcAiError::SaveFailed { npc: entity, error });
                }
            }
            Event::NpcLoaded {
                npc,
                turns,
                kv_tokens,
                kv_note,
                mind_note,
            } => {
                if let Some(entity) = live(npc, &npcs) {
                    commands.trigger(NpcStateLoaded {
                        entity,
                        turns,
                        kv_tokens,
                        kv_note,
                        mind_note,
                    });
                }
            }
            Event::NpcLoadFailed { npc, error } => {
                if let Some(entity) = live(npc, &npcs) {
                    out.errors
                        .write(NpcAiError::LoadFailed { npc: entity, error });
                }
            }
            // Memories a game adds through the runtime: nothing to show in the world.
            Event::Remembered { .. }
            | Event::Mind { .. }
            | Event::SummaryWritten { .. }
            | Event::Prewarmed { .. } => {}
            Event::SecretRevealed { npc, secret } => {
                if let Some(entity) = live(npc, &npcs) {
                    commands.trigger(crate::NpcSecretRevealed { entity, secret });
                }
            }
            Event::RevealFailed { npc, error } => {
                if let Some(entity) = live(npc, &npcs) {
                    out.errors
                        .write(NpcAiError::RevealFailed { npc: entity, error });
                }
            }
            Event::RememberFailed { npc, error } => {
                warn!("NPC {npc:?} could not store a memory: {error}");
            }
            Event::WorkerDied { reason } => {
                *status = NpcAiStatus::WorkerDied(reason.clone());
                handle.worker_died = true;
                out.errors.write(NpcAiError::WorkerDied { reason });
            }
            Event::PersonaAccepted { npc, prefix_tokens } => {
                if let Some(entity) = live(npc, &npcs) {
                    commands.trigger(NpcPersonaApplied {
                        entity,
                        prefix_tokens,
                    });
                }
            }
            Event::PersonaRejected { npc, error } => {
                if let Some(entity) = live(npc, &npcs) {
                    out.errors
                        .write(NpcAiError::PersonaRejected { npc: entity, error });
                }
            }
            Event::Delta { npc, text, .. } => {
                let Some(entity) = live(npc, &npcs) else {
                    continue;
                };
                if let Ok((mut state, _)) = npcs.get_mut(entity) {
                    state.set_if_neq(NpcState::Speaking);
                }
                out.deltas.write(NpcReplyDelta { npc: entity, text });
            }
            Event::Replied {
                npc, text, stats, ..
            } => {
                meter.record(npc, &stats);
                let Some(entity) = live(npc, &npcs) else {
                    continue;
                };
                if let Ok((mut state, mut history)) = npcs.get_mut(entity) {
                    *state = NpcState::Idle;
                    history.lines.push(DialogueLine {
                        speaker: Speaker::Npc,
                        text: text.clone(),
                    });
                }
                commands.trigger(NpcReplied {
                    entity,
                    text,
                    stats,
                });
            }
            Event::ActionRequested { npc, action, .. } => {
                if let Some(entity) = live(npc, &npcs) {
                    commands.trigger(crate::NpcActionRequested { entity, action });
                }
            }
            Event::Cancelled { npc, .. } => {
                let Some(entity) = live(npc, &npcs) else {
                    continue;
                };
                if let Ok((mut state, _)) = npcs.get_mut(entity) {
                    *state = NpcState::Idle;
                }
                commands.trigger(NpcReplyCancelled { entity });
            }
            Event::Failed { npc, error, .. } => {
                let Some(entity) = live(npc, &npcs) else {
                    continue;
                };
                if let Ok((mut state, _)) = npcs.get_mut(entity) {
                    *state = NpcState::Idle;
                }
                out.errors
                    .write(NpcAiError::ReplyFailed { npc: entity, error });
            }
        }
    }
}

/// The entity of an NPC id, if it is still a live NPC (events may outlive a despawn).
fn live(
    npc: NpcId,
    npcs: &Query<(&mut NpcState, &mut DialogueHistory), With<Npc>>,
) -> Option<Entity> {
    entity_of(npc).filter(|entity| npcs.contains(*entity))
}

fn forget_despawned_npc(remove: On<Remove, Npc>, mut handle: ResMut<RuntimeHandle>) {
    let entity = remove.entity;
    handle.sent_personas.remove(&entity);
    // A dead worker has nothing to forget.
    let _ = handle.runtime.forget(npc_id(entity));
}
