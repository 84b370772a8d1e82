//! A Hugging Face tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*`
//! metadata, for GGUF models that come without a `tokenizer.json`.
//!
//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported, with the
//! pre-tokenizer `tokenizer.ggml.pre` names. The `smollm` one is checked
//! against SmolLM2's tokenizer on thousands of strings (tests/it/llama.rs);
//! `gpt2`, `llama-bpe` and `qwen2` use the regexes llama.cpp documents for
//! them and have no such check here. SentencePiece (`llama`) is refused.

use std::collections::HashMap;

use candle::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3` split.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2` split (digits one by one).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types that are special (control and user-defined tokens).
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
    if model != "gpt2" {
        return Err(Error::Message(format!(
            "GGUF tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\"); pass a tokenizer.json"
        )));
    }
    let tokens = strings(metadata, "tokenizer.ggml.tokens")?;
    let merges = strings(metadata, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(Error::from)?
            .iter()
            .map(|t| t.to_i32().map_err(Error::from))
            .collect::<Result<_>>()?,
        None => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(Error::Message(format!(
                "GGUF merge {m:?} is not two tokens"
            ))),
        })
        .collect::<Result<_>>()?;
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, t))| matches!(**t, CONTROL | USER_DEFINED))
        .map(|(id, (content, _))| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let pre = match metadata.get("tokenizer.ggml.pre") {
        Some(v) => v.to_string().map_err(Error::from)?.clone(),
        None => "default".to_string(),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(&pre)?,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
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
