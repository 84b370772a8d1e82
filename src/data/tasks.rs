//! The task registry: every GLUE task and WMT16 en-ro, with their columns,
//! labels and official metrics. A new task is one entry here.

use crate::Error;
use serde::Serialize;

/// What a task predicts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TaskKind {
    /// One of `labels`, written in GLUE's TSV files as the label string.
    Classification { labels: &'static [&'static str] },
    /// A float score in `range` (STS-B).
    Regression { range: (f32, f32) },
    /// Sequence to sequence.
    Translation,
    /// Next-token prediction for a decoder, on JSONL rows of `{"text"}`,
    /// `{"prompt", "completion"}` or `{"messages"}`.
    CausalLm,
}

/// An evaluation metric of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Accuracy,
    F1,
    Mcc,
    Pearson,
    Spearman,
    Bleu,
    Rouge,
    /// Mean negative log-likelihood per predicted token.
    Loss,
    Perplexity,
}

impl Metric {
    /// Every metric, for looking one up by name.
    const ALL: [Metric; 9] = [
        Self::Accuracy,
        Self::F1,
        Self::Mcc,
        Self::Pearson,
        Self::Spearman,
        Self::Bleu,
        Self::Rouge,
        Self::Loss,
        Self::Perplexity,
    ];

    /// Whether a larger value is better (false for loss and perplexity),
    /// which model selection needs.
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Self::Loss | Self::Perplexity)
    }

    /// Whether `candidate` is strictly better than `incumbent`.
    pub fn improves(self, candidate: f64, incumbent: f64) -> bool {
        if self.higher_is_better() {
            candidate > incumbent
        } else {
            candidate < incumbent
        }
    }

    /// The lower-case name results and logs use (`mcc`, `loss`...).
    pub fn name(self) -> String {
        format!("{self:?}").to_lowercase()
    }

    /// The metric a [`Metric::name`] names.
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// One task.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Task {
    /// The CLI name: `cola`, `sst2`, ..., `wmt16-en-ro`.
    pub name: &'static str,
    /// The folder in the GLUE distribution (`CoLA`, `SST-2`, ...).
    pub glue_dir: &'static str,
    /// The Hugging Face dataset and config (`nyu-mll/glue`, `cola`).
    pub hf_dataset: &'static str,
    pub hf_config: &'static str,
    /// Text columns, with Hugging Face's names.
    pub text_a: &'static str,
    pub text_b: Option<&'static str>,
    /// The TSV column names of the same fields (GLUE's files differ from HF's).
    pub tsv_text_a: &'static str,
    pub tsv_text_b: Option<&'static str>,
    pub tsv_label: &'static str,
    pub kind: TaskKind,
    /// Official metrics, the first being the headline one; CoLA also reports
    /// accuracy, which the paper's tables use.
    pub metrics: &'static [Metric],
    /// The dev split names (MNLI has matched and mismatched).
    pub dev_splits: &'static [&'static str],
}

const BINARY: &[&str] = &["0", "1"];
const ENTAILMENT2: &[&str] = &["entailment", "not_entailment"];

