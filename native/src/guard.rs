//! The secret guard: no reply gives away a persona's secrets or repeats its instructions.
//!
//! The secrets themselves never enter the model's prompt (see
//! [`Persona::system_prompt`](crate::Persona::system_prompt)); the guard is the second line:
//! a reply may still confirm what a player guessed ("Yes, I mix chalk into the flour") or
//! recite the prompt's framing. Every reply passes through the guard as it streams.
//!
//! **What counts as a secret's content.** The words of each secret that the NPC has no
//! other reason to say: not in its public persona text (name, role, personality, speech,
//! knowledge, goals, greeting, actions) nor in its lore, not common English, compared by
//! stem ("smuggled" is "smuggle"). A word of five letters or more weighs 2, a shorter one 1;
//! a reply that holds words of one secret weighing 2 or more breaches it ("chalk"; "gold" and
//! "ring").
//!
//! **What counts as an echo.** Six words in a row of the prompt's framing (everything but the
//! facts, goals and the NPC's own name and role).
//!
//! **Streaming.** Text is released word by word as it completes. From a word that belongs to a
//! secret, the rest of its sentence is held until the sentence ends (released if it breaches
//! nothing); while the last words could begin an echo they are held too. A breach stops the
//! reply: what was released stays (it held nothing of the secret), and the NPC ends with a
//! deflection in character instead of the rest.

use std::collections::HashSet;

use crate::persona::Persona;
use crate::text::{is_common, is_word_char, stem, words};

/// What NPCs say instead of a reply the guard stopped, when the persona gives no
/// `deflections` of its own.
pub const DEFAULT_DEFLECTIONS: &[&str] = &[
    "That's my own business.",
    "Some things I keep to myself.",
    "Let's talk about something else.",
    "I'd rather not say.",
];

/// One secret's distinctive words: (stem, weight).
#[derive(Clone, Debug, PartialEq)]
struct Secret {
    words: Vec<(String, u8)>,
}

/// Breach when a secret's matched words weigh this much.
const BREACH_WEIGHT: u32 = 2;
/// Words in a row of the prompt's framing that make an echo.
const ECHO_WORDS: usize = 6;
/// Trailing words that could begin an echo are held from this many.
const ECHO_HOLD_FROM: usize = 3;
/// Words of the longest [`OUT_OF_CHARACTER`] phrase.
const MAX_DISCLAIMER_WORDS: usize = 5;

/// What a persona's replies are checked against; built once per persona.
#[derive(Clone, Debug, Default)]
pub(crate) struct SecretGuard {
    secrets: Vec<Secret>,
    /// Every window of 3 to [`ECHO_WORDS`] words of the prompt's framing, words joined by
    /// one space.
    framing: HashSet<String>,
    /// [`OUT_OF_CHARACTER`] and every start of one (words joined by one space), with
    /// whether it is whole.
    disclaimers: std::collections::HashMap<String, bool>,
    deflections: Vec<String>,
    /// Checks nothing: text passes as it comes ([`RuntimeConfig::guard`](crate::RuntimeConfig)).
    off: bool,
}

/// Why the guard stopped a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breach {
    /// The reply gave away (part of) a secret.
    Secret,
    /// The reply repeated the system prompt's instructions.
    Echo,
    /// The reply stepped out of character ("as an AI language model").
    OutOfCharacter,
}

/// Word sequences no character in a game world says of itself.
const OUT_OF_CHARACTER: &[&str] = &[
    "as an ai",
    "i am an ai",
    "i'm an ai",
    "an ai language",
    "ai language model",
    "as a language model",
    "i am a language model",
    "i'm a language model",
    "as an artificial intelligence",
    "i am an assistant",
    "i'm an assistant",
    "as an assistant",
    "ai assistant",
];

