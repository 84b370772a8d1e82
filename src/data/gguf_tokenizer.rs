//! A Hugging Face tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*`
//! metadata, for GGUF models that come without a `tokenizer.json`.
//!
//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported, with the
//! pre-tokenizer `tokenizer.ggml.pre` names. The `smollm` one is checked
//! against SmolLM2's tokenizer on thousands of strings (tests/it/llama.rs);
//! `gpt2`, `llama-bpe` and `qwen2` use the regexes llama.cpp documents for
//! them and have no such check here.
//!
//! SentencePiece BPE (`"llama"`: Llama 1/2, Mistral, TinyLlama) becomes
//! the BPE with byte fallback that transformers converts a SentencePiece
//! model into: merges ranked by the score of the piece they make, spaces
//! as `▁` with a dummy prefix (unless `tokenizer.ggml.add_space_prefix` is
//! false), and BOS first when `tokenizer.ggml.add_bos_token` (default
//! true). It is checked against such a conversion, itself exact to
//! SentencePiece, on thousands of strings (tests/fixtures/make_spm_gguf.py).
//! SentencePiece's unigram models (`"t5"`) are refused.

use std::collections::HashMap;

use candle::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3` split.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2` split (digits one by one).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (SentencePiece's numbering).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// The tokenizer the metadata of a GGUF file describes.
pub fn tokenizer_from_gguf(metadata: &HashMap<String, Value>) -> Result<Tokenizer> {
    let text = tokenizer_json(metadata)?.to_string();
    text.parse::<Tokenizer>()
        .map_err(|e| Error::Message(format!("the tokenizer rebuilt from GGUF metadata: {e}")))
}

fn get<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    metadata.get(key).ok_or_else(|| {
        Error::Message(format!(
            "GGUF metadata has no {key}: cannot build a tokenizer"
        ))
    })
}

fn strings(metadata: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let values = get(metadata, key)?.to_vec().map_err(Error::from)?;
    values
        .iter()
        .map(|v| Ok(v.to_string().map_err(Error::from)?.clone()))
        .collect()
}

/// The `tokenizer.json` document for the metadata.
pub fn tokenizer_json(metadata: &HashMap<String, Value>) -> Result<Json> {
    let model = get(metadata, "tokenizer.ggml.model")?
        .to_string()
        .map_err(Error::from)?;
    let vocab = Vocab::read(metadata)?;
    match model.as_str() {
        "gpt2" => byte_level_bpe(metadata, &vocab),
        "llama" => sentencepiece_bpe(metadata, &vocab),
        other => Err(Error::Message(format!(
            "GGUF tokenizer model {other:?} is not supported (byte-level BPE \"gpt2\" and SentencePiece BPE \"llama\" are); pass a tokenizer.json"
        ))),
    }
}

/// The tokens with their GGUF types.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
}

impl Vocab {
    fn read(metadata: &HashMap<String, Value>) -> Result<Self> {
        let tokens = strings(metadata, "tokenizer.ggml.tokens")?;
        let types = match metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(Error::from)?
                .iter()
                .map(|t| t.to_i32().map_err(Error::from))
                .collect::<Result<_>>()?,
            None => vec![NORMAL; tokens.len()],
        };
        Ok(Self { tokens, types })
    }

    /// `{token: id}`.
    fn ids(&self) -> serde_json::Map<String, Json> {
        (self.tokens.iter().enumerate())
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect()
    }

    /// The tokens of the given types as added tokens, matched whole in text.
    fn added(&self, kinds: &[i32]) -> Vec<Json> {
        (self.tokens.iter().zip(&self.types).enumerate())
            .filter(|(_, (_, t))| kinds.contains(t))
            .map(|(id, (content, _))| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect()
    }

    fn token(&self, metadata: &HashMap<String, Value>, key: &str) -> Result<Option<String>> {
        let Some(id) = metadata.get(key) else {
            return Ok(None);
        };
        let id = id.to_u32().map_err(Error::from)? as usize;
        match self.tokens.get(id) {
            Some(t) => Ok(Some(t.clone())),
            None => Err(Error::Message(format!(
                "GGUF metadata {key} = {id} is outside the {} tokens",
                self.tokens.len()
            ))),
        }
    }
}

