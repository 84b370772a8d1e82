//! Llama-family decoders as a user runs them: the model with its tokenizer,
//! chat template and end tokens, loaded from a GGUF file or a Hugging Face
//! folder, generating text with streaming and stop strings.

pub mod data;
pub mod instructions;
mod load;
pub mod packing;
pub mod template;

use tokenizers::Tokenizer;

pub use load::{chat_tokenizer_for, is_decoder, load_chat_tokenizer, load_decoder, DecoderSource};
pub use template::{ChatTemplate, Message};

use crate::adapter::AdapterRegistry;
use crate::error::{Error, Result};
use crate::models::generate::{generate, Generation, Sampler, Sampling};
use crate::models::llama::{KvCache, LlamaForCausalLM};

/// A decoder ready to use.
pub struct Decoder {
    pub model: LlamaForCausalLM,
    pub registry: AdapterRegistry,
    pub text: ChatTokenizer,
}

/// A decoder's tokenizer with its chat template and end tokens: everything
/// that turns text and conversations into token ids and back.
#[derive(Clone, Debug)]
pub struct ChatTokenizer {
    pub tokenizer: Tokenizer,
    /// `None` when neither the GGUF metadata nor `tokenizer_config.json`
    /// has one; chat then refuses with an error.
    pub template: Option<ChatTemplate>,
    /// The tokens that end an answer: the config's and the tokenizer's EOS.
    pub eos_ids: Vec<u32>,
    /// Where the model came from, for messages.
    pub source: String,
}

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Text that ends the answer (not included in it).
    pub stop: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: Sampling::Greedy,
            stop: Vec::new(),
        }
    }
}

