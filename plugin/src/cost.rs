//! The [`NpcCostMeter`] resource: what the game's conversations cost.

use bevy::prelude::*;
use npc_native::{CostMeter, CostTotals, PriceTable};

use crate::bridge::npc_id;

/// Tokens, compute time and cloud spend of every reply, per NPC and in total, updated by the
/// plugin as replies arrive. Insert your own before adding the plugin to set the prices.
///
/// ```no_run
/// # use bevy::prelude::*;
/// # use bevy_npc_ai::NpcCostMeter;
/// fn show(meter: Res<NpcCostMeter>) {
///     println!("{:.4} per player-hour", meter.per_player_hour(300.0));
/// }
/// ```
#[derive(Resource, Clone, Debug, Default, Deref, DerefMut)]
pub struct NpcCostMeter(pub CostMeter);

impl NpcCostMeter {
    /// A meter with the given prices.
    #[must_use]
    pub fn with_prices(prices: PriceTable) -> Self {
        Self(CostMeter::new(prices))
    }

    /// Totals for one NPC entity, if it has replied.
    #[must_use]
    pub fn entity(&self, entity: Entity) -> Option<&CostTotals> {
        self.0.npc(npc_id(entity))
    }
}
