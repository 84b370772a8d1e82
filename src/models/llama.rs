//! The Llama family of decoders (Hugging Face `LlamaForCausalLM` layout,
//! which Mistral, Qwen2 and SmolLM2 share) with every linear layer built
//! through the adapter factory under its Hugging Face path:
//! `model.layers.N.self_attn.{q,k,v,o}_proj`,
//! `model.layers.N.mlp.{gate,up,down}_proj` and `lm_head`.

use candle::backprop::GradStore;
use candle::{DType, Device, IndexOp, Module, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapter::AdaptedLinear;
use crate::kernels::attention::{grouped_attention, packed_grouped_attention};
use crate::kernels::gated_mlp::low_rank_silu_mlp;
use crate::kernels::qkv::low_rank_qkv_rope;
use crate::nn::checkpoint::{checkpointed_backward, Layers};
use crate::nn::ops::fusable;
use crate::nn::ops::sdpa;
use crate::nn::rotary_emb::{rope, rope_seq_first};
use crate::nn::{embedding, linear_b, rms_norm, Activation, Embedding, RmsNorm, VarBuilder};

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_act() -> Activation {
    Activation::Silu
}
fn default_eps() -> f64 {
    1e-6
}

/// `eos_token_id`: one id, or several (Llama 3.1 lists three).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_scaling`: the kinds transformers' Llama applies to its inverse
/// frequencies. Others (`yarn`, `dynamic`...) are refused by name.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn one() -> f64 {
    1.0
}

/// The fields of a Hugging Face Llama, Mistral or Qwen2 `config.json` this
/// crate reads; others are ignored.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Mistral-Nemo and Qwen3 set it; otherwise `hidden_size / heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's switch for a bias on q, k, v and o (Qwen2 has q, k and v
    /// biases without it).
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral's sliding attention window; sequences longer than it are
    /// refused, since only full attention is implemented.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2 states whether its `sliding_window` applies.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

/// The `model_type`s this module reads.
pub const MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "smollm2"];

impl LlamaConfig {
    /// Reads a `config.json`, in transformers 4's layout (`rope_theta`,
    /// `rope_scaling`) or 5's (`rope_parameters`).
    pub fn from_json(text: &str) -> Result<Self> {
        let bad = |e: serde_json::Error| candle::Error::msg(format!("Llama config: {e}"));
        let mut value: serde_json::Value = serde_json::from_str(text).map_err(bad)?;
        lift_rope_parameters(&mut value);
        let config: Self = serde_json::from_value(value).map_err(bad)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.model_type.as_deref() {
            if !MODEL_TYPES.contains(&t) {
                candle::bail!("model_type {t:?} is not a Llama-family decoder ({MODEL_TYPES:?})");
            }
        }
        let heads = self.num_attention_heads;
        if heads == 0 || !heads.is_multiple_of(self.num_kv_heads()) {
            candle::bail!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {}",
                self.num_kv_heads()
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads) {
            candle::bail!(
                "hidden_size {} is not a multiple of num_attention_heads {heads}",
                self.hidden_size
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            candle::bail!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim()
            );
        }
        if let Some(s) = &self.rope_scaling {
            if !matches!(s.rope_type.as_str(), "default" | "linear" | "llama3") {
                candle::bail!(
                    "rope_scaling type {:?} is not supported (default, linear, llama3)",
                    s.rope_type
                );
            }
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q, k and v carry a bias: Llama's `attention_bias`, or Qwen2.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type.as_deref() == Some("qwen2")
    }

    /// The attention window beyond which a sequence is refused, if any.
    pub fn attention_window(&self) -> Option<usize> {
        match self.model_type.as_deref() {
            Some("qwen2") if self.use_sliding_window != Some(true) => None,
            _ => self.sliding_window,
        }
    }

    /// The end-of-sequence ids (none when the config names none).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::ids)
            .unwrap_or_default()
    }

    /// RoPE inverse frequencies, `rope_scaling` applied as transformers'
    /// `ROPE_INIT_FUNCTIONS` does.
    pub fn inv_freq(&self) -> Vec<f64> {
        let dim = self.head_dim();
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / dim as f64))
            .collect();
        match &self.rope_scaling {
            Some(s) if s.rope_type == "linear" => base.iter().map(|f| f / s.factor).collect(),
            Some(s) if s.rope_type == "llama3" => llama3_inv_freq(&base, s),
            _ => base,
        }
    }
}