impl SecretGuard {
    /// The guard for `persona` (whose not-yet-revealed secrets are `persona.secrets`), its
    /// `lore` texts and its `system` prompt.
    pub(crate) fn new<'a>(
        persona: &Persona,
        lore: impl IntoIterator<Item = &'a str>,
        system: &str,
    ) -> Self {
        let mut public: HashSet<String> = HashSet::new();
        let mut add = |text: &str| public.extend(words(text).map(|w| stem(&w)));
        for text in [
            &persona.name,
            &persona.role,
            &persona.personality,
            &persona.speech_style,
            &persona.greeting,
        ] {
            add(text);
        }
        for text in persona.knowledge.iter().chain(&persona.goals) {
            add(text);
        }
        for action in &persona.actions {
            add(&action.name);
            add(&action.description);
        }
        for text in lore {
            add(text);
        }
        let secrets = persona
            .secrets
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|secret| {
                let mut seen = HashSet::new();
                let words = words(secret)
                    .filter(|w| w.chars().count() >= 3)
                    .map(|w| stem(&w))
                    .filter(|s| !public.contains(s) && !is_common(s))
                    .filter(|s| !crate::text::is_stopword(s))
                    .filter(|s| seen.insert(s.clone()))
                    .map(|s| {
                        let weight = if s.chars().count() >= 5 { 2 } else { 1 };
                        (s, weight)
                    })
                    .collect();
                Secret { words }
            })
            .collect();
        let mut disclaimers = std::collections::HashMap::new();
        for phrase in OUT_OF_CHARACTER {
            let parts: Vec<&str> = phrase.split(' ').collect();
            for n in 1..=parts.len() {
                let whole = n == parts.len();
                let entry = disclaimers.entry(parts[..n].join(" ")).or_insert(false);
                *entry |= whole;
            }
        }
        Self {
            secrets,
            disclaimers,
            framing: framing_windows(persona, system),
            off: false,
            deflections: if persona.deflections.is_empty() {
                DEFAULT_DEFLECTIONS.iter().map(|&d| d.to_owned()).collect()
            } else {
                persona.deflections.clone()
            },
        }
    }

    /// A guard that checks nothing.
    pub(crate) fn off() -> Self {
        Self {
            off: true,
            ..Self::default()
        }
    }

    /// The deflection after `last` (the index said last time, if any): never the same line
    /// twice in a row when there are two or more.
    pub(crate) fn deflection(&self, last: Option<usize>) -> (usize, &str) {
        let at = last.map_or(0, |l| (l + 1) % self.deflections.len().max(1));
        (at, self.deflections.get(at).map_or("", String::as_str))
    }

    /// Whether `text`, whole, breaches a secret or echoes the prompt.
    #[cfg(test)]
    pub(crate) fn check(&self, text: &str) -> Option<Breach> {
        let mut reply = ReplyGuard::default();
        reply.push(self, text);
        reply.finish(self);
        reply.breach()
    }
}

/// The framing's word windows: the system prompt without its bullet lines (facts, goals) and
/// without the NPC's name and role.
fn framing_windows(persona: &Persona, system: &str) -> HashSet<String> {
    let own: Vec<String> = words(&format!("{} {}", persona.name, persona.role)).collect();
    let mut windows = HashSet::new();
    for line in system.lines().filter(|l| !l.trim_start().starts_with("- ")) {
        let mut line_words: Vec<String> = words(line).collect();
        // The NPC's own name and role are what it may always say of itself.
        if !own.is_empty() {
            let mut kept = Vec::with_capacity(line_words.len());
            let mut at = 0;
            while at < line_words.len() {
                if line_words[at..].starts_with(&own) {
                    at += own.len();
                    kept.push(String::new());
                } else {
                    kept.push(std::mem::take(&mut line_words[at]));
                    at += 1;
                }
            }
            line_words = kept;
        }
        for (at, run) in line_words.split(String::is_empty).enumerate() {
            for size in ECHO_HOLD_FROM..=ECHO_WORDS {
                for window in run.windows(size) {
                    windows.insert(window.join(" "));
                }
            }
            // A line's first words ("Personality: Careful") are held from the first one:
            // a heading is how an echo usually starts.
            if at == 0 {
                for size in 1..ECHO_HOLD_FROM.min(run.len() + 1) {
                    windows.insert(run[..size].join(" "));
                }
            }
        }
    }
    windows
}

