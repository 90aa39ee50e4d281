//! World lore and its retriever: a BM25 index over lore entries, so only the few entries
//! relevant to the player's line enter the prompt.
//!
//! Text is reduced to *terms* before indexing and searching: lowercased, split on anything
//! that is not a letter or digit, stopwords dropped, a light suffix-stripping stemmer applied
//! ("swords" → "sword", "costs" → "cost", "healing" → "heal") and a few question words mapped
//! onto what answers them ("price"/"much" → "cost"). A paraphrased question therefore meets
//! the entry that answers it even when it shares few literal words with it.
//!
//! A lore file (`*.lore.ron`) is a list of entries:
//! ```ron
//! (
//!     entries: [
//!         (id: "greyfang-mine", title: "The Greyfang Mine",
//!          text: "The Greyfang Mine lies two hours north of Oakvale...",
//!          keywords: ["ore", "iron"]),
//!     ],
//! )
//! ```

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::types::PersonaError;

/// The largest lore file read, in bytes (a book of about 100,000 entries): a mod's lore cannot
/// make the game read and index without bound.
pub const MAX_LORE_BYTES: u64 = 16 << 20;

/// One piece of world knowledge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoreEntry {
    /// A stable name for the entry (reports and tests refer to it).
    pub id: String,
    /// A short title; indexed with the text.
    #[serde(default)]
    pub title: String,
    /// What the NPC knows, in one or a few sentences. This text is what enters the prompt.
    pub text: String,
    /// Extra search words a designer adds so questions find the entry (not shown to the model).
    #[serde(default)]
    pub keywords: Vec<String>,
}

/// The contents of a `*.lore.ron` file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoreBook {
    /// The entries, in file order.
    pub entries: Vec<LoreEntry>,
}

impl LoreBook {
    /// Parses a lore book from RON text. `file` names the source in error messages.
    ///
    /// # Errors
    /// A [`PersonaError`] (field `lore`) with the line and column of the problem, or naming
    /// an entry with an empty id or text.
    pub fn from_ron(source: &str, file: Option<&str>) -> Result<Self, PersonaError> {
        let error = |line, column, message: String| PersonaError {
            file: file.map(str::to_owned),
            line,
            column,
            field: Some("lore".to_owned()),
            message,
        };
        let book: LoreBook = ron::from_str(source).map_err(|err| {
            error(
                err.span.start.line,
                err.span.start.col,
                err.code.to_string(),
            )
        })?;
        for (index, entry) in book.entries.iter().enumerate() {
            if entry.id.trim().is_empty() || entry.text.trim().is_empty() {
                return Err(error(
                    0,
                    0,
                    format!("lore entry {index} needs a non-empty id and text"),
                ));
            }
        }
        Ok(book)
    }

    /// Reads and parses a lore file.
    ///
    /// # Errors
    /// A [`PersonaError`] if the file cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Self, PersonaError> {
        let name = path.display().to_string();
        let error = |message: String| PersonaError {
            file: Some(name.clone()),
            line: 0,
            column: 0,
            field: Some("lore".to_owned()),
            message,
        };
        let size = std::fs::metadata(path)
            .map_err(|err| error(format!("cannot read the lore file: {err}")))?
            .len();
        if size > MAX_LORE_BYTES {
            return Err(error(format!(
                "the lore file is {size} bytes, more than the {MAX_LORE_BYTES} a lore file may be"
            )));
        }
        let source = std::fs::read_to_string(path)
            .map_err(|err| error(format!("cannot read the lore file: {err}")))?;
        Self::from_ron(&source, Some(&name))
    }
}

/// One search result: which entry and how well it matched.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoreHit {
    /// Index of the entry in the index (the order given to [`LoreIndex::new`]).
    pub index: usize,
    /// BM25 score: 0 means no query term matched; higher is better. Scores compare within
    /// one index, not across indexes.
    pub score: f32,
    /// How many distinct query terms the entry contains.
    pub matched_terms: usize,
    /// How many distinct terms the query had (after stopwords were dropped).
    pub query_terms: usize,
}

