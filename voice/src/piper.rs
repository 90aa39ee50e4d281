//! Piper (VITS) neural voices (feature `piper`): [`PiperSynth`], a [`SpeechSynth`] that speaks
//! with a Piper voice model through ONNX Runtime, and falls back to espeak-ng (with one
//! warning per cause) when the runtime library or the voice is not there.
//!
//! The pipeline for one sentence:
//! 1. **Phonemes**: the `espeak-ng` *program* turns the text into IPA (`-q --ipa`), so no GPL
//!    code is linked into the game. espeak-ng prints one line per clause and drops the
//!    punctuation that Piper uses for prosody, so each clause's closing mark (`,` `.` `?` …)
//!    is put back from the text ([`phonemize`]).
//! 2. **Ids**: every IPA code point becomes its ids from the voice's `phoneme_id_map`, as Piper
//!    does: `^`, then each phoneme followed by the pad `_`, then `$` ([`PiperVoice::phoneme_ids`]).
//! 3. **Audio**: the VITS model (`input`, `input_lengths`, `scales` = noise, length, noise
//!    width, and `sid` for multi-speaker voices) runs on ONNX Runtime, loaded at run time from
//!    its shared library (`ort`'s `load-dynamic`: nothing is downloaded or linked at build
//!    time); the audio is peak-normalised as Piper does.
//!
//! A voice is a `.onnx` model with its `.onnx.json` config beside it (Piper's layout). Models
//! load once, on the speech thread (never on the game's frame), when first used or when
//! [`SpeechSynth::prepare`] names them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use serde::Deserialize;

use crate::audio::Pcm;
use crate::synth::{EspeakSynth, SpeechSynth, SynthError, VoiceEngine, VoiceSettings, run_espeak};

/// The longest text one [`PiperSynth::synthesize`] call speaks, in characters; longer text is
/// refused with [`SynthError::TooLong`] (an NPC's sentence is far shorter; this bounds the
/// time and memory a runaway line can take).
pub const MAX_TEXT_CHARS: usize = 2_000;

/// Text is phonemised and synthesised in pieces of at most this many characters (cut at a
/// clause or word boundary), whose audio is joined: VITS's memory grows with its input.
const PIECE_CHARS: usize = 300;

/// The ONNX Runtime shared library's file names, most specific first.
#[cfg(target_os = "windows")]
const LIBRARY_NAMES: &[&str] = &["onnxruntime.dll"];
#[cfg(target_os = "macos")]
const LIBRARY_NAMES: &[&str] = &["libonnxruntime.dylib", "libonnxruntime.1.31.1.dylib"];
#[cfg(not(any(target_os = "windows", target_os = "macos")))]
const LIBRARY_NAMES: &[&str] = &["libonnxruntime.so", "libonnxruntime.so.1.31.1"];

/// ONNX Runtime's one environment in this process: ONNX Runtime allows a single one, ever
/// (even after it is dropped), so it is kept for the life of the process.
static RUNTIME: std::sync::Mutex<Option<(Environment, PathBuf)>> = std::sync::Mutex::new(None);

/// ONNX Runtime, loaded from its shared library. The library is loaded once per process: a
/// later [`OnnxRuntime::load`] returns the same runtime, whatever path it names.
#[derive(Clone)]
pub struct OnnxRuntime {
    env: Environment,
    library: PathBuf,
}

impl std::fmt::Debug for OnnxRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxRuntime")
            .field("library", &self.library)
            .finish_non_exhaustive()
    }
}

