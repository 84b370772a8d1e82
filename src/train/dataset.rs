//! A run's data: the task's splits read from disk or the hub, the seeded
//! training slice and validation split, tokenised.

use super::config::TrainConfig;
use super::eval::EvalSet;
use crate::data::batch::{encode_examples, encode_translation, Encoded, EncodedPair};
use crate::data::locate::{locate_data, DataSource};
use crate::data::{read_examples, read_parallel, Example, Task, TaskKind, TranslationPair};
use crate::decoder::data::{read_lm_jsonl, LmExample, LmRow};
use crate::decoder::instructions::{self, InstructionSet};
use crate::decoder::ChatTokenizer;
use crate::rng::SeededRng;
use crate::Error;
use std::path::Path;
use tokenizers::Tokenizer;

/// Tokenised training and evaluation data. `validation` is carved out of
/// the training set (`task.validation_split`) and empty without it.
pub(crate) enum Data {
    Classification {
        train: Vec<Encoded>,
        validation: Vec<Encoded>,
        dev: Vec<Encoded>,
    },
    Translation {
        train: Vec<EncodedPair>,
        validation: Vec<EncodedPair>,
        validation_refs: Vec<String>,
        dev: Vec<EncodedPair>,
        dev_refs: Vec<String>,
    },
    CausalLm {
        train: Vec<LmExample>,
        validation: Vec<LmExample>,
        dev: Vec<LmExample>,
    },
    /// A built-in task asked of a decoder (`decoder::instructions`).
    Instructions {
        train: Vec<LmExample>,
        validation: InstructionSet,
        dev: InstructionSet,
    },
}

impl Data {
    /// Reads, slices, splits and tokenises a decoder's JSONL data:
    /// `task.data` trains (less the validation slice), `task.dev_data`
    /// (else the validation slice) is the dev set. Rows whose every
    /// predicted token was truncated away are dropped, and counted.
    pub(super) fn load_causal_lm(
        config: &TrainConfig,
        text: &ChatTokenizer,
    ) -> Result<Data, Error> {
        let t = &config.task;
        let rows = decoder_rows(config, &t.data, "newsdev2016")?;
        let (train, validation) = training_examples(rows, config);
        let wmt = Path::new(&t.data).join("newstest2016-enro.en").exists();
        let dev = match &t.dev_data {
            Some(path) => dev_examples(decoder_rows(config, path, "newstest2016")?, config),
            None if wmt => dev_examples(decoder_rows(config, &t.data, "newstest2016")?, config),
            None if !validation.is_empty() => validation.clone(),
            None => {
                return Err(format!(
                    "task causal-lm needs a dev set: set task.dev_data = \"FILE.jsonl\" or task.validation_split (reading {})",
                    t.data
                )
                .into())
            }
        };
        let encode = |rows: &[LmRow], what: &str| encode_lm_rows(text, rows, t.max_len, what);
        Ok(Data::CausalLm {
            train: packed(encode(&train, "training")?, config),
            validation: encode(&validation, "validation")?,
            dev: encode(&dev, "dev")?,
        })
    }

    /// A built-in task as instructions for a decoder: GLUE classification
    /// answered by label words, WMT16 by the translation. The dev set and
    /// validation slice are scored with the task's metrics.
    pub(super) fn load_instructions(
        task: &Task,
        config: &TrainConfig,
        text: &ChatTokenizer,
    ) -> Result<Data, Error> {
        let max_len = config.task.max_len;
        if task.kind == TaskKind::Translation {
            let (train, validation) = training_examples(read_pairs(task, config, "train")?, config);
            let dev = dev_examples(read_pairs(task, config, "dev")?, config);
            let direction = config.task.direction;
            let rows = instructions::translation_rows(direction, &train);
            return Ok(Data::Instructions {
                train: packed(encode_lm_rows(text, &rows, max_len, "training")?, config),
                validation: InstructionSet::translation(text, direction, &validation)?,
                dev: InstructionSet::translation(text, direction, &dev)?,
            });
        }
        let prompt = instructions::prompt(task)?;
        let (train, validation) = training_examples(read_split(task, config, "train")?, config);
        let dev = dev_examples(read_split(task, config, "dev")?, config);
        let rows = instructions::classification_rows(&prompt, &train)?;
        Ok(Data::Instructions {
            train: packed(encode_lm_rows(text, &rows, max_len, "training")?, config),
            validation: InstructionSet::label_words(text, &prompt, &validation)?,
            dev: InstructionSet::label_words(text, &prompt, &dev)?,
        })
    }

