//! A whole SiLU-gated MLP with a low-rank update on each of its three
//! layers, `down(silu(gate(x)) · up(x))` with `layer(x) = x·Wᵀ + b +
//! (x·A_effᵀ)·B_effᵀ`, as one op: how a Llama-family MLP trains on the CPU.
//!
//! Composed, it is four ops (three `low_rank` layers and the gated
//! product), and Candle's backward gives each op's `rows x
//! intermediate_size` output (gate, up, and their product) a fresh zero
//! gradient and then adds into it: three passes over the widest
//! activations of the layer each, plus the add of the up layer's input
//! gradient into the gate layer's. Here those gradients live inside one
//! backward: the down layer's input gradient goes straight into the SiLU
//! product's, and the gate and up layers' input gradients are written into
//! one buffer. The six factors travel as one packed vector (Candle's custom
//! ops take at most three arguments), so each one's gradient comes back
//! through the concatenation that built it.

use std::sync::OnceLock;

use candle::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::gated::{silu_mul_grad_into, silu_mul_into};
use super::low_rank::{hidden, Base, FrozenWeight};
use super::quantized_matmul::GEMM_MIN_ROWS;
use super::{add_g_w, add_x_wt, f32_rows, gt_x, with_cpu_f32, written_by};

/// One layer of the MLP as the caller holds it: the frozen base and the
/// update's factors `A_eff (r x d_in)` and `B_eff (d_out x r)`, scaling
/// folded into `B_eff`.
pub(crate) struct MlpLayer<'a> {
    pub frozen: FrozenWeight<'a>,
    pub a: Tensor,
    pub b: Tensor,
}

/// The index of each layer in the op's arrays.
const GATE: usize = 0;
const UP: usize = 1;
const DOWN: usize = 2;

/// The forward pass's values that the backward reads.
struct Saved {
    gate: Vec<f32>,
    up: Vec<f32>,
    /// `silu(gate) · up`, the down layer's input.
    product: Vec<f32>,
    /// Each layer's `h = input·A_effᵀ` (`rows x r`).
    hidden: [Vec<f32>; 3],
}

/// The op: arguments `(x, packed factors)`, state the three frozen bases.
struct SiluMlp {
    bases: [Base; 3],
    ranks: [usize; 3],
    saved: OnceLock<Saved>,
}

