//! What LoRA and LoRA-Mini share: the frozen layer an update is attached to,
//! the dropout on the update's input, and the merged weight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle::{Result, Tensor};
use candle_nn::Linear;

use super::base::{BaseLinear, BaseWeight};
use super::matmul::{linear_fwd, merged_weight};
use crate::dropout::SeededDropout;

/// The frozen base of a low-rank adapter: `y = W x + b + B_eff·A_eff·dropout(x)`,
/// with the dropout on the update's input, the merged weight when merged,
/// and the training mode. Every [`LowRankLayer`](super::LowRankLayer) has one.
#[derive(Clone, Debug)]
pub struct AdapterHost {
    pub(crate) name: String,
    pub(crate) base: BaseLinear,
    pub(crate) dropout: Option<SeededDropout>,
    merged: Option<Tensor>,
    /// What `Module::forward` does: train (dropout on, factored update) or
    /// infer. Shared by clones, so switching the registry's copy switches
    /// the model's, like PyTorch's `model.train()` / `model.eval()`.
    training: Arc<AtomicBool>,
}

impl AdapterHost {
    pub(crate) fn new(base: &BaseLinear, dropout: f64, seed: u64, path: &str) -> Self {
        Self {
            name: path.to_string(),
            base: base.clone(),
            dropout: (dropout > 0.0).then(|| SeededDropout::new(dropout, seed, path)),
            merged: None,
            training: Arc::new(AtomicBool::new(true)),
        }
    }

    pub(crate) fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    pub(crate) fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed)
    }

    pub(crate) fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// Keeps `W + delta` beside the untouched `W`, so unmerging is exact.
    pub(crate) fn merge(&mut self, delta: &Tensor) -> Result<()> {
        self.merged = Some(merged_weight(&self.base.weight().to_dense()?, delta)?);
        Ok(())
    }

    pub(crate) fn unmerge(&mut self) {
        self.merged = None;
    }

    pub(crate) fn adapter_input(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match &self.dropout {
            Some(d) => d.forward_t(xs, train),
            None => Ok(xs.clone()),
        }
    }

    pub(crate) fn base_forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.base.forward(xs)
    }

    /// The forward pass with the update given as `(A_eff: r x d_in,
    /// B_eff: d_out x r)`, scaling folded into `B_eff`: two thin matmuls per
    /// token. `factors` is only evaluated when the layer is not merged.
    pub(crate) fn forward_t(
        &self,
        xs: &Tensor,
        train: bool,
        factors: impl FnOnce() -> Result<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        if let Some(merged) = &self.merged {
            if train {
                candle::bail!("module {} is merged: unmerge it before training", self.name);
            }
            return linear_fwd(xs, merged, self.base.bias());
        }
        let (a_eff, b_eff) = factors()?;
        let (d_out, d_in) = self.base.dims2()?;
        let rows = xs.elem_count() / d_in.max(1);
        if let (false, true, BaseWeight::Dense(weight)) =
            (train, rows >= d_in.min(d_out), self.base.weight())
        {
            // Inference over many rows: one gemm with `W + B_eff·A_eff`
            // costs less than two thin gemms and an add once the rows
            // outnumber a side of W (decoding one token at a time does not
            // qualify). The sum keeps its graph, so a backward from an
            // inference-mode forward still reaches the factors. A quantized
            // base would have to be dequantized for it, so it never takes
            // this path.
            let delta = b_eff.matmul(&a_eff)?;
            return linear_fwd(xs, &merged_weight(weight, &delta)?, self.base.bias());
        }
        if self.update_reads_input(train) {
            // The update reads x itself: the fused op takes A_eff.
            return self.base.forward_with_factors(xs, &a_eff, &b_eff);
        }
        let h = linear_fwd(&self.adapter_input(xs, train)?, &a_eff, None)?;
        self.base.forward_with_update(xs, &h, &b_eff)
    }

    /// `(A_eff, B_eff)` when this layer's output in `forward_t` is
    /// `base(x) + (x·A_effᵀ)·B_effᵀ` with nothing in between (not merged,
    /// no dropout in this mode), so that a fused block of layers may
    /// compute it; `None` otherwise.
    pub(crate) fn plain_factors(
        &self,
        train: bool,
        factors: impl FnOnce() -> Result<(Tensor, Tensor)>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if self.merged.is_some() || !self.update_reads_input(train) {
            return Ok(None);
        }
        factors().map(Some)
    }

    /// Whether the update reads `x` itself in this mode: no dropout, or
    /// dropout that is off (not training, or `p = 0`).
    fn update_reads_input(&self, train: bool) -> bool {
        self.dropout.as_ref().is_none_or(|d| !train || d.p() == 0.0)
    }

    /// The base layer as a plain candle-nn layer (dequantized if it was
    /// quantized).
    pub(crate) fn as_plain(&self) -> Result<Linear> {
        self.base.to_linear()
    }
}
