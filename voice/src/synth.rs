//! Speech synthesis: the [`SpeechSynth`] trait, its espeak-ng backend, per-persona
//! [`VoiceSettings`], and sentence-by-sentence streaming ([`SentenceSplitter`],
//! [`SpeechStream`]) so an NPC starts speaking its first sentence while the model is still
//! writing the rest.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::audio::Pcm;

/// Which synthesiser speaks a persona's lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VoiceEngine {
    /// espeak-ng: robotic formant speech, always available (`voice`, `pitch`, `rate`).
    #[default]
    Espeak,
    /// A Piper (VITS) neural voice (`model`, `speaker`, `length_scale`, `noise_scale`,
    /// `noise_w`), through ONNX Runtime; espeak-ng with `voice`, `pitch` and `rate` is the
    /// fallback where the voice or ONNX Runtime is missing.
    Piper,
}

/// How a persona sounds. In a persona file, espeak-ng:
/// `voice: Some((voice: "en-us", pitch: 30, rate: 150))`; a Piper voice:
/// `voice: Some((engine: Piper, model: "voices/en_US-joe-medium.onnx", length_scale: 1.1))`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoiceSettings {
    /// The synthesiser (default [`VoiceEngine::Espeak`]).
    #[serde(default)]
    pub engine: VoiceEngine,
    /// espeak-ng voice name (`espeak-ng --voices` lists them, e.g. `en`, `en-us`,
    /// `en-gb-scotland`, with variants as `en+m3`).
    #[serde(default = "default_voice")]
    pub voice: String,
    /// espeak-ng pitch, 0 to 99 (espeak-ng's default is 50).
    #[serde(default = "default_pitch")]
    pub pitch: u8,
    /// espeak-ng speaking rate in words per minute, 80 to 450 (espeak-ng's default is 175).
    #[serde(default = "default_rate")]
    pub rate: u16,
    /// Piper: the voice's `.onnx` file (its `.onnx.json` beside it), relative to the game's
    /// asset folder, e.g. `voices/en_US-joe-medium.onnx`. It may not leave that folder.
    #[serde(default)]
    pub model: Option<String>,
    /// Piper: the speaker of a multi-speaker voice (default 0).
    #[serde(default)]
    pub speaker: Option<u32>,
    /// Piper: pace, 0.25 to 4 (above 1 is slower; default: the voice's own, usually 1).
    #[serde(default)]
    pub length_scale: Option<f32>,
    /// Piper: intonation variation, 0 to 2 (default: the voice's own, usually 0.667).
    #[serde(default)]
    pub noise_scale: Option<f32>,
    /// Piper: rhythm variation, 0 to 2 (default: the voice's own, usually 0.8).
    #[serde(default)]
    pub noise_w: Option<f32>,
}

fn default_voice() -> String {
    "en".into()
}
fn default_pitch() -> u8 {
    50
}
fn default_rate() -> u16 {
    175
}

impl Default for VoiceSettings {
    fn default() -> Self {
        Self {
            engine: VoiceEngine::Espeak,
            voice: default_voice(),
            pitch: default_pitch(),
            rate: default_rate(),
            model: None,
            speaker: None,
            length_scale: None,
            noise_scale: None,
            noise_w: None,
        }
    }
}

impl VoiceSettings {
    /// A Piper voice from `model` (relative to the asset folder), with the voice's own
    /// scales and espeak-ng's defaults as the fallback.
    #[must_use]
    pub fn piper(model: impl Into<String>) -> Self {
        Self {
            engine: VoiceEngine::Piper,
            model: Some(model.into()),
            ..Self::default()
        }
    }

