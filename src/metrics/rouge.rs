//! ROUGE-1, ROUGE-2 and ROUGE-L as Google's `rouge-score` package computes
//! them: its tokenizer (lowercase; every run of characters outside `a-z0-9`
//! becomes a space, so accented letters split words), optional Porter
//! stemming of tokens longer than three characters, per-segment F-measures,
//! and the mean over segments.

use std::collections::HashMap;

use serde::Serialize;

use super::porter::stem;

/// rouge-score's `tokenize`.
pub fn tokenize(text: &str, use_stemmer: bool) -> Vec<String> {
    let lower = text.to_lowercase();
    let cleaned: String = lower
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                ' '
            }
        })
        .collect();
    cleaned
        .split(' ')
        .filter(|t| !t.is_empty())
        .map(|t| {
            if use_stemmer && t.len() > 3 {
                stem(t)
            } else {
                t.to_string()
            }
        })
        .filter(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        .collect()
}

/// Precision, recall and F-measure of one segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

fn score(overlap: usize, prediction: usize, target: usize) -> Score {
    let precision = overlap as f64 / prediction.max(1) as f64;
    let recall = overlap as f64 / target.max(1) as f64;
    let fmeasure = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    Score {
        precision,
        recall,
        fmeasure,
    }
}

fn ngrams(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for w in tokens.windows(n) {
            *counts.entry(w).or_insert(0) += 1;
        }
    }
    counts
}

/// ROUGE-N of one `prediction` against its `target`, on tokens.
pub fn rouge_n(target: &[String], prediction: &[String], n: usize) -> Score {
    let t = ngrams(target, n);
    let p = ngrams(prediction, n);
    let overlap: usize = t
        .iter()
        .map(|(g, c)| (*c).min(p.get(g).copied().unwrap_or(0)))
        .sum();
    score(overlap, p.values().sum(), t.values().sum())
}

/// ROUGE-L (longest common subsequence) of one segment, on tokens.
pub fn rouge_l(target: &[String], prediction: &[String]) -> Score {
    if target.is_empty() || prediction.is_empty() {
        return Score::default();
    }
    let mut row = vec![0usize; prediction.len() + 1];
    for t in target {
        let mut diagonal = 0;
        for (j, p) in prediction.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if t == p {
                diagonal + 1
            } else {
                above.max(row[j])
            };
            diagonal = above;
        }
    }
    let lcs = row[prediction.len()];
    score(lcs, prediction.len(), target.len())
}

/// Mean F-measures over segments, as fractions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Rouge {
    pub rouge1: f64,
    pub rouge2: f64,
    #[serde(rename = "rougeL")]
    pub rouge_l: f64,
}

/// The mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures of `predictions`
/// against `targets` (one each), or `None` for an empty corpus.
///
/// ```
/// use lora_mini::metrics::rouge::corpus_rouge;
/// let r = corpus_rouge(&["the cat sat"], &["the cat sat"], false).unwrap();
/// assert_eq!((r.rouge1, r.rouge2, r.rouge_l), (1.0, 1.0, 1.0));
/// ```
pub fn corpus_rouge<P: AsRef<str>, T: AsRef<str>>(
    predictions: &[P],
    targets: &[T],
    use_stemmer: bool,
) -> Option<Rouge> {
    if predictions.is_empty() || predictions.len() != targets.len() {
        return None;
    }
    let (mut r1, mut r2, mut rl) = (0.0, 0.0, 0.0);
    for (p, t) in predictions.iter().zip(targets) {
        let (p, t) = (
            tokenize(p.as_ref(), use_stemmer),
            tokenize(t.as_ref(), use_stemmer),
        );
        r1 += rouge_n(&t, &p, 1).fmeasure;
        r2 += rouge_n(&t, &p, 2).fmeasure;
        rl += rouge_l(&t, &p).fmeasure;
    }
    let n = predictions.len() as f64;
    Some(Rouge {
        rouge1: r1 / n,
        rouge2: r2 / n,
        rouge_l: rl / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_drops_non_alphanumerics() {
        assert_eq!(
            tokenize("Ştiri: Azi, România!", false),
            vec!["tiri", "azi", "rom", "nia"]
        );
        let lcs = rouge_l(&tokenize("a b c d", false), &tokenize("a c d x", false));
        assert!((lcs.fmeasure - 0.75).abs() < 1e-12);
    }
}
