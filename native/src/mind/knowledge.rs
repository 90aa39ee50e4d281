//! What enters an NPC's prompt besides its persona, and how the prompt stays inside its
//! budget: retrieved lore and recalled memories go *inside the new user turn* (never into the
//! system prompt, so the cached prefix of earlier turns stays valid), and a conversation that
//! outgrows the budget folds its oldest half into the rolling [`Summary`].
//!
//! Stored history keeps the player's plain line, not the notes that were decoded with it.
//! The next turn's prompt therefore differs from the cache from the previous user turn on,
//! and recomputes that one exchange (its line and reply, tens of tokens); in exchange each
//! turn's notes cost context only once, so history grows by the conversation alone and
//! folds (which recompute everything after the system prompt) stay rare.

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use crate::llama::prompt::{PromptBuilder, Turn};
use crate::mind::memory::MemoryStore;
use crate::mind::summarizer::{Finished, SummaryInput};
use crate::mind::summary::Summary;
use crate::persona::Persona;
use crate::retrieval::compress::{self, Compressed};
use crate::retrieval::lore::{LoreBook, LoreIndex};
use crate::types::NpcError;
use crate::types::NpcId;

/// Lore entries per turn when a persona does not say.
pub const DEFAULT_RETRIEVE: u32 = 3;
/// Memories per turn when a persona does not say.
pub const DEFAULT_RECALL: u32 = 3;
/// Turns always kept verbatim when the conversation is folded into the summary.
const KEEP_RECENT: usize = 2;

/// An NPC's lore, memories and summary, and its budget settings.
#[derive(Clone, Debug, Default)]
pub(crate) struct Knowledge {
    pub(crate) lore: Arc<LoreIndex>,
    retrieve: usize,
    recall: usize,
    budget: Option<usize>,
    pub(crate) memories: MemoryStore,
    pub(crate) summary: Summary,
    /// Compressed texts of the lore entries (index order), when the persona asks for it.
    compressed: Option<Compressed>,
    /// Whether the model writes part of the summary (the persona's `model_summary`).
    model_summary: bool,
    /// Secrets the game revealed ([`Request::RevealSecret`](crate::Request)): knowledge now.
    pub(crate) revealed: Vec<String>,
    /// The last line BM25 searched and the entries it found: routing the line and building
    /// its prompt search once.
    last_search: RefCell<Option<(String, Vec<usize>)>>,
}

/// A prompt ready to decode, and what was put in or left out to build it.
#[derive(Debug)]
pub(crate) struct Assembled {
    pub(crate) tokens: Vec<LlamaToken>,
    /// The same prompt before the chat template, for a server that applies it itself.
    pub(crate) chat: ChatParts,
    pub(crate) lore_entries: usize,
    pub(crate) dropped_lore: usize,
    pub(crate) memories: usize,
    pub(crate) dropped_memories: usize,
}

/// An assembled prompt's parts before the chat template: the system text (with the
/// summary), the turns kept verbatim and the user message (notes and the line). The local
/// prompt ends with the cloud's fact after the template; here it is the user message's
/// first note.
#[derive(Debug)]
#[cfg_attr(not(feature = "cloud"), allow(dead_code))]
pub(crate) struct ChatParts {
    pub(crate) system: String,
    /// The first of the conversation's turns kept verbatim (the rest are in the summary).
    pub(crate) verbatim_from: usize,
    pub(crate) user: String,
}

impl ChatParts {
    /// (role, content) pairs for a chat-completions request; `turns` is the conversation
    /// the prompt was assembled from.
    #[cfg_attr(not(feature = "cloud"), allow(dead_code))]
    pub(crate) fn messages(self, turns: &[Turn]) -> Vec<(String, String)> {
        let verbatim = turns.get(self.verbatim_from..).unwrap_or_default();
        let mut messages = Vec::with_capacity(2 + 2 * verbatim.len());
        messages.push(("system".to_owned(), self.system));
        for turn in verbatim {
            messages.push(("user".to_owned(), turn.player.clone()));
            messages.push(("assistant".to_owned(), turn.npc.clone()));
        }
        messages.push(("user".to_owned(), self.user));
        messages
    }
}

