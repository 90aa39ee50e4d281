//! NPC voices side by side: the Piper neural voice (`en_US-joe-medium`, ONNX Runtime) against
//! espeak-ng on the same ten NPC lines in the same run, in interleaved pairs.
//!
//! - **Intelligibility**: each line is synthesised, resampled to 16 kHz and transcribed by the
//!   `npc-voice` helper (Whisper tiny.en, greedy); word error rate against the line.
//! - **Real-time factor**: synthesis time / audio length, per sentence (Piper on 1 and on 2
//!   threads; espeak-ng's time includes starting its process, as the runtime runs it).
//! - **Memory**: this process's resident set before Piper, after loading the voice, and its peak
//!   after speaking every line (espeak-ng and Whisper run in other processes).
//! - **Cost**: the characters spoken, priced on a cloud voice, against the local synthesis
//!   time at the local compute rate, projected to a player-hour at the seed's 5 lines a
//!   minute.
//!
//! ```text
//! cargo xtask setup
//! cargo build --release -p npc_voice_helper
//! cargo bench -p npc_native --features voice --bench voice
//! ```
//! `NPC_VOICE_HELPER` overrides where the helper is looked for.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use npc_native::voice::audio::Pcm;
use npc_native::voice::client::{VoiceClient, VoiceConfig};
use npc_native::voice::piper::PiperSynth;
use npc_native::voice::protocol::SAMPLE_RATE;
use npc_native::voice::synth::{EspeakSynth, SpeechSynth, VoiceSettings};
use npc_native::voice::wer;
use npc_native::{CostMeter, NpcId, PriceTable, SpeechStats};

const LINES: [&str; 10] = wer::NPC_LINES;
const PIPER_VOICE: &str = "voices/en_US-joe-medium.onnx";
const PATIENCE: Duration = Duration::from_secs(300);

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets")
}

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One engine's results over the lines.
struct Engine {
    name: String,
    settings: VoiceSettings,
    errors: usize,
    words: usize,
    rtf: Vec<f64>,
    synth_ms: Vec<f64>,
    meter: CostMeter,
    heard: Vec<String>,
}

impl Engine {
    fn new(name: &str, settings: VoiceSettings) -> Self {
        Self {
            name: name.into(),
            settings,
            errors: 0,
            words: 0,
            rtf: Vec::new(),
            synth_ms: Vec::new(),
            meter: CostMeter::default(),
            heard: Vec::new(),
        }
    }
}

fn transcribe(client: &mut VoiceClient, pcm: &Pcm) -> String {
    client
        .transcribe_and_wait(pcm.resampled(SAMPLE_RATE).samples, PATIENCE)
        .unwrap_or_else(|e| panic!("recognition failed: {e}"))
}

fn speak(
    synth: &mut dyn SpeechSynth,
    engine: &mut Engine,
    line: &str,
    client: Option<&mut VoiceClient>,
) {
    let started = Instant::now();
    let pcm = synth
        .synthesize(line, &engine.settings)
        .unwrap_or_else(|e| panic!("{}: {e}", engine.name));
    let took = started.elapsed();
    let warnings = synth.take_warnings();
    assert!(
        warnings.is_empty(),
        "{} did not speak as asked: {warnings:?}",
        engine.name
    );
    engine.rtf.push(took.as_secs_f64() / pcm.seconds());
    engine.synth_ms.push(took.as_secs_f64() * 1000.0);
    engine
        .meter
        .record_speech(NpcId(0), &SpeechStats::new(line, pcm.seconds(), took));
    if let Some(client) = client {
        let heard = transcribe(client, &pcm);
        let (reference, hypothesis) = (wer::normalize(line), wer::normalize(&heard));
        engine.errors += wer::word_errors(&reference, &hypothesis);
        engine.words += reference.len();
        engine.heard.push(heard);
    }
}

