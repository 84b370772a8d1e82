//! `x·Wᵀ` for a frozen `W`, whose backward returns only the input gradient.
//!
//! Candle's matmul backward computes both operands' gradients, so under
//! adapter training every frozen layer also pays for a weight gradient of
//! the forward's cost that nothing reads: a third of the step's matmul work.
//! This op runs the same gemm forward on the CPU and, backward, only
//! `grad·W`.

use candle::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// The op holds the frozen `(d_out, d_in)` weight; its argument is the
/// `(rows, d_in)` input.
struct FrozenMatmul {
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "lora-mini-frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), Some((x0, x1))) = (storage, layout.contiguous_offsets()) else {
            candle::bail!("{}: the input must be contiguous f32", self.name());
        };
        let (m, k) = layout.shape().dims2()?;
        let (n, k_w) = self.weight.dims2()?;
        if k != k_w {
            candle::bail!("{}: input has {k} features, the weight {k_w}", self.name());
        }
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let (candle::Storage::Cpu(CpuStorage::F32(w)), Some((w0, w1))) =
            (&*w_storage, w_layout.contiguous_offsets())
        else {
            candle::bail!(
                "{}: the weight must be a contiguous f32 CPU tensor",
                self.name()
            );
        };
        let (x, w) = (&x[x0..x1], &w[w0..w1]);
        let mut y = vec![0f32; m * n];
        let threads = candle::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // y (m x n, row-major) = x (m x k, row-major) · Wᵀ, where Wᵀ's
        // element (i, j) is W[j][i]: row stride 1, column stride k.
        // SAFETY: the pointers cover m·n, m·k and n·k elements with the
        // strides given, as checked above; dst is not read (alpha = 0,
        // read_dst = false).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0f32,
                1f32,
                false,
                false,
                false,
                parallelism,
            )
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// `x·Wᵀ` for a 2-D contiguous `x`: the frozen-weight op when `W` is a
/// frozen f32 CPU tensor, Candle's matmul otherwise (trainable weights,
/// CUDA, Metal, other dtypes).
pub(crate) fn matmul_wt(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let frozen_f32_cpu = !weight.track_op()
        && weight.device().is_cpu()
        && weight.dtype() == DType::F32
        && x.dtype() == DType::F32
        && weight.is_contiguous();
    if frozen_f32_cpu {
        x.contiguous()?.apply_op1(FrozenMatmul {
            weight: weight.clone(),
        })
    } else {
        x.matmul(&weight.t()?)
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
        let probe = Tensor::randn(0f32, 1.0, (67, 35), &dev)?;
        let ours = matmul_wt(&x, &w)?;
        let candle = x.matmul(&w.t()?)?;
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
        // A trainable weight takes Candle's path and gets its gradient.
        let wv = Var::from_tensor(&w)?;
        let g = (matmul_wt(&x, &wv)? * &probe)?.sum_all()?.backward()?;
        assert!(g.get(&wv).is_some());
        Ok(())
    }
}