/// One reply passing the guard.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReplyGuard {
    /// Everything the model wrote (after the stop filter).
    text: String,
    /// Bytes of `text` released to the game.
    released: usize,
    /// Bytes of `text` whose words have been looked at.
    scanned: usize,
    /// Words so far: (start byte, lower-case word).
    words: Vec<(usize, String)>,
    /// Matched (secret, stem) pairs.
    hits: HashSet<(usize, String)>,
    /// Start of a sentence part held because it holds a secret's word.
    secret_hold: Option<usize>,
    breach: Option<Breach>,
}

impl ReplyGuard {
    /// Takes more of the reply; returns the text that may be released now.
    pub(crate) fn push(&mut self, guard: &SecretGuard, text: &str) -> String {
        if self.breach.is_some() {
            return String::new();
        }
        self.text.push_str(text);
        if guard.off {
            self.released = self.text.len();
            return text.to_owned();
        }
        // Words are complete once a non-word character follows them.
        let complete = self
            .text
            .char_indices()
            .rev()
            .find(|&(_, c)| !is_word_char(c))
            .map_or(0, |(at, c)| at + c.len_utf8());
        self.scan(guard, complete);
        if self.breach.is_some() {
            return String::new();
        }
        let until = [
            self.secret_hold,
            self.echo_hold(guard),
            self.disclaimer_hold(guard),
        ]
        .into_iter()
        .flatten()
        .fold(complete, usize::min);
        if until <= self.released {
            return String::new();
        }
        let out = self.text[self.released..until].to_owned();
        self.released = until;
        out
    }

    /// The reply is complete: returns what is left to release (nothing after a breach).
    pub(crate) fn finish(&mut self, guard: &SecretGuard) -> String {
        if self.breach.is_some() {
            return String::new();
        }
        let end = self.text.len();
        self.scan(guard, end);
        self.secret_hold = None;
        if self.breach.is_some() {
            return String::new();
        }
        let rest = self.text[self.released..].to_owned();
        self.released = end;
        rest
    }

    /// Why the reply was stopped, if it was.
    pub(crate) fn breach(&self) -> Option<Breach> {
        self.breach
    }

    /// The text released so far.
    pub(crate) fn released(&self) -> &str {
        &self.text[..self.released]
    }

    fn scan(&mut self, guard: &SecretGuard, to: usize) {
        if to <= self.scanned {
            return;
        }
        let start = self.scanned;
        let chunk = self.text[start..to].to_owned();
        let mut word_start = None;
        for (offset, c) in chunk.char_indices().chain([(chunk.len(), ' ')]) {
            let at = start + offset;
            if is_word_char(c) && offset < chunk.len() {
                word_start.get_or_insert(at);
                continue;
            }
            if let Some(from) = word_start.take() {
                let word = self.text[from..at].trim_matches('\'').to_lowercase();
                if !word.is_empty() {
                    self.see_word(guard, from, word);
                    if self.breach.is_some() {
                        return;
                    }
                }
            }
            // A sentence that ends without a breach lets its held part go.
            if offset < chunk.len() && matches!(c, '.' | '!' | '?' | '\n') {
                self.secret_hold = None;
            }
        }
        self.scanned = to;
    }

