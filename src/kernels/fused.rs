//! Fused CPU kernels, with a backward, for the ops a training step spends
//! its elementwise time in: softmax over the last dimension, layer norm and
//! the erf GELU.
//!
//! Built from basic ops, softmax takes five passes over the attention
//! scores and keeps four intermediates alive until the backward; layer norm
//! takes nine. These kernels take one pass per row, in parallel over rows,
//! and keep only their output (softmax) or input (layer norm) for the
//! backward. They run for contiguous f32 tensors on the CPU; `ops` falls
//! back to the composed versions elsewhere (CUDA, Metal, other dtypes).

use candle::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{f32_rows, written_by};

/// Fills a new output the size of `x` block by block in parallel:
/// `f(offset, x_block, out_block)`, with `offset` the block's start (for
/// reading the matching block of a second input). `f` wraps its body in
/// `vectorized!` (here it would have several call sites; see there).
///
/// # Safety
/// `f` writes every value of `out_block` and reads none it has not written
/// (the output is not zeroed first; see [`written_by`]).
unsafe fn map_blocks(
    x: &[f32],
    block: usize,
    shape: &Shape,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync,
) -> (CpuStorage, Shape) {
    // SAFETY: the blocks of `out` pair up with those of `x`, so they cover
    // it, and the caller's `f` writes each block whole.
    let out = unsafe {
        written_by(x.len(), |out| {
            out.par_chunks_mut(block.max(1))
                .zip(x.par_chunks(block.max(1)))
                .enumerate()
                .for_each(|(i, (y, x))| f(i * block, x, y));
            Ok(())
        })
    }
    .expect("the fill cannot fail");
    (CpuStorage::F32(out), shape.clone())
}

/// Evaluates `$body` (an expression with no `return` or `?`: on the wide
/// paths it runs in a closure) compiled for the widest vector extension the CPU has
/// (AVX-512, else AVX2 + FMA, else the baseline), chosen at run time. The
/// crate is built for baseline x86-64, so the loops in the kernels would
/// otherwise vectorise with 4-lane SSE at best; inlined into the
/// `#[target_feature]` functions here they use 16 or 8 lanes.
///
/// A macro rather than a function taking a closure: a function calls its
/// closure on each of its three paths, and LLVM inlines a closure with
/// three call sites only while it is small. Larger kernel bodies (the
/// attention core's, the SiLU gradient's) and bodies that call
/// `#[inline(always)]` helpers (`log_sum_exp`) stayed separate functions
/// compiled for the baseline; a profile of the decoder step found them with
/// no AVX register in use. Here each path builds its own closure, called
/// once, which LLVM inlines into its path whatever its size.
#[cfg(target_arch = "x86_64")]
macro_rules! vectorized {
    ($body:expr) => {{
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        unsafe fn v4<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v3<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            let f = || $body;
            // Callers' own unsafe blocks may enclose this one.
            #[allow(unused_unsafe)]
            // SAFETY: the CPU has the features v4 is compiled for.
            let out = unsafe { v4(f) };
            out
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            let f = || $body;
            #[allow(unused_unsafe)]
            // SAFETY: as above, for v3.
            let out = unsafe { v3(f) };
            out
        } else {
            $body
        }
    }};
}

/// Elsewhere than x86-64, the body as it is.
#[cfg(not(target_arch = "x86_64"))]
macro_rules! vectorized {
    ($body:expr) => {
        $body
    };
}

pub(crate) use vectorized;

/// Lanes of the manual reductions below: enough independent accumulators
/// for the compiler to keep them in one vector register.
const LANES: usize = 8;