impl LoreHit {
    /// The fraction of the query's terms found in the entry, in `0.0..=1.0`: a
    /// scale-free "how much of this question does the entry cover".
    #[must_use]
    pub fn coverage(&self) -> f32 {
        if self.query_terms == 0 {
            0.0
        } else {
            self.matched_terms as f32 / self.query_terms as f32
        }
    }
}

/// BM25 over lore entries. Build once (at persona load), search every turn.
#[derive(Clone, Debug, Default)]
pub struct LoreIndex {
    entries: Vec<LoreEntry>,
    bm25: Bm25,
}

impl LoreIndex {
    /// Indexes `entries` (title, text and keywords).
    #[must_use]
    pub fn new(entries: Vec<LoreEntry>) -> Self {
        let bm25 = Bm25::new(entries.iter().map(|entry| {
            let mut text = String::with_capacity(entry.text.len() + 64);
            text.push_str(&entry.title);
            text.push(' ');
            text.push_str(&entry.text);
            for keyword in &entry.keywords {
                text.push(' ');
                text.push_str(keyword);
            }
            terms(&text)
        }));
        Self { entries, bm25 }
    }

    /// The `k` best entries for `query`, best first. Entries sharing no term with the query
    /// are never returned, so the result may be shorter than `k` (or empty).
    #[must_use]
    pub fn search(&self, query: &str, k: usize) -> Vec<LoreHit> {
        self.bm25
            .search(&terms(query), k)
            .into_iter()
            .map(|hit| LoreHit {
                index: hit.doc,
                score: hit.score,
                matched_terms: hit.matched,
                query_terms: hit.query_terms,
            })
            .collect()
    }

    /// The single best entry for `query`, if any entry shares a term with it: "did any
    /// knowledge entry match this line, and how well" (see [`LoreHit::coverage`]).
    #[must_use]
    pub fn best_match(&self, query: &str) -> Option<LoreHit> {
        self.search(query, 1).into_iter().next()
    }

    /// The entry at `index`.
    #[must_use]
    pub fn entry(&self, index: usize) -> Option<&LoreEntry> {
        self.entries.get(index)
    }

    /// All entries, in index order.
    #[must_use]
    pub fn entries(&self) -> &[LoreEntry] {
        &self.entries
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the index has no entries.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A BM25 index over pre-tokenized documents (shared by lore and memories).
#[derive(Clone, Debug, Default)]
pub(crate) struct Bm25 {
    /// term → (document, term frequency) for every document containing it.
    postings: HashMap<String, Vec<(usize, u32)>>,
    lengths: Vec<f32>,
    average_length: f32,
}

/// A document's score for a query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Bm25Hit {
    pub(crate) doc: usize,
    pub(crate) score: f32,
    pub(crate) matched: usize,
    pub(crate) query_terms: usize,
}

/// Term-frequency saturation.
const K1: f32 = 1.2;
/// Length normalisation.
const B: f32 = 0.75;

impl Bm25 {
    pub(crate) fn new(documents: impl IntoIterator<Item = Vec<String>>) -> Self {
        let mut postings: HashMap<String, Vec<(usize, u32)>> = HashMap::new();
        let mut lengths = Vec::new();
        for (doc, terms) in documents.into_iter().enumerate() {
            lengths.push(terms.len() as f32);
            let mut counts: HashMap<String, u32> = HashMap::new();
            for term in terms {
                *counts.entry(term).or_default() += 1;
            }
            for (term, count) in counts {
                postings.entry(term).or_default().push((doc, count));
            }
        }
        let average_length = if lengths.is_empty() {
            0.0
        } else {
            lengths.iter().sum::<f32>() / lengths.len() as f32
        };
        Self {
            postings,
            lengths,
            average_length,
        }
    }

