//! candle-nn's building blocks, made adapter-aware: fork a Candle model,
//! change its `use` lines from `candle_nn` to `lora_mini::nn`, and it trains
//! LoRA-Mini (or LoRA, or everything) as an [`AdapterConfig`] says.
//!
//! * [`VarBuilder`] is candle-nn's builder plus the adapter factory; the
//!   module path of each layer is its `pp` prefix.
//! * [`linear`], [`linear_no_bias`] and [`linear_b`] have candle-nn's
//!   signatures and return an [`AdaptedLinear`] ([`Linear`] here).
//! * [`Module::forward`] on an adapted layer trains by default, as a PyTorch
//!   module starts in `train()` mode: a forked model that keeps its
//!   `self.q_proj.forward(&xs)` calls gets dropout and the factored update.
//!   [`AdapterRegistry::set_training`](crate::adapter::AdapterRegistry::set_training)
//!   with `false` switches every layer to inference. (The alternative, a
//!   layer without `Module`, would make every forked call site change.)
//! * [`ops`] holds `layer_norm`, `rms_norm` and `softmax_last_dim` with a
//!   backward, and [`rotary_emb`] `rope` and `rope_i`; Candle 0.11's own
//!   record none, so a model that keeps them trains nothing before them,
//!   silently.
//!
//! `examples/fork_candle_model.rs` forks candle-transformers' Llama this way.
//!
//! [`AdapterConfig`]: crate::adapter::AdapterConfig

mod activation;
pub mod checkpoint;
mod norm;
pub mod ops;
pub mod rotary_emb;
mod var_builder;

use candle::Result;

pub use crate::adapter::AdaptedLinear;
pub use activation::Activation;
pub use candle::Module;
pub use candle_nn::{Embedding, ModuleT};
pub use norm::{layer_norm, rms_norm, LayerNorm, RmsNorm};
pub use var_builder::VarBuilder;

/// The linear layer every constructor here returns.
pub type Linear = AdaptedLinear;

/// `candle_nn::linear`: weight and bias under `vb`, adapted as the
/// factory's config says for the module path `vb.prefix()`.
pub fn linear(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Linear> {
    vb.linear(d_in, d_out, true)
}

/// `candle_nn::linear_no_bias`.
pub fn linear_no_bias(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Linear> {
    vb.linear(d_in, d_out, false)
}

/// `candle_nn::linear_b`.
pub fn linear_b(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    vb.linear(d_in, d_out, bias)
}

/// `candle_nn::embedding`: the table under `vb`, trainable under full
/// fine-tuning.
pub fn embedding(in_size: usize, out_size: usize, vb: VarBuilder) -> Result<Embedding> {
    Ok(Embedding::new(
        vb.get((in_size, out_size), "weight")?,
        out_size,
    ))
}
