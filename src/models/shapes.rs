//! Model shapes from a `config.json` alone: every linear layer by module path,
//! and the parameter counts that follow, without loading any weights.
//!
//! `total` counts the base model with its task head, tied weights once; it
//! leaves out LoRA-Mini's frozen auxiliary matrices (regenerated from the seed,
//! never part of the model), which are counted separately.

use candle::Result;
use serde::Serialize;

use super::bert::BertConfig;
use super::llama::LlamaConfig;
use super::presets::Family;
use super::t5::T5Config;
use crate::adapter::{AdapterConfig, Method};

/// One linear layer: `d_in -> d_out` at `path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub path: String,
    pub d_in: usize,
    pub d_out: usize,
    pub bias: bool,
}

impl LinearShape {
    fn new(path: impl Into<String>, d_in: usize, d_out: usize, bias: bool) -> Self {
        Self {
            path: path.into(),
            d_in,
            d_out,
            bias,
        }
    }

    pub fn params(&self) -> usize {
        self.d_in * self.d_out + if self.bias { self.d_out } else { 0 }
    }
}

/// The linear layers of a model plus the count of all its other parameters
/// (embeddings, norms, position biases).
#[derive(Clone, Debug, Default)]
pub struct ModelShapes {
    pub linears: Vec<LinearShape>,
    pub other_params: usize,
}

/// What [`ModelShapes::count`] reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParamCount {
    pub trainable: usize,
    pub total: usize,
    /// LoRA-Mini's frozen `A_aux` and `B_aux`, regenerated from the seed.
    pub frozen_aux: usize,
}

impl ParamCount {
    pub fn percentage(&self) -> f64 {
        100.0 * self.trainable as f64 / self.total as f64
    }
}

impl ModelShapes {
    /// Counts under `adapter`, applying the same per-module rules as the
    /// factory. Full fine-tuning (`Method::Full` with the `all-linear` target)
    /// trains every parameter, embeddings and norms included.
    pub fn count(&self, adapter: &AdapterConfig) -> Result<ParamCount> {
        adapter.validate()?;
        let total = self.other_params + self.linears.iter().map(LinearShape::params).sum::<usize>();
        if adapter.method == Method::Full
            && adapter
                .targets
                .iter()
                .any(|t| t == crate::adapter::targets::ALL_LINEAR)
        {
            return Ok(ParamCount {
                trainable: total,
                total,
                frozen_aux: 0,
            });
        }
        let (mut trainable, mut frozen_aux) = (0, 0);
        let mut used = std::collections::BTreeSet::new();
        for l in &self.linears {
            for t in adapter
                .targets
                .iter()
                .filter(|t| crate::adapter::targets::matches_target(&l.path, t))
            {
                used.insert(t.clone());
            }
            match adapter.method_for(&l.path) {
                Method::Frozen => {}
                Method::Full => trainable += l.params(),
                Method::Lora(c) => trainable += c.r * (l.d_in + l.d_out),
                Method::LoraMini(c) => {
                    trainable += c.r * (c.a + c.b);
                    frozen_aux += c.a * l.d_in + l.d_out * c.b;
                }
            }
        }
        if let Some(unused) = adapter.targets.iter().find(|t| !used.contains(*t)) {
            candle::bail!("target {unused:?} matches no linear layer of this model");
        }
        Ok(ParamCount {
            trainable,
            total,
            frozen_aux,
        })
    }
}

/// The shapes of `BertForSequenceClassification` or
/// `RobertaForSequenceClassification` with `num_labels` outputs.
pub fn encoder_classifier(family: Family, config: &BertConfig, num_labels: usize) -> ModelShapes {
    let (h, ff) = (config.hidden_size, config.intermediate_size);
    let root = match family {
        Family::Roberta => "roberta",
        _ => "bert",
    };
    let mut linears = Vec::new();
    for i in 0..config.num_hidden_layers {
        let p = format!("{root}.encoder.layer.{i}");
        for m in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            linears.push(LinearShape::new(format!("{p}.{m}"), h, h, true));
        }
        linears.push(LinearShape::new(
            format!("{p}.intermediate.dense"),
            h,
            ff,
            true,
        ));
        linears.push(LinearShape::new(format!("{p}.output.dense"), ff, h, true));
    }
    match family {
        Family::Roberta => {
            linears.push(LinearShape::new("classifier.dense", h, h, true));
            linears.push(LinearShape::new("classifier.out_proj", h, num_labels, true));
        }
        _ => {
            linears.push(LinearShape::new(format!("{root}.pooler.dense"), h, h, true));
            linears.push(LinearShape::new("classifier", h, num_labels, true));
        }
    }
    let embeddings =
        (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * h;
    let norms = (1 + 2 * config.num_hidden_layers) * 2 * h;
    ModelShapes {
        linears,
        other_params: embeddings + norms,
    }
}

