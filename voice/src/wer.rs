//! Word error rate: the word-level edit distance between a reference and a hypothesis,
//! divided by the reference's length, after normalising case and punctuation.

/// Lower-cases, turns everything but letters, digits and apostrophes into spaces, and splits
/// into words.
#[must_use]
pub fn normalize(text: &str) -> Vec<String> {
    text.to_lowercase()
        .replace(['\u{2019}', '`'], "'")
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
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
    }
}
