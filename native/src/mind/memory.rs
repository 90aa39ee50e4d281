//! Long-term memory of the player: short facts with an importance and a time, recalled by
//! the Generative Agents score (recency + importance + relevance to the current line, each
//! normalised over the candidates), and the cheap heuristic that extracts facts the player
//! states about themselves ("my name is Aria", "I'll buy the sword").

use serde::{Deserialize, Serialize};

use crate::retrieval::lore::{Bm25, terms};
use crate::text::knowledge_match;

/// One thing an NPC remembers about the player or the world.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// The fact, as a sentence the model reads ("The player is called Aria.").
    pub text: String,
    /// 1 (trivia) to 10 (life-changing).
    pub importance: u8,
    /// The NPC's turn counter when the memory was made (its clock: one tick per player line).
    pub turn: u64,
    /// The turn it was last recalled into a prompt (recency counts from here).
    pub last_recalled: u64,
}

/// How much a memory's recency score decays per turn since it was last recalled.
const RECENCY_DECAY: f32 = 0.98;
/// Memories this important are recalled even when the line shares no word with them.
const ALWAYS_RELEVANT: u8 = 7;
/// Memories kept per NPC; past it, the least important (then oldest) is forgotten.
pub(crate) const MAX_MEMORIES: usize = 256;

/// An NPC's memories and its clock.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct MemoryStore {
    pub(crate) memories: Vec<Memory>,
    /// Turns this NPC has had (player lines answered), across saves.
    pub(crate) clock: u64,
}

impl MemoryStore {
    /// Every memory's text.
    pub(crate) fn texts(&self) -> Vec<&str> {
        self.memories.iter().map(|m| m.text.as_str()).collect()
    }

    /// Stores a memory (importance clamped to 1..=10). A memory with the same text replaces
    /// the old one, keeping the higher importance. Returns how many memories there are.
    pub(crate) fn remember(&mut self, text: &str, importance: u8) -> usize {
        let text = text.trim().to_owned();
        let importance = importance.clamp(1, 10);
        if let Some(old) = self.memories.iter_mut().find(|m| m.text == text) {
            old.importance = old.importance.max(importance);
            old.turn = self.clock;
            old.last_recalled = self.clock;
        } else {
            self.memories.push(Memory {
                text,
                importance,
                turn: self.clock,
                last_recalled: self.clock,
            });
        }
        if self.memories.len() > MAX_MEMORIES {
            let weakest = self
                .memories
                .iter()
                .enumerate()
                .min_by_key(|(_, m)| (m.importance, m.turn))
                .map(|(at, _)| at)
                .expect("not empty");
            self.memories.remove(weakest);
        }
        self.memories.len()
    }

    /// The `k` memories to put before `line`, best first, by the Generative Agents score:
    /// recency, importance and relevance each min-max normalised over the candidates and
    /// summed. Only memories that share a term with the line, or are important
    /// (≥ 7), are candidates. Marks the returned memories as recalled now.
    pub(crate) fn recall(&mut self, line: &str, k: usize) -> Vec<String> {
        if k == 0 || self.memories.is_empty() {
            return Vec::new();
        }
        let bm25 = Bm25::new(self.memories.iter().map(|m| terms(&m.text)));
        let relevance = bm25.scores(&terms(line));
        let candidates: Vec<usize> = (0..self.memories.len())
            .filter(|&at| relevance[at].0 > 0.0 || self.memories[at].importance >= ALWAYS_RELEVANT)
            .collect();
        let raw = |at: usize| {
            let memory = &self.memories[at];
            let age = self.clock.saturating_sub(memory.last_recalled);
            [
                RECENCY_DECAY.powf(age.min(10_000) as f32),
                f32::from(memory.importance),
                relevance[at].0,
            ]
        };
        let values: Vec<[f32; 3]> = candidates.iter().map(|&at| raw(at)).collect();
        let mut low = [f32::INFINITY; 3];
        let mut high = [f32::NEG_INFINITY; 3];
        for value in &values {
            for i in 0..3 {
                low[i] = low[i].min(value[i]);
                high[i] = high[i].max(value[i]);
            }
        }
        let normalise = |i: usize, v: f32| {
            if high[i] > low[i] {
                (v - low[i]) / (high[i] - low[i])
            } else {
                1.0
            }
        };
        let mut scored: Vec<(f32, usize)> = candidates
            .iter()
            .zip(&values)
            .map(|(&at, value)| ((0..3).map(|i| normalise(i, value[i])).sum(), at))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.truncate(k);
        scored
            .into_iter()
            .map(|(_, at)| {
                let memory = &mut self.memories[at];
                memory.last_recalled = self.clock;
                memory.text.clone()
            })
            .collect()
    }
}

