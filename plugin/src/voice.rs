//! Voice (feature `voice`): NPCs speak their replies aloud, sentence by sentence, and the
//! player talks to an NPC by holding a key.
//!
//! - Speech out: each [`NpcReplyDelta`] feeds a per-NPC line; every complete sentence is
//!   synthesised on the speech thread while the model writes the rest, then played through
//!   rodio. The persona's `voice:` field picks the engine: a Piper neural voice
//!   (`engine: Piper, model: "voices/….onnx"`, relative to the asset folder, loaded when an
//!   NPC with that persona appears) or espeak-ng, which is also what a Piper voice falls back
//!   to (with one [`VoiceProblem`]) where the voice or ONNX Runtime is missing. Without an audio
//!   device the audio goes to the [`SpeechBuffer`] resource instead, where tests and tools can
//!   inspect it; either way each clip is announced with [`NpcSpeechAudio`].
//! - Speech in: [`VoiceInput::submit`] (or push-to-talk: hold the key set with
//!   [`NpcVoicePlugin::with_push_to_talk`] while [`VoiceInput::target`] names the NPC being
//!   addressed) sends the utterance to the `npc-voice` helper process; its transcript
//!   becomes a [`PlayerSaid`]. No microphone, a dead helper, or a failed synthesis is reported
//!   as a [`VoiceProblem`]; text input keeps working.
//!
//! Nothing here blocks a frame: synthesis, recognition and capture run on their own threads.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bevy::input::ButtonInput;
use bevy::input::keyboard::KeyCode;
use bevy::platform::collections::HashMap;
use bevy::prelude::*;
use crossbeam_channel::Receiver;
use npc_native::voice::audio::Pcm;
use npc_native::voice::client::{UtteranceId, VoiceClient, VoiceConfig, VoiceEvent};
use npc_native::voice::piper::PiperSynth;
use npc_native::voice::protocol::SAMPLE_RATE;
use npc_native::voice::synth::{LineWriter, SpeechEvent, SpeechStream, VoiceSettings};

use crate::NpcAiSystems;
use crate::dialogue::{Npc, NpcReplied, NpcReplyCancelled, NpcReplyDelta, PlayerSaid};
use crate::persona::Persona;

/// Where synthesised speech goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpeechOutput {
    /// The default audio device through rodio; the [`SpeechBuffer`] when there is none.
    #[default]
    Device,
    /// Always the [`SpeechBuffer`] (headless games, tests).
    Buffer,
}

/// Adds voice to [`NpcAiPlugin`](crate::NpcAiPlugin) (add both).
#[derive(Clone, Debug)]
pub struct NpcVoicePlugin {
    output: SpeechOutput,
    whisper_model: PathBuf,
    helper: Option<PathBuf>,
    push_to_talk: Option<KeyCode>,
    onnx_runtime: Option<PathBuf>,
    synth_threads: usize,
}

impl Default for NpcVoicePlugin {
    fn default() -> Self {
        Self {
            output: SpeechOutput::Device,
            whisper_model: PathBuf::from("models/ggml-tiny.en.bin"),
            helper: None,
            push_to_talk: None,
            onnx_runtime: None,
            synth_threads: 1,
        }
    }
}

impl NpcVoicePlugin {
    /// Chooses where speech goes.
    #[must_use]
    pub fn with_output(mut self, output: SpeechOutput) -> Self {
        self.output = output;
        self
    }

    /// The whisper.cpp model for recognition (default `models/ggml-tiny.en.bin`, made by
    /// `cargo xtask setup`). A relative path is relative to the `AssetPlugin`'s folder, where
    /// [`NpcAiPlugin`](crate::NpcAiPlugin) finds the LLM; an absolute one is used as it is.
    #[must_use]
    pub fn with_whisper_model(mut self, path: impl Into<PathBuf>) -> Self {
        self.whisper_model = path.into();
        self
    }

    /// The `npc-voice` helper executable (default: found beside the game's executable, or
    /// `$NPC_VOICE_HELPER`).
    #[must_use]
    pub fn with_helper(mut self, path: impl Into<PathBuf>) -> Self {
        self.helper = Some(path.into());
        self
    }

    /// The ONNX Runtime library Piper voices run on (default: `$ORT_DYLIB_PATH`, else
    /// `libonnxruntime.so` / `onnxruntime.dll` / `libonnxruntime.dylib` beside the game's
    /// executable, else in the asset folder's `lib/`, where `cargo xtask setup` puts it).
    /// Without one, Piper voices are spoken by espeak-ng and a [`VoiceProblem`] says why.
    #[must_use]
    pub fn with_onnx_runtime(mut self, library: impl Into<PathBuf>) -> Self {
        self.onnx_runtime = Some(library.into());
        self
    }

