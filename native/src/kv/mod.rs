//! Each NPC's KV state: slots in llama.cpp's cache, prefix reuse and eviction to RAM and disk
//! ([`cache`]), and the state files that carry it with a saved game ([`persist`]).

pub(crate) mod cache;
pub(crate) mod layout;
pub(crate) mod persist;
