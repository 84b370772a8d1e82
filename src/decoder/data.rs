//! Data for decoders: JSON Lines with `{"text"}` (plain language
//! modelling), `{"prompt", "completion"}` or `{"messages": [...]}`, tokenised
//! with the loss only on what the model should learn to write.

use std::path::Path;

use serde_json::Value;

use super::template::Message;
use super::ChatTokenizer;
use crate::data::error::{lines, read_text};
use crate::error::{Error, Result};

/// The loss label of a token the model is not trained to predict.
pub const IGNORE: i64 = -100;

/// One row of a decoder dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LmRow {
    /// Plain text: every token is predicted.
    Text(String),
    /// Only the completion (and the end token after it) is predicted.
    PromptCompletion { prompt: String, completion: String },
    /// A conversation rendered with the chat template; only the assistant
    /// turns are predicted.
    Messages(Vec<Message>),
}

impl LmRow {
    /// The row a JSON object holds, or a message naming what is missing.
    pub fn from_json(value: &Value) -> std::result::Result<Self, String> {
        let text = |key: &str| -> std::result::Result<Option<String>, String> {
            match value.get(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("field {key:?} must be a string")),
            }
        };
        if let Some(messages) = value.get("messages") {
            let messages: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|e| {
                format!(
                    "field \"messages\" must be a list of {{\"role\", \"content\"}} strings: {e}"
                )
            })?;
            return Ok(Self::Messages(messages));
        }
        match (text("text")?, text("prompt")?, text("completion")?) {
            (Some(t), None, None) => Ok(Self::Text(t)),
            (None, Some(prompt), Some(completion)) => {
                Ok(Self::PromptCompletion { prompt, completion })
            }
            (None, Some(_), None) => {
                Err("a \"prompt\" needs a \"completion\" to train or score on".into())
            }
            _ => Err("expected {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"}".into()),
        }
    }

    /// The prompt to generate from, for `predict`: a `prompt` or the
    /// `messages` so far (text rows are prompts too).
    pub fn from_prompt_json(value: &Value) -> std::result::Result<Self, String> {
        match (value.get("prompt"), value.get("completion")) {
            (Some(Value::String(p)), None) => Ok(Self::PromptCompletion {
                prompt: p.clone(),
                completion: String::new(),
            }),
            _ => Self::from_json(value),
        }
    }
}

/// Reads a decoder JSONL file; a bad row is an error naming the file, the
/// line and the field.
pub fn read_lm_jsonl(path: &Path, prompts_only: bool) -> Result<Vec<LmRow>> {
    let text = read_text(path)?;
    let mut rows = Vec::new();
    for (i, line) in lines(&text).into_iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| Error::Data {
            path: path.to_path_buf(),
            line: Some(i + 1),
            message,
        };
        let value: Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let row = if prompts_only {
            LmRow::from_prompt_json(&value)
        } else {
            LmRow::from_json(&value)
        };
        rows.push(row.map_err(bad)?);
    }
    if rows.is_empty() {
        return Err(Error::Data {
            path: path.to_path_buf(),
            line: None,
            message: "no rows".into(),
        });
    }
    Ok(rows)
}

/// A tokenised row: `labels[i]` is `ids[i]` where the loss falls, else
/// [`IGNORE`] (the model shifts them). `documents[i]` numbers the document
/// token `i` belongs to, from 1: all 1 for one row, 1, 2, ... for rows
/// packed together ([`super::packing`]); it becomes the attention mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LmExample {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub documents: Vec<u32>,
}

impl LmExample {
    fn push(&mut self, ids: &[u32], learn: bool) {
        self.documents.extend(std::iter::repeat_n(1, ids.len()));
        self.ids.extend_from_slice(ids);
        self.labels.extend(
            ids.iter()
                .map(|&t| if learn { i64::from(t) } else { IGNORE }),
        );
    }

    /// Tokens whose prediction is scored (after the model's shift).
    pub fn predicted(&self) -> usize {
        self.labels.iter().skip(1).filter(|l| **l != IGNORE).count()
    }
}

impl ChatTokenizer {
    /// Tokenises a training or scoring row, truncated to `max_len` tokens.
    pub fn encode_row(&self, row: &LmRow, max_len: usize) -> Result<LmExample> {
        let mut ex = LmExample {
            ids: Vec::new(),
            labels: Vec::new(),
            documents: Vec::new(),
        };
        let eos = self.eos_ids.first().copied();
        match row {
            LmRow::Text(text) => ex.push(&self.encode(text, false)?, true),
            LmRow::PromptCompletion { prompt, completion } => {
                ex.push(&self.encode(prompt, false)?, false);
                ex.push(&self.encode(completion, true)?, true);
                ex.push(&eos.into_iter().collect::<Vec<_>>(), true);
            }
            LmRow::Messages(messages) => self.encode_messages(messages, &mut ex)?,
        }
        ex.ids.truncate(max_len);
        ex.labels.truncate(max_len);
        ex.documents.truncate(max_len);
        Ok(ex)
    }

    /// Renders the conversation turn by turn, so each assistant turn's
    /// tokens (with the template's end marker) are the ones learned.
    fn encode_messages(&self, messages: &[Message], ex: &mut LmExample) -> Result<()> {
        let template = self.chat_template()?;
        let mut done = String::new();
        for (i, message) in messages.iter().enumerate() {
            let assistant = message.role == "assistant";
            if assistant {
                let header = template.render(&messages[..i], true)?;
                let header = header
                    .strip_prefix(done.as_str())
                    .unwrap_or(&header)
                    .to_string();
                ex.push(&self.encode(&header, true)?, false);
                done.push_str(&header);
            }
            let upto = template.render(&messages[..=i], false)?;
            let Some(turn) = upto.strip_prefix(done.as_str()) else {
                return Err(Error::Message(
                    "the chat template renders a conversation differently from its beginning, so turns cannot be masked".into(),
                ));
            };
            ex.push(&self.encode(turn, true)?, assistant);
            done = upto;
        }
        Ok(())
    }

    /// The prompt tokens of a `predict` row: the prompt text, or the
    /// messages rendered with the generation prompt.
    pub fn encode_prompt(&self, row: &LmRow) -> Result<Vec<u32>> {
        match row {
            LmRow::Text(text) => self.encode(text, false),
            LmRow::PromptCompletion { prompt, .. } => self.encode(prompt, false),
            LmRow::Messages(messages) => {
                let text = self.chat_template()?.render(messages, true)?;
                self.encode(&text, true)
            }
        }
    }
}

/// A right-padded batch: `(input_ids, attention_mask, labels)`, each
/// `(rows, longest)`; padding is masked out (0) and labelled [`IGNORE`].
/// The mask holds each token's document number, so packed documents do
/// not see each other (`LlamaForCausalLM::forward_t`).
pub fn collate(
    examples: &[&LmExample],
    pad: u32,
    device: &candle::Device,
) -> candle::Result<(candle::Tensor, candle::Tensor, candle::Tensor)> {
    let width = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for e in examples {
        let padding = width - e.ids.len();
        ids.extend(
            e.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad, padding)),
        );
        mask.extend(
            e.documents
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, padding)),
        );
        labels.extend(
            e.labels
                .iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE, padding)),
        );
    }
    let shape = (examples.len(), width);
    Ok((
        candle::Tensor::from_vec(ids, shape, device)?,
        candle::Tensor::from_vec(mask, shape, device)?,
        candle::Tensor::from_vec(labels, shape, device)?,
    ))
}