/// transformers 5 keeps `rope_theta` and the scaling in one
/// `rope_parameters` object; moves them where transformers 4 had them.
fn lift_rope_parameters(config: &mut serde_json::Value) {
    let Some(params) = config.get("rope_parameters").cloned() else {
        return;
    };
    if let Some(theta) = params.get("rope_theta") {
        config["rope_theta"] = theta.clone();
    }
    let kind = params.get("rope_type").and_then(|t| t.as_str());
    if kind.is_some_and(|t| t != "default") {
        config["rope_scaling"] = params;
    }
}

/// Llama 3.1's frequency-dependent scaling: long wavelengths divided by
/// `factor`, short ones kept, the band between interpolated.
fn llama3_inv_freq(base: &[f64], s: &RopeScaling) -> Vec<f64> {
    let low = s.low_freq_factor.unwrap_or(1.0);
    let high = s.high_freq_factor.unwrap_or(4.0);
    let old_len = s.original_max_position_embeddings.unwrap_or(8192) as f64;
    let (low_wavelen, high_wavelen) = (old_len / low, old_len / high);
    base.iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth = (old_len / wavelen - low) / (high - low);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

/// Cached keys and values per layer, for incremental decoding.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// How many positions the cache holds.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let kv = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        // Stored without their autograd history: with trainable adapters in
        // the model, each step's keys would otherwise keep every earlier
        // step's activations alive (10.2 GB after 64 greedy translations).
        self.layers[layer] = Some((kv.0.detach(), kv.1.detach()));
        Ok(kv)
    }
}

/// Positions `offset..offset + seq` of the rotary tables, `(seq, dim / 2)`.
#[derive(Clone, Debug)]
struct Rotary {
    inv_freq: Vec<f64>,
}

impl Rotary {
    fn cos_sin(
        &self,
        offset: usize,
        seq: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        // f32 angles, as transformers computes them (its inv_freq is f32).
        let angles: Vec<f32> = (offset..offset + seq)
            .flat_map(|p| self.inv_freq.iter().map(move |f| p as f32 * (*f as f32)))
            .collect();
        Self::tables(Tensor::from_vec(angles, (seq, half), dev)?, dtype)
    }

    /// The tables at each row's own `positions` (`rows x seq`), `(rows,
    /// seq, dim / 2)`: packed rows restart positions at every document.
    fn cos_sin_at(
        &self,
        positions: &[Vec<usize>],
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (rows, seq, half) = (positions.len(), positions[0].len(), self.inv_freq.len());
        let angles: Vec<f32> = positions
            .iter()
            .flatten()
            .flat_map(|&p| self.inv_freq.iter().map(move |f| p as f32 * (*f as f32)))
            .collect();
        Self::tables(Tensor::from_vec(angles, (rows, seq, half), dev)?, dtype)
    }

    fn tables(angles: Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        Ok((
            angles.cos()?.to_dtype(dtype)?,
            angles.sin()?.to_dtype(dtype)?,
        ))
    }
}