impl SiluMlp {
    /// The `(A_eff, B_eff)` values of each layer within the packed vector.
    fn factors<'p>(&self, packed: &'p [f32]) -> Result<[(&'p [f32], &'p [f32]); 3]> {
        let mut rest = packed;
        let mut take = |len: usize| -> Result<&'p [f32]> {
            if rest.len() < len {
                candle::bail!("{}: the packed factors are too short", self.name());
            }
            let (head, tail) = rest.split_at(len);
            rest = tail;
            Ok(head)
        };
        let mut out = [(&[][..], &[][..]); 3];
        for (i, slot) in out.iter_mut().enumerate() {
            let (n, k) = self.bases[i].dims2()?;
            *slot = (take(self.ranks[i] * k)?, take(n * self.ranks[i])?);
        }
        if !rest.is_empty() {
            candle::bail!("{}: the packed factors are too long", self.name());
        }
        Ok(out)
    }

    /// Layer `i`'s output for `m` rows of `x`, and its `h`.
    fn layer(
        &self,
        i: usize,
        x: &[f32],
        m: usize,
        (a, b): (&[f32], &[f32]),
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let ((n, k), r) = (self.bases[i].dims2()?, self.ranks[i]);
        let mut y = self.bases[i].forward(x, (m, n, k))?;
        let h = hidden(x, a, (m, r, k))?;
        add_x_wt(&mut y, &h, b, (m, n, r), true)?;
        Ok((y, h))
    }

    /// From layer `i`'s output gradient `g`, its input gradient into
    /// `dx` (added when `accumulate`) and its factors' `(dA_eff, dB_eff)`.
    #[allow(clippy::too_many_arguments)]
    fn layer_grads(
        &self,
        i: usize,
        g: &[f32],
        (x, h): (&[f32], &[f32]),
        (a, b): (&[f32], &[f32]),
        dx: &mut [f32],
        accumulate: bool,
        m: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let ((n, k), r) = (self.bases[i].dims2()?, self.ranks[i]);
        // SAFETY (each written_by): a gemm that does not accumulate writes
        // all of its output.
        let dh = unsafe { written_by(m * r, |dh| add_g_w(dh, g, n, b, (m, r, n), false))? };
        self.bases[i].add_input_grad(dx, g, (m, n, k), accumulate)?;
        add_g_w(dx, &dh, r, a, (m, k, r), true)?;
        let da = unsafe { written_by(r * k, |da| gt_x(da, &dh, x, (r, k, m)))? };
        let db = unsafe { written_by(n * r, |db| gt_x(db, g, h, (n, r, m)))? };
        Ok((da, db))
    }

    /// `(dX, packed factor gradients)` from the output gradient `g`.
    fn grads(&self, x: &[f32], packed: &[f32], g: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let Some(s) = self.saved.get() else {
            candle::bail!("{}: backward before forward", self.name());
        };
        let f = self.factors(packed)?;
        let (k, wide) = (self.bases[GATE].dims2()?.1, s.gate.len());
        let m = x.len() / k.max(1);
        // SAFETY (each written_by): a layer's input gradient that does not
        // accumulate writes all of its buffer, and silu_mul_grad_into writes
        // all of both of its outputs.
        let mut down = None;
        let d_product = unsafe {
            written_by(wide, |dp| {
                let input = (&s.product[..], &s.hidden[DOWN][..]);
                down = Some(self.layer_grads(DOWN, g, input, f[DOWN], dp, false, m)?);
                Ok(())
            })?
        };
        let mut d_up = Vec::new();
        let d_gate = unsafe {
            written_by(wide, |dg| {
                d_up = written_by(wide, |du| {
                    silu_mul_grad_into(&d_product, &s.gate, &s.up, dg, du);
                    Ok(())
                })?;
                Ok(())
            })?
        };
        drop(d_product);
        let (mut gate, mut up) = (None, None);
        let dx = unsafe {
            written_by(x.len(), |dx| {
                let input = (x, &s.hidden[GATE][..]);
                gate = Some(self.layer_grads(GATE, &d_gate, input, f[GATE], dx, false, m)?);
                let input = (x, &s.hidden[UP][..]);
                up = Some(self.layer_grads(UP, &d_up, input, f[UP], dx, true, m)?);
                Ok(())
            })?
        };
        let missing = || candle::Error::msg("silu mlp: a layer's gradients were not computed");
        let ((da_gate, db_gate), (da_up, db_up), (da_down, db_down)) = (
            gate.ok_or_else(missing)?,
            up.ok_or_else(missing)?,
            down.ok_or_else(missing)?,
        );
        let packed_grad = [da_gate, db_gate, da_up, db_up, da_down, db_down].concat();
        Ok((dx, packed_grad))
    }
}

impl CustomOp2 for SiluMlp {
    fn name(&self) -> &'static str {
        "lora-mini-silu-mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, width) = f32_rows(s1, l1, self.name())?;
        let (packed, _) = f32_rows(s2, l2, self.name())?;
        let f = self.factors(packed)?;
        let m = x.len() / width;
        let (gate, h_gate) = self.layer(GATE, x, m, f[GATE])?;
        let (up, h_up) = self.layer(UP, x, m, f[UP])?;
        // SAFETY: silu_mul_into writes every value of its output.
        let product = unsafe {
            written_by(gate.len(), |out| {
                silu_mul_into(&gate, &up, out);
                Ok(())
            })?
        };
        let (y, h_down) = self.layer(DOWN, &product, m, f[DOWN])?;
        let saved = Saved {
            gate,
            up,
            product,
            hidden: [h_gate, h_up, h_down],
        };
        // A second forward of the same op (none is made) would save the
        // same values.
        let _ = self.saved.set(saved);
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = self.bases[DOWN].dims2()?.0;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dp) = with_cpu_f32(&grad, "gradient", |g| {
            with_cpu_f32(x, "input", |xv| {
                with_cpu_f32(packed, "packed factors", |pv| self.grads(xv, pv, g))
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            Some(Tensor::from_vec(dp, packed.dims(), dev)?),
        ))
    }
}

