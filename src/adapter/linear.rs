//! One type for every way a linear layer can be fine-tuned.

use candle::{Module, Result, Tensor, Var};
use candle_nn::Linear;

use super::base::BaseLinear;
use super::config::Method;
use super::lora::LoraLinear;
use super::lora_mini::LoraMiniLinear;
use super::low_rank::{LowRankLayer, LowRankUpdate};
use super::matmul::{linear_fwd, merged_weight};
use crate::kernels::low_rank_block::BlockLayer;

/// Full fine-tuning of one layer: the weight and bias are trainable `Var`s.
#[derive(Clone, Debug)]
pub struct FullLinear {
    weight: Var,
    bias: Option<Var>,
}

impl FullLinear {
    /// Copies `base`'s tensors into fresh trainable `Var`s (a quantized
    /// weight is dequantized: full fine-tuning trains every value).
    pub fn new(base: impl Into<BaseLinear>) -> Result<Self> {
        let base: BaseLinear = base.into();
        Ok(Self {
            weight: Var::from_tensor(&base.weight().to_dense()?)?,
            bias: base.bias().map(Var::from_tensor).transpose()?,
        })
    }

    pub fn weight(&self) -> &Var {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }

    pub(crate) fn vars(&self) -> Vec<(&'static str, &Var)> {
        let mut vars = vec![("weight", &self.weight)];
        if let Some(b) = &self.bias {
            vars.push(("bias", b));
        }
        vars
    }
}

impl Module for FullLinear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        linear_fwd(
            xs,
            self.weight.as_tensor(),
            self.bias.as_ref().map(|b| b.as_tensor()),
        )
    }
}

/// A linear layer under any fine-tuning method. Models hold this type for
/// every linear they have, and a factory picks the variant per module path.
///
/// ```
/// use candle::{Device, Tensor};
/// use candle_nn::Linear;
/// use lora_mini::adapter::{AdaptedLinear, LoraMiniConfig, Method};
///
/// let base = Linear::new(Tensor::randn(0f32, 0.02, (96, 64), &Device::Cpu)?, None);
/// let method = Method::LoraMini(LoraMiniConfig::new(8, 16, 16));
/// let layer = AdaptedLinear::new(&base, &method, "encoder.layer.0.attention.self.query")?;
/// assert_eq!(layer.num_trainable(), 8 * (16 + 16));
/// let ys = layer.forward_t(&Tensor::ones((3, 64), candle::DType::F32, &Device::Cpu)?, true)?;
/// assert_eq!(ys.dims(), &[3, 96]);
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Debug)]
pub enum AdaptedLinear {
    Frozen(BaseLinear),
    Full(FullLinear),
    Lora(LoraLinear),
    LoraMini(LoraMiniLinear),
}

// Each layer type converts into the enum, so that a hand-built layer goes
// into an `AdapterRegistry` without naming the variant.
impl From<LoraMiniLinear> for AdaptedLinear {
    fn from(layer: LoraMiniLinear) -> Self {
        Self::LoraMini(layer)
    }
}

impl From<LoraLinear> for AdaptedLinear {
    fn from(layer: LoraLinear) -> Self {
        Self::Lora(layer)
    }
}

impl From<FullLinear> for AdaptedLinear {
    fn from(layer: FullLinear) -> Self {
        Self::Full(layer)
    }
}

impl From<Linear> for AdaptedLinear {
    fn from(layer: Linear) -> Self {
        Self::Frozen(layer.into())
    }
}

impl From<BaseLinear> for AdaptedLinear {
    fn from(layer: BaseLinear) -> Self {
        Self::Frozen(layer)
    }
}

