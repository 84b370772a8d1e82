//! The activations Hugging Face configs name in `hidden_act`.

use candle::{Result, Tensor};

use super::ops;

/// The activations Hugging Face configs name in `hidden_act`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU.
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Relu,
    /// `silu` (`swish`): Llama's gated MLP.
    Silu,
}

impl Activation {
    /// The activation a Hugging Face `hidden_act` names.
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => candle::bail!(
                "unsupported activation {other:?} (gelu, gelu_new, gelu_pytorch_tanh, relu, silu)"
            ),
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluErf => ops::gelu_erf(xs),
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
        }
    }
}