/// `e^x` to within 2 ulp for `x` in `[-87, 88]` (0 below, `e^88` above),
/// written so that loops over slices vectorise: Cody–Waite range reduction
/// `e^x = 2^n · e^r` with `|r| ≤ ln2/2`, Cephes' degree-6 polynomial for
/// `e^r`, and `2^n` built from the exponent bits. libm's `expf` is a call
/// per element and no loop around it vectorises.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let n_int = shifted.to_bits() as i32 - 0x4B40_0000;
    let pow2n = f32::from_bits(((n_int + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        er * pow2n
    }
}

/// The maximum of a slice, in `LANES` independent lanes.
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let lanes = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    tail.iter().copied().fold(lanes, f32::max)
}

/// The sum of a slice, in `LANES` independent lanes.
#[inline(always)]
fn sum_of(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// A row's softmax in place. Callers inside a parallel kernel wrap their
/// block in `vectorized!`; this is inlined there.
#[inline(always)]
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let max = max_of(row);
    for x in row.iter_mut() {
        *x = fast_exp(*x - max);
    }
    let inv = 1.0 / sum_of(row);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// Softmax over the last dimension; the backward uses the saved output.
pub(crate) struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "lora-mini-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, d) = f32_rows(storage, layout, self.name())?;
        // SAFETY: the closure writes every value of its output block.
        Ok(unsafe {
            map_blocks(x, d, layout.shape(), |_, x, y| {
                vectorized!({
                    y.copy_from_slice(x);
                    softmax_in_place(y);
                })
            })
        })
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // dx = y * (g - sum(g * y)), from the detached output so that the
        // gradient carries no graph (see frozen_matmul's backward).
        let y = y.detach();
        let dot = (grad * &y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((grad.broadcast_sub(&dot)? * &y)?))
    }
}

/// `ln Σ e^x` of a row, without writing the exponentials to the row. They
/// go through a small buffer on the stack: added straight into lane
/// accumulators, the loop did not vectorise, and a 49,152-value row took
/// 6-12 ns a value against 1.7-2 ns this way (measured 2026-12-05).
#[inline(always)]
pub(crate) fn log_sum_exp(x: &[f32]) -> f32 {
    const BLOCK: usize = 256;
    let max = max_of(x);
    let mut buffer = [0f32; BLOCK];
    let mut sum = 0f32;
    for block in x.chunks(BLOCK) {
        let exps = &mut buffer[..block.len()];
        for (e, &v) in exps.iter_mut().zip(block) {
            *e = fast_exp(v - max);
        }
        sum += sum_of(exps);
    }
    max + sum.ln()
}

/// The cross-entropy of each row of `logits (n, V)` against its target:
/// `logsumexp(row) - row[target]`, `(n)`. One pass per row and nothing
/// kept for the backward, which recomputes the softmax from the logits:
/// composed, log-softmax writes and keeps several `(n, V)` intermediates,
/// and with a 49K-word vocabulary those are a decoder step's largest
/// tensors.
pub(crate) struct TargetNll {
    pub(crate) targets: std::sync::Arc<Vec<u32>>,
}

impl TargetNll {
    fn check(&self, x: &[f32], v: usize) -> Result<()> {
        let n = x.len() / v;
        if n != self.targets.len() {
            candle::bail!("target nll: {n} rows for {} targets", self.targets.len());
        }
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle::bail!("target nll: target {t} is outside the {v} classes");
        }
        Ok(())
    }
}

impl CustomOp1 for TargetNll {
    fn name(&self) -> &'static str {
        "lora-mini-target-nll"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, v) = f32_rows(storage, layout, self.name())?;
        self.check(x, v)?;
        let nll: Vec<f32> = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| vectorized!(log_sum_exp(row)) - row[t as usize])
            .collect();
        Ok((CpuStorage::F32(nll), Shape::from(self.targets.len())))
    }

    fn bwd(&self, x: &Tensor, _nll: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let op = TargetNllGrad {
            targets: self.targets.clone(),
        };
        Ok(Some(x.apply_op2_no_bwd(&grad, &op)?))
    }
}

/// `g_i · (softmax(row_i) - onehot(target_i))` from `(logits, g)`.
struct TargetNllGrad {
    targets: std::sync::Arc<Vec<u32>>,
}