impl AdaptedLinear {
    /// A frozen layer from its weight and bias (candle-transformers'
    /// `Linear::from_weights`, used for heads tied to an embedding).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::Frozen(Linear::new(weight, bias).into())
    }

    /// Applies `method` to `base` (a `candle_nn::Linear` or a
    /// [`BaseLinear`], possibly quantized); `path` is the module's full
    /// Hugging Face path.
    pub fn new(base: impl Into<BaseLinear>, method: &Method, path: &str) -> Result<Self> {
        let base: BaseLinear = base.into();
        if let super::BaseWeight::Dense(w) = base.weight() {
            let dtype = w.dtype();
            if !dtype.is_float() {
                candle::bail!("module {path}: cannot fine-tune a weight of dtype {dtype:?}");
            }
            if w.rank() != 2 {
                candle::bail!(
                    "module {path}: weight must be 2-D, got shape {:?}",
                    w.dims()
                );
            }
        }
        Ok(match method {
            Method::Frozen => Self::Frozen(base),
            Method::Full => Self::Full(FullLinear::new(&base)?),
            Method::Lora(c) => Self::Lora(LoraLinear::new(&base, c, path)?),
            Method::LoraMini(c) => Self::LoraMini(LoraMiniLinear::new(&base, c, path)?),
        })
    }

    /// The method's short name (`frozen`, `full`, `lora`, `lora-mini`).
    pub fn method_name(&self) -> &'static str {
        match self {
            Self::Frozen(_) => "frozen",
            Self::Full(_) => "full",
            Self::Lora(_) => "lora",
            Self::LoraMini(_) => "lora-mini",
        }
    }

    /// `(d_out, d_in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Frozen(l) => l.dims2(),
            Self::Full(f) => f.weight.dims2(),
            Self::Lora(_) | Self::LoraMini(_) => {
                self.as_low_rank().expect("low rank").base().dims2()
            }
        }
    }

    /// The low-rank layer behind a LoRA or LoRA-Mini variant: every
    /// low-rank method is handled once, through [`LowRankLayer`].
    pub fn as_low_rank(&self) -> Option<&dyn LowRankLayer> {
        match self {
            Self::Lora(l) => Some(l),
            Self::LoraMini(l) => Some(l),
            Self::Frozen(_) | Self::Full(_) => None,
        }
    }

    fn as_low_rank_mut(&mut self) -> Option<&mut dyn LowRankLayer> {
        match self {
            Self::Lora(l) => Some(l),
            Self::LoraMini(l) => Some(l),
            Self::Frozen(_) | Self::Full(_) => None,
        }
    }

    /// The current base weight `W` (the trained one for full fine-tuning,
    /// never merged), dense: a quantized base is dequantized (a copy of
    /// this layer's weight).
    pub fn weight(&self) -> Result<Tensor> {
        match self {
            Self::Frozen(l) => l.weight().to_dense(),
            Self::Full(f) => Ok(f.weight.as_tensor().clone()),
            Self::Lora(_) | Self::LoraMini(_) => self.as_low_rank().expect("low rank").weight(),
        }
    }

    /// Whether the frozen base weight is held quantized.
    pub fn is_quantized(&self) -> bool {
        match self {
            Self::Frozen(l) => l.weight().is_quantized(),
            Self::Full(_) => false,
            Self::Lora(_) | Self::LoraMini(_) => self
                .as_low_rank()
                .expect("low rank")
                .base()
                .weight()
                .is_quantized(),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Frozen(l) => l.bias(),
            Self::Full(f) => f.bias.as_ref().map(|b| b.as_tensor()),
            Self::Lora(_) | Self::LoraMini(_) => self.as_low_rank().expect("low rank").bias(),
        }
    }

    /// The trainable tensors and their role names, in a fixed order. Adapter
    /// files name each tensor `<module path>.<role>`.
    pub fn trainable(&self) -> Vec<(&'static str, &Var)> {
        match self {
            Self::Frozen(_) => Vec::new(),
            Self::Full(f) => f.vars(),
            Self::Lora(_) | Self::LoraMini(_) => {
                self.as_low_rank().expect("low rank").trainable_vars()
            }
        }
    }

    pub fn num_trainable(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The frozen tensors the adapter adds (LoRA-Mini's `A_aux` and `B_aux`).
    pub fn frozen_aux(&self) -> Vec<(&'static str, &Tensor)> {
        self.as_low_rank().map_or(Vec::new(), |l| l.frozen_aux())
    }

    /// The low-rank update of the LoRA methods, as an exact LoRA pair.
    pub fn low_rank(&self) -> Result<Option<LowRankUpdate>> {
        self.as_low_rank().map(|l| l.update()).transpose()
    }

    /// The weight this layer computes with once its update is folded in:
    /// `W + ΔW` for the low-rank methods, `W` otherwise.
    pub fn merged_weight(&self) -> Result<Tensor> {
        match self.low_rank()? {
            Some(update) => merged_weight(&self.weight()?, &update.delta_weight()?),
            None => self.weight(),
        }
    }

    /// Folds the update into the weight (no-op for frozen and full layers).
    pub fn merge(&mut self) -> Result<()> {
        self.as_low_rank_mut().map_or(Ok(()), |l| l.merge())
    }

    /// Restores the unmerged weight exactly.
    pub fn unmerge(&mut self) {
        if let Some(l) = self.as_low_rank_mut() {
            l.unmerge()
        }
    }

    /// A plain `candle_nn::Linear` with the update folded in, for export or
    /// inference without this crate's types.
    pub fn to_merged_linear(&self) -> Result<Linear> {
        Ok(Linear::new(self.merged_weight()?, self.bias().cloned()))
    }

    /// The base layer without any adapter (dequantized if quantized).
    pub fn base_linear(&self) -> Result<Linear> {
        match self {
            Self::Frozen(l) => l.to_linear(),
            Self::Full(f) => Ok(Linear::new(
                f.weight.as_tensor().clone(),
                self.bias().cloned(),
            )),
            Self::Lora(_) | Self::LoraMini(_) => self.as_low_rank().expect("low rank").as_plain(),
        }
    }

    /// The layer's dropout-mask counter, for checkpoints.
    pub fn dropout_calls(&self) -> Option<u64> {
        self.as_low_rank()?.dropout().map(|d| d.calls())
    }

    pub fn set_dropout_calls(&self, calls: u64) {
        if let Some(d) = self.as_low_rank().and_then(|l| l.dropout()) {
            d.set_calls(calls)
        }
    }
}

impl AdaptedLinear {
    /// The forward pass in an explicit mode (`train = true`: dropout on the
    /// adapter input and the factored update). Models written for this crate
    /// thread `train` through; [`Module::forward`] reads the layer's mode.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Frozen(l) => l.forward(xs),
            Self::Full(f) => f.forward(xs),
            Self::Lora(l) => l.forward_t(xs, train),
            Self::LoraMini(l) => l.forward_t(xs, train),
        }
    }

    /// The frozen base and the update's factors, for a fused block of
    /// layers (`kernels::gated_mlp`, `kernels::qkv`), when this is a
    /// low-rank layer whose output in this mode is `base(x) +
    /// (x·A_effᵀ)·B_effᵀ` (not merged, no dropout in the way) on a base
    /// the fused kernels take; `None` otherwise.
    pub(crate) fn block_layer(&self, train: bool) -> Result<Option<BlockLayer<'_>>> {
        let Some(low_rank) = self.as_low_rank() else {
            return Ok(None);
        };
        let host = low_rank.host();
        let Some(frozen) = host.base.frozen() else {
            return Ok(None);
        };
        let factors = host.plain_factors(train, || low_rank.effective_factors())?;
        Ok(factors.map(|(a, b)| BlockLayer { frozen, a, b }))
    }

    /// The negative log-likelihood `(rows)` of each row's target class
    /// through this layer, for `xs (rows, d_in)`, as
    /// `nn::ops::target_nlls(&self.forward_t(xs, train)?, targets)`. A
    /// frozen layer (a decoder's `lm_head` unless it is adapted) computes
    /// it without the `(rows, d_out)` logits ([`BaseLinear::target_nlls`]).
    pub fn target_nlls(&self, xs: &Tensor, targets: Vec<u32>, train: bool) -> Result<Tensor> {
        match self {
            Self::Frozen(l) => l.target_nlls(xs, targets, train),
            _ => crate::nn::ops::target_nlls(&self.forward_t(xs, train)?, targets),
        }
    }

    /// Whether [`Module::forward`] trains: `true` until switched off, as a
    /// PyTorch module starts in `train()` mode. Frozen and fully trained
    /// layers compute the same either way.
    pub fn is_training(&self) -> bool {
        self.as_low_rank().is_none_or(|l| l.is_training())
    }

    /// Sets the mode [`Module::forward`] uses; clones share it.
    pub fn set_training(&self, training: bool) {
        if let Some(l) = self.as_low_rank() {
            l.set_training(training)
        }
    }
}

/// The training forward pass by default: a model forked from
/// candle-transformers keeps its `self.q_proj.forward(&xs)` calls and trains
/// the adapter with dropout, through the factored update. For inference,
/// call [`AdapterRegistry::set_training`](super::AdapterRegistry::set_training)
/// with `false` (PyTorch's `model.eval()`), or `forward_t(xs, false)`.
///
/// Candle's blanket `ModuleT` impl then calls this `forward` and ignores its
/// `train` argument; the inherent [`AdaptedLinear::forward_t`] honours it.
impl Module for AdaptedLinear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, self.is_training())
    }
}
