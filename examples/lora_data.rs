//! Tokenizes a LoRA adapter's training pairs as the runtime prompts the model: the persona's
//! system prompt (after the default world preamble) in the model's own chat template, the
//! player's line, and the reply the adapter should teach, closed by the template's end of
//! turn. `tools/lora/train.py` trains on the result; `cargo xtask setup` runs both.
//!
//! ```text
//! cargo run --release -p npc_native --example lora_data -- \
//!     MODEL.gguf PERSONA.ron PAIRS.txt OUT.txt
//! ```
//!
//! `PAIRS.txt`: one `line<TAB>reply` a line (`#` starts a comment). `OUT.txt`: one example a
//! line, `prompt ids|reply ids` (comma-separated token ids).

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use npc_native::{Persona, RuntimeConfig};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, persona, pairs, out] = args.as_slice() else {
        eprintln!("usage: lora_data MODEL.gguf PERSONA.ron PAIRS.txt OUT.txt");
        return ExitCode::from(2);
    };
    match run(
        Path::new(model),
        Path::new(persona),
        Path::new(pairs),
        Path::new(out),
    ) {
        Ok(count) => {
            println!("[lora] {count} examples tokenized into {out}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("lora_data: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(model: &Path, persona: &Path, pairs: &Path, out: &Path) -> Result<usize, String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))
    };
    let persona = Persona::from_ron(&read(persona)?, Some(&persona.display().to_string()))
        .map_err(|err| err.to_string())?;
    let preamble = RuntimeConfig::new(model).preamble;
    let system = match preamble.trim() {
        "" => persona.system_prompt(),
        preamble => format!("{preamble}\n\n{}", persona.system_prompt()),
    };
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    let backend = LlamaBackend::init().map_err(|err| err.to_string())?;
    // The vocabulary and template alone: no weights are needed to tokenize.
    let params = LlamaModelParams::default().with_vocab_only(true);
    let model = LlamaModel::load_from_file(&backend, model, &params)
        .map_err(|err| format!("{}: {err}", model.display()))?;
    let template = model
        .chat_template(None)
        .map_err(|err| format!("the model has no chat template: {err}"))?;
    let message = |role: &str, content: &str| {
        LlamaChatMessage::new(role.into(), content.into()).map_err(|err| err.to_string())
    };
    // The prompt as the runtime tokenizes it (a BOS if the model wants one); the reply as
    // the model's continuation.
    let ids = |text: &str, bos: bool| {
        let tokens = model.vocab().tokenize(text.as_bytes(), bos, true);
        let mut line = String::new();
        for (at, token) in tokens.iter().enumerate() {
            let _ = write!(line, "{}{}", if at == 0 { "" } else { "," }, token.0);
        }
        line
    };
    let mut lines = String::new();
    let mut count = 0;
    for (number, pair) in read(pairs)?.lines().enumerate() {
        let pair = pair.trim_end();
        if pair.is_empty() || pair.starts_with('#') {
            continue;
        }
        let Some((line, reply)) = pair.split_once('\t') else {
            return Err(format!(
                "{}:{}: no tab between the line and the reply",
                pairs.display(),
                number + 1
            ));
        };
        let asked = [message("system", &system)?, message("user", line)?];
        let prompt = model
            .apply_chat_template(&template, &asked, true)
            .map_err(|err| err.to_string())?;
        // The whole exchange, rendered by the template: the reply is what follows the prompt
        // (its text and the template's end of turn).
        let whole = model
            .apply_chat_template(
                &template,
                &[
                    asked[0].clone(),
                    asked[1].clone(),
                    message("assistant", reply)?,
                ],
                false,
            )
            .map_err(|err| err.to_string())?;
        let Some(answer) = whole.strip_prefix(&prompt) else {
            return Err("the chat template renders the reply before the prompt's end".into());
        };
        // The template's trailing newline after the end of turn is not the model's to say.
        let answer = answer.trim_end_matches('\n');
        let _ = writeln!(lines, "{}|{}", ids(&prompt, true), ids(answer, false));
        count += 1;
    }
    if count == 0 {
        return Err(format!("{} holds no pairs", pairs.display()));
    }
    std::fs::write(out, lines).map_err(|err| format!("{}: {err}", out.display()))?;
    Ok(count)
}
