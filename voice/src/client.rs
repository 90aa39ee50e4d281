//! The game's side of the `npc-voice` helper: [`VoiceClient`] starts the helper on demand,
//! feeds it utterances and reports transcripts as [`VoiceEvent`]s. All process handling runs
//! on the client's own thread; the caller only sends on and drains channels, so a frame never
//! waits on speech recognition. A helper that dies is reported, its utterances fail, and a new
//! one is started; the helper is shut down when the client is dropped.

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};

use crate::protocol::{Reply, Request, Segment};

/// How the client runs the helper.
#[derive(Debug, Clone)]
pub struct VoiceConfig {
    /// The `npc-voice` executable.
    pub helper: PathBuf,
    /// The whisper.cpp model file (`cargo xtask setup` makes `assets/models/ggml-tiny.en.bin`).
    pub model: PathBuf,
    /// Threads for recognition; `None` lets the helper use every core.
    pub threads: Option<usize>,
    /// Consecutive helper deaths before it became ready, after which the client stops
    /// restarting it until the next utterance.
    pub max_failed_starts: u32,
}

impl VoiceConfig {
    /// A configuration with the helper found by [`find_helper`](Self::find_helper).
    #[must_use]
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            helper: Self::find_helper().unwrap_or_else(|| PathBuf::from("npc-voice")),
            model: model.into(),
            threads: None,
            max_failed_starts: 3,
        }
    }

    /// Uses `helper` as the executable.
    #[must_use]
    pub fn with_helper(mut self, helper: impl Into<PathBuf>) -> Self {
        self.helper = helper.into();
        self
    }

    /// Uses `threads` recognition threads.
    #[must_use]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads.max(1));
        self
    }

    /// `$NPC_VOICE_HELPER`, else an `npc-voice` beside the running executable or one or two
    /// directories up (where cargo puts binaries relative to examples, tests and benches).
    #[must_use]
    pub fn find_helper() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("NPC_VOICE_HELPER") {
            return Some(PathBuf::from(path));
        }
        let exe = std::env::current_exe().ok()?;
        let name = format!("npc-voice{}", std::env::consts::EXE_SUFFIX);
        exe.ancestors()
            .skip(1)
            .take(3)
            .map(|dir| dir.join(&name))
            .find(|p| p.is_file())
    }
}

/// Identifies one utterance sent with [`VoiceClient::transcribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UtteranceId(pub u64);

/// Why an utterance was not transcribed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VoiceError {
    /// The helper could not be started.
    #[error("cannot start the voice helper {helper}: {message}")]
    Spawn {
        /// The executable.
        helper: String,
        /// The OS error.
        message: String,
    },
    /// The helper died while the utterance was queued or being recognised.
    #[error("the voice helper died: {0}")]
    HelperDied(String),
    /// The helper cannot work (e.g. the model does not load).
    #[error("the voice helper cannot run: {0}")]
    Fatal(String),
    /// The helper rejected or failed this utterance.
    #[error("recognition failed: {0}")]
    Recognition(String),
}

/// What the client reports.
#[derive(Debug, Clone, PartialEq)]
pub enum VoiceEvent {
    /// A helper process was started.
    HelperStarted {
        /// Its process id.
        pid: u32,
    },
    /// The helper loaded its model.
    Ready {
        /// Milliseconds the load took.
        load_ms: u32,
        /// Model description.
        model: String,
    },
    /// An utterance's transcript.
    Transcript {
        /// The utterance.
        id: UtteranceId,
        /// The text (may be empty for silence).
        text: String,
        /// Timed segments.
        segments: Vec<Segment>,
        /// Milliseconds of audio.
        audio_ms: u32,
        /// Milliseconds the helper spent recognising.
        decode_ms: u32,
        /// From [`VoiceClient::transcribe`] to this event being sent.
        latency: Duration,
    },
    /// An utterance failed.
    Failed {
        /// The utterance.
        id: UtteranceId,
        /// Why.
        error: VoiceError,
    },
    /// The helper exited when it was not asked to.
    HelperExited {
        /// Exit status and the end of its log.
        reason: String,
        /// Whether a new helper is being started.
        restarting: bool,
    },
}