    /// Checks ranges, the espeak-ng voice name (letters, digits, `-`, `+`, `_`, not starting
    /// with `-`: it becomes a command-line argument) and the Piper model path (relative,
    /// inside the asset folder, a `.onnx` file; required for [`VoiceEngine::Piper`]).
    ///
    /// # Errors
    /// [`SynthError::Settings`] saying which setting and why.
    pub fn validate(&self) -> Result<(), SynthError> {
        if self.voice.is_empty()
            || self.voice.len() > 64
            || self.voice.starts_with('-')
            || !self
                .voice
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '_'))
        {
            return Err(SynthError::Settings(format!(
                "voice name {:?} is not valid",
                self.voice
            )));
        }
        if self.pitch > 99 {
            return Err(SynthError::Settings(format!(
                "pitch {} is above 99",
                self.pitch
            )));
        }
        if !(80..=450).contains(&self.rate) {
            return Err(SynthError::Settings(format!(
                "rate {} is outside 80..=450 words per minute",
                self.rate
            )));
        }
        if let Some(model) = &self.model {
            check_model_path(model)?;
        } else if self.engine == VoiceEngine::Piper {
            return Err(SynthError::Settings(
                "a Piper voice needs `model`, the path of its .onnx file".into(),
            ));
        }
        if self.speaker.is_some_and(|s| s > 9_999) {
            return Err(SynthError::Settings("speaker is above 9999".into()));
        }
        for (name, value, range) in [
            ("length_scale", self.length_scale, 0.25..=4.0),
            ("noise_scale", self.noise_scale, 0.0..=2.0),
            ("noise_w", self.noise_w, 0.0..=2.0),
        ] {
            if let Some(value) = value
                && !range.contains(&value)
            {
                return Err(SynthError::Settings(format!(
                    "{name} {value} is outside {}..={}",
                    range.start(),
                    range.end()
                )));
            }
        }
        Ok(())
    }
}

/// Whether `path` names something inside an asset folder: relative, with no `..`, root or
/// drive (checked as text, on every platform's separators, so a file from a mod cannot point
/// the game at `/etc/...` or `..\..\save`).
#[must_use]
pub fn is_asset_relative(path: &str) -> bool {
    !path.starts_with('/')
        && !path.starts_with('\\')
        && !Path::new(path).is_absolute()
        && path
            .split(['/', '\\'])
            .all(|part| part != ".." && !part.contains(':'))
        && Path::new(path).components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
}

/// A voice model path must stay inside the asset folder: relative, no `..`, a `.onnx` file.
fn check_model_path(model: &str) -> Result<(), SynthError> {
    let path = std::path::Path::new(model);
    let bad = |why: &str| Err(SynthError::Settings(format!("model {model:?} {why}")));
    if model.trim().is_empty() || model.len() > 512 {
        return bad("is empty or longer than 512 bytes");
    }
    if !is_asset_relative(model) {
        return bad(
            "must be relative to the asset folder and stay inside it (no `..`, no drive or root)",
        );
    }
    if path.extension().is_none_or(|e| e != "onnx") {
        return bad("is not a .onnx file");
    }
    Ok(())
}

/// Why speech could not be synthesised.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SynthError {
    /// The voice settings are out of range.
    #[error("invalid voice settings: {0}")]
    Settings(String),
    /// The synthesiser program could not be run.
    #[error(
        "cannot run the speech synthesiser {program}: {message} (install espeak-ng, e.g. `cargo xtask setup`)"
    )]
    Unavailable {
        /// The program.
        program: String,
        /// The OS error.
        message: String,
    },
    /// The synthesiser ran but failed.
    #[error("speech synthesis failed: {0}")]
    Failed(String),
    /// ONNX Runtime could not be loaded (Piper voices need it).
    #[error("cannot load ONNX Runtime from {library}: {message}")]
    Runtime {
        /// The library file looked for.
        library: String,
        /// Why it could not be loaded.
        message: String,
    },
    /// A Piper voice (its `.onnx` model or `.onnx.json` config) is missing or unusable.
    #[error("cannot use the voice {path}: {message}")]
    Voice {
        /// The file at fault.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The text is longer than a synthesiser speaks in one call.
    #[error("a sentence of {chars} characters is longer than the {max} a voice speaks at once")]
    TooLong {
        /// Characters in the text.
        chars: usize,
        /// The limit.
        max: usize,
    },
    /// Nothing in the text could be spoken (no phoneme the voice knows).
    #[error("nothing to say in {0:?}")]
    NothingToSay(String),
    /// The voice does not know some of the phonemes it was given (they were skipped).
    #[error("the voice {model} has no sound for the phonemes {phonemes:?}; they were skipped")]
    UnknownPhonemes {
        /// The voice model.
        model: String,
        /// The phonemes skipped.
        phonemes: String,
    },
    /// The requested voice could not be used; espeak-ng spoke instead.
    #[error("{0}; speaking with espeak-ng instead")]
    FellBack(Box<SynthError>),
}

