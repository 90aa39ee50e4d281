//! Voice for `bevy_npc_ai`, in plain Rust with no native libraries linked:
//!
//! - [`convert`]: CTranslate2 Whisper → whisper.cpp model converter (run by `cargo xtask setup`);
//! - the `npc-voice` helper's framed stdin/stdout protocol ([`protocol`]) and the client that
//!   runs the helper on its own thread ([`client`]);
//! - speech synthesis ([`synth`]) with an espeak-ng backend and sentence streaming, and
//!   (feature `piper`) Piper neural voices on ONNX Runtime, loaded at run time ([`piper`]);
//! - [`wer`]: word error rate, for the round-trip tests.
//!
//! Speech recognition itself (whisper.cpp) lives in the separate `npc-voice` binary: whisper.cpp
//! and llama.cpp both bundle ggml, so they cannot be linked into one program.
#![warn(missing_docs)]

pub mod audio;
pub mod client;
pub mod convert;
#[cfg(feature = "piper")]
pub mod piper;
pub mod protocol;
pub mod synth;
pub mod wer;