/// `down(silu(gate(x)) · up(x))` for three frozen layers with low-rank
/// updates, in training (the op keeps the activations its backward
/// needs); `None` where the fused op does not apply (other devices or
/// dtypes, a base the low-rank kernels do not take, few rows on a
/// quantized base, shapes that do not chain), for the caller to compose.
pub(crate) fn low_rank_silu_mlp(x: &Tensor, layers: [MlpLayer; 3]) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !f32_cpu(x) || !layers.iter().all(|l| f32_cpu(&l.a) && f32_cpu(&l.b)) {
        return Ok(None);
    }
    let (Some(g), Some(u), Some(d)) = (
        Base::frozen(layers[GATE].frozen),
        Base::frozen(layers[UP].frozen),
        Base::frozen(layers[DOWN].frozen),
    ) else {
        return Ok(None);
    };
    let bases = [g, u, d];
    let Some(ranks) = chained_ranks(x, &bases, &layers)? else {
        return Ok(None);
    };
    let mut parts = Vec::with_capacity(6);
    for l in &layers {
        parts.push(l.a.flatten_all()?);
        parts.push(l.b.flatten_all()?);
    }
    let packed = Tensor::cat(&parts, 0)?;
    let op = SiluMlp {
        bases,
        ranks,
        saved: OnceLock::new(),
    };
    Ok(Some(x.contiguous()?.apply_op2(&packed, op)?))
}

