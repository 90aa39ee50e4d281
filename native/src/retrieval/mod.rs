//! What an NPC can look up: lore files indexed for BM25 retrieval ([`lore`]) and lore
//! compressed by the model itself ([`compress`]).

pub(crate) mod compress;
pub(crate) mod lore;