impl Knowledge {
    /// The settings and lore of `persona`; lore files are read relative to `assets`.
    /// Memories and summary start empty (see [`Knowledge::carry_over`]).
    pub(crate) fn for_persona(persona: &Persona, assets: &Path) -> Result<Self, NpcError> {
        let mut entries = Vec::new();
        if let Some(file) = persona.lore.as_deref() {
            let path = assets.join(file);
            let book = LoreBook::load(&path).map_err(|err| {
                NpcError::InvalidPersona(format!("lore file {}: {err}", path.display()))
            })?;
            entries = book.entries;
        }
        entries.extend(persona.lore_entries.iter().cloned());
        Ok(Self {
            lore: Arc::new(LoreIndex::new(entries)),
            retrieve: persona.retrieve.unwrap_or(DEFAULT_RETRIEVE) as usize,
            recall: persona.recall.unwrap_or(DEFAULT_RECALL) as usize,
            budget: persona.prompt_budget.map(|b| b as usize),
            memories: MemoryStore::default(),
            summary: Summary::default(),
            compressed: None,
            model_summary: persona.model_summary.unwrap_or(true),
            revealed: Vec::new(),
            last_search: RefCell::default(),
        })
    }

    /// Compresses the lore to about `keep` of its tokens (see [`crate::retrieval::compress`]).
    pub(crate) fn compress(
        &mut self,
        model: &LlamaModel,
        model_id: &str,
        keep: f32,
        threads: u32,
        cache: &Path,
    ) -> Result<(), String> {
        let texts: Vec<String> = self.lore.entries().iter().map(|e| e.text.clone()).collect();
        if texts.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let compressed = compress::compress(model, model_id, &texts, keep, threads, cache)?;
        tracing::info!(
            "lore compressed from {} to {} tokens in {:?} (cached: {})",
            compressed.tokens_before,
            compressed.tokens_after,
            started.elapsed(),
            compressed.from_cache
        );
        self.compressed = Some(compressed);
        Ok(())
    }

    /// Lore tokens before and after compression, and whether the result was cached.
    pub(crate) fn compression(&self) -> Option<(usize, usize, bool)> {
        self.compressed
            .as_ref()
            .map(|c| (c.tokens_before, c.tokens_after, c.from_cache))
    }

    /// Keeps what the NPC learned (memories, summary) when its persona is replaced.
    pub(crate) fn carry_over(&mut self, old: Knowledge) {
        self.memories = old.memories;
        self.summary = old.summary;
        self.revealed = old.revealed;
    }

    /// Makes every memory and summary text safe for a prompt (after loading a save).
    pub(crate) fn sanitize(&mut self, prompts: &PromptBuilder) {
        for memory in &mut self.memories.memories {
            memory.text = prompts.sanitize(&memory.text);
        }
        for fact in &mut self.summary.facts {
            *fact = prompts.sanitize(fact);
        }
        self.summary.written = prompts.sanitize(&self.summary.written);
        self.summary.written_turns = self.summary.written_turns.min(self.summary.turns);
    }

    /// The summary job this NPC needs, if any: turns folded since the model last wrote its
    /// part of the summary (see [`crate::mind::summarizer`]).
    pub(crate) fn summary_due(&self, npc: NpcId, turns: &[Turn]) -> Option<SummaryInput> {
        let summary = &self.summary;
        let to = summary.turns.min(turns.len());
        (self.model_summary && summary.written_turns < to).then(|| SummaryInput {
            npc,
            from: summary.written_turns,
            to,
            previous: summary.written.clone(),
            turns: turns[summary.written_turns..to].to_vec(),
        })
    }