impl CustomOp2 for TargetNllGrad {
    fn name(&self) -> &'static str {
        "lora-mini-target-nll-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, v) = f32_rows(s1, l1, self.name())?;
        let (g, _) = f32_rows(s2, l2, self.name())?;
        // SAFETY: each row of the output is first a copy of its logits.
        let out = unsafe {
            written_by(x.len(), |out| {
                out.par_chunks_mut(v)
                    .zip(x.par_chunks(v))
                    .zip(g.par_iter().zip(self.targets.par_iter()))
                    .for_each(|((y, row), (&g, &t))| {
                        vectorized!({
                            y.copy_from_slice(row);
                            softmax_in_place(y);
                            y.iter_mut().for_each(|p| *p *= g);
                        });
                        y[t as usize] -= g;
                    });
                Ok(())
            })?
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Elements per parallel task in elementwise kernels.
const CHUNK: usize = 1 << 14;

/// `erf(x)` within 1e-6 in f32 (Abramowitz and Stegun 7.1.26: 1.5e-7 in
/// exact arithmetic, 6e-7 measured in f32), from one `exp` and a polynomial:
/// several times faster than libm's `erff`, and below the float32 rounding
/// the surrounding layers add anyway.
#[inline(always)]
fn fast_erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * fast_exp(-x * x);
    y.copysign(x)
}

/// The exact (erf) GELU, `x * Φ(x)`, in parallel; the backward is one
/// fused pass too.
pub(crate) struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "lora-mini-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, _) = f32_rows(storage, layout, self.name())?;
        // SAFETY: the closure writes every value of its output block.
        Ok(unsafe {
            map_blocks(x, CHUNK, layout.shape(), |_, x, y| {
                vectorized!({
                    for (y, &v) in y.iter_mut().zip(x) {
                        *y = 0.5 * v * (1.0 + fast_erf(v * std::f32::consts::FRAC_1_SQRT_2));
                    }
                })
            })
        })
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(x, &GeluErfGrad)?))
    }
}

/// `grad * (Φ(x) + x φ(x))` from `(grad, x)`.
struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "lora-mini-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, _) = f32_rows(s1, l1, self.name())?;
        let (x, _) = f32_rows(s2, l2, self.name())?;
        if g.len() != x.len() {
            candle::bail!("{}: gradient and input sizes differ", self.name());
        }
        let inv_sqrt_2pi = 0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2;
        // SAFETY: the closure writes every value of its output block.
        Ok(unsafe {
            map_blocks(x, CHUNK, l1.shape(), |offset, x, dx| {
                vectorized!({
                    let g = &g[offset..offset + x.len()];
                    for i in 0..dx.len() {
                        let v = x[i];
                        let cdf = 0.5 * (1.0 + fast_erf(v * std::f32::consts::FRAC_1_SQRT_2));
                        let pdf = fast_exp(-0.5 * v * v) * inv_sqrt_2pi;
                        dx[i] = g[i] * (cdf + v * pdf);
                    }
                })
            })
        })
    }
}

/// Which normalisation a norm kernel applies per row: layer norm centres
/// and scales, RMS norm (Llama, T5) only scales. Both share `xhat = (x -
/// mean) · rstd` (with `mean = 0` for RMS) and so their kernels.
#[derive(Clone, Copy)]
enum Centering {
    Mean,
    None,
}