fn byte_level_bpe(metadata: &HashMap<String, Value>, vocab: &Vocab) -> Result<Json> {
    let merges: Vec<Json> = strings(metadata, "tokenizer.ggml.merges")?
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(Error::Message(format!(
                "GGUF merge {m:?} is not two tokens"
            ))),
        })
        .collect::<Result<_>>()?;
    let pre = match metadata.get("tokenizer.ggml.pre") {
        Some(v) => v.to_string().map_err(Error::from)?.clone(),
        None => "default".to_string(),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": vocab.added(&[CONTROL, USER_DEFINED]),
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(&pre)?,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab.ids(), "merges": merges},
    }))
}

fn flag(metadata: &HashMap<String, Value>, key: &str, default: bool) -> Result<bool> {
    metadata
        .get(key)
        .map_or(Ok(default), |v| v.to_bool().map_err(Error::from))
}

/// SentencePiece BPE as transformers converts it (`SpmConverter`).
fn sentencepiece_bpe(metadata: &HashMap<String, Value>, vocab: &Vocab) -> Result<Json> {
    let scores: Vec<f32> = get(metadata, "tokenizer.ggml.scores")?
        .to_vec()
        .map_err(Error::from)?
        .iter()
        .map(|v| v.to_f32().map_err(Error::from))
        .collect::<Result<_>>()?;
    if scores.len() != vocab.tokens.len() {
        return Err(Error::Message(format!(
            "GGUF metadata has {} scores for {} tokens",
            scores.len(),
            vocab.tokens.len()
        )));
    }
    let space_prefix = flag(metadata, "tokenizer.ggml.add_space_prefix", true)?;
    let add_bos = flag(metadata, "tokenizer.ggml.add_bos_token", true)?;
    let bos = vocab.token(metadata, "tokenizer.ggml.bos_token_id")?;
    let unk = vocab.token(metadata, "tokenizer.ggml.unknown_token_id")?;
    let escape = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
    // Metaspace skips the dummy prefix when the text already starts with
    // "▁"; SentencePiece does not, so a leading space becomes two.
    let (normalizer, pre_tokenizer) = if space_prefix {
        (
            json!({"type": "Sequence", "normalizers": [escape,
                {"type": "Replace", "pattern": {"Regex": "\\A▁"}, "content": "▁▁"}]}),
            json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": false}),
        )
    } else {
        (escape, Json::Null)
    };
    let post_processor = match bos.filter(|_| add_bos) {
        Some(bos) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {bos.as_str(): {"id": bos, "ids": [vocab.tokens.iter().position(|t| *t == bos)], "tokens": [bos]}}}),
        None => Json::Null,
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": vocab.added(&[UNKNOWN, CONTROL, USER_DEFINED]),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab.ids(), "merges": score_merges(vocab, &scores)},
    }))
}

/// BPE merges from SentencePiece scores: every split of a normal piece
/// into two normal pieces, ranked by the merged piece's score (highest
/// first), then its id, then the split's strings; SentencePiece merges the
/// pair whose result scores highest, and this order reproduces that.
fn score_merges(vocab: &Vocab, scores: &[f32]) -> Vec<Json> {
    let normal: HashMap<&str, usize> = (vocab.tokens.iter().zip(&vocab.types).enumerate())
        .filter(|(_, (_, t))| **t == NORMAL)
        .map(|(id, (token, _))| (token.as_str(), id))
        .collect();
    let mut ranked: Vec<(f32, usize, &str, &str)> = Vec::new();
    for (&token, &id) in &normal {
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if normal.contains_key(left) && normal.contains_key(right) {
                ranked.push((scores[id], id, left, right));
            }
        }
    }
    ranked.sort_by(|x, y| {
        y.0.total_cmp(&x.0)
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(y.2))
            .then(x.3.cmp(y.3))
    });
    ranked
        .into_iter()
        .map(|(_, _, left, right)| json!([left, right]))
        .collect()
}

/// The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` names.
fn pre_tokenizer(pre: &str) -> Result<Json> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" | "starcoder" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
        other => {
            return Err(Error::Message(format!(
                "GGUF pre-tokenizer {other:?} is not supported (default, gpt2, smollm, starcoder, llama-bpe, qwen2); pass a tokenizer.json"
            )))
        }
    })
}
