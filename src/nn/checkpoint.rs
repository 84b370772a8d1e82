//! Activation (gradient) checkpointing for a stack of layers: the backward
//! of `head(layer_n(... layer_1(x)))` holding one layer's activations at a
//! time instead of all of them.
//!
//! Candle's backward keeps every intermediate tensor of the forward pass
//! until it runs; in a decoder those are most of a training step's memory.
//! Here the forward pass keeps only each layer's input (detached, so its
//! graph is freed at once), and the backward pass recomputes one layer at
//! a time, from the last, and back-propagates the gradient of its output
//! through it (the backward of `sum(layer(x) * g)` with `g` constant). This
//! costs one more forward pass of every layer, as in PyTorch's
//! `torch.utils.checkpoint` and transformers' `gradient_checkpointing`.
//!
//! A recomputed layer must compute exactly what it did the first time:
//! [`Layers::rewind`] restores anything random (dropout counters) to its
//! state before the first pass.

use candle::backprop::GradStore;
use candle::{Result, Tensor, TensorId, Var};
use std::collections::HashSet;

/// The layers a checkpointed backward runs through.
pub trait Layers {
    /// What [`Layers::rewind`] needs to make layer `i` repeat its forward.
    type State;
    fn count(&self) -> usize;
    fn forward(&self, i: usize, xs: &Tensor) -> Result<Tensor>;
    /// The state (dropout counters) before layer `i` runs.
    fn state(&self, i: usize) -> Self::State;
    fn rewind(&self, i: usize, state: &Self::State);
}

/// The loss `head(layers(x0))` and the gradients of `params` (only those),
/// scaled by `scale`, as `(head(...) * scale).backward()` gives them.
/// `x0` may be tracked (trainable embeddings before the layers): its graph
/// gets the input gradient at the end.
pub fn checkpointed_backward<L: Layers>(
    layers: &L,
    x0: &Tensor,
    head: impl FnOnce(&Tensor) -> Result<Tensor>,
    params: &[&Tensor],
    scale: f64,
) -> Result<(Tensor, GradStore)> {
    let wanted: HashSet<TensorId> = params.iter().map(|p| p.id()).collect();
    let mut out = GradStore::default();
    // Forward: keep each layer's input and the random state it ran with.
    let mut inputs = Vec::with_capacity(layers.count());
    let mut xs = x0.detach();
    for i in 0..layers.count() {
        let state = layers.state(i);
        let next = layers.forward(i, &xs)?.detach();
        inputs.push((std::mem::replace(&mut xs, next), state));
    }
    let top = Var::from_tensor(&xs)?;
    let loss = head(top.as_tensor())?;
    let mut grads = (&loss * scale)?.backward()?;
    let mut upstream = take(&mut grads, top.as_tensor())?;
    keep(&mut out, grads, &wanted)?;
    for i in (0..layers.count()).rev() {
        let (input, state) = inputs.pop().expect("one input per layer");
        let x = Var::from_tensor(&input)?;
        layers.rewind(i, &state);
        let ys = layers.forward(i, x.as_tensor())?;
        let mut grads = (ys * &upstream)?.sum_all()?.backward()?;
        upstream = take(&mut grads, x.as_tensor())?;
        keep(&mut out, grads, &wanted)?;
    }
    if x0.track_op() {
        keep(&mut out, (x0 * &upstream)?.sum_all()?.backward()?, &wanted)?;
    }
    Ok((loss, out))
}

/// The gradient of `tensor`, or zeros when nothing reached it, detached:
/// a gradient computed through a trainable tensor (`dx = g·Wᵀ`) records
/// that op, and the next layer's backward would otherwise differentiate
/// through it and count `W`'s gradient a second time.
fn take(grads: &mut GradStore, tensor: &Tensor) -> Result<Tensor> {
    match grads.remove(tensor) {
        Some(g) => Ok(g.detach()),
        None => tensor.zeros_like(),
    }
}

/// Adds the gradients of the wanted tensors to `out`; the rest (the
/// activations') are dropped here.
fn keep(out: &mut GradStore, grads: GradStore, wanted: &HashSet<TensorId>) -> Result<()> {
    let mut kept = GradStore::default();
    let ids: Vec<TensorId> = grads.get_ids().copied().collect();
    for id in ids.into_iter().filter(|id| wanted.contains(id)) {
        if let Some(g) = grads.get_id(id) {
            kept.insert_id(id, g.clone());
        }
    }
    out.extend(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{DType, Device};

    /// `tanh(x W_i)` layers; the head is a squared sum.
    struct Stack(Vec<Var>);

    impl Layers for Stack {
        type State = ();
        fn count(&self) -> usize {
            self.0.len()
        }
        fn forward(&self, i: usize, xs: &Tensor) -> Result<Tensor> {
            xs.matmul(self.0[i].as_tensor())?.tanh()
        }
        fn state(&self, _: usize) {}
        fn rewind(&self, _: usize, _: &()) {}
    }

    #[test]
    fn checkpointed_gradients_equal_the_plain_backward() -> Result<()> {
        let dev = Device::Cpu;
        let w: Vec<Var> = (0..3)
            .map(|_| Var::from_tensor(&(Tensor::randn(0f32, 0.5, (4, 4), &dev)?)))
            .collect::<Result<_>>()?;
        let embed = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4), &dev)?)?;
        let x0 = (embed.as_tensor() * 2.0)?;
        let stack = Stack(w.clone());
        let head = |xs: &Tensor| xs.sqr()?.sum_all();

        let mut xs = x0.clone();
        for i in 0..3 {
            xs = stack.forward(i, &xs)?;
        }
        let plain = (head(&xs)? * 0.5)?.backward()?;

        let mut params: Vec<&Tensor> = w.iter().map(|v| v.as_tensor()).collect();
        params.push(embed.as_tensor());
        let (loss, grads) = checkpointed_backward(&stack, &x0, head, &params, 0.5)?;
        let want = head(&xs)?.to_scalar::<f32>()?;
        assert!((loss.to_scalar::<f32>()? - want).abs() < 1e-6);
        for p in params {
            let (a, b) = (grads.get(p).unwrap(), plain.get(p).unwrap());
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "gradient differs by {diff}");
            assert!(
                a.abs()?
                    .sum_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?
                    > 0.0
            );
        }
        // Only the wanted gradients are kept.
        assert_eq!(grads.get_ids().count(), 4);
        Ok(())
    }
}
