//! T5 (v1.0 and v1.1) in the `T5ForConditionalGeneration` layout, with every
//! linear layer built through the adapter factory, a seeded dropout, a loss
//! over labels (`-100` ignored), and greedy and beam-search generation with a
//! key/value cache.
//!
//! What transformers does and this follows: the T5 layer norm scales by the
//! root mean square without subtracting the mean and has no bias; attention
//! scores are not divided by `sqrt(d_kv)`; the relative position bias lives in
//! the first layer of each stack and is shared by the others; with tied
//! embeddings the decoder output is scaled by `d_model^-0.5` before `lm_head`.

use candle::{DType, Device, Module, Result, Tensor, D};
use candle_nn::Linear;
use serde::Deserialize;

use super::loss::labelled_rows;
use crate::adapter::AdaptedLinear;
use crate::dropout::SeededDropout;
use crate::nn::ops::softmax_last_dim;
use crate::nn::{embedding, linear_no_bias, rms_norm, Activation, Embedding, RmsNorm, VarBuilder};

fn d32() -> usize {
    32
}
fn d128() -> usize {
    128
}
fn d01() -> f64 {
    0.1
}
fn d_eps() -> f64 {
    1e-6
}
fn d_relu() -> String {
    "relu".into()
}
fn d_true() -> bool {
    true
}
fn d_one() -> usize {
    1
}

/// The fields of a Hugging Face T5 `config.json` this crate reads.
#[derive(Clone, Debug, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "d32")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "d128")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "d01")]
    pub dropout_rate: f64,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "d_relu")]
    pub feed_forward_proj: String,
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "d_one")]
    pub eos_token_id: usize,
    #[serde(default)]
    pub decoder_start_token_id: Option<usize>,
}

impl T5Config {
    pub fn from_json(text: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text)
            .map_err(|e| candle::Error::msg(format!("T5 config: {e}")))?;
        c.activation()?;
        Ok(c)
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// v1.1's `gated-gelu` FFN has `wi_0` and `wi_1`; v1.0's `relu` has `wi`.
    pub fn is_gated(&self) -> bool {
        self.feed_forward_proj.starts_with("gated-")
    }

    /// As transformers: the part after `gated-`, and `gated-gelu` means the
    /// tanh approximation (`gelu_new`).
    pub fn activation(&self) -> Result<Activation> {
        match self.feed_forward_proj.as_str() {
            "gated-gelu" => Ok(Activation::GeluTanh),
            other => Activation::from_hf(other.strip_prefix("gated-").unwrap_or(other)),
        }
    }

    pub fn decoder_start_token_id(&self) -> u32 {
        self.decoder_start_token_id.unwrap_or(self.pad_token_id) as u32
    }
}