impl OnnxRuntime {
    /// Loads the ONNX Runtime library at `library` (1.31 or later).
    ///
    /// # Errors
    /// [`SynthError::Runtime`]: the file is missing, is not a loadable library, or is an
    /// older ONNX Runtime.
    pub fn load(library: &Path) -> Result<Self, SynthError> {
        let failed = |message: String| SynthError::Runtime {
            library: library.display().to_string(),
            message,
        };
        let mut loaded = RUNTIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((env, library)) = loaded.as_ref() {
            return Ok(Self {
                env: env.clone(),
                library: library.clone(),
            });
        }
        // ort resolves a relative path against the executable's folder; check the file
        // ourselves so a missing library is a plain "not found".
        if !library.is_file() {
            return Err(failed("no such file".into()));
        }
        let env = ort::init_from(library)
            .map_err(|e| failed(e.to_string()))?
            .with_name("npc_voice")
            .with_telemetry(false)
            .build()
            .map_err(|e| failed(e.to_string()))?;
        *loaded = Some((env.clone(), library.to_path_buf()));
        Ok(Self {
            env,
            library: library.to_path_buf(),
        })
    }

    /// The library's path.
    #[must_use]
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Where ONNX Runtime is looked for, in order: `$ORT_DYLIB_PATH` (`ort`'s own variable),
    /// beside the running executable, then each of `dirs` and its `lib/` folder. Returns the
    /// first file that exists.
    #[must_use]
    pub fn find(dirs: &[&Path]) -> Option<PathBuf> {
        let mut candidates = Vec::new();
        if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
            candidates.push(PathBuf::from(path));
        }
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf));
        for dir in exe_dir
            .iter()
            .map(PathBuf::as_path)
            .chain(dirs.iter().copied())
        {
            for sub in [dir.to_path_buf(), dir.join("lib")] {
                candidates.extend(LIBRARY_NAMES.iter().map(|name| sub.join(name)));
            }
        }
        candidates.into_iter().find(|path| path.is_file())
    }
}

/// A voice's `.onnx.json`: what synthesis needs of it.
#[derive(Debug, Clone, Deserialize)]
struct VoiceFile {
    audio: AudioSection,
    #[serde(default)]
    espeak: Option<EspeakSection>,
    #[serde(default)]
    inference: Option<Scales>,
    #[serde(default)]
    phoneme_type: Option<String>,
    num_symbols: usize,
    #[serde(default)]
    num_speakers: Option<u32>,
    phoneme_id_map: HashMap<String, Vec<i64>>,
}

#[derive(Debug, Clone, Deserialize)]
struct AudioSection {
    sample_rate: u32,
}

#[derive(Debug, Clone, Deserialize)]
struct EspeakSection {
    voice: String,
}

/// VITS's three sampling scales.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub struct Scales {
    /// Noise added to the phoneme durations' prior (variation in intonation).
    pub noise_scale: f32,
    /// Speaking pace: above 1 slower, below 1 faster.
    pub length_scale: f32,
    /// Noise in the duration predictor (variation in rhythm).
    pub noise_w: f32,
}

impl Default for Scales {
    /// Piper's defaults.
    fn default() -> Self {
        Self {
            noise_scale: 0.667,
            length_scale: 1.0,
            noise_w: 0.8,
        }
    }
}

/// One Piper voice: its ONNX session and its config.
pub struct PiperVoice {
    session: Session,
    model: PathBuf,
    sample_rate: u32,
    espeak_voice: String,
    scales: Scales,
    speakers: u32,
    ids: HashMap<char, Vec<i64>>,
    takes_speaker: bool,
}

impl std::fmt::Debug for PiperVoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PiperVoice")
            .field("model", &self.model)
            .field("sample_rate", &self.sample_rate)
            .field("espeak_voice", &self.espeak_voice)
            .field("speakers", &self.speakers)
            .finish_non_exhaustive()
    }
}

/// Phoneme ids of a text, and the phonemes the voice does not know (skipped, as Piper does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhonemeIds {
    /// `^ _ p _ p _ … $`.
    pub ids: Vec<i64>,
    /// Code points of the phoneme string missing from the voice's map.
    pub unknown: Vec<char>,
}

