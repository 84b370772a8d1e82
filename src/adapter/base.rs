//! The frozen layer every adapter is built on: a dense weight, or a
//! quantized one (a GGUF base, QLoRA-style) that stays in its block format
//! in memory and is multiplied by Candle's quantized matmul.

use std::sync::{Arc, OnceLock};

use candle::quantized::QTensor;
use candle::{DType, Device, Result, Tensor};
use candle_nn::Linear;

use super::matmul::linear_fwd;
use crate::kernels::linear_cross_entropy::linear_target_nlls;
use crate::kernels::low_rank::{low_rank_linear, low_rank_output, FrozenWeight};
use crate::kernels::quantized_matmul::{dequantize_all, quantized_matmul};

/// A frozen `(d_out, d_in)` weight.
#[derive(Clone, Debug)]
pub enum BaseWeight {
    Dense(Tensor),
    /// Kept quantized; the forward pass runs Candle's quantized matmul and
    /// the backward reaches the input through the weight dequantized a band
    /// of rows at a time (the weight itself gets no gradient).
    Quantized(Arc<QTensor>),
}

impl BaseWeight {
    /// `(d_out, d_in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Quantized(q) => q.shape().dims2(),
        }
    }

    /// The dtype the layer computes in: the weight's, or f32 for a
    /// quantized weight (its activations and adapters are f32).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(w) => w.dtype(),
            Self::Quantized(_) => DType::F32,
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Self::Dense(w) => w.device().clone(),
            Self::Quantized(q) => q.device(),
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quantized(_))
    }

    /// The weight as a dense tensor: itself, or dequantized to f32 (a new
    /// copy of this one layer, for merging, export or an SVD).
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(w.clone()),
            Self::Quantized(q) => q.dequantize(&q.device()),
        }
    }

    /// `x·Wᵀ` over the last dimension of `xs`.
    pub fn matmul_t(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => linear_fwd(xs, w, None),
            Self::Quantized(q) => quantized_matmul(xs, q),
        }
    }
}

/// A frozen linear layer `y = x·Wᵀ + b` over a [`BaseWeight`].
#[derive(Clone, Debug)]
pub struct BaseLinear {
    weight: BaseWeight,
    bias: Option<Tensor>,
    /// A quantized weight as f32, dequantized by the first
    /// [`Self::target_nlls`] call and kept (shared by clones): that op
    /// reads all of the weight twice per call, so on SmolLM2's `lm_head`
    /// (49,152 x 576) a fresh copy per training step cost its
    /// dequantization and the kernel's zeroing of 113 MB of new pages, for
    /// the same peak memory, since the copy was alive at the step's peak.
    /// QLoRA, too, keeps the output layer unquantized.
    dense_head: Arc<OnceLock<Tensor>>,
}

