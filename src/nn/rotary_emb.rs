//! Rotary position embeddings with a backward.
//!
//! `candle_nn::rotary_emb::rope` and `rope_i` are custom ops without a
//! backward in Candle 0.11: in a Llama-family model every query and key
//! projection sits before them, so their adapters would get no gradient.
//! These take the same arguments and are built from basic ops.

use candle::{Result, Tensor, D};

/// `candle_nn::rotary_emb::rope`: the halves layout (Llama, Mistral, Qwen2)
/// for `xs: (batch, heads, seq, dim)` and `cos`, `sin: (seq, dim / 2)`, or
/// `(batch, seq, dim / 2)` when each row has positions of its own (packed
/// rows restart them at every document).
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cos.rank() == 3 {
        return rope_per_row(xs, cos, sin);
    }
    check(xs, cos, sin)?;
    candle_nn::rotary_emb::rope_slow(xs, cos, sin)
}

fn rope_per_row(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, seq, dim) = xs.dims4()?;
    let want = [b, seq, dim / 2];
    if cos.dims() != want || sin.dims() != want {
        candle::bail!(
            "rope: per-row cos and sin must be {want:?} for input {:?}, got {:?} and {:?}",
            xs.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    // (b, seq, dim / 2) -> (b, 1, seq, dim), broadcast over the heads.
    let full = |t: &Tensor| Tensor::cat(&[t, t], D::Minus1)?.unsqueeze(1);
    let half = dim / 2;
    let rotated = Tensor::cat(
        &[
            &xs.narrow(D::Minus1, half, dim - half)?.neg()?,
            &xs.narrow(D::Minus1, 0, half)?,
        ],
        D::Minus1,
    )?;
    xs.broadcast_mul(&full(cos)?)? + rotated.broadcast_mul(&full(sin)?)?
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

    /// Per-row tables equal to the shared one give the same result; a row
    /// with other positions gets its own.
    #[test]
    fn per_row_positions_match_the_shared_table_row_by_row() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?;
        let cos = Tensor::randn(0f32, 1.0, (2, 5, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (2, 5, 4), &dev)?;
        let both = rope(&x, &cos, &sin)?;
        for row in 0..2 {
            let alone = rope(&x.narrow(0, row, 1)?, &cos.get(row)?, &sin.get(row)?)?;
            let diff = (both.narrow(0, row, 1)? - alone)?
                .abs()?
                .flatten_all()?
                .max(0)?;
            assert!(diff.to_scalar::<f32>()? < 1e-6, "row {row}");
        }
        Ok(())
    }
}
