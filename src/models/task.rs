//! Loading a task model of any supported family from a checkpoint.

use std::path::{Path, PathBuf};

use candle::{DType, Device, Result};

use super::bert::{BertConfig, BertForSequenceClassification};
use super::llama::{LlamaConfig, LlamaForCausalLM};
use super::loader::Checkpoint;
use super::presets::Family;
use super::roberta::RobertaForSequenceClassification;
use super::t5::{T5Config, T5ForConditionalGeneration};
use crate::adapter::{AdapterRegistry, LinearFactory};
use crate::nn::VarBuilder;

/// A model with its task head.
#[derive(Clone, Debug)]
// One model per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum TaskModel {
    Bert(BertForSequenceClassification),
    Roberta(RobertaForSequenceClassification),
    T5(T5ForConditionalGeneration),
    Llama(LlamaForCausalLM),
}

/// A loaded model, the registry of what it trains, and where it came from.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub model: TaskModel,
    pub registry: AdapterRegistry,
    pub family: Family,
    pub dir: PathBuf,
    /// The weights the model was built from, under the task model's names
    /// (prefixes added, a new head included).
    pub checkpoint: Checkpoint,
    /// The class names a merged export records (see
    /// [`LoadedModel::with_label_names`]); empty for `LABEL_0`...
    pub label_names: Vec<String>,
}

impl LoadedModel {
    /// The padding token id: the config's `pad_token_id`, else the family's
    /// usual one (RoBERTa pads with 1, BERT and T5 with 0).
    pub fn pad_token_id(&self) -> u32 {
        let config: serde_json::Value =
            serde_json::from_str(&self.checkpoint.config_json).unwrap_or_default();
        let default = match self.family {
            Family::Roberta => 1,
            _ => 0,
        };
        config["pad_token_id"].as_u64().unwrap_or(default) as u32
    }
}

/// Loads the checkpoint `spec` (a folder or a hub id) as a task model:
/// `num_labels` outputs for BERT and RoBERTa, conditional generation for T5.
/// Tensor names are accepted with or without the `bert.` / `roberta.` /
/// `transformer.` prefix; a missing task head is initialised as transformers
/// does, and said so. Every linear layer goes through `factory`.
/// The one warning a missing task head deserves: when nothing (training or
/// an adapter) will replace its random initialisation.
fn warn_if_random_head(dir: &Path, missing: bool, factory: &LinearFactory, path: &str) {
    if missing && !factory.trains(path) {
        eprintln!(
            "warning: {}: the checkpoint has no {path} and no adapter supplies one; it stays randomly initialised, so the predictions are meaningless",
            dir.display()
        );
    }
}

/// Hands a GGUF checkpoint's quantized linear weights to the factory. A
/// quantized base computes in f32, so another `dtype` needs the base
/// dequantized.
pub(crate) fn quantized_base(
    factory: LinearFactory,
    ckpt: &mut Checkpoint,
    dtype: DType,
) -> Result<LinearFactory> {
    if !ckpt.quantized.is_empty() && dtype != DType::F32 {
        candle::bail!(
            "{}: a quantized base computes in f32; dequantize it (--dequantize, or model.dequantize = true) to load it as {dtype:?}",
            ckpt.dir.display()
        );
    }
    // The checkpoint keeps its handles (for counts); the tensors are shared.
    Ok(factory.with_quantized_weights(ckpt.quantized.clone()))
}

