//! The contract every low-rank adapter layer meets, like PEFT's `LoraLayer`.

use candle::{Result, Tensor, Var};
use candle_nn::Linear;

use super::base::BaseLinear;
use super::host::AdapterHost;
use crate::dropout::SeededDropout;

/// A rank-`r` update `ΔW = scaling · b · a`, with `a: r x d_in` and
/// `b: d_out x r`. LoRA-Mini's is `a = A_in·A_aux`, `b = B_aux·B_in`.
#[derive(Clone, Debug)]
pub struct LowRankUpdate {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
}

impl LowRankUpdate {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.matmul(&self.a)? * self.scaling
    }
}

/// A frozen base layer (its [`AdapterHost`]: weight, bias, dropout on the
/// update's input, merge state and training mode) plus a rank-`r` update
/// `ΔW = scaling · b · a` built from trainable tensors.
///
/// A new method implements the four required items and gets the rest:
/// the base's accessors, `ΔW`, merge and unmerge, and the training mode.
/// Each layer type keeps an inherent `forward_t(xs, train)` (so it never
/// clashes with candle-nn's `ModuleT`) and a `Module` impl in its mode.
pub trait LowRankLayer {
    fn host(&self) -> &AdapterHost;

    fn host_mut(&mut self) -> &mut AdapterHost;

    /// The update as an exact LoRA pair `(a: r x d_in, b: d_out x r,
    /// scaling)`, differentiable with respect to the trainable tensors.
    fn update(&self) -> Result<LowRankUpdate>;

    /// The trainable tensors and their role names, in a fixed order;
    /// adapter files name each `<module path>.<role>`.
    fn trainable_vars(&self) -> Vec<(&'static str, &Var)>;

    /// Frozen tensors the adapter adds (LoRA-Mini's projections).
    fn frozen_aux(&self) -> Vec<(&'static str, &Tensor)> {
        Vec::new()
    }

    /// The module's full path, which also names its RNG streams.
    fn name(&self) -> &str {
        &self.host().name
    }

    /// The frozen base layer (unmerged), dense or quantized.
    fn base(&self) -> &BaseLinear {
        &self.host().base
    }

    /// The frozen base weight `W` (unmerged) as a dense tensor: a quantized
    /// base is dequantized, a copy of this layer only.
    fn weight(&self) -> Result<Tensor> {
        self.base().weight().to_dense()
    }

    fn bias(&self) -> Option<&Tensor> {
        self.base().bias()
    }

    fn dropout(&self) -> Option<&SeededDropout> {
        self.host().dropout.as_ref()
    }

    fn num_trainable(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// `(A_eff, B_eff)` with the scaling folded into `B_eff`, what the
    /// forward pass multiplies by: `ΔW = B_eff·A_eff`.
    fn effective_factors(&self) -> Result<(Tensor, Tensor)> {
        let update = self.update()?;
        Ok((update.a, (update.b * update.scaling)?))
    }

    /// The scaled update `ΔW` (`d_out x d_in`).
    fn delta_weight(&self) -> Result<Tensor> {
        let (a, b) = self.effective_factors()?;
        b.matmul(&a)
    }

    fn is_merged(&self) -> bool {
        self.host().is_merged()
    }

    /// Folds `ΔW` into the weight for inference at no extra latency; the
    /// original `W` is kept, so [`LowRankLayer::unmerge`] restores it bit
    /// for bit.
    fn merge(&mut self) -> Result<()> {
        if !self.is_merged() {
            let delta = self.delta_weight()?;
            self.host_mut().merge(&delta)?;
        }
        Ok(())
    }

    fn unmerge(&mut self) {
        self.host_mut().unmerge()
    }

    /// Whether `Module::forward` trains; `true` for a new layer, as in
    /// PyTorch. Clones share the flag.
    fn is_training(&self) -> bool {
        self.host().is_training()
    }

    fn set_training(&self, training: bool) {
        self.host().set_training(training)
    }

    /// The base layer without the adapter (dequantized if quantized).
    fn as_plain(&self) -> Result<Linear> {
        self.host().as_plain()
    }
}

/// Whether a trainable tensor, named `<module path>.<role>`, is the factor
/// on the output side that starts at zero (LoRA's `lora_B`, LoRA-Mini's
/// `B_in`): the one LoRA+ (`optim.b_lr_ratio`) trains at a higher rate.
pub fn is_b_factor(name: &str) -> bool {
    let role = name.rsplit('.').next().unwrap_or(name);
    role == LORA_B_ROLE || role == B_IN_ROLE
}

/// The role name of LoRA's zero-initialised factor `B`.
pub(crate) const LORA_B_ROLE: &str = "lora_B";

/// The role name of LoRA-Mini's trained factor `B_in`, zero at init under
/// `inner_init = "zero-b"`.
pub(crate) const B_IN_ROLE: &str = "lora_mini_B_in";

#[cfg(test)]
mod tests {
    use super::is_b_factor;

    #[test]
    fn only_the_output_side_factors_are_b_factors() {
        assert!(is_b_factor("model.layers.0.self_attn.q_proj.lora_B"));
        assert!(is_b_factor(
            "bert.encoder.layer.0.attention.self.query.lora_mini_B_in"
        ));
        assert!(!is_b_factor("model.layers.0.self_attn.q_proj.lora_A"));
        assert!(!is_b_factor(
            "bert.encoder.layer.0.attention.self.query.lora_mini_A_in"
        ));
        assert!(!is_b_factor("classifier.weight"));
        // A module that merely contains the role in its path is not one.
        assert!(!is_b_factor("lora_B.weight"));
    }
}