    /// Reads, slices, splits and tokenises the data `config` asks for.
    pub(super) fn load(
        task: &Task,
        config: &TrainConfig,
        tokenizer: &Tokenizer,
    ) -> Result<Data, Error> {
        if config.task.packing {
            return Err("task.packing packs decoder rows; this model is not a decoder".into());
        }
        if config.optim.gradient_checkpointing {
            return Err(
                "optim.gradient_checkpointing is implemented for decoders (the Llama family) only"
                    .into(),
            );
        }
        match task.kind {
            TaskKind::Translation => Self::load_translation(task, config, tokenizer),
            TaskKind::CausalLm => Err(
                "causal-lm data needs the decoder's chat tokenizer (Data::load_causal_lm)".into(),
            ),
            _ => Self::load_classification(task, config, tokenizer),
        }
    }

    fn load_translation(
        task: &Task,
        config: &TrainConfig,
        tokenizer: &Tokenizer,
    ) -> Result<Data, Error> {
        let (train, validation) = training_examples(read_pairs(task, config, "train")?, config);
        let dev = dev_examples(read_pairs(task, config, "dev")?, config);
        let direction = config.task.direction;
        let prefix = source_prefix(config);
        let encode = |pairs: &[TranslationPair]| {
            encode_translation(
                tokenizer,
                pairs,
                direction,
                &prefix,
                config.task.max_len,
                config.task.max_target_len,
            )
        };
        let refs = |pairs: &[TranslationPair]| {
            pairs
                .iter()
                .map(|p| direction.split(p).1.to_string())
                .collect()
        };
        Ok(Data::Translation {
            train: encode(&train)?,
            validation: encode(&validation)?,
            validation_refs: refs(&validation),
            dev: encode(&dev)?,
            dev_refs: refs(&dev),
        })
    }

    fn load_classification(
        task: &Task,
        config: &TrainConfig,
        tokenizer: &Tokenizer,
    ) -> Result<Data, Error> {
        let (train, validation) = training_examples(read_split(task, config, "train")?, config);
        if train.iter().chain(&validation).any(|e| e.label.is_none()) {
            return Err("the training split has unlabelled rows".into());
        }
        let dev = dev_examples(read_split(task, config, "dev")?, config);
        if dev.iter().any(|e| e.label.is_none()) {
            return Err("the dev split has unlabelled rows".into());
        }
        let max_len = config.task.max_len;
        Ok(Data::Classification {
            train: encode_examples(tokenizer, &train, max_len)?,
            validation: encode_examples(tokenizer, &validation, max_len)?,
            dev: encode_examples(tokenizer, &dev, max_len)?,
        })
    }

    /// The token count of each training example (what batching by length
    /// sorts on).
    pub(super) fn train_lengths(&self) -> Vec<usize> {
        match self {
            Data::Classification { train, .. } => train.iter().map(|e| e.ids.len()).collect(),
            Data::Translation { train, .. } => train
                .iter()
                .map(|e| e.source.len() + e.target.len())
                .collect(),
            Data::CausalLm { train, .. } | Data::Instructions { train, .. } => {
                train.iter().map(|e| e.ids.len()).collect()
            }
        }
    }