    /// Threads for Piper inference (default 1: the language model has the others).
    #[must_use]
    pub fn with_synthesis_threads(mut self, threads: usize) -> Self {
        self.synth_threads = threads.max(1);
        self
    }

    /// Records from the default microphone while `key` is held (needs Bevy's input plugin).
    #[must_use]
    pub fn with_push_to_talk(mut self, key: KeyCode) -> Self {
        self.push_to_talk = Some(key);
        self
    }
}

/// A sentence of an NPC's reply, synthesised.
#[derive(Message, Clone, Debug)]
pub struct NpcSpeechAudio {
    /// The NPC speaking.
    pub npc: Entity,
    /// Sentence number within the reply, from 0.
    pub seq: u32,
    /// The sentence.
    pub text: String,
    /// Its length in seconds.
    pub seconds: f64,
}

/// Something in the voice pipeline went wrong; the game carries on (text still works).
#[derive(Message, Clone, Debug, PartialEq, Eq)]
pub struct VoiceProblem(pub String);

/// One synthesised sentence kept in the [`SpeechBuffer`].
#[derive(Clone, Debug)]
pub struct SpokenClip {
    /// The NPC.
    pub npc: Entity,
    /// The sentence.
    pub text: String,
    /// Its audio.
    pub pcm: Pcm,
}

/// Speech rendered without an audio device, oldest first.
#[derive(Resource, Default, Debug)]
pub struct SpeechBuffer {
    /// The clips.
    pub clips: Vec<SpokenClip>,
}

/// The game's handle on speech recognition.
#[derive(Resource)]
pub struct VoiceInput {
    client: VoiceClient,
    pending: HashMap<UtteranceId, Entity>,
    /// The NPC that push-to-talk addresses; set it when the player faces an NPC.
    pub target: Option<Entity>,
}

impl VoiceInput {
    /// Sends an utterance (any rate, mono) to be transcribed; its text will arrive as a
    /// [`PlayerSaid`] to `npc`. Returns at once.
    pub fn submit(&mut self, npc: Entity, pcm: &Pcm) -> UtteranceId {
        let id = self.client.transcribe(pcm.resampled(SAMPLE_RATE).samples);
        self.pending.insert(id, npc);
        id
    }
}

#[derive(Resource)]
struct Speech {
    stream: SpeechStream,
    lines: HashMap<Entity, LineWriter>,
    /// NPCs whose reply ended this frame: their line is finished once this frame's deltas
    /// (which observers see before readers) are in.
    ended: Vec<Entity>,
    line_npc: HashMap<u64, Entity>,
    next_line: u64,
    to_buffer: bool,
    /// Voices already sent to [`SpeechStream::prepare`].
    prepared: Vec<VoiceSettings>,
}

/// Playback through rodio; main-thread only on some platforms, hence a non-send resource.
struct DeviceOutput {
    sink: rodio::MixerDeviceSink,
    players: HashMap<Entity, rodio::Player>,
}

/// Push-to-talk capture on its own thread.
struct Microphone {
    key: KeyCode,
    recording: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    utterances: Receiver<Result<Pcm, String>>,
}

