//! The cross-entropy of each row's target through a frozen output layer,
//! `nll_i = logsumexp(z_i) - z_i[t_i]` with `z_i = x_i·Wᵀ + b`, without
//! the `(rows, vocab)` logits.
//!
//! A decoder's `lm_head` makes the largest tensors of a training step: on
//! SmolLM2 (49,152 words) the logits of one 8 x 128 batch and their
//! gradient are 200 MB each, fresh pages the kernel zeroes every step, and
//! the softmax and its gradient are two more passes over them. Here the
//! rows go through in chunks of 64 MB: a chunk's logits, its
//! cross-entropy, its softmax minus the one-hot target in place, and (in
//! training) that times `W`, which is the chunk's input gradient. Each
//! row's nll depends on that row alone, so its gradient can be computed in
//! the forward pass (as Liger-Kernel's fused linear cross-entropy does):
//! the backward only scales each saved row by its upstream gradient. The
//! same gemms run as composed; nothing is recomputed.
//!
//! A quantized `W` is dequantized once per call (one f32 copy of this one
//! matrix, in parallel bands), since every chunk reads all of it twice;
//! `BaseLinear::target_nlls` goes further and keeps that copy across calls.

use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{fast_exp, log_sum_exp, vectorized};
use super::low_rank::{Base, FrozenWeight};
use super::quantized_matmul::dequantize_all;
use super::{add_g_w, add_x_wt, f32_rows, with_cpu_f32};

/// About this many logits are alive at once (64 MB). Each chunk's two
/// gemms pack all of `W` again, so chunks must be large: on SmolLM2 (341
/// rows a chunk) a step took 1-4% less time than unfused, with 4M-value
/// chunks (85 rows) 3-5% more (measured 2026-12-04).
const CHUNK_VALUES: usize = 1 << 24;

/// The op: argument `x (rows, d_in)`, one target per row.
struct LinearTargetNll {
    head: Base,
    targets: Arc<Vec<u32>>,
    /// Whether the forward pass also computes the input gradient.
    with_grad: bool,
    /// `∂nll_i/∂x_i`, `rows x d_in`, when the forward computed it.
    saved_grad: Mutex<Option<Vec<f32>>>,
}

impl LinearTargetNll {
    /// The nlls, and the input gradient when `with_grad`.
    fn run(&self, x: &[f32], with_grad: bool) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        match &self.head {
            Base::Dense { weight, bias } => with_cpu_f32(weight, "output weight", |w| {
                let bias = match bias {
                    Some(b) => Some(with_cpu_f32(b, "output bias", |b| Ok(b.to_vec()))?),
                    None => None,
                };
                self.run_dense(x, w, bias.as_deref(), with_grad)
            }),
            Base::Quantized(q) => {
                let w = dequantize_all(q)?;
                self.run_dense(x, &w, None, with_grad)
            }
        }
    }

    fn run_dense(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        with_grad: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let (v, k) = self.head.dims2()?;
        self.check(x, w, bias, (k, v))?;
        let rows = self.targets.len();
        let chunk = (CHUNK_VALUES / v.max(1)).clamp(1, rows.max(1));
        // Every chunk's gemm overwrites its logits (or adds onto the bias
        // copied in first), and the chunks' input gradients cover all rows,
        // so neither buffer needs zeroing.
        let mut logits = Vec::<f32>::with_capacity(chunk * v);
        let mut nlls = vec![0f32; rows];
        let mut grad = with_grad.then(|| Vec::<f32>::with_capacity(rows * k));
        for start in (0..rows).step_by(chunk) {
            let m = chunk.min(rows - start);
            // SAFETY: the capacity holds chunk·v ≥ m·v values, all written
            // below (by the bias copy, or by the gemm that does not
            // accumulate) before nll_and_softmax_grad reads them.
            let z = unsafe { std::slice::from_raw_parts_mut(logits.as_mut_ptr(), m * v) };
            let x_chunk = &x[start * k..(start + m) * k];
            match bias {
                Some(b) => {
                    z.chunks_mut(v).for_each(|row| row.copy_from_slice(b));
                    add_x_wt(z, x_chunk, w, (m, v, k), true)?;
                }
                None => add_x_wt(z, x_chunk, w, (m, v, k), false)?,
            }
            let targets = &self.targets[start..start + m];
            nll_and_softmax_grad(z, v, targets, &mut nlls[start..start + m], with_grad);
            if let Some(grad) = grad.as_mut() {
                // SAFETY: the capacity holds rows·k values; this chunk's
                // rows are written by the gemm, which does not accumulate.
                let rows_grad = unsafe {
                    std::slice::from_raw_parts_mut(grad.as_mut_ptr().add(start * k), m * k)
                };
                add_g_w(rows_grad, z, v, w, (m, k, v), false)?;
            }
        }
        if let Some(grad) = grad.as_mut() {
            // SAFETY: the chunks' gemms wrote all rows·k values.
            unsafe { grad.set_len(rows * k) };
        }
        Ok((nlls, grad))
    }

    fn check(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        (k, v): (usize, usize),
    ) -> Result<()> {
        if x.len() != self.targets.len() * k || w.len() != v * k {
            candle::bail!(
                "linear target nll: {} input values for {} targets do not fit a {v}x{k} weight",
                x.len(),
                self.targets.len(),
            );
        }
        if bias.is_some_and(|b| b.len() != v) {
            candle::bail!("linear target nll: the bias does not have {v} entries");
        }
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle::bail!("linear target nll: target {t} is outside the {v} classes");
        }
        Ok(())
    }
}

