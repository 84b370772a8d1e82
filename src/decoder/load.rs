//! Finding and loading a decoder: a `.gguf` file (or a folder holding one)
//! or a Hugging Face folder or hub id, with its tokenizer and chat template.

use std::path::{Path, PathBuf};

use candle::{DType, Device};
use tokenizers::Tokenizer;

use super::template::ChatTemplate;
use super::{ChatTokenizer, Decoder};
use crate::adapter::LinearFactory;
use crate::data::gguf_tokenizer::tokenizer_from_gguf;
use crate::error::{Error, Result};
use crate::models::gguf::GgufFile;
use crate::models::llama::{LlamaConfig, LlamaForCausalLM};
use crate::models::loader::{gguf_file_of, resolve_checkpoint_dir, Checkpoint};
use crate::models::task::quantized_base;
use crate::nn::VarBuilder;

/// Where a decoder comes from and how to hold it.
#[derive(Clone, Debug)]
pub struct DecoderSource {
    /// A `.gguf` file, a folder holding one, a Hugging Face folder or a hub id.
    pub model: String,
    /// A `tokenizer.json` to use instead of the model's (or the GGUF's).
    pub tokenizer: Option<PathBuf>,
    pub dtype: DType,
    pub device: Device,
    /// Load a GGUF base dequantized instead of keeping its linear weights
    /// quantized.
    pub dequantize: bool,
}

impl DecoderSource {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
            tokenizer: None,
            dtype: DType::F32,
            device: Device::Cpu,
            dequantize: false,
        }
    }
}

/// The weights (in a builder with the factory), config and side files of
/// either kind of checkpoint.
struct Weights {
    vb: VarBuilder<'static>,
    config: LlamaConfig,
    gguf: Option<GgufFile>,
    dir: PathBuf,
}

fn read_weights(source: &DecoderSource, factory: LinearFactory) -> Result<Weights> {
    let mut ckpt = Checkpoint::read(&source.model, None, &source.device, source.dequantize)?;
    let dir = ckpt.dir.clone();
    let in_dir = |e: candle::Error| {
        Error::Message(format!("{}: {}", dir.display(), crate::error::message(&e)))
    };
    let config = LlamaConfig::from_json(&ckpt.config_json).map_err(in_dir)?;
    // The error already names the folder.
    let factory = quantized_base(factory, &mut ckpt, source.dtype)?;
    let gguf = gguf_file_of(&source.model)?
        .map(GgufFile::open)
        .transpose()?;
    let vb = VarBuilder::new(ckpt.var_builder(source.dtype, &source.device), factory);
    Ok(Weights {
        vb,
        config,
        gguf,
        dir: ckpt.dir,
    })
}

/// Whether the model `spec` names (a `.gguf` file, a folder, a hub id) is
/// a Llama-family decoder, from its config alone.
pub fn is_decoder(spec: &str) -> Result<bool> {
    let (_, config) = crate::models::loader::read_config(spec, None)?;
    let family = crate::models::presets::Family::from_config_json(&config)?;
    Ok(family == crate::models::presets::Family::Llama)
}

/// Loads the decoder `source` names, every linear built by `factory`.
pub fn load_decoder(source: &DecoderSource, factory: LinearFactory) -> Result<Decoder> {
    let weights = read_weights(source, factory)?;
    let model = LlamaForCausalLM::new(weights.vb.clone(), &weights.config)?;
    let registry = weights.vb.finish()?;
    let text = load_chat_tokenizer(
        &weights.dir,
        weights.gguf.as_ref(),
        source.tokenizer.as_deref(),
        &weights.config,
        &source.model,
    )?;
    Ok(Decoder {
        model,
        registry,
        text,
    })
}

/// The tokenizer, chat template and end tokens of the model `spec` names
/// (a `.gguf` file, a folder, a hub id), for code that loads the weights
/// itself (the training loop).
pub fn chat_tokenizer_for(
    spec: &str,
    revision: Option<&str>,
    config: &LlamaConfig,
) -> Result<ChatTokenizer> {
    let gguf = gguf_file_of(spec)?.map(GgufFile::open).transpose()?;
    let dir = match &gguf {
        Some(g) => g.path().parent().map(Path::to_path_buf).unwrap_or_default(),
        None => resolve_checkpoint_dir(spec, revision)?,
    };
    load_chat_tokenizer(&dir, gguf.as_ref(), None, config, spec)
}

/// `tokenizer_file`, else `tokenizer.json` in `dir`, else one rebuilt
/// from the GGUF metadata; the chat template and the end tokens.
pub fn load_chat_tokenizer(
    dir: &Path,
    gguf: Option<&GgufFile>,
    tokenizer_file: Option<&Path>,
    config: &LlamaConfig,
    source: &str,
) -> Result<ChatTokenizer> {
    let beside = dir.join("tokenizer.json");
    let file = tokenizer_file
        .map(Path::to_path_buf)
        .or_else(|| beside.exists().then_some(beside));
    let tokenizer = match (file, gguf) {
        (Some(path), _) => Tokenizer::from_file(&path)
            .map_err(|e| Error::Message(format!("{}: {e}", path.display())))?,
        (None, Some(gguf)) => tokenizer_from_gguf(gguf.metadata())?,
        (None, None) => {
            return Err(Error::Message(format!(
                "{}: no tokenizer.json; pass --tokenizer",
                dir.display()
            )))
        }
    };
    let template = chat_template(dir, gguf, config, &tokenizer)?;
    let mut eos_ids = config.eos_token_ids();
    if let Some(id) = template
        .as_ref()
        .and_then(|t| tokenizer.token_to_id(&t.eos_token))
    {
        eos_ids.push(id);
    }
    eos_ids.sort_unstable();
    eos_ids.dedup();
    Ok(ChatTokenizer {
        tokenizer,
        template,
        eos_ids,
        source: source.to_string(),
    })
}

/// The GGUF's template, else `tokenizer_config.json`'s `chat_template`,
/// else `chat_template.jinja` (transformers 5 writes that file).
fn chat_template(
    dir: &Path,
    gguf: Option<&GgufFile>,
    config: &LlamaConfig,
    tokenizer: &Tokenizer,
) -> Result<Option<ChatTemplate>> {
    let config_path = dir.join("tokenizer_config.json");
    let tok_config: serde_json::Value = match std::fs::read_to_string(&config_path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| Error::Message(format!("{}: {e}", config_path.display())))?,
        Err(_) => serde_json::Value::Null,
    };
    let source = gguf
        .and_then(GgufFile::chat_template)
        .or_else(|| tok_config["chat_template"].as_str().map(String::from))
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
    let Some(source) = source else {
        return Ok(None);
    };
    let token = |key: &str, id: Option<u32>| -> String {
        tok_config[key]
            .as_str()
            .map(String::from)
            .or_else(|| id.and_then(|id| tokenizer.id_to_token(id)))
            .unwrap_or_default()
    };
    let bos = token("bos_token", config.bos_token_id);
    let eos = token("eos_token", config.eos_token_ids().first().copied());
    Ok(Some(ChatTemplate::new(&source, &bos, &eos)?))
}
