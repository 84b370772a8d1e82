//! What LoRA and LoRA-Mini share: the frozen layer an update is attached to,
//! the dropout on the update's input, and the merged weight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle::{Result, Tensor};
use candle_nn::Linear;

use super::matmul::{linear_fwd, merged_weight};
use crate::dropout::SeededDropout;

/// The frozen base of a low-rank adapter: `y = W x + b + B_eff·A_eff·dropout(x)`,
/// with the dropout on the update's input, the merged weight when merged,
/// and the training mode. Every [`LowRankLayer`](super::LowRankLayer) has one.
#[derive(Clone, Debug)]
pub struct AdapterHost {
    pub(crate) name: String,
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    pub(crate) dropout: Option<SeededDropout>,
    merged: Option<Tensor>,
    /// What `Module::forward` does: train (dropout on, factored update) or
    /// infer. Shared by clones, so switching the registry's copy switches
    /// the model's, like PyTorch's `model.train()` / `model.eval()`.
    training: Arc<AtomicBool>,
}

impl AdapterHost {
    pub(crate) fn new(base: &Linear, dropout: f64, seed: u64, path: &str) -> Self {
        Self {
            name: path.to_string(),
            weight: base.weight().clone(),
            bias: base.bias().cloned(),
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
        self.merged = Some(merged_weight(&self.weight, delta)?);
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
        linear_fwd(xs, &self.weight, self.bias.as_ref())
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
            return linear_fwd(xs, merged, self.bias.as_ref());
        }
        let (a_eff, b_eff) = factors()?;
        let (d_out, d_in) = self.weight.dims2()?;
        let rows = xs.elem_count() / d_in.max(1);
        if !train && rows >= d_in.min(d_out) {
            // Inference over many rows: one gemm with `W + B_eff·A_eff`
            // costs less than two thin gemms and an add once the rows
            // outnumber a side of W (decoding one token at a time does not
            // qualify). The sum keeps its graph, so a backward from an
            // inference-mode forward still reaches the factors.
            let delta = b_eff.matmul(&a_eff)?;
            return linear_fwd(
                xs,
                &merged_weight(&self.weight, &delta)?,
                self.bias.as_ref(),
            );
        }
        let h = linear_fwd(&self.adapter_input(xs, train)?, &a_eff, None)?;
        self.base_forward(xs)? + linear_fwd(&h, &b_eff, None)?
    }

    pub(crate) fn as_plain(&self) -> Linear {
        Linear::new(self.weight.clone(), self.bias.clone())
    }
}
