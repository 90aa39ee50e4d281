//! Words, the one way the runtime reads text: content words without stopwords, a light
//! stemmer, common English words, "I don't know" phrases, and the matching built on them
//! (how well a line matches what an NPC knows, which names in it the NPC never heard of,
//! whether a reply states only what it could know). Used by routing, the don't-know check
//! and the secret guard alike.

use std::collections::HashSet;

/// Lines whose best knowledge match is below this get the don't-know reminder: the model is
/// told that what it knows may not answer the line, and to say so if it does not (see
/// [`unfamiliar`]). Chosen on the evaluation's `dev` split.
pub const DONT_KNOW_BELOW: f32 = 0.5;

/// Frequent English words that say nothing distinctive on their own (compared by stem).
const COMMON: &[&str] = &[
    "about",
    "above",
    "across",
    "after",
    "again",
    "against",
    "almost",
    "alone",
    "along",
    "already",
    "also",
    "always",
    "among",
    "another",
    "anyone",
    "anything",
    "around",
    "away",
    "back",
    "because",
    "become",
    "before",
    "began",
    "behind",
    "being",
    "believe",
    "below",
    "best",
    "better",
    "between",
    "big",
    "both",
    "bring",
    "brother",
    "brought",
    "call",
    "came",
    "cannot",
    "care",
    "carry",
    "case",
    "cause",
    "certain",
    "change",
    "child",
    "children",
    "close",
    "come",
    "could",
    "day",
    "days",
    "dead",
    "does",
    "done",
    "down",
    "during",
    "each",
    "early",
    "else",
    "end",
    "enough",
    "even",
    "ever",
    "every",
    "eye",
    "face",
    "fact",
    "family",
    "father",
    "feel",
    "few",
    "find",
    "fine",
    "first",
    "found",
    "friend",
    "from",
    "full",
    "gave",
    "give",
    "going",
    "gone",
    "good",
    "great",
    "hand",
    "hard",
    "have",
    "head",
    "hear",
    "heard",
    "heavy",
    "help",
    "here",
    "high",
    "himself",
    "hold",
    "home",
    "hope",
    "house",
    "however",
    "into",
    "just",
    "keep",
    "kept",
    "kind",
    "knew",
    "know",
    "large",
    "last",
    "later",
    "least",
    "leave",
    "left",
    "less",
    "life",
    "light",
    "like",
    "line",
    "little",
    "live",
    "long",
    "look",
    "made",
    "make",
    "many",
    "matter",
    "maybe",
    "mean",
    "might",
    "mind",
    "money",
    "more",
    "morning",
    "most",
    "mother",
    "much",
    "must",
    "myself",
    "name",
    "near",
    "need",
    "never",
    "next",
    "night",
    "nothing",
    "often",
    "old",
    "once",
    "only",
    "open",
    "other",
    "others",
    "over",
    "own",
    "part",
    "people",
    "perhaps",
    "person",
    "place",
    "play",
    "point",
    "put",
    "quite",
    "rather",
    "really",
    "right",
    "said",
    "same",
    "saw",
    "say",
    "says",
    "seem",
    "seen",
    "sell",
    "send",
    "sent",
    "several",
    "shall",
    "should",
    "show",
    "side",
    "since",
    "small",
    "some",
    "someone",
    "something",
    "sometimes",
    "soon",
    "still",
    "such",
    "sure",
    "take",
    "taken",
    "talk",
    "tell",
    "than",
    "thank",
    "that",
    "their",
    "them",
    "then",
    "there",
    "these",
    "they",
    "thing",
    "things",
    "think",
    "those",
    "though",
    "thought",
    "through",
    "time",
    "times",
    "today",
    "together",
    "told",
    "took",
    "toward",
    "true",
    "trust",
    "turn",
    "under",
    "until",
    "upon",
    "used",
    "very",
    "want",
    "water",
    "well",
    "went",
    "were",
    "what",
    "when",
    "where",
    "whether",
    "which",
    "while",
    "whole",
    "whom",
    "whose",
    "will",
    "with",
    "within",
    "without",
    "word",
    "work",
    "world",
    "would",
    "year",
    "years",
    "young",
    "your",
    "yours",
    // Words of any game world: its places, people, trades and coins.
    "village",
    "town",
    "city",
    "road",
    "river",
    "forest",
    "wood",
    "woods",
    "king",
    "queen",
    "lord",
    "lady",
    "castle",
    "church",
    "chapel",
    "street",
    "square",
    "gate",
    "wall",
    "field",
    "hill",
    "mountain",
    "lake",
    "sea",
    "ship",
    "boat",
    "horse",
    "cart",
    "farm",
    "market",
    "shop",
    "inn",
    "tavern",
    "door",
    "room",
    "food",
    "bread",
    "drink",
    "wine",
    "ale",
    "beer",
    "coin",
    "price",
    "business",
    "stranger",
    "traveller",
    "traveler",
    "guard",
    "soldier",
    "merchant",
    "story",
    "news",
    "weather",
    "tonight",
    "secret",
    "trade",
    "customer",
];

