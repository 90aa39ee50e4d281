//! Speech synthesis: the [`SpeechSynth`] trait, its espeak-ng backend, per-persona
//! [`VoiceSettings`], and sentence-by-sentence streaming ([`SentenceSplitter`],
//! [`SpeechStream`]) so an NPC starts speaking its first sentence while the model is still
//! writing the rest.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::audio::Pcm;

/// How a persona sounds. In a persona file: `voice: Some((voice: "en-us", pitch: 30, rate: 150))`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoiceSettings {
    /// Synthesiser voice name (espeak-ng: `espeak-ng --voices` lists them, e.g. `en`,
    /// `en-us`, `en-gb-scotland`, with variants as `en+m3`).
    #[serde(default = "default_voice")]
    pub voice: String,
    /// Pitch, 0 to 99 (espeak-ng's default is 50).
    #[serde(default = "default_pitch")]
    pub pitch: u8,
    /// Speaking rate in words per minute, 80 to 450 (espeak-ng's default is 175).
    #[serde(default = "default_rate")]
    pub rate: u16,
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
            voice: default_voice(),
            pitch: default_pitch(),
            rate: default_rate(),
        }
    }
}

impl VoiceSettings {
    /// Checks ranges and the voice name (letters, digits, `-`, `+`, `_`, not starting with
    /// `-`: it becomes a command-line argument).
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
        Ok(())
    }
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
}

/// Turns text into audio. Implementations run on the [`SpeechStream`] thread, never on the
/// game's frame.
pub trait SpeechSynth: Send {
    /// Synthesises `text` with `voice`.
    fn synthesize(&mut self, text: &str, voice: &VoiceSettings) -> Result<Pcm, SynthError>;
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
        let unavailable = |e: std::io::Error| SynthError::Unavailable {
            program: self.program.display().to_string(),
            message: e.to_string(),
        };
        let mut child = Command::new(&self.program)
            .args([
                "--stdout",
                "-b",
                "1",
                "-v",
                &voice.voice,
                "-p",
                &voice.pitch.to_string(),
                "-s",
                &voice.rate.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(unavailable)?;
        // Text without line breaks: espeak-ng reads stdin line by line and pauses at each.
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
        if !output.status.success() || output.stdout.is_empty() {
            return Err(SynthError::Failed(format!(
                "espeak-ng exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Pcm::from_wav(&output.stdout).map_err(SynthError::Failed)
    }
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
        let thread = std::thread::Builder::new()
            .name("npc-speech".into())
            .spawn(move || {
                for command in inbox {
                    let event = match command {
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
                    };
                    if outbox.send(event).is_err() {
                        break;
                    }
                }
            })
            .ok();
        Self {
            commands: Some(commands),
            events,
            thread,
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

impl Drop for SpeechStream {
    fn drop(&mut self) {
        self.commands = None;
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
