//! The attention core of BERT and RoBERTa, `softmax(q·kᵀ/√d + mask)·v`
//! with dropout on the probabilities, as one fused CPU op with a backward.
//!
//! Built from Candle ops, the core transposes q, k and v into heads, keeps
//! the scores, the masked scores, the probabilities, the dropped
//! probabilities and the dropout mask of every layer alive until the
//! backward (five `batch·heads·t²` tensors a layer, 25 MB each at
//! 32 × 128 tokens and 12 heads), and makes a pass over them for each op.
//! The fused op reads q, k and v in place from the `(batch, t, hidden)`
//! projections, works one (sequence, head) pair at a time in cache-sized
//! buffers, keeps only the dropout mask as bytes, and recomputes the
//! probabilities in the backward from q and k: the recomputation costs one
//! `t × t × d` gemm per pair, a tenth of a layer's projection work.
//!
//! It runs for contiguous f32 CPU tensors; elsewhere (CUDA, Metal, other
//! dtypes) [`attention`] composes the same computation from Candle ops.

use candle::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::dropout::SeededDropout;
use crate::kernels::f32_rows;
use crate::kernels::fused::{softmax_in_place, vectorized};
use crate::kernels::with_cpu_f32;

/// The dropout mask of one call on the attention probabilities: one byte
/// per `(sequence, head, query, key)`, 1 where the probability is kept, and
/// the scale kept probabilities are multiplied by.
pub(crate) struct ProbsDropout {
    keep: Vec<u8>,
    scale: f32,
}

impl ProbsDropout {
    /// Draws the next mask of `dropout` for `batch · heads · t²`
    /// probabilities, or `None` when dropout is off (eval, or `p = 0`).
    pub(crate) fn draw(
        dropout: &SeededDropout,
        train: bool,
        batch: usize,
        heads: usize,
        t: usize,
    ) -> Option<Self> {
        (train && dropout.p() > 0.0).then(|| Self {
            keep: dropout.next_mask(batch * heads * t * t, 1u8, 0u8),
            scale: dropout.keep_scale(),
        })
    }
}

/// The attention context `softmax(q·kᵀ/√d + mask)·v` for `q`, `k`, `v` of
/// shape `(batch, t, heads · d)`, an additive `mask` of shape
/// `(batch, 1, 1, t)` and optional dropout on the probabilities; returns
/// `(batch, t, heads · d)`, the heads side by side as BERT concatenates
/// them.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
    dropout: Option<ProbsDropout>,
) -> Result<Tensor> {
    let (b, t, hidden) = q.dims3()?;
    let fusable = |x: &Tensor| x.device().is_cpu() && x.dtype() == DType::F32;
    if fusable(q) && fusable(k) && fusable(v) && fusable(mask) {
        let op = AttentionCore {
            heads,
            mask: mask.flatten_all()?.to_vec1::<f32>()?,
            dropout,
        };
        if op.mask.len() != b * t {
            candle::bail!(
                "attention: the mask has {} entries, not {}",
                op.mask.len(),
                b * t
            );
        }
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    composed(q, k, v, mask, heads, dropout.as_ref(), (b, t, hidden))
}

/// [`attention`] from Candle ops (any device and dtype).
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
    dropout: Option<&ProbsDropout>,
    (b, t, hidden): (usize, usize, usize),
) -> Result<Tensor> {
    let d = hidden / heads;
    let split = |x: &Tensor| -> Result<Tensor> {
        x.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(mask)?;
    let mut probs = crate::kernels::composed::composed_softmax_last_dim(&scores)?;
    if let Some(drop) = dropout {
        let factors: Vec<f32> = drop
            .keep
            .iter()
            .map(|&k| if k == 1 { drop.scale } else { 0.0 })
            .collect();
        let factors = Tensor::from_vec(factors, probs.shape(), probs.device())?;
        probs = probs.mul(&factors.to_dtype(probs.dtype())?)?;
    }
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, hidden))
}