    /// Scores of every document sharing a term with `query`, indexed by document.
    pub(crate) fn scores(&self, query: &[String]) -> Vec<(f32, usize)> {
        let mut scores = vec![(0.0f32, 0usize); self.lengths.len()];
        let n = self.lengths.len() as f32;
        let mut seen: Vec<&str> = Vec::new();
        for term in query {
            if seen.contains(&term.as_str()) {
                continue;
            }
            seen.push(term);
            let Some(postings) = self.postings.get(term) else {
                continue;
            };
            let df = postings.len() as f32;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for &(doc, tf) in postings {
                let tf = tf as f32;
                let norm = 1.0 - B + B * self.lengths[doc] / self.average_length.max(1.0);
                scores[doc].0 += idf * tf * (K1 + 1.0) / (tf + K1 * norm);
                scores[doc].1 += 1;
            }
        }
        scores
    }

    /// The `k` best documents for `query` with a positive score, best first (ties: earlier
    /// document first).
    pub(crate) fn search(&self, query: &[String], k: usize) -> Vec<Bm25Hit> {
        let mut distinct: Vec<&String> = query.iter().collect();
        distinct.sort();
        distinct.dedup();
        let query_terms = distinct.len();
        let mut hits: Vec<Bm25Hit> = self
            .scores(query)
            .into_iter()
            .enumerate()
            .filter(|(_, (score, _))| *score > 0.0)
            .map(|(doc, (score, matched))| Bm25Hit {
                doc,
                score,
                matched,
                query_terms,
            })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.doc.cmp(&b.doc)));
        hits.truncate(k);
        hits
    }
}

/// Words too common to say anything about which entry answers a question.
const STOPWORDS: &[&str] = &[
    "a", "about", "after", "again", "all", "also", "am", "an", "and", "any", "are", "as", "at",
    "be", "been", "before", "being", "but", "by", "can", "could", "did", "do", "does", "doing",
    "for", "from", "get", "got", "had", "has", "have", "having", "he", "her", "here", "hers",
    "him", "his", "how", "i", "if", "in", "into", "is", "it", "its", "just", "know", "let", "like",
    "me", "might", "mine", "more", "most", "must", "my", "no", "nor", "not", "now", "of", "off",
    "on", "once", "only", "or", "other", "our", "ours", "out", "over", "own", "please", "same",
    "shall", "she", "should", "so", "some", "such", "tell", "than", "that", "the", "their",
    "theirs", "them", "then", "there", "these", "they", "this", "those", "through", "to", "too",
    "up", "us", "very", "was", "we", "were", "what", "when", "which", "while", "who", "whom",
    "why", "will", "with", "would", "you", "your", "yours", "s", "t", "d", "ll", "re", "ve", "m",
];

/// Question words mapped onto the words of the sentences that answer them.
const SYNONYMS: &[(&str, &str)] = &[
    ("price", "cost"),
    ("much", "cost"),
    ("pay", "cost"),
    ("charge", "lead"),
    ("worth", "cost"),
    ("coin", "gold"),
    ("purchase", "buy"),
    ("bought", "buy"),
    ("sold", "buy"),
    ("sell", "buy"),
    ("shop", "buy"),
    ("boss", "lead"),
    ("leader", "lead"),
    ("chief", "lead"),
    ("rule", "lead"),
    ("ruler", "lead"),
    ("mayor", "lead"),
    ("named", "name"),
    ("called", "name"),
    ("call", "name"),
    ("located", "lie"),
    ("lies", "lie"),
    ("open", "hour"),
    ("opens", "hour"),
    ("closes", "hour"),
    ("sick", "ill"),
    ("illness", "ill"),
    ("disease", "ill"),
    ("cure", "heal"),
    ("medicine", "heal"),
    ("potion", "heal"),
    ("weapon", "sword"),
    ("blade", "sword"),
    ("eat", "food"),
    ("meal", "food"),
    ("drink", "ale"),
    ("beer", "ale"),
    ("sleep", "room"),
    ("bed", "room"),
    ("wolve", "wolf"),
];