/// Whether `word` (lower case) is a frequent English word (compared by stem).
pub(crate) fn is_common(word: &str) -> bool {
    static COMMON_STEMS: std::sync::OnceLock<HashSet<String>> = std::sync::OnceLock::new();
    COMMON_STEMS
        .get_or_init(|| COMMON.iter().map(|w| stem(w)).collect())
        .contains(&stem(word))
}

/// Lower-case words of `text` (letters, digits and inner apostrophes).
pub(crate) fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !is_word_char(c))
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| !w.is_empty())
}

pub(crate) fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '\'' || c == '’'
}

/// A crude English stem: the possessive and one of `ing`, `ed`, `es`, `s`, `e` off, keeping
/// four letters at least ("smuggled", "smuggling", "smuggle" → "smuggl").
pub(crate) fn stem(word: &str) -> String {
    let word = word.replace('’', "'");
    let word = word.strip_suffix("'s").unwrap_or(&word);
    for suffix in ["ing", "ed", "es", "s", "e"] {
        if let Some(base) = word.strip_suffix(suffix)
            && base.chars().count() >= 4
        {
            return base.to_owned();
        }
    }
    word.to_owned()
}

/// Whether a reply says, in so many words, that the speaker does not know.
#[must_use]
pub fn is_refusal(reply: &str) -> bool {
    const PHRASES: &[&str] = &[
        "i don't know",
        "i do not know",
        "i dont know",
        "i'm not sure",
        "i am not sure",
        "i couldn't say",
        "i could not say",
        "i can't say",
        "i cannot say",
        "no idea",
        "i have no knowledge",
        "i'm afraid i can't",
        "i am unable to",
        "i'm unable to",
        "can't help you with that",
        "never heard of",
    ];
    let lower = reply.to_lowercase().replace('’', "'");
    PHRASES.iter().any(|phrase| lower.contains(phrase))
}

/// Words too common to say what a question is about.
const STOPWORDS: &[&str] = &[
    "a",
    "about",
    "an",
    "and",
    "any",
    "are",
    "at",
    "be",
    "can",
    "could",
    "did",
    "do",
    "does",
    "for",
    "from",
    "have",
    "how",
    "i",
    "in",
    "is",
    "it",
    "its",
    "know",
    "me",
    "much",
    "my",
    "of",
    "on",
    "or",
    "please",
    "should",
    "tell",
    "that",
    "the",
    "there",
    "this",
    "to",
    "was",
    "what",
    "when",
    "where",
    "which",
    "who",
    "why",
    "will",
    "with",
    "would",
    "you",
    "your",
    "yours",
    "many",
    "some",
    "get",
    "go",
    "does",
    "has",
    "had",
    "were",
    "been",
    "being",
    "them",
    "they",
    "he",
    "she",
    "his",
    "her",
    "we",
    "us",
    "our",
    "if",
    "so",
    "than",
    "then",
    "just",
    "like",
    // Greetings and small talk: nothing to look up.
    "hello",
    "hi",
    "hey",
    "greetings",
    "morning",
    "evening",
    "thanks",
    "thank",
    "bye",
    "goodbye",
    "good",
    "afternoon",
    "farewell",
    "cheers",
    "friend",
    "sorry",
    "again",
    "see",
    "soon",
    "yes",
    "no",
    "ok",
    "okay",
    "well",
    "fine",
    "doing",
    "today",
    "there",
    "sir",
];

