//! Tokenising and batching: dynamic padding per batch, attention masks,
//! `-100` at padded label positions, optional length bucketing, and seeded,
//! reproducible shuffling.

use std::path::Path;

use candle::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationParams, TruncationStrategy};

use super::examples::{Example, Label};
use super::translation::{Direction, TranslationPair};
use crate::rng::SeededRng;
use crate::Error;

/// Loads `tokenizer.json` with any stored padding and truncation switched
/// off (both are per-batch decisions here; T5's file ships fixed padding).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, Error> {
    let mut tokenizer =
        Tokenizer::from_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(tokenizer)
}

/// A tokenised classification or regression example.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub label: Option<Label>,
}

/// A tokenised source/target pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedPair {
    pub source: Vec<u32>,
    pub target: Vec<u32>,
}

fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    // Short datasets tokenise in a blink; a bar would only flicker.
    if len < 2000 {
        return indicatif::ProgressBar::hidden();
    }
    indicatif::ProgressBar::new(len as u64).with_style(
        indicatif::ProgressStyle::with_template(&format!(
            "tokenising {what} [{{bar:30}}] {{pos}}/{{len}} ({{eta}})"
        ))
        .expect("static template")
        .progress_chars("=> "),
    )
}

fn truncating(tokenizer: &Tokenizer, max_len: usize) -> Result<Tokenizer, Error> {
    let mut t = tokenizer.clone();
    t.with_truncation(Some(TruncationParams {
        max_length: max_len,
        strategy: TruncationStrategy::LongestFirst,
        ..Default::default()
    }))
    .map_err(|e| e.to_string())?;
    Ok(t)
}

/// Tokenises single sentences or pairs, truncated to `max_len` tokens
/// (special tokens included).
pub fn encode_examples(
    tokenizer: &Tokenizer,
    examples: &[Example],
    max_len: usize,
) -> Result<Vec<Encoded>, Error> {
    let t = truncating(tokenizer, max_len)?;
    let bar = progress(examples.len(), "examples");
    let out = examples
        .iter()
        .map(|e| {
            bar.inc(1);
            let enc = match &e.text_b {
                Some(b) => t.encode((e.text_a.as_str(), b.as_str()), true),
                None => t.encode(e.text_a.as_str(), true),
            }
            .map_err(|err| err.to_string())?;
            Ok(Encoded {
                ids: enc.get_ids().to_vec(),
                type_ids: enc.get_type_ids().to_vec(),
                label: e.label,
            })
        })
        .collect();
    bar.finish_and_clear();
    out
}

/// Tokenises translation pairs in `direction`, the source behind `prefix`
/// (T5's `translate English to Romanian: `), each side truncated.
pub fn encode_translation(
    tokenizer: &Tokenizer,
    pairs: &[TranslationPair],
    direction: Direction,
    prefix: &str,
    max_source_len: usize,
    max_target_len: usize,
) -> Result<Vec<EncodedPair>, Error> {
    let (ts, tt) = (
        truncating(tokenizer, max_source_len)?,
        truncating(tokenizer, max_target_len)?,
    );
    let bar = progress(pairs.len(), "pairs");
    let out = pairs
        .iter()
        .map(|p| {
            bar.inc(1);
            let (src, tgt) = direction.split(p);
            let source = ts
                .encode(format!("{prefix}{src}"), true)
                .map_err(|e| e.to_string())?;
            let target = tt.encode(tgt, true).map_err(|e| e.to_string())?;
            Ok(EncodedPair {
                source: source.get_ids().to_vec(),
                target: target.get_ids().to_vec(),
            })
        })
        .collect();
    bar.finish_and_clear();
    out
}

/// How examples are grouped into batches.
#[derive(Clone, Debug)]
pub struct BatchPlan {
    pub batch_size: usize,
    pub shuffle: bool,
    /// Group examples of similar length (within windows of 50 batches) to
    /// cut padding; batch order is still shuffled.
    pub bucket_by_length: bool,
    pub seed: u64,
}