/// Facts a player line states about the player, with their importance: their name, where
/// they come from, what they buy. A cheap pattern match, not understanding: it only catches
/// the plain phrasings below.
pub(crate) fn extract(line: &str) -> Vec<(String, u8)> {
    let mut facts = Vec::new();
    let words: Vec<&str> = line.split_whitespace().collect();
    let clean = |word: &str| {
        word.trim_matches(|c: char| !c.is_alphanumeric() && c != '\'' && c != '-')
            .to_owned()
    };
    let lower: Vec<String> = words.iter().map(|w| clean(w).to_lowercase()).collect();
    let is_name = |word: &str| {
        let word = clean(word);
        word.chars().next().is_some_and(char::is_uppercase)
            && word
                .chars()
                .all(|c| c.is_alphabetic() || c == '-' || c == '\'')
            && !matches!(word.as_str(), "I" | "A" | "The" | "Not" | "Just")
    };
    for at in 0..lower.len() {
        let rest = &words[at..];
        let next_name = |skip: usize| {
            rest.get(skip)
                .filter(|word| is_name(word))
                .map(|word| clean(word))
        };
        let phrase = |parts: &[&str]| {
            parts
                .iter()
                .enumerate()
                .all(|(i, part)| lower.get(at + i).is_some_and(|w| w == part))
        };
        let name = if phrase(&["my", "name", "is"]) {
            next_name(3)
        } else if phrase(&["call", "me"]) || phrase(&["i'm", "called"]) {
            next_name(2)
        } else if phrase(&["i", "am", "called"]) {
            next_name(3)
        } else if phrase(&["i", "am"]) && at == 0 {
            next_name(2)
        } else if phrase(&["i'm"]) && at == 0 {
            next_name(1)
        } else {
            None
        };
        if let Some(name) = name {
            facts.push((format!("The player's name is {name}."), 8));
        }
        // "my horse is called Thistle", "my sister is named Wren".
        if lower[at] == "my"
            && lower.get(at + 2).is_some_and(|w| w == "is")
            && lower
                .get(at + 3)
                .is_some_and(|w| w == "called" || w == "named")
            && lower.get(at + 1).is_some_and(|w| w != "name")
            && let Some(name) = next_name(4)
        {
            let what = clean(words[at + 1]).to_lowercase();
            facts.push((format!("The player's {what} is called {name}."), 6));
        }
        if phrase(&["i", "come", "from"])
            || phrase(&["i", "am", "from"])
            || phrase(&["i'm", "from"])
        {
            let skip = if lower[at] == "i'm" { 2 } else { 3 };
            let place: Vec<String> = rest
                .iter()
                .skip(skip)
                .take_while(|w| is_name(w))
                .map(|w| clean(w))
                .collect();
            if !place.is_empty() {
                facts.push((format!("The player comes from {}.", place.join(" ")), 6));
            }
        }
        let bought = ["buy", "take", "bought", "purchase"];
        let subject = lower[at] == "i'll"
            || (lower[at] == "i"
                && at + 1 < lower.len()
                && bought.contains(&lower[at + 1].as_str()))
            || (lower[at] == "i" && lower.get(at + 1).is_some_and(|w| w == "will"));
        let verb_at = at
            + if lower[at] == "i" && lower.get(at + 1).is_some_and(|w| w == "will") {
                2
            } else {
                1
            };
        if subject
            && lower
                .get(verb_at)
                .is_some_and(|w| bought.contains(&w.as_str()))
        {
            let mut object = Vec::new();
            for word in &words[verb_at + 1..] {
                let cleaned = clean(word);
                if !cleaned.is_empty() {
                    object.push(cleaned);
                }
                if word.ends_with(['.', '!', '?', ',', ';']) {
                    break;
                }
            }
            if !object.is_empty() {
                facts.push((format!("The player bought {}.", object.join(" ")), 5));
            }
        }
    }
    facts.dedup();
    facts
}