/// Turns text into audio. Implementations run on the [`SpeechStream`] thread, never on the
/// game's frame.
pub trait SpeechSynth: Send {
    /// Synthesises `text` with `voice`.
    ///
    /// # Errors
    /// Why this text could not be spoken.
    fn synthesize(&mut self, text: &str, voice: &VoiceSettings) -> Result<Pcm, SynthError>;

    /// Loads what `voice` needs (a model) ahead of its first sentence; problems are reported
    /// through [`SpeechSynth::take_warnings`]. The default does nothing.
    fn prepare(&mut self, voice: &VoiceSettings) {
        let _ = voice;
    }

    /// Problems met since the last call that did not stop speech (a fallback voice, skipped
    /// phonemes), each reported once. The default has none.
    fn take_warnings(&mut self) -> Vec<SynthError> {
        Vec::new()
    }
}

/// The espeak-ng command-line synthesiser (Debian package `espeak-ng`). Text goes in on
/// stdin, so nothing a player or model writes can become a command-line option.
#[derive(Debug, Clone)]
pub struct EspeakSynth {
    program: PathBuf,
}

impl Default for EspeakSynth {
    fn default() -> Self {
        Self {
            program: "espeak-ng".into(),
        }
    }
}

impl EspeakSynth {
    /// Uses `program` instead of `espeak-ng` from `PATH`.
    #[must_use]
    pub fn with_program(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
        }
    }
}

impl SpeechSynth for EspeakSynth {
    fn synthesize(&mut self, text: &str, voice: &VoiceSettings) -> Result<Pcm, SynthError> {
        voice.validate()?;
        let stdout = run_espeak(
            &self.program,
            &[
                "--stdout",
                "-b",
                "1",
                "-v",
                &voice.voice,
                "-p",
                &voice.pitch.to_string(),
                "-s",
                &voice.rate.to_string(),
            ],
            text,
        )?;
        if stdout.is_empty() {
            return Err(SynthError::Failed("espeak-ng wrote no audio".into()));
        }
        Pcm::from_wav(&stdout).map_err(SynthError::Failed)
    }
}