/// Each row's `logsumexp(z) - z[t]` into `nlls`; with `with_grad`, the row
/// becomes `softmax(z) - onehot(t)`, the nll's gradient by the logits.
fn nll_and_softmax_grad(
    z: &mut [f32],
    v: usize,
    targets: &[u32],
    nlls: &mut [f32],
    with_grad: bool,
) {
    z.par_chunks_mut(v)
        .zip(nlls.par_iter_mut())
        .zip(targets.par_iter())
        .for_each(|((row, nll), &t)| {
            let lse = vectorized!(log_sum_exp(row));
            *nll = lse - row[t as usize];
            if with_grad {
                vectorized!(row.iter_mut().for_each(|z| *z = fast_exp(*z - lse)));
                row[t as usize] -= 1.0;
            }
        });
}

impl CustomOp1 for LinearTargetNll {
    fn name(&self) -> &'static str {
        "lora-mini-linear-target-nll"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, width) = f32_rows(storage, layout, self.name())?;
        let k = self.head.dims2()?.1;
        if width != k {
            candle::bail!(
                "{}: input has {width} features, the weight {k}",
                self.name()
            );
        }
        let (nlls, grad) = self.run(x, self.with_grad)?;
        *self.saved_grad.lock().expect("no panic holds the lock") = grad;
        Ok((CpuStorage::F32(nlls), Shape::from(self.targets.len())))
    }

    fn bwd(&self, x: &Tensor, _nll: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let saved = self
            .saved_grad
            .lock()
            .expect("no panic holds the lock")
            .clone();
        let dx = match saved {
            Some(dx) => dx,
            // The forward ran without the gradient (not in training): the
            // same pass again, now with it.
            None => with_cpu_f32(&x.contiguous()?, "input", |x| {
                Ok(self.run(x, true)?.1.expect("asked for the gradient"))
            })?,
        };
        let rows = self.targets.len();
        let dx = Tensor::from_vec(dx, (rows, x.elem_count() / rows.max(1)), x.device())?;
        let scale = grad.detach().to_dtype(DType::F32)?.reshape((rows, 1))?;
        Ok(Some(dx.broadcast_mul(&scale)?.reshape(x.dims())?))
    }
}