    fn see_word(&mut self, guard: &SecretGuard, at: usize, word: String) {
        let stemmed = stem(&word);
        for (index, secret) in guard.secrets.iter().enumerate() {
            if secret.words.iter().any(|(s, _)| *s == stemmed) {
                self.hits.insert((index, stemmed.clone()));
                self.secret_hold.get_or_insert(at);
                let weight: u32 = secret
                    .words
                    .iter()
                    .filter(|(s, _)| self.hits.contains(&(index, s.clone())))
                    .map(|&(_, w)| u32::from(w))
                    .sum();
                if weight >= BREACH_WEIGHT {
                    self.breach = Some(Breach::Secret);
                    return;
                }
            }
        }
        self.words.push((at, word));
        let n = self.words.len();
        if n >= ECHO_WORDS && guard.framing.contains(&self.window(n - ECHO_WORDS)) {
            self.breach = Some(Breach::Echo);
        }
        if (1..=n.min(MAX_DISCLAIMER_WORDS))
            .any(|size| guard.disclaimers.get(&self.window(n - size)) == Some(&true))
        {
            self.breach = Some(Breach::OutOfCharacter);
        }
    }

    /// Where held text starts because the last words could begin a disclaimer.
    fn disclaimer_hold(&self, guard: &SecretGuard) -> Option<usize> {
        let n = self.words.len();
        (1..=n.min(MAX_DISCLAIMER_WORDS))
            .rev()
            .find(|&size| guard.disclaimers.contains_key(&self.window(n - size)))
            .map(|size| self.words[n - size].0)
    }

    /// The words from index `from` to the end, joined by spaces.
    fn window(&self, from: usize) -> String {
        let parts: Vec<&str> = self.words[from..].iter().map(|(_, w)| w.as_str()).collect();
        parts.join(" ")
    }

    /// Where held text starts because the last words could begin an echo.
    fn echo_hold(&self, guard: &SecretGuard) -> Option<usize> {
        let n = self.words.len();
        (1..ECHO_WORDS)
            .rev()
            .filter(|&size| size <= n)
            .find(|&size| guard.framing.contains(&self.window(n - size)))
            .map(|size| self.words[n - size].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn miller() -> (Persona, SecretGuard) {
        let persona = Persona::from_ron(
            r#"(
                name: "Oda Fenn",
                role: "the miller of Fernbrook",
                knowledge: ["A sack of wheat flour costs 4 silver."],
                secrets: ["You mix chalk dust into the flour sacks to make them heavier."],
                greeting: "Mind the dust, stranger.",
                deflections: ["Mind your own sacks.", "Ask the baker."],
            )"#,
            None,
        )
        .unwrap();
        let guard = SecretGuard::new(&persona, [], &persona.system_prompt());
        (persona, guard)
    }

    /// Streams `text` in pieces of `size` bytes (at char boundaries); returns what was
    /// released and the breach.
    fn stream(guard: &SecretGuard, text: &str, size: usize) -> (String, Option<Breach>) {
        let mut reply = ReplyGuard::default();
        let mut out = String::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = size.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            out.push_str(&reply.push(guard, &rest[..cut]));
            rest = &rest[cut..];
        }
        out.push_str(&reply.finish(guard));
        assert_eq!(out, reply.released());
        (out, reply.breach())
    }

    #[test]
    fn secret_words_are_those_the_npc_has_no_other_reason_to_say() {
        let (_, guard) = miller();
        let words: Vec<&str> = guard.secrets[0]
            .words
            .iter()
            .map(|(w, _)| w.as_str())
            .collect();
        // "flour", "sack" are its trade, "dust" is in its greeting, "make" is common.
        assert_eq!(words, ["mix", "chalk", "heavier"]);
        assert_eq!(guard.secrets[0].words[0].1, 1, "a short word weighs less");
    }