/// Whether `word` (lower case) is too common to say what a line is about.
pub(crate) fn is_stopword(word: &str) -> bool {
    STOPWORDS.contains(&word)
}

/// Lower-case content words, with a plural `s` stripped.
pub(crate) fn content_words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .map(|word| word.trim_matches('\'').to_lowercase())
        .map(|word| word.strip_suffix("'s").map(str::to_owned).unwrap_or(word))
        .filter(|word| word.len() > 1 && !STOPWORDS.contains(&word.as_str()))
        .map(|word| {
            if word.len() > 3 && word.ends_with('s') && !word.ends_with("ss") {
                word[..word.len() - 1].to_owned()
            } else {
                word
            }
        })
        .collect()
}

/// How well `question` matches the best of `documents`: the share of the question's content
/// words found in one document, 0..=1. `None` when the question has no content words
/// (greetings, small talk), so there is nothing to match.
///
/// The runtime matches the persona's facts, the lore entries BM25 retrieves for the line (the
/// retriever picks the candidates; this share scores them, on the same 0..=1 scale for every
/// persona, where BM25's own scores depend on the corpus) and the questions the NPC learned
/// answers to. The policy only takes the resulting `Option<f32>`.
#[must_use]
pub fn knowledge_match<S: AsRef<str>>(documents: &[S], question: &str) -> Option<f32> {
    let words = content_words(question);
    if words.is_empty() {
        return None;
    }
    let best = documents
        .iter()
        .map(|doc| shared_words(&words, doc.as_ref()))
        .max()
        .unwrap_or(0);
    Some(best as f32 / words.len() as f32)
}

/// How many of `words` (content words, see [`content_words`]) are content words of
/// `document`.
pub(crate) fn shared_words(words: &[String], document: &str) -> usize {
    let document = content_words(document);
    words.iter().filter(|w| document.contains(w)).count()
}

/// The content words (see [`knowledge_match`]) and numbers of `texts`: everything an NPC has
/// heard of.
pub fn vocabulary<'a>(
    texts: impl IntoIterator<Item = &'a str>,
) -> std::collections::HashSet<String> {
    texts
        .into_iter()
        .flat_map(|text| content_words(text).into_iter().chain(numbers(text)))
        .collect()
}

/// The numbers in `text`, in digits: those written in digits ("10,000" is one) and those
/// spelled out ("three hundred and forty" is 340, as the speech evaluation's
/// [`normalize`](npc_voice::wer::normalize) writes them).
pub(crate) fn numbers(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_ascii_digit() || c == ','))
        .map(|n| n.trim_matches(',').replace(',', ""))
        .filter(|n| !n.is_empty())
        .chain(
            npc_voice::wer::normalize(text)
                .into_iter()
                .filter(|w| w.chars().all(|c| c.is_ascii_digit())),
        )
}

/// Whether `line` asks something (a question mark, or it opens with a question word):
/// only questions can be about what an NPC does not know.
pub(crate) fn is_question(line: &str) -> bool {
    const OPENERS: &[&str] = &[
        "what", "who", "whom", "whose", "where", "when", "why", "how", "which", "can", "could",
        "do", "does", "did", "is", "are", "was", "were", "will", "would", "should", "have", "has",
    ];
    line.contains('?')
        || line.split_whitespace().next().is_some_and(|w| {
            OPENERS.contains(
                &w.trim_matches(|c: char| !c.is_alphanumeric())
                    .to_lowercase()
                    .as_str(),
            )
        })
}

