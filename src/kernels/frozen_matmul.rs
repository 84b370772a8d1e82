//! `x·Wᵀ (+ b)` for a frozen `b`, whose backward computes the weight
//! gradient only when `W` is tracked.
//!
//! Candle's matmul backward computes both operands' gradients, so under
//! adapter training every frozen layer also pays for a weight gradient of
//! the forward's cost that nothing reads: a third of the step's matmul work.
//! This op runs the same gemm forward on the CPU, with the bias written
//! into the output before the gemm accumulates onto it (saving a pass), and,
//! backward, `grad·W`, plus `gradᵀ·x` only for a weight that has a graph
//! (an adapter's weight merged on the fly, see `AdapterHost::forward_t`).

use candle::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::{add_x_wt, f32_rows, with_cpu_f32, written_by};

/// The op's arguments are the `(rows, d_in)` input and the `(d_out, d_in)`
/// weight; it holds the frozen `(d_out)` bias.
struct FrozenMatmul {
    bias: Option<Tensor>,
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "lora-mini-frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, _) = f32_rows(storage, layout, self.name())?;
        let (w, _) = f32_rows(w_storage, w_layout, self.name())?;
        let (m, k) = layout.shape().dims2()?;
        let (n, k_w) = w_layout.shape().dims2()?;
        if k != k_w {
            candle::bail!("{}: input has {k} features, the weight {k_w}", self.name());
        }
        let y = frozen_linear(x, w, self.bias.as_ref(), (m, n, k))?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached: Candle detaches the gradients of inner nodes itself but
        // stores a leaf `Var`'s as given, and `gradᵀ·x` built from the
        // tracked `x` would carry the step's whole graph (LoRA on MRPC grew
        // by 600 MB a step once the optimizer kept it in its moments; AdamW
        // now detaches what it reads as well).
        let weight_has_graph = w.track_op();
        let (grad, x, w) = (grad.detach(), x.detach(), w.detach());
        let dw = if weight_has_graph {
            Some(grad.t()?.matmul(&x)?)
        } else {
            None
        };
        Ok((Some(grad.matmul(&w)?), dw))
    }
}

/// `x·Wᵀ + b` (`m x n`, row-major) for row-major `x (m x k)` and `W (n x k)`.
pub(crate) fn frozen_linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&Tensor>,
    (m, n, k): (usize, usize, usize),
) -> Result<Vec<f32>> {
    // Start from the bias and let the gemm add x·Wᵀ onto it; without a
    // bias the gemm writes y alone.
    match bias {
        Some(b) => {
            let mut y = with_cpu_f32(b, "bias", |b| {
                if b.len() != n {
                    candle::bail!(
                        "lora-mini-frozen-matmul: bias has {} entries, not {n}",
                        b.len()
                    );
                }
                Ok(b.repeat(m))
            })?;
            add_x_wt(&mut y, x, w, (m, n, k), true)?;
            Ok(y)
        }
        // SAFETY: a gemm that does not accumulate writes all m·n values.
        None => unsafe { written_by(m * n, |y| add_x_wt(y, x, w, (m, n, k), false)) },
    }
}

/// `x·Wᵀ + b` for a 2-D `x`: the op above when `W` and a frozen `b` are
/// f32 CPU tensors, Candle's matmul and add otherwise (a trainable bias,
/// CUDA, Metal, other dtypes).
pub(crate) fn linear_2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    let weight_ok = f32_cpu(weight);
    let bias_ok = bias.is_none_or(|b| f32_cpu(b) && !b.track_op());
    if x.dtype() == DType::F32 && weight_ok && bias_ok {
        return x.contiguous()?.apply_op2(
            weight,
            FrozenMatmul {
                bias: bias.cloned(),
            },
        );
    }
    let y = x.matmul(&weight.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    #[test]
    fn matches_candle_matmul_in_value_and_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (67, 48), &dev)?)?;
        let w = Tensor::randn(0f32, 0.2, (35, 48), &dev)?;
        let b = Tensor::randn(0f32, 0.2, 35, &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (67, 35), &dev)?;
        let ours = linear_2d(&x, &w, Some(&b))?;
        let candle = x.matmul(&w.t()?)?.broadcast_add(&b)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(diff(&ours, &candle)? < 1e-5);
        let g_ours = (ours * &probe)?.sum_all()?.backward()?;
        let g_candle = (candle * &probe)?.sum_all()?.backward()?;
        assert!(diff(g_ours.get(&x).unwrap(), g_candle.get(&x).unwrap())? < 1e-5);
        assert!(
            g_ours.get(&w).is_none(),
            "no gradient for the frozen weight"
        );
        // A trainable weight gets its gradient, equal to Candle's.
        let wv = Var::from_tensor(&w)?;
        let g = (linear_2d(&x, &wv, Some(&b))? * &probe)?
            .sum_all()?
            .backward()?;
        let g_ref = (x.matmul(&wv.t()?)?.broadcast_add(&b)? * &probe)?
            .sum_all()?
            .backward()?;
        assert!(diff(g.get(&wv).unwrap(), g_ref.get(&wv).unwrap())? < 1e-4);
        // A leaf's gradient must not hold the step's graph (the optimizer
        // keeps it in its moments).
        assert!(!g.get(&wv).unwrap().track_op());
        // And so does a weight computed from a `Var` (merged on the fly).
        let merged = (wv.as_tensor() * 2.0)?;
        let g = (linear_2d(&x, &merged, Some(&b))? * &probe)?
            .sum_all()?
            .backward()?;
        let expected = (g_ref.get(&wv).unwrap() * 2.0)?;
        assert!(diff(g.get(&wv).unwrap(), &expected)? < 1e-4);
        // So does a trainable bias beside a frozen weight.
        let bv = Var::from_tensor(&b)?;
        let g = (linear_2d(&x, &w, Some(&bv))? * &probe)?
            .sum_all()?
            .backward()?;
        assert!(g.get(&bv).is_some() && g.get(&x).is_some());
        // Without a bias, too.
        let diff2 = diff(&linear_2d(&x, &w, None)?, &x.matmul(&w.t()?)?)?;
        assert!(diff2 < 1e-5);
        Ok(())
    }
}
