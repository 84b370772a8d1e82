//! Differentiable versions of candle-nn's ops, with candle-nn's signatures.
//!
//! Candle 0.11's fused `candle_nn::ops::layer_norm`, `rms_norm` and
//! `softmax_last_dim` (and `candle_nn::LayerNorm::forward` on contiguous
//! input) record no backward op: a loss computed through them has a zero
//! gradient for everything before them, and no error says so. A model
//! forked from candle-transformers swaps `candle_nn::ops::X` for
//! `lora_mini::nn::ops::X` and gets its gradients. On the CPU in f32 these
//! run the crate's fused kernels, which have a backward; elsewhere they are
//! built from basic ops that all have one.
//!
//! ```
//! use candle::{Device, Tensor, Var};
//!
//! let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 8), &Device::Cpu)?)?;
//! let alpha = Tensor::ones(8, candle::DType::F32, &Device::Cpu)?;
//! let grad_norm = |y: Tensor| -> candle::Result<f32> {
//!     let probe = Tensor::randn(0f32, 1.0, (2, 8), &Device::Cpu)?;
//!     let grads = (y * probe)?.sum_all()?.backward()?;
//!     match grads.get(&x) {
//!         Some(g) => g.abs()?.sum_all()?.to_scalar::<f32>(),
//!         None => Ok(0.0), // no gradient was recorded at all
//!     }
//! };
//! // Candle's own op: the gradient silently vanishes.
//! assert_eq!(grad_norm(candle_nn::ops::rms_norm(&x, &alpha, 1e-6)?)?, 0.0);
//! // Ours: the same values, and a gradient.
//! assert!(grad_norm(lora_mini::nn::ops::rms_norm(&x, &alpha, 1e-6)?)? > 0.0);
//! # Ok::<(), candle::Error>(())
//! ```

use candle::{DType, Result, Tensor, D};

use crate::kernels::composed::{composed_layer_norm, composed_softmax_last_dim};
use crate::kernels::fused::{GeluErf, LayerNormOp, RmsNormOp, Softmax, TargetNll};
use crate::kernels::gated::SiluMul;

pub(crate) fn fusable(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

/// `(x - mean) / sqrt(var + eps) * alpha + beta` over the last dimension,
/// computed in f32 for half-precision inputs; `candle_nn::ops::layer_norm`
/// with a backward.
pub fn layer_norm(xs: &Tensor, alpha: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    if fusable(xs) && alpha.dtype() == DType::F32 && beta.dtype() == DType::F32 {
        return xs.contiguous()?.apply_op3(
            &alpha.contiguous()?,
            &beta.contiguous()?,
            LayerNormOp { eps },
        );
    }
    composed_layer_norm(xs, alpha, beta, eps as f64)
}

/// `x / sqrt(mean(x²) + eps) * alpha` over the last dimension, normalised in
/// f32 and cast back before the scale (as transformers' T5 and Llama RMS
/// norms do); `candle_nn::ops::rms_norm` with a backward.
pub fn rms_norm(xs: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    if fusable(xs) && alpha.dtype() == DType::F32 {
        return xs
            .contiguous()?
            .apply_op2(&alpha.contiguous()?, RmsNormOp { eps });
    }
    composed_rms_norm(xs, alpha, eps)
}

fn composed_rms_norm(xs: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    let dtype = xs.dtype();
    let x = xs.to_dtype(DType::F32)?;
    let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
        .sqrt()?
        .recip()?;
    x.broadcast_mul(&scale)?
        .to_dtype(dtype)?
        .broadcast_mul(alpha)
}

/// The exact, erf-based GELU (`Tensor::gelu_erf`), fused on the CPU in f32.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if fusable(xs) {
        return xs.contiguous()?.apply_op1(GeluErf);
    }
    xs.gelu_erf()
}

/// `silu(gate) · up`, the product of a SiLU-gated MLP (Llama's), fused on
/// the CPU in f32: one pass forward and one backward, where composed it is
/// a dozen elementwise passes.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fusable(gate) && fusable(up) && gate.shape() == up.shape() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul);
    }
    gate.silu()? * up
}