/// Whether `line` is probably about something the NPC does not know: it is a question, and
/// its best knowledge match over `documents` is below [`DONT_KNOW_BELOW`] or it names
/// something (a capitalised word that does not open a sentence) found nowhere in the NPC's
/// `vocabulary`. Lines with no content words (greetings, small talk) are never unfamiliar.
#[must_use]
pub fn unfamiliar<S: AsRef<str>>(
    documents: &[S],
    vocabulary: &std::collections::HashSet<String>,
    line: &str,
) -> bool {
    unfamiliar_names(documents, vocabulary, line).is_some()
}

/// As [`unfamiliar`], with the names in `line` the NPC never heard of (content words, lower
/// case; empty when the line is unfamiliar for its low match alone). `None`: familiar.
pub(crate) fn unfamiliar_names<S: AsRef<str>>(
    documents: &[S],
    vocabulary: &std::collections::HashSet<String>,
    line: &str,
) -> Option<Vec<String>> {
    let score = knowledge_match(documents, line)?;
    if !is_question(line) {
        return None;
    }
    // What the NPC learned since its persona was set (the documents) counts as heard of.
    let learned = self::vocabulary(documents.iter().map(AsRef::as_ref));
    let known = |w: &String| vocabulary.contains(w) || learned.contains(w);
    let mut names = Vec::new();
    let mut opens_sentence = true;
    for word in line.split_whitespace() {
        let bare = word.trim_matches(|c: char| !c.is_alphanumeric());
        let named =
            !opens_sentence && bare.chars().next().is_some_and(char::is_uppercase) && bare != "I";
        if named {
            names.extend(content_words(bare).into_iter().filter(|w| !known(w)));
        }
        opens_sentence = word.ends_with(['.', '!', '?', ':']);
    }
    (score < DONT_KNOW_BELOW || !names.is_empty()).then_some(names)
}

/// Whether `reply` stays inside what the NPC could know: every specific it states (a number,
/// a capitalised name that does not open a sentence) is in its `vocabulary` or in `heard`
/// (the player's line and the conversation), and at most one other word is new to both
/// (frequent English words aside). Names in `unknown` (those the player asked about that the
/// NPC never heard of) count as new even though the player said them: "Flour costs 4 silver
/// in Saltmere" states what the NPC cannot know. An explicit "I don't know" is always
/// grounded. Used on replies to unfamiliar lines ([`unfamiliar`]): an ungrounded one is
/// replaced by a don't-know line.
#[must_use]
pub fn grounded(
    reply: &str,
    vocabulary: &std::collections::HashSet<String>,
    heard: &[&str],
    unknown: &[String],
) -> bool {
    if is_refusal(reply) {
        return true;
    }
    let heard: std::collections::HashSet<String> = heard
        .iter()
        .flat_map(|t| content_words(t).into_iter().chain(numbers(t)))
        .filter(|w| !unknown.contains(w))
        .collect();
    if numbers(reply).any(|n| !vocabulary.contains(&n) && !heard.contains(&n)) {
        return false;
    }
    let known = |word: &str| vocabulary.contains(word) || heard.contains(word);
    let mut new_words = 0;
    let mut opens_sentence = true;
    for raw in reply.split_whitespace() {
        let bare = raw.trim_matches(|c: char| !c.is_alphanumeric());
        let named =
            !opens_sentence && bare.chars().next().is_some_and(char::is_uppercase) && bare != "I";
        opens_sentence = raw.ends_with(['.', '!', '?', ':', '"']);
        for word in content_words(bare) {
            if known(&word) || is_common(&word) {
                continue;
            }
            if named || word.chars().any(|c| c.is_ascii_digit()) {
                return false;
            }
            new_words += 1;
        }
    }
    new_words <= 1
}