/// `(mean, 1 / sqrt(var + eps))` of a row; RMS norm's `var` is `mean(x²)`.
#[inline(always)]
fn moments(x: &[f32], eps: f32, centering: Centering) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = match centering {
        Centering::Mean => x.iter().sum::<f32>() / n,
        Centering::None => 0.0,
    };
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The input and weight gradients of a norm (and, when it has a bias, the
/// bias gradient), from its input `x`, weight `w` and output gradient.
fn norm_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    eps: f32,
    centering: Centering,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let d = x.dim(D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    let x2 = x.contiguous()?.reshape((rows, d))?;
    let g2 = grad.contiguous()?.reshape((rows, d))?;
    let dx = g2.apply_op3_no_bwd(&x2, w, &NormInputGrad { eps, centering })?;
    let dx = dx.reshape(x.shape())?;
    // Frozen norms (adapter training) need no weight or bias gradient.
    let dw_db = if w.track_op() {
        let xhat = x2.apply_op1_no_bwd(&Normalise { eps, centering })?;
        Some(((&g2 * xhat)?.sum(0)?, g2.sum(0)?))
    } else {
        None
    };
    Ok((dx, dw_db))
}

/// Layer norm over the last dimension with weight and bias.
pub(crate) struct LayerNormOp {
    pub eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "lora-mini-layer-norm"
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
        let (x, d) = f32_rows(s1, l1, self.name())?;
        let (w, _) = f32_rows(s2, l2, self.name())?;
        let (b, _) = f32_rows(s3, l3, self.name())?;
        if w.len() != d || b.len() != d {
            candle::bail!("{}: weight and bias must have {d} entries", self.name());
        }
        // SAFETY: the closure writes every value of its output block.
        Ok(unsafe {
            map_blocks(x, d, l1.shape(), |_, x, y| {
                vectorized!({
                    let (mean, rstd) = moments(x, self.eps, Centering::Mean);
                    for i in 0..d {
                        y[i] = (x[i] - mean) * rstd * w[i] + b[i];
                    }
                })
            })
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw_db) = norm_grads(x, w, grad, self.eps, Centering::Mean)?;
        let (dw, db) = dw_db.unzip();
        Ok((Some(dx), dw, db))
    }
}

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension (Llama's and
/// T5's RMS norm), one pass per row; the backward keeps only the input.
pub(crate) struct RmsNormOp {
    pub eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "lora-mini-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, d) = f32_rows(s1, l1, self.name())?;
        let (w, _) = f32_rows(s2, l2, self.name())?;
        if w.len() != d {
            candle::bail!("{}: the weight must have {d} entries", self.name());
        }
        // SAFETY: the closure writes every value of its output block.
        Ok(unsafe {
            map_blocks(x, d, l1.shape(), |_, x, y| {
                vectorized!({
                    let (_, rstd) = moments(x, self.eps, Centering::None);
                    for i in 0..d {
                        y[i] = x[i] * rstd * w[i];
                    }
                })
            })
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw_db) = norm_grads(x, w, grad, self.eps, Centering::None)?;
        Ok((Some(dx), dw_db.map(|(dw, _)| dw)))
    }
}

/// `xhat = (x - mean) * rstd` per row, for the weight gradient.
struct Normalise {
    eps: f32,
    centering: Centering,
}

impl CustomOp1 for Normalise {
    fn name(&self) -> &'static str {
        "lora-mini-normalise"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, d) = f32_rows(storage, layout, self.name())?;
        // SAFETY: the closure writes every value of its output block.
        Ok(unsafe {
            map_blocks(x, d, layout.shape(), |_, x, y| {
                vectorized!({
                    let (mean, rstd) = moments(x, self.eps, self.centering);
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = (x - mean) * rstd;
                    }
                })
            })
        })
    }
}

/// The input gradient of a norm from `(grad, x, weight)`, per row:
/// `rstd * (gw - mean(gw) - xhat * mean(gw * xhat))` with `gw = grad * w`
/// (without the `mean(gw)` term for RMS norm, which does not centre).
struct NormInputGrad {
    eps: f32,
    centering: Centering,
}

