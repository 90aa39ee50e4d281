//! Game actions in Bevy: [`NpcActionRequested`] (an entity event, for observers) when an
//! NPC's reply asks the game to act, and [`ActionOutcome`] (a message) with the game's verdict,
//! which the NPC reads before the player's next line.
//!
//! ```no_run
//! use bevy::prelude::*;
//! use bevy_npc_ai::prelude::*;
//!
//! fn approve(request: On<NpcActionRequested>, mut verdicts: MessageWriter<ActionOutcome>) {
//!     // Check the game's rules here (gold, inventory, the gate's state …).
//!     verdicts.write(ActionOutcome::approve(request.entity, request.action.clone()));
//! }
//! ```

use bevy::prelude::*;
use npc_native::ActionCall;

use crate::NpcAiSystems;
use crate::bridge::{RuntimeHandle, npc_id};
use crate::dialogue::{Npc, NpcAiError};

/// An NPC's reply asks the game to act. The action is always one the NPC's persona declares,
/// with every parameter in type; the game decides whether it happens and answers with
/// [`ActionOutcome`]. Triggered just before the reply's `NpcReplied`.
#[derive(EntityEvent, Clone, Debug)]
pub struct NpcActionRequested {
    /// The NPC asking.
    pub entity: Entity,
    /// The action and its arguments.
    pub action: ActionCall,
}

/// The game's verdict on an [`NpcActionRequested`]; the NPC is told before its next turn.
#[derive(Message, Clone, Debug)]
pub struct ActionOutcome {
    /// The NPC that asked.
    pub npc: Entity,
    /// The action it asked for.
    pub action: ActionCall,
    /// Whether the game carried it out.
    pub approved: bool,
    /// Why, in a few words the NPC can repeat ("you have no gold"); may be empty.
    pub reason: String,
}

impl ActionOutcome {
    /// The action was carried out.
    #[must_use]
    pub fn approve(npc: Entity, action: ActionCall) -> Self {
        Self {
            npc,
            action,
            approved: true,
            reason: String::new(),
        }
    }

    /// The action was refused, for `reason`.
    #[must_use]
    pub fn reject(npc: Entity, action: ActionCall, reason: impl Into<String>) -> Self {
        Self {
            npc,
            action,
            approved: false,
            reason: reason.into(),
        }
    }
}

pub(crate) fn plugin(app: &mut App) {
    app.add_message::<ActionOutcome>()
        .add_systems(Update, send_outcomes.in_set(NpcAiSystems::SendRequests));
}

fn send_outcomes(
    handle: Res<RuntimeHandle>,
    mut outcomes: MessageReader<ActionOutcome>,
    npcs: Query<(), With<Npc>>,
    mut errors: MessageWriter<NpcAiError>,
) {
    for outcome in outcomes.read() {
        if !npcs.contains(outcome.npc) {
            errors.write(NpcAiError::UnknownNpc(outcome.npc));
            continue;
        }
        // A dead worker is reported by the bridge's own systems.
        let _ = handle.runtime().action_outcome(
            npc_id(outcome.npc),
            outcome.action.clone(),
            outcome.approved,
            outcome.reason.clone(),
        );
    }
}