/// The shapes of `T5ForConditionalGeneration`. With tied embeddings
/// `lm_head` is the shared embedding matrix, counted once (as a linear).
pub fn t5_conditional_generation(c: &T5Config) -> ModelShapes {
    let (d, inner) = (c.d_model, c.num_heads * c.d_kv);
    let mut linears = Vec::new();
    let attention = |linears: &mut Vec<LinearShape>, p: String| {
        for m in ["q", "k", "v"] {
            linears.push(LinearShape::new(format!("{p}.{m}"), d, inner, false));
        }
        linears.push(LinearShape::new(format!("{p}.o"), inner, d, false));
    };
    let ffn = |linears: &mut Vec<LinearShape>, p: String| {
        if c.is_gated() {
            linears.push(LinearShape::new(
                format!("{p}.DenseReluDense.wi_0"),
                d,
                c.d_ff,
                false,
            ));
            linears.push(LinearShape::new(
                format!("{p}.DenseReluDense.wi_1"),
                d,
                c.d_ff,
                false,
            ));
        } else {
            linears.push(LinearShape::new(
                format!("{p}.DenseReluDense.wi"),
                d,
                c.d_ff,
                false,
            ));
        }
        linears.push(LinearShape::new(
            format!("{p}.DenseReluDense.wo"),
            c.d_ff,
            d,
            false,
        ));
    };
    for i in 0..c.num_layers {
        attention(
            &mut linears,
            format!("encoder.block.{i}.layer.0.SelfAttention"),
        );
        ffn(&mut linears, format!("encoder.block.{i}.layer.1"));
    }
    let dec = c.decoder_layers();
    for i in 0..dec {
        attention(
            &mut linears,
            format!("decoder.block.{i}.layer.0.SelfAttention"),
        );
        attention(
            &mut linears,
            format!("decoder.block.{i}.layer.1.EncDecAttention"),
        );
        ffn(&mut linears, format!("decoder.block.{i}.layer.2"));
    }
    linears.push(LinearShape::new("lm_head", d, c.vocab_size, false));
    let shared = if c.tie_word_embeddings {
        0
    } else {
        c.vocab_size * d
    };
    let norms = (2 * c.num_layers + 1 + 3 * dec + 1) * d;
    let position_bias = 2 * c.relative_attention_num_buckets * c.num_heads;
    ModelShapes {
        linears,
        other_params: shared + norms + position_bias,
    }
}

/// `LlamaForCausalLM` (and Mistral, Qwen2): seven linears per layer and
/// `lm_head` (counted once with the embeddings when tied).
pub fn llama_causal_lm(c: &LlamaConfig) -> ModelShapes {
    let (h, d) = (c.hidden_size, c.head_dim());
    let (q, kv) = (c.num_attention_heads * d, c.num_kv_heads() * d);
    let mut linears = Vec::new();
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let attn = [
            ("q_proj", h, q, c.qkv_bias()),
            ("k_proj", h, kv, c.qkv_bias()),
            ("v_proj", h, kv, c.qkv_bias()),
            ("o_proj", q, h, c.attention_bias),
        ];
        for (name, d_in, d_out, bias) in attn {
            linears.push(LinearShape::new(
                format!("{p}.self_attn.{name}"),
                d_in,
                d_out,
                bias,
            ));
        }
        let i_size = c.intermediate_size;
        for (name, d_in, d_out) in [
            ("gate_proj", h, i_size),
            ("up_proj", h, i_size),
            ("down_proj", i_size, h),
        ] {
            linears.push(LinearShape::new(
                format!("{p}.mlp.{name}"),
                d_in,
                d_out,
                c.mlp_bias,
            ));
        }
    }
    linears.push(LinearShape::new("lm_head", h, c.vocab_size, false));
    // A tied head is the embedding table: counted once, in lm_head.
    let embeddings = if c.tie_word_embeddings {
        0
    } else {
        c.vocab_size * h
    };
    let norms = (2 * c.num_hidden_layers + 1) * h;
    ModelShapes {
        linears,
        other_params: embeddings + norms,
    }
}
