//! Layer and RMS norms whose parameters load through the adapter-aware
//! [`VarBuilder`] and whose forward passes have a backward.

use candle::{Module, Result, Tensor};

use super::ops;
use super::VarBuilder;

/// A layer norm: `candle_nn::LayerNorm` with a backward on every path.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        ops::layer_norm(xs, &self.weight, &self.bias, self.eps as f32)
    }
}

/// `candle_nn::layer_norm`: `weight` and `bias` under `vb`, trainable under
/// full fine-tuning.
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(size, "weight")?,
        vb.get(size, "bias")?,
        eps,
    ))
}

/// An RMS norm (T5's, Llama's): `candle_nn::RmsNorm` with a backward.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// `weight` under `vb`: the constructor candle-transformers' models
    /// call (`with_tracing::RmsNorm::new`).
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self::from_weight(vb.get(size, "weight")?, eps))
    }

    pub fn from_weight(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        ops::rms_norm(xs, &self.weight, self.eps as f32)
    }
}

/// `candle_nn::rms_norm`: `weight` under `vb`, trainable under full
/// fine-tuning.
pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    RmsNorm::new(size, eps, vb)
}
