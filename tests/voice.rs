//! The plugin's voice (feature `voice`), headless, with the real model, the blacksmith's Piper
//! voice (ONNX Runtime and the voice from `cargo xtask setup`), espeak-ng and the `npc-voice`
//! helper (built by `cargo build --release -p npc_voice_helper`; `cargo xtask test` builds it).
//!
//! ```text
//! cargo test --release -p bevy_npc_ai --features voice --test voice
//! ```

mod common;

use std::time::Duration;

use bevy::prelude::*;
use bevy_npc_ai::npc_native::voice::audio::Pcm;
use bevy_npc_ai::npc_native::voice::client::{VoiceClient, VoiceConfig};
use bevy_npc_ai::npc_native::voice::protocol::SAMPLE_RATE;
use bevy_npc_ai::npc_native::voice::synth::{EspeakSynth, SpeechSynth, VoiceSettings};
use bevy_npc_ai::npc_native::voice::wer;
use bevy_npc_ai::prelude::*;
use bevy_npc_ai::voice::SpokenClip;
use bevy_npc_ai::{
    NpcSpeechAudio, NpcVoicePlugin, SpeechBuffer, SpeechOutput, VoiceInput, VoiceProblem,
};

const MAX_FRAMES: usize = 60_000;

#[derive(Resource, Default)]
struct Seen {
    replies: Vec<NpcReplied>,
    said: Vec<String>,
    audio: Vec<NpcSpeechAudio>,
    problems: Vec<VoiceProblem>,
}

fn record(
    mut seen: ResMut<Seen>,
    mut said: MessageReader<PlayerSaid>,
    mut audio: MessageReader<NpcSpeechAudio>,
    mut problems: MessageReader<VoiceProblem>,
) {
    seen.said.extend(said.read().map(|s| s.text.clone()));
    seen.audio.extend(audio.read().cloned());
    seen.problems.extend(problems.read().cloned());
}

fn app() -> App {
    let helper = bevy_npc_ai::npc_native::voice::client::VoiceConfig::find_helper()
        .expect("npc-voice is not built: run `cargo build --release -p npc_voice_helper`");
    let mut app = App::new();
    app.add_plugins((
        MinimalPlugins,
        AssetPlugin {
            file_path: common::root().join("assets").display().to_string(),
            ..default()
        },
        NpcAiPlugin::default()
            .with_model(common::model_path())
            .with_slots(1),
        NpcVoicePlugin::default()
            .with_output(SpeechOutput::Buffer)
            .with_helper(helper)
            .with_whisper_model(common::root().join("assets/models/ggml-tiny.en.bin")),
    ))
    .init_resource::<Seen>()
    .add_systems(PostUpdate, record)
    .add_observer(|replied: On<NpcReplied>, mut seen: ResMut<Seen>| {
        seen.replies.push(replied.event().clone());
    });
    app
}