impl BaseLinear {
    pub fn new(weight: BaseWeight, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            dense_head: Arc::default(),
        }
    }

    pub fn weight(&self) -> &BaseWeight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(d_out, d_in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        self.weight.dims2()
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match (&self.weight, &self.bias) {
            (BaseWeight::Dense(w), bias) => linear_fwd(xs, w, bias.as_ref()),
            (BaseWeight::Quantized(_), None) => self.weight.matmul_t(xs),
            (BaseWeight::Quantized(_), Some(b)) => self.weight.matmul_t(xs)?.broadcast_add(b),
        }
    }

    /// `forward(x) + h·b_effᵀ`: the adapted layer's output from the update's
    /// hidden `h` (`.., r`) and its last factor `b_eff` (`d_out x r`). A
    /// frozen base on the CPU in f32 (dense, or quantized without a bias)
    /// adds the update inside its own gemm (see `kernels::low_rank`), which
    /// saves the sum and its backward's copies.
    pub fn forward_with_update(&self, xs: &Tensor, h: &Tensor, b_eff: &Tensor) -> Result<Tensor> {
        let fused = match self.frozen() {
            Some(frozen) => low_rank_output(xs, frozen, h, b_eff)?,
            None => None,
        };
        match fused {
            Some(y) => Ok(y),
            None => self.forward(xs)? + linear_fwd(h, b_eff, None)?,
        }
    }

    /// `forward(x) + (x·a_effᵀ)·b_effᵀ`: the adapted layer's output when
    /// the update reads `x` itself (no dropout), from its factors `a_eff`
    /// (`r x d_in`) and `b_eff` (`d_out x r`). On the CPU in f32 the whole
    /// update is inside the base's op, which also saves the backward's
    /// copies of `x`'s gradient that a separate `x·a_effᵀ` node makes.
    pub fn forward_with_factors(
        &self,
        xs: &Tensor,
        a_eff: &Tensor,
        b_eff: &Tensor,
    ) -> Result<Tensor> {
        if let Some(frozen) = self.frozen() {
            if let Some(y) = low_rank_linear(xs, frozen, a_eff, b_eff)? {
                return Ok(y);
            }
        }
        self.forward_with_update(xs, &linear_fwd(xs, a_eff, None)?, b_eff)
    }

    /// The weight and bias as the fused kernels take them; `None` for a
    /// quantized weight with a bias, which they do not handle.
    pub(crate) fn frozen(&self) -> Option<FrozenWeight<'_>> {
        match (&self.weight, &self.bias) {
            (BaseWeight::Quantized(q), None) => Some(FrozenWeight::Quantized(q)),
            (BaseWeight::Quantized(_), Some(_)) => None,
            (BaseWeight::Dense(w), bias) => Some(FrozenWeight::Dense(w, bias.as_ref())),
        }
    }

    /// The negative log-likelihood `(rows)` of each row's target class
    /// through this layer, for `xs (rows, d_in)`: what
    /// `nn::ops::target_nlls(&self.forward(xs)?, targets)` computes. On the
    /// CPU in f32 it never holds the `(rows, d_out)` logits (see
    /// `kernels::linear_cross_entropy`); `with_grad` (training) computes
    /// the input gradient in the same pass.
    pub fn target_nlls(&self, xs: &Tensor, targets: Vec<u32>, with_grad: bool) -> Result<Tensor> {
        let frozen = match (&self.weight, &self.bias) {
            (BaseWeight::Quantized(q), None) if q.device().is_cpu() => {
                Some(FrozenWeight::Dense(self.dense_head(q)?, None))
            }
            _ => self.frozen(),
        };
        if let Some(frozen) = frozen {
            if let Some(nlls) = linear_target_nlls(xs, frozen, targets.clone(), with_grad)? {
                return Ok(nlls);
            }
        }
        crate::nn::ops::target_nlls(&self.forward(xs)?, targets)
    }

    /// The kept f32 copy of the quantized weight `q` (see `dense_head`).
    fn dense_head(&self, q: &QTensor) -> Result<&Tensor> {
        if let Some(w) = self.dense_head.get() {
            return Ok(w);
        }
        let w = Tensor::from_vec(dequantize_all(q)?, q.shape().dims2()?, &q.device())?;
        Ok(self.dense_head.get_or_init(|| w))
    }

    /// A plain candle-nn layer with the weight dense (dequantized if it
    /// was quantized).
    pub fn to_linear(&self) -> Result<Linear> {
        Ok(Linear::new(self.weight.to_dense()?, self.bias.clone()))
    }
}

impl From<Linear> for BaseLinear {
    fn from(layer: Linear) -> Self {
        Self::new(
            BaseWeight::Dense(layer.weight().clone()),
            layer.bias().cloned(),
        )
    }
}

impl From<&Linear> for BaseLinear {
    fn from(layer: &Linear) -> Self {
        Self::new(
            BaseWeight::Dense(layer.weight().clone()),
            layer.bias().cloned(),
        )
    }
}

impl From<&BaseLinear> for BaseLinear {
    fn from(layer: &BaseLinear) -> Self {
        layer.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::quantized::GgmlDType;
    use candle::Var;

    /// A quantized layer's `target_nlls` keeps one f32 copy of its weight
    /// across calls (clones share it) and matches the nlls and input
    /// gradient of its composed forward pass.
    #[test]
    fn quantized_target_nlls_keep_one_dense_copy() -> Result<()> {
        let dev = Device::Cpu;
        let (v, k, rows) = (96, 64, 70);
        let w = Tensor::randn(0f32, 0.3, (v, k), &dev)?;
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?);
        let layer = BaseLinear::new(BaseWeight::Quantized(q), None);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, k), &dev)?)?;
        let targets: Vec<u32> = (0..rows as u32).map(|i| i * 7 % v as u32).collect();
        let fused = layer.target_nlls(&x, targets.clone(), true)?;
        assert!(
            layer.dense_head.get().is_some(),
            "the first call keeps the copy"
        );
        let clone = layer.clone();
        assert!(Arc::ptr_eq(&layer.dense_head, &clone.dense_head));
        let again = clone.target_nlls(&x, targets.clone(), true)?;
        let composed = crate::nn::ops::target_nlls(&layer.forward(&x)?, targets)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(max_diff(&fused, &composed)? < 1e-4);
        assert_eq!(max_diff(&fused, &again)?, 0.0);
        let gf = fused.sum_all()?.backward()?;
        let gc = composed.sum_all()?.backward()?;
        let (f, c) = (gf.get(&x).unwrap(), gc.get(&x).unwrap());
        assert!(max_diff(f, c)? < 1e-4);
        assert!(c.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }
}
