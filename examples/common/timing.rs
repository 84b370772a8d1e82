//! What the train-step benchmarks share: the training step they time and
//! the median they report.

use std::collections::BTreeMap;

use candle::backprop::GradStore;
use candle::{Result, Tensor, Var};
use lora_mini::train::optim::GroupedAdamW;

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Backward from `loss` and one AdamW step (lr 1e-4, clipping at 1.0) on
/// the gradients of `vars`, freeing the gradient store before the step.
pub fn adamw_step(loss: &Tensor, vars: &[(String, Var)], opt: &mut GroupedAdamW) -> Result<()> {
    adamw_step_with(loss.backward()?, vars, opt)
}

/// One AdamW step as [`adamw_step`] on gradients already computed.
#[allow(dead_code)] // not every bench computes its own gradients
pub fn adamw_step_with(
    grads: GradStore,
    vars: &[(String, Var)],
    opt: &mut GroupedAdamW,
) -> Result<()> {
    let mut by_name = BTreeMap::new();
    for (name, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            by_name.insert(name.clone(), g.clone());
        }
    }
    drop(grads);
    opt.step_with(&by_name, 1e-4, 1.0)?;
    Ok(())
}