fn update_until(app: &mut App, what: &str, done: impl Fn(&mut App) -> bool) {
    for _ in 0..MAX_FRAMES {
        app.update();
        if done(app) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("gave up waiting for {what}");
}

fn spawn_blacksmith(app: &mut App) -> Entity {
    let persona = app
        .world()
        .resource::<AssetServer>()
        .load("personas/blacksmith.persona.ron");
    app.world_mut().spawn(Npc::new(persona)).id()
}

#[test]
fn replies_are_spoken_sentence_by_sentence_into_the_buffer() {
    let _serial = common::serial();
    let mut app = app();
    let npc = spawn_blacksmith(&mut app);
    app.world_mut().write_message(PlayerSaid {
        npc,
        text: "What do you sell? Tell me about your forge.".into(),
    });
    update_until(&mut app, "the reply and its speech", |app| {
        let seen = app.world().resource::<Seen>();
        !seen.replies.is_empty() && !app.world().resource::<SpeechBuffer>().clips.is_empty() && {
            // Every sentence of the reply has been voiced.
            let spoken: String = seen
                .audio
                .iter()
                .map(|a| a.text.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            wer::normalize(&spoken) == wer::normalize(&seen.replies[0].text)
        }
    });
    let seen = app.world().resource::<Seen>();
    let clips: &Vec<SpokenClip> = &app.world().resource::<SpeechBuffer>().clips;
    println!("reply: {:?}", seen.replies[0].text);
    for clip in clips {
        println!(
            "clip {:.2} s at {} Hz: {:?}",
            clip.pcm.seconds(),
            clip.pcm.sample_rate,
            clip.text
        );
        assert_eq!(clip.npc, npc);
        assert!(
            clip.pcm.seconds() > 0.2 && clip.pcm.rms() > 0.01,
            "silent clip {:?}",
            clip.text
        );
    }
    assert!(
        seen.audio
            .iter()
            .enumerate()
            .all(|(i, a)| a.seq as usize == i),
        "sentences out of order"
    );
    // No problem: the Piper voice loaded (a fallback to espeak-ng is reported as one).
    assert!(seen.problems.is_empty(), "{:?}", seen.problems);

    let meter = app.world().resource::<NpcCostMeter>();
    let spoke = meter.entity(npc).expect("the blacksmith is metered");
    assert_eq!(spoke.spoken_sentences as usize, clips.len());
    assert!(spoke.spoken_characters > 0 && spoke.speech_compute > Duration::ZERO);
}

/// The round trip: two NPC lines streamed to the blacksmith's Piper voice as reply deltas,
/// split into sentences, synthesised into the buffer and heard back by Whisper. (Fixed lines:
/// the test model's replies invent names, "Ironfist", that no listener spells back.)
#[test]
fn piper_speech_in_the_buffer_is_heard_back_by_whisper() {
    let _serial = common::serial();
    let mut app = app();
    let npc = spawn_blacksmith(&mut app);
    let lines = "Welcome to my forge, traveler. That sword will cost you fifty gold coins. ";
    update_until(&mut app, "the persona", |app| {
        app.world()
            .resource::<Assets<Persona>>()
            .iter()
            .next()
            .is_some()
    });
    for piece in [
        "Welcome to my forge, tra",
        "veler. That sword will cost",
        " you fifty gold coins. ",
    ] {
        app.world_mut().write_message(NpcReplyDelta {
            npc,
            text: piece.into(),
        });
        app.update();
    }
    update_until(&mut app, "two sentences of speech", |app| {
        app.world().resource::<SpeechBuffer>().clips.len() >= 2
    });
    let clips = &app.world().resource::<SpeechBuffer>().clips;
    let mut spoken = Pcm::default();
    for clip in clips {
        spoken.sample_rate = clip.pcm.sample_rate;
        spoken.samples.extend_from_slice(&clip.pcm.samples);
    }
    let heard = transcribe(&spoken);
    let error = wer::wer(lines, &heard);
    println!("Whisper heard {heard:?} (word error rate {error:.2})");
    // The voice bench measures 1-2 % on its ten lines; these two were heard whole there.
    assert!(error <= 0.15, "heard {heard:?}");
    let seen = app.world().resource::<Seen>();
    assert!(seen.problems.is_empty(), "no fallback: {:?}", seen.problems);
}

/// Transcribes `pcm` with the `npc-voice` helper, outside the app.
fn transcribe(pcm: &Pcm) -> String {
    let helper = VoiceConfig::find_helper().expect("npc-voice is built");
    let mut client = VoiceClient::start(
        VoiceConfig::new(common::root().join("assets/models/ggml-tiny.en.bin")).with_helper(helper),
    );
    client
        .transcribe_and_wait(pcm.resampled(SAMPLE_RATE).samples, Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("recognition failed: {e}"))
}

#[test]
fn a_persona_naming_a_voice_that_is_not_installed_speaks_with_espeak_and_says_why() {
    let _serial = common::serial();
    let mut app = app();
    let persona = bevy_npc_ai::npc_native::Persona::from_ron(
        r#"(name: "Mara", role: "the miller", greeting: "Flour?",
            voice: Some((engine: Piper, model: "voices/not-installed.onnx")))"#,
        None,
    )
    .expect("the persona is valid: the file's absence shows only when it is spoken");
    let handle = app
        .world_mut()
        .resource_mut::<Assets<Persona>>()
        .add(Persona(persona));
    let npc = app.world_mut().spawn(Npc::new(handle)).id();
    app.world_mut().write_message(PlayerSaid {
        npc,
        text: "Hello. Who are you?".into(),
    });
    update_until(&mut app, "the reply, spoken anyway", |app| {
        let seen = app.world().resource::<Seen>();
        !seen.replies.is_empty() && !app.world().resource::<SpeechBuffer>().clips.is_empty()
    });
    // A few more frames: the whole reply's sentences.
    for _ in 0..200 {
        app.update();
    }
    let seen = app.world().resource::<Seen>();
    let clips = &app.world().resource::<SpeechBuffer>().clips;
    assert!(clips.iter().all(|c| c.pcm.rms() > 0.01), "silent clips");
    let problems: Vec<&str> = seen.problems.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(
        problems.len(),
        1,
        "one warning, not one per sentence: {problems:?}"
    );
    assert!(
        problems[0].contains("not-installed.onnx") && problems[0].contains("espeak-ng"),
        "{problems:?}"
    );
}

#[test]
fn a_spoken_utterance_becomes_player_said_and_gets_a_reply() {
    let _serial = common::serial();
    let mut app = app();
    let npc = spawn_blacksmith(&mut app);
    let line = "Do you have an apprentice?";
    let pcm = EspeakSynth::default()
        .synthesize(
            line,
            &VoiceSettings {
                rate: 140,
                ..VoiceSettings::default()
            },
        )
        .expect("espeak-ng (cargo xtask setup installs it)");
    app.world_mut()
        .resource_mut::<VoiceInput>()
        .submit(npc, &pcm);
    update_until(&mut app, "the transcript and the reply", |app| {
        let seen = app.world().resource::<Seen>();
        !seen.said.is_empty() && !seen.replies.is_empty()
    });
    let seen = app.world().resource::<Seen>();
    println!(
        "heard {:?}; replied {:?}",
        seen.said[0], seen.replies[0].text
    );
    assert!(
        wer::wer(line, &seen.said[0]) <= 0.2,
        "heard {:?}",
        seen.said[0]
    );
    assert!(!seen.replies[0].text.trim().is_empty());
    assert!(seen.problems.is_empty(), "{:?}", seen.problems);
}