/// transformers' `_relative_position_bucket`.
pub fn relative_position_bucket(
    relative: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> u32 {
    let mut buckets = num_buckets as i64;
    let mut result = 0i64;
    let mut rel = relative;
    if bidirectional {
        buckets /= 2;
        if rel > 0 {
            result += buckets;
        }
        rel = rel.abs();
    } else {
        rel = -rel.min(0);
    }
    let max_exact = buckets / 2;
    let bucket = if rel < max_exact {
        rel
    } else {
        // In f32, as torch computes it, truncated toward zero.
        let large = max_exact
            + ((rel as f32 / max_exact as f32).ln() / (max_distance as f32 / max_exact as f32).ln()
                * (buckets - max_exact) as f32) as i64;
        large.min(buckets - 1)
    };
    (result + bucket) as u32
}

#[derive(Clone, Debug)]
struct Attention {
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: AdaptedLinear,
    o: AdaptedLinear,
    heads: usize,
    d_kv: usize,
    relative_bias: Option<Embedding>,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
    dropout: SeededDropout,
}

impl Attention {
    fn new(vb: VarBuilder, c: &T5Config, has_bias: bool, bidirectional: bool) -> Result<Self> {
        let inner = c.num_heads * c.d_kv;
        let relative_bias = if has_bias {
            Some(embedding(
                c.relative_attention_num_buckets,
                c.num_heads,
                vb.pp("relative_attention_bias"),
            )?)
        } else {
            None
        };
        Ok(Self {
            q: linear_no_bias(c.d_model, inner, vb.pp("q"))?,
            k: linear_no_bias(c.d_model, inner, vb.pp("k"))?,
            v: linear_no_bias(c.d_model, inner, vb.pp("v"))?,
            o: linear_no_bias(inner, c.d_model, vb.pp("o"))?,
            heads: c.num_heads,
            d_kv: c.d_kv,
            relative_bias,
            bidirectional,
            num_buckets: c.relative_attention_num_buckets,
            max_distance: c.relative_attention_max_distance,
            dropout: vb.dropout(c.dropout_rate)?,
        })
    }

    /// `(1, heads, q_len, k_len)` bias for queries at positions
    /// `offset..offset + q_len` over keys `0..k_len`.
    fn position_bias(
        &self,
        q_len: usize,
        k_len: usize,
        offset: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let Some(bias) = &self.relative_bias else {
            candle::bail!("this attention layer has no relative position bias");
        };
        let buckets: Vec<u32> = (0..q_len)
            .flat_map(|i| {
                (0..k_len).map(move |j| {
                    let relative = j as i64 - (i + offset) as i64;
                    relative_position_bucket(
                        relative,
                        self.bidirectional,
                        self.num_buckets,
                        self.max_distance,
                    )
                })
            })
            .collect();
        let ids = Tensor::from_vec(buckets, (q_len, k_len), device)?;
        bias.forward(&ids)?.permute((2, 0, 1))?.unsqueeze(0)
    }

    fn heads_of(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.heads, self.d_kv))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Keys and values of `source`, `(B, heads, T, d_kv)` each.
    fn key_values(&self, source: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        Ok((
            self.heads_of(&self.k.forward_t(source, train)?)?,
            self.heads_of(&self.v.forward_t(source, train)?)?,
        ))
    }

    /// Attention of `xs` over `(k, v)` with an additive `bias` that already
    /// holds the masks.
    fn attend(
        &self,
        xs: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let q = self.heads_of(&self.q.forward_t(xs, train)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs = softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(xs.dtype())?;
        let probs = self.dropout.forward_t(&probs, train)?;
        let context = probs
            .matmul(v)?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.d_kv))?;
        self.o.forward_t(&context, train)
    }
}

#[derive(Clone, Debug)]
struct FeedForward {
    wi: Vec<AdaptedLinear>,
    wo: AdaptedLinear,
    act: Activation,
    inner_dropout: SeededDropout,
}

impl FeedForward {
    fn new(vb: VarBuilder, c: &T5Config) -> Result<Self> {
        let names: &[&str] = if c.is_gated() {
            &["wi_0", "wi_1"]
        } else {
            &["wi"]
        };
        let wi = names
            .iter()
            .map(|n| linear_no_bias(c.d_model, c.d_ff, vb.pp(n)))
            .collect::<Result<_>>()?;
        Ok(Self {
            wi,
            wo: linear_no_bias(c.d_ff, c.d_model, vb.pp("wo"))?,
            act: c.activation()?,
            inner_dropout: vb.dropout(c.dropout_rate)?,
        })
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.act.forward(&self.wi[0].forward_t(xs, train)?)?;
        if let Some(linear) = self.wi.get(1) {
            h = (h * linear.forward_t(xs, train)?)?;
        }
        self.wo
            .forward_t(&self.inner_dropout.forward_t(&h, train)?, train)
    }
}

/// A pre-norm residual sub-layer's norm and dropout.
#[derive(Clone, Debug)]
struct Residual {
    norm: RmsNorm,
    dropout: SeededDropout,
}