pub fn load_task_model(
    spec: &str,
    revision: Option<&str>,
    num_labels: Option<usize>,
    factory: LinearFactory,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<LoadedModel> {
    let mut ckpt = Checkpoint::read(spec, revision, device, factory.dequantizes_base())?;
    let dir = ckpt.dir.clone();
    let family = Family::from_config_json(&ckpt.config_json).map_err(|e| in_dir(&dir, e))?;
    let labels = |family: Family| {
        num_labels.ok_or_else(|| {
            candle::Error::msg(format!(
                "a {family:?} model needs a number of labels for its head"
            ))
        })
    };
    let factory = factory.with_dropout_seed(seed);
    let (model, vb) = match family {
        Family::Bert | Family::Roberta => {
            let config = BertConfig::from_json(&ckpt.config_json).map_err(|e| in_dir(&dir, e))?;
            let n = labels(family)?;
            let (h, std) = (config.hidden_size, config.initializer_range);
            if family == Family::Bert {
                ckpt = ckpt.with_prefix("bert", &["embeddings", "encoder", "pooler"]);
                ckpt.init_missing_linear("bert.pooler.dense", h, h, std, seed)?;
                let head = ckpt.init_missing_linear("classifier", h, n, std, seed)?;
                warn_if_random_head(&dir, head, &factory, "classifier");
                let vb = VarBuilder::new(ckpt.var_builder(dtype, device), factory);
                let model = BertForSequenceClassification::new(vb.clone(), &config, n)?;
                (TaskModel::Bert(model), vb)
            } else {
                ckpt = ckpt.with_prefix("roberta", &["embeddings", "encoder", "pooler"]);
                ckpt.init_missing_linear("classifier.dense", h, h, std, seed)?;
                let head = ckpt.init_missing_linear("classifier.out_proj", h, n, std, seed)?;
                warn_if_random_head(&dir, head, &factory, "classifier.out_proj");
                let vb = VarBuilder::new(ckpt.var_builder(dtype, device), factory);
                let model = RobertaForSequenceClassification::new(vb.clone(), &config, n)?;
                (TaskModel::Roberta(model), vb)
            }
        }
        Family::T5 => {
            let config = T5Config::from_json(&ckpt.config_json).map_err(|e| in_dir(&dir, e))?;
            ckpt.tensors = ckpt
                .tensors
                .into_iter()
                .map(|(n, t)| {
                    (
                        n.strip_prefix("transformer.")
                            .map(String::from)
                            .unwrap_or(n),
                        t,
                    )
                })
                .collect();
            if !ckpt.tensors.contains_key("shared.weight") {
                if let Some(t) = ckpt.tensors.get("encoder.embed_tokens.weight").cloned() {
                    ckpt.tensors.insert("shared.weight".into(), t);
                }
            }
            let vb = VarBuilder::new(ckpt.var_builder(dtype, device), factory);
            let model = T5ForConditionalGeneration::new(vb.clone(), &config)?;
            (TaskModel::T5(model), vb)
        }
        Family::Llama => {
            let config = LlamaConfig::from_json(&ckpt.config_json).map_err(|e| in_dir(&dir, e))?;
            let factory = quantized_base(factory, &mut ckpt, dtype)?;
            let vb = VarBuilder::new(ckpt.var_builder(dtype, device), factory);
            let model = LlamaForCausalLM::new(vb.clone(), &config)?;
            (TaskModel::Llama(model), vb)
        }
    };
    let registry = vb.finish()?;
    Ok(LoadedModel {
        model,
        registry,
        family,
        dir,
        checkpoint: ckpt,
        label_names: Vec::new(),
    })
}

fn in_dir(dir: &std::path::Path, e: candle::Error) -> candle::Error {
    candle::Error::msg(format!(
        "{}: {}",
        dir.join("config.json").display(),
        crate::error::message(&e)
    ))
}

impl LoadedModel {
    /// The full weights with every adapter folded in, under Hugging Face
    /// names, and the matching `config.json` text. A T5 `lm_head` that is
    /// tied to the embeddings but carries an update is untied: the merged
    /// head gets the `d_model^-0.5` scale folded in and the config says
    /// `tie_word_embeddings: false`, so the logits are unchanged.
    pub fn merged_weights(
        &self,
    ) -> Result<(std::collections::HashMap<String, candle::Tensor>, String)> {
        let mut tensors = self.checkpoint.tensors.clone();
        let mut config: serde_json::Value =
            serde_json::from_str(&self.checkpoint.config_json).map_err(candle::Error::wrap)?;
        for (path, layer) in self.registry.modules() {
            let mut weight = layer.merged_weight()?;
            if let (TaskModel::T5(t5), "lm_head") = (&self.model, path) {
                if t5.config().tie_word_embeddings {
                    weight = (weight * (t5.config().d_model as f64).powf(-0.5))?;
                    config["tie_word_embeddings"] = serde_json::Value::Bool(false);
                }
            }
            // An updated head no longer equals the embedding table.
            if let (TaskModel::Llama(_), "lm_head") = (&self.model, path) {
                config["tie_word_embeddings"] = serde_json::Value::Bool(false);
            }
            tensors.insert(format!("{path}.weight"), weight);
            if let Some(bias) = layer.bias() {
                tensors.insert(format!("{path}.bias"), bias.clone());
            }
        }
        for (name, var) in self.registry.extra_vars() {
            tensors.insert(name.to_string(), var.as_tensor().clone());
        }
        self.describe_head(&mut config, &tensors);
        let config = serde_json::to_string_pretty(&config).map_err(candle::Error::wrap)?;
        Ok((tensors, config))
    }

    /// Sets the names of the classes (`id2label`), e.g. GLUE's label
    /// strings, for the merged `config.json`; `LABEL_0`... otherwise.
    pub fn with_label_names(mut self, names: &[&str]) -> Self {
        self.label_names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// What transformers' `AutoModelForSequenceClassification` reads to
    /// build the right head: `architectures`, `num_labels`, `id2label`,
    /// `label2id` and `problem_type` (regression for one output).
    fn describe_head(
        &self,
        config: &mut serde_json::Value,
        tensors: &std::collections::HashMap<String, candle::Tensor>,
    ) {
        let (architecture, head) = match self.family {
            Family::Bert => ("BertForSequenceClassification", "classifier.weight"),
            Family::Roberta => (
                "RobertaForSequenceClassification",
                "classifier.out_proj.weight",
            ),
            Family::T5 => return,
            Family::Llama => {
                if config.get("architectures").is_none() {
                    let architecture = match config["model_type"].as_str() {
                        Some("mistral") => "MistralForCausalLM",
                        Some("qwen2") => "Qwen2ForCausalLM",
                        _ => "LlamaForCausalLM",
                    };
                    config["architectures"] = serde_json::json!([architecture]);
                }
                return;
            }
        };
        let Some(n) = tensors.get(head).map(|t| t.dims()[0]) else {
            return;
        };
        let names: Vec<String> = if self.label_names.len() == n {
            self.label_names.clone()
        } else {
            (0..n).map(|i| format!("LABEL_{i}")).collect()
        };
        config["architectures"] = serde_json::json!([architecture]);
        config["num_labels"] = serde_json::json!(n);
        config["id2label"] = names
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), serde_json::json!(l)))
            .collect();
        config["label2id"] = names
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), serde_json::json!(i)))
            .collect();
        config["problem_type"] = serde_json::json!(if n == 1 {
            "regression"
        } else {
            "single_label_classification"
        });
    }

    /// Writes [`Self::merged_weights`] as a checkpoint folder
    /// (`config.json`, `model.safetensors`, and `tokenizer.json` when the
    /// source had one) that loads without this crate's adapters.
    pub fn save_merged(&self, out: impl AsRef<std::path::Path>) -> Result<()> {
        let out = out.as_ref();
        let (tensors, config) = self.merged_weights()?;
        std::fs::create_dir_all(out)
            .map_err(|e| candle::Error::msg(format!("creating {}: {e}", out.display())))?;
        let tensors: std::collections::BTreeMap<String, candle::Tensor> =
            tensors.into_iter().collect();
        let metadata = [("format".to_string(), "pt".to_string())].into();
        crate::io::write_safetensors_atomic(&out.join("model.safetensors"), &tensors, metadata)?;
        crate::io::write_atomic(&out.join("config.json"), config.as_bytes())?;
        let tokenizer = self.dir.join("tokenizer.json");
        if tokenizer.exists() {
            std::fs::copy(&tokenizer, out.join("tokenizer.json"))
                .map_err(|e| candle::Error::msg(format!("copying {}: {e}", tokenizer.display())))?;
        }
        Ok(())
    }
}

impl TaskModel {
    /// Classification or regression logits `(B, num_labels)` of the encoder
    /// families (RoBERTa ignores token types); an error for T5.
    pub fn classify(
        &self,
        input_ids: &candle::Tensor,
        token_type_ids: Option<&candle::Tensor>,
        attention_mask: Option<&candle::Tensor>,
        train: bool,
    ) -> Result<candle::Tensor> {
        match self {
            Self::Bert(m) => m.forward_t(input_ids, token_type_ids, attention_mask, train),
            Self::Roberta(m) => m.forward_t(input_ids, attention_mask, train),
            Self::T5(_) => candle::bail!("T5 has no classification head: use it for translation"),
            Self::Llama(_) => candle::bail!("a decoder has no classification head: it answers GLUE tasks with label words (decoder::instructions)"),
        }
    }
}