/// The search terms of a text: lowercased words, stopwords dropped, stemmed, synonyms
/// folded. Deterministic; the same function indexes and queries.
#[must_use]
pub fn terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .filter(|word| !STOPWORDS.contains(&word.as_str()))
        .map(|word| {
            let stemmed = stem(&word);
            SYNONYMS
                .iter()
                .find(|(from, _)| *from == word || stem(from) == stemmed)
                .map_or(stemmed, |(_, to)| stem(to))
        })
        .filter(|term| !term.is_empty())
        .collect()
}

/// A light English suffix stripper: enough to meet plurals, tenses and -ing forms, never
/// shortening a word below three letters.
fn stem(word: &str) -> String {
    if word.chars().any(|c| !c.is_ascii_alphabetic()) || word.len() <= 3 {
        return word.to_owned();
    }
    let rules: &[(&str, &str)] = &[
        ("ies", "y"),
        ("sses", "ss"),
        ("ves", "f"),
        ("ing", ""),
        ("edly", ""),
        ("ed", ""),
        ("ly", ""),
        ("es", ""),
        ("s", ""),
    ];
    for (suffix, replacement) in rules {
        if let Some(base) = word.strip_suffix(suffix) {
            if base.len() < 3 || (*suffix == "s" && base.ends_with('s')) {
                continue;
            }
            let mut stemmed = format!("{base}{replacement}");
            // "running" → "runn" → "run"; "stopped" → "stopp" → "stop".
            let bytes = stemmed.as_bytes();
            let n = bytes.len();
            if (*suffix == "ing" || *suffix == "ed")
                && n >= 2
                && bytes[n - 1] == bytes[n - 2]
                && !matches!(bytes[n - 1], b'l' | b's' | b'z')
            {
                stemmed.pop();
            }
            // "wolves" → "wolf" but "caves" → "cave": only a few words take -ves → -f.
            if *suffix == "ves" && !matches!(base, "wol" | "hal" | "lea" | "thie" | "kni" | "shel")
            {
                stemmed = format!("{base}ve");
            }
            // "houses" → "hous" but "boxes" → "box": keep the 'e' where English does.
            if *suffix == "es"
                && !matches!(base.as_bytes()[base.len() - 1], b's' | b'x' | b'z' | b'h')
            {
                stemmed = format!("{base}e");
            }
            return strip_final_e(stemmed);
        }
    }
    strip_final_e(word.to_owned())
}