impl PiperVoice {
    /// Loads the voice `model` (`….onnx`, with `….onnx.json` beside it) on `runtime`, running
    /// inference on `threads` threads.
    ///
    /// # Errors
    /// [`SynthError::Voice`] naming the file: missing, not valid JSON (with its line), a
    /// config that makes no sense (no pad/start/end symbols, ids beyond `num_symbols`, a
    /// phoneme type other than espeak), or a model ONNX Runtime cannot load or whose inputs
    /// are not a Piper voice's.
    pub fn load(runtime: &OnnxRuntime, model: &Path, threads: usize) -> Result<Self, SynthError> {
        let config_path = PathBuf::from(format!("{}.json", model.display()));
        let bad = |path: &Path, message: String| SynthError::Voice {
            path: path.display().to_string(),
            message,
        };
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| bad(&config_path, e.to_string()))?;
        let file: VoiceFile = serde_json::from_str(&text)
            .map_err(|e| bad(&config_path, format!("line {}: {e}", e.line())))?;
        if let Some(kind) = file.phoneme_type.as_deref().filter(|k| *k != "espeak") {
            return Err(bad(
                &config_path,
                format!("phoneme_type {kind:?} is not supported (only espeak)"),
            ));
        }
        let mut ids = HashMap::new();
        for (symbol, symbol_ids) in &file.phoneme_id_map {
            let mut chars = symbol.chars();
            let (Some(c), None) = (chars.next(), chars.next()) else {
                continue;
            };
            if symbol_ids.is_empty()
                || symbol_ids
                    .iter()
                    .any(|&id| id < 0 || id as usize >= file.num_symbols)
            {
                return Err(bad(
                    &config_path,
                    format!(
                        "phoneme_id_map[{symbol:?}] = {symbol_ids:?} is outside 0..{}",
                        file.num_symbols
                    ),
                ));
            }
            ids.insert(c, symbol_ids.clone());
        }
        for special in ['_', '^', '$'] {
            if !ids.contains_key(&special) {
                return Err(bad(
                    &config_path,
                    format!("phoneme_id_map has no {special:?} (pad, start and end symbols)"),
                ));
            }
        }
        if !(8_000..=96_000).contains(&file.audio.sample_rate) {
            return Err(bad(
                &config_path,
                format!(
                    "audio.sample_rate {} is not a speech rate",
                    file.audio.sample_rate
                ),
            ));
        }
        if !model.is_file() {
            return Err(bad(model, "no such file".into()));
        }
        let options =
            |e: ort::Error<ort::session::builder::SessionBuilder>| bad(model, e.to_string());
        let session = Session::builder(&runtime.env)
            .map_err(|e| bad(model, e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(options)?
            .with_intra_threads(threads.max(1))
            .map_err(options)?
            .with_inter_threads(1)
            .map_err(options)?
            .commit_from_file(model)
            .map_err(|e| bad(model, format!("ONNX Runtime cannot load it: {e}")))?;
        let inputs: Vec<&str> = session
            .inputs()
            .iter()
            .map(ort::value::Outlet::name)
            .collect();
        if !["input", "input_lengths", "scales"]
            .iter()
            .all(|name| inputs.contains(name))
            || session.outputs().is_empty()
        {
            return Err(bad(
                model,
                format!("not a Piper voice: its inputs are {inputs:?}"),
            ));
        }
        let takes_speaker = inputs.contains(&"sid");
        Ok(Self {
            model: model.to_path_buf(),
            sample_rate: file.audio.sample_rate,
            espeak_voice: file.espeak.map_or_else(|| "en-us".to_owned(), |e| e.voice),
            scales: file.inference.unwrap_or_default(),
            speakers: file.num_speakers.unwrap_or(1).max(1),
            ids,
            takes_speaker,
            session,
        })
    }

    /// The voice's sample rate.
    #[must_use]
    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Speakers in the voice (1 for single-speaker voices).
    #[must_use]
    pub fn speakers(&self) -> u32 {
        self.speakers
    }

    /// The espeak-ng voice its phonemes come from (the config's `espeak.voice`).
    #[must_use]
    pub fn espeak_voice(&self) -> &str {
        &self.espeak_voice
    }

    /// The model file.
    #[must_use]
    pub fn model(&self) -> &Path {
        &self.model
    }

    /// The ids of a phoneme string, Piper's way.
    #[must_use]
    pub fn phoneme_ids(&self, phonemes: &str) -> PhonemeIds {
        let pad = &self.ids[&'_'];
        let mut ids = self.ids[&'^'].clone();
        ids.extend(pad);
        let mut unknown = Vec::new();
        for c in phonemes.chars() {
            match self.ids.get(&c) {
                Some(found) => {
                    ids.extend(found);
                    ids.extend(pad);
                }
                None if !unknown.contains(&c) => unknown.push(c),
                None => {}
            }
        }
        ids.extend(&self.ids[&'$']);
        PhonemeIds { ids, unknown }
    }

    /// Runs the model on phoneme `ids` (from [`PiperVoice::phoneme_ids`]).
    ///
    /// # Errors
    /// [`SynthError::Settings`] for a speaker the voice does not have or out-of-range scales,
    /// [`SynthError::Failed`] when ONNX Runtime fails.
    pub fn infer(
        &mut self,
        ids: Vec<i64>,
        speaker: u32,
        scales: Scales,
    ) -> Result<Pcm, SynthError> {
        if speaker >= self.speakers {
            return Err(SynthError::Settings(format!(
                "speaker {speaker} is not in {} ({} speaker{})",
                self.model.display(),
                self.speakers,
                if self.speakers == 1 { "" } else { "s" }
            )));
        }
        let failed = |e: ort::Error| SynthError::Failed(format!("Piper inference: {e}"));
        let length = ids.len();
        let input = Tensor::from_array(([1, length], ids)).map_err(failed)?;
        let lengths = Tensor::from_array(([1], vec![length as i64])).map_err(failed)?;
        let scales = Tensor::from_array((
            [3],
            vec![scales.noise_scale, scales.length_scale, scales.noise_w],
        ))
        .map_err(failed)?;
        let outputs = if self.takes_speaker {
            let sid = Tensor::from_array(([1], vec![i64::from(speaker)])).map_err(failed)?;
            self.session.run(ort::inputs![
                "input" => input,
                "input_lengths" => lengths,
                "scales" => scales,
                "sid" => sid,
            ])
        } else {
            self.session.run(ort::inputs![
                "input" => input,
                "input_lengths" => lengths,
                "scales" => scales,
            ])
        }
        .map_err(failed)?;
        let Some(output) = outputs.values().next() else {
            return Err(SynthError::Failed("the voice produced no output".into()));
        };
        let (_, audio) = output.try_extract_tensor::<f32>().map_err(failed)?;
        let peak = audio.iter().fold(0.0f32, |m, s| m.max(s.abs())).max(0.01);
        let gain = 0.95 / peak;
        Ok(Pcm {
            sample_rate: self.sample_rate,
            samples: audio.iter().map(|s| (s * gain).clamp(-1.0, 1.0)).collect(),
        })
    }
}

/// IPA phonemes of `text` in Piper's form, from the `espeak` program with `voice`: each
/// clause's phonemes followed by the punctuation mark that closed it in the text.
///
/// # Errors
/// [`SynthError::Unavailable`] if the program cannot run, [`SynthError::Failed`] if it fails.
pub fn phonemize(espeak: &Path, text: &str, voice: &str) -> Result<String, SynthError> {
    VoiceSettings {
        voice: voice.to_owned(),
        ..VoiceSettings::default()
    }
    .validate()?;
    let stdout = run_espeak(espeak, &["-q", "--ipa", "-v", voice], text)?;
    let lines: Vec<String> = String::from_utf8_lossy(&stdout)
        .lines()
        .map(strip_language_flags)
        .filter(|l| !l.is_empty())
        .collect();
    Ok(join_clauses(&lines, &clause_marks(text)))
}

/// The punctuation closing each clause of `text`, as espeak-ng cuts clauses: at `, . ; : ! ?`
/// (and `…`) followed by a space or the end. A clause without words is not a clause.
fn clause_marks(text: &str) -> Vec<Option<char>> {
    let mut marks = Vec::new();
    let mut words = false;
    let chars: Vec<char> = text.chars().collect();
    for (at, &c) in chars.iter().enumerate() {
        if c.is_alphanumeric() {
            words = true;
        }
        let closes = matches!(c, ',' | '.' | ';' | ':' | '!' | '?' | '…')
            && chars.get(at + 1).is_none_or(|n| n.is_whitespace());
        if closes && words {
            // "..." and "?!" end one clause, with the mark before the space.
            marks.push(Some(if c == '…' { '.' } else { c }));
            words = false;
        }
    }
    if words {
        marks.push(None);
    }
    marks
}

/// espeak-ng's clause lines with their closing marks; if espeak-ng cut the clauses
/// differently, the lines are joined with spaces and only the text's last mark is kept.
fn join_clauses(lines: &[String], marks: &[Option<char>]) -> String {
    let mut out = String::new();
    if lines.len() == marks.len() {
        for (line, mark) in lines.iter().zip(marks) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(line);
            if let Some(mark) = mark {
                out.push(*mark);
            }
        }
    } else {
        out = lines.join(" ");
        if let Some(Some(mark)) = marks.last() {
            out.push(*mark);
        }
    }
    out
}

