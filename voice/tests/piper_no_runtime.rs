//! Piper voices on a machine without a usable ONNX Runtime library: every sentence is spoken by
//! espeak-ng instead, with one warning that says why. Its own test binary (its own process):
//! ONNX Runtime, once loaded, stays loaded for the life of a process.
//!
//! ```text
//! cargo test --release -p npc_voice --features piper --test piper_no_runtime
//! ```

use std::path::Path;

use npc_voice::piper::{OnnxRuntime, PiperSynth};
use npc_voice::synth::{EspeakSynth, SpeechSynth, SynthError, VoiceSettings};

fn assert_falls_back_once(library: &Path, why: &str) {
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets");
    let mut synth = PiperSynth::new(&assets).with_onnx_runtime(library);
    let settings = VoiceSettings::piper("voices/en_US-joe-medium.onnx");
    for text in ["Hello there.", "Still talking."] {
        let pcm = synth.synthesize(text, &settings).expect("espeak-ng speaks");
        let espeak = EspeakSynth::default()
            .synthesize(text, &settings)
            .expect("espeak-ng");
        assert_eq!(pcm.samples, espeak.samples, "{why}: not espeak-ng's audio");
    }
    let warnings = synth.take_warnings();
    assert_eq!(warnings.len(), 1, "{why}: {warnings:?}");
    assert!(
        matches!(&warnings[0], SynthError::FellBack(e) if matches!(**e, SynthError::Runtime { .. })),
        "{why}: {}",
        warnings[0]
    );
    assert!(
        warnings[0]
            .to_string()
            .contains(&library.display().to_string()),
        "{why}: {}",
        warnings[0]
    );
    assert!(synth.take_warnings().is_empty());
}

#[test]
fn without_onnx_runtime_piper_voices_fall_back_to_espeak_with_one_warning() {
    assert_falls_back_once(Path::new("/nonexistent/libonnxruntime.so"), "missing");
    let fake = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-libonnxruntime.so");
    std::fs::write(&fake, b"\x7fELF but not really a library").expect("write");
    assert_falls_back_once(&fake, "not a library");
    let err = OnnxRuntime::load(&fake).expect_err("not a library");
    assert!(matches!(err, SynthError::Runtime { .. }), "{err}");
}
