//! Time from the end of the player's speech to the NPC's first audio, through the real
//! pieces: espeak-ng speaks the player's line (standing in for the microphone), the
//! `npc-voice` helper transcribes it with Whisper tiny.en, the runtime replies on the default
//! model, and the reply is voiced by the blacksmith's Piper voice or by espeak-ng: two NPCs
//! with the same persona and sampling seed, one per engine, take every line in turn (the
//! order flips each line). Two ways of voicing are measured on the same replies: sentence
//! streaming (the first sentence is synthesised while the model writes the rest) against
//! waiting for the whole reply and synthesising it at once.
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

use npc_native::voice::client::{VoiceClient, VoiceConfig};
use npc_native::voice::piper::PiperSynth;
use npc_native::voice::protocol::SAMPLE_RATE;
use npc_native::voice::synth::{
    EspeakSynth, SpeechEvent, SpeechStream, SpeechSynth, VoiceEngine, VoiceSettings,
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

/// What one turn needs: the runtime, the recogniser and one engine's speech stream.
struct Pipeline<'a> {
    runtime: &'a Runtime,
    voice: &'a mut VoiceClient,
    player_voice: &'a VoiceSettings,
}

/// The engine an NPC speaks with, its stream and a synthesiser for the whole-reply alternative.
struct Speaker {
    name: &'static str,
    npc: NpcId,
    settings: VoiceSettings,
    speech: SpeechStream,
    whole: Box<dyn SpeechSynth>,
    runs: Vec<Run>,
}