/// The cross-entropy `(n)` of each row of `logits (n, V)` against its
/// target: `-log_softmax(row)[target]`, computed in f32. Fused on the CPU
/// (one pass forward, one backward, no `(n, V)` intermediates kept).
pub fn target_nlls(logits: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    if fusable(&logits) && logits.rank() == 2 {
        let op = TargetNll {
            targets: std::sync::Arc::new(targets),
        };
        return logits.contiguous()?.apply_op1(op);
    }
    let n = targets.len();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = Tensor::from_vec(targets, (n, 1), logits.device())?;
    logp.gather(&targets, 1)?.squeeze(1)?.neg()
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if fusable(xs) {
        return xs.contiguous()?.apply_op1(Softmax);
    }
    composed_softmax_last_dim(xs)
}

/// `candle_nn::ops::sdpa` with a backward: `softmax(q·kᵀ·scale + mask)·v`
/// for `q: (batch, q_heads, seq, d)`, `k`, `v: (batch, kv_heads, kv_seq, d)`
/// (grouped-query attention when `q_heads` is a multiple of `kv_heads`; do
/// not tile `k` and `v`), an optional additive `mask` broadcastable to
/// `(batch, q_heads, seq, kv_seq)`, a causal mask when `do_causal` (the
/// queries are the last `seq` positions), and `tanh` soft-capping unless
/// `softcapping` is 1. Returns `(batch, q_heads, seq, d)`.
pub fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    do_causal: bool,
    scale: f32,
    softcapping: f32,
) -> Result<Tensor> {
    let (_, q_heads, seq, _) = q.dims4()?;
    let (_, kv_heads, kv_seq, _) = k.dims4()?;
    if kv_heads == 0 || q_heads % kv_heads != 0 {
        candle::bail!(
            "sdpa: {q_heads} query heads are not a multiple of {kv_heads} key-value heads"
        );
    }
    let (k, v) = (
        repeat_kv(k, q_heads / kv_heads)?,
        repeat_kv(v, q_heads / kv_heads)?,
    );
    let mut scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale as f64)?;
    if softcapping != 1.0 {
        scores = ((scores / softcapping as f64)?.tanh()? * softcapping as f64)?;
    }
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    if do_causal {
        let offset = kv_seq.saturating_sub(seq);
        let keep: Vec<u8> = (0..seq)
            .flat_map(|i| (0..kv_seq).map(move |j| u8::from(j <= i + offset)))
            .collect();
        let keep = Tensor::from_vec(keep, (seq, kv_seq), q.device())?;
        let blocked = Tensor::new(f32::NEG_INFINITY, q.device())?
            .to_dtype(scores.dtype())?
            .broadcast_as(scores.shape())?;
        scores = keep
            .broadcast_as(scores.shape())?
            .where_cond(&scores, &blocked)?;
    }
    softmax_last_dim(&scores)?.matmul(&v.contiguous()?)
}