    /// The official dev set.
    pub(super) fn dev(&self) -> EvalSet<'_> {
        match self {
            Data::Classification { dev, .. } => EvalSet::Classification(dev),
            Data::Translation { dev, dev_refs, .. } => EvalSet::Translation {
                pairs: dev,
                refs: dev_refs,
            },
            Data::CausalLm { dev, .. } => EvalSet::CausalLm(dev),
            Data::Instructions { dev, .. } => EvalSet::Instructions(dev),
        }
    }

    /// The validation slice carved out of the training data, if any.
    pub(super) fn validation(&self) -> Option<EvalSet<'_>> {
        match self {
            Data::Classification { validation, .. } if !validation.is_empty() => {
                Some(EvalSet::Classification(validation))
            }
            Data::Translation {
                validation,
                validation_refs,
                ..
            } if !validation.is_empty() => Some(EvalSet::Translation {
                pairs: validation,
                refs: validation_refs,
            }),
            Data::CausalLm { validation, .. } if !validation.is_empty() => {
                Some(EvalSet::CausalLm(validation))
            }
            Data::Instructions { validation, .. } if !validation.is_empty() => {
                Some(EvalSet::Instructions(validation))
            }
            _ => None,
        }
    }
}

/// A decoder's rows from `data`: a JSONL file, or the WMT16 en-ro folder,
/// whose `set` (newsdev2016 or newstest2016) becomes chat rows asking for a
/// translation in `task.direction`.
fn decoder_rows(config: &TrainConfig, data: &str, set: &str) -> Result<Vec<LmRow>, Error> {
    let dir = Path::new(data);
    if !dir.is_dir() {
        return read_lm_jsonl(dir, false);
    }
    let pairs = read_parallel(
        &dir.join(format!("{set}-enro.en")),
        &dir.join(format!("{set}-enro.ro")),
    )?;
    Ok(instructions::translation_rows(
        config.task.direction,
        &pairs,
    ))
}

/// Tokenised decoder rows; rows with nothing left to predict within
/// `max_len` are dropped with a warning counting them.
fn encode_lm_rows(
    text: &ChatTokenizer,
    rows: &[LmRow],
    max_len: usize,
    what: &str,
) -> Result<Vec<LmExample>, Error> {
    let all = rows
        .iter()
        .map(|r| text.encode_row(r, max_len))
        .collect::<Result<Vec<_>, _>>()?;
    let kept: Vec<LmExample> = all.into_iter().filter(|e| e.predicted() > 0).collect();
    if kept.len() < rows.len() {
        eprintln!(
            "warning: {} of {} {what} rows have nothing left to predict within task.max_len = {max_len} and are skipped",
            rows.len() - kept.len(),
            rows.len(),
        );
    }
    Ok(kept)
}

/// The training rows, packed into sequences of `task.max_len` tokens when
/// `task.packing` asks for it (with the count logged).
fn packed(rows: Vec<LmExample>, config: &TrainConfig) -> Vec<LmExample> {
    if !config.task.packing {
        return rows;
    }
    let packed = crate::decoder::packing::pack(&rows, config.task.max_len);
    eprintln!(
        "packing: {} training rows in {} sequences of up to {} tokens",
        rows.len(),
        packed.len(),
        config.task.max_len
    );
    packed
}

/// The indices `0..n` in a seeded random order (Fisher–Yates on the stream
/// `name`): the one shuffle behind slicing and validation splits.
fn seeded_permutation(n: usize, seed: u64, name: &str) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    SeededRng::for_stream(seed, name).shuffle(&mut idx);
    idx
}

/// The first `max` items after a seeded shuffle (a fair slice of a dataset).
fn slice<T: Clone>(items: Vec<T>, max: Option<usize>, seed: u64, name: &str) -> Vec<T> {
    match max {
        Some(n) if n < items.len() => {
            let mut keep: Vec<usize> = seeded_permutation(items.len(), seed, name)[..n].to_vec();
            keep.sort_unstable();
            keep.into_iter().map(|i| items[i].clone()).collect()
        }
        _ => items,
    }
}

