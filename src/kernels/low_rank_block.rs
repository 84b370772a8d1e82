//! What the fused blocks of adapted layers share (`gated_mlp`, `qkv`):
//! several frozen layers, each with a low-rank update `(x·A_effᵀ)·B_effᵀ`,
//! computed inside one op whose factors travel as one packed vector
//! (Candle's custom ops take at most three arguments; each factor's
//! gradient comes back through the concatenation that built the vector).

use candle::{DType, Result, Tensor};

use super::low_rank::{hidden, Base, FrozenWeight};
use super::quantized_matmul::GEMM_MIN_ROWS;
use super::{add_g_w, add_x_wt, gt_x, with_cpu_f32, written_by};

/// One adapted layer as the caller holds it: the frozen base and the
/// update's factors `A_eff (r x d_in)` and `B_eff (d_out x r)`, scaling
/// folded into `B_eff`.
pub(crate) struct BlockLayer<'a> {
    pub frozen: FrozenWeight<'a>,
    pub a: Tensor,
    pub b: Tensor,
}

/// A block's layers inside its op: the frozen bases and the ranks, which
/// locate each layer's factors in the packed vector.
pub(crate) struct LowRankLayers {
    bases: Vec<Base>,
    ranks: Vec<usize>,
}

/// Layer `i`'s `(A_eff, B_eff)` values within the packed vector.
pub(crate) type Factors<'p> = (&'p [f32], &'p [f32]);

impl LowRankLayers {
    /// The op's copy of `layers` and their packed factors, for `rows`
    /// rows of input; `None` where a layer is off the CPU or f32, has a
    /// base the low-rank kernels do not take or factors that do not fit
    /// it, or where a quantized base has too few rows for its banded gemm.
    pub(crate) fn pack(layers: &[BlockLayer], rows: usize) -> Result<Option<(Self, Tensor)>> {
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let (mut bases, mut ranks, mut parts) = (Vec::new(), Vec::new(), Vec::new());
        for l in layers {
            let Some(base) = Base::frozen(l.frozen) else {
                return Ok(None);
            };
            if !(f32_cpu(&l.a) && f32_cpu(&l.b)) {
                return Ok(None);
            }
            if rows < GEMM_MIN_ROWS && matches!(base, Base::Quantized(_)) {
                return Ok(None);
            }
            let ((n, k), (r, ka), (nb, rb)) = (base.dims2()?, l.a.dims2()?, l.b.dims2()?);
            if ka != k || nb != n || rb != r || r == 0 {
                return Ok(None);
            }
            bases.push(base);
            ranks.push(r);
            parts.push(l.a.flatten_all()?);
            parts.push(l.b.flatten_all()?);
        }
        let packed = Tensor::cat(&parts, 0)?;
        Ok(Some((Self { bases, ranks }, packed)))
    }

    /// `(d_out, d_in)` of layer `i`.
    pub(crate) fn dims2(&self, i: usize) -> Result<(usize, usize)> {
        self.bases[i].dims2()
    }

    /// Each layer's factors within `packed`, in the order they were packed.
    pub(crate) fn factors<'p>(&self, packed: &'p [f32]) -> Result<Vec<Factors<'p>>> {
        let mut rest = packed;
        let mut out = Vec::with_capacity(self.bases.len());
        for (base, &r) in self.bases.iter().zip(&self.ranks) {
            let (n, k) = base.dims2()?;
            if rest.len() < r * (k + n) {
                candle::bail!("low-rank block: the packed factors are too short");
            }
            let (a, tail) = rest.split_at(r * k);
            let (b, tail) = tail.split_at(n * r);
            out.push((a, b));
            rest = tail;
        }
        if !rest.is_empty() {
            candle::bail!("low-rank block: the packed factors are too long");
        }
        Ok(out)
    }

    /// Layer `i`'s output for `m` rows of `x`, and its `h = x·A_effᵀ`.
    pub(crate) fn forward(
        &self,
        i: usize,
        x: &[f32],
        m: usize,
        (a, b): Factors,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let ((n, k), r) = (self.bases[i].dims2()?, self.ranks[i]);
        let mut y = self.bases[i].forward(x, (m, n, k))?;
        let h = hidden(x, a, (m, r, k))?;
        add_x_wt(&mut y, &h, b, (m, n, r), true)?;
        Ok((y, h))
    }

    /// From layer `i`'s output gradient `g` (`m` rows), its input gradient
    /// into `dx` (added when `accumulate`) and its factors' `(dA_eff,
    /// dB_eff)`; `x` and `h` are the layer's input and `h`.
    pub(crate) fn grads(
        &self,
        i: usize,
        g: &[f32],
        (x, h): (&[f32], &[f32]),
        (a, b): Factors,
        (dx, accumulate): (&mut [f32], bool),
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let ((n, k), r) = (self.bases[i].dims2()?, self.ranks[i]);
        let m = g.len() / n.max(1);
        // SAFETY (each written_by): a gemm that does not accumulate writes
        // all of its output.
        let dh = unsafe { written_by(m * r, |dh| add_g_w(dh, g, n, b, (m, r, n), false))? };
        self.bases[i].add_input_grad(dx, g, (m, n, k), accumulate)?;
        add_g_w(dx, &dh, r, a, (m, k, r), true)?;
        let da = unsafe { written_by(r * k, |da| gt_x(da, &dh, x, (r, k, m)))? };
        let db = unsafe { written_by(n * r, |db| gt_x(db, g, h, (n, r, m)))? };
        Ok((da, db))
    }
}

/// A block op's backward: `grads` takes the values of the input `x`, the
/// packed factors and the output gradient, and returns those of `dX` and
/// of the packed factors' gradient, which come back shaped as `x` and
/// `packed`.
pub(crate) fn block_grads(
    x: &Tensor,
    packed: &Tensor,
    grad: &Tensor,
    grads: impl FnOnce(&[f32], &[f32], &[f32]) -> Result<(Vec<f32>, Vec<f32>)>,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let (dx, dp) = with_cpu_f32(&grad, "gradient", |g| {
        with_cpu_f32(x, "input", |xv| {
            with_cpu_f32(packed, "packed factors", |pv| grads(xv, pv, g))
        })
    })?;
    let dev = x.device();
    Ok((
        Some(Tensor::from_vec(dx, x.dims(), dev)?),
        Some(Tensor::from_vec(dp, packed.dims(), dev)?),
    ))
}