impl Residual {
    /// The norm under `vb` (a `layer.N`); the dropout is named `residual`
    /// there.
    fn new(vb: VarBuilder, c: &T5Config) -> Result<Self> {
        Ok(Self {
            norm: rms_norm(c.d_model, c.layer_norm_epsilon, vb.pp("layer_norm"))?,
            dropout: vb.pp("residual").dropout(c.dropout_rate)?,
        })
    }

    fn add(&self, xs: &Tensor, out: &Tensor, train: bool) -> Result<Tensor> {
        xs + self.dropout.forward_t(out, train)?
    }
}

#[derive(Clone, Debug)]
struct Block {
    self_attention: (Attention, Residual),
    cross_attention: Option<(Attention, Residual)>,
    ffn: (FeedForward, Residual),
}

impl Block {
    fn new(vb: VarBuilder, c: &T5Config, decoder: bool, first: bool) -> Result<Self> {
        let self_attention = (
            Attention::new(vb.pp("layer.0.SelfAttention"), c, first, !decoder)?,
            Residual::new(vb.pp("layer.0"), c)?,
        );
        let cross_attention = if decoder {
            Some((
                Attention::new(vb.pp("layer.1.EncDecAttention"), c, false, true)?,
                Residual::new(vb.pp("layer.1"), c)?,
            ))
        } else {
            None
        };
        let ff = vb.pp(if decoder { "layer.2" } else { "layer.1" });
        let ffn = (
            FeedForward::new(ff.pp("DenseReluDense"), c)?,
            Residual::new(ff, c)?,
        );
        Ok(Self {
            self_attention,
            cross_attention,
            ffn,
        })
    }
}

/// Additive masks: 0 where attended, the lowest f32 where not.
fn additive(keep: &Tensor) -> Result<Tensor> {
    (keep.to_dtype(DType::F32)? - 1.0)? * -(f32::MIN as f64)
}

/// `(B, 1, 1, T)` from a `(B, T)` 0/1 mask.
fn padding_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    additive(mask)?.reshape((b, 1, 1, t))
}

/// `(1, 1, q_len, k_len)` causal mask for queries at `offset..`.
fn causal_mask(q_len: usize, k_len: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let keep: Vec<u8> = (0..q_len)
        .flat_map(|i| (0..k_len).map(move |j| u8::from(j <= i + offset)))
        .collect();
    additive(&Tensor::from_vec(keep, (q_len, k_len), device)?)?.reshape((1, 1, q_len, k_len))
}

#[derive(Clone, Debug)]
struct Stack {
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    dropout: SeededDropout,
}

impl Stack {
    fn new(vb: VarBuilder, c: &T5Config, decoder: bool) -> Result<Self> {
        let n = if decoder {
            c.decoder_layers()
        } else {
            c.num_layers
        };
        let blocks = (0..n)
            .map(|i| Block::new(vb.pp(format!("block.{i}")), c, decoder, i == 0))
            .collect::<Result<_>>()?;
        Ok(Self {
            blocks,
            final_norm: rms_norm(c.d_model, c.layer_norm_epsilon, vb.pp("final_layer_norm"))?,
            dropout: vb.dropout(c.dropout_rate)?,
        })
    }
}

/// Cached keys and values for incremental decoding: self-attention per layer
/// (grown by one position per step) and cross-attention (computed once).
#[derive(Clone, Debug)]
pub struct DecoderCache {
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    cross_kv: Vec<(Tensor, Tensor)>,
    position: usize,
}

impl DecoderCache {
    /// Keeps only the batch rows `rows` (beam search reorders beams).
    fn select(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.self_kv.iter_mut().flatten() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        for (k, v) in self.cross_kv.iter_mut() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }
}