impl Drop for Microphone {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Plugin for NpcVoicePlugin {
    fn build(&self, app: &mut App) {
        let mut to_buffer = self.output == SpeechOutput::Buffer;
        if !to_buffer {
            match rodio::DeviceSinkBuilder::open_default_sink() {
                Ok(mut sink) => {
                    sink.log_on_drop(false);
                    app.insert_non_send(DeviceOutput {
                        sink,
                        players: HashMap::default(),
                    });
                }
                Err(err) => {
                    to_buffer = true;
                    warn!("no audio device ({err}); NPC speech goes to the SpeechBuffer");
                }
            }
        }
        let assets = crate::asset_folder(app);
        let mut synth = PiperSynth::new(&assets).with_threads(self.synth_threads);
        if let Some(library) = &self.onnx_runtime {
            synth = synth.with_onnx_runtime(library);
        }
        let mut config = VoiceConfig::new(assets.join(&self.whisper_model));
        if let Some(helper) = &self.helper {
            config = config.with_helper(helper);
        }
        app.add_message::<NpcSpeechAudio>()
            .add_message::<VoiceProblem>()
            .init_resource::<crate::NpcCostMeter>()
            .init_resource::<SpeechBuffer>()
            .insert_resource(Speech {
                stream: SpeechStream::start(Box::new(synth)),
                prepared: Vec::new(),
                lines: HashMap::default(),
                ended: Vec::new(),
                line_npc: HashMap::default(),
                next_line: 0,
                to_buffer,
            })
            .insert_resource(VoiceInput {
                client: VoiceClient::start(config),
                pending: HashMap::default(),
                target: None,
            })
            .add_systems(
                Update,
                (
                    (capture_push_to_talk, send_transcripts)
                        .chain()
                        .before(NpcAiSystems::SendRequests),
                    (prepare_voices, speak_reply_deltas, play_speech)
                        .chain()
                        .after(NpcAiSystems::ReceiveEvents),
                ),
            )
            .add_observer(finish_spoken_line)
            .add_observer(stop_cancelled_speech);
        if let Some(key) = self.push_to_talk {
            app.insert_non_send(open_microphone(key));
        }
    }
}

fn persona_voice(npc: Entity, npcs: &Query<&Npc>, personas: &Assets<Persona>) -> VoiceSettings {
    npcs.get(npc)
        .ok()
        .and_then(|n| personas.get(&n.persona))
        .and_then(|p| p.voice.clone())
        .unwrap_or_default()
}

/// Loads the voice of every NPC's persona on the speech thread before its first line (a Piper
/// model takes seconds to load), once per distinct voice: when an NPC appears or changes
/// persona, and when a persona (re)loads.
fn prepare_voices(
    mut speech: ResMut<Speech>,
    changed: Query<&Npc, Changed<Npc>>,
    all: Query<&Npc>,
    mut persona_events: MessageReader<AssetEvent<Persona>>,
    personas: Res<Assets<Persona>>,
) {
    let any_persona_event = persona_events.read().count() > 0;
    let npcs: Vec<&Npc> = if any_persona_event {
        all.iter().collect()
    } else {
        changed.iter().collect()
    };
    for npc in npcs {
        let Some(voice) = personas.get(&npc.persona).and_then(|p| p.voice.as_ref()) else {
            continue;
        };
        if !speech.prepared.contains(voice) {
            speech.prepared.push(voice.clone());
            speech.stream.prepare(voice.clone());
        }
    }
}

fn speak_reply_deltas(
    mut deltas: MessageReader<NpcReplyDelta>,
    mut speech: ResMut<Speech>,
    npcs: Query<&Npc>,
    personas: Res<Assets<Persona>>,
) {
    let speech = &mut *speech;
    for delta in deltas.read() {
        if !speech.lines.contains_key(&delta.npc) {
            let line = speech.next_line;
            speech.next_line += 1;
            let voice = persona_voice(delta.npc, &npcs, &personas);
            let Some(writer) = speech.stream.begin_line(line, voice) else {
                continue;
            };
            speech.line_npc.insert(line, delta.npc);
            speech.lines.insert(delta.npc, writer);
        }
        if let Some(writer) = speech.lines.get_mut(&delta.npc) {
            writer.push(&delta.text);
        }
    }
    for npc in std::mem::take(&mut speech.ended) {
        if let Some(writer) = speech.lines.remove(&npc) {
            writer.finish();
        }
    }
}

fn finish_spoken_line(replied: On<NpcReplied>, mut speech: ResMut<Speech>) {
    speech.ended.push(replied.entity);
}

fn stop_cancelled_speech(
    cancelled: On<NpcReplyCancelled>,
    mut speech: ResMut<Speech>,
    output: Option<NonSendMut<DeviceOutput>>,
) {
    speech.lines.remove(&cancelled.entity);
    if let Some(mut output) = output
        && let Some(player) = output.players.remove(&cancelled.entity)
    {
        player.stop();
    }
}

fn play_speech(
    mut speech: ResMut<Speech>,
    mut buffer: ResMut<SpeechBuffer>,
    mut meter: ResMut<crate::NpcCostMeter>,
    mut audio: MessageWriter<NpcSpeechAudio>,
    mut problems: MessageWriter<VoiceProblem>,
    output: Option<NonSendMut<DeviceOutput>>,
) {
    let mut output = output;
    let events: Vec<SpeechEvent> = speech.stream.events().try_iter().collect();
    for event in events {
        match event {
            SpeechEvent::Audio {
                line,
                seq,
                text,
                pcm,
                synth,
                ..
            } => {
                let Some(&npc) = speech.line_npc.get(&line) else {
                    continue;
                };
                meter.record_speech(
                    crate::bridge::npc_id(npc),
                    &npc_native::SpeechStats::new(&text, pcm.seconds(), synth),
                );
                audio.write(NpcSpeechAudio {
                    npc,
                    seq,
                    text: text.clone(),
                    seconds: pcm.seconds(),
                });
                match (&mut output, speech.to_buffer) {
                    (Some(device), false) => {
                        let (Some(channels), Some(rate)) = (
                            std::num::NonZero::new(1u16),
                            std::num::NonZero::new(pcm.sample_rate),
                        ) else {
                            continue;
                        };
                        let source = rodio::buffer::SamplesBuffer::new(channels, rate, pcm.samples);
                        let device = &mut **device;
                        let player = device
                            .players
                            .entry(npc)
                            .or_insert_with(|| rodio::Player::connect_new(device.sink.mixer()));
                        player.append(source);
                    }
                    _ => buffer.clips.push(SpokenClip { npc, text, pcm }),
                }
            }
            SpeechEvent::Failed { error, .. } | SpeechEvent::Warning { error } => {
                problems.write(VoiceProblem(error.to_string()));
            }
            SpeechEvent::LineDone { line, .. } => {
                speech.line_npc.remove(&line);
            }
        }
    }
}

fn open_microphone(key: KeyCode) -> Microphone {
    let recording = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, utterances) = crossbeam_channel::unbounded();
    let (rec, halt) = (Arc::clone(&recording), Arc::clone(&stop));
    let spawned = std::thread::Builder::new()
        .name("npc-voice-mic".into())
        .spawn(move || {
            let mic = rodio::microphone::MicrophoneBuilder::new()
                .default_device()
                .and_then(|b| b.default_config())
                .map_err(|e| e.to_string())
                .and_then(|b| b.open_stream().map_err(|e| e.to_string()));
            let mic = match mic {
                Ok(mic) => mic,
                Err(err) => {
                    let _ = tx.send(Err(format!("no microphone ({err}); type instead")));
                    return;
                }
            };
            use rodio::Source as _;
            let (channels, rate) = (usize::from(mic.channels().get()), mic.sample_rate().get());
            let mut frames: Vec<f32> = Vec::new();
            for sample in mic {
                if halt.load(Ordering::Relaxed) {
                    return;
                }
                if rec.load(Ordering::Relaxed) {
                    frames.push(sample);
                } else if !frames.is_empty() {
                    let samples = frames
                        .chunks(channels)
                        .map(|f| f.iter().sum::<f32>() / f.len() as f32)
                        .collect();
                    frames.clear();
                    if tx
                        .send(Ok(Pcm {
                            sample_rate: rate,
                            samples,
                        }))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
    if let Err(err) = spawned {
        warn!("cannot start the microphone thread: {err}");
    }
    Microphone {
        key,
        recording,
        stop,
        utterances,
    }
}

fn capture_push_to_talk(
    microphone: Option<NonSendMut<Microphone>>,
    keys: Option<Res<ButtonInput<KeyCode>>>,
    mut input: ResMut<VoiceInput>,
    mut problems: MessageWriter<VoiceProblem>,
    mut reported: Local<bool>,
) {
    let Some(microphone) = microphone else { return };
    if let Some(keys) = keys {
        microphone
            .recording
            .store(keys.pressed(microphone.key), Ordering::Relaxed);
    }
    for utterance in microphone.utterances.try_iter() {
        match utterance {
            Ok(pcm) => {
                if let Some(npc) = input.target {
                    input.submit(npc, &pcm);
                }
            }
            Err(message) if !*reported => {
                *reported = true;
                problems.write(VoiceProblem(message));
            }
            Err(_) => {}
        }
    }
}

fn send_transcripts(
    mut input: ResMut<VoiceInput>,
    mut said: MessageWriter<PlayerSaid>,
    mut problems: MessageWriter<VoiceProblem>,
) {
    let events: Vec<VoiceEvent> = input.client.events().try_iter().collect();
    for event in events {
        match event {
            VoiceEvent::Transcript { id, text, .. } => {
                if let Some(npc) = input.pending.remove(&id)
                    && !text.trim().is_empty()
                {
                    said.write(PlayerSaid {
                        npc,
                        text: text.trim().to_owned(),
                    });
                }
            }
            VoiceEvent::Failed { id, error } => {
                input.pending.remove(&id);
                problems.write(VoiceProblem(error.to_string()));
            }
            VoiceEvent::HelperExited { reason, restarting } => {
                let then = if restarting {
                    "restarting it"
                } else {
                    "not restarting it"
                };
                problems.write(VoiceProblem(format!(
                    "the voice helper exited ({reason}); {then}"
                )));
            }
            VoiceEvent::HelperStarted { .. } | VoiceEvent::Ready { .. } => {}
        }
    }
}
