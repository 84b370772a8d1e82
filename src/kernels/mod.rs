//! The crate's CPU kernels (f32, AVX-512 where the CPU has it), each a
//! Candle custom op with its backward. Crate-private: the public entry
//! points are the dispatchers in [`crate::nn::ops`] and the adapter layers,
//! which fall back to composed Candle ops on other devices and dtypes.

pub(crate) mod attention;
pub(crate) mod composed;
pub(crate) mod frozen_matmul;
pub(crate) mod fused;
pub(crate) mod gated;
pub(crate) mod gated_mlp;
pub(crate) mod linear_cross_entropy;
pub(crate) mod low_rank;
pub(crate) mod low_rank_block;
#[cfg(feature = "mkl")]
mod mkl;
pub(crate) mod qkv;
pub(crate) mod quantized_matmul;
pub(crate) mod rope;
pub(crate) mod thin;

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

/// A kernel's output of `len` values, allocated without the pass that
/// `vec![0.0; len]` spends zeroing it: `fill` writes every value. The
/// zeroing runs on the calling thread alone while the kernel after it runs
/// on all of them, so in a training step, which allocates a few hundred
/// such outputs, the other cores waited through each one.
///
/// # Safety
/// `fill` must write all `len` values of its slice, and read none it has
/// not written. The vector is only handed out when `fill` succeeds.
pub(crate) unsafe fn written_by(
    len: usize,
    fill: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<Vec<f32>> {
    let mut out = Vec::<f32>::with_capacity(len);
    // SAFETY: the allocation holds `len` values; the caller guarantees
    // that `fill` writes each one before any is read, so after it returns
    // Ok the first `len` values are initialised.
    unsafe {
        fill(std::slice::from_raw_parts_mut(out.as_mut_ptr(), len))?;
        out.set_len(len);
    }
    Ok(out)
}

/// `y (m x n) (+)= x (m x k) · Wᵀ` for row-major `x` and `W (n x k)`: a
/// frozen linear layer onto its bias, or a low-rank update's last factor
/// onto the base's output; `accumulate` adds onto `y` instead of
/// overwriting it (which never reads `y`).
pub(crate) fn add_x_wt(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    if y.len() != m * n || x.len() != m * k || w.len() != n * k {
        candle::bail!(
            "y += x·Wᵀ: {} outputs, {} input and {} weight values do not fit {m}x{n} over {k}",
            y.len(),
            x.len(),
            w.len()
        );
    }
    if thin::x_wt(y, x, k, w, (m, n, k), accumulate) {
        return Ok(());
    }
    // Wᵀ's element (i, j) is W[j][i]: row stride 1, column stride k.
    // SAFETY: y holds m·n values, x m·k and W n·k (checked above).
    unsafe {
        gemm_strided(
            (m, n, k),
            (y.as_mut_ptr(), 1, n as isize),
            (x.as_ptr(), 1, k as isize),
            (w.as_ptr(), k as isize, 1),
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            gemm_parallelism(),
        )
    }
    Ok(())
}

/// `dx (m x k) (+)= g · W`: the input gradient of `y = x·Wᵀ` through
/// `len` output columns, for `g` holding `m` rows of `g_stride` values (its
/// first `len` columns are read) and row-major `W (len x k)`; `accumulate`
/// adds onto `dx` instead of overwriting it.
pub(crate) fn add_g_w(
    dx: &mut [f32],
    g: &[f32],
    g_stride: usize,
    w: &[f32],
    (m, k, len): (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    let g_needed = if m == 0 { 0 } else { (m - 1) * g_stride + len };
    if dx.len() != m * k || g.len() < g_needed || w.len() < len * k || len > g_stride {
        candle::bail!(
            "dx += g·W: {} outputs, {} gradient and {} weight values do not fit {m}x{k} over {len}",
            dx.len(),
            g.len(),
            w.len()
        );
    }
    if k <= thin::MAX_THIN && thin::available() {
        // Thin W (len × k), as a factor B: the kernel reads it transposed.
        let wt: Vec<f32> = (0..k)
            .flat_map(|j| (0..len).map(move |l| w[l * k + j]))
            .collect();
        if thin::x_wt(dx, g, g_stride, &wt, (m, k, len), accumulate) {
            return Ok(());
        }
    }
    // SAFETY: dx holds m·k values, g m rows of stride g_stride covering len
    // columns, and W len·k values (checked above).
    unsafe {
        gemm_strided(
            (m, k, len),
            (dx.as_mut_ptr(), 1, k as isize),
            (g.as_ptr(), 1, g_stride as isize),
            (w.as_ptr(), 1, k as isize),
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            gemm_parallelism(),
        )
    }
    Ok(())
}

/// `dw (p x q) = gᵀ · x`: a factor's weight gradient, for row-major `g`
/// (`m x p`, the output gradient) and `x` (`m x q`, the input), summed
/// over the `m` rows.
pub(crate) fn gt_x(
    dw: &mut [f32],
    g: &[f32],
    x: &[f32],
    (p, q, m): (usize, usize, usize),
) -> Result<()> {
    if dw.len() != p * q || g.len() != m * p || x.len() != m * q {
        candle::bail!(
            "dW = gᵀ·x: {} outputs, {} gradient and {} input values do not fit {p}x{q} over {m}",
            dw.len(),
            g.len(),
            x.len()
        );
    }
    // Thin g as dhᵀ·x; thin x, as a factor's hidden h, as (xᵀ·g)ᵀ.
    if thin::st_y(dw, g, x, (p, q, m), thin::Out::AsIs)
        || thin::st_y(dw, x, g, (q, p, m), thin::Out::Transposed)
    {
        return Ok(());
    }
    // gᵀ's element (i, l) is g[l][i]: row stride 1, column stride p.
    // SAFETY: dw holds p·q values, g m·p and x m·q (checked above).
    unsafe {
        gemm_strided(
            (p, q, m),
            (dw.as_mut_ptr(), 1, q as isize),
            (g.as_ptr(), p as isize, 1),
            (x.as_ptr(), 1, q as isize),
            0.0,
            1.0,
            gemm_parallelism(),
        )
    }
    Ok(())
}

/// `dst (m × n) = alpha·dst + beta·lhs·rhs`, each operand given by its
/// pointer, column stride and row stride; `alpha = 0` never reads `dst`.
/// The one place the `gemm` crate is called, or MKL in a build with the
/// `mkl` feature (see `kernels::mkl`).
///
/// SAFETY: the caller guarantees each pointer covers the elements its
/// strides reach and that `dst` does not alias the operands.
pub(crate) unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    alpha: f32,
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    #[cfg(feature = "mkl")]
    // SAFETY: the caller's guarantees are the ones `mkl::sgemm` needs.
    if unsafe { mkl::sgemm_on_rayon((m, n, k), dst, lhs, rhs, alpha, beta) } {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.1,
        dst.2,
        alpha != 0.0,
        lhs.0,
        lhs.1,
        lhs.2,
        rhs.0,
        rhs.1,
        rhs.2,
        alpha,
        beta,
        false,
        false,
        false,
        parallelism,
    )
}

/// The `gemm` crate's threading for a layer-sized product: Candle's thread
/// count, on rayon.
pub(crate) fn gemm_parallelism() -> gemm::Parallelism {
    match candle::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    }
}

/// The largest difference between `a` and `b`, relative to `b`'s largest
/// magnitude (at least 1), for tests of fused ops against their
/// composition: the fused op sums in another order, and the random inputs
/// (Candle's RNG cannot be seeded) give outputs of any size.
#[cfg(test)]
pub(crate) fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(1.0))
}
