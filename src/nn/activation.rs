//! The activations Hugging Face configs name in `hidden_act`.

use candle::{Result, Tensor};
use serde::Deserialize;

use super::ops;

/// The activations Hugging Face configs name in `hidden_act`.
///
/// Deserialises from those names (`"gelu"`, `"gelu_new"`...); an unknown
/// one is an error listing the valid names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU.
    #[serde(rename = "gelu")]
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
    /// `silu` (`swish`): Llama's gated MLP.
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

impl Activation {
    /// The activation a Hugging Face `hidden_act` names.
    pub fn from_hf(name: &str) -> Result<Self> {
        Self::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name))
            .map_err(|_| {
                candle::Error::msg(format!(
                    "unsupported activation {name:?} (gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, swish)"
                ))
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

    /// `act(gate) · up`, a gated MLP's product (Llama's `act_fn(gate_proj(x))
    /// * up_proj(x)`); fused for SiLU.
    pub fn gated(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => ops::silu_mul(gate, up),
            _ => self.forward(gate)? * up,
        }
    }
}