impl BatchPlan {
    /// The example indices of each batch for `epoch`: the same seed and
    /// epoch always give the same batches.
    pub fn batches(&self, lengths: &[usize], epoch: u64) -> Vec<Vec<usize>> {
        let size = self.batch_size.max(1);
        let mut rng = SeededRng::for_stream(self.seed, &format!("batches/epoch{epoch}"));
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        if self.shuffle {
            rng.shuffle(&mut order);
        }
        if self.bucket_by_length {
            for window in order.chunks_mut(size * 50) {
                window.sort_by_key(|&i| lengths[i]);
            }
        }
        let mut batches: Vec<Vec<usize>> = order.chunks(size).map(<[usize]>::to_vec).collect();
        if self.shuffle && self.bucket_by_length {
            rng.shuffle(&mut batches);
        }
        batches
    }
}

/// A padded classification batch.
#[derive(Clone, Debug)]
pub struct ClassificationBatch {
    /// `(B, T)` u32, padded with the pad id.
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    /// `(B, T)` u32: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `(B,)` u32 class ids or f32 scores, when every example has a label.
    pub labels: Option<Tensor>,
}

fn pad(rows: &[&[u32]], value: u32) -> (Vec<u32>, Vec<u32>, usize) {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut mask = Vec::with_capacity(rows.len() * t);
    for r in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat_n(value, t - r.len()));
        mask.extend(std::iter::repeat_n(1, r.len()));
        mask.extend(std::iter::repeat_n(0, t - r.len()));
    }
    (ids, mask, t)
}

/// Pads `items` to their longest and stacks them.
pub fn collate_classification(
    items: &[&Encoded],
    pad_id: u32,
    device: &Device,
) -> candle::Result<ClassificationBatch> {
    let b = items.len();
    let ids: Vec<&[u32]> = items.iter().map(|e| e.ids.as_slice()).collect();
    let types: Vec<&[u32]> = items.iter().map(|e| e.type_ids.as_slice()).collect();
    let (ids, mask, t) = pad(&ids, pad_id);
    let (types, _, _) = pad(&types, 0);
    let labels = if items.iter().all(|e| e.label.is_some()) && b > 0 {
        Some(match items[0].label {
            Some(Label::Score(_)) => {
                let v: Vec<f32> = items
                    .iter()
                    .map(|e| {
                        if let Some(Label::Score(s)) = e.label {
                            s
                        } else {
                            f32::NAN
                        }
                    })
                    .collect();
                Tensor::from_vec(v, b, device)?
            }
            _ => {
                let v: Vec<u32> = items
                    .iter()
                    .map(|e| {
                        if let Some(Label::Class(c)) = e.label {
                            c as u32
                        } else {
                            0
                        }
                    })
                    .collect();
                Tensor::from_vec(v, b, device)?
            }
        })
    } else {
        None
    };
    Ok(ClassificationBatch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        token_type_ids: Tensor::from_vec(types, (b, t), device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?,
        labels,
    })
}

/// A padded sequence-to-sequence batch.
#[derive(Clone, Debug)]
pub struct Seq2SeqBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    /// `(B, T_target)` i64 with `-100` at padded positions (ignored by the loss).
    pub labels: Tensor,
}

/// Pads sources with `pad_id` and targets with `-100`.
pub fn collate_seq2seq(
    items: &[&EncodedPair],
    pad_id: u32,
    device: &Device,
) -> candle::Result<Seq2SeqBatch> {
    let b = items.len();
    let sources: Vec<&[u32]> = items.iter().map(|e| e.source.as_slice()).collect();
    let (ids, mask, t) = pad(&sources, pad_id);
    let tt = items
        .iter()
        .map(|e| e.target.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let labels: Vec<i64> = items
        .iter()
        .flat_map(|e| {
            e.target
                .iter()
                .map(|&x| x as i64)
                .chain(std::iter::repeat_n(-100, tt - e.target.len()))
        })
        .collect();
    Ok(Seq2SeqBatch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?,
        labels: Tensor::from_vec(labels, (b, tt), device)?,
    })
}