fn main() {
    let whisper = assets().join("models/ggml-tiny.en.bin");
    assert!(
        whisper.is_file(),
        "run `cargo xtask setup`: {} is missing",
        whisper.display()
    );
    let helper = VoiceConfig::find_helper().unwrap_or_else(|| {
        panic!("npc-voice not found: run `cargo build --release -p npc_voice_helper` or set NPC_VOICE_HELPER")
    });
    let mut client = VoiceClient::start(VoiceConfig::new(whisper).with_helper(helper));
    client
        .start_and_wait(PATIENCE)
        .expect("the speech helper starts");

    let (rss_before, _) = memory();
    let piper_settings = VoiceSettings::piper(PIPER_VOICE);
    let mut piper = PiperSynth::new(assets());
    let started = Instant::now();
    piper.prepare(&piper_settings);
    let load = started.elapsed();
    let warnings = piper.take_warnings();
    assert!(
        warnings.is_empty(),
        "the Piper voice did not load (run `cargo xtask setup`): {warnings:?}"
    );
    let (rss_loaded, _) = memory();
    // The blacksmith's espeak-ng voice (what NPCs spoke before Piper) and espeak-ng's default.
    let persona_espeak = VoiceSettings {
        voice: "en+m3".into(),
        pitch: 35,
        rate: 150,
        ..VoiceSettings::default()
    };
    let mut engines = [
        Engine::new("Piper en_US-joe-medium, 1 thread", piper_settings.clone()),
        Engine::new(
            "espeak-ng en+m3, 150 wpm (the blacksmith's before)",
            persona_espeak,
        ),
        Engine::new(
            "espeak-ng en, 175 wpm (its default)",
            VoiceSettings::default(),
        ),
    ];
    let mut espeak = EspeakSynth::default();
    // Warm-up: the first Piper run allocates its buffers; not counted.
    piper
        .synthesize("Hello.", &piper_settings)
        .expect("Piper speaks");
    for (at, line) in LINES.iter().enumerate() {
        // Interleaved, with the order turned every line.
        let order: [usize; 3] = if at % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for index in order {
            let synth: &mut dyn SpeechSynth = if index == 0 { &mut piper } else { &mut espeak };
            speak(synth, &mut engines[index], line, Some(&mut client));
        }
    }
    let (rss_after, peak) = memory();

    // Piper on two threads, beside one, for the real-time factor only.
    let mut piper2 = PiperSynth::new(assets()).with_threads(2);
    piper2.prepare(&piper_settings);
    piper2
        .synthesize("Hello.", &piper_settings)
        .expect("Piper speaks");
    let mut two = Engine::new("Piper en_US-joe-medium, 2 threads", piper_settings.clone());
    let mut one = Engine::new(
        "Piper, 1 thread (paired with the row above)",
        piper_settings,
    );
    for (at, line) in LINES.iter().enumerate() {
        if at % 2 == 0 {
            speak(&mut piper2, &mut two, line, None);
            speak(&mut piper, &mut one, line, None);
        } else {
            speak(&mut piper, &mut one, line, None);
            speak(&mut piper2, &mut two, line, None);
        }
    }

    println!(
        "\n## Intelligibility and speed: {} NPC lines, Whisper tiny.en as the listener\n",
        LINES.len()
    );
    println!(
        "| voice | word error rate | real-time factor (median) | synthesis ms per sentence (median) | audio s per sentence (mean) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for e in engines.iter().chain([&two, &one]) {
        let wer = if e.words == 0 {
            "—".to_owned()
        } else {
            format!(
                "{:.1} % ({}/{})",
                100.0 * e.errors as f64 / e.words as f64,
                e.errors,
                e.words
            )
        };
        println!(
            "| {} | {wer} | {:.3} | {:.0} | {:.2} |",
            e.name,
            median(e.rtf.clone()),
            median(e.synth_ms.clone()),
            e.meter.total().spoken_audio.as_secs_f64()
                / e.meter.total().spoken_sentences.max(1) as f64,
        );
    }
    let (p, s) = (&engines[0], &engines[1]);
    if p.words > 0 && s.errors > 0 {
        println!(
            "\nPiper / espeak-ng (blacksmith's voice) word error ratio: {:.2}",
            (p.errors as f64 / p.words as f64) / (s.errors as f64 / s.words as f64)
        );
    }
    println!("\nwhat Whisper heard:");
    for (at, line) in LINES.iter().enumerate() {
        println!(
            "- {line:?}: Piper {:?}; espeak-ng {:?}",
            engines[0].heard[at].trim(),
            engines[1].heard[at].trim()
        );
    }

    println!("\n## Memory of this process (MiB)\n");
    println!("| stage | resident |");
    println!("|---|---:|");
    println!(
        "| before Piper (Whisper client running, helper in its own process) | {rss_before:.0} |"
    );
    println!(
        "| Piper voice loaded ({:.1} s) | {rss_loaded:.0} |",
        load.as_secs_f64()
    );
    println!("| after speaking {} lines | {rss_after:.0} |", LINES.len());
    println!("| peak (VmHWM) | {peak:.0} |");
    println!(
        "\nthe voice's share: {:.0} MiB resident, {:.0} MiB at peak",
        rss_after - rss_before,
        peak - rss_before
    );

    let prices = PriceTable::default();
    let t = &engines[0].meter.total();
    let chars_per_line = t.spoken_characters as f64 / t.spoken_sentences as f64;
    let synth_per_line = t.speech_compute.as_secs_f64() / t.spoken_sentences as f64;
    // The seed's workload: 5 NPC lines a minute; an NPC reply here is one to three sentences
    // like these, so a line is counted as two of them.
    let lines_per_hour = 300.0;
    let chars_per_hour = lines_per_hour * 2.0 * chars_per_line;
    let local = prices.local_cost(Duration::from_secs_f64(
        lines_per_hour * 2.0 * synth_per_line,
    ));
    let cloud = prices.cloud_speech_cost(chars_per_hour as u64);
    let elevenlabs = chars_per_hour * 0.30 / 1000.0;
    println!("\n## Cost per player-hour (5 replies a minute, two sentences each)\n");
    println!("| | per player-hour |");
    println!("|---|---:|");
    println!(
        "| Piper, local: {:.0} s of synthesis at ${}/h | ${local:.5} |",
        lines_per_hour * 2.0 * synth_per_line,
        prices.local_per_hour
    );
    println!(
        "| the same {chars_per_hour:.0} characters on OpenAI tts-1 (${}/M characters) | ${cloud:.4} |",
        prices.cloud_speech_per_million_chars
    );
    println!(
        "| … on ElevenLabs (Creator plan's usage rate, $0.30 per 1,000 characters) | ${elevenlabs:.3} |"
    );
    println!(
        "\nlocal / cloud: 1/{:.0} of tts-1, 1/{:.0} of ElevenLabs",
        cloud / local,
        elevenlabs / local
    );
}