enum Command_ {
    Transcribe(UtteranceId, Vec<f32>, Instant),
}

enum FromHelper {
    Reply(u64, Reply),
    Closed(u64, String),
}

/// Runs the `npc-voice` helper on a background thread.
pub struct VoiceClient {
    commands: Option<Sender<Command_>>,
    events: Receiver<VoiceEvent>,
    next_id: u64,
    thread: Option<JoinHandle<()>>,
}

impl VoiceClient {
    /// Starts the client thread. The helper itself starts with the first utterance, or now
    /// with [`warm_up`](Self::warm_up).
    #[must_use]
    pub fn start(config: VoiceConfig) -> Self {
        let (commands, inbox) = crossbeam_channel::unbounded();
        let (outbox, events) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("npc-voice-client".into())
            .spawn(move || Manager::new(config, outbox).run(&inbox))
            .ok();
        Self {
            commands: Some(commands),
            events,
            next_id: 1,
            thread,
        }
    }

    /// Starts the helper now so the first utterance does not wait for the model to load.
    pub fn warm_up(&mut self) {
        self.send(UtteranceId(0), Vec::new());
    }

    /// Starts the helper ([`warm_up`](Self::warm_up)) and waits up to `patience` for it to
    /// load its model; returns the [`VoiceEvent::Ready`] model description and load time in
    /// milliseconds. Blocks: for set-up code and tools, not a game's frame.
    ///
    /// # Errors
    /// The first other event the helper sent instead (it could not start), or no answer.
    pub fn start_and_wait(&mut self, patience: Duration) -> Result<(String, u32), String> {
        self.warm_up();
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(VoiceEvent::Ready { load_ms, model }) => return Ok((model, load_ms)),
                Ok(VoiceEvent::HelperStarted { .. }) => {}
                Ok(other) => return Err(format!("the speech helper did not start: {other:?}")),
                Err(_) => {
                    return Err(format!(
                        "the speech helper did not answer within {} s",
                        patience.as_secs()
                    ));
                }
            }
        }
    }

    /// Queues 16 kHz mono samples for recognition; returns at once. The answer arrives as a
    /// [`VoiceEvent::Transcript`] or [`VoiceEvent::Failed`] with the returned id.
    pub fn transcribe(&mut self, samples: Vec<f32>) -> UtteranceId {
        let id = UtteranceId(self.next_id);
        self.next_id += 1;
        self.send(id, samples);
        id
    }

    fn send(&self, id: UtteranceId, samples: Vec<f32>) {
        if let Some(commands) = &self.commands {
            let _ = commands.send(Command_::Transcribe(id, samples, Instant::now()));
        }
    }

    /// Transcribes 16 kHz mono `samples` and waits up to `patience` for the text. Blocks:
    /// for tools and tests, not a game's frame (use [`transcribe`](Self::transcribe)).
    ///
    /// # Errors
    /// The helper's failure for this utterance, or no answer in time.
    pub fn transcribe_and_wait(
        &mut self,
        samples: Vec<f32>,
        patience: Duration,
    ) -> Result<String, String> {
        let id = self.transcribe(samples);
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(VoiceEvent::Transcript { id: got, text, .. }) if got == id => return Ok(text),
                Ok(VoiceEvent::Failed { id: got, error }) if got == id => {
                    return Err(error.to_string());
                }
                Ok(_) => {}
                Err(_) => return Err("no transcript in time".into()),
            }
        }
    }

    /// Events, in order. Drain with `try_iter` from a frame.
    #[must_use]
    pub fn events(&self) -> &Receiver<VoiceEvent> {
        &self.events
    }
}

