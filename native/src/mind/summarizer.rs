//! The model-written part of the rolling summary: a background job that asks the local model
//! to put the folded turns of a conversation into a few short sentences.
//!
//! Scheduling: a summary job is the lowest priority work the worker has. It runs only while
//! no reply of any priority is queued or in progress and no persona waits to be prewarmed,
//! one small step at a time (a chunk of [`CHUNK`] prompt tokens, or one generated token),
//! and the worker reads its inbox between steps; a player line that arrives mid-summary
//! waits for at most one such step, then has the model to itself until it is answered. The
//! job resumes afterwards.
//!
//! Memory: the job decodes in a small context of its own ([`CONTEXT`] tokens, created on
//! the first summary and kept), so it never takes an NPC's slot, never evicts or disturbs a
//! cached conversation, and is not counted by the KV cache manager. With the default model
//! (Qwen2.5-Coder-1.5B) that context holds 28 MiB of keys and values (SmolLM2-135M: 22.5).
//!
//! Nothing about a job is saved: what is pending is derived from the summary itself
//! (`turns` ahead of `written_turns`), so an NPC saved while its job was pending gets the
//! job again after loading. A job whose conversation changed underneath it (a load, a
//! forget, a persona that turned summaries off) is dropped when it finishes; a job whose
//! output fails validation is not retried (the extractive facts still cover those turns).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::llama::prompt::{PromptBuilder, Turn};
use crate::types::NpcId;

/// Tokens of the summary job's own context.
pub(crate) const CONTEXT: usize = 1024;
/// Prompt tokens decoded per step.
pub(crate) const CHUNK: usize = 32;
/// Tokens the model may write.
const MAX_NEW_TOKENS: usize = 72;
/// Characters of written summary kept at most (cut at a sentence end).
pub(crate) const MAX_WRITTEN_CHARS: usize = 320;
/// Characters of one line of the transcript given to the model at most.
const MAX_LINE_CHARS: usize = 300;

const SYSTEM: &str = "You write short, factual summaries of conversations.";
const INSTRUCTION: &str = "Summarise this conversation between a player and an NPC in two or \
three short sentences. Keep every name, place and number.";
/// The start of the model's answer, written for it: a small model then goes on with a
/// summary instead of continuing the transcript.
const OPENER: &str = "In this conversation, the player";

/// What a summary job summarises: the NPC's earlier written summary and the turns folded
/// since.
pub(crate) struct SummaryInput {
    pub(crate) npc: NpcId,
    /// Turns already covered by `previous`.
    pub(crate) from: usize,
    /// Turns covered once this job is done.
    pub(crate) to: usize,
    pub(crate) previous: String,
    pub(crate) turns: Vec<Turn>,
}

impl SummaryInput {
    /// Identifies the input, so a result is applied only to the conversation it was made from.
    pub(crate) fn key(previous: &str, turns: &[Turn]) -> u64 {
        let mut hasher = DefaultHasher::new();
        previous.hash(&mut hasher);
        for turn in turns {
            turn.player.hash(&mut hasher);
            turn.npc.hash(&mut hasher);
        }
        hasher.finish()
    }
}

/// A finished job: its validated text, or `None` when the model's output was refused.
pub(crate) struct Finished {
    pub(crate) npc: NpcId,
    pub(crate) from: usize,
    pub(crate) to: usize,
    pub(crate) key: u64,
    pub(crate) text: Option<String>,
}

struct Running {
    npc: NpcId,
    from: usize,
    to: usize,
    key: u64,
    /// The prompt text, to recognise output that only repeats it.
    prompt_text: String,
    tokens: Vec<LlamaToken>,
    decoded: usize,
    next: Option<LlamaToken>,
    sampler: LlamaSampler,
    output: Vec<u8>,
    generated: usize,
}

/// The summary jobs of one worker: at most one runs at a time.
pub(crate) struct Summarizer<'m> {
    ctx: Option<LlamaContext<'m>>,
    batch: LlamaBatch<'static>,
    running: Option<Running>,
    threads: u32,
    /// The context could not be created: model-written summaries are off for this run.
    unavailable: bool,
}