/// How an NPC remembers a fact the cloud supplied for `line` ([`CloudRole::Inform`]).
pub(crate) fn learned_memory(line: &str, fact: &str) -> String {
    format!("{LEARNED_PREFIX}{line}{LEARNED_MIDDLE}{fact}")
}

const LEARNED_PREFIX: &str = "Asked \"";
const LEARNED_MIDDLE: &str = "\", you found out: ";

/// The question and the fact of a memory made by [`learned_memory`].
fn learned(memory: &str) -> Option<(&str, &str)> {
    memory
        .strip_prefix(LEARNED_PREFIX)?
        .split_once(LEARNED_MIDDLE)
}

/// The question of a memory made by [`learned_memory`]: what routing matches a new line
/// against (the fact's own words would make unrelated questions look known).
pub(crate) fn learned_question(memory: &str) -> Option<&str> {
    learned(memory).map(|(question, _)| question)
}

/// The fact the NPC learned for a question that holds every content word of `line` (the
/// same question, asked again): it opens the local reply again, at no cloud cost. The most
/// recent such memory wins.
pub(crate) fn learned_answer<'m>(memories: &[&'m str], line: &str) -> Option<&'m str> {
    memories.iter().rev().find_map(|memory| {
        let (question, fact) = learned(memory)?;
        (knowledge_match(&[question], line)? >= 1.0).then_some(fact)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relevant_and_important_memories_are_recalled_first() {
        let mut store = MemoryStore::default();
        store.remember("The player's name is Aria.", 8);
        store.clock = 5;
        store.remember("The player saved the mill from a fire.", 6);
        store.remember("The player likes apples.", 2);
        store.clock = 10;
        let recalled = store.recall("Thanks for helping with the mill!", 2);
        assert_eq!(recalled[0], "The player saved the mill from a fire.");
        assert!(recalled.contains(&"The player's name is Aria.".to_owned()));
        // Unrelated trivia is not a candidate.
        let recalled = store.recall("What's the weather like?", 3);
        assert_eq!(recalled, ["The player's name is Aria."]);
    }

    #[test]
    fn recency_breaks_ties_and_duplicates_merge() {
        let mut store = MemoryStore::default();
        store.remember("The player bought a sword.", 5);
        store.clock = 50;
        store.remember("The player bought a shield.", 5);
        let recalled = store.recall("What did I buy?", 1);
        assert_eq!(recalled, ["The player bought a shield."]);
        assert_eq!(store.remember("The player bought a shield.", 9), 2);
        assert_eq!(store.memories[1].importance, 9);
    }

    #[test]
    fn extracts_names_origins_and_purchases() {
        let facts = extract("Hello! My name is Aria, and I come from Riverford.");
        assert!(
            facts.contains(&("The player's name is Aria.".into(), 8)),
            "{facts:?}"
        );
        assert!(
            facts.contains(&("The player comes from Riverford.".into(), 6)),
            "{facts:?}"
        );
        let facts = extract("I'll buy the iron sword for 40 gold.");
        assert_eq!(
            facts,
            [("The player bought the iron sword for 40 gold.".into(), 5)]
        );
        assert!(extract("I am tired of walking.").is_empty());
        assert!(extract("what do you sell?").is_empty());
        assert_eq!(
            extract("Call me Finn."),
            [("The player's name is Finn.".into(), 8)]
        );
        assert_eq!(
            extract("My horse is called Thistle, and she is lame."),
            [("The player's horse is called Thistle.".into(), 6)]
        );
    }
}