pub const TASKS: &[Task] = &[
    Task {
        name: "cola",
        glue_dir: "CoLA",
        hf_dataset: "nyu-mll/glue",
        hf_config: "cola",
        text_a: "sentence",
        text_b: None,
        tsv_text_a: "sentence",
        tsv_text_b: None,
        tsv_label: "label",
        kind: TaskKind::Classification { labels: BINARY },
        metrics: &[Metric::Mcc, Metric::Accuracy],
        dev_splits: &["validation"],
    },
    Task {
        name: "sst2",
        glue_dir: "SST-2",
        hf_dataset: "nyu-mll/glue",
        hf_config: "sst2",
        text_a: "sentence",
        text_b: None,
        tsv_text_a: "sentence",
        tsv_text_b: None,
        tsv_label: "label",
        kind: TaskKind::Classification { labels: BINARY },
        metrics: &[Metric::Accuracy],
        dev_splits: &["validation"],
    },
    Task {
        name: "mrpc",
        glue_dir: "MRPC",
        hf_dataset: "nyu-mll/glue",
        hf_config: "mrpc",
        text_a: "sentence1",
        text_b: Some("sentence2"),
        tsv_text_a: "#1 String",
        tsv_text_b: Some("#2 String"),
        tsv_label: "Quality",
        kind: TaskKind::Classification { labels: BINARY },
        metrics: &[Metric::F1, Metric::Accuracy],
        dev_splits: &["validation"],
    },
    Task {
        name: "stsb",
        glue_dir: "STS-B",
        hf_dataset: "nyu-mll/glue",
        hf_config: "stsb",
        text_a: "sentence1",
        text_b: Some("sentence2"),
        tsv_text_a: "sentence1",
        tsv_text_b: Some("sentence2"),
        tsv_label: "score",
        kind: TaskKind::Regression { range: (0.0, 5.0) },
        metrics: &[Metric::Pearson, Metric::Spearman],
        dev_splits: &["validation"],
    },
    Task {
        name: "qqp",
        glue_dir: "QQP",
        hf_dataset: "nyu-mll/glue",
        hf_config: "qqp",
        text_a: "question1",
        text_b: Some("question2"),
        tsv_text_a: "question1",
        tsv_text_b: Some("question2"),
        tsv_label: "is_duplicate",
        kind: TaskKind::Classification { labels: BINARY },
        metrics: &[Metric::Accuracy, Metric::F1],
        dev_splits: &["validation"],
    },
    Task {
        name: "mnli",
        glue_dir: "MNLI",
        hf_dataset: "nyu-mll/glue",
        hf_config: "mnli",
        text_a: "premise",
        text_b: Some("hypothesis"),
        tsv_text_a: "sentence1",
        tsv_text_b: Some("sentence2"),
        tsv_label: "gold_label",
        kind: TaskKind::Classification {
            labels: &["entailment", "neutral", "contradiction"],
        },
        metrics: &[Metric::Accuracy],
        dev_splits: &["validation_matched", "validation_mismatched"],
    },
    Task {
        name: "qnli",
        glue_dir: "QNLI",
        hf_dataset: "nyu-mll/glue",
        hf_config: "qnli",
        text_a: "question",
        text_b: Some("sentence"),
        tsv_text_a: "question",
        tsv_text_b: Some("sentence"),
        tsv_label: "label",
        kind: TaskKind::Classification {
            labels: ENTAILMENT2,
        },
        metrics: &[Metric::Accuracy],
        dev_splits: &["validation"],
    },
    Task {
        name: "rte",
        glue_dir: "RTE",
        hf_dataset: "nyu-mll/glue",
        hf_config: "rte",
        text_a: "sentence1",
        text_b: Some("sentence2"),
        tsv_text_a: "sentence1",
        tsv_text_b: Some("sentence2"),
        tsv_label: "label",
        kind: TaskKind::Classification {
            labels: ENTAILMENT2,
        },
        metrics: &[Metric::Accuracy],
        dev_splits: &["validation"],
    },
    Task {
        name: "wnli",
        glue_dir: "WNLI",
        hf_dataset: "nyu-mll/glue",
        hf_config: "wnli",
        text_a: "sentence1",
        text_b: Some("sentence2"),
        tsv_text_a: "sentence1",
        tsv_text_b: Some("sentence2"),
        tsv_label: "label",
        kind: TaskKind::Classification { labels: BINARY },
        metrics: &[Metric::Accuracy],
        dev_splits: &["validation"],
    },
    Task {
        name: "wmt16-en-ro",
        glue_dir: "",
        hf_dataset: "wmt16",
        hf_config: "ro-en",
        text_a: "en",
        text_b: None,
        tsv_text_a: "",
        tsv_text_b: None,
        tsv_label: "ro",
        kind: TaskKind::Translation,
        metrics: &[Metric::Bleu, Metric::Rouge],
        dev_splits: &["validation"],
    },
    Task {
        name: "causal-lm",
        glue_dir: "",
        hf_dataset: "",
        hf_config: "",
        text_a: "text",
        text_b: None,
        tsv_text_a: "",
        tsv_text_b: None,
        tsv_label: "",
        kind: TaskKind::CausalLm,
        metrics: &[Metric::Loss, Metric::Perplexity],
        dev_splits: &["validation"],
    },
];

/// Looks a task up by its CLI name (case-insensitive; `sst-2` and `sts-b`
/// are accepted too).
pub fn task(name: &str) -> Result<&'static Task, Error> {
    let wanted = name
        .to_ascii_lowercase()
        .replace("sst-2", "sst2")
        .replace("sts-b", "stsb");
    TASKS.iter().find(|t| t.name == wanted).ok_or_else(|| {
        Error::Message(format!(
            "unknown task {name:?}: one of {}",
            TASKS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
        ))
    })
}

impl Task {
    /// Output labels of a classification or regression head (1 for
    /// regression), `None` for translation.
    pub fn num_labels(&self) -> Option<usize> {
        match self.kind {
            TaskKind::Classification { labels } => Some(labels.len()),
            TaskKind::Regression { .. } => Some(1),
            TaskKind::Translation | TaskKind::CausalLm => None,
        }
    }

    /// The class index of a label as GLUE's TSV or HF's files write it (the
    /// string, or the index itself).
    pub fn class_index(&self, label: &str) -> Option<usize> {
        let TaskKind::Classification { labels } = self.kind else {
            return None;
        };
        let label = label.trim();
        labels
            .iter()
            .position(|l| *l == label)
            .or_else(|| label.parse::<usize>().ok().filter(|&i| i < labels.len()))
    }
}
