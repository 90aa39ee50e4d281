//! Terminal chat with one NPC on the local model.
//!
//! ```text
//! cargo run --release --example chat -- --persona assets/personas/blacksmith.persona.ron
//! ```
//! Options: `--model ID|PATH` (a catalog id such as `qwen2.5-coder-0.5b`, fetched by `cargo
//! xtask setup --model ID`, or a GGUF file; default: the catalog's default model), `--threads N`, `--context N`, `--seed N`, `--escalate` (questions
//! outside the persona's knowledge go to the cloud model named by `NPC_AI_CLOUD_URL`,
//! `NPC_AI_CLOUD_MODEL` and `NPC_AI_CLOUD_KEY`, when built with the `cloud` feature; otherwise
//! the NPC says its fallback line), `--inform` (the same, but the cloud only supplies the fact
//! and the local model says it: `CloudRole::Inform`).
//! `--remote URL` has an inference server generate the NPC's replies (an OpenAI-compatible
//! `/v1` base URL such as llama-server's `http://127.0.0.1:8080/v1`; `NPC_AI_REMOTE_MODEL`
//! and `NPC_AI_REMOTE_KEY` name its model and key; needs the `cloud` feature; see
//! docs/serving.md); the local model stays loaded for prompts and answers if the server fails,
//! or, with `NPC_AI_REMOTE_ONLY=1`, only its vocabulary is read and a failed line gets the
//! NPC's don't-know line.
//! `--llama-logs` lets llama.cpp print its own log (model, KV cache and compute buffer sizes).
//! Type a line and press Enter; the reply streams token by token, followed by its speed.
//! Ctrl-D ends the conversation and prints what it cost (see docs/benchmarks.md, "The cost meter").
//!
//! With `--voice` (build with `--features voice`, after `cargo xtask setup` and
//! `cargo build --release -p npc_voice_helper`) every turn also goes through speech: espeak-ng
//! speaks the typed line in place of a microphone, the `npc-voice` helper transcribes it
//! (Whisper tiny.en), the NPC answers what was *heard*, and its reply is voiced (with the
//! persona's voice: a Piper neural voice for the shipped blacksmith) sentence by
//! sentence while the model is still writing. Each turn prints the time from the end of the
//! player's speech to the transcript, the first reply token and the first NPC audio; the
//! median is printed on exit. `--voice-out DIR` saves each reply's audio as `DIR/turn-N.wav`.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

use npc_native::{
    CloudConfig, CloudRole, CostMeter, EscalationConfig, Event, NpcId, Persona, RemoteConfig,
    ReplySource, Runtime, RuntimeConfig,
};