impl ChatTokenizer {
    /// The chat template, or an error saying the model has none.
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        self.template.as_ref().ok_or_else(|| {
            Error::Message(format!(
                "{}: the model has no chat template (GGUF tokenizer.chat_template or tokenizer_config.json chat_template), so it cannot take messages",
                self.source
            ))
        })
    }

    /// Token ids of `text`. Rendered chat text carries its own special
    /// tokens, so `chat` adds none (as transformers' `apply_chat_template`).
    pub fn encode(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, !chat)
            .map_err(|e| Error::Message(format!("tokenizing: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Message(format!("detokenizing: {e}")))
    }
}

impl Decoder {
    /// The answer to `prompt` (token ids), without the prompt. `on_text`
    /// receives the answer piece by piece as it is generated.
    pub fn complete(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<String> {
        self.check_context(prompt.len(), options.max_new_tokens)?;
        let mut sampler = Sampler::new(options.sampling.clone())?;
        let mut stream = Stream::new(&self.text, &options.stop);
        let mut stop = |ids: &[u32]| stream.push(ids, &mut on_text);
        let generation = Generation {
            max_new_tokens: options.max_new_tokens,
            eos_ids: self.text.eos_ids.clone(),
            stop: Some(&mut stop),
        };
        let mut cache = KvCache::default();
        let ids = generate(prompt, &mut sampler, generation, |t| {
            self.model.next_logits(t, &mut cache)
        })?;
        let text = self.text.decode(&ids)?;
        let (text, _) = cut_at_stop(&text, &options.stop);
        Ok(text.to_string())
    }

    /// The summed negative log-likelihood of the predicted tokens of
    /// `examples` and their count, `batch_size` rows at a time.
    pub fn score(&self, examples: &[data::LmExample], batch_size: usize) -> Result<(f64, usize)> {
        let pad = self.text.eos_ids.first().copied().unwrap_or(0);
        Ok(score_examples(&self.model, examples, batch_size, pad)?)
    }

    fn check_context(&self, prompt: usize, new: usize) -> Result<()> {
        if let Some(max) = self.model.config().max_position_embeddings {
            if prompt + new > max {
                return Err(Error::Message(format!(
                    "a prompt of {prompt} tokens plus {new} new ones is longer than the model's context of {max} tokens"
                )));
            }
        }
        Ok(())
    }
}

/// The summed negative log-likelihood of the predicted tokens of
/// `examples` under `model`, and their count (inference mode, right
/// padding with `pad`).
pub fn score_examples(
    model: &LlamaForCausalLM,
    examples: &[data::LmExample],
    batch_size: usize,
    pad: u32,
) -> candle::Result<(f64, usize)> {
    let device = model.device();
    let (mut nll, mut tokens) = (0.0, 0);
    for chunk in examples.chunks(batch_size.max(1)) {
        let rows: Vec<&data::LmExample> = chunk.iter().filter(|e| e.predicted() > 0).collect();
        let count: usize = rows.iter().map(|e| e.predicted()).sum();
        if count == 0 {
            continue;
        }
        let (ids, mask, labels) = data::collate(&rows, pad, &device)?;
        let loss = model.loss(&ids, Some(&mask), &labels, false)?;
        nll += f64::from(loss.to_scalar::<f32>()?) * count as f64;
        tokens += count;
    }
    Ok((nll, tokens))
}

/// The summed negative log-likelihood of each row's predicted tokens,
/// in order (inference mode, `batch_size` rows at a time, right padding
/// with `pad`; a row with nothing to predict scores 0).
pub fn row_nlls(
    model: &LlamaForCausalLM,
    examples: &[&data::LmExample],
    batch_size: usize,
    pad: u32,
) -> candle::Result<Vec<f64>> {
    let device = model.device();
    let mut out = vec![0.0; examples.len()];
    let scored: Vec<usize> = (0..examples.len())
        .filter(|&i| examples[i].predicted() > 0)
        .collect();
    for chunk in scored.chunks(batch_size.max(1)) {
        let rows: Vec<&data::LmExample> = chunk.iter().map(|&i| examples[i]).collect();
        let (ids, mask, labels) = data::collate(&rows, pad, &device)?;
        let (nlls, row_of) = model.token_nlls(&ids, Some(&mask), &labels, false)?;
        for (nll, row) in nlls.to_vec1::<f32>()?.into_iter().zip(row_of) {
            out[chunk[row]] += f64::from(nll);
        }
    }
    Ok(out)
}

/// The text before the first stop string, and whether one was found.
fn cut_at_stop<'a>(text: &'a str, stop: &[String]) -> (&'a str, bool) {
    let first = stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min();
    match first {
        Some(i) => (&text[..i], true),
        None => (text, false),
    }
}

/// Streams decoded text, holding back what could still become a stop
/// string or an incomplete UTF-8 character.
struct Stream<'a> {
    decoder: &'a ChatTokenizer,
    stop: &'a [String],
    sent: usize,
}

impl<'a> Stream<'a> {
    fn new(decoder: &'a ChatTokenizer, stop: &'a [String]) -> Self {
        Self {
            decoder,
            stop,
            sent: 0,
        }
    }

    /// Sends what is safe to send; true when a stop string was reached.
    fn push(&mut self, ids: &[u32], on_text: &mut impl FnMut(&str)) -> bool {
        let Ok(text) = self.decoder.decode(ids) else {
            return false;
        };
        let (kept, stopped) = cut_at_stop(&text, self.stop);
        let hold = if stopped { 0 } else { self.held_back(kept) };
        let end = kept.len() - hold;
        if end > self.sent && kept.is_char_boundary(end) {
            on_text(&kept[self.sent..end]);
            self.sent = end;
        }
        stopped
    }

    /// Bytes at the end of `text` that may start a stop string or are an
    /// unfinished character.
    fn held_back(&self, text: &str) -> usize {
        if text.ends_with('\u{FFFD}') {
            return '\u{FFFD}'.len_utf8();
        }
        self.stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|n| s.is_char_boundary(*n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }
}

/// The rest of a streamed answer once generation ended (the part held back
/// waiting on a possible stop string), so callers print it all.
pub fn remainder<'a>(answer: &'a str, streamed: &str) -> &'a str {
    answer.strip_prefix(streamed).unwrap_or("")
}