/// Each layer's rank when the shapes chain (`x`'s width into gate and up,
/// their width into down, factors that fit their bases) and a quantized
/// base has enough rows for its banded gemm; `None` otherwise.
fn chained_ranks(
    x: &Tensor,
    bases: &[Base; 3],
    layers: &[MlpLayer; 3],
) -> Result<Option<[usize; 3]>> {
    let width = x.dims().last().copied().unwrap_or(0);
    let rows = x.elem_count() / width.max(1);
    let [(gi, gk), (ui, uk), (dn, dk)] = [bases[0].dims2()?, bases[1].dims2()?, bases[2].dims2()?];
    if !(gk == width && uk == width && gi == ui && dk == gi && dn > 0) {
        return Ok(None);
    }
    let quantized = |b: &Base| matches!(b, Base::Quantized(_));
    if rows < GEMM_MIN_ROWS && bases.iter().any(quantized) {
        return Ok(None);
    }
    let mut ranks = [0; 3];
    for (i, l) in layers.iter().enumerate() {
        let ((n, k), (r, ka), (nb, rb)) = (bases[i].dims2()?, l.a.dims2()?, l.b.dims2()?);
        if ka != k || nb != n || rb != r || r == 0 {
            return Ok(None);
        }
        ranks[i] = r;
    }
    Ok(Some(ranks))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::kernels::low_rank::low_rank_linear;
    use candle::quantized::{GgmlDType, QTensor};
    use candle::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The composed MLP: each layer through the one-layer fused op, and
    /// SiLU from Candle's elementwise ops.
    fn composed(x: &Tensor, layers: &[MlpLayer; 3]) -> Result<Tensor> {
        let layer = |x: &Tensor, l: &MlpLayer| -> Result<Tensor> {
            Ok(low_rank_linear(x, l.frozen, &l.a, &l.b)?.expect("a frozen f32 base"))
        };
        let gate = layer(x, &layers[GATE])?;
        let sigmoid = (gate.neg()?.exp()? + 1.0)?.recip()?;
        let product = ((gate * sigmoid)? * layer(x, &layers[UP])?)?;
        layer(&product, &layers[DOWN])
    }

    /// The fused MLP against its composition, on dense bases (one with a
    /// bias) and on Q4_1 ones: values, and the gradients of the input and
    /// of all six factors (each non-zero).
    #[test]
    fn silu_mlp_matches_its_composition() -> Result<()> {
        let dev = Device::Cpu;
        let (h, i, ranks) = (64, 96, [4, 3, 5]);
        let weight = |n: usize, k: usize| Tensor::randn(0f32, 0.2, (n, k), &dev);
        let (wg, wu, wd) = (weight(i, h)?, weight(i, h)?, weight(h, i)?);
        let bias = Tensor::randn(0f32, 0.2, i, &dev)?;
        let quantized = |w: &Tensor| -> Result<Arc<QTensor>> {
            Ok(Arc::new(QTensor::quantize(w, GgmlDType::Q4_1)?))
        };
        let (qg, qu, qd) = (quantized(&wg)?, quantized(&wu)?, quantized(&wd)?);
        let var = |shape: (usize, usize)| Var::from_tensor(&Tensor::randn(0f32, 0.5, shape, &dev)?);
        let shapes = [(i, h), (i, h), (h, i)];
        let mut factors = Vec::new();
        for (r, (n, k)) in ranks.into_iter().zip(shapes) {
            factors.push((var((r, k))?, var((n, r))?));
        }
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 40, h), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 40, h), &dev)?;
        let cases = [
            [
                FrozenWeight::Dense(&wg, Some(&bias)),
                FrozenWeight::Dense(&wu, None),
                FrozenWeight::Dense(&wd, None),
            ],
            [
                FrozenWeight::Quantized(&qg),
                FrozenWeight::Quantized(&qu),
                FrozenWeight::Quantized(&qd),
            ],
        ];
        for frozen in cases {
            let layers = || -> [MlpLayer; 3] {
                std::array::from_fn(|j| MlpLayer {
                    frozen: frozen[j],
                    a: factors[j].0.as_tensor().clone(),
                    b: factors[j].1.as_tensor().clone(),
                })
            };
            let fused = low_rank_silu_mlp(&x, layers())?.expect("a frozen f32 base");
            let reference = composed(&x, &layers())?;
            assert!(max_diff(&fused, &reference)? < 1e-4);
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gc = (reference * &probe)?.sum_all()?.backward()?;
            let vars = factors.iter().flat_map(|(a, b)| [a, b]);
            for v in std::iter::once(&x).chain(vars) {
                let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(max_diff(f, c)? < 1e-3, "{:?}", v.dims());
                assert!(c.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
            }
        }
        Ok(())
    }

    /// Shapes that do not chain, and few rows on a quantized base, are
    /// left to the composed path.
    #[test]
    fn silu_mlp_declines_what_it_cannot_fuse() -> Result<()> {
        let dev = Device::Cpu;
        let (h, i, r) = (64, 96, 4);
        let w = |n: usize, k: usize| Tensor::randn(0f32, 0.2, (n, k), &dev);
        let (wg, wu, wd, wrong) = (w(i, h)?, w(i, h)?, w(h, i)?, w(h, h)?);
        let q = Arc::new(QTensor::quantize(&wd, GgmlDType::Q4_1)?);
        let layer = |frozen, n: usize, k: usize| -> Result<MlpLayer> {
            Ok(MlpLayer {
                frozen,
                a: Tensor::randn(0f32, 0.5, (r, k), &dev)?,
                b: Tensor::randn(0f32, 0.5, (n, r), &dev)?,
            })
        };
        let x = Tensor::randn(0f32, 1.0, (2, 40, h), &dev)?;
        let unchained = [
            layer(FrozenWeight::Dense(&wg, None), i, h)?,
            layer(FrozenWeight::Dense(&wu, None), i, h)?,
            layer(FrozenWeight::Dense(&wrong, None), h, h)?,
        ];
        assert!(low_rank_silu_mlp(&x, unchained)?.is_none());
        let quantized = [
            layer(FrozenWeight::Dense(&wg, None), i, h)?,
            layer(FrozenWeight::Dense(&wu, None), i, h)?,
            layer(FrozenWeight::Quantized(&q), h, i)?,
        ];
        assert!(low_rank_silu_mlp(&x.narrow(1, 0, 1)?, quantized)?.is_none());
        Ok(())
    }
}