impl Drop for VoiceClient {
    fn drop(&mut self) {
        self.commands = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Running {
    generation: u64,
    child: Child,
    writer: Sender<Request>,
    writer_thread: Option<JoinHandle<()>>,
    ready: bool,
    log: Arc<Mutex<VecDeque<String>>>,
}

struct Manager {
    config: VoiceConfig,
    events: Sender<VoiceEvent>,
    replies_tx: Sender<FromHelper>,
    replies: Receiver<FromHelper>,
    helper: Option<Running>,
    generation: u64,
    in_flight: VecDeque<(u64, Instant)>,
    failed_starts: u32,
    fatal: Option<String>,
}

const LOG_LINES: usize = 20;

impl Manager {
    fn new(config: VoiceConfig, events: Sender<VoiceEvent>) -> Self {
        let (replies_tx, replies) = crossbeam_channel::unbounded();
        Self {
            config,
            events,
            replies_tx,
            replies,
            helper: None,
            generation: 0,
            in_flight: VecDeque::new(),
            failed_starts: 0,
            fatal: None,
        }
    }

    fn emit(&self, event: VoiceEvent) {
        let _ = self.events.send(event);
    }

    fn run(mut self, inbox: &Receiver<Command_>) {
        loop {
            select! {
                recv(inbox) -> command => match command {
                    Ok(Command_::Transcribe(id, samples, at)) => self.submit(id, samples, at),
                    Err(_) => break,
                },
                recv(self.replies) -> message => {
                    if let Ok(message) = message {
                        self.on_helper(message);
                    }
                }
            }
        }
        self.shutdown();
    }

    fn submit(&mut self, id: UtteranceId, samples: Vec<f32>, at: Instant) {
        if self.helper.is_none() {
            // A new utterance is a new chance, even after a crash loop or a fatal error.
            self.failed_starts = 0;
            self.fatal = None;
            if let Err(error) = self.spawn() {
                if id.0 != 0 {
                    self.emit(VoiceEvent::Failed { id, error });
                }
                return;
            }
        }
        if id.0 == 0 {
            return;
        }
        let Some(helper) = &self.helper else { return };
        if helper
            .writer
            .send(Request::Transcribe { id: id.0, samples })
            .is_ok()
        {
            self.in_flight.push_back((id.0, at));
        } else {
            self.emit(VoiceEvent::Failed {
                id,
                error: VoiceError::HelperDied("its input closed".into()),
            });
        }
    }

    fn spawn(&mut self) -> Result<(), VoiceError> {
        let mut command = Command::new(&self.config.helper);
        command.arg("--model").arg(&self.config.model);
        if let Some(threads) = self.config.threads {
            command.arg("--threads").arg(threads.to_string());
        }
        let spawn_error = |message: String| VoiceError::Spawn {
            helper: self.config.helper.display().to_string(),
            message,
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_error(e.to_string()))?;
        self.generation += 1;
        let generation = self.generation;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(spawn_error("no pipes to the helper".into()));
        };
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let log_tail = Arc::clone(&log);
        let _ = std::thread::Builder::new()
            .name("npc-voice-log".into())
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let Ok(mut tail) = log_tail.lock() else { break };
                    if tail.len() == LOG_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            });
        let replies = self.replies_tx.clone();
        let _ = std::thread::Builder::new()
            .name("npc-voice-read".into())
            .spawn(move || {
                let mut stdout = BufReader::new(stdout);
                loop {
                    match Reply::read(&mut stdout) {
                        Ok(Some(reply)) => {
                            if replies.send(FromHelper::Reply(generation, reply)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            let _ = replies
                                .send(FromHelper::Closed(generation, "its output closed".into()));
                            return;
                        }
                        Err(err) => {
                            let _ = replies.send(FromHelper::Closed(
                                generation,
                                format!("unreadable output: {err}"),
                            ));
                            return;
                        }
                    }
                }
            });
        let (writer, requests) = crossbeam_channel::unbounded::<Request>();
        let writer_thread = std::thread::Builder::new()
            .name("npc-voice-write".into())
            .spawn(move || write_requests(stdin, &requests))
            .ok();
        self.emit(VoiceEvent::HelperStarted { pid: child.id() });
        self.helper = Some(Running {
            generation,
            child,
            writer,
            writer_thread,
            ready: false,
            log,
        });
        Ok(())
    }