/// Removes espeak-ng's language-switch flags such as `(fr)` from a phoneme line.
fn strip_language_flags(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line.trim();
    while let Some(open) = rest.find('(') {
        let Some(close) = rest[open..].find(')') else {
            break;
        };
        let flag = &rest[open + 1..open + close];
        out.push_str(&rest[..open]);
        if !(flag.len() <= 8 && flag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')) {
            out.push_str(&rest[open..=open + close]);
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out.trim().to_owned()
}

/// Cuts `text` into pieces of at most [`PIECE_CHARS`] characters, at the last clause mark or
/// space that fits (or anywhere, for a single enormous word).
fn pieces(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest: Vec<char> = text.trim().chars().collect();
    while rest.len() > PIECE_CHARS {
        let window = &rest[..PIECE_CHARS];
        let cut = window
            .iter()
            .rposition(|c| matches!(c, ',' | '.' | ';' | ':' | '!' | '?'))
            .map(|at| at + 1)
            .or_else(|| window.iter().rposition(|c| c.is_whitespace()))
            .filter(|&at| at > 0)
            .unwrap_or(PIECE_CHARS);
        out.push(rest[..cut].iter().collect::<String>().trim().to_owned());
        rest.drain(..cut);
    }
    let last: String = rest.into_iter().collect();
    if !last.trim().is_empty() {
        out.push(last.trim().to_owned());
    }
    out.retain(|p| !p.is_empty());
    out
}

/// A [`SpeechSynth`] that speaks [`VoiceEngine::Piper`] settings with Piper voices and
/// [`VoiceEngine::Espeak`] settings with espeak-ng. When ONNX Runtime or a voice cannot be
/// loaded, the sentence is spoken by espeak-ng instead and the reason is reported once
/// through [`SpeechSynth::take_warnings`] — never a crash, never silence without a reason.
pub struct PiperSynth {
    espeak: EspeakSynth,
    espeak_program: PathBuf,
    voice_root: PathBuf,
    library: Option<PathBuf>,
    runtime: Option<Result<OnnxRuntime, SynthError>>,
    voices: HashMap<PathBuf, Result<PiperVoice, SynthError>>,
    threads: usize,
    warnings: Vec<SynthError>,
    warned: HashSet<String>,
}

impl std::fmt::Debug for PiperSynth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PiperSynth")
            .field("voice_root", &self.voice_root)
            .field("library", &self.library)
            .field("voices", &self.voices.keys().collect::<Vec<_>>())
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl PiperSynth {
    /// A synthesiser whose voices' relative `model` paths are relative to `voice_root` (a
    /// game's asset folder). ONNX Runtime is looked for with [`OnnxRuntime::find`] in
    /// `voice_root` unless [`PiperSynth::with_onnx_runtime`] names it. Inference runs on one
    /// thread (the language model has the others).
    #[must_use]
    pub fn new(voice_root: impl Into<PathBuf>) -> Self {
        Self {
            espeak: EspeakSynth::default(),
            espeak_program: "espeak-ng".into(),
            voice_root: voice_root.into(),
            library: None,
            runtime: None,
            voices: HashMap::new(),
            threads: 1,
            warnings: Vec::new(),
            warned: HashSet::new(),
        }
    }

    /// Uses the ONNX Runtime library at `library`.
    #[must_use]
    pub fn with_onnx_runtime(mut self, library: impl Into<PathBuf>) -> Self {
        self.library = Some(library.into());
        self
    }

    /// Runs inference on `threads` threads (at least 1).
    #[must_use]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Uses `program` instead of `espeak-ng` from `PATH` for phonemes and the fallback voice.
    #[must_use]
    pub fn with_espeak(mut self, program: impl Into<PathBuf>) -> Self {
        self.espeak_program = program.into();
        self.espeak = EspeakSynth::with_program(self.espeak_program.clone());
        self
    }

    /// The model path `settings` names, resolved against the voice root.
    #[must_use]
    pub fn model_path(&self, settings: &VoiceSettings) -> Option<PathBuf> {
        settings.model.as_deref().map(|m| self.voice_root.join(m))
    }

    /// The loaded voice for `settings`, loading ONNX Runtime and the voice on first use.
    ///
    /// # Errors
    /// Why it cannot be loaded (the same error on every later call, without retrying).
    pub fn voice(&mut self, settings: &VoiceSettings) -> Result<&mut PiperVoice, SynthError> {
        let Some(model) = self.model_path(settings) else {
            return Err(SynthError::Settings(
                "a Piper voice needs `model`, the path of its .onnx file".into(),
            ));
        };
        let (library, root) = (self.library.clone(), self.voice_root.clone());
        let runtime = match self
            .runtime
            .get_or_insert_with(|| load_runtime(library, &root))
        {
            Ok(runtime) => runtime,
            Err(error) => return Err(error.clone()),
        };
        let threads = self.threads;
        self.voices
            .entry(model.clone())
            .or_insert_with(|| PiperVoice::load(runtime, &model, threads))
            .as_mut()
            .map_err(|e| e.clone())
    }

    /// Speaks `text` with the Piper voice of `settings`.
    fn piper(&mut self, text: &str, settings: &VoiceSettings) -> Result<Pcm, PiperFailure> {
        let chars = text.chars().count();
        if chars > MAX_TEXT_CHARS {
            return Err(PiperFailure::Sentence(SynthError::TooLong {
                chars,
                max: MAX_TEXT_CHARS,
            }));
        }
        let scales = {
            let voice = self.voice(settings).map_err(PiperFailure::Voice)?;
            Scales {
                noise_scale: settings.noise_scale.unwrap_or(voice.scales.noise_scale),
                length_scale: settings.length_scale.unwrap_or(voice.scales.length_scale),
                noise_w: settings.noise_w.unwrap_or(voice.scales.noise_w),
            }
        };
        let espeak = self.espeak_program.clone();
        let mut audio = Pcm {
            sample_rate: 0,
            samples: Vec::new(),
        };
        let mut unknown = Vec::new();
        for piece in pieces(text) {
            let voice = self.voice(settings).map_err(PiperFailure::Voice)?;
            let phonemes =
                phonemize(&espeak, &piece, &voice.espeak_voice).map_err(PiperFailure::Sentence)?;
            let ids = voice.phoneme_ids(&phonemes);
            for c in ids.unknown {
                if !unknown.contains(&c) {
                    unknown.push(c);
                }
            }
            // `^ _` and `$` alone: nothing the voice can say.
            if ids.ids.len() <= 3 {
                continue;
            }
            let pcm = voice
                .infer(ids.ids, settings.speaker.unwrap_or(0), scales)
                .map_err(PiperFailure::Sentence)?;
            audio.sample_rate = pcm.sample_rate;
            audio.samples.extend(pcm.samples);
        }
        if !unknown.is_empty() {
            self.warn(SynthError::UnknownPhonemes {
                model: self
                    .model_path(settings)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                phonemes: unknown.into_iter().collect(),
            });
        }
        if audio.samples.is_empty() {
            return Err(PiperFailure::Sentence(SynthError::NothingToSay(
                text.chars().take(80).collect(),
            )));
        }
        Ok(audio)
    }

    /// Reports `warning` unless the same one was reported before.
    fn warn(&mut self, warning: SynthError) {
        if self.warned.insert(warning.to_string()) {
            self.warnings.push(warning);
        }
    }
}

/// ONNX Runtime from `library`, else from where [`OnnxRuntime::find`] looks (with `root`).
fn load_runtime(library: Option<PathBuf>, root: &Path) -> Result<OnnxRuntime, SynthError> {
    match library.or_else(|| OnnxRuntime::find(&[root])) {
        Some(library) => OnnxRuntime::load(&library),
        None => Err(SynthError::Runtime {
            library: LIBRARY_NAMES[0].to_owned(),
            message: format!(
                "not found beside the executable, in {} or in $ORT_DYLIB_PATH \
                 (`cargo xtask setup` fetches it)",
                root.display()
            ),
        }),
    }
}

/// Why a Piper sentence was not spoken: the voice itself (fall back to espeak-ng) or this
/// sentence (report it; the voice is fine).
enum PiperFailure {
    Voice(SynthError),
    Sentence(SynthError),
}

impl SpeechSynth for PiperSynth {
    fn synthesize(&mut self, text: &str, voice: &VoiceSettings) -> Result<Pcm, SynthError> {
        voice.validate()?;
        if voice.engine == VoiceEngine::Espeak {
            return self.espeak.synthesize(text, voice);
        }
        match self.piper(text, voice) {
            Ok(pcm) => Ok(pcm),
            Err(PiperFailure::Sentence(error)) => Err(error),
            Err(PiperFailure::Voice(error)) => {
                self.warn(SynthError::FellBack(Box::new(error)));
                self.espeak.synthesize(text, voice)
            }
        }
    }

    fn prepare(&mut self, voice: &VoiceSettings) {
        if voice.validate().is_ok()
            && voice.engine == VoiceEngine::Piper
            && let Err(error) = self.voice(voice)
        {
            self.warn(SynthError::FellBack(Box::new(error)));
        }
    }

    fn take_warnings(&mut self) -> Vec<SynthError> {
        std::mem::take(&mut self.warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clause_marks_follow_espeaks_clauses() {
        assert_eq!(
            clause_marks("Hello there, traveller. Welcome!"),
            vec![Some(','), Some('.'), Some('!')]
        );
        assert_eq!(clause_marks("It costs 3.5 coins"), vec![None]);
        assert_eq!(clause_marks("Well... maybe?!"), vec![Some('.'), Some('!')]);
        assert_eq!(clause_marks(" . , "), Vec::<Option<char>>::new());
        assert_eq!(
            join_clauses(&["a".into(), "b".into()], &[Some(','), Some('?')]),
            "a, b?"
        );
        // espeak-ng cut the text differently: keep the phonemes and the last mark.
        assert_eq!(
            join_clauses(&["a".into(), "b".into()], &[Some('.')]),
            "a b."
        );
    }

    #[test]
    fn language_flags_are_removed() {
        assert_eq!(strip_language_flags("(fr)ʃɛ(en) ðə"), "ʃɛ ðə");
        assert_eq!(strip_language_flags("a (b c) d"), "a (b c) d");
        assert_eq!(strip_language_flags("unclosed (x"), "unclosed (x");
    }

    #[test]
    fn long_text_is_cut_at_boundaries() {
        let sentence = "word ".repeat(200);
        let cut = pieces(&sentence);
        assert!(cut.len() >= 4, "{}", cut.len());
        assert!(cut.iter().all(|p| p.chars().count() <= PIECE_CHARS));
        assert_eq!(cut.join(" ").split_whitespace().count(), 200);
        let blob = "x".repeat(PIECE_CHARS * 2 + 5);
        assert_eq!(pieces(&blob).len(), 3);
        assert!(pieces("  ").is_empty());
    }
}
