//! Time from the end of the player's speech to the NPC's first audio, through the real
//! pieces: espeak-ng speaks the player's line (standing in for the microphone), the
//! `npc-voice` helper transcribes it with Whisper tiny.en, the runtime replies on the default
//! model, and espeak-ng voices the reply. Two ways of voicing it are measured side by side on
//! the same replies: sentence streaming (the first sentence is synthesised while the model
//! writes the rest) against waiting for the whole reply and synthesising it at once.
//!
//! ```text
//! cargo xtask setup
//! cargo build --release -p npc_voice_helper
//! cargo bench -p npc_native --features voice --bench voice_latency
//! ```
//! `NPC_VOICE_HELPER` overrides where the helper is looked for (default: beside the bench's
//! target directory).

#[path = "model.rs"]
mod model;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use npc_native::voice::client::{VoiceClient, VoiceConfig, VoiceEvent};
use npc_native::voice::protocol::SAMPLE_RATE;
use npc_native::voice::synth::{
    EspeakSynth, SpeechEvent, SpeechStream, SpeechSynth, VoiceSettings,
};
use npc_native::{Event, NpcId, Persona, Runtime, RuntimeConfig};

const LINES: [&str; 5] = [
    "How much does an iron sword cost?",
    "Where does your iron ore come from?",
    "Is the forge open tomorrow morning?",
    "Do you have an apprentice?",
    "Can you make me a steel shield?",
];
const PATIENCE: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn need(path: PathBuf) -> PathBuf {
    assert!(
        path.is_file(),
        "run `cargo xtask setup` first: {} is missing",
        path.display()
    );
    path
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

struct Run {
    transcribe: f64,
    first_token: f64,
    streamed_first_audio: f64,
    reply_done: f64,
    whole_first_audio: f64,
    heard: String,
    reply: String,
}

fn main() {
    let model = need(model::path());
    let whisper = need(root().join("assets/models/ggml-tiny.en.bin"));
    let helper = VoiceConfig::find_helper().unwrap_or_else(|| {
        panic!("npc-voice not found: run `cargo build --release -p npc_voice_helper` or set NPC_VOICE_HELPER")
    });
    let persona_path = root().join("assets/personas/blacksmith.persona.ron");
    let persona = Persona::from_ron(
        &std::fs::read_to_string(&persona_path).expect("persona"),
        None,
    )
    .expect("persona parses");
    let npc_voice = persona.voice.clone().unwrap_or_default();

    let runtime = Runtime::start(RuntimeConfig::new(model).with_slots(1));
    match runtime.events().recv() {
        Ok(Event::ModelLoaded(_)) => {}
        other => panic!("model did not load: {other:?}"),
    }
    let npc = NpcId(1);
    runtime.set_persona(npc, persona).expect("worker alive");
    let mut voice = VoiceClient::start(VoiceConfig::new(whisper).with_helper(helper));
    voice.warm_up();
    loop {
        match voice
            .events()
            .recv_timeout(PATIENCE)
            .expect("helper answers")
        {
            VoiceEvent::Ready { .. } => break,
            VoiceEvent::HelperStarted { .. } => {}
            other => panic!("helper did not start: {other:?}"),
        }
    }
    let speech = SpeechStream::start(Box::new(EspeakSynth::default()));
    let mut whole_synth = EspeakSynth::default();
    let player_voice = VoiceSettings {
        rate: 140,
        ..VoiceSettings::default()
    };

    let mut runs = Vec::new();
    // The first line warms the persona's cached prefix and is not counted.
    for (index, line) in std::iter::once(&"Hello there.")
        .chain(LINES.iter())
        .enumerate()
    {
        let pcm = EspeakSynth::default()
            .synthesize(line, &player_voice)
            .expect("espeak-ng")
            .resampled(SAMPLE_RATE);
        // The player has just stopped speaking.
        let t0 = Instant::now();
        let id = voice.transcribe(pcm.samples);
        let heard = loop {
            match voice.events().recv_timeout(PATIENCE).expect("transcript") {
                VoiceEvent::Transcript { id: got, text, .. } if got == id => break text,
                VoiceEvent::Failed { error, .. } => panic!("recognition failed: {error}"),
                _ => {}
            }
        };
        let transcribe = t0.elapsed();
        let request = runtime.say(npc, heard.clone()).expect("worker alive");
        let mut writer = Some(
            speech
                .begin_line(index as u64, npc_voice.clone())
                .expect("speech thread"),
        );
        let (mut first_token, mut first_audio, mut reply_done, mut reply) =
            (None, None, None, None);
        let mut line_done = false;
        while first_audio.is_none() || reply.is_none() {
            for event in runtime.events().try_iter() {
                match event {
                    Event::Delta {
                        request: r, text, ..
                    } if r == request => {
                        first_token.get_or_insert_with(|| t0.elapsed());
                        if let Some(w) = writer.as_mut() {
                            w.push(&text);
                        }
                    }
                    Event::Replied {
                        request: r, text, ..
                    } if r == request => {
                        reply_done = Some(t0.elapsed());
                        reply = Some(text);
                        if let Some(w) = writer.take() {
                            w.finish();
                        }
                    }
                    Event::Failed { error, .. } => panic!("reply failed: {error}"),
                    _ => {}
                }
            }
            for event in speech.events().try_iter() {
                if let SpeechEvent::Audio {
                    line: l, seq: 0, ..
                } = event
                    && l == index as u64
                {
                    first_audio.get_or_insert_with(|| t0.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(1));
            assert!(t0.elapsed() < PATIENCE, "no reply or audio for {line:?}");
        }
        let reply = reply.unwrap_or_default();
        let reply_done = reply_done.unwrap_or_default();
        // Drain the rest of this line's audio before measuring the whole-reply alternative.
        while !line_done {
            let event = speech
                .events()
                .recv_timeout(PATIENCE)
                .expect("speech finishes");
            line_done = matches!(event, SpeechEvent::LineDone { .. });
        }
        let started = Instant::now();
        whole_synth
            .synthesize(&reply, &npc_voice)
            .expect("espeak-ng");
        let whole_first_audio = reply_done + started.elapsed();
        if index == 0 {
            continue;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        runs.push(Run {
            transcribe: ms(transcribe),
            first_token: ms(first_token.unwrap_or_default()),
            streamed_first_audio: ms(first_audio.unwrap_or_default()),
            reply_done: ms(reply_done),
            whole_first_audio: ms(whole_first_audio),
            heard,
            reply,
        });
    }

    println!(
        "\n## End of player speech → first NPC audio ({} lines, median ms)\n",
        runs.len()
    );
    for run in &runs {
        println!("- heard {:?} → replied {:?}", run.heard, run.reply);
    }
    let col = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let streamed = col(|r| r.streamed_first_audio);
    let whole = col(|r| r.whole_first_audio);
    println!();
    println!("| stage (from end of speech) | median ms |");
    println!("|---|---:|");
    println!(
        "| transcript ready (npc-voice, Whisper tiny.en) | {:.0} |",
        col(|r| r.transcribe)
    );
    println!("| first reply token | {:.0} |", col(|r| r.first_token));
    println!("| **first NPC audio, sentence streaming** | **{streamed:.0}** |");
    println!("| whole reply generated | {:.0} |", col(|r| r.reply_done));
    println!("| first NPC audio, whole reply then synthesis | {whole:.0} |");
    println!(
        "\nstreaming / whole-reply first-audio ratio: {:.2}",
        streamed / whole
    );
}
