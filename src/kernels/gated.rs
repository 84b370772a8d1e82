//! The SiLU-gated product of a Llama-family MLP, `silu(gate) · up`, fused
//! with its backward.
//!
//! Composed, it is two Candle nodes; Candle's SiLU backward alone takes
//! eight elementwise passes (neg, exp, add, recip, ...), and every node's
//! gradient starts as a zero tensor it then adds into. On SmolLM2 these
//! tensors are the widest activations of a layer (`intermediate_size`
//! 1536). Fused, the forward is one pass, and the backward one pass that
//! writes both input gradients.

use candle::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{fast_exp, vectorized};
use super::{f32_rows, written_by};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `1 / (1 + e^-x)`, vectorisable (see [`fast_exp`]).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// `silu(gate) · up` for two tensors of one shape.
pub(crate) struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "lora-mini-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gate, _) = f32_rows(s1, l1, self.name())?;
        let (up, _) = f32_rows(s2, l2, self.name())?;
        if l1.shape() != l2.shape() {
            candle::bail!(
                "{}: gate {:?} and up {:?} differ in shape",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        // SAFETY: silu_mul_into writes every value of its output.
        let out = unsafe {
            written_by(gate.len(), |out| {
                silu_mul_into(gate, up, out);
                Ok(())
            })?
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = grad
            .contiguous()?
            .apply_op3_no_bwd(gate, up, &SiluMulGrad)?;
        // Rows 0 and 1 of the (2, n) result, as views: no copy.
        let d_gate = both.get(0)?.reshape(gate.shape())?;
        let d_up = both.get(1)?.reshape(up.shape())?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// From `(grad, gate, up)`, the `(2, n)` stack of `d gate` and `d up`
/// ([`silu_mul_grad_into`]).
struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "lora-mini-silu-mul-grad"
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
        let (grad, _) = f32_rows(s1, l1, self.name())?;
        let (gate, _) = f32_rows(s2, l2, self.name())?;
        let (up, _) = f32_rows(s3, l3, self.name())?;
        let n = grad.len();
        if gate.len() != n || up.len() != n {
            candle::bail!("{}: gradient and input sizes differ", self.name());
        }
        // SAFETY: silu_mul_grad_into writes every value of both halves.
        let out = unsafe {
            written_by(2 * n, |out| {
                let (d_gate, d_up) = out.split_at_mut(n);
                silu_mul_grad_into(grad, gate, up, d_gate, d_up);
                Ok(())
            })?
        };
        Ok((CpuStorage::F32(out), Shape::from((2, n))))
    }
}

/// `out = silu(gate) · up`, over slices of one length, in parallel chunks.
pub(crate) fn silu_mul_into(gate: &[f32], up: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(y, (g, u))| {
            vectorized!({
                for i in 0..y.len() {
                    y[i] = g[i] * sigmoid(g[i]) * u[i];
                }
            })
        });
}

/// `d_gate = grad · up · silu'(gate)` and `d_up = grad · silu(gate)`, with
/// `silu'(x) = σ(x) · (1 + x · (1 - σ(x)))`, over slices of one length.
pub(crate) fn silu_mul_grad_into(
    grad: &[f32],
    gate: &[f32],
    up: &[f32],
    d_gate: &mut [f32],
    d_up: &mut [f32],
) {
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, (dg, du))| {
            let at = c * CHUNK;
            let (g, x, u) = (&grad[at..], &gate[at..], &up[at..]);
            vectorized!({
                for i in 0..dg.len() {
                    let s = sigmoid(x[i]);
                    let silu = x[i] * s;
                    dg[i] = g[i] * u[i] * (s + silu * (1.0 - s));
                    du[i] = g[i] * silu;
                }
            })
        });
}