    /// Takes a finished summary job's text into the summary if the conversation is still the
    /// one it was made from. A refused text still marks its turns as done (they keep their
    /// extractive facts), so a model that writes nonsense is not asked again and again.
    /// Returns whether the summary changed.
    pub(crate) fn apply_written(&mut self, turns: &[Turn], done: &Finished) -> bool {
        let summary = &mut self.summary;
        let current = summary.written_turns == done.from
            && done.to <= summary.turns.min(turns.len())
            && SummaryInput::key(&summary.written, &turns[done.from..done.to]) == done.key;
        if !self.model_summary || !current {
            return false;
        }
        summary.written_turns = done.to;
        match &done.text {
            Some(text) => {
                summary.written = text.clone();
                true
            }
            None => false,
        }
    }

    /// The designer's prompt budget, if any.
    pub(crate) fn budget(&self) -> Option<usize> {
        self.budget
    }

    /// What escalation routing matches `line` against besides the persona's own facts: what
    /// the prompt for it will hold (the lore entries retrieved for it) and the questions the
    /// NPC learned answers to from the cloud.
    pub(crate) fn routing_documents(&self, line: &str) -> Vec<&str> {
        let mut documents: Vec<&str> = self
            .retrieved(line)
            .into_iter()
            .filter_map(|index| self.lore.entry(index).map(|entry| entry.text.as_str()))
            .collect();
        documents.extend(
            self.memories
                .memories
                .iter()
                .filter_map(|memory| crate::mind::memory::learned_question(&memory.text)),
        );
        documents
    }

    /// The lore entries (indices, best first) BM25 finds for `line`; the same line twice in a
    /// row is searched once.
    fn retrieved(&self, line: &str) -> Vec<usize> {
        let mut last = self.last_search.borrow_mut();
        if let Some((searched, hits)) = last.as_ref()
            && searched == line
        {
            return hits.clone();
        }
        let hits: Vec<usize> = self
            .lore
            .search(line, self.retrieve)
            .into_iter()
            .map(|hit| hit.index)
            .collect();
        *last = Some((line.to_owned(), hits.clone()));
        hits
    }

    /// After a turn: the clock moves on and what the player said of themselves is kept.
    pub(crate) fn learn_from(&mut self, line: &str) {
        self.memories.clock += 1;
        for (fact, importance) in crate::mind::memory::extract(line) {
            self.memories.remember(&fact, importance);
        }
    }

    /// The tokens every prompt of this NPC's next turn starts with, whatever the player says:
    /// the system prompt (with the summary block) and the verbatim turns, up to where the new
    /// user turn's text begins. Found as the common start of two prompts for different lines,
    /// so it holds for any chat template. A prewarm computes these before the player speaks.
    pub(crate) fn stable_prefix(
        &self,
        prompts: &PromptBuilder,
        model: &LlamaModel,
        system: &str,
        turns: &[Turn],
    ) -> Result<Vec<LlamaToken>, NpcError> {
        let folded = self.summary.turns.min(turns.len());
        let system = match self.summary.block() {
            Some(block) => format!("{system}\n\n{block}"),
            None => system.to_owned(),
        };
        let verbatim = &turns[folded..];
        let prompt_for = |line: &str| -> Result<Vec<LlamaToken>, NpcError> {
            let text = prompts.render(model, &system, verbatim, line)?;
            Ok(PromptBuilder::tokenize(model, &text))
        };
        let (one, other) = (prompt_for("Hello.")?, prompt_for("What?")?);
        let common = one.iter().zip(&other).take_while(|(a, b)| a == b).count();
        let mut prefix = one;
        prefix.truncate(common);
        Ok(prefix)
    }

