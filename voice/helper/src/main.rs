//! `npc-voice --model <ggml-model.bin> [--threads N]`: the speech-recognition helper.
//!
//! Loads a whisper.cpp model, answers `Ready`, then transcribes each 16 kHz mono utterance it
//! reads from stdin and writes the transcript to stdout, using the framed protocol of
//! `npc_voice::protocol`. It runs as its own process because whisper.cpp and llama.cpp both
//! bundle ggml and cannot share one binary; a crash here costs the game one utterance, not
//! the game. whisper.cpp's own log goes to stderr.

use std::io::{self, BufReader, BufWriter};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use npc_voice::protocol::{Reply, Request, SAMPLE_RATE, Segment};
use whisper_rs::{
    FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters, WhisperState,
};

struct Args {
    model: PathBuf,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut model = None;
    let mut threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--model") => model = args.next().map(PathBuf::from),
            Some("--threads") => {
                threads = args
                    .next()
                    .and_then(|t| t.to_str()?.parse().ok())
                    .filter(|&t| t > 0)
                    .ok_or("--threads needs a positive number")?;
            }
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
    }
    Ok(Args {
        model: model.ok_or("usage: npc-voice --model <ggml-model.bin> [--threads N]")?,
        threads,
    })
}

fn main() -> ExitCode {
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let fatal = |out: &mut BufWriter<_>, message: String| {
        eprintln!("npc-voice: {message}");
        let _ = Reply::Fatal { message }.write(out);
        ExitCode::FAILURE
    };
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => return fatal(&mut out, message),
    };
    let started = Instant::now();
    // whisper.cpp does not notice a file cut inside its last tensor: check the structure first.
    let (hparams, tensors) = match npc_voice::convert::ggml::validate_file(&args.model) {
        Ok(found) => found,
        Err(err) => return fatal(&mut out, format!("model {}: {err}", args.model.display())),
    };
    let context =
        match WhisperContext::new_with_params(&args.model, WhisperContextParameters::default()) {
            Ok(context) => context,
            Err(err) => {
                return fatal(
                    &mut out,
                    format!(
                        "whisper.cpp cannot load {}: {err} (see its log above)",
                        args.model.display()
                    ),
                );
            }
        };
    let mut state = match context.create_state() {
        Ok(state) => state,
        Err(err) => return fatal(&mut out, format!("cannot create a whisper state: {err}")),
    };
    let model = format!(
        "{} ({} audio layers, {} tensors, {})",
        args.model.display(),
        hparams.n_audio_layer,
        tensors,
        if context.is_multilingual() {
            "multilingual"
        } else {
            "English"
        }
    );
    let load_ms = started.elapsed().as_millis().try_into().unwrap_or(u32::MAX);
    if (Reply::Ready { load_ms, model }).write(&mut out).is_err() {
        return ExitCode::FAILURE;
    }
    let mut input = BufReader::new(io::stdin().lock());
    loop {
        match Request::read(&mut input) {
            Ok(Some(Request::Transcribe { id, samples })) => {
                let reply = transcribe(&mut state, args.threads, id, &samples);
                if reply.write(&mut out).is_err() {
                    return ExitCode::FAILURE;
                }
            }
            Ok(Some(Request::Shutdown) | None) => return ExitCode::SUCCESS,
            Err(err) => return fatal(&mut out, format!("protocol error on stdin: {err}")),
        }
    }
}

fn transcribe(state: &mut WhisperState, threads: usize, id: u64, samples: &[f32]) -> Reply {
    if samples.is_empty() {
        return Reply::Failed {
            id,
            message: "empty utterance".into(),
        };
    }
    if let Some(bad) = samples.iter().position(|s| !s.is_finite()) {
        return Reply::Failed {
            id,
            message: format!("sample {bad} is not a finite number"),
        };
    }
    let started = Instant::now();
    // whisper.cpp skips input shorter than a second; pad short utterances with silence.
    let min = SAMPLE_RATE as usize + SAMPLE_RATE as usize / 10;
    let mut padded;
    let audio = if samples.len() < min {
        padded = samples.to_vec();
        padded.resize(min, 0.0);
        &padded[..]
    } else {
        samples
    };
    let mut params = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
    params.set_n_threads(threads.try_into().unwrap_or(1));
    // English always: `None` would make whisper.cpp run language detection first.
    params.set_language(Some("en"));
    params.set_no_context(true);
    params.set_suppress_blank(true);
    params.set_print_progress(false);
    params.set_print_realtime(false);
    params.set_print_special(false);
    params.set_print_timestamps(false);
    if let Err(err) = state.full(params, audio) {
        return Reply::Failed {
            id,
            message: format!("whisper.cpp failed: {err}"),
        };
    }
    let mut segments = Vec::new();
    for i in 0..state.full_n_segments() {
        let Some(segment) = state.get_segment(i) else {
            continue;
        };
        let text = segment
            .to_str_lossy()
            .map(std::borrow::Cow::into_owned)
            .unwrap_or_default();
        // Timestamps are in centiseconds.
        let ms = |t: i64| u32::try_from(t.max(0) * 10).unwrap_or(u32::MAX);
        segments.push(Segment {
            start_ms: ms(segment.start_timestamp()),
            end_ms: ms(segment.end_timestamp()),
            text,
        });
    }
    let text = segments
        .iter()
        .map(|s| s.text.trim())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let ms = |d: u128| u32::try_from(d).unwrap_or(u32::MAX);
    Reply::Transcript {
        id,
        text,
        segments,
        audio_ms: ms(samples.len() as u128 * 1000 / u128::from(SAMPLE_RATE)),
        decode_ms: ms(started.elapsed().as_millis()),
    }
}