impl<'m> Summarizer<'m> {
    pub(crate) fn new(threads: u32) -> Self {
        Self {
            ctx: None,
            batch: LlamaBatch::new(CHUNK, 1),
            running: None,
            threads: threads.max(1),
            unavailable: false,
        }
    }

    /// No summaries at all: a runtime without the model's weights.
    pub(crate) fn off() -> Self {
        Self {
            unavailable: true,
            ..Self::new(1)
        }
    }

    /// Whether a job is in progress.
    pub(crate) fn busy(&self) -> bool {
        self.running.is_some()
    }

    /// Whether jobs can run at all.
    pub(crate) fn available(&self) -> bool {
        !self.unavailable
    }

    /// Drops `npc`'s job, if it has one running.
    pub(crate) fn cancel(&mut self, npc: NpcId) {
        if self.running.as_ref().is_some_and(|job| job.npc == npc) {
            self.running = None;
        }
    }

    /// The NPC whose job is running.
    pub(crate) fn running_npc(&self) -> Option<NpcId> {
        self.running.as_ref().map(|job| job.npc)
    }

    /// Starts a job. On failure (no context, a prompt that cannot be built) the job finishes
    /// at once with no text.
    pub(crate) fn start(
        &mut self,
        model: &'m LlamaModel,
        prompts: &PromptBuilder,
        input: SummaryInput,
    ) -> Option<Finished> {
        let key = SummaryInput::key(&input.previous, &input.turns);
        let refused = Finished {
            npc: input.npc,
            from: input.from,
            to: input.to,
            key,
            text: None,
        };
        if self.ctx.is_none() {
            let params = crate::llama::context_params(
                CONTEXT as u32,
                CHUNK as u32,
                CHUNK as u32,
                1,
                self.threads,
            );
            match model.new_context(crate::llama::backend(), params) {
                Ok(ctx) => self.ctx = Some(ctx),
                Err(err) => {
                    tracing::warn!("no context for summaries ({err}); model summaries are off");
                    self.unavailable = true;
                    return Some(refused);
                }
            }
        }
        // The newest turns matter most: the oldest leave the transcript until it fits.
        let mut skip = 0;
        let (prompt_text, tokens) = loop {
            let user = transcript(&input.previous, &input.turns[skip..]);
            let Ok(mut text) = prompts.render(model, SYSTEM, &[], &prompts.sanitize(&user)) else {
                return Some(refused);
            };
            text.push_str(OPENER);
            let tokens = PromptBuilder::tokenize(model, &text);
            if tokens.len() + MAX_NEW_TOKENS < CONTEXT {
                break (text, tokens);
            }
            if skip + 1 >= input.turns.len() {
                return Some(refused);
            }
            skip += 1;
        };
        if let Some(ctx) = self.ctx.as_mut() {
            ctx.clear_kv_cache();
        }
        self.running = Some(Running {
            npc: input.npc,
            from: input.from,
            to: input.to,
            key,
            prompt_text,
            tokens,
            decoded: 0,
            next: None,
            sampler: LlamaSampler::greedy(),
            output: OPENER.as_bytes().to_vec(),
            generated: 0,
        });
        None
    }

    /// One small decode of the running job; returns it when it is done.
    pub(crate) fn step(&mut self, model: &LlamaModel, prompts: &PromptBuilder) -> Option<Finished> {
        let (Some(ctx), Some(job)) = (self.ctx.as_mut(), self.running.as_mut()) else {
            return None;
        };
        self.batch.clear();
        let mut logits_at = 0;
        if let Some(token) = job.next.take() {
            let position = job.tokens.len() + job.generated - 1;
            if self.batch.add(token, pos(position), &[0], true).is_err() {
                return self.finish(None, prompts);
            }
        } else {
            let end = job.tokens.len().min(job.decoded + CHUNK);
            for at in job.decoded..end {
                let last = at + 1 == job.tokens.len();
                if self.batch.add(job.tokens[at], pos(at), &[0], last).is_err() {
                    return self.finish(None, prompts);
                }
                logits_at = at - job.decoded;
            }
            job.decoded = end;
        }
        if let Err(err) = ctx.decode(&mut self.batch) {
            tracing::warn!("summary decode failed: {err}");
            return self.finish(None, prompts);
        }
        if job.decoded < job.tokens.len() {
            return None;
        }
        let token = job
            .sampler
            .sample(ctx, i32::try_from(logits_at).unwrap_or(0));
        let vocab = model.vocab();
        if vocab.is_eog(token) || vocab.is_control(token) {
            return self.finish(Some(()), prompts);
        }
        vocab.token_to_piece_into(token, &mut job.output, false, None);
        job.generated += 1;
        if job.generated >= MAX_NEW_TOKENS
            || job.tokens.len() + job.generated + 1 >= CONTEXT
            || job.output.contains(&b'\n')
        {
            return self.finish(Some(()), prompts);
        }
        job.next = Some(token);
        None
    }