/// Each key-value head `n_rep` times in a row, as transformers' `repeat_kv`.
fn repeat_kv(xs: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(xs.clone());
    }
    let (b, heads, t, d) = xs.dims4()?;
    xs.unsqueeze(2)?
        .broadcast_as((b, heads, n_rep, t, d))?
        .reshape((b, heads * n_rep, t, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    #[test]
    fn layer_norm_matches_candle_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 16), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, 16, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, 16, &dev)?)?;
        let ours = layer_norm(&x, &w, &b, 1e-12)?;
        let fused = candle_nn::ops::layer_norm(&x, &w, &b, 1e-12)?;
        let diff = (ours.clone() - fused)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 16), &dev)?;
        let grads = (ours * probe)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let g = grads.get(v).expect("gradient recorded");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    /// The fused RMS norm against the composed one: values and the input
    /// and weight gradients.
    #[test]
    fn fused_rms_norm_matches_the_composed_one() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 37), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 37, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 37), &dev)?;
        let fused = rms_norm(&x, &w, 1e-6)?;
        let composed = composed_rms_norm(&x, &w, 1e-6)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(max_diff(&fused, &composed)? < 1e-5);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (composed * &probe)?.sum_all()?.backward()?;
        for v in [&x, &w] {
            let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            let scale = c.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(max_diff(f, c)? <= 1e-5 * scale.max(1.0));
            assert!(scale > 0.0);
        }
        Ok(())
    }

    /// The fused SiLU-gated product against `silu(gate) * up`: values and
    /// both input gradients, with inputs wide enough to reach the sigmoid's
    /// tails and a size that is not a multiple of the parallel chunk.
    #[test]
    fn fused_silu_mul_matches_the_composed_one() -> Result<()> {
        let dev = Device::Cpu;
        let shape = (3, 7001);
        let gate = Var::from_tensor(&Tensor::randn(0f32, 6.0, shape, &dev)?)?;
        let up = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, shape, &dev)?;
        let fused = silu_mul(&gate, &up)?;
        let composed = (gate.silu()? * up.as_tensor())?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(max_diff(&fused, &composed)? < 1e-5);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (composed * &probe)?.sum_all()?.backward()?;
        for v in [&gate, &up] {
            let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(max_diff(f, c)? < 1e-5);
            assert!(c.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    /// The fused cross-entropy against log-softmax and gather: values and
    /// the logits' gradient, with logits large enough to need the max
    /// shift, a row width that leaves a lane tail, and two rows sharing a
    /// target.
    #[test]
    fn target_nlls_match_log_softmax_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 30.0, (5, 37), &dev)?)?;
        let targets = vec![0u32, 36, 7, 7, 20];
        let fused = target_nlls(&x, targets.clone())?;
        let t = Tensor::from_vec(targets, (5, 1), &dev)?;
        let logp = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)?;
        let composed = logp.gather(&t, 1)?.squeeze(1)?.neg()?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        let size = composed.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(max_diff(&fused, &composed)? < 1e-5 * size.max(1.0));
        let weights = Tensor::new(&[0.5f32, -1.0, 2.0, 0.25, 1.5], &dev)?;
        let grad = |y: &Tensor| -> Result<Tensor> {
            Ok((y * &weights)?
                .sum_all()?
                .backward()?
                .get(&x)
                .unwrap()
                .clone())
        };
        let (g_fused, g_composed) = (grad(&fused)?, grad(&composed)?);
        assert!(max_diff(&g_fused, &g_composed)? < 1e-6);
        assert!(g_fused.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        // A target outside the vocabulary is an error, not a read past the row.
        assert!(target_nlls(&x, vec![0, 1, 2, 3, 37]).is_err());
        Ok(())
    }

    #[test]
    fn sdpa_matches_the_formula_with_gqa_and_causal_mask() -> Result<()> {
        let dev = Device::Cpu;
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 4, 3, 8), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev)?)?;
        let out = sdpa(&q, &k, &v, None, true, 0.5, 1.0)?;
        // Query head 3 uses key-value head 1; query row 0 sits at position
        // 2 of 5, so it sees keys 0..=2.
        let (q3, k1, v1) = (q.get(0)?.get(3)?, k.get(0)?.get(1)?, v.get(0)?.get(1)?);
        let scores = (q3.get(0)?.unsqueeze(0)?.matmul(&k1.narrow(0, 0, 3)?.t()?)? * 0.5)?;
        let expected = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v1.narrow(0, 0, 3)?)?;
        let got = out.get(0)?.get(3)?.get(0)?.unsqueeze(0)?;
        let diff = (got - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let grads = out.sqr()?.sum_all()?.backward()?;
        for x in [&q, &k, &v] {
            assert!(grads.get(x).unwrap().abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn softmax_matches_candle_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (4, 7), &dev)?)?;
        let ours = softmax_last_dim(&x)?;
        let fused = candle_nn::ops::softmax_last_dim(&x)?;
        let diff = (ours.clone() - fused)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        let probe = Tensor::randn(0f32, 1.0, (4, 7), &dev)?;
        let grads = (ours * probe)?.sum_all()?.backward()?;
        assert!(
            grads
                .get(&x)
                .unwrap()
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?
                > 0.0
        );
        Ok(())
    }
}
