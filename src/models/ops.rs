//! Differentiable building blocks.
//!
//! Candle 0.11's fused `candle_nn::ops::layer_norm`, `rms_norm` and
//! `softmax_last_dim` record no backward op, so gradients through them are
//! silently dropped. On the CPU in f32 these use the crate's fused kernels,
//! which have a backward (`fused.rs`); elsewhere they are built from basic
//! ops that all have one.

use candle::{DType, Result, Tensor, D};

use super::fused::{GeluErf, LayerNormOp, Softmax};

fn fusable(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension,
/// computed in f32 for half-precision inputs.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(xs) && weight.dtype() == DType::F32 && bias.dtype() == DType::F32 {
        return xs.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LayerNormOp { eps: eps as f32 },
        );
    }
    composed_layer_norm(xs, weight, bias, eps)
}

/// [`layer_norm`] from basic ops (any device and dtype).
pub(crate) fn composed_layer_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let x = upcast(xs)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if fusable(xs) {
        return xs.contiguous()?.apply_op1(Softmax);
    }
    composed_softmax_last_dim(xs)
}

/// [`softmax_last_dim`] from basic ops. The row maximum is subtracted for
/// stability and detached: softmax does not depend on it, so it needs no
/// gradient.
pub(crate) fn composed_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    num.broadcast_div(&num.sum_keepdim(D::Minus1)?)
}

fn upcast(xs: &Tensor) -> Result<Tensor> {
    match xs.dtype() {
        DType::F16 | DType::BF16 => xs.to_dtype(DType::F32),
        _ => Ok(xs.clone()),
    }
}

/// A layer norm's parameters.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` under `vb`, trainable when `factory`
    /// fine-tunes everything.
    pub fn load(
        vb: candle_nn::VarBuilder,
        size: usize,
        eps: f64,
        factory: &mut crate::adapter::LinearFactory,
    ) -> Result<Self> {
        Ok(Self {
            weight: factory.tensor(&vb, size, "weight")?,
            bias: factory.tensor(&vb, size, "bias")?,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

/// The activations Hugging Face configs name in `hidden_act`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU.
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Relu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            other => candle::bail!(
                "unsupported activation {other:?} (gelu, gelu_new, gelu_pytorch_tanh, relu)"
            ),
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluErf if fusable(xs) => xs.contiguous()?.apply_op1(GeluErf),
            Self::GeluErf => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    #[test]
    fn layer_norm_matches_candle_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 16), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, 16, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, 16, &dev)?)?;
        let ours = layer_norm(&x, &w, &b, 1e-12)?;
        let fused = candle_nn::ops::layer_norm(&x, &w, &b, 1e-12)?;
        let diff = (ours.clone() - fused)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 16), &dev)?;
        let grads = (ours * probe)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let g = grads.get(v).expect("gradient recorded");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn softmax_matches_candle_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (4, 7), &dev)?)?;
        let ours = softmax_last_dim(&x)?;
        let fused = candle_nn::ops::softmax_last_dim(&x)?;
        let diff = (ours.clone() - fused)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        let probe = Tensor::randn(0f32, 1.0, (4, 7), &dev)?;
        let grads = (ours * probe)?.sum_all()?.backward()?;
        assert!(
            grads
                .get(&x)
                .unwrap()
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?
                > 0.0
        );
        Ok(())
    }
}