    /// Builds the prompt for `line` after `turns`, inside the budget. A `fact` the cloud
    /// supplied for the line goes before the retrieved lore and also opens the NPC's reply
    /// (the model continues after it), inside the budget (the persona's, and the
    /// context less `reply_budget`). To fit it folds the oldest turns into the summary (all
    /// but [`KEEP_RECENT`]), then drops the weakest lore entries, then memories, then folds
    /// the remaining turns.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        &mut self,
        prompts: &PromptBuilder,
        model: &LlamaModel,
        system: &str,
        turns: &[Turn],
        line: &str,
        fact: Option<&str>,
        hint: Option<&str>,
        context: usize,
        reply_budget: usize,
    ) -> Result<Assembled, NpcError> {
        let limit = context
            .saturating_sub(reply_budget)
            .min(self.budget.unwrap_or(usize::MAX));
        let mut lore: Vec<String> = self
            .retrieved(line)
            .into_iter()
            .filter_map(|index| {
                let compressed = self.compressed.as_ref().and_then(|c| c.texts.get(index));
                compressed.or_else(|| self.lore.entry(index).map(|entry| &entry.text))
            })
            .map(|text| prompts.sanitize(text.trim()))
            .collect();
        if let Some(fact) = fact {
            // First, so it is the last note dropped to fit the budget.
            lore.insert(0, fact.to_owned());
        }
        let mut memories: Vec<String> = self
            .memories
            .recall(line, self.recall)
            .into_iter()
            .map(|text| prompts.sanitize(&text))
            .collect();
        let (lore_entries, recalled) = (lore.len(), memories.len());
        // Folds are committed only when the prompt fits: a refused line changes nothing.
        // A summary may cover turns that a reloaded, shorter conversation no longer has.
        let mut summary = self.summary.clone();
        summary.turns = summary.turns.min(turns.len());
        loop {
            let verbatim = &turns[summary.turns..];
            let system = match summary.block() {
                Some(block) => format!("{system}\n\n{block}"),
                None => system.to_owned(),
            };
            let user = user_turn(&lore, &memories, hint, line);
            let mut text = prompts.render(model, &system, verbatim, &user)?;
            if let Some(fact) = fact {
                text.push_str(fact);
            }
            let tokens = PromptBuilder::tokenize(model, &text);
            if tokens.len() <= limit {
                let verbatim_from = summary.turns;
                self.summary = summary;
                return Ok(Assembled {
                    tokens,
                    chat: ChatParts {
                        system,
                        verbatim_from,
                        user,
                    },
                    lore_entries: lore.len(),
                    dropped_lore: lore_entries - lore.len(),
                    memories: memories.len(),
                    dropped_memories: recalled - memories.len(),
                });
            }
            if verbatim.len() > KEEP_RECENT {
                let fold = verbatim.len() - KEEP_RECENT;
                summary.fold(&verbatim[..fold]);
            } else if lore.pop().is_some() || memories.pop().is_some() {
                // The weakest note went; try again.
            } else if !verbatim.is_empty() {
                summary.fold(verbatim);
            } else {
                return Err(NpcError::ContextOverflow {
                    needed: tokens.len() + reply_budget,
                    available: context.min(self.budget.map_or(usize::MAX, |b| b + reply_budget)),
                });
            }
        }
    }
}

/// The new user turn: the notes for this line, a `hint` (the don't-know reminder), then the
/// line itself. Without notes or hint it is the line alone.
pub(crate) fn user_turn(
    lore: &[String],
    memories: &[String],
    hint: Option<&str>,
    line: &str,
) -> String {
    if lore.is_empty() && memories.is_empty() && hint.is_none() {
        return line.to_owned();
    }
    let mut text = String::new();
    if !lore.is_empty() {
        text.push_str("Notes (what you also know; use them only if they answer the player):");
        for entry in lore {
            text.push_str("\n- ");
            text.push_str(entry);
        }
        text.push_str("\n\n");
    }
    if !memories.is_empty() {
        text.push_str("What you remember about the player:");
        for memory in memories {
            text.push_str("\n- ");
            text.push_str(memory);
        }
        text.push_str("\n\n");
    }
    if let Some(hint) = hint {
        text.push_str(hint);
        text.push_str("\n\n");
    }
    text.push_str("The player says: ");
    text.push_str(line);
    text
}
