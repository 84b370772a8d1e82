//! Corpus BLEU exactly as sacreBLEU's `corpus_bleu` computes it with its
//! defaults: the `13a` tokenizer, case-sensitive, `exp` smoothing, maximum
//! n-gram order 4, one reference per segment, and the brevity penalty on the
//! summed reference lengths.
//!
//! `bleu_1` … `bleu_4` are sacreBLEU's `BLEU.precisions`: the corpus-level
//! clipped n-gram precisions of order 1 to 4 (after smoothing), on its 0–100
//! scale. They are not BLEU scores computed with a lower maximum order; the
//! paper's appendix reports "bleu-1..3" without saying which it used.

use std::collections::HashMap;

use serde::Serialize;

const MAX_ORDER: usize = 4;

/// sacreBLEU's `13a` tokenizer (mteval-v13a): unescapes a few HTML entities,
/// splits off punctuation and symbols, periods and commas unless next to a
/// digit, and dashes after a digit.
pub fn tokenize_13a(line: &str) -> String {
    // sacreBLEU strips trailing whitespace before tokenising.
    let mut s = line
        .trim_end()
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if s.contains('&') {
        s = s
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let s = format!(" {s} ");
    // [\{-\~\[-\` -\&\(-\+\:-\@\/] gets spaces around it.
    let is_symbol =
        |c: char| matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/');
    let mut spaced = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if is_symbol(c) {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    let is_digit = |c: char| c.is_ascii_digit();
    let period_comma = |c: char| c == '.' || c == ',';
    // ([^0-9])([\.,]) -> "\1 \2 "
    let s = sub_pairs(
        &spaced,
        |a, b| !is_digit(a) && period_comma(b),
        |a, b| format!("{a} {b} "),
    );
    // ([\.,])([^0-9]) -> " \1 \2"
    let s = sub_pairs(
        &s,
        |a, b| period_comma(a) && !is_digit(b),
        |a, b| format!(" {a} {b}"),
    );
    // ([0-9])(-) -> "\1 \2 "
    let s = sub_pairs(
        &s,
        |a, b| is_digit(a) && b == '-',
        |a, b| format!("{a} {b} "),
    );
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Python's `re.sub` for a two-character pattern: scans left to right and
/// replaces non-overlapping matches.
fn sub_pairs(
    s: &str,
    matches: impl Fn(char, char) -> bool,
    replace: impl Fn(char, char) -> String,
) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len() + 16);
    let mut i = 0;
    while i < chars.len() {
        if i + 1 < chars.len() && matches(chars[i], chars[i + 1]) {
            out.push_str(&replace(chars[i], chars[i + 1]));
            i += 2;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn ngram_counts(tokens: &[&str], order: usize) -> HashMap<Vec<String>, usize> {
    let mut counts = HashMap::new();
    for n in 1..=order {
        for window in tokens.windows(n) {
            *counts
                .entry(window.iter().map(|s| s.to_string()).collect())
                .or_insert(0) += 1;
        }
    }
    counts
}

/// The sufficient statistics sacreBLEU accumulates over a corpus.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BleuStats {
    pub hyp_len: usize,
    pub ref_len: usize,
    pub correct: [usize; MAX_ORDER],
    pub total: [usize; MAX_ORDER],
}

impl BleuStats {
    /// Adds one segment (already tokenised) to the statistics.
    pub fn add(&mut self, hypothesis: &str, reference: &str) {
        let hyp: Vec<&str> = hypothesis.split_whitespace().collect();
        let rf: Vec<&str> = reference.split_whitespace().collect();
        self.hyp_len += hyp.len();
        self.ref_len += rf.len();
        let ref_counts = ngram_counts(&rf, MAX_ORDER);
        for (ngram, count) in ngram_counts(&hyp, MAX_ORDER) {
            let n = ngram.len() - 1;
            self.total[n] += count;
            self.correct[n] += count.min(ref_counts.get(&ngram).copied().unwrap_or(0));
        }
    }
}

/// A corpus BLEU result, on sacreBLEU's 0–100 scale.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bleu {
    pub score: f64,
    /// Clipped n-gram precisions of order 1..=4 (`BLEU.precisions`).
    pub precisions: [f64; MAX_ORDER],
    pub brevity_penalty: f64,
    pub hyp_len: usize,
    pub ref_len: usize,
}

/// sacreBLEU's `compute_bleu` with `exp` smoothing on accumulated statistics.
pub fn bleu_from_stats(stats: &BleuStats) -> Bleu {
    let brevity_penalty = if stats.hyp_len >= stats.ref_len {
        1.0
    } else if stats.hyp_len == 0 {
        0.0
    } else {
        (1.0 - stats.ref_len as f64 / stats.hyp_len as f64).exp()
    };
    let mut precisions = [0.0; MAX_ORDER];
    let result = |score: f64, precisions: [f64; MAX_ORDER]| Bleu {
        score,
        precisions,
        brevity_penalty,
        hyp_len: stats.hyp_len,
        ref_len: stats.ref_len,
    };
    // No matching n-gram of any order: 0, with all precisions 0 (sacreBLEU #141).
    if stats.correct.iter().all(|&c| c == 0) {
        return result(0.0, precisions);
    }
    let mut smooth = 1.0;
    for ((precision, &total), &correct) in
        precisions.iter_mut().zip(&stats.total).zip(&stats.correct)
    {
        if total == 0 {
            break;
        }
        *precision = if correct == 0 {
            smooth *= 2.0;
            100.0 / (smooth * total as f64)
        } else {
            100.0 * correct as f64 / total as f64
        };
    }
    let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
    let score = brevity_penalty
        * (precisions.iter().map(|&p| log(p)).sum::<f64>() / MAX_ORDER as f64).exp();
    result(score, precisions)
}

/// Corpus BLEU of `hypotheses` against one reference each, as
/// `sacrebleu.corpus_bleu(hypotheses, [references])`.
///
/// ```
/// use lora_mini::metrics::bleu::corpus_bleu;
/// let b = corpus_bleu(&["The cat sat on the mat."], &["The cat sat on the mat."]);
/// assert!((b.score - 100.0).abs() < 1e-9);
/// ```
pub fn corpus_bleu<H: AsRef<str>, R: AsRef<str>>(hypotheses: &[H], references: &[R]) -> Bleu {
    let mut stats = BleuStats::default();
    for (h, r) in hypotheses.iter().zip(references) {
        stats.add(&tokenize_13a(h.as_ref()), &tokenize_13a(r.as_ref()));
    }
    bleu_from_stats(&stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_13a_examples() {
        assert_eq!(
            tokenize_13a("Hello, world! It's 3.14 or 1,000-2."),
            "Hello , world ! It's 3.14 or 1,000 - 2 ."
        );
        assert_eq!(tokenize_13a("a&amp;b &quot;q&quot;"), "a & b \" q \"");
        assert_eq!(
            tokenize_13a("Ştiri: „România” (azi)."),
            "Ştiri : „România” ( azi ) ."
        );
    }
}
