//! Word error rate: the word-level edit distance between a reference and a hypothesis,
//! divided by the reference's length, after normalising case and punctuation.

/// Lower-cases, turns everything but letters, digits and apostrophes into spaces, splits into
/// words, and writes spelled-out numbers below a million as digits ("fifty" and "50" are the
/// same word to a listener; recognisers pick either).
#[must_use]
pub fn normalize(text: &str) -> Vec<String> {
    let words: Vec<String> = text
        .to_lowercase()
        .replace(['\u{2019}', '`'], "'")
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect();
    let mut out = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        match spelled_number(&words[i..]) {
            Some((value, used)) => {
                out.push(value.to_string());
                i += used;
            }
            None => {
                out.push(words[i].clone());
                i += 1;
            }
        }
    }
    out
}

fn small_number(word: &str) -> Option<u64> {
    const UNITS: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 8] = [
        "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    if let Some(n) = UNITS.iter().position(|&u| u == word) {
        return Some(n as u64);
    }
    if let Some(n) = TENS.iter().position(|&t| t == word) {
        return Some(20 + 10 * n as u64);
    }
    let (tens, unit) = word.split_once('-')?;
    let t = TENS.iter().position(|&t| t == tens)?;
    let u = UNITS[1..10].iter().position(|&u| u == unit)?;
    Some(20 + 10 * t as u64 + 1 + u as u64)
}

/// The value of the spelled number starting `words`, and how many words it took.
fn spelled_number(words: &[String]) -> Option<(u64, usize)> {
    let (mut total, mut current, mut used) = (0u64, None::<u64>, 0);
    for word in words {
        match (word.as_str(), current) {
            ("hundred", Some(c)) if c < 100 => current = Some(c * 100),
            ("thousand", Some(c)) if total == 0 => {
                total = c * 1000;
                current = Some(0);
            }
            ("and", Some(_))
                if used + 1 < words.len() && small_number(&words[used + 1]).is_some() => {}
            (w, _) => match (small_number(w), current) {
                (Some(n), None) => current = Some(n),
                (Some(n), Some(c)) if c % 100 == 0 && c % 1000 != 0 && n < 100 => {
                    current = Some(c + n);
                }
                (Some(n), Some(c))
                    if c % 10 == 0 && (20..100).contains(&(c % 100)) && (1..10).contains(&n) =>
                {
                    current = Some(c + n);
                }
                (Some(n), Some(0)) if total > 0 => current = Some(n),
                _ => break,
            },
        }
        used += 1;
    }
    let value = total + current?;
    Some((value, used))
}

/// Substitutions, deletions and insertions aligning `hypothesis` to `reference`.
#[must_use]
pub fn word_errors(reference: &[String], hypothesis: &[String]) -> usize {
    let mut previous: Vec<usize> = (0..=hypothesis.len()).collect();
    for (i, r) in reference.iter().enumerate() {
        let mut current = vec![i + 1; hypothesis.len() + 1];
        for (j, h) in hypothesis.iter().enumerate() {
            let substitution = previous[j] + usize::from(r != h);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[hypothesis.len()]
}

/// Word error rate of `hypothesis` against `reference` (0 = perfect; can exceed 1).
#[must_use]
pub fn wer(reference: &str, hypothesis: &str) -> f64 {
    let (r, h) = (normalize(reference), normalize(hypothesis));
    if r.is_empty() {
        return if h.is_empty() { 0.0 } else { 1.0 };
    }
    word_errors(&r, &h) as f64 / r.len() as f64
}

/// Ten NPC lines the voice round trips speak and transcribe: the helper's test (espeak-ng) and
/// the voice bench (Piper beside espeak-ng), so their word error rates are comparable.
pub const NPC_LINES: [&str; 10] = [
    "Welcome to my forge, traveler.",
    "I need twenty iron bars before the winter comes.",
    "The bridge to the north was destroyed by the river.",
    "Have you seen my brother near the old mill?",
    "That sword will cost you fifty gold coins.",
    "The king has ordered all gates closed at night.",
    "Bring me three wolf pelts and I will pay you well.",
    "Stay away from the forest after dark.",
    "My shop opens at dawn and closes at sunset.",
    "Thank you for helping our village.",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_substitutions_insertions_and_deletions() {
        assert_eq!(wer("Hello, there!", "hello there"), 0.0);
        assert_eq!(wer("the cat sat", "the bat sat"), 1.0 / 3.0);
        assert_eq!(wer("the cat sat", "the cat"), 1.0 / 3.0);
        assert_eq!(wer("the cat sat", "the big cat sat down"), 2.0 / 3.0);
        assert_eq!(wer("a b c d", "d c b a"), 1.0);
        assert_eq!(wer("I'm fine", "I\u{2019}m fine."), 0.0);
        assert_eq!(wer("", ""), 0.0);
        assert_eq!(
            wer("That costs fifty gold coins.", "That costs 50 gold coins."),
            0.0
        );
        assert_eq!(
            normalize("twenty-one or two hundred and five, three thousand"),
            ["21", "or", "205", "3000"]
        );
        assert_eq!(normalize("one two"), ["1", "2"]);
    }
}
