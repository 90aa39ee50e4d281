//! What an NPC knows and remembers: memories of the player ([`memory`]), the rolling summary
//! of old turns ([`summary`]) and the model-written one ([`summarizer`]), and [`knowledge`],
//! which puts them, the lore and the persona into a prompt that fits its budget.

pub(crate) mod knowledge;
pub(crate) mod memory;
pub(crate) mod summarizer;
pub(crate) mod summary;
