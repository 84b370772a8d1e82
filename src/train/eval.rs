//! Evaluation: a task's official metrics on predicted labels.

use std::collections::BTreeMap;

use crate::data::{Label, Metric, Task};
use crate::metrics;

/// The task's metrics for predicted against gold labels; `None` where a
/// metric is undefined.
pub fn score_labels(
    task: &Task,
    predictions: &[Label],
    references: &[Label],
) -> BTreeMap<String, Option<f64>> {
    let classes = |ls: &[Label]| -> Vec<usize> {
        ls.iter()
            .map(|l| {
                if let Label::Class(c) = l {
                    *c
                } else {
                    usize::MAX
                }
            })
            .collect()
    };
    let scores = |ls: &[Label]| -> Vec<f64> {
        ls.iter()
            .map(|l| match l {
                Label::Score(s) => *s as f64,
                Label::Class(c) => *c as f64,
            })
            .collect()
    };
    let mut out = BTreeMap::new();
    for metric in task.metrics {
        let (name, value) = match metric {
            Metric::Accuracy => (
                "accuracy",
                metrics::accuracy(&classes(predictions), &classes(references)),
            ),
            Metric::F1 => (
                "f1",
                metrics::f1_binary(&classes(predictions), &classes(references)),
            ),
            Metric::Mcc => (
                "mcc",
                metrics::matthews_corrcoef(&classes(predictions), &classes(references)),
            ),
            Metric::Pearson => (
                "pearson",
                metrics::pearson(&scores(predictions), &scores(references)),
            ),
            Metric::Spearman => (
                "spearman",
                metrics::spearman(&scores(predictions), &scores(references)),
            ),
            Metric::Bleu | Metric::Rouge => continue,
        };
        out.insert(name.to_string(), value);
    }
    out
}
