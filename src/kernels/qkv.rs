//! The query, key and value projections of a decoder's attention, each
//! with a low-rank update, and the rotary embedding of the queries and
//! keys, as one op writing one planar buffer `[q | k | v]` for
//! `attention::packed_grouped_attention`: how a Llama-family attention
//! block trains on the CPU.
//!
//! Composed, each projection is an op whose output goes through a reshape,
//! the rotation and another reshape before the attention core: Candle's
//! backward gives every one of those nodes a fresh zero gradient and adds
//! into it (nine tensors of a layer's queries, keys or values), and adds
//! the three projections' input gradients into one more. Here the
//! attention core hands back one gradient for all three, and the three
//! input gradients are written into one buffer.

use std::sync::OnceLock;

use candle::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::low_rank_block::{block_grads, BlockLayer, LowRankLayers};
use super::rope::Rope;
use super::{f32_rows, written_by};

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;

/// The op: arguments `(x, packed factors)`, state the three layers, the
/// rotation and the head geometry.
struct QkvRope {
    layers: LowRankLayers,
    rope: Rope,
    /// `(t, head_dim)`: the rotation's rows are the heads of each token.
    t: usize,
    d: usize,
    /// Each projection's `h = x·A_effᵀ` from the forward pass.
    hidden: OnceLock<[Vec<f32>; 3]>,
}

impl QkvRope {
    /// Rotates the `(rows, width)` values `x` into `out`, by the opposite
    /// angle when `inverse` (the backward).
    fn rotate(&self, x: &[f32], out: &mut [f32], width: usize, inverse: bool) -> Result<()> {
        let rope = Rope {
            cos: self.rope.cos.clone(),
            sin: self.rope.sin.clone(),
            inverse,
            seq_first: true,
        };
        rope.rotate(x, out, (self.t, width / self.d), self.d)
    }

    /// `(dX, packed factor gradients)` from the planar gradient `g`.
    fn grads(&self, x: &[f32], packed: &[f32], g: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let Some(h) = self.hidden.get() else {
            candle::bail!("{}: backward before forward", self.name());
        };
        let (f, l) = (self.layers.factors(packed)?, &self.layers);
        let width = l.dims2(Q)?.1;
        let m = x.len() / width.max(1);
        let (wq, wk) = (l.dims2(Q)?.0, l.dims2(K)?.0);
        let (nq, nk) = (m * wq, m * wk);
        let (gq, rest) = g.split_at(nq);
        let (gk, gv) = rest.split_at(nk);
        // SAFETY (each written_by): a rotation writes every value of its
        // output, and the first layer gradient into dx does not accumulate.
        let dq = unsafe { written_by(nq, |d| self.rotate(gq, d, wq, true))? };
        let dk = unsafe { written_by(nk, |d| self.rotate(gk, d, wk, true))? };
        let mut parts = Vec::with_capacity(6);
        let dx = unsafe {
            written_by(x.len(), |dx| {
                for (i, gi) in [(Q, &dq[..]), (K, &dk[..]), (V, gv)] {
                    let (da, db) = l.grads(i, gi, (x, &h[i]), f[i], (&mut *dx, i != Q))?;
                    parts.push(da);
                    parts.push(db);
                }
                Ok(())
            })?
        };
        Ok((dx, parts.concat()))
    }
}

