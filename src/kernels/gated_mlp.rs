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

use candle::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::gated::{silu_mul_grad_into, silu_mul_into};
use super::low_rank_block::{block_grads, BlockLayer, LowRankLayers};
use super::{f32_rows, written_by};

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

/// The op: arguments `(x, packed factors)`, state the three layers.
struct SiluMlp {
    layers: LowRankLayers,
    saved: OnceLock<Saved>,
}

impl SiluMlp {
    /// `(dX, packed factor gradients)` from the output gradient `g`.
    fn grads(&self, x: &[f32], packed: &[f32], g: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let Some(s) = self.saved.get() else {
            candle::bail!("{}: backward before forward", self.name());
        };
        let (f, l) = (self.layers.factors(packed)?, &self.layers);
        let wide = s.gate.len();
        // SAFETY (each written_by): a layer's input gradient that does not
        // accumulate writes all of its buffer, and silu_mul_grad_into writes
        // all of both of its outputs.
        let mut down = None;
        let d_product = unsafe {
            written_by(wide, |dp| {
                let input = (&s.product[..], &s.hidden[DOWN][..]);
                down = Some(l.grads(DOWN, g, input, f[DOWN], (dp, false))?);
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
                gate = Some(l.grads(GATE, &d_gate, input, f[GATE], (&mut *dx, false))?);
                let input = (x, &s.hidden[UP][..]);
                up = Some(l.grads(UP, &d_up, input, f[UP], (dx, true))?);
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
        let (f, l) = (self.layers.factors(packed)?, &self.layers);
        let m = x.len() / width;
        let (gate, h_gate) = l.forward(GATE, x, m, f[GATE])?;
        let (up, h_up) = l.forward(UP, x, m, f[UP])?;
        // SAFETY: silu_mul_into writes every value of its output.
        let product = unsafe {
            written_by(gate.len(), |out| {
                silu_mul_into(&gate, &up, out);
                Ok(())
            })?
        };
        let (y, h_down) = l.forward(DOWN, &product, m, f[DOWN])?;
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
        *dims.last_mut().expect("rank >= 1") = l.dims2(DOWN)?.0;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        block_grads(x, packed, grad, |x, packed, g| self.grads(x, packed, g))
    }
}

/// `down(silu(gate(x)) · up(x))` for three frozen layers with low-rank
/// updates, in training (the op keeps the activations its backward
/// needs); `None` where the fused op does not apply (other devices or
/// dtypes, a base the low-rank kernels do not take, few rows on a
/// quantized base, shapes that do not chain), for the caller to compose.
pub(crate) fn low_rank_silu_mlp(x: &Tensor, layers: [BlockLayer; 3]) -> Result<Option<Tensor>> {
    let width = x.dims().last().copied().unwrap_or(0);
    let rows = x.elem_count() / width.max(1);
    let Some((layers, packed)) = LowRankLayers::pack(&layers, rows)? else {
        return Ok(None);
    };
    let [(gi, gk), (ui, uk), (dn, dk)] =
        [layers.dims2(GATE)?, layers.dims2(UP)?, layers.dims2(DOWN)?];
    let f32_cpu = x.device().is_cpu() && x.dtype() == candle::DType::F32;
    if !(f32_cpu && gk == width && uk == width && gi == ui && dk == gi && dn > 0) {
        return Ok(None);
    }
    let op = SiluMlp {
        layers,
        saved: OnceLock::new(),
    };
    Ok(Some(x.contiguous()?.apply_op2(&packed, op)?))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::kernels::low_rank::{low_rank_linear, FrozenWeight};
    use crate::kernels::rel_diff;
    use candle::quantized::{GgmlDType, QTensor};
    use candle::{Device, Var};

    /// The composed MLP: each layer through the one-layer fused op, and
    /// SiLU from Candle's elementwise ops.
    fn composed(x: &Tensor, layers: &[BlockLayer; 3]) -> Result<Tensor> {
        let layer = |x: &Tensor, l: &BlockLayer| -> Result<Tensor> {
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
            let layers = || -> [BlockLayer; 3] {
                std::array::from_fn(|j| BlockLayer {
                    frozen: frozen[j],
                    a: factors[j].0.as_tensor().clone(),
                    b: factors[j].1.as_tensor().clone(),
                })
            };
            let fused = low_rank_silu_mlp(&x, layers())?.expect("a frozen f32 base");
            let reference = composed(&x, &layers())?;
            assert!(rel_diff(&fused, &reference)? < 1e-5);
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gc = (reference * &probe)?.sum_all()?.backward()?;
            let vars = factors.iter().flat_map(|(a, b)| [a, b]);
            for v in std::iter::once(&x).chain(vars) {
                let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(rel_diff(f, c)? < 1e-4, "{:?}", v.dims());
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
        let layer = |frozen, n: usize, k: usize| -> Result<BlockLayer> {
            Ok(BlockLayer {
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
