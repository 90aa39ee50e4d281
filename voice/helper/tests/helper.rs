//! The `npc-voice` helper with the real converted Whisper tiny.en model, espeak-ng speech and
//! the real client. Needs `cargo xtask setup` (espeak-ng, and the converted model in
//! `assets/models/`).

use std::path::PathBuf;
use std::time::Duration;

use npc_voice::client::{
    UtteranceId, VoiceClient, VoiceConfig, VoiceError, VoiceEvent, workspace_model,
};
use npc_voice::protocol::SAMPLE_RATE;
use npc_voice::synth::{EspeakSynth, SpeechSynth, VoiceSettings};
use npc_voice::wer;

const MODEL: &str = "ggml-tiny.en.bin";
/// Recognition on a loaded 2-core machine can take many seconds per utterance.
const PATIENCE: Duration = Duration::from_secs(300);

fn model() -> PathBuf {
    workspace_model(env!("CARGO_MANIFEST_DIR").as_ref(), MODEL)
        .unwrap_or_else(|| panic!("assets/models/{MODEL} is missing: run `cargo xtask setup`"))
}

fn config(model: PathBuf) -> VoiceConfig {
    let config = VoiceConfig::new(model).with_helper(env!("CARGO_BIN_EXE_npc-voice"));
    match std::env::var("NPC_VOICE_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        Some(threads) => config.with_threads(threads),
        None => config,
    }
}

/// The "player": espeak-ng's default English voice at 140 words per minute. At its default
/// 175 wpm, tiny.en mishears more of espeak's robotic speech (WER about 0.22 on these lines,
/// with whisper.cpp and with the original CTranslate2 model alike).
fn speak(text: &str) -> Vec<f32> {
    let player = VoiceSettings {
        rate: 140,
        ..VoiceSettings::default()
    };
    EspeakSynth::default()
        .synthesize(text, &player)
        .expect("espeak-ng runs (cargo xtask setup installs it)")
        .resampled(SAMPLE_RATE)
        .samples
}

/// Waits for the outcome of `id`, collecting every event seen on the way.
fn outcome(client: &VoiceClient, id: UtteranceId, seen: &mut Vec<VoiceEvent>) -> VoiceEvent {
    loop {
        let event = client
            .events()
            .recv_timeout(PATIENCE)
            .expect("the voice client answers");
        seen.push(event.clone());
        match &event {
            VoiceEvent::Transcript { id: got, .. } | VoiceEvent::Failed { id: got, .. }
                if *got == id =>
            {
                return event;
            }
            _ => {}
        }
    }
}

const LINES: [&str; 10] = wer::NPC_LINES;

#[test]
fn espeak_to_helper_round_trip_has_low_word_error_rate() {
    let mut client = VoiceClient::start(config(model()));
    let ids: Vec<(UtteranceId, &str)> = LINES
        .iter()
        .map(|line| (client.transcribe(speak(line)), *line))
        .collect();
    let mut seen = Vec::new();
    let (mut errors, mut words) = (0, 0);
    println!(
        "{:<52} | {:<52} | {:>5} | {:>6}",
        "spoken", "heard", "WER", "decode"
    );
    for (id, line) in ids {
        match outcome(&client, id, &mut seen) {
            VoiceEvent::Transcript {
                text,
                decode_ms,
                audio_ms,
                ..
            } => {
                let reference = wer::normalize(line);
                let e = wer::word_errors(&reference, &wer::normalize(&text));
                errors += e;
                words += reference.len();
                println!(
                    "{line:<52} | {text:<52} | {:>5.2} | {decode_ms:>4} ms for {audio_ms} ms",
                    e as f64 / reference.len() as f64
                );
            }
            other => panic!("{line:?} was not transcribed: {other:?}"),
        }
    }
    let rate = errors as f64 / words as f64;
    println!(
        "word error rate over {} sentences: {errors}/{words} = {rate:.3}",
        LINES.len()
    );
    assert!(rate <= 0.20, "word error rate {rate:.3} exceeds 0.20");
    assert!(
        seen.iter().any(
            |e| matches!(e, VoiceEvent::Ready { model, .. } if model.contains("4 audio layers"))
        )
    );
}

#[test]
fn truncated_model_is_a_clear_error_not_a_crash() {
    let model = model();
    let dir = std::env::temp_dir().join(format!("npc-voice-truncated-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = std::fs::read(&model).unwrap();
    let mut failures = Vec::new();
    // Cut in the header, the vocabulary, and inside the last tensor.
    for (name, cut) in [
        ("header", 20),
        ("vocab", 100_000),
        ("last-tensor", bytes.len() - 1000),
    ] {
        let path = dir.join(format!("{name}.bin"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let mut client = VoiceClient::start(config(path));
        let id = client.transcribe(vec![0.0; 16_000]);
        let mut seen = Vec::new();
        match outcome(&client, id, &mut seen) {
            VoiceEvent::Failed {
                error: VoiceError::Fatal(message),
                ..
            } => failures.push(message),
            other => panic!("a model cut at byte {cut} gave {other:?}"),
        }
        assert!(!seen.iter().any(|e| matches!(e, VoiceEvent::Ready { .. })));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    for message in &failures {
        println!("{message}");
        assert!(message.contains("truncated"), "{message}");
    }
}

#[test]
fn killing_the_helper_mid_utterance_fails_that_utterance_and_the_next_one_works() {
    let mut client = VoiceClient::start(config(model()));
    client.warm_up();
    let pid = match client
        .events()
        .recv_timeout(PATIENCE)
        .expect("helper starts")
    {
        VoiceEvent::HelperStarted { pid } => pid,
        other => panic!("unexpected {other:?}"),
    };
    assert!(matches!(
        client.events().recv_timeout(PATIENCE),
        Ok(VoiceEvent::Ready { .. })
    ));
    // A long utterance keeps the helper busy while it is killed.
    let long: Vec<f32> = LINES.iter().take(4).flat_map(|line| speak(line)).collect();
    let doomed = client.transcribe(long);
    std::thread::sleep(Duration::from_millis(300));
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut seen = Vec::new();
    match outcome(&client, doomed, &mut seen) {
        VoiceEvent::Failed {
            error: VoiceError::HelperDied(reason),
            ..
        } => println!("failed as expected: {reason}"),
        other => panic!("the killed utterance gave {other:?}"),
    }
    let next = client.transcribe(speak(LINES[0]));
    match outcome(&client, next, &mut seen) {
        VoiceEvent::Transcript { text, .. } => {
            assert!(
                wer::wer(LINES[0], &text) <= 0.2,
                "after restart heard {text:?}"
            );
        }
        other => panic!("the utterance after the restart gave {other:?}"),
    }
    assert!(
        seen.iter().any(|e| matches!(
            e,
            VoiceEvent::HelperExited {
                restarting: true,
                ..
            }
        )),
        "{seen:?}"
    );
    let new_pid = seen.iter().find_map(|e| match e {
        VoiceEvent::HelperStarted { pid } => Some(*pid),
        _ => None,
    });
    assert!(new_pid.is_some_and(|p| p != pid), "{seen:?}");
}
