//! `lora-mini score`: a task's official metrics for a predictions file
//! against a references file, as sacreBLEU's command line scores a system.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::Value;

use super::Error;
use lora_mini::data::error::{lines, read_text};
use lora_mini::data::examples::parse_label;
use lora_mini::data::{read_glue_tsv, task, Label, Task, TaskKind};
use lora_mini::metrics;
use lora_mini::train::eval::score_labels;

/// Options of `lora-mini score`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    lora-mini score --task wmt16-en-ro --predictions hyp.ro --references newstest2016-enro.ro --json\n  \
    lora-mini score --task cola --predictions preds.jsonl --references ../shared/data/glue/CoLA/dev.tsv")]
pub struct ScoreArgs {
    /// cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli or wmt16-en-ro.
    #[arg(long)]
    pub task: String,
    /// One prediction per line (a label as GLUE's TSV writes it, a score, or a
    /// translation), or `lora-mini predict`'s JSONL output.
    #[arg(long, value_name = "FILE")]
    pub predictions: PathBuf,
    /// One reference per line, or the task's dev TSV.
    #[arg(long, value_name = "FILE")]
    pub references: PathBuf,
    /// Porter-stem tokens for ROUGE (rouge-score's `use_stemmer=True`).
    #[arg(long)]
    pub rouge_stem: bool,
    /// Print one JSON object (BLEU on sacreBLEU's 0-100 scale; ROUGE,
    /// accuracy, F1, MCC and correlations as fractions).
    #[arg(long)]
    pub json: bool,
}

/// The entries of a predictions file: plain lines, or the `prediction` /
/// `translation` field of each JSONL object.
fn read_predictions(path: &Path) -> Result<Vec<String>, Error> {
    let text = read_text(path)?;
    let is_jsonl = path.extension().is_some_and(|e| e == "jsonl");
    lines(&text)
        .iter()
        .enumerate()
        .map(|(i, line)| {
            if !is_jsonl {
                return Ok(line.to_string());
            }
            let at_line = |message: String| Error::Data {
                path: path.to_path_buf(),
                line: Some(i + 1),
                message,
            };
            let v: Value =
                serde_json::from_str(line).map_err(|e| at_line(format!("invalid JSON: {e}")))?;
            match v.get("prediction").or_else(|| v.get("translation")) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Number(n)) => Ok(n.to_string()),
                _ => Err(at_line(
                    "expected a \"prediction\" or \"translation\" field".into(),
                )),
            }
        })
        .collect()
}

fn labels_of(task: &Task, path: &Path, rows: &[String]) -> Result<Vec<Label>, Error> {
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            parse_label(task, r).map_err(|message| Error::Data {
                path: path.to_path_buf(),
                line: Some(i + 1),
                message,
            })
        })
        .collect()
}

pub fn run(args: &ScoreArgs) -> Result<(), Error> {
    let task = task(&args.task)?;
    let predictions = read_predictions(&args.predictions)?;
    let mut results: BTreeMap<String, Option<f64>> = BTreeMap::new();
    let count_mismatch = |n: usize| -> Error {
        format!(
            "{} has {} predictions but {} has {} references",
            args.predictions.display(),
            predictions.len(),
            args.references.display(),
            n
        )
        .into()
    };
    if task.kind == TaskKind::Translation {
        let refs_text = read_text(&args.references).map_err(|e| e.to_string())?;
        let refs: Vec<&str> = lines(&refs_text);
        if refs.len() != predictions.len() {
            return Err(count_mismatch(refs.len()));
        }
        let bleu = metrics::corpus_bleu(&predictions, &refs);
        results.insert("bleu".into(), Some(bleu.score));
        for (i, p) in bleu.precisions.iter().enumerate() {
            results.insert(format!("bleu_{}", i + 1), Some(*p));
        }
        let rouge = metrics::corpus_rouge(&predictions, &refs, args.rouge_stem);
        results.insert("rouge1".into(), rouge.map(|r| r.rouge1));
        results.insert("rouge2".into(), rouge.map(|r| r.rouge2));
        results.insert("rougeL".into(), rouge.map(|r| r.rouge_l));
    } else {
        let gold: Vec<Label> = if args.references.extension().is_some_and(|e| e == "tsv") {
            read_glue_tsv(task, &args.references)
                .map_err(|e| e.to_string())?
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    e.label.ok_or_else(|| {
                        format!("{}: row {} has no label", args.references.display(), i + 1)
                    })
                })
                .collect::<Result<_, _>>()?
        } else {
            let text = read_text(&args.references).map_err(|e| e.to_string())?;
            let rows: Vec<String> = lines(&text).iter().map(|s| s.to_string()).collect();
            labels_of(task, &args.references, &rows)?
        };
        if gold.len() != predictions.len() {
            return Err(count_mismatch(gold.len()));
        }
        let predicted = labels_of(task, &args.predictions, &predictions)?;
        results = score_labels(task, &predicted, &gold);
    }
    for (name, value) in &results {
        if value.is_none() {
            eprintln!("warning: {name} is undefined for these inputs (e.g. constant predictions); reported as null");
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&results).map_err(|e| e.to_string())?
        );
    } else {
        for (name, value) in &results {
            match value {
                Some(v) => println!("{name:<10} {v:.4}"),
                None => println!("{name:<10} undefined"),
            }
        }
    }
    Ok(())
}
