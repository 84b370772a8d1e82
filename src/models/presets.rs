//! Model families, their adapter target presets and their task heads.

use candle::Result;

/// A supported model family, from `config.json`'s `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Bert,
    Roberta,
    T5,
    /// Llama, Mistral, Qwen2, SmolLM2: decoders.
    Llama,
}

impl Family {
    pub fn from_model_type(model_type: &str) -> Result<Self> {
        Ok(match model_type {
            "bert" => Self::Bert,
            "roberta" | "xlm-roberta" => Self::Roberta,
            "t5" | "mt5" => Self::T5,
            t if super::llama::MODEL_TYPES.contains(&t) => Self::Llama,
            other => candle::bail!(
                "unsupported model_type {other:?} (bert, roberta, t5, llama, mistral, qwen2)"
            ),
        })
    }

    /// Reads `model_type` from a `config.json` text.
    pub fn from_config_json(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| candle::Error::msg(format!("config.json: {e}")))?;
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some(t) => Self::from_model_type(t),
            None => candle::bail!("config.json has no model_type"),
        }
    }

    /// The task head's final layer, trained in full like PEFT's
    /// `modules_to_save` (T5 has no separate head).
    pub fn head_modules(&self) -> Vec<String> {
        match self {
            Self::Bert => vec!["classifier".into()],
            Self::Roberta => vec!["classifier.out_proj".into()],
            Self::T5 | Self::Llama => Vec::new(),
        }
    }
}

/// The last path segment of every linear layer in the supported families
/// (BERT, RoBERTa, T5 v1.0 and v1.1, with their heads): a target outside
/// this list can match nothing in any of them.
pub const LINEAR_MODULE_NAMES: &[&str] = &[
    "query",
    "key",
    "value",
    "dense",
    "out_proj",
    "classifier",
    "q",
    "k",
    "v",
    "o",
    "wi",
    "wi_0",
    "wi_1",
    "wo",
    "lm_head",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Adapter targets: a preset name (`dense`, `attention`, `dense+attention`)
/// or a comma-separated list of module names. `gated` says whether a T5
/// model's FFN is gated (`wi_0`, `wi_1`) or not (`wi`).
///
/// | preset | BERT / RoBERTa | T5 |
/// | --- | --- | --- |
/// | `dense` | every `dense` (attention output, intermediate, output, BERT's pooler, RoBERTa's `classifier.dense`) | `wi` (or `wi_0`, `wi_1`), `wo`, `lm_head` |
/// | `attention` | `query`, `key`, `value` | `q`, `k`, `v` in self- and cross-attention |
/// | `dense+attention` | both | both |
///
/// For the Llama family, `dense` is `o_proj`, `gate_proj`, `up_proj` and
/// `down_proj`, `attention` is `q_proj`, `k_proj` and `v_proj`, and
/// `dense+attention` is every linear but `lm_head` (PEFT's `all-linear`).
pub fn resolve_targets(family: Family, spec: &str, gated: bool) -> Result<Vec<String>> {
    let dense: Vec<&str> = match (family, gated) {
        (Family::T5, false) => vec!["wi", "wo", "lm_head"],
        (Family::T5, true) => vec!["wi_0", "wi_1", "wo", "lm_head"],
        (Family::Llama, _) => vec!["o_proj", "gate_proj", "up_proj", "down_proj"],
        _ => vec!["dense"],
    };
    let attention: Vec<&str> = match family {
        Family::T5 => vec!["q", "k", "v"],
        Family::Llama => vec!["q_proj", "k_proj", "v_proj"],
        _ => vec!["query", "key", "value"],
    };
    let names: Vec<&str> = match spec.trim() {
        "dense" => dense,
        "attention" => attention,
        "dense+attention" | "attention+dense" => dense.into_iter().chain(attention).collect(),
        list => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect(),
    };
    if names.is_empty() {
        candle::bail!(
            "no adapter targets in {spec:?}: use dense, attention, dense+attention or a comma list"
        );
    }
    Ok(names.into_iter().map(String::from).collect())
}
