//! BERT (Hugging Face `BertModel` / `BertForSequenceClassification` layout)
//! with every linear layer built through the adapter factory.

use candle::{DType, Module, Result, Tensor, D};
use serde::Deserialize;

use crate::adapter::AdaptedLinear;
use crate::dropout::SeededDropout;
use crate::kernels::attention::{attention, ProbsDropout};
use crate::nn::{embedding, layer_norm, linear, Activation, Embedding, LayerNorm, VarBuilder};

fn default_act() -> Activation {
    Activation::GeluErf
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_init_range() -> f64 {
    0.02
}

/// The fields of a Hugging Face BERT `config.json` this crate reads; others
/// are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub model_type: Option<String>,
}

impl BertConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text)
            .map_err(|e| candle::Error::msg(format!("BERT config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            candle::bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if let Some(kind) = self
            .position_embedding_type
            .as_deref()
            .filter(|k| *k != "absolute")
        {
            candle::bail!("position_embedding_type {kind:?} is not supported (only \"absolute\")");
        }
        Ok(())
    }
}

/// How position ids are numbered: BERT counts from 0; RoBERTa counts
/// non-padding tokens from `padding_idx + 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    FromZero,
    AfterPadding { padding_idx: u32 },
}

/// Word, position and token-type embeddings, summed and normalised.
#[derive(Clone, Debug)]
pub struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    dropout: SeededDropout,
    positions: Positions,
}

impl Embeddings {
    pub fn new(vb: VarBuilder, config: &BertConfig, positions: Positions) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            word: embedding(config.vocab_size, h, vb.pp("word_embeddings"))?,
            position: embedding(
                config.max_position_embeddings,
                h,
                vb.pp("position_embeddings"),
            )?,
            token_type: embedding(config.type_vocab_size, h, vb.pp("token_type_embeddings"))?,
            norm: layer_norm(h, config.layer_norm_eps, vb.pp("LayerNorm"))?,
            dropout: vb.dropout(config.hidden_dropout_prob)?,
            positions,
        })
    }

    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let position_ids = match self.positions {
            Positions::FromZero => Tensor::arange(0u32, t as u32, input_ids.device())?
                .broadcast_as((b, t))?
                .contiguous()?,
            Positions::AfterPadding { padding_idx } => {
                // transformers: cumsum(mask) * mask + padding_idx, mask = ids != pad.
                let mask = input_ids.ne(padding_idx)?.to_dtype(DType::U32)?;
                let ids: Vec<Vec<u32>> = mask.to_vec2()?;
                let numbered: Vec<u32> = ids
                    .iter()
                    .flat_map(|row| {
                        let mut count = 0;
                        row.iter()
                            .map(move |&m| {
                                count += m;
                                count * m + padding_idx
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect();
                Tensor::from_vec(numbered, (b, t), input_ids.device())?
            }
        };
        let token_types = match token_type_ids {
            Some(ids) => ids.clone(),
            None => input_ids.zeros_like()?,
        };
        let xs = ((self.word.forward(input_ids)? + self.position.forward(&position_ids)?)?
            + self.token_type.forward(&token_types)?)?;
        self.dropout.forward_t(&self.norm.forward(&xs)?, train)
    }
}

#[derive(Clone, Debug)]
struct SelfAttention {
    query: AdaptedLinear,
    key: AdaptedLinear,
    value: AdaptedLinear,
    output: AdaptedLinear,
    norm: LayerNorm,
    probs_dropout: SeededDropout,
    output_dropout: SeededDropout,
    heads: usize,
}

impl SelfAttention {
    fn forward_t(&self, xs: &Tensor, mask: &Tensor, train: bool) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let q = self.query.forward_t(xs, train)?;
        let k = self.key.forward_t(xs, train)?;
        let v = self.value.forward_t(xs, train)?;
        let dropout = ProbsDropout::draw(&self.probs_dropout, train, b, self.heads, t);
        let context = attention(&q, &k, &v, mask, self.heads, dropout)?;
        let out = self
            .output_dropout
            .forward_t(&self.output.forward_t(&context, train)?, train)?;
        self.norm.forward(&(out + xs)?)
    }
}

#[derive(Clone, Debug)]
struct Layer {
    attention: SelfAttention,
    intermediate: AdaptedLinear,
    output: AdaptedLinear,
    norm: LayerNorm,
    dropout: SeededDropout,
    act: Activation,
}

impl Layer {
    fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        let ff = config.intermediate_size;
        let eps = config.layer_norm_eps;
        let p = config.hidden_dropout_prob;
        let attention = SelfAttention {
            query: linear(h, h, vb.pp("attention.self.query"))?,
            key: linear(h, h, vb.pp("attention.self.key"))?,
            value: linear(h, h, vb.pp("attention.self.value"))?,
            output: linear(h, h, vb.pp("attention.output.dense"))?,
            norm: layer_norm(h, eps, vb.pp("attention.output.LayerNorm"))?,
            probs_dropout: vb
                .pp("attention.self")
                .dropout(config.attention_probs_dropout_prob)?,
            output_dropout: vb.pp("attention.output").dropout(p)?,
            heads: config.num_attention_heads,
        };
        Ok(Self {
            attention,
            intermediate: linear(h, ff, vb.pp("intermediate.dense"))?,
            output: linear(ff, h, vb.pp("output.dense"))?,
            norm: layer_norm(h, eps, vb.pp("output.LayerNorm"))?,
            dropout: vb.pp("output").dropout(p)?,
            act: config.hidden_act,
        })
    }

    fn forward_t(&self, xs: &Tensor, mask: &Tensor, train: bool) -> Result<Tensor> {
        let attended = self.attention.forward_t(xs, mask, train)?;
        let hidden = self
            .act
            .forward(&self.intermediate.forward_t(&attended, train)?)?;
        let out = self
            .dropout
            .forward_t(&self.output.forward_t(&hidden, train)?, train)?;
        self.norm.forward(&(out + attended)?)
    }
}