/// The op: arguments q, k, v; state the head count, the `(batch, t)`
/// additive key mask and the probabilities' dropout mask.
struct AttentionCore {
    heads: usize,
    mask: Vec<f32>,
    dropout: Option<ProbsDropout>,
}

/// A pointer the parallel (sequence, head) tasks write through: each task
/// writes only its own head's columns of its own sequence's rows.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint elements (see above) and the buffer outlives
// the parallel loop.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// Operand geometry shared by the forward and the backward.
#[derive(Clone, Copy)]
struct Geometry {
    batch: usize,
    t: usize,
    heads: usize,
    d: usize,
}

impl Geometry {
    fn hidden(&self) -> usize {
        self.heads * self.d
    }
    /// Offset of head `h` of sequence `s` in a `(batch, t, hidden)` buffer.
    fn base(&self, s: usize, h: usize) -> usize {
        s * self.t * self.hidden() + h * self.d
    }
    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// `dst (m × n) = alpha·dst + beta·lhs·rhs`, each operand given by its
/// pointer, column stride and row stride, on the calling thread.
///
/// SAFETY: the caller guarantees each pointer covers the elements its
/// strides reach and that `dst` does not alias the operands.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    alpha: f32,
    beta: f32,
) {
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
        gemm::Parallelism::None,
    )
}

impl AttentionCore {
    fn geometry(&self, layout: &Layout) -> Result<Geometry> {
        let (batch, t, hidden) = layout.shape().dims3()?;
        if self.heads == 0 || hidden % self.heads != 0 {
            candle::bail!(
                "attention: hidden {hidden} is not a multiple of {} heads",
                self.heads
            );
        }
        Ok(Geometry {
            batch,
            t,
            heads: self.heads,
            d: hidden / self.heads,
        })
    }

    /// Writes the probabilities of head `h` of sequence `s` (before
    /// dropout) into `probs` (`t × t`, row-major).
    fn probabilities(
        &self,
        g: Geometry,
        s: usize,
        h: usize,
        q: &[f32],
        k: &[f32],
        probs: &mut [f32],
    ) {
        let (t, row) = (g.t, g.hidden() as isize);
        let base = g.base(s, h);
        // SAFETY: q and k hold batch·t·hidden values; head h of sequence s
        // spans t rows of stride `hidden` and d columns from `base`. kᵀ's
        // element (i, j) is k[j][i]: row stride 1, column stride `hidden`.
        unsafe {
            gemm_strided(
                (t, t, g.d),
                (probs.as_mut_ptr(), 1, t as isize),
                (q.as_ptr().add(base), 1, row),
                (k.as_ptr().add(base), row, 1),
                0.0,
                g.scale(),
            );
        }
        let mask = &self.mask[s * t..(s + 1) * t];
        for r in probs.chunks_exact_mut(t) {
            for (x, &m) in r.iter_mut().zip(mask) {
                *x += m;
            }
            softmax_in_place(r);
        }
    }

    /// Multiplies `probs` of head `h` of sequence `s` by its dropout factors.
    fn apply_dropout(&self, g: Geometry, s: usize, h: usize, probs: &mut [f32]) {
        if let Some(drop) = &self.dropout {
            let start = (s * g.heads + h) * g.t * g.t;
            let keep = &drop.keep[start..start + g.t * g.t];
            for (p, &k) in probs.iter_mut().zip(keep) {
                *p = if k == 1 { *p * drop.scale } else { 0.0 };
            }
        }
    }
}