#[derive(Clone, Debug)]
struct Attention {
    q_proj: AdaptedLinear,
    k_proj: AdaptedLinear,
    v_proj: AdaptedLinear,
    o_proj: AdaptedLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, c: &LlamaConfig) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim());
        let (heads, kv_heads) = (c.num_attention_heads, c.num_kv_heads());
        Ok(Self {
            q_proj: linear_b(h, heads * d, c.qkv_bias(), vb.pp("q_proj"))?,
            k_proj: linear_b(h, kv_heads * d, c.qkv_bias(), vb.pp("k_proj"))?,
            v_proj: linear_b(h, kv_heads * d, c.qkv_bias(), vb.pp("v_proj"))?,
            o_proj: linear_b(heads * d, h, c.attention_bias, vb.pp("o_proj"))?,
            heads,
            kv_heads,
            head_dim: d,
        })
    }

    /// `(B, T, heads * d)` to `(B, heads, T, d)`.
    fn split(&self, xs: Tensor, heads: usize) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        xs.reshape((b, t, heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// The attention context without a cache (training, scoring), on the
    /// CPU in f32: RoPE and the fused attention core work on the
    /// projections' own `(B, T, heads · d)` layout, so no head is copied
    /// into `(B, heads, T, d)`, no key-value head is repeated for its query
    /// group, and no `T x T` score tensor outlives its head. `None`
    /// elsewhere, for the composed path.
    fn fused_core(&self, xs: &Tensor, step: &Step) -> Result<Option<Tensor>> {
        let Some(mask) = step.mask.as_ref() else {
            return Ok(None);
        };
        if !(fusable(xs) && mask.dtype() == DType::F32) {
            return Ok(None);
        }
        let (b, t, _) = xs.dims3()?;
        let d = self.head_dim;
        let rotated = |ys: Tensor, heads: usize| -> Result<Tensor> {
            let ys = ys.reshape((b, t, heads, d))?;
            rope_seq_first(&ys, &step.cos, &step.sin)?.reshape((b, t, heads * d))
        };
        let q = rotated(self.q_proj.forward_t(xs, step.train)?, self.heads)?;
        let k = rotated(self.k_proj.forward_t(xs, step.train)?, self.kv_heads)?;
        let v = self.v_proj.forward_t(xs, step.train)?;
        grouped_attention(&q, &k, &v, mask, self.heads, self.kv_heads)
    }

    /// The projections, rotation and core as two ops (`kernels::qkv` and
    /// the packed attention core) when training with a low-rank update on
    /// each of q, k and v; `None` otherwise.
    fn fused_block(&self, xs: &Tensor, step: &Step) -> Result<Option<Tensor>> {
        let Some(mask) = step.mask.as_ref().filter(|m| m.dtype() == DType::F32) else {
            return Ok(None);
        };
        if !step.train {
            return Ok(None);
        }
        let (Some(q), Some(k), Some(v)) = (
            self.q_proj.block_layer(true)?,
            self.k_proj.block_layer(true)?,
            self.v_proj.block_layer(true)?,
        ) else {
            return Ok(None);
        };
        let tables = (&step.cos, &step.sin);
        let Some(qkv) = low_rank_qkv_rope(xs, [q, k, v], tables, self.head_dim)? else {
            return Ok(None);
        };
        let (b, t, _) = xs.dims3()?;
        let heads = (self.heads, self.kv_heads, self.head_dim);
        packed_grouped_attention(&qkv, mask, (b, t), heads).map(Some)
    }

    fn forward(
        &self,
        xs: &Tensor,
        step: &Step,
        layer: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        if cache.is_none() {
            if let Some(ys) = self.fused_block(xs, step)? {
                return self.o_proj.forward_t(&ys, step.train);
            }
            if let Some(ys) = self.fused_core(xs, step)? {
                return self.o_proj.forward_t(&ys, step.train);
            }
        }
        let (b, t, _) = xs.dims3()?;
        let q = self.split(self.q_proj.forward_t(xs, step.train)?, self.heads)?;
        let k = self.split(self.k_proj.forward_t(xs, step.train)?, self.kv_heads)?;
        let v = self.split(self.v_proj.forward_t(xs, step.train)?, self.kv_heads)?;
        let q = rope(&q, &step.cos, &step.sin)?;
        let k = rope(&k, &step.cos, &step.sin)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, k, v)?,
            None => (k, v),
        };
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let ys = sdpa(&q, &k, &v, step.mask.as_ref(), false, scale, 1.0)?;
        let ys = ys
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        self.o_proj.forward_t(&ys, step.train)
    }
}

#[derive(Clone, Debug)]
struct Mlp {
    gate_proj: AdaptedLinear,
    up_proj: AdaptedLinear,
    down_proj: AdaptedLinear,
    act: Activation,
}

impl Mlp {
    /// The whole MLP as one op (`kernels::gated_mlp`) when training a
    /// SiLU MLP with a low-rank update on each layer; `None` otherwise.
    fn fused(&self, xs: &Tensor, train: bool) -> Result<Option<Tensor>> {
        if !(train && self.act == Activation::Silu) {
            return Ok(None);
        }
        let (Some(gate), Some(up), Some(down)) = (
            self.gate_proj.block_layer(train)?,
            self.up_proj.block_layer(train)?,
            self.down_proj.block_layer(train)?,
        ) else {
            return Ok(None);
        };
        low_rank_silu_mlp(xs, [gate, up, down])
    }