impl CustomOp3 for NormInputGrad {
    fn name(&self) -> &'static str {
        "lora-mini-norm-input-grad"
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
        let (g, d) = f32_rows(s1, l1, self.name())?;
        let (x, _) = f32_rows(s2, l2, self.name())?;
        let (w, _) = f32_rows(s3, l3, self.name())?;
        // SAFETY: the closure writes every value of its output block.
        Ok(unsafe {
            map_blocks(x, d, l1.shape(), |offset, x, dx| {
                vectorized!({
                    let g = &g[offset..offset + d];
                    let (mean, rstd) = moments(x, self.eps, self.centering);
                    let n = d as f32;
                    let (mut sum_gw, mut sum_gw_xhat) = (0f32, 0f32);
                    for i in 0..d {
                        let gw = g[i] * w[i];
                        sum_gw += gw;
                        sum_gw_xhat += gw * (x[i] - mean) * rstd;
                    }
                    let mean_gw = match self.centering {
                        Centering::Mean => sum_gw / n,
                        Centering::None => 0.0,
                    };
                    let mean_gw_xhat = sum_gw_xhat / n;
                    for i in 0..d {
                        let xhat = (x[i] - mean) * rstd;
                        dx[i] = rstd * (g[i] * w[i] - mean_gw - xhat * mean_gw_xhat);
                    }
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (ours, libm) = (fast_exp(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(fast_exp(-1e30), 0.0);
        assert_eq!(fast_exp(f32::MIN), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
        let mut row = vec![
            0.5f32,
            -3.0,
            2.0,
            f32::MIN,
            1.0,
            0.0,
            -1.0,
            4.0,
            3.0,
            -2.0,
            0.25,
        ];
        let expected: Vec<f32> = {
            let m = 4.0f32;
            let e: Vec<f32> = row.iter().map(|x| (x - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        softmax_in_place(&mut row);
        for (a, b) in row.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-7, "{a} vs {b}");
        }
    }
    use crate::kernels::composed::{composed_layer_norm, composed_softmax_last_dim};
    use candle::{DType, Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn softmax_values_and_gradient_match_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (3, 5, 37), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (3, 5, 37), &dev)?;
        let fused = x.as_tensor().apply_op1(Softmax)?;
        let composed = composed_softmax_last_dim(&x)?;
        assert!(max_diff(&fused, &composed)? < 1e-6);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (composed * &probe)?.sum_all()?.backward()?;
        let diff = max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap())?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    #[test]
    fn fast_erf_is_within_its_bound() {
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            let exact = candle::cpu::erf::erf_f64(x as f64);
            assert!((fast_erf(x) as f64 - exact).abs() < 1e-6, "erf({x})");
        }
    }

    #[test]
    fn gelu_values_and_gradient_match_candles_gelu_erf() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (5, 40_001), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (5, 40_001), &dev)?;
        let fused = x.as_tensor().apply_op1(GeluErf)?;
        let candle = x.gelu_erf()?;
        let diff = max_diff(&fused, &candle)?;
        assert!(diff < 1e-6, "{diff}");
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (candle * &probe)?.sum_all()?.backward()?;
        let diff = max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap())?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn layer_norm_values_and_gradients_match_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (4, 3, 48), &dev)? + 0.5)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, 48, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, 48, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (4, 3, 48), &dev)?;
        let fused = x.apply_op3(&w, &b, LayerNormOp { eps: 1e-12 })?;
        let composed = composed_layer_norm(&x, &w, &b, 1e-12)?;
        assert!(max_diff(&fused, &composed)? < 1e-5);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (composed * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            let scale = c.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let diff = max_diff(f, c)?;
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "{name}: {diff} (scale {scale})"
            );
        }
        // A frozen norm gets no weight or bias gradient.
        let frozen_w = w.as_tensor().detach();
        let frozen_b = b.as_tensor().detach();
        let y = x.apply_op3(&frozen_w, &frozen_b, LayerNormOp { eps: 1e-12 })?;
        let g = (y * &probe)?.sum_all()?.backward()?;
        assert!(g.get(&frozen_w).is_none() && g.get(&x).is_some());
        assert_eq!(g.get(&x).unwrap().dtype(), DType::F32);
        Ok(())
    }
}
