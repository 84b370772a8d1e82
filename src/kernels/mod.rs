//! The crate's CPU kernels (f32, AVX-512 where the CPU has it), each a
//! Candle custom op with its backward. Crate-private: the public entry
//! points are the dispatchers in [`crate::nn::ops`] and the adapter layers,
//! which fall back to composed Candle ops on other devices and dtypes.

pub(crate) mod attention;
pub(crate) mod composed;
pub(crate) mod frozen_matmul;
pub(crate) mod fused;
pub(crate) mod gated;
pub(crate) mod quantized_matmul;
pub(crate) mod rope;

use candle::{CpuStorage, Layout, Result, Tensor};

/// The contiguous f32 values of an op's CPU operand and the length of its
/// last dimension; `op` names the op in the error otherwise.
pub(crate) fn f32_rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<(&'a [f32], usize)> {
    let CpuStorage::F32(data) = storage else {
        candle::bail!("{op}: only f32 is fused");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle::bail!("{op}: the input must be contiguous");
    };
    let d = *layout.dims().last().unwrap_or(&1);
    Ok((&data[start..end], d.max(1)))
}

/// Calls `f` on the contiguous f32 values of a CPU tensor (an op's operand
/// or saved state); `what` names it in the error otherwise.
pub(crate) fn with_cpu_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (candle::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    else {
        candle::bail!("the {what} must be a contiguous f32 CPU tensor");
    };
    f(&v[a..b])
}

/// `y (m x n) += h (m x r) · Bᵀ` for a row-major `B (n x r)`: a low-rank
/// update's last factor accumulated onto a base layer's output inside the
/// gemm, for the fused base-plus-update ops.
pub(crate) fn add_low_rank(
    y: &mut [f32],
    h: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    r: usize,
) -> Result<()> {
    if y.len() != m * n || h.len() != m * r || b.len() != n * r {
        candle::bail!(
            "low-rank update: {} outputs, {} hidden and {} factor values do not fit {m}x{n} with rank {r}",
            y.len(),
            h.len(),
            b.len()
        );
    }
    // Bᵀ's element (i, j) is B[j][i]: row stride 1, column stride r.
    // SAFETY: y holds m·n values, h m·r and B n·r (checked above).
    unsafe {
        gemm::gemm(
            m,
            n,
            r,
            y.as_mut_ptr(),
            1,
            n as isize,
            true,
            h.as_ptr(),
            1,
            r as isize,
            b.as_ptr(),
            r as isize,
            1,
            1f32,
            1f32,
            false,
            false,
            false,
            gemm_parallelism(),
        )
    }
    Ok(())
}

/// The gradients of `h` and `B` through `y += h·Bᵀ` from `y`'s gradient:
/// `(grad·B, gradᵀ·h)`, from detached operands so that neither carries the
/// step's graph (a leaf's gradient is stored as given).
pub(crate) fn low_rank_grads(grad: &Tensor, h: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, r) = b.dims2()?;
    let rows = grad.elem_count() / n.max(1);
    let grad = grad.detach().reshape((rows, n))?;
    let dh = grad.matmul(&b.detach())?.reshape(h.dims())?;
    let db = grad.t()?.matmul(&h.detach().reshape((rows, r))?)?;
    Ok((dh, db))
}

/// The `gemm` crate's threading for a layer-sized product: Candle's thread
/// count, on rayon.
pub(crate) fn gemm_parallelism() -> gemm::Parallelism {
    match candle::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    }
}