    fn new(vb: VarBuilder, c: &LlamaConfig) -> Result<Self> {
        let (h, i, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        Ok(Self {
            gate_proj: linear_b(h, i, bias, vb.pp("gate_proj"))?,
            up_proj: linear_b(h, i, bias, vb.pp("up_proj"))?,
            down_proj: linear_b(i, h, bias, vb.pp("down_proj"))?,
            act: c.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(ys) = self.fused(xs, train)? {
            return Ok(ys);
        }
        let gate = self.gate_proj.forward_t(xs, train)?;
        let hidden = self.act.gated(&gate, &self.up_proj.forward_t(xs, train)?)?;
        self.down_proj.forward_t(&hidden, train)
    }
}

#[derive(Clone, Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// Every adapted linear of the layer.
    fn linears(&self) -> [&AdaptedLinear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    fn new(vb: VarBuilder, c: &LlamaConfig) -> Result<Self> {
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        Ok(Self {
            input_layernorm: rms_norm(h, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(vb.pp("self_attn"), c)?,
            post_attention_layernorm: rms_norm(h, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(vb.pp("mlp"), c)?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        step: &Step,
        layer: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let attn =
            self.self_attn
                .forward(&self.input_layernorm.forward(xs)?, step, layer, cache)?;
        let xs = (xs + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?, step.train)?;
        xs + mlp
    }
}

/// The decoder layers of one training pass, for [`checkpointed_backward`];
/// their state is the adapters' dropout counters.
struct CheckpointedLayers<'a> {
    layers: &'a [DecoderLayer],
    step: &'a Step,
}

impl Layers for CheckpointedLayers<'_> {
    type State = Vec<Option<u64>>;

    fn count(&self) -> usize {
        self.layers.len()
    }

    fn forward(&self, i: usize, xs: &Tensor) -> Result<Tensor> {
        self.layers[i].forward(xs, self.step, i, None)
    }

    fn state(&self, i: usize) -> Self::State {
        self.layers[i]
            .linears()
            .iter()
            .map(|l| l.dropout_calls())
            .collect()
    }

    fn rewind(&self, i: usize, state: &Self::State) {
        for (linear, calls) in self.layers[i].linears().iter().zip(state) {
            if let Some(calls) = calls {
                linear.set_dropout_calls(*calls);
            }
        }
    }
}

/// What every layer of one forward pass shares.
struct Step {
    cos: Tensor,
    sin: Tensor,
    /// The additive causal and padding mask, broadcastable to
    /// `(B, heads, T, kv_len)`; built once per forward, not per layer.
    mask: Option<Tensor>,
    train: bool,
}

/// `LlamaForCausalLM` (and `MistralForCausalLM`, `Qwen2ForCausalLM`).
#[derive(Clone, Debug)]
pub struct LlamaForCausalLM {
    config: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: AdaptedLinear,
    rotary: Rotary,
}

impl LlamaForCausalLM {
    /// `vb` is the checkpoint root (`model.*`, and `lm_head` unless the
    /// embeddings are tied). A tied `lm_head` starts from the embedding
    /// table and goes through the factory like any other linear.
    pub fn new(vb: VarBuilder, config: &LlamaConfig) -> Result<Self> {
        config.validate()?;
        let m = vb.pp("model");
        let embed_tokens = embedding(config.vocab_size, config.hidden_size, m.pp("embed_tokens"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(m.pp("layers").pp(i), config))
            .collect::<Result<_>>()?;
        let norm = rms_norm(config.hidden_size, config.rms_norm_eps, m.pp("norm"))?;
        let own_head =
            vb.contains_tensor("lm_head.weight") || vb.factory().has_quantized("lm_head.weight");
        let lm_head = if config.tie_word_embeddings && !own_head {
            let tied = candle_nn::Linear::new(embed_tokens.embeddings().clone(), None);
            vb.factory().build("lm_head", &tied)?
        } else {
            linear_b(
                config.hidden_size,
                config.vocab_size,
                false,
                vb.pp("lm_head"),
            )?
        };
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: Rotary {
                inv_freq: config.inv_freq(),
            },
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.embeddings().device().clone()
    }

    /// Logits `(B, T, vocab)` for `input_ids (B, T)`. `attention_mask`
    /// `(B, kv_len)` marks real tokens with 1 and padding with 0 (right
    /// padding in training; it covers the cached positions too); `cache`,
    /// when given, holds the earlier positions and receives these.
    ///
    /// Packed rows (`decoder::packing`, no cache) number their documents
    /// 1, 2, ... in the mask instead: a token then attends only within its
    /// document, and positions restart at each document, so every document
    /// gets the logits it would get alone.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, cache, train)?;
        self.lm_head.forward_t(&hidden, train)
    }

    /// The final normalised hidden states `(B, T, hidden)`, before
    /// `lm_head` (see [`Self::forward_t`] for the arguments).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let (mut xs, step) = self.embed(input_ids, attention_mask, offset, train)?;
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &step, i, cache.as_deref_mut())?;
        }
        self.norm.forward(&xs)
    }

    /// The token embeddings and what every layer of this pass shares.
    fn embed(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        offset: usize,
        train: bool,
    ) -> Result<(Tensor, Step)> {
        let (_, t) = input_ids.dims2()?;
        self.check_length(offset + t)?;
        let xs = self.embed_tokens.forward(input_ids)?;
        let (dtype, dev) = (xs.dtype(), xs.device());
        let ((cos, sin), mask) = match packed_documents(attention_mask)? {
            Some(_) if offset > 0 => {
                candle::bail!(
                    "packed rows (document numbers in the attention mask) cannot use a cache"
                )
            }
            Some(documents) => (
                self.rotary
                    .cos_sin_at(&document_positions(&documents), dtype, dev)?,
                Some(document_bias(&documents, dtype, dev)?),
            ),
            None => (
                self.rotary.cos_sin(offset, t, dtype, dev)?,
                attention_bias(attention_mask, offset, t, dtype, dev)?,
            ),
        };
        let step = Step {
            cos,
            sin,
            mask,
            train,
        };
        Ok((xs, step))
    }

    fn check_length(&self, len: usize) -> Result<()> {
        if let Some(window) = self.config.attention_window().filter(|w| len > *w) {
            candle::bail!("a sequence of {len} tokens is longer than the sliding attention window of {window}, which is not implemented");
        }
        if let Some(max) = self.config.max_position_embeddings.filter(|m| len > *m) {
            candle::bail!("a sequence of {len} tokens is longer than the model's context of {max}");
        }
        Ok(())
    }

    /// Mean cross-entropy of each next token against `labels (B, T)`
    /// (aligned with `input_ids`, `-100` where no loss falls), as
    /// transformers' `LlamaForCausalLM(labels=...)` shifts and computes it.
    pub fn loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.token_nlls(input_ids, attention_mask, labels, train)?
            .0
            .mean_all()
    }

    /// The negative log-likelihood of each labelled next token, `(n)`, and
    /// the batch row each belongs to (see [`Self::loss`]).
    pub fn token_nlls(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Vec<usize>)> {
        let hidden = self.hidden_states(input_ids, attention_mask, None, train)?;
        self.nlls_after(&hidden, labels, train)
    }

    /// [`Self::token_nlls`] from the final hidden states.
    fn nlls_after(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Vec<usize>)> {
        let (b, t, h) = hidden.dims3()?;
        if t < 2 {
            candle::bail!("a causal LM loss needs at least 2 tokens per row");
        }
        // Position i predicts token i + 1. Only the positions with a label
        // go through lm_head: its (rows, vocab) logits are the largest
        // tensors of a step, and prompts and padding need none.
        let next: Vec<i64> = labels
            .narrow(1, 1, t - 1)?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1()?;
        let (rows, targets): (Vec<u32>, Vec<u32>) = next
            .iter()
            .enumerate()
            .filter(|(_, l)| **l != -100)
            .map(|(i, l)| (((i / (t - 1)) * t + i % (t - 1)) as u32, *l as u32))
            .unzip();
        if rows.is_empty() {
            candle::bail!("every label is -100: nothing to compute a loss on");
        }
        let (n, dev) = (rows.len(), hidden.device());
        let row_of = rows.iter().map(|&r| r as usize / t).collect();
        let rows = Tensor::from_vec(rows, n, dev)?;
        let picked = hidden.reshape((b * t, h))?.index_select(&rows, 0)?;
        let nlls = self.lm_head.target_nlls(&picked, targets, train)?;
        Ok((nlls, row_of))
    }

    /// The training loss of [`Self::loss`] and the gradients of `params`
    /// (scaled by `scale`) with activation checkpointing
    /// ([`crate::nn::checkpoint`]): the decoder layers' activations are
    /// recomputed one layer at a time in the backward pass, so a step holds
    /// one layer's activations instead of all of them, for one more
    /// forward pass. Dropout draws the same masks both times.
    pub fn loss_backward_checkpointed(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        params: &[&Tensor],
        scale: f64,
    ) -> Result<(Tensor, GradStore)> {
        let (xs, step) = self.embed(input_ids, attention_mask, 0, true)?;
        let layers = CheckpointedLayers {
            layers: &self.layers,
            step: &step,
        };
        let head = |top: &Tensor| {
            let hidden = self.norm.forward(top)?;
            self.nlls_after(&hidden, labels, true)?.0.mean_all()
        };
        checkpointed_backward(&layers, &xs, head, params, scale)
    }

    /// The next-token logits `(vocab)` after `tokens` (one sequence), with
    /// `cache` holding what came before them.
    pub fn next_logits(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let ids = Tensor::new(tokens, &self.device())?.unsqueeze(0)?;
        let hidden = self.hidden_states(&ids, None, Some(cache), false)?;
        let last = hidden.i((.., tokens.len() - 1..tokens.len(), ..))?;
        self.lm_head
            .forward_t(&last, false)?
            .i((0, 0))?
            .to_dtype(DType::F32)
    }
}

/// The additive mask of `t` queries at positions `offset..offset + t`:
/// `-inf` on future keys and on padding keys (`attention_mask` 0), else 0.
/// `None` when nothing is masked (one query, no padding).
fn attention_bias(
    attention_mask: Option<&Tensor>,
    offset: usize,
    t: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let kv = offset + t;
    let causal = if t > 1 {
        let bias: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..kv).map(move |j| {
                    if j <= i + offset {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        Some(Tensor::from_vec(bias, (1, 1, t, kv), dev)?.to_dtype(dtype)?)
    } else {
        None
    };
    let padding = attention_mask.map(|m| padding_mask(m, dtype)).transpose()?;
    Ok(match (causal, padding) {
        (Some(c), Some(p)) => Some(c.broadcast_add(&p)?),
        (c, p) => c.or(p),
    })
}

/// The mask's rows when it numbers packed documents (a value above 1),
/// else `None`: a plain 0/1 mask takes the usual path.
fn packed_documents(attention_mask: Option<&Tensor>) -> Result<Option<Vec<Vec<u32>>>> {
    let Some(mask) = attention_mask else {
        return Ok(None);
    };
    let rows = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(rows.iter().flatten().any(|&d| d > 1).then_some(rows))
}

/// Each token's position within its document (padding keeps counting).
fn document_positions(documents: &[Vec<u32>]) -> Vec<Vec<usize>> {
    documents
        .iter()
        .map(|row| {
            let mut start = 0;
            (0..row.len())
                .map(|i| {
                    if i > 0 && row[i] != row[i - 1] && row[i] != 0 {
                        start = i;
                    }
                    i - start
                })
                .collect()
        })
        .collect()
}

/// The additive mask `(B, 1, T, T)` of packed rows: query `i` sees key
/// `j ≤ i` of its own document; padding queries (document 0) see every
/// earlier real token, as with a plain mask, so their rows stay finite.
fn document_bias(documents: &[Vec<u32>], dtype: DType, dev: &Device) -> Result<Tensor> {
    let (rows, t) = (documents.len(), documents[0].len());
    let bias: Vec<f32> = documents
        .iter()
        .flat_map(|d| {
            (0..t).flat_map(move |i| {
                (0..t).map(move |j| {
                    let visible = j <= i && d[j] != 0 && (d[i] == d[j] || d[i] == 0);
                    if visible {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
        })
        .collect();
    Tensor::from_vec(bias, (rows, 1, t, t), dev)?.to_dtype(dtype)
}

/// `0` where `mask` is 1 and `-inf` where it is 0, shaped `(B, 1, 1, kv)`.
fn padding_mask(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let keep = mask.to_dtype(DType::U8)?;
    let zeros = Tensor::zeros(keep.shape(), dtype, mask.device())?;
    let blocked = Tensor::new(f32::NEG_INFINITY, mask.device())?
        .to_dtype(dtype)?
        .broadcast_as(keep.shape())?;
    keep.where_cond(&zeros, &blocked)?
        .unsqueeze(1)?
        .unsqueeze(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    /// The cache keeps values, not autograd history: keys computed from a
    /// trainable tensor would otherwise chain every decoding step's
    /// activations together.
    #[test]
    fn the_kv_cache_stores_keys_and_values_without_their_history() -> Result<()> {
        let w = Var::ones((1, 1, 2, 4), DType::F32, &Device::Cpu)?;
        let mut cache = KvCache::default();
        for step in 1..=3 {
            let k = (w.as_tensor() * step as f64)?;
            assert!(k.track_op());
            let (k_all, _) = cache.append(0, k.clone(), k)?;
            assert!(
                k_all.track_op(),
                "this step's attention still has a backward"
            );
            let (ck, cv) = cache.layers[0].as_ref().unwrap();
            assert!(!ck.track_op() && !cv.track_op());
            assert_eq!(cache.len(), 2 * step);
        }
        Ok(())
    }
}