    fn finish(&mut self, completed: Option<()>, prompts: &PromptBuilder) -> Option<Finished> {
        let job = self.running.take()?;
        let text = completed.and_then(|()| {
            let raw = prompts.sanitize(&String::from_utf8_lossy(&job.output));
            validate(&raw, &job.prompt_text)
        });
        if text.is_none() {
            tracing::info!(
                "the model's summary for NPC {:?} was refused: {:?}",
                job.npc,
                String::from_utf8_lossy(&job.output)
            );
        }
        Some(Finished {
            npc: job.npc,
            from: job.from,
            to: job.to,
            key: job.key,
            text,
        })
    }
}

fn pos(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The user turn of a summary job: the instruction, the earlier summary, the transcript.
fn transcript(previous: &str, turns: &[Turn]) -> String {
    let clip = |text: &str| -> String {
        let text = text.trim();
        match text.char_indices().nth(MAX_LINE_CHARS) {
            Some((at, _)) => format!("{}…", &text[..at]),
            None => text.to_owned(),
        }
    };
    let mut text = String::from(INSTRUCTION);
    text.push_str("\n\n");
    if !previous.is_empty() {
        text.push_str("Earlier: ");
        text.push_str(previous);
        text.push_str("\n\n");
    }
    for turn in turns {
        text.push_str("The player said: \"");
        text.push_str(&clip(&turn.player));
        text.push_str("\"\nThe NPC answered: \"");
        text.push_str(&clip(&turn.npc));
        text.push_str("\"\n");
    }
    text
}

/// The model's output as a summary, or `None` when it is not one: empty or a few words,
/// an echo of the instruction or the transcript, a loop of the same words. Whitespace is
/// collapsed, a lead-in ("Summary:") dropped, and the text cut to
/// [`MAX_WRITTEN_CHARS`] at a sentence end (an unfinished last sentence goes).
pub(crate) fn validate(raw: &str, prompt: &str) -> Option<String> {
    // One paragraph: what follows a line break is the model wandering off.
    let first = raw.trim().lines().next().unwrap_or_default();
    let mut text = first.split_whitespace().collect::<Vec<_>>().join(" ");
    for lead in [
        "summary:",
        "in short:",
        "in short,",
        "sure!",
        "sure,",
        "here is",
    ] {
        if text.to_lowercase().starts_with(lead) {
            text = text[lead.len()..].trim_start().to_owned();
        }
    }
    let lower = text.to_lowercase();
    if [
        "summarise",
        "summarize",
        "player:",
        "npc:",
        "earlier:",
        "the player said:",
        "the npc answered:",
    ]
    .iter()
    .any(|echo| lower.contains(echo))
    {
        return None;
    }
    // Cut at the last sentence end within the cap.
    let capped = match text.char_indices().nth(MAX_WRITTEN_CHARS) {
        Some((at, _)) => &text[..at],
        None => text.as_str(),
    };
    let end = capped
        .char_indices()
        .filter(|&(_, c)| matches!(c, '.' | '!' | '?'))
        .map(|(at, c)| at + c.len_utf8())
        .next_back()?;
    let text = capped[..end].trim().to_owned();
    let words: Vec<String> = text
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    if words.len() < 4 {
        return None;
    }
    let mut distinct = words.clone();
    distinct.sort();
    distinct.dedup();
    if words.len() >= 8 && distinct.len() * 2 < words.len() {
        return None;
    }
    // A verbatim copy of a stretch of the prompt is not a summary.
    if text.len() > 40 && prompt.contains(&text) {
        return None;
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_summary_is_kept_and_cut_at_a_sentence_end() {
        assert_eq!(
            validate(
                "  Summary: The player asked about   swords. Brom sold one for 40 gold. He",
                ""
            )
            .as_deref(),
            Some("The player asked about swords. Brom sold one for 40 gold.")
        );
        let long = "The player, Aria from Riverford, asked Brom about swords and shields. \
            He quoted forty gold for an iron sword and sixty for steel. She haggled hard, \
            mentioned her sister Wren, and promised to return after visiting the mill. \
            Brom warned her about wolves near the Greyfang mine road at night. They agreed \
            to meet again tomorrow morning at the forge before the caravan leaves.";
        let cut = validate(long, "").unwrap();
        assert!(
            cut.len() <= MAX_WRITTEN_CHARS && cut.ends_with('.'),
            "{cut}"
        );
    }

    #[test]
    fn echoes_loops_and_scraps_are_refused() {
        assert_eq!(validate("", ""), None);
        assert_eq!(validate("Okay.", ""), None);
        assert_eq!(validate("No full stop here at all", ""), None);
        assert_eq!(
            validate("Summarise the conversation below in two sentences.", ""),
            None
        );
        assert_eq!(validate("NPC: hello there, my good friend.", ""), None);
        assert_eq!(
            validate("The player greeted Brom warmly.\nPlayer: hello there.", "").as_deref(),
            Some("The player greeted Brom warmly.")
        );
        assert_eq!(
            validate("the the the the the the the the the the.", ""),
            None
        );
        let prompt = transcript(
            "",
            &[Turn {
                player: "My sister Wren Holloway lives in Riverford, by the river.".into(),
                npc: "Aye.".into(),
            }],
        );
        assert_eq!(
            validate(
                "My sister Wren Holloway lives in Riverford, by the river.",
                &prompt
            ),
            None
        );
    }

    /// The test model, run through a summary job as the worker runs it.
    #[test]
    fn the_test_model_writes_a_summary_that_passes_validation() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../assets")
            .join(crate::catalog::TEST_MODEL.asset_path());
        let model = LlamaModel::load_from_file(
            crate::llama::backend(),
            &path,
            &llama_cpp_2::model::params::LlamaModelParams::default(),
        )
        .expect("the test model (run `cargo xtask setup --model smollm2-135m`)");
        let prompts = PromptBuilder::new(&model);
        let turn = |player: &str, npc: &str| Turn {
            player: player.into(),
            npc: npc.into(),
        };
        let turns = vec![
            turn(
                "My sister Wren Holloway lives in Riverford.",
                "Riverford is a fine town. Give her my regards.",
            ),
            turn(
                "I owe Marta 12 silver for the stew.",
                "Then pay her soon, Marta does not forget.",
            ),
            turn("How is the forge doing?", "Hot and busy, as always."),
        ];
        let mut summarizer = Summarizer::new(2);
        let input = SummaryInput {
            npc: NpcId(1),
            from: 0,
            to: 3,
            previous: String::new(),
            turns: turns.clone(),
        };
        assert!(summarizer.start(&model, &prompts, input).is_none());
        let mut steps = 0;
        let done = loop {
            steps += 1;
            if let Some(done) = summarizer.step(&model, &prompts) {
                break done;
            }
            assert!(steps < 200, "the job ends");
        };
        assert_eq!((done.npc, done.from, done.to), (NpcId(1), 0, 3));
        assert_eq!(done.key, SummaryInput::key("", &turns));
        let text = done.text.expect("a valid summary");
        eprintln!("summary: {text}");
        assert!(text.starts_with(OPENER), "{text}");
        assert!(text.len() <= MAX_WRITTEN_CHARS);
        // More than one step: the prompt went in chunks, the reply a token at a time.
        assert!(steps > 3, "{steps}");
        assert!(!summarizer.busy());
    }

    #[test]
    fn the_transcript_clips_long_lines_and_carries_the_earlier_summary() {
        let text = transcript(
            "The player is Aria.",
            &[Turn {
                player: "x".repeat(1000),
                npc: "Aye.".into(),
            }],
        );
        assert!(text.starts_with(INSTRUCTION));
        assert!(text.contains("The player said: \"xxx"));
        assert!(text.contains("Earlier: The player is Aria."));
        assert!(text.len() < 600, "{}", text.len());
    }
}