impl CustomOp2 for QkvRope {
    fn name(&self) -> &'static str {
        "lora-mini-qkv-rope"
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
        let widths = [l.dims2(Q)?.0, l.dims2(K)?.0, l.dims2(V)?.0];
        let total = m * widths.iter().sum::<usize>();
        let mut hidden: [Vec<f32>; 3] = Default::default();
        // SAFETY: the three parts below cover the buffer: q and k are
        // rotated into theirs, v copied into its own.
        let out = unsafe {
            written_by(total, |out| {
                let (q_out, rest) = out.split_at_mut(m * widths[Q]);
                let (k_out, v_out) = rest.split_at_mut(m * widths[K]);
                for (i, part) in [(Q, q_out), (K, k_out), (V, v_out)] {
                    let (y, h) = l.forward(i, x, m, f[i])?;
                    match i {
                        V => part.copy_from_slice(&y),
                        _ => self.rotate(&y, part, widths[i], false)?,
                    }
                    hidden[i] = h;
                }
                Ok(())
            })?
        };
        // A second forward of the same op (none is made) would keep the
        // same values.
        let _ = self.hidden.set(hidden);
        Ok((CpuStorage::F32(out), Shape::from(total)))
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

/// The planar `[q | k | v]` of `x (batch, t, hidden)` through three
/// frozen layers with low-rank updates, q and k rotated by the
/// `(t, head_dim / 2)` or `(batch, t, head_dim / 2)` tables `cos` and
/// `sin`, for [`super::attention::packed_grouped_attention`]; in training
/// (the op keeps each `h` for its backward). `None` where the fused op does
/// not apply (other devices or dtypes, a base the low-rank kernels do not
/// take, few rows on a quantized base, widths that are not whole heads,
/// tables of another shape), for the caller to compose.
pub(crate) fn low_rank_qkv_rope(
    x: &Tensor,
    layers: [BlockLayer; 3],
    (cos, sin): (&Tensor, &Tensor),
    head_dim: usize,
) -> Result<Option<Tensor>> {
    let (b, t, width) = x.dims3()?;
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(f32_cpu(x) && f32_cpu(cos) && f32_cpu(sin)) || head_dim == 0 || !head_dim.is_multiple_of(2)
    {
        return Ok(None);
    }
    let half = head_dim / 2;
    let table_fits = |c: &Tensor| c.dims() == [t, half] || c.dims() == [b, t, half];
    if !(table_fits(cos) && cos.dims() == sin.dims()) {
        return Ok(None);
    }
    let Some((layers, packed)) = LowRankLayers::pack(&layers, b * t)? else {
        return Ok(None);
    };
    for i in [Q, K, V] {
        let (n, k) = layers.dims2(i)?;
        if k != width || n % head_dim != 0 {
            return Ok(None);
        }
    }
    let rope = Rope {
        cos: cos.contiguous()?.detach(),
        sin: sin.contiguous()?.detach(),
        inverse: false,
        seq_first: true,
    };
    let op = QkvRope {
        layers,
        rope,
        t,
        d: head_dim,
        hidden: OnceLock::new(),
    };
    Ok(Some(x.contiguous()?.apply_op2(&packed, op)?))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::kernels::attention::{grouped_attention, packed_grouped_attention};
    use crate::kernels::low_rank::{low_rank_linear, FrozenWeight};
    use crate::kernels::rel_diff;
    use crate::nn::rotary_emb::rope_seq_first;
    use candle::quantized::{GgmlDType, QTensor};
    use candle::{Device, Var};

    /// The fused projections and packed core against each projection
    /// through the one-layer op, the rotation op and the three-argument
    /// core, on dense bases (one with a bias) and on Q4_1 ones, with
    /// grouped-query heads and a causal mask: values, and the gradients of
    /// the input and of all six factors (each non-zero).
    #[test]
    fn qkv_block_matches_its_composition() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, hidden, heads, kv_heads, d) = (2, 40, 64, 4, 2, 16);
        let widths = [heads * d, kv_heads * d, kv_heads * d];
        let weights: Vec<Tensor> = widths
            .iter()
            .map(|&n| Tensor::randn(0f32, 0.2, (n, hidden), &dev))
            .collect::<Result<_>>()?;
        let bias = Tensor::randn(0f32, 0.2, widths[0], &dev)?;
        let quantized: Vec<Arc<QTensor>> = weights
            .iter()
            .map(|w| Ok(Arc::new(QTensor::quantize(w, GgmlDType::Q4_1)?)))
            .collect::<Result<_>>()?;
        let var = |shape: (usize, usize)| Var::from_tensor(&Tensor::randn(0f32, 0.5, shape, &dev)?);
        let factors: Vec<(Var, Var)> = [3, 4, 2]
            .iter()
            .zip(widths)
            .map(|(&r, n)| Ok((var((r, hidden))?, var((n, r))?)))
            .collect::<Result<_>>()?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, hidden), &dev)?)?;
        let angles = Tensor::arange(0f32, (t * d / 2) as f32, &dev)?.reshape((t, d / 2))?;
        let (cos, sin) = ((&angles * 0.01)?.cos()?, (&angles * 0.01)?.sin()?);
        let causal: Vec<f32> = (0..t * t)
            .map(|i| if i % t > i / t { -1e9 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(causal, (1, 1, t, t), &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (b, t, heads * d), &dev)?;
        let dense = [
            FrozenWeight::Dense(&weights[0], Some(&bias)),
            FrozenWeight::Dense(&weights[1], None),
            FrozenWeight::Dense(&weights[2], None),
        ];
        let quant = [0, 1, 2].map(|i| FrozenWeight::Quantized(&quantized[i]));
        for frozen in [dense, quant] {
            let layers = || -> [BlockLayer; 3] {
                std::array::from_fn(|i| BlockLayer {
                    frozen: frozen[i],
                    a: factors[i].0.as_tensor().clone(),
                    b: factors[i].1.as_tensor().clone(),
                })
            };
            let qkv = low_rank_qkv_rope(&x, layers(), (&cos, &sin), d)?.expect("fusable");
            let fused = packed_grouped_attention(&qkv, &mask, (b, t), (heads, kv_heads, d))?;
            let projection = |i: usize| -> Result<Tensor> {
                let l = &layers()[i];
                Ok(low_rank_linear(&x, l.frozen, &l.a, &l.b)?.expect("fusable"))
            };
            let rotated = |y: Tensor, n: usize| -> Result<Tensor> {
                rope_seq_first(&y.reshape((b, t, n, d))?, &cos, &sin)?.reshape((b, t, n * d))
            };
            let (q, k) = (
                rotated(projection(0)?, heads)?,
                rotated(projection(1)?, kv_heads)?,
            );
            let reference = grouped_attention(&q, &k, &projection(2)?, &mask, heads, kv_heads)?
                .expect("fusable");
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
}