impl CustomOp3 for AttentionCore {
    fn name(&self) -> &'static str {
        "lora-mini-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(l1)?;
        let shape = l1.shape();
        if l2.shape() != shape || l3.shape() != shape {
            candle::bail!("attention: q, k and v shapes differ");
        }
        let (q, _) = f32_rows(s1, l1, self.name())?;
        let (k, _) = f32_rows(s2, l2, self.name())?;
        let (v, _) = f32_rows(s3, l3, self.name())?;
        let mut out = vec![0f32; q.len()];
        let out_ptr = SharedOut(out.as_mut_ptr());
        let row = g.hidden() as isize;
        (0..g.batch * g.heads).into_par_iter().for_each(|task| {
            vectorized(|| {
                let (s, h) = (task / g.heads, task % g.heads);
                let mut probs = vec![0f32; g.t * g.t];
                self.probabilities(g, s, h, q, k, &mut probs);
                self.apply_dropout(g, s, h, &mut probs);
                let base = g.base(s, h);
                let out = out_ptr;
                // SAFETY: this task writes only head h's d columns of sequence
                // s's t rows; probs is t × t, v's head spans t rows of stride
                // `hidden`.
                unsafe {
                    gemm_strided(
                        (g.t, g.d, g.t),
                        (out.0.add(base), 1, row),
                        (probs.as_ptr(), 1, g.t as isize),
                        (v.as_ptr().add(base), 1, row),
                        0.0,
                        1.0,
                    );
                }
            })
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, t, hidden) = q.dims3()?;
        let g = Geometry {
            batch,
            t,
            heads: self.heads,
            d: hidden / self.heads,
        };
        let grad = grad.contiguous()?;
        let n = q.elem_count();
        let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let (dq_ptr, dk_ptr, dv_ptr) = (
            SharedOut(dq.as_mut_ptr()),
            SharedOut(dk.as_mut_ptr()),
            SharedOut(dv.as_mut_ptr()),
        );
        let row = hidden as isize;
        let tt = t as isize;
        with_cpu_f32(q, "q", |q| {
            with_cpu_f32(k, "k", |k| {
                with_cpu_f32(v, "v", |v| {
                    with_cpu_f32(&grad, "gradient", |go| {
                        (0..batch * self.heads).into_par_iter().for_each(|task| {
                            vectorized(|| {
                                let (s, h) = (task / g.heads, task % g.heads);
                                let base = g.base(s, h);
                                let (dq, dk, dv) = (dq_ptr, dk_ptr, dv_ptr);
                                let mut probs = vec![0f32; t * t];
                                self.probabilities(g, s, h, q, k, &mut probs);
                                // The dropped probabilities need a copy only
                                // when dropout is on.
                                let dropped = match self.dropout {
                                    Some(_) => {
                                        let mut d = probs.clone();
                                        self.apply_dropout(g, s, h, &mut d);
                                        std::borrow::Cow::Owned(d)
                                    }
                                    None => std::borrow::Cow::Borrowed(&probs[..]),
                                };
                                let mut dprobs = vec![0f32; t * t];
                                // SAFETY (all four gemms): every head operand
                                // spans t rows of stride `hidden` and d columns
                                // from `base`; t × t buffers are row-major; the
                                // task writes only its own head's columns of
                                // dq, dk and dv.
                                unsafe {
                                    // dv = dropped_probsᵀ · dout
                                    gemm_strided(
                                        (t, g.d, t),
                                        (dv.0.add(base), 1, row),
                                        (dropped.as_ptr(), tt, 1),
                                        (go.as_ptr().add(base), 1, row),
                                        0.0,
                                        1.0,
                                    );
                                    // d(dropped_probs) = dout · vᵀ
                                    gemm_strided(
                                        (t, t, g.d),
                                        (dprobs.as_mut_ptr(), 1, tt),
                                        (go.as_ptr().add(base), 1, row),
                                        (v.as_ptr().add(base), row, 1),
                                        0.0,
                                        1.0,
                                    );
                                }
                                // Through dropout, then the softmax:
                                // dscores = p ∘ (dp − Σ dp ∘ p), times the scale.
                                self.apply_dropout(g, s, h, &mut dprobs);
                                let scale = g.scale();
                                for (dp, p) in dprobs.chunks_exact_mut(t).zip(probs.chunks_exact(t))
                                {
                                    let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
                                    for (x, &p) in dp.iter_mut().zip(p) {
                                        *x = p * (*x - dot) * scale;
                                    }
                                }
                                unsafe {
                                    // dq = dscores · k
                                    gemm_strided(
                                        (t, g.d, t),
                                        (dq.0.add(base), 1, row),
                                        (dprobs.as_ptr(), 1, tt),
                                        (k.as_ptr().add(base), 1, row),
                                        0.0,
                                        1.0,
                                    );
                                    // dk = dscoresᵀ · q
                                    gemm_strided(
                                        (t, g.d, t),
                                        (dk.0.add(base), 1, row),
                                        (dprobs.as_ptr(), tt, 1),
                                        (q.as_ptr().add(base), 1, row),
                                        0.0,
                                        1.0,
                                    );
                                }
                            })
                        });
                        Ok(())
                    })
                })
            })
        })?;
        let shape = q.shape();
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, shape, dev)?),
            Some(Tensor::from_vec(dk, shape, dev)?),
            Some(Tensor::from_vec(dv, shape, dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    /// BERT's `(B, T)` 0/1 mask in additive `(B, 1, 1, T)` form.
    fn additive_mask(keep: &Tensor) -> Result<Tensor> {
        let (b, t) = keep.dims2()?;
        ((keep - 1.0)? * -(f32::MIN as f64))?.reshape((b, 1, 1, t))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The fused op against the composed ops, with padding in the mask and
    /// dropout on, in values and in the gradients of q, k and v.
    #[test]
    fn fused_matches_composed_in_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, heads, d) = (3, 7, 4, 5);
        let var = |seed: f32| -> Result<Var> {
            let n = b * t * heads * d;
            let values: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.37 + seed).sin() * 1.3)
                .collect();
            Var::from_tensor(&Tensor::from_vec(values, (b, t, heads * d), &dev)?)
        };
        let (q, k, v) = (var(0.1)?, var(1.7)?, var(2.9)?);
        // Sequence 1 has two padded keys, sequence 2 one.
        let keep = Tensor::new(
            &[
                [1f32, 1., 1., 1., 1., 1., 1.],
                [1., 1., 1., 1., 1., 0., 0.],
                [1., 1., 1., 1., 1., 1., 0.],
            ],
            &dev,
        )?;
        let mask = additive_mask(&keep)?;
        let probe = var(4.2)?.as_tensor().clone();
        for p in [0.0, 0.3] {
            let drop = |dropout: &SeededDropout| ProbsDropout::draw(dropout, true, b, heads, t);
            let fused = attention(
                &q,
                &k,
                &v,
                &mask,
                heads,
                drop(&SeededDropout::new(p, 5, "a")),
            )?;
            let reference = composed(
                &q,
                &k,
                &v,
                &mask,
                heads,
                drop(&SeededDropout::new(p, 5, "a")).as_ref(),
                (b, t, heads * d),
            )?;
            assert!(max_diff(&fused, &reference)? < 1e-5, "p = {p}");
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gr = (reference * &probe)?.sum_all()?.backward()?;
            for x in [&q, &k, &v] {
                let (a, b) = (gf.get(x).unwrap(), gr.get(x).unwrap());
                assert!(max_diff(a, b)? < 1e-5, "p = {p}: {}", max_diff(a, b)?);
                assert!(a.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
            }
        }
        Ok(())
    }

    #[test]
    fn padded_keys_get_no_attention() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::ones((1, 3, 4), DType::F32, &dev)?;
        let k = q.clone();
        // Value rows 0..2 are 1, row 2 (padding) is 100.
        let v = Tensor::new(&[[[1f32; 4], [1.; 4], [100.; 4]]], &dev)?;
        let mask = additive_mask(&Tensor::new(&[[1f32, 1., 0.]], &dev)?)?;
        let out = attention(&q, &k, &v, &mask, 2, None)?;
        assert!(max_diff(&out, &Tensor::ones((1, 3, 4), DType::F32, &dev)?)? < 1e-6);
        Ok(())
    }
}