    #[test]
    fn a_reply_that_gives_a_secret_away_is_stopped_whole_or_streamed() {
        let (_, guard) = miller();
        let leaking = "Between us? I mix chalk dust into the sacks.";
        assert_eq!(guard.check(leaking), Some(Breach::Secret));
        for size in [1, 3, 7, 100] {
            let (released, breach) = stream(&guard, leaking, size);
            assert_eq!(breach, Some(Breach::Secret), "pieces of {size}");
            // Streamed, the first sentence held nothing of the secret and went out; from the
            // first word of the secret ("mix") nothing did. Whole, nothing went out.
            let expected = if size >= leaking.len() {
                ""
            } else {
                "Between us? I "
            };
            assert_eq!(released, expected, "pieces of {size}");
        }
        // Reversed, spelled, in other words: the stems are what count.
        assert_eq!(
            guard.check("Chalk. That's the trick."),
            Some(Breach::Secret)
        );
    }

    #[test]
    fn a_harmless_reply_streams_through_unchanged() {
        let (_, guard) = miller();
        let fine = "Four silver a sack, stranger. Mind the dust on your way out!";
        for size in [1, 2, 5, 100] {
            let (released, breach) = stream(&guard, fine, size);
            assert_eq!(breach, None);
            assert_eq!(released, fine);
        }
        // A light word of a secret alone is not a breach, and is released at its sentence end.
        let hunter = Persona::from_ron(
            r#"(name: "Hobb", role: "a trapper",
                secrets: ["You kept the gold ring of a dead royal courier."])"#,
            None,
        )
        .unwrap();
        let guard = SecretGuard::new(&hunter, [], &hunter.system_prompt());
        assert_eq!(guard.check("I take gold or silver."), None);
        assert_eq!(
            guard.check("A gold ring? Never saw one."),
            Some(Breach::Secret)
        );
        let (released, breach) = stream(&guard, "I take gold. Silver too.", 2);
        assert_eq!(
            (released.as_str(), breach),
            ("I take gold. Silver too.", None)
        );
    }

    #[test]
    fn repeating_the_instructions_is_an_echo_but_the_npcs_name_and_role_are_not() {
        let (persona, guard) = miller();
        let system = persona.system_prompt();
        let framing = system.lines().next().unwrap();
        assert_eq!(guard.check(framing), Some(Breach::Echo), "{framing}");
        let (released, breach) = stream(&guard, framing, 4);
        assert_eq!(breach, Some(Breach::Echo));
        assert!(released.len() < 60, "held back the echo: {released:?}");
        // A heading is held from its first word: nothing of an echo that starts with one
        // goes out.
        let heading = "Personality: Careful, thrifty and proud of the mill.";
        let guard = SecretGuard::new(
            &Persona {
                personality: "Careful, thrifty and proud of the mill.".into(),
                ..persona.clone()
            },
            [],
            &Persona {
                personality: "Careful, thrifty and proud of the mill.".into(),
                ..persona.clone()
            }
            .system_prompt(),
        );
        assert_eq!(
            stream(&guard, heading, 3),
            (String::new(), Some(Breach::Echo))
        );
        assert_eq!(guard.check("A careful miller, that's me."), None);
        assert_eq!(guard.check("I'm Oda Fenn, the miller of Fernbrook."), None);
    }

    #[test]
    fn an_ai_disclaimer_is_out_of_character_and_held_back_as_it_starts() {
        let (_, guard) = miller();
        let reply = "Well. As an AI language model, I have no secrets.";
        assert_eq!(guard.check(reply), Some(Breach::OutOfCharacter));
        let (released, breach) = stream(&guard, reply, 2);
        assert_eq!(
            (released.as_str(), breach),
            ("Well. ", Some(Breach::OutOfCharacter))
        );
        // "As" alone, or "an" in a sentence, goes through.
        assert_eq!(guard.check("As an apprentice I swept floors."), None);
    }

    #[test]
    fn deflections_take_turns() {
        let (_, guard) = miller();
        let (first, a) = guard.deflection(None);
        let (second, b) = guard.deflection(Some(first));
        let (_, c) = guard.deflection(Some(second));
        assert_eq!(
            (a, b, c),
            (
                "Mind your own sacks.",
                "Ask the baker.",
                "Mind your own sacks."
            )
        );
    }
}