/// The negative log-likelihood `(rows)` of each row's target through a
/// frozen output layer, `x (rows, d_in)` by `W (vocab, d_in)` (see the
/// module docs); `with_grad` computes the input gradient in the same pass.
/// `None` where the fused op does not apply (a weight or bias with a graph,
/// other devices or dtypes), for the caller to compose.
pub(crate) fn linear_target_nlls(
    x: &Tensor,
    frozen: FrozenWeight,
    targets: Vec<u32>,
    with_grad: bool,
) -> Result<Option<Tensor>> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 2) {
        return Ok(None);
    }
    let Some(head) = Base::frozen(frozen) else {
        return Ok(None);
    };
    let op = LinearTargetNll {
        head,
        targets: Arc::new(targets),
        with_grad: with_grad && x.track_op(),
        saved_grad: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::quantized::{GgmlDType, QTensor};
    use candle::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Values and input gradients of the fused op against the logits
    /// followed by `target_nlls`, with the gradient computed in the
    /// forward pass and, without it, in the backward.
    fn check(frozen: FrozenWeight, logits: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
        let dev = Device::Cpu;
        // More rows than one chunk holds for this vocabulary would need 40K
        // rows; the chunking is checked by the vocabulary-wide test below.
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 64), &dev)?)?;
        let targets = vec![0u32, 95, 3, 3, 50, 17, 94];
        let weights = Tensor::new(&[0.5f32, -1.0, 2.0, 0.25, 1.5, 1.0, -0.5], &dev)?;
        let composed = crate::nn::ops::target_nlls(&logits(x.as_tensor())?, targets.clone())?;
        let g_composed = (&composed * &weights)?.sum_all()?.backward()?;
        let g_composed = g_composed.get(&x).expect("x has a gradient");
        for with_grad in [true, false] {
            let fused = linear_target_nlls(x.as_tensor(), frozen, targets.clone(), with_grad)?
                .expect("the fused op applies to f32 CPU tensors");
            assert!(
                max_diff(&fused, &composed)? < 1e-4,
                "values, with_grad {with_grad}"
            );
            let g = (&fused * &weights)?.sum_all()?.backward()?;
            let g = g.get(&x).expect("x has a gradient");
            assert!(
                max_diff(g, g_composed)? < 1e-5,
                "gradient, with_grad {with_grad}"
            );
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        let outside = linear_target_nlls(x.as_tensor(), frozen, vec![96; 7], true);
        assert!(
            outside.is_err(),
            "a target outside the vocabulary is an error"
        );
        let narrow = Tensor::zeros((7, 63), DType::F32, &dev)?;
        let narrow = linear_target_nlls(&narrow, frozen, vec![0; 7], true);
        assert!(
            narrow.is_err(),
            "an input narrower than the weight is an error"
        );
        Ok(())
    }

    #[test]
    fn dense_head_with_bias_matches_logits_then_cross_entropy() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.3, (96, 64), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 96, &dev)?;
        check(FrozenWeight::Dense(&w, Some(&b)), |x| {
            x.matmul(&w.t()?)?.broadcast_add(&b)
        })
    }

    #[test]
    fn quantized_head_matches_logits_then_cross_entropy() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.3, (96, 64), &dev)?;
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1)?);
        // Against the dequantized weight: Candle's quantized kernel, which
        // few rows would take, also rounds the activations to 8 bits.
        let dequantized = q.dequantize(&dev)?;
        check(FrozenWeight::Quantized(&q), |x| x.matmul(&dequantized.t()?))
    }

    /// SmolLM2's vocabulary: a chunk holds 341 rows, so 400 rows go
    /// through in two chunks.
    #[test]
    fn rows_in_several_chunks_match_one_pass() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, k, v) = (400, 8, 49_152);
        assert!(CHUNK_VALUES / v < rows);
        let w = Tensor::randn(0f32, 0.3, (v, k), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, k), &dev)?)?;
        let targets: Vec<u32> = (0..rows as u32).map(|i| i * 491 % v as u32).collect();
        let composed =
            crate::nn::ops::target_nlls(&x.as_tensor().matmul(&w.t()?)?, targets.clone())?;
        let fused =
            linear_target_nlls(x.as_tensor(), FrozenWeight::Dense(&w, None), targets, true)?
                .expect("applies");
        assert!(max_diff(&fused, &composed)? < 1e-4);
        let g_fused = fused.sum_all()?.backward()?;
        let g_composed = composed.sum_all()?.backward()?;
        let (g_fused, g_composed) = (g_fused.get(&x).unwrap(), g_composed.get(&x).unwrap());
        let size = g_composed.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = max_diff(g_fused, g_composed)?;
        assert!(
            diff < 1e-5 * size.max(1.0),
            "gradient off by {diff} (largest {size})"
        );
        Ok(())
    }
}