/// "stone"/"stones" and "cure"/"cured" meet at "ston"/"cur".
fn strip_final_e(mut word: String) -> String {
    if word.len() > 3 && word.ends_with('e') && !word.ends_with("ee") {
        word.pop();
    }
    word
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, text: &str) -> LoreEntry {
        LoreEntry {
            id: id.into(),
            title: String::new(),
            text: text.into(),
            keywords: Vec::new(),
        }
    }

    #[test]
    fn a_lore_file_past_the_limit_is_refused_unread() {
        let path = std::env::temp_dir().join(format!("npc-huge-lore-{}.ron", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        // A sparse file: its size is past the limit, nothing is written.
        file.set_len(MAX_LORE_BYTES + 1).unwrap();
        let err = LoreBook::load(&path).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert_eq!(err.field.as_deref(), Some("lore"));
        assert!(err.message.contains("more than the"), "{err}");
    }

    fn index() -> LoreIndex {
        LoreIndex::new(vec![
            entry("sword", "An iron sword from Brom's forge costs 40 gold."),
            entry(
                "mine",
                "The Greyfang Mine lies two hours north of the village; its iron ore feeds the forge.",
            ),
            entry(
                "wolves",
                "Wolves have been seen on the road to the mine since the first frost.",
            ),
            entry(
                "healing",
                "Sister Ilse sells healing potions at the chapel for 25 gold.",
            ),
            entry(
                "mayor",
                "Lady Orla has been mayor of Oakvale for eleven years.",
            ),
            entry("inn", "A room at the Sleeping Fox costs 5 gold a night."),
        ])
    }

    fn top(index: &LoreIndex, query: &str) -> String {
        let hit = index.best_match(query).expect("something matches");
        index.entry(hit.index).unwrap().id.clone()
    }

    #[test]
    fn stems_and_folds_question_words() {
        assert_eq!(terms("Swords"), ["sword"]);
        assert_eq!(terms("How much are the swords?"), ["cost", "sword"]);
        assert_eq!(terms("wolves"), terms("wolf"));
        assert_eq!(terms("healing"), terms("heal"));
        assert_eq!(terms("stopped"), ["stop"]);
        assert_eq!(terms("caves"), terms("cave"));
        assert!(terms("what is it that you do").is_empty());
    }

    #[test]
    fn paraphrased_questions_find_their_entry() {
        let index = index();
        assert_eq!(top(&index, "What's the price of a blade?"), "sword");
        assert_eq!(top(&index, "Where do you get your ore?"), "mine");
        assert_eq!(
            top(&index, "Is the road dangerous? I heard of a wolf."),
            "wolves"
        );
        assert_eq!(top(&index, "I need something to heal my wounds"), "healing");
        assert_eq!(top(&index, "Who rules this village?"), "mayor");
        assert_eq!(top(&index, "Where can I sleep tonight?"), "inn");
    }

    #[test]
    fn unrelated_lines_match_nothing_and_k_bounds_results() {
        let index = index();
        assert!(index.search("hello there", 3).is_empty());
        assert!(index.best_match("").is_none());
        let hits = index.search("gold", 2);
        assert_eq!(hits.len(), 2);
        assert!(hits[0].score >= hits[1].score);
        let hit = index.best_match("sword gold dragon").unwrap();
        assert_eq!((hit.matched_terms, hit.query_terms), (2, 3));
        assert!((hit.coverage() - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn lore_files_parse_and_report_bad_entries() {
        let book = LoreBook::from_ron(
            r#"(entries: [(id: "a", title: "A", text: "Alpha.", keywords: ["x"])])"#,
            None,
        )
        .unwrap();
        assert_eq!(book.entries.len(), 1);
        let err = LoreBook::from_ron("(entries: [(id: \"a\", txt: \"x\")])", Some("w.lore.ron"))
            .unwrap_err();
        assert_eq!(err.file.as_deref(), Some("w.lore.ron"));
        assert!(err.line > 0, "{err}");
        let err = LoreBook::from_ron("(entries: [(id: \"\", text: \"x\")])", None).unwrap_err();
        assert!(err.message.contains("non-empty"), "{err}");
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        const SHIPPED: &str = include_str!("../../../assets/lore/oakvale.lore.ron");

        fn floor(text: &str, mut at: usize) -> usize {
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            at
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            #[test]
            fn a_damaged_lore_file_is_an_error_naming_the_file_or_a_valid_book(
                a in any::<proptest::sample::Index>(),
                b in any::<proptest::sample::Index>(),
                insert in "[(){}\\[\\]\",:a-z0-9 \n]{0,6}",
            ) {
                let (a, b) = (a.index(SHIPPED.len()), b.index(SHIPPED.len()));
                let (from, to) = (floor(SHIPPED, a.min(b)), floor(SHIPPED, a.max(b)));
                let text = format!("{}{insert}{}", &SHIPPED[..from], &SHIPPED[to..]);
                match LoreBook::from_ron(&text, Some("oakvale.lore.ron")) {
                    Ok(book) => prop_assert!(book
                        .entries
                        .iter()
                        .all(|e| !e.id.trim().is_empty() && !e.text.trim().is_empty())),
                    Err(err) => {
                        prop_assert_eq!(err.file.as_deref(), Some("oakvale.lore.ron"));
                        prop_assert_eq!(err.field.as_deref(), Some("lore"));
                    }
                }
            }
        }
    }
}
