//! Terminal chat with one NPC on the local model.
//!
//! ```text
//! cargo run --release --example chat -- --persona assets/personas/blacksmith.persona.ron
//! ```
//! Options: `--model PATH`, `--threads N`, `--context N`, `--seed N`, `--escalate` (questions
//! outside the persona's knowledge go to the cloud model named by `NPC_AI_CLOUD_URL`,
//! `NPC_AI_CLOUD_MODEL` and `NPC_AI_CLOUD_KEY`, when built with the `cloud` feature; otherwise
//! the NPC says its fallback line).
//! Type a line and press Enter; the reply streams token by token, followed by its speed.
//! Ctrl-D ends the conversation and prints what it cost (see the README's "Cost meter").

use std::io::{BufRead, Write};
use std::process::ExitCode;

use npc_native::{
    CloudConfig, CostMeter, EscalationConfig, Event, NpcId, Persona, ReplySource, Runtime,
    RuntimeConfig,
};

struct Args {
    persona: String,
    config: RuntimeConfig,
}

fn parse_args() -> Result<Args, String> {
    let mut persona = None;
    let mut config = RuntimeConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |text: String| text.parse::<u32>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--persona" => persona = Some(value()?),
            "--model" => config = config.with_model(value()?),
            "--threads" => config = config.with_threads(number(value()?)?),
            "--context" => config = config.with_context_size(number(value()?)?),
            "--seed" => {
                let seed = number(value()?)?;
                config.sampling.seed = Some(seed);
            }
            "--escalate" => {
                config = config.with_escalation(EscalationConfig::enabled(CloudConfig::from_env()));
            }
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let persona = persona.ok_or("--persona FILE is required")?;
    Ok(Args {
        persona,
        config: config.with_slots(1),
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
                "usage: chat --persona FILE [--model GGUF] [--threads N] [--context N] [--seed N] [--escalate]"
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
        Ok(Event::ModelLoaded(info)) => eprintln!(
            "[model {} loaded in {:.1}s: {} threads, {} context tokens]",
            info.path.display(),
            info.load_time.as_secs_f64(),
            info.threads,
            info.context_per_npc
        ),
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
        if line.trim().is_empty() {
            continue;
        }
        let Ok(request) = runtime.say(npc, line.trim()) else {
            eprintln!("chat: the worker stopped");
            return ExitCode::FAILURE;
        };
        print!("{name}: ");
        let _ = stdout.flush();
        for event in runtime.events() {
            meter.record_event(&event);
            match event {
                Event::Delta {
                    request: r, text, ..
                } if r == request => {
                    print!("{text}");
                    let _ = stdout.flush();
                }
                Event::Replied {
                    request: r, stats, ..
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
    ExitCode::SUCCESS
}
