//! Prompt building: the model's own chat template over a stable system prefix (the persona)
//! followed by the conversation and the new player line.

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use crate::types::NpcError;
pub use crate::types::Turn;

/// Renders conversations with the model's chat template and tokenizes them.
pub(crate) struct PromptBuilder {
    template: LlamaChatTemplate,
    /// `false` when the GGUF carried no template and ChatML is used instead.
    pub(crate) has_model_template: bool,
    /// The template text (or `chatml`), which saved states are keyed by.
    pub(crate) template_text: String,
    /// Texts of control tokens (`<|im_start|>` …); stripped from player lines so a player
    /// cannot forge conversation structure.
    control_texts: Vec<String>,
}

impl PromptBuilder {
    pub(crate) fn new(model: &LlamaModel) -> Self {
        let (template, has_model_template) = match model.chat_template(None) {
            Ok(template) => (template, true),
            Err(err) => {
                tracing::warn!("model has no usable chat template ({err}); falling back to ChatML");
                (
                    LlamaChatTemplate::new("chatml").expect("literal has no NUL byte"),
                    false,
                )
            }
        };
        let vocab = model.vocab();
        let mut control_texts: Vec<String> = vocab
            .tokens()
            .filter(|&token| vocab.is_control(token) || vocab.is_eog(token))
            .map(|token| {
                String::from_utf8_lossy(&vocab.token_to_piece(token, true, None)).into_owned()
            })
            .filter(|text| text.chars().count() >= 2)
            .collect();
        control_texts.sort_by_key(|text| std::cmp::Reverse(text.len()));
        control_texts.dedup();
        Self {
            template_text: template.to_string().unwrap_or_default(),
            template,
            has_model_template,
            control_texts,
        }
    }

    /// Makes player (or persona) text safe to place in a prompt: no NUL bytes, no control
    /// token texts.
    pub(crate) fn sanitize(&self, text: &str) -> String {
        let mut clean = text.replace('\0', "");
        for control in &self.control_texts {
            if clean.contains(control.as_str()) {
                clean = clean.replace(control.as_str(), "");
            }
        }
        clean
    }

    /// `turn` safe to keep in a conversation, both sides [`sanitize`](Self::sanitize)d.
    /// Every turn a conversation keeps passes here, wherever its text came from: the
    /// model's reply, an inference server's or the cloud's, a fallback line, a save file.
    /// Past turns are rendered into every later prompt, whose tokenizer reads control-token
    /// texts as control tokens.
    pub(crate) fn sanitize_turn(&self, turn: Turn) -> Turn {
        Turn {
            player: self.sanitize(&turn.player),
            npc: self.sanitize(&turn.npc),
        }
    }

    /// The prompt text: system, past turns, then `line` (if any) and the opening of the
    /// assistant's turn.
    pub(crate) fn render(
        &self,
        model: &LlamaModel,
        system: &str,
        turns: &[Turn],
        line: &str,
    ) -> Result<String, NpcError> {
        let message = |role: &str, content: &str| {
            LlamaChatMessage::new(role.to_owned(), content.to_owned())
                .map_err(|err| NpcError::Inference(format!("bad chat message: {err}")))
        };
        let mut messages = Vec::with_capacity(2 + turns.len() * 2);
        messages.push(message("system", system)?);
        for turn in turns {
            messages.push(message("user", &turn.player)?);
            messages.push(message("assistant", &turn.npc)?);
        }
        messages.push(message("user", line)?);
        model
            .apply_chat_template(&self.template, &messages, true)
            .map_err(|err| NpcError::Inference(format!("chat template failed: {err}")))
    }

    /// Tokens of a rendered prompt (special tokens parsed, BOS added if the model wants it).
    pub(crate) fn tokenize(model: &LlamaModel, text: &str) -> Vec<LlamaToken> {
        model.vocab().tokenize(text.as_bytes(), true, true)
    }

    /// The prompt for `line` after `turns`, dropping the oldest turns until it leaves
    /// `reply_budget` tokens free in a context of `context` tokens.
    /// Returns the tokens and how many turns were dropped.
    pub(crate) fn fit(
        &self,
        model: &LlamaModel,
        system: &str,
        turns: &[Turn],
        line: &str,
        context: usize,
        reply_budget: usize,
    ) -> Result<(Vec<LlamaToken>, usize), NpcError> {
        let limit = context.saturating_sub(reply_budget);
        // Cheap first guess from the full prompt, then drop turns one by one.
        let mut dropped = 0;
        loop {
            let tokens =
                Self::tokenize(model, &self.render(model, system, &turns[dropped..], line)?);
            if tokens.len() <= limit {
                return Ok((tokens, dropped));
            }
            if dropped == turns.len() {
                return Err(NpcError::ContextOverflow {
                    needed: tokens.len() + reply_budget,
                    available: context,
                });
            }
            dropped += 1;
        }
    }
}