    fn on_helper(&mut self, message: FromHelper) {
        let current = self.helper.as_ref().map(|h| h.generation);
        match message {
            FromHelper::Reply(generation, reply) if Some(generation) == current => match reply {
                Reply::Ready { load_ms, model } => {
                    if let Some(helper) = &mut self.helper {
                        helper.ready = true;
                    }
                    self.failed_starts = 0;
                    self.emit(VoiceEvent::Ready { load_ms, model });
                }
                Reply::Transcript {
                    id,
                    text,
                    segments,
                    audio_ms,
                    decode_ms,
                } => {
                    let latency = self.finish(id);
                    self.emit(VoiceEvent::Transcript {
                        id: UtteranceId(id),
                        text,
                        segments,
                        audio_ms,
                        decode_ms,
                        latency,
                    });
                }
                Reply::Failed { id, message } => {
                    self.finish(id);
                    self.emit(VoiceEvent::Failed {
                        id: UtteranceId(id),
                        error: VoiceError::Recognition(message),
                    });
                }
                Reply::Fatal { message } => self.fatal = Some(message),
            },
            FromHelper::Closed(generation, why) if Some(generation) == current => {
                self.on_exit(&why);
            }
            _ => {}
        }
    }

    fn finish(&mut self, id: u64) -> Duration {
        let at = self.in_flight.iter().position(|&(i, _)| i == id);
        at.and_then(|at| self.in_flight.remove(at))
            .map_or(Duration::ZERO, |(_, t)| t.elapsed())
    }

    fn on_exit(&mut self, why: &str) {
        let Some(mut helper) = self.helper.take() else {
            return;
        };
        drop(helper.writer);
        let _ = helper.child.kill();
        let status = helper
            .child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string());
        if let Some(thread) = helper.writer_thread.take() {
            let _ = thread.join();
        }
        let tail: Vec<String> = helper
            .log
            .lock()
            .map(|t| t.iter().rev().take(3).rev().cloned().collect())
            .unwrap_or_default();
        let mut reason = format!("{why}; {status}");
        if !tail.is_empty() {
            reason.push_str(&format!("; log: {}", tail.join(" | ")));
        }
        let error = match &self.fatal {
            Some(message) => VoiceError::Fatal(message.clone()),
            None => VoiceError::HelperDied(reason.clone()),
        };
        for (id, _) in std::mem::take(&mut self.in_flight) {
            self.emit(VoiceEvent::Failed {
                id: UtteranceId(id),
                error: error.clone(),
            });
        }
        if !helper.ready {
            self.failed_starts += 1;
        }
        let restarting = self.fatal.is_none() && self.failed_starts < self.config.max_failed_starts;
        self.emit(VoiceEvent::HelperExited { reason, restarting });
        if restarting && let Err(error) = self.spawn() {
            self.emit(VoiceEvent::HelperExited {
                reason: error.to_string(),
                restarting: false,
            });
        }
    }

    fn shutdown(&mut self) {
        let Some(mut helper) = self.helper.take() else {
            return;
        };
        let _ = helper.writer.send(Request::Shutdown);
        drop(helper.writer);
        if let Some(thread) = helper.writer_thread.take() {
            let _ = thread.join();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = helper.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = helper.child.kill();
        let _ = helper.child.wait();
    }
}

fn write_requests(stdin: ChildStdin, requests: &Receiver<Request>) {
    let mut out = BufWriter::new(stdin);
    for request in requests {
        if request.write(&mut out).is_err() {
            return;
        }
    }
}

/// Path helper for tests and tools: the workspace's `assets/models/` file `name`, starting
/// from a crate directory.
#[must_use]
pub fn workspace_model(crate_dir: &Path, name: &str) -> Option<PathBuf> {
    crate_dir
        .ancestors()
        .map(|dir| dir.join("assets/models").join(name))
        .find(|p| p.is_file())
}
