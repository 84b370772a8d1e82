//! Rotary position embeddings with a backward.
//!
//! `candle_nn::rotary_emb::rope` and `rope_i` are custom ops without a
//! backward in Candle 0.11: in a Llama-family model every query and key
//! projection sits before them, so their adapters would get no gradient.
//! These take the same arguments and are built from basic ops.

use candle::{Result, Tensor};

/// `candle_nn::rotary_emb::rope`: the halves layout (Llama, Mistral, Qwen2)
/// for `xs: (batch, heads, seq, dim)` and `cos`, `sin: (seq, dim / 2)`.
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check(xs, cos, sin)?;
    candle_nn::rotary_emb::rope_slow(xs, cos, sin)
}

/// `candle_nn::rotary_emb::rope_i`: the interleaved layout.
pub fn rope_i(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check(xs, cos, sin)?;
    candle_nn::rotary_emb::rope_i_slow(xs, cos, sin)
}

fn check(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
    let (_, _, seq, dim) = xs.dims4()?;
    let want = [seq, dim / 2];
    if cos.dims() != want || sin.dims() != want {
        candle::bail!(
            "rope: cos and sin must be {want:?} for input {:?}, got {:?} and {:?}",
            xs.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    #[test]
    fn matches_candle_and_has_a_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?)?;
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        for (ours, theirs) in [
            (
                rope(&x, &cos, &sin)?,
                candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
            ),
            (
                rope_i(&x, &cos, &sin)?,
                candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
            ),
        ] {
            let diff = (&ours - &theirs)?.abs()?.flatten_all()?.max(0)?;
            assert!(diff.to_scalar::<f32>()? < 1e-5);
            let grads = ours.sqr()?.sum_all()?.backward()?;
            let g = grads.get(&x).expect("a gradient for the input");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
            // Candle's own op records no backward at all.
            assert!(theirs.sqr()?.sum_all()?.backward()?.get(&x).is_none());
        }
        Ok(())
    }
}