#[cfg_attr(not(feature = "voice"), allow(dead_code))]
struct Args {
    persona: String,
    config: RuntimeConfig,
    /// `--voice`: the turns go through speech recognition and synthesis.
    voice: bool,
    /// `--voice-out DIR`: where the replies' audio is saved.
    voice_out: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut persona = None;
    // This example lives in the workspace: models and lore are in the project's assets.
    let mut config =
        RuntimeConfig::default().with_assets_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../assets"));
    let (mut voice, mut voice_out) = (false, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |text: String| text.parse::<u32>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--persona" => persona = Some(value()?),
            "--model" => {
                let model = value()?;
                config = if npc_native::catalog::find(&model).is_some() {
                    config.with_catalog_model(model)
                } else {
                    // A file named on the command line is relative to the working directory.
                    let path = std::path::absolute(&model).map_err(|e| format!("{model}: {e}"))?;
                    config.with_model(path)
                };
            }
            "--threads" => config = config.with_threads(number(value()?)?),
            "--context" => config = config.with_context_size(number(value()?)?),
            "--seed" => {
                let seed = number(value()?)?;
                config.sampling.seed = Some(seed);
            }
            "--escalate" => {
                config = config.with_escalation(EscalationConfig::enabled(CloudConfig::from_env()));
            }
            "--inform" => {
                let mut escalation = EscalationConfig::enabled(CloudConfig::from_env());
                escalation.cloud_role = CloudRole::Inform;
                config = config.with_escalation(escalation);
            }
            "--remote" => {
                let remote = RemoteConfig::from_env_at(value()?);
                if !cfg!(feature = "cloud") {
                    return Err("--remote needs a build with `--features cloud`".into());
                }
                config = config.with_remote(remote);
            }
            "--llama-logs" => config = config.with_llama_logs(true),
            "--voice" => voice = true,
            "--voice-out" => voice_out = Some(value()?.into()),
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let persona = persona.ok_or("--persona FILE is required")?;
    if voice && !cfg!(feature = "voice") {
        return Err("--voice needs a build with `--features voice`".into());
    }
    Ok(Args {
        persona,
        config: config.with_slots(1),
        voice: voice || voice_out.is_some(),
        voice_out,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            if !err.is_empty() {
                eprintln!("chat: {err}");
            }
            eprintln!(
                "usage: chat --persona FILE [--model ID|GGUF] [--threads N] [--context N] [--seed N] [--escalate | --inform] [--remote URL] [--llama-logs] [--voice] [--voice-out DIR]"
            );
            return ExitCode::from(2);
        }
    };
    let persona = match std::fs::read_to_string(&args.persona)
        .map_err(|e| format!("{}: {e}", args.persona))
        .and_then(|source| {
            Persona::from_ron(&source, Some(&args.persona)).map_err(|e| e.to_string())
        }) {
        Ok(persona) => persona,
        Err(err) => {
            eprintln!("chat: {err}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = Runtime::start(args.config);
    match runtime.events().recv() {
        Ok(Event::ModelLoaded(info)) if !info.generates_locally() => eprintln!(
            "[{} read for its vocabulary and template in {:.1}s: the server generates every \
             reply; {} context tokens]",
            info.path.display(),
            info.load_time.as_secs_f64(),
            info.context_per_npc
        ),
        Ok(Event::ModelLoaded(info)) => {
            eprintln!(
                "[model {} loaded in {:.1}s on {}: {} threads, {} context tokens]",
                info.path.display(),
                info.load_time.as_secs_f64(),
                info.device,
                info.threads,
                info.context_per_npc
            );
            if let Some(reason) = &info.cpu_fallback {
                eprintln!("[running on the CPU: {reason}]");
            }
        }
        Ok(Event::ModelFailed(err)) => {
            eprintln!("chat: {err}");
            return ExitCode::FAILURE;
        }
        other => {
            eprintln!("chat: unexpected first event {other:?}");
            return ExitCode::FAILURE;
        }
    }
    let npc = NpcId(1);
    let name = persona.name.clone();
    let greeting = persona.greeting.clone();
    #[cfg(feature = "voice")]
    let mut voice = if args.voice {
        match speech::Voice::start(persona.voice.clone().unwrap_or_default(), args.voice_out) {
            Ok(voice) => Some(voice),
            Err(err) => {
                eprintln!("chat: {err}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    if runtime.set_persona(npc, persona).is_err() {
        eprintln!("chat: the worker stopped");
        return ExitCode::FAILURE;
    }
    if !greeting.is_empty() {
        println!("{name}: {greeting}");
    }
    let mut meter = CostMeter::default();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        print!("> ");
        let _ = stdout.flush();
        let mut line = String::new();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(err) => {
                eprintln!("chat: {err}");
                break;
            }
        }
        #[allow(unused_mut)]
        let mut said = line.trim().to_owned();
        if said.is_empty() {
            continue;
        }
        #[cfg(feature = "voice")]
        let mut turn = match voice.as_mut().map(|voice| voice.hear(&said)) {
            None => None,
            Some(Ok(turn)) => {
                println!("  [heard: {:?}]", turn.heard);
                said.clone_from(&turn.heard);
                Some(turn)
            }
            Some(Err(err)) => {
                println!("  [speech: {err}]");
                continue;
            }
        };
        if said.is_empty() {
            println!("  [nothing was heard]");
            continue;
        }
        let Ok(request) = runtime.say(npc, said) else {
            eprintln!("chat: the worker stopped");
            return ExitCode::FAILURE;
        };
        print!("{name}: ");
        let _ = stdout.flush();
        loop {
            #[cfg(feature = "voice")]
            if let (Some(voice), Some(turn)) = (voice.as_ref(), turn.as_mut()) {
                voice.poll(turn);
            }
            let event = match runtime.events().recv_timeout(Duration::from_millis(2)) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    eprintln!("chat: the worker stopped");
                    return ExitCode::FAILURE;
                }
            };
            meter.record_event(&event);
            match event {
                Event::Delta {
                    request: r, text, ..
                } if r == request => {
                    print!("{text}");
                    let _ = stdout.flush();
                    #[cfg(feature = "voice")]
                    if let Some(turn) = turn.as_mut() {
                        turn.push(&text);
                    }
                }
                Event::Replied {
                    request: r,
                    stats,
                    #[cfg(feature = "voice")]
                    text,
                    ..
                } if r == request => {
                    // Local replies print as before; cloud and fallback ones say so.
                    let source = match stats.source {
                        ReplySource::Local => String::new(),
                        other => format!("{other:?}: "),
                    };
                    println!(
                        "\n  [{source}{} tokens, {:.1} tok/s, first token after {} ms, {} of {} prompt tokens cached]",
                        stats.generated_tokens,
                        stats.tokens_per_second(),
                        stats.time_to_first_token.as_millis(),
                        stats.cached_tokens,
                        stats.prompt_tokens
                    );
                    #[cfg(feature = "voice")]
                    if let (Some(voice), Some(turn)) = (voice.as_mut(), turn.take()) {
                        match voice.finish(turn, &text, &mut meter, npc) {
                            Ok(report) => println!("  [{report}]"),
                            Err(err) => println!("  [speech: {err}]"),
                        }
                    }
                    break;
                }
                Event::Failed {
                    request: r, error, ..
                } if r == request => {
                    println!("\n  [{error}]");
                    break;
                }
                Event::PersonaRejected { error, .. } => {
                    eprintln!("chat: persona rejected: {error}");
                    return ExitCode::FAILURE;
                }
                Event::WorkerDied { reason } => {
                    eprintln!("chat: the worker died: {reason}");
                    return ExitCode::FAILURE;
                }
                _ => {}
            }
        }
    }
    println!("\n{}", meter.report(300.0));
    #[cfg(feature = "voice")]
    if let Some(voice) = voice {
        println!("{}", voice.summary());
    }
    ExitCode::SUCCESS
}

/// `--voice`: the player's line through espeak-ng and the `npc-voice` helper, the reply through
/// a sentence-streaming [`SpeechStream`].
#[cfg(feature = "voice")]
mod speech {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use npc_native::voice::audio::Pcm;
    use npc_native::voice::client::{VoiceClient, VoiceConfig, VoiceEvent, workspace_model};
    use npc_native::voice::piper::PiperSynth;
    use npc_native::voice::protocol::SAMPLE_RATE;
    use npc_native::voice::synth::{
        EspeakSynth, LineWriter, SpeechEvent, SpeechStream, SpeechSynth, VoiceEngine, VoiceSettings,
    };
    use npc_native::{CostMeter, NpcId, SpeechStats};

    /// How long the helper may take to start or to transcribe one line.
    const PATIENCE: Duration = Duration::from_secs(120);

    /// Speech in and out for the whole conversation.
    pub struct Voice {
        client: VoiceClient,
        speech: SpeechStream,
        microphone: EspeakSynth,
        player: VoiceSettings,
        npc: VoiceSettings,
        out: Option<PathBuf>,
        turns: u64,
        first_audio: Vec<Duration>,
    }

    /// One turn: from the end of the player's speech to the reply's last sentence.
    pub struct Turn {
        /// What the helper heard.
        pub heard: String,
        line: u64,
        ended_speaking: Instant,
        transcript: Duration,
        first_token: Option<Duration>,
        first_audio: Option<Duration>,
        writer: Option<LineWriter>,
        streamed: bool,
        audio: Pcm,
        sentences: u32,
        spoken: Vec<SpeechStats>,
        done: bool,
    }

    impl Voice {
        /// Starts the helper (waiting for its model) and the synthesis thread.
        pub fn start(npc: VoiceSettings, out: Option<PathBuf>) -> Result<Self, String> {
            let whisper = workspace_model(
                &std::env::current_dir().unwrap_or_default(),
                "ggml-tiny.en.bin",
            )
            .or_else(|| {
                workspace_model(
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
                    "ggml-tiny.en.bin",
                )
            })
            .ok_or("assets/models/ggml-tiny.en.bin is missing: run `cargo xtask setup`")?;
            let helper = VoiceConfig::find_helper().ok_or(
                "the npc-voice helper is missing: run `cargo build --release -p npc_voice_helper` \
                 or set NPC_VOICE_HELPER",
            )?;
            if let Some(dir) = &out {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            // Piper voices' `model:` paths are relative to the asset folder (the one holding
            // the Whisper model's `models/`).
            let assets = whisper
                .parent()
                .and_then(std::path::Path::parent)
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default();
            let speech = SpeechStream::start(Box::new(PiperSynth::new(&assets)));
            speech.prepare(npc.clone());
            match (npc.engine, npc.model.as_deref()) {
                (VoiceEngine::Piper, Some(model)) => {
                    eprintln!("[speech: the NPC speaks with the Piper voice {model}]");
                }
                _ => eprintln!(
                    "[speech: the NPC speaks with espeak-ng voice {}]",
                    npc.voice
                ),
            }
            let mut client = VoiceClient::start(VoiceConfig::new(whisper).with_helper(helper));
            let (model, load_ms) = client.start_and_wait(PATIENCE)?;
            eprintln!("[speech helper ready: {model}, loaded in {load_ms} ms]");
            Ok(Self {
                client,
                speech,
                microphone: EspeakSynth::default(),
                player: VoiceSettings {
                    rate: 140,
                    ..VoiceSettings::default()
                },
                npc,
                out,
                turns: 0,
                first_audio: Vec::new(),
            })
        }

        /// The player says `line` (espeak-ng stands in for the microphone); waits for what
        /// the helper heard and opens the reply's speech line.
        pub fn hear(&mut self, line: &str) -> Result<Turn, String> {
            let spoken = self
                .microphone
                .synthesize(line, &self.player)
                .map_err(|e| e.to_string())?
                .resampled(SAMPLE_RATE);
            // The player has just stopped speaking.
            let ended_speaking = Instant::now();
            let id = self.client.transcribe(spoken.samples);
            let heard = loop {
                match self.client.events().recv_timeout(PATIENCE) {
                    Ok(VoiceEvent::Transcript { id: got, text, .. }) if got == id => break text,
                    Ok(VoiceEvent::Failed { id: got, error }) if got == id => {
                        return Err(error.to_string());
                    }
                    Ok(VoiceEvent::HelperExited { reason, .. }) => {
                        eprintln!("[speech helper exited: {reason}]");
                    }
                    Ok(_) => {}
                    Err(_) => return Err("no transcript".into()),
                }
            };
            self.turns += 1;
            Ok(Turn {
                heard: heard.trim().to_owned(),
                line: self.turns,
                ended_speaking,
                transcript: ended_speaking.elapsed(),
                first_token: None,
                first_audio: None,
                writer: self.speech.begin_line(self.turns, self.npc.clone()),
                streamed: false,
                audio: Pcm {
                    sample_rate: 0,
                    samples: Vec::new(),
                },
                sentences: 0,
                spoken: Vec::new(),
                done: false,
            })
        }

        /// Collects the turn's synthesised sentences so far (call while the reply streams).
        pub fn poll(&self, turn: &mut Turn) {
            for event in self.speech.events().try_iter() {
                turn.take(event);
            }
        }

        /// The reply is complete (`text` in full, for replies that did not stream): speaks
        /// the rest, waits for its audio, saves it, counts it in `meter` for `npc`, and
        /// reports the turn's timings.
        pub fn finish(
            &mut self,
            mut turn: Turn,
            text: &str,
            meter: &mut CostMeter,
            npc: NpcId,
        ) -> Result<String, String> {
            if let Some(mut writer) = turn.writer.take() {
                if !turn.streamed {
                    turn.first_token
                        .get_or_insert(turn.ended_speaking.elapsed());
                    writer.push(text);
                }
                writer.finish();
            }
            while !turn.done {
                let event = self
                    .speech
                    .events()
                    .recv_timeout(PATIENCE)
                    .map_err(|_| "speech synthesis stopped answering")?;
                turn.take(event);
            }
            for speech in &turn.spoken {
                meter.record_speech(npc, speech);
            }
            let first_audio = turn.first_audio.ok_or("the reply produced no audio")?;
            self.first_audio.push(first_audio);
            let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis());
            let mut report = format!(
                "voice: after the end of speech: transcript {} ms, first reply token {} ms, \
                 first NPC audio {} ms; {} sentences, {:.1} s of audio",
                turn.transcript.as_millis(),
                ms(turn.first_token),
                first_audio.as_millis(),
                turn.sentences,
                turn.audio.seconds(),
            );
            if let Some(dir) = &self.out {
                let path = dir.join(format!("turn-{}.wav", turn.line));
                std::fs::write(&path, turn.audio.to_wav())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                report.push_str(&format!(" -> {}", path.display()));
            }
            Ok(report)
        }

        /// The median time from the end of speech to the first NPC audio.
        pub fn summary(&self) -> String {
            let mut times = self.first_audio.clone();
            times.sort();
            match times.get(times.len() / 2) {
                Some(median) => format!(
                    "voice: median time from the end of the player's speech to the first NPC audio: \
                     {} ms over {} turns",
                    median.as_millis(),
                    times.len()
                ),
                None => "voice: no turn was voiced".into(),
            }
        }
    }

    impl Turn {
        /// A streamed piece of the reply.
        pub fn push(&mut self, text: &str) {
            self.first_token
                .get_or_insert_with(|| self.ended_speaking.elapsed());
            self.streamed = true;
            if let Some(writer) = self.writer.as_mut() {
                writer.push(text);
            }
        }

        fn take(&mut self, event: SpeechEvent) {
            match event {
                SpeechEvent::Audio {
                    line,
                    pcm,
                    text,
                    synth,
                    ..
                } if line == self.line => {
                    self.first_audio
                        .get_or_insert_with(|| self.ended_speaking.elapsed());
                    self.sentences += 1;
                    self.spoken
                        .push(SpeechStats::new(&text, pcm.seconds(), synth));
                    self.audio.sample_rate = pcm.sample_rate;
                    self.audio.samples.extend(pcm.samples);
                }
                SpeechEvent::Failed { line, error, .. } if line == self.line => {
                    eprintln!("[speech: a sentence failed: {error}]");
                }
                SpeechEvent::LineDone { line, .. } if line == self.line => self.done = true,
                SpeechEvent::Warning { error } => eprintln!("[speech: {error}]"),
                _ => {}
            }
        }
    }
}