/// `T5ForConditionalGeneration`.
#[derive(Clone, Debug)]
pub struct T5ForConditionalGeneration {
    config: T5Config,
    shared: Embedding,
    encoder: Stack,
    decoder: Stack,
    lm_head: AdaptedLinear,
    embed_dropout: (SeededDropout, SeededDropout),
}

impl T5ForConditionalGeneration {
    /// `vb` is the checkpoint root (`shared`, `encoder.*`, `decoder.*`,
    /// `lm_head` when untied).
    pub fn new(vb: VarBuilder, config: &T5Config) -> Result<Self> {
        let c = config;
        let shared = embedding(c.vocab_size, c.d_model, vb.pp("shared"))?;
        let encoder = Stack::new(vb.pp("encoder"), c, false)?;
        let decoder = Stack::new(vb.pp("decoder"), c, true)?;
        let tied = Linear::new(shared.embeddings().clone(), None);
        let lm_head = if c.tie_word_embeddings && vb.trains_everything() {
            // The tied head must train the shared table itself, not a copy.
            AdaptedLinear::Frozen(tied.into())
        } else if c.tie_word_embeddings {
            vb.factory().build("lm_head", &tied)?
        } else {
            linear_no_bias(c.d_model, c.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            config: c.clone(),
            shared,
            encoder,
            decoder,
            lm_head,
            embed_dropout: (
                vb.pp("encoder.embed").dropout(c.dropout_rate)?,
                vb.pp("decoder.embed").dropout(c.dropout_rate)?,
            ),
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// The encoder's last hidden state `(B, T, d_model)`.
    pub fn encode(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let t = input_ids.dim(1)?;
        let mut xs = self
            .embed_dropout
            .0
            .forward_t(&self.shared.forward(input_ids)?, train)?;
        let first = &self.encoder.blocks[0].self_attention.0;
        let mut bias = first
            .position_bias(t, t, 0, xs.device())?
            .to_dtype(DType::F32)?;
        if let Some(m) = attention_mask {
            bias = bias.broadcast_add(&padding_mask(m)?)?;
        }
        let bias = bias.to_dtype(xs.dtype())?;
        for block in &self.encoder.blocks {
            let (attn, res) = &block.self_attention;
            let normed = res.norm.forward(&xs)?;
            let (k, v) = attn.key_values(&normed, train)?;
            xs = res.add(&xs, &attn.attend(&normed, &k, &v, &bias, train)?, train)?;
            let (ffn, res) = &block.ffn;
            xs = res.add(&xs, &ffn.forward_t(&res.norm.forward(&xs)?, train)?, train)?;
        }
        self.encoder
            .dropout
            .forward_t(&self.encoder.final_norm.forward(&xs)?, train)
    }

    /// Decoder hidden states for `decoder_input_ids`, attending to
    /// `encoder_hidden`. With a cache, `decoder_input_ids` are the new
    /// positions only, and the cache grows by them.
    fn decode_hidden(
        &self,
        decoder_input_ids: &Tensor,
        encoder_hidden: &Tensor,
        encoder_mask: Option<&Tensor>,
        mut cache: Option<&mut DecoderCache>,
        train: bool,
    ) -> Result<Tensor> {
        let (_, t) = decoder_input_ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.position);
        let k_len = offset + t;
        let mut xs = self
            .embed_dropout
            .1
            .forward_t(&self.shared.forward(decoder_input_ids)?, train)?;
        let dev = xs.device().clone();
        let first = &self.decoder.blocks[0].self_attention.0;
        let self_bias = first
            .position_bias(t, k_len, offset, &dev)?
            .broadcast_add(&causal_mask(t, k_len, offset, &dev)?)?
            .to_dtype(xs.dtype())?;
        let s = encoder_hidden.dim(1)?;
        let cross_bias = match encoder_mask {
            Some(m) => padding_mask(m)?,
            None => Tensor::zeros((1, 1, 1, s), DType::F32, &dev)?,
        }
        .to_dtype(xs.dtype())?;
        for (i, block) in self.decoder.blocks.iter().enumerate() {
            let (attn, res) = &block.self_attention;
            let normed = res.norm.forward(&xs)?;
            let (mut k, mut v) = attn.key_values(&normed, train)?;
            if let Some(cache) = cache.as_deref_mut() {
                if let Some((pk, pv)) = &cache.self_kv[i] {
                    k = Tensor::cat(&[pk, &k], 2)?;
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                cache.self_kv[i] = Some((k.clone(), v.clone()));
            }
            xs = res.add(
                &xs,
                &attn.attend(&normed, &k, &v, &self_bias, train)?,
                train,
            )?;

            let (cross, res) = block
                .cross_attention
                .as_ref()
                .expect("decoder blocks have cross-attention");
            let normed = res.norm.forward(&xs)?;
            let (ck, cv) = match cache.as_deref() {
                Some(cache) => cache.cross_kv[i].clone(),
                None => cross.key_values(encoder_hidden, train)?,
            };
            xs = res.add(
                &xs,
                &cross.attend(&normed, &ck, &cv, &cross_bias, train)?,
                train,
            )?;

            let (ffn, res) = &block.ffn;
            xs = res.add(&xs, &ffn.forward_t(&res.norm.forward(&xs)?, train)?, train)?;
        }
        if let Some(cache) = cache {
            cache.position += t;
        }
        self.decoder
            .dropout
            .forward_t(&self.decoder.final_norm.forward(&xs)?, train)
    }

    fn lm_logits(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        self.lm_head.forward_t(&self.lm_input(hidden)?, train)
    }

    /// What `lm_head` reads: the decoder output, scaled by `d_model^-0.5`
    /// when the head is tied to the embeddings.
    fn lm_input(&self, hidden: &Tensor) -> Result<Tensor> {
        if self.config.tie_word_embeddings {
            hidden * (self.config.d_model as f64).powf(-0.5)
        } else {
            Ok(hidden.clone())
        }
    }

    /// Logits `(B, T_dec, vocab)` for teacher-forced decoder inputs.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        decoder_input_ids: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let encoded = self.encode(input_ids, attention_mask, train)?;
        let hidden =
            self.decode_hidden(decoder_input_ids, &encoded, attention_mask, None, train)?;
        self.lm_logits(&hidden, train)
    }

    /// transformers' `_shift_right`: the decoder start token, then the labels
    /// without their last position, with `-100` replaced by the pad id.
    pub fn shift_right(&self, labels: &Tensor) -> Result<Tensor> {
        let rows: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
        let start = self.config.decoder_start_token_id();
        let pad = self.config.pad_token_id as u32;
        let (b, t) = labels.dims2()?;
        let shifted: Vec<u32> = rows
            .iter()
            .flat_map(|row| {
                std::iter::once(start).chain(row[..t - 1].iter().map(move |&l| {
                    if l == -100 {
                        pad
                    } else {
                        l as u32
                    }
                }))
            })
            .collect();
        Tensor::from_vec(shifted, (b, t), labels.device())
    }

    /// Mean cross-entropy over label positions that are not `-100`, as
    /// transformers computes it with `labels=`.
    pub fn loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let encoded = self.encode(input_ids, attention_mask, train)?;
        let decoder_input_ids = self.shift_right(labels)?;
        let hidden =
            self.decode_hidden(&decoder_input_ids, &encoded, attention_mask, None, train)?;
        // Only the labelled positions go through lm_head, which a frozen
        // head does without making their logits (`AdaptedLinear::target_nlls`).
        let (b, t, h) = hidden.dims3()?;
        let (rows, targets) = labelled_rows(labels)?;
        let picked = self.lm_input(&hidden.reshape((b * t, h))?.index_select(&rows, 0)?)?;
        self.lm_head
            .target_nlls(&picked, targets, train)?
            .mean_all()
    }

    fn new_cache(&self, encoder_hidden: &Tensor) -> Result<DecoderCache> {
        let cross_kv = self
            .decoder
            .blocks
            .iter()
            .map(|b| {
                b.cross_attention
                    .as_ref()
                    .expect("decoder blocks have cross-attention")
                    .0
                    .key_values(encoder_hidden, false)
            })
            .collect::<Result<_>>()?;
        Ok(DecoderCache {
            self_kv: vec![None; self.decoder.blocks.len()],
            cross_kv,
            position: 0,
        })
    }

    /// Next-token log-probabilities `(B, vocab)` for the given new tokens.
    fn step(
        &self,
        tokens: &[u32],
        encoded: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut DecoderCache,
    ) -> Result<Tensor> {
        let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), encoded.device())?;
        let hidden = self.decode_hidden(&ids, encoded, mask, Some(cache), false)?;
        let logits = self
            .lm_logits(&hidden, false)?
            .squeeze(1)?
            .to_dtype(DType::F32)?;
        candle_nn::ops::log_softmax(&logits, D::Minus1)
    }

    /// Greedy decoding with the key/value cache. Each output row holds the
    /// generated tokens (without the start token), ending at `eos` when it
    /// was produced within `max_new_tokens`.
    pub fn generate_greedy(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        max_new_tokens: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let encoded = self.encode(input_ids, attention_mask, false)?;
        let b = input_ids.dim(0)?;
        let mut cache = self.new_cache(&encoded)?;
        let eos = self.config.eos_token_id as u32;
        let mut last = vec![self.config.decoder_start_token_id(); b];
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut done = vec![false; b];
        for _ in 0..max_new_tokens {
            let logp = self.step(&last, &encoded, attention_mask, &mut cache)?;
            let next: Vec<u32> = logp.argmax(D::Minus1)?.to_vec1()?;
            for i in 0..b {
                last[i] = if done[i] {
                    self.config.pad_token_id as u32
                } else {
                    next[i]
                };
                if !done[i] {
                    out[i].push(next[i]);
                    done[i] = next[i] == eos;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(out)
    }

    /// Greedy decoding that recomputes the whole decoder at every step, with
    /// no cache: the reference the cached path is tested against.
    #[doc(hidden)]
    pub fn generate_greedy_uncached(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        max_new_tokens: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let encoded = self.encode(input_ids, attention_mask, false)?;
        let b = input_ids.dim(0)?;
        let eos = self.config.eos_token_id as u32;
        let mut seqs = vec![vec![self.config.decoder_start_token_id()]; b];
        let mut done = vec![false; b];
        for _ in 0..max_new_tokens {
            let t = seqs[0].len();
            let ids = Tensor::from_vec(seqs.concat(), (b, t), encoded.device())?;
            let hidden = self.decode_hidden(&ids, &encoded, attention_mask, None, false)?;
            let logits = self
                .lm_logits(&hidden.narrow(1, t - 1, 1)?, false)?
                .squeeze(1)?;
            let next: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            for i in 0..b {
                let token = if done[i] {
                    self.config.pad_token_id as u32
                } else {
                    next[i]
                };
                seqs[i].push(token);
                done[i] = done[i] || next[i] == eos;
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(seqs
            .into_iter()
            .map(|s| {
                let mut tokens: Vec<u32> = s[1..].to_vec();
                if let Some(p) = tokens.iter().position(|&x| x == eos) {
                    tokens.truncate(p + 1);
                }
                tokens
            })
            .collect())
    }

    /// Beam search for one input row (`input_ids` of shape `(1, T)`), with
    /// transformers' scoring: a finished hypothesis scores its summed
    /// log-probability divided by its length to the power `length_penalty`,
    /// and the search stops when no running beam can beat the worst of the
    /// `num_beams` finished ones.
    pub fn generate_beam(
        &self,
        input_ids: &Tensor,
        num_beams: usize,
        max_new_tokens: usize,
        length_penalty: f64,
    ) -> Result<Vec<u32>> {
        if input_ids.dim(0)? != 1 || num_beams == 0 {
            candle::bail!("beam search takes one input row and at least one beam");
        }
        let encoded = self.encode(input_ids, None, false)?;
        let encoded = encoded
            .broadcast_as((num_beams, encoded.dim(1)?, encoded.dim(2)?))?
            .contiguous()?;
        let mut cache = self.new_cache(&encoded)?;
        let eos = self.config.eos_token_id as u32;
        let vocab = self.config.vocab_size;
        // (tokens, summed log-prob); only the first beam is live at step 0.
        let mut beams: Vec<(Vec<u32>, f64)> = (0..num_beams)
            .map(|i| (Vec::new(), if i == 0 { 0.0 } else { f64::NEG_INFINITY }))
            .collect();
        let mut finished: Vec<(Vec<u32>, f64)> = Vec::new();
        let mut done = false;
        let norm = |len: usize, score: f64| score / (len as f64).powf(length_penalty);
        for step in 0..max_new_tokens {
            let last: Vec<u32> = beams
                .iter()
                .map(|(t, _)| *t.last().unwrap_or(&self.config.decoder_start_token_id()))
                .collect();
            let logp: Vec<Vec<f32>> = self.step(&last, &encoded, None, &mut cache)?.to_vec2()?;
            let mut candidates: Vec<(f64, usize, u32)> = Vec::with_capacity(num_beams * vocab);
            for (bi, (_, score)) in beams.iter().enumerate() {
                if score.is_finite() {
                    for (tok, &lp) in logp[bi].iter().enumerate() {
                        candidates.push((score + lp as f64, bi, tok as u32));
                    }
                }
            }
            candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
            let best_candidate = candidates.first().map_or(f64::NEG_INFINITY, |c| c.0);
            let mut next = Vec::with_capacity(num_beams);
            for (rank, (score, bi, tok)) in candidates.into_iter().take(2 * num_beams).enumerate() {
                let mut tokens = beams[bi].0.clone();
                tokens.push(tok);
                if tok == eos {
                    // As transformers: an end is only kept from the top num_beams.
                    if rank < num_beams {
                        finished.push((tokens, score));
                    }
                } else {
                    next.push((tokens, score, bi));
                }
                if next.len() == num_beams {
                    break;
                }
            }
            finished.sort_by(|a, b| norm(b.0.len(), b.1).total_cmp(&norm(a.0.len(), a.1)));
            finished.truncate(num_beams);
            while next.len() < num_beams {
                next.push((Vec::new(), f64::NEG_INFINITY, 0));
            }
            let rows = Tensor::from_vec(
                next.iter().map(|n| n.2 as u32).collect::<Vec<_>>(),
                num_beams,
                encoded.device(),
            )?;
            cache.select(&rows)?;
            beams = next.into_iter().map(|(t, s, _)| (t, s)).collect();
            if finished.len() == num_beams {
                // transformers' length counts the start token: step + 1 here.
                let worst = finished
                    .iter()
                    .map(|(t, s)| norm(t.len(), *s))
                    .fold(f64::INFINITY, f64::min);
                if worst >= norm(step + 1, best_candidate) {
                    done = true;
                    break;
                }
            }
        }
        // When the search ran out of steps rather than finishing, the running
        // beams compete too, scored with the start token in their length
        // (finished ones count their end token), as transformers does.
        if done {
            beams.clear();
        }
        let best = finished
            .into_iter()
            .map(|(t, s)| (norm(t.len(), s), t))
            .chain(
                beams
                    .into_iter()
                    .filter(|(_, s)| s.is_finite())
                    .map(|(t, s)| (norm(t.len() + 1, s), t)),
            )
            .max_by(|a, b| a.0.total_cmp(&b.0));
        Ok(best.map(|(_, t)| t).unwrap_or_default())
    }
}