/// Runs the espeak-ng `program` with `args`, `text` on its stdin as one line (control
/// characters become spaces: espeak-ng reads stdin line by line and pauses at each); returns
/// its stdout. Text never becomes a command-line argument.
pub(crate) fn run_espeak(program: &Path, args: &[&str], text: &str) -> Result<Vec<u8>, SynthError> {
    let unavailable = |e: std::io::Error| SynthError::Unavailable {
        program: program.display().to_string(),
        message: e.to_string(),
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(unavailable)?;
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let writer = child.stdin.take().map(|mut stdin| {
        std::thread::spawn(move || {
            let _ = stdin.write_all(line.as_bytes());
            let _ = stdin.write_all(b"\n");
        })
    });
    let output = child.wait_with_output().map_err(unavailable)?;
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    if !output.status.success() {
        return Err(SynthError::Failed(format!(
            "espeak-ng exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output.stdout)
}

/// Cuts streamed text into sentences: a sentence ends at `.`, `!`, `?` or `…` followed by
/// whitespace, or at a line break.
#[derive(Debug, Default, Clone)]
pub struct SentenceSplitter {
    pending: String,
}

impl SentenceSplitter {
    /// Adds a piece of text; returns the sentences it completed.
    pub fn push(&mut self, delta: &str) -> Vec<String> {
        self.pending.push_str(delta);
        let mut sentences = Vec::new();
        loop {
            let chars: Vec<(usize, char)> = self.pending.char_indices().collect();
            let cut = chars.windows(2).find_map(|w| {
                let ((_, a), (j, b)) = (w[0], w[1]);
                let ends = matches!(a, '.' | '!' | '?' | '…') && b.is_whitespace();
                (ends || a == '\n').then_some(if a == '\n' { w[0].0 } else { j })
            });
            let Some(cut) = cut else { break };
            let sentence = self.pending[..cut].trim().to_owned();
            self.pending = self.pending[cut..].trim_start().to_owned();
            if sentence.chars().any(char::is_alphanumeric) {
                sentences.push(sentence);
            }
        }
        sentences
    }

    /// Returns what is left once the text is complete.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        let rest = rest.trim();
        rest.chars()
            .any(char::is_alphanumeric)
            .then(|| rest.to_owned())
    }
}

/// A request to the [`SpeechStream`] thread.
#[derive(Debug, Clone)]
enum StreamCommand {
    Sentence {
        line: u64,
        seq: u32,
        text: String,
        voice: VoiceSettings,
        queued: Instant,
    },
    End {
        line: u64,
        sentences: u32,
    },
    Prepare(VoiceSettings),
    /// The stream is dropped: stop now, whatever is queued or whichever lines are open.
    Stop,
}

/// What the [`SpeechStream`] thread produces.
#[derive(Debug, Clone)]
pub enum SpeechEvent {
    /// One synthesised sentence of a line, in order.
    Audio {
        /// The line (chosen by the caller of [`SpeechStream::begin_line`]).
        line: u64,
        /// Sentence number within the line, from 0.
        seq: u32,
        /// The sentence.
        text: String,
        /// Its audio.
        pcm: Pcm,
        /// Time spent synthesising it.
        synth: Duration,
        /// Time from queueing the sentence to its audio being ready.
        latency: Duration,
    },
    /// A sentence could not be synthesised (the line goes on with the next one).
    Failed {
        /// The line.
        line: u64,
        /// Sentence number.
        seq: u32,
        /// Why.
        error: SynthError,
    },
    /// Speech goes on, but not as asked: a fallback voice, skipped phonemes. Each cause is
    /// reported once.
    Warning {
        /// What happened.
        error: SynthError,
    },
    /// Every sentence of the line has been handled.
    LineDone {
        /// The line.
        line: u64,
        /// Sentences in the line.
        sentences: u32,
    },
}

/// Synthesises sentences on its own thread, in order, as they arrive.
pub struct SpeechStream {
    commands: Option<Sender<StreamCommand>>,
    events: Receiver<SpeechEvent>,
    thread: Option<JoinHandle<()>>,
    /// Set on drop: the thread skips whatever is still queued.
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Feeds one line's text into a [`SpeechStream`] as it is generated.
#[derive(Debug)]
pub struct LineWriter {
    line: u64,
    voice: VoiceSettings,
    splitter: SentenceSplitter,
    next_seq: u32,
    commands: Sender<StreamCommand>,
}

impl LineWriter {
    /// Adds generated text; complete sentences go to the synthesiser at once.
    pub fn push(&mut self, delta: &str) {
        for sentence in self.splitter.push(delta) {
            self.send(sentence);
        }
    }

    /// The line is complete: speaks the rest and ends the line.
    pub fn finish(mut self) {
        if let Some(rest) = self.splitter.finish() {
            self.send(rest);
        }
        let _ = self.commands.send(StreamCommand::End {
            line: self.line,
            sentences: self.next_seq,
        });
    }

    fn send(&mut self, text: String) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let _ = self.commands.send(StreamCommand::Sentence {
            line: self.line,
            seq,
            text,
            voice: self.voice.clone(),
            queued: Instant::now(),
        });
    }
}

impl SpeechStream {
    /// Starts the synthesis thread with `synth`.
    #[must_use]
    pub fn start(mut synth: Box<dyn SpeechSynth>) -> Self {
        let (commands, inbox) = crossbeam_channel::unbounded::<StreamCommand>();
        let (outbox, events) = crossbeam_channel::unbounded();
        let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = std::sync::Arc::clone(&stopping);
        let thread = std::thread::Builder::new()
            .name("npc-speech".into())
            .spawn(move || {
                for command in inbox {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let event = match command {
                        StreamCommand::Stop => break,
                        StreamCommand::Sentence {
                            line,
                            seq,
                            text,
                            voice,
                            queued,
                        } => {
                            let started = Instant::now();
                            match synth.synthesize(&text, &voice) {
                                Ok(pcm) => SpeechEvent::Audio {
                                    line,
                                    seq,
                                    text,
                                    pcm,
                                    synth: started.elapsed(),
                                    latency: queued.elapsed(),
                                },
                                Err(error) => SpeechEvent::Failed { line, seq, error },
                            }
                        }
                        StreamCommand::End { line, sentences } => {
                            SpeechEvent::LineDone { line, sentences }
                        }
                        StreamCommand::Prepare(voice) => {
                            synth.prepare(&voice);
                            if !warn(&mut *synth, &outbox) {
                                break;
                            }
                            continue;
                        }
                    };
                    // Warnings first: they explain the audio (or failure) that follows.
                    if !warn(&mut *synth, &outbox) || outbox.send(event).is_err() {
                        break;
                    }
                }
            })
            .ok();
        Self {
            commands: Some(commands),
            events,
            thread,
            stopping,
        }
    }

    /// Loads what `voice` needs on the speech thread now, so the first sentence spoken with
    /// it does not wait for a model; problems arrive as [`SpeechEvent::Warning`].
    pub fn prepare(&self, voice: VoiceSettings) {
        if let Some(commands) = &self.commands {
            let _ = commands.send(StreamCommand::Prepare(voice));
        }
    }

    /// Starts a line spoken with `voice`; feed it with [`LineWriter::push`].
    #[must_use]
    pub fn begin_line(&self, line: u64, voice: VoiceSettings) -> Option<LineWriter> {
        Some(LineWriter {
            line,
            voice,
            splitter: SentenceSplitter::default(),
            next_seq: 0,
            commands: self.commands.clone()?,
        })
    }

    /// Synthesised audio and failures, in order. Drain with `try_iter` from a frame.
    #[must_use]
    pub fn events(&self) -> &Receiver<SpeechEvent> {
        &self.events
    }
}

/// Sends the synthesiser's pending warnings; false once nobody listens.
fn warn(synth: &mut dyn SpeechSynth, outbox: &Sender<SpeechEvent>) -> bool {
    synth
        .take_warnings()
        .into_iter()
        .all(|error| outbox.send(SpeechEvent::Warning { error }).is_ok())
}

impl Drop for SpeechStream {
    /// Stops the thread and waits for it: queued sentences are dropped, and open
    /// [`LineWriter`]s (a reply still streaming when the game quits) do not keep it alive.
    fn drop(&mut self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(commands) = self.commands.take() {
            let _ = commands.send(StreamCommand::Stop);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_streamed_text_into_sentences() {
        let mut s = SentenceSplitter::default();
        assert!(s.push("Welcome, trav").is_empty());
        assert!(s.push("eler. I forge").len() == 1);
        assert_eq!(
            s.push(" blades... and axes! Need one?\nYes"),
            vec!["I forge blades...", "and axes!", "Need one?"]
        );
        assert_eq!(s.push(" 3.5 coins"), Vec::<String>::new());
        assert_eq!(s.finish().as_deref(), Some("Yes 3.5 coins"));
        assert_eq!(s.finish(), None);
        assert!(SentenceSplitter::default().push(" . ! \n").is_empty());
    }

    /// A synthesiser that takes its time, to have sentences queued when the stream drops.
    struct Slow;

    impl SpeechSynth for Slow {
        fn synthesize(&mut self, text: &str, _: &VoiceSettings) -> Result<Pcm, SynthError> {
            std::thread::sleep(Duration::from_millis(200));
            Ok(Pcm {
                sample_rate: 16_000,
                samples: vec![0.0; text.len()],
            })
        }
    }

    #[test]
    fn dropping_the_stream_with_a_line_open_and_sentences_queued_returns() {
        // Found by the plugin's voice test: an unfinished line's writer held the channel open,
        // and the stream's drop waited for it for ever (a game quitting mid-reply hung).
        let stream = SpeechStream::start(Box::new(Slow));
        let mut open = stream.begin_line(1, VoiceSettings::default()).unwrap();
        open.push("One. Two. Three. Four. Five. Six. Seven. Eight. Nine. Ten. ");
        let started = Instant::now();
        drop(stream);
        // At most the sentence in progress is finished; the rest are dropped.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        open.push("Still writing. ");
        open.finish();
    }

    #[test]
    fn voice_settings_are_checked() {
        assert!(VoiceSettings::default().validate().is_ok());
        let bad = VoiceSettings {
            voice: "--help".into(),
            ..VoiceSettings::default()
        };
        assert!(bad.validate().is_err());
        let bad = VoiceSettings {
            voice: "en; rm".into(),
            ..VoiceSettings::default()
        };
        assert!(bad.validate().is_err());
        assert!(
            VoiceSettings {
                pitch: 100,
                ..VoiceSettings::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            VoiceSettings {
                rate: 10,
                ..VoiceSettings::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn espeak_speaks_to_pcm_and_streams_sentences_in_order() {
        let mut synth = EspeakSynth::default();
        let pcm = synth
            .synthesize("Hello there, traveller.", &VoiceSettings::default())
            .expect("espeak-ng (cargo xtask setup installs it)");
        assert_eq!(pcm.sample_rate, 22050);
        assert!(
            pcm.seconds() > 0.5 && pcm.seconds() < 5.0,
            "{} s",
            pcm.seconds()
        );
        assert!(pcm.rms() > 0.01);

        let slow = VoiceSettings {
            rate: 100,
            ..VoiceSettings::default()
        };
        let slower = synth.synthesize("Hello there, traveller.", &slow).unwrap();
        assert!(
            slower.seconds() > pcm.seconds() * 1.3,
            "{} vs {}",
            slower.seconds(),
            pcm.seconds()
        );

        let stream = SpeechStream::start(Box::new(EspeakSynth::default()));
        let mut line = stream.begin_line(9, VoiceSettings::default()).unwrap();
        line.push("First sentence here. Sec");
        let first = stream
            .events()
            .recv_timeout(Duration::from_secs(30))
            .unwrap();
        assert!(
            matches!(&first, SpeechEvent::Audio { line: 9, seq: 0, text, .. } if text == "First sentence here."),
            "{first:?}"
        );
        line.push("ond one!");
        line.finish();
        let second = stream
            .events()
            .recv_timeout(Duration::from_secs(30))
            .unwrap();
        assert!(
            matches!(&second, SpeechEvent::Audio { seq: 1, text, .. } if text == "Second one!"),
            "{second:?}"
        );
        let done = stream
            .events()
            .recv_timeout(Duration::from_secs(30))
            .unwrap();
        assert!(
            matches!(
                done,
                SpeechEvent::LineDone {
                    line: 9,
                    sentences: 2
                }
            ),
            "{done:?}"
        );
    }
}
