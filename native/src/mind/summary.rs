//! The rolling conversation summary: when a conversation outgrows its budget, its oldest
//! turns leave the prompt and what they said that matters stays, in one block that changes
//! only when more turns are folded in (so the cached prefix stays warm in between).
//!
//! The summary has two parts. The *extractive* part keeps the player's sentences that carry
//! a name or a number, or that state something about the player ("I …", "my …"), verbatim:
//! it costs no model time, is there the moment turns are folded, and cannot invent a name.
//! The *written* part is a few sentences the local model writes about the folded turns in
//! the background, at the lowest priority (see [`crate::mind::summarizer`]); it adds the gist
//! (what was asked, agreed, refused) that no single sentence carries. A small model may
//! drop or garble a name in its gist; the extractive part is what guarantees named facts
//! survive.

use serde::{Deserialize, Serialize};

use crate::llama::prompt::Turn;

/// What the oldest turns of a conversation said, and how many turns it covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Summary {
    /// Kept sentences, oldest first.
    pub(crate) facts: Vec<String>,
    /// Leading turns of the conversation that this summary stands for.
    pub(crate) turns: usize,
    /// What the model wrote about the folded turns (validated; empty until written).
    #[serde(default)]
    pub(crate) written: String,
    /// Leading turns that `written` covers (at most `turns`); when `turns` is ahead, the
    /// worker has a summary job to run.
    #[serde(default)]
    pub(crate) written_turns: usize,
}

/// Facts kept at most; past it, the oldest leave the summary (important ones should also
/// be long-term memories).
const MAX_FACTS: usize = 24;

impl Summary {
    /// Folds `turns` (the oldest turns not yet summarised) into the summary.
    pub(crate) fn fold(&mut self, turns: &[Turn]) {
        for turn in turns {
            for sentence in sentences(&turn.player) {
                if worth_keeping(sentence) && !self.facts.iter().any(|f| f == sentence) {
                    self.facts.push(sentence.to_owned());
                }
            }
        }
        let excess = self.facts.len().saturating_sub(MAX_FACTS);
        self.facts.drain(..excess);
        self.turns += turns.len();
    }

    /// The block appended to the system prompt, or `None` when there is nothing to say.
    pub(crate) fn block(&self) -> Option<String> {
        if self.facts.is_empty() && self.written.is_empty() {
            return None;
        }
        let mut block = String::new();
        if !self.facts.is_empty() {
            block.push_str("Earlier in this conversation the player said:");
            for fact in &self.facts {
                block.push_str("\n- ");
                block.push_str(fact);
            }
        }
        if !self.written.is_empty() {
            if !block.is_empty() {
                block.push('\n');
            }
            block.push_str("In short, earlier: ");
            block.push_str(&self.written);
        }
        Some(block)
    }
}

/// Sentences of a text, trimmed, with their end punctuation.
fn sentences(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive(['.', '!', '?'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// A sentence with a name (a capitalised word after the first), a number, or a statement
/// about the player.
fn worth_keeping(sentence: &str) -> bool {
    let words: Vec<&str> = sentence.split_whitespace().collect();
    let has_name = words.iter().skip(1).any(|word| {
        let word = word.trim_matches(|c: char| !c.is_alphanumeric());
        word.chars().next().is_some_and(char::is_uppercase)
            && word != "I"
            && !word.starts_with("I'")
    });
    let has_number = sentence.chars().any(|c| c.is_ascii_digit());
    let first = words.first().map(|w| w.to_lowercase()).unwrap_or_default();
    let about_player = !sentence.ends_with('?')
        && matches!(
            first.as_str(),
            "i" | "i'm" | "i've" | "i'll" | "my" | "we" | "we're"
        );
    has_name || has_number || about_player
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(player: &str) -> Turn {
        Turn {
            player: player.into(),
            npc: "Aye.".into(),
        }
    }

    #[test]
    fn keeps_names_numbers_and_statements_and_drops_small_talk() {
        let mut summary = Summary::default();
        summary.fold(&[
            turn("Hello there. My sister Wren lives in Riverford."),
            turn("How are you today?"),
            turn("I owe the baker 7 copper. Nice weather!"),
            turn("I'm looking for work."),
        ]);
        assert_eq!(summary.turns, 4);
        assert_eq!(
            summary.facts,
            [
                "My sister Wren lives in Riverford.",
                "I owe the baker 7 copper.",
                "I'm looking for work."
            ]
        );
        assert!(
            summary
                .block()
                .unwrap()
                .contains("- I owe the baker 7 copper.")
        );
        assert_eq!(Summary::default().block(), None);
        summary.written = "The player is looking for work.".into();
        let block = summary.block().unwrap();
        assert!(block.starts_with("Earlier in this conversation the player said:\n- My sister"));
        assert!(block.ends_with("\nIn short, earlier: The player is looking for work."));
    }

    #[test]
    fn summaries_saved_before_the_written_part_existed_still_load() {
        let old = "(facts:[\"I owe Marta 12 silver.\"],turns:3)";
        let summary: Summary = ron::from_str(old).unwrap();
        assert_eq!((summary.turns, summary.written_turns), (3, 0));
        assert!(summary.written.is_empty());
    }
}
