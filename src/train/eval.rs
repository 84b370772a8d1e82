//! Evaluation: a model's predictions on a dev or validation set, scored
//! with the task's official metrics.

use std::collections::BTreeMap;

#[cfg(feature = "train")]
use candle::{DType, Device, Tensor, D};

#[cfg(feature = "train")]
use crate::data::batch::{
    collate_classification, collate_seq2seq, ClassificationBatch, Encoded, EncodedPair,
};
use crate::data::{Label, Metric, Task};
#[cfg(feature = "train")]
use crate::decoder::instructions::{self, InstructionSet};
use crate::metrics;
#[cfg(feature = "train")]
use crate::models::task::{LoadedModel, TaskModel};
#[cfg(feature = "train")]
use crate::Error;

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
            Metric::Bleu | Metric::Rouge | Metric::Loss | Metric::Perplexity => continue,
        };
        out.insert(name.to_string(), value);
    }
    out
}
/// What a model is evaluated on: encoded examples with their labels, or
/// source sentences with reference translations.
#[cfg(feature = "train")]
pub enum EvalSet<'a> {
    Classification(&'a [Encoded]),
    Translation {
        pairs: &'a [EncodedPair],
        refs: &'a [String],
    },
    /// A decoder's tokenised rows, scored by loss and perplexity.
    CausalLm(&'a [crate::decoder::data::LmExample]),
    /// A built-in task asked of a decoder, scored by the task's metrics.
    Instructions(&'a InstructionSet),
}

/// The task's metrics on `set`.
#[cfg(feature = "train")]
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    loaded: &LoadedModel,
    task: &Task,
    set: EvalSet,
    tokenizer: &tokenizers::Tokenizer,
    batch_size: usize,
    max_new_tokens: usize,
    pad_id: u32,
    dev: &Device,
) -> Result<BTreeMap<String, Option<f64>>, Error> {
    match (set, &loaded.model) {
        (EvalSet::Classification(examples), model) => {
            let mut predicted = Vec::with_capacity(examples.len());
            for chunk in examples.chunks(batch_size) {
                let items: Vec<&Encoded> = chunk.iter().collect();
                let b = collate_classification(&items, pad_id, dev)?;
                let logits = classify_batch(model, &b, false)?;
                if logits.dim(1)? == 1 {
                    let v: Vec<f32> = logits
                        .squeeze(1)
                        .and_then(|l| l.to_dtype(DType::F32)?.to_vec1())?;
                    predicted.extend(v.into_iter().map(Label::Score));
                } else {
                    let v: Vec<u32> = logits.argmax(D::Minus1).and_then(|l| l.to_vec1())?;
                    predicted.extend(v.into_iter().map(|c| Label::Class(c as usize)));
                }
            }
            let gold: Vec<Label> = examples
                .iter()
                .map(|e| e.label.expect("evaluation labels were checked"))
                .collect();
            Ok(score_labels(task, &predicted, &gold))
        }
        (EvalSet::Translation { pairs, refs }, TaskModel::T5(m)) => {
            let mut hyps = Vec::with_capacity(pairs.len());
            for chunk in pairs.chunks(batch_size) {
                let items: Vec<&EncodedPair> = chunk.iter().collect();
                let b = collate_seq2seq(&items, pad_id, dev)?;
                let out =
                    m.generate_greedy(&b.input_ids, Some(&b.attention_mask), max_new_tokens)?;
                for ids in out {
                    hyps.push(tokenizer.decode(&ids, true).map_err(|e| e.to_string())?);
                }
            }
            Ok(translation_scores(&hyps, refs))
        }
        (EvalSet::CausalLm(examples), TaskModel::Llama(m)) => {
            let (nll, tokens) = crate::decoder::score_examples(m, examples, batch_size, pad_id)?;
            let loss = (tokens > 0).then(|| nll / tokens as f64);
            let mut scores = BTreeMap::new();
            scores.insert("loss".to_string(), loss);
            scores.insert("perplexity".to_string(), loss.map(f64::exp));
            Ok(scores)
        }
        (EvalSet::Instructions(set), TaskModel::Llama(m)) => {
            let quiet = |_| ();
            evaluate_decoder(
                m,
                task,
                set,
                tokenizer,
                batch_size,
                max_new_tokens,
                pad_id,
                quiet,
            )
        }
        (EvalSet::CausalLm(_) | EvalSet::Instructions(_), _) => {
            Err("causal-lm and instructions need a Llama-family decoder".into())
        }
        _ => Err("translation needs a T5 model".into()),
    }
}

/// BLEU and ROUGE-L of translations against their references.
#[cfg(feature = "train")]
fn translation_scores(hyps: &[String], refs: &[String]) -> BTreeMap<String, Option<f64>> {
    let bleu = crate::metrics::corpus_bleu(hyps, refs);
    let rouge = crate::metrics::corpus_rouge(hyps, refs, false);
    let mut scores = BTreeMap::new();
    scores.insert("bleu".to_string(), Some(bleu.score));
    scores.insert("rougeL".to_string(), rouge.map(|r| r.rouge_l));
    scores
}

/// A decoder's scores on a built-in task asked as instructions: label
/// words scored with the task's classification metrics, greedy
/// translations (up to `max_new_tokens`) with BLEU and ROUGE-L.
/// `progress` counts [`InstructionSet::work`] as it is done.
#[cfg(feature = "train")]
#[allow(clippy::too_many_arguments)]
pub fn evaluate_decoder(
    model: &crate::models::llama::LlamaForCausalLM,
    task: &Task,
    set: &InstructionSet,
    tokenizer: &tokenizers::Tokenizer,
    batch_size: usize,
    max_new_tokens: usize,
    pad_id: u32,
    progress: impl FnMut(usize),
) -> Result<BTreeMap<String, Option<f64>>, Error> {
    match set {
        InstructionSet::LabelWords { choices, gold } => {
            let predicted =
                instructions::predict_labels(model, choices, batch_size, pad_id, progress)?;
            Ok(score_labels(task, &predicted, gold))
        }
        InstructionSet::Translation {
            prompts,
            refs,
            eos_ids,
        } => {
            let answers =
                instructions::greedy_answers(model, prompts, eos_ids, max_new_tokens, progress)?;
            let hyps = answers
                .iter()
                .map(|ids| tokenizer.decode(ids, true).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(translation_scores(&hyps, refs))
        }
    }
}

#[cfg(feature = "train")]
/// The model's logits on a padded batch; `train` switches dropout on.
pub fn classify_batch(
    model: &TaskModel,
    batch: &ClassificationBatch,
    train: bool,
) -> candle::Result<Tensor> {
    model.classify(
        &batch.input_ids,
        Some(&batch.token_type_ids),
        Some(&batch.attention_mask),
        train,
    )
}