impl Pipeline<'_> {
    fn turn(&mut self, speaker: &mut Speaker, line: &str, index: u64) -> Run {
        let pcm = EspeakSynth::default()
            .synthesize(line, self.player_voice)
            .expect("espeak-ng")
            .resampled(SAMPLE_RATE);
        // The player has just stopped speaking.
        let t0 = Instant::now();
        let heard = self
            .voice
            .transcribe_and_wait(pcm.samples, PATIENCE)
            .unwrap_or_else(|e| panic!("recognition failed: {e}"));
        let transcribe = t0.elapsed();
        let request = self
            .runtime
            .say(speaker.npc, heard.clone())
            .expect("worker alive");
        let mut writer = Some(
            speaker
                .speech
                .begin_line(index, speaker.settings.clone())
                .expect("speech thread"),
        );
        let (mut first_token, mut first_audio, mut reply_done, mut reply) =
            (None, None, None, None);
        let mut line_done = false;
        while first_audio.is_none() || reply.is_none() {
            for event in self.runtime.events().try_iter() {
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
            for event in speaker.speech.events().try_iter() {
                match event {
                    SpeechEvent::Audio {
                        line: l, seq: 0, ..
                    } if l == index => {
                        first_audio.get_or_insert_with(|| t0.elapsed());
                    }
                    SpeechEvent::Warning { error } | SpeechEvent::Failed { error, .. } => {
                        panic!("{} did not speak as asked: {error}", speaker.name)
                    }
                    SpeechEvent::LineDone { line: l, .. } if l == index => line_done = true,
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(1));
            assert!(t0.elapsed() < PATIENCE, "no reply or audio for {line:?}");
        }
        let reply = reply.unwrap_or_default();
        let reply_done = reply_done.unwrap_or_default();
        // Drain the rest of this line's audio before measuring the whole-reply alternative.
        while !line_done {
            let event = speaker
                .speech
                .events()
                .recv_timeout(PATIENCE)
                .expect("speech finishes");
            line_done = matches!(event, SpeechEvent::LineDone { .. });
        }
        let started = Instant::now();
        speaker
            .whole
            .synthesize(&reply, &speaker.settings)
            .expect("synthesis");
        let whole_first_audio = reply_done + started.elapsed();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Run {
            transcribe: ms(transcribe),
            first_token: ms(first_token.unwrap_or_default()),
            streamed_first_audio: ms(first_audio.unwrap_or_default()),
            reply_done: ms(reply_done),
            whole_first_audio: ms(whole_first_audio),
            heard,
            reply,
        }
    }
}

fn main() {
    let model = need(model::path());
    let whisper = need(root().join("assets/models/ggml-tiny.en.bin"));
    let helper = VoiceConfig::find_helper().unwrap_or_else(|| {
        panic!("npc-voice not found: run `cargo build --release -p npc_voice_helper` or set NPC_VOICE_HELPER")
    });
    let persona_path = root().join("assets/personas/blacksmith.persona.ron");
    let mut persona = Persona::from_ron(
        &std::fs::read_to_string(&persona_path).expect("persona"),
        None,
    )
    .expect("persona parses");
    // One seed for both NPCs: the same line gets the same reply from each.
    persona.sampling.seed = Some(7);
    let piper_voice = persona.voice.clone().unwrap_or_default();
    assert_eq!(
        piper_voice.engine,
        VoiceEngine::Piper,
        "the blacksmith speaks with Piper"
    );
    let espeak_voice = VoiceSettings {
        engine: VoiceEngine::Espeak,
        model: None,
        ..piper_voice.clone()
    };

    let runtime = Runtime::start(RuntimeConfig::new(model).with_slots(1));
    match runtime.events().recv() {
        Ok(Event::ModelLoaded(_)) => {}
        other => panic!("model did not load: {other:?}"),
    }
    let mut voice = VoiceClient::start(VoiceConfig::new(whisper).with_helper(helper));
    voice
        .start_and_wait(PATIENCE)
        .expect("the speech helper starts");
    let assets = root().join("assets");
    let piper_stream = SpeechStream::start(Box::new(PiperSynth::new(&assets)));
    piper_stream.prepare(piper_voice.clone());
    let mut whole_piper = PiperSynth::new(&assets);
    whole_piper.prepare(&piper_voice);
    assert!(
        whole_piper.take_warnings().is_empty(),
        "the Piper voice is missing: run `cargo xtask setup`"
    );
    let mut speakers = [
        Speaker {
            name: "Piper",
            npc: NpcId(1),
            settings: piper_voice,
            speech: piper_stream,
            whole: Box::new(whole_piper),
            runs: Vec::new(),
        },
        Speaker {
            name: "espeak-ng",
            npc: NpcId(2),
            settings: espeak_voice,
            speech: SpeechStream::start(Box::new(EspeakSynth::default())),
            whole: Box::new(EspeakSynth::default()),
            runs: Vec::new(),
        },
    ];
    for speaker in &speakers {
        runtime
            .set_persona(speaker.npc, persona.clone())
            .expect("worker alive");
    }
    let player_voice = VoiceSettings {
        rate: 140,
        ..VoiceSettings::default()
    };
    let mut pipeline = Pipeline {
        runtime: &runtime,
        voice: &mut voice,
        player_voice: &player_voice,
    };

    // The first line warms each NPC's cached prefix and the voices, and is not counted.
    for (index, line) in std::iter::once(&"Hello there.")
        .chain(LINES.iter())
        .enumerate()
    {
        let order = if index % 2 == 0 { [0, 1] } else { [1, 0] };
        for at in order {
            let run = pipeline.turn(&mut speakers[at], line, index as u64);
            if index > 0 {
                speakers[at].runs.push(run);
            }
        }
    }

    let runs = &speakers[0].runs;
    println!(
        "\n## End of player speech → first NPC audio ({} lines, each voiced by both engines, median ms)\n",
        runs.len()
    );
    for (piper, espeak) in speakers[0].runs.iter().zip(&speakers[1].runs) {
        println!(
            "- heard {:?} → Piper's NPC replied {:?}; espeak-ng's {:?}",
            piper.heard, piper.reply, espeak.reply
        );
    }
    let col = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let (p, e) = (&speakers[0].runs, &speakers[1].runs);
    println!();
    println!("| stage (from end of speech) | Piper | espeak-ng |");
    println!("|---|---:|---:|");
    let row = |name: &str, f: fn(&Run) -> f64| {
        println!("| {name} | {:.0} | {:.0} |", col(p, f), col(e, f));
    };
    row("transcript ready (npc-voice, Whisper tiny.en)", |r| {
        r.transcribe
    });
    row("first reply token", |r| r.first_token);
    row("**first NPC audio, sentence streaming**", |r| {
        r.streamed_first_audio
    });
    row("whole reply generated", |r| r.reply_done);
    row("first NPC audio, whole reply then synthesis", |r| {
        r.whole_first_audio
    });
    let first = |r: &Run| r.streamed_first_audio;
    let after_token = |r: &Run| r.streamed_first_audio - r.first_token;
    println!(
        "\nfirst audio, Piper / espeak-ng: {:.2}; after the first token: Piper {:.0} ms, espeak-ng {:.0} ms",
        col(p, first) / col(e, first),
        col(p, after_token),
        col(e, after_token)
    );
    for speaker in &speakers {
        println!(
            "{}: streaming / whole-reply first-audio ratio {:.2}",
            speaker.name,
            col(&speaker.runs, |r| r.streamed_first_audio)
                / col(&speaker.runs, |r| r.whole_first_audio)
        );
    }
}
