//! Rotary position embeddings in the halves layout (Llama, Mistral, Qwen2),
//! fused with their backward.
//!
//! Composed (`rope_slow`), RoPE is seven Candle nodes (narrows, a negation,
//! a concatenation, two broadcast products and a sum), and their backward
//! pads every narrowed gradient with zeros and adds it up. Fused, the
//! forward is one pass over the queries or keys, and the backward is the
//! same rotation by the opposite angle, one more pass.

use candle::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::vectorized;
use super::{f32_rows, with_cpu_f32, written_by};

/// Rotates each row's pairs `(x[i], x[i + dim / 2])` by the angle whose
/// cosine and sine the tables hold: `(seq, dim / 2)`, shared by the batch,
/// or `(batch, seq, dim / 2)`, one per row. The input is `(batch, heads,
/// seq, dim)`, or `(batch, seq, heads, dim)` when `seq_first` (a
/// projection's own layout, before any transpose). `inverse` rotates by the
/// opposite angle, which is the backward.
pub(crate) struct Rope {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) inverse: bool,
    pub(crate) seq_first: bool,
}

/// Rows per parallel task: each task enters the wide-vector code once, and
/// a row (one head's 64 values) is too short to pay for that alone.
const ROWS_PER_TASK: usize = 64;

impl Rope {
    /// The table row for flat row `row` of the input, whose dimensions 1
    /// and 2 are `(d1, d2)`.
    fn table_row(&self, row: usize, (d1, d2): (usize, usize)) -> usize {
        let (seq, position) = if self.seq_first {
            (d1, (row / d2) % d1)
        } else {
            (d2, row % d2)
        };
        if self.cos.rank() == 3 {
            (row / (d1 * d2)) * seq + position
        } else {
            position
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "lora-mini-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dim) = f32_rows(storage, layout, self.name())?;
        let (_, d1, d2, _) = layout.shape().dims4()?;
        if dim % 2 != 0 {
            candle::bail!("{}: the head dimension {dim} is odd", self.name());
        }
        // SAFETY: the rows cover the output, and each row's two halves
        // (dim is even) are written whole.
        let out = unsafe { written_by(x.len(), |out| self.rotate(x, out, (d1, d2), dim)) }?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
            seq_first: self.seq_first,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

impl Rope {
    /// Rotates the `dim`-wide rows of `x` into `out`.
    pub(crate) fn rotate(
        &self,
        x: &[f32],
        out: &mut [f32],
        (d1, d2): (usize, usize),
        dim: usize,
    ) -> Result<()> {
        let half = dim / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        with_cpu_f32(&self.cos, "rope cos table", |cos| {
            with_cpu_f32(&self.sin, "rope sin table", |sin| {
                let chunk = dim.max(1) * ROWS_PER_TASK;
                out.par_chunks_mut(chunk)
                    .zip(x.par_chunks(chunk))
                    .enumerate()
                    .for_each(|(task, (y, x))| {
                        vectorized!({
                            let rows = y.chunks_exact_mut(dim).zip(x.chunks_exact(dim));
                            for (r, (y, x)) in rows.enumerate() {
                                let row = task * ROWS_PER_TASK + r;
                                let at = self.table_row(row, (d1, d2)) * half;
                                let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
                                let (x1, x2) = x.split_at(half);
                                let (y1, y2) = y.split_at_mut(half);
                                for i in 0..half {
                                    let s = sign * s[i];
                                    y1[i] = x1[i] * c[i] - x2[i] * s;
                                    y2[i] = x2[i] * c[i] + x1[i] * s;
                                }
                            }
                        })
                    });
                Ok(())
            })
        })
    }
}