/// `(B, T)` 0/1 mask to the additive `(B, 1, 1, T)` form: 0 where attended,
/// the dtype's lowest value where masked (as transformers does).
pub fn additive_mask(attention_mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, t) = attention_mask.dims2()?;
    let keep = attention_mask.to_dtype(DType::F32)?;
    let masked = ((keep - 1.0)? * -(f32::MIN as f64))?;
    masked.reshape((b, 1, 1, t))?.to_dtype(dtype)
}

/// The BERT encoder stack with embeddings and (optionally) the pooler.
#[derive(Clone, Debug)]
pub struct BertModel {
    pub embeddings: Embeddings,
    layers: Vec<Layer>,
    pooler: Option<AdaptedLinear>,
}

impl BertModel {
    /// `BertModel` under `vb` (at the `bert` level), with its pooler and
    /// position ids from 0.
    pub fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        Self::with_options(vb, config, true, Positions::FromZero)
    }

    /// The encoder with or without a pooler, and with BERT's or RoBERTa's
    /// position ids.
    pub fn with_options(
        vb: VarBuilder,
        config: &BertConfig,
        with_pooler: bool,
        positions: Positions,
    ) -> Result<Self> {
        config.validate()?;
        let embeddings = Embeddings::new(vb.pp("embeddings"), config, positions)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::new(vb.pp(format!("encoder.layer.{i}")), config))
            .collect::<Result<_>>()?;
        let h = config.hidden_size;
        let pooler = if with_pooler {
            Some(linear(h, h, vb.pp("pooler.dense"))?)
        } else {
            None
        };
        Ok(Self {
            embeddings,
            layers,
            pooler,
        })
    }

    /// The last hidden state `(B, T, hidden)`.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let mut xs = self
            .embeddings
            .forward_t(input_ids, token_type_ids, train)?;
        let mask = match attention_mask {
            Some(m) => additive_mask(m, xs.dtype())?,
            None => Tensor::zeros(
                (input_ids.dim(0)?, 1, 1, input_ids.dim(1)?),
                xs.dtype(),
                xs.device(),
            )?,
        };
        for layer in &self.layers {
            xs = layer.forward_t(&xs, &mask, train)?;
        }
        Ok(xs)
    }

    /// `tanh(pooler.dense(hidden[:, 0]))`.
    pub fn pool(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        let Some(pooler) = &self.pooler else {
            candle::bail!("this BERT was built without its pooler");
        };
        pooler
            .forward_t(&hidden.narrow(1, 0, 1)?.squeeze(1)?, train)?
            .tanh()
    }
}

/// Mean of the hidden states over attended tokens (sentence-transformers'
/// pooling), `(B, hidden)`.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask
        .to_dtype(hidden.dtype())?
        .unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    summed.broadcast_div(&mask.sum(1)?)
}

/// `BertForSequenceClassification`: pooler, dropout, then `classifier`.
/// `num_labels = 1` is regression (MSE), otherwise classification
/// (cross-entropy).
#[derive(Clone, Debug)]
pub struct BertForSequenceClassification {
    pub bert: BertModel,
    dropout: SeededDropout,
    classifier: AdaptedLinear,
    num_labels: usize,
}

impl BertForSequenceClassification {
    /// `vb` is the checkpoint root (holding `bert.*` and `classifier.*`).
    pub fn new(vb: VarBuilder, config: &BertConfig, num_labels: usize) -> Result<Self> {
        let bert = BertModel::new(vb.pp("bert"), config)?;
        let p = config
            .classifier_dropout
            .unwrap_or(config.hidden_dropout_prob);
        let classifier = vb.pp("classifier");
        Ok(Self {
            bert,
            dropout: classifier.dropout(p)?,
            classifier: linear(config.hidden_size, num_labels, classifier)?,
            num_labels,
        })
    }

    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Logits `(B, num_labels)`.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let hidden = self
            .bert
            .forward_t(input_ids, token_type_ids, attention_mask, train)?;
        let pooled = self
            .dropout
            .forward_t(&self.bert.pool(&hidden, train)?, train)?;
        self.classifier.forward_t(&pooled, train)
    }
}

/// The loss transformers uses for sequence classification: MSE against float
/// targets `(B,)` when `num_labels == 1`, else cross-entropy against `u32`
/// class ids `(B,)`.
pub fn sequence_classification_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    if logits.dim(1)? == 1 {
        candle_nn::loss::mse(&logits.squeeze(1)?, &labels.to_dtype(logits.dtype())?)
    } else {
        let log_probs = logits.broadcast_sub(&logsumexp(logits)?)?;
        let picked = log_probs.gather(&labels.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
        picked.mean_all()?.neg()
    }
}

fn logsumexp(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    xs.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&max)
}