/// The dev examples a config uses: `task.max_dev_examples` of them, a
/// seeded slice.
fn dev_examples<T: Clone>(items: Vec<T>, config: &TrainConfig) -> Vec<T> {
    slice(
        items,
        config.task.max_dev_examples,
        config.run.seed,
        "dev-slice",
    )
}

/// The training examples a config uses (`task.max_train_examples` of them,
/// a seeded slice) and the validation slice carved out of those
/// (`task.validation_split`): `(train, validation)`.
fn training_examples<T: Clone>(items: Vec<T>, config: &TrainConfig) -> (Vec<T>, Vec<T>) {
    let seed = config.run.seed;
    let used = slice(items, config.task.max_train_examples, seed, "train-slice");
    split_validation(used, config.task.validation_split.unwrap_or(0.0), seed)
}

/// Splits `fraction` of `items` (rounded, at least one when the fraction
/// is positive) off as a seeded validation slice: `(train, validation)`,
/// disjoint, each in the original order.
pub(super) fn split_validation<T>(items: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    if fraction <= 0.0 || items.len() < 2 {
        return (items, Vec::new());
    }
    let n = ((items.len() as f64 * fraction).round() as usize).clamp(1, items.len() - 1);
    let mut held = vec![false; items.len()];
    for i in &seeded_permutation(items.len(), seed, "validation-split")[..n] {
        held[*i] = true;
    }
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (item, held) in items.into_iter().zip(held) {
        if held {
            validation.push(item);
        } else {
            train.push(item);
        }
    }
    (train, validation)
}

fn read_split(task: &Task, config: &TrainConfig, split: &str) -> Result<Vec<Example>, Error> {
    let path = match locate_data(task, &config.task.data) {
        DataSource::Hub => {
            let hf_split = if split == "train" {
                "train"
            } else {
                task.dev_splits[0]
            };
            crate::data::parquet::fetch_split(task, hf_split, None)?
        }
        DataSource::Folder(dir) => dir.join(format!("{split}.tsv")),
    };
    read_examples(task, &path).map_err(Error::from)
}

fn read_pairs(
    task: &Task,
    config: &TrainConfig,
    split: &str,
) -> Result<Vec<TranslationPair>, Error> {
    let dir = match locate_data(task, &config.task.data) {
        DataSource::Hub => {
            let hf_split = if split == "train" {
                "train"
            } else {
                "validation"
            };
            let path = crate::data::parquet::fetch_split(task, hf_split, None)?;
            return crate::data::parquet::read_parquet_translation(&path).map_err(Error::from);
        }
        DataSource::Folder(dir) => dir,
    };
    // No WMT16 training data is available locally: newsdev2016 trains and
    // newstest2016 evaluates.
    let set = if split == "train" {
        "newsdev2016"
    } else {
        "newstest2016"
    };
    read_parallel(
        &dir.join(format!("{set}-enro.en")),
        &dir.join(format!("{set}-enro.ro")),
    )
    .map_err(Error::from)
}

/// The T5 source prefix: the config's, or T5's own for the direction.
pub(super) fn source_prefix(config: &TrainConfig) -> String {
    config
        .task
        .prefix
        .clone()
        .unwrap_or_else(|| config.task.direction.t5_prefix().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_split_is_seeded_and_disjoint() {
        let items: Vec<usize> = (0..100).collect();
        let (train, validation) = split_validation(items.clone(), 0.1, 7);
        assert_eq!((train.len(), validation.len()), (90, 10));
        assert!(validation.iter().all(|v| !train.contains(v)));
        let mut all = [train.clone(), validation.clone()].concat();
        all.sort_unstable();
        assert_eq!(all, items);
        assert_eq!(
            split_validation(items.clone(), 0.1, 7),
            (train, validation.clone())
        );
        assert_ne!(split_validation(items.clone(), 0.1, 8).1, validation);
        assert_eq!(split_validation(items, 0.0, 7).1, Vec::<usize>::new());
    }
}
