//! Rotary position embeddings with a backward.
//!
//! `candle_nn::rotary_emb::rope` and `rope_i` are custom ops without a
//! backward in Candle 0.11: in a Llama-family model every query and key
//! projection sits before them, so their adapters would get no gradient.
//! These take the same arguments. On the CPU in f32 the halves layout runs
//! the crate's fused kernel; elsewhere both are built from basic ops.

use candle::{DType, Result, Tensor, D};

use crate::kernels::rope::Rope;
use crate::nn::ops::fusable;

/// `candle_nn::rotary_emb::rope`: the halves layout (Llama, Mistral, Qwen2)
/// for `xs: (batch, heads, seq, dim)` and `cos`, `sin: (seq, dim / 2)`, or
/// `(batch, seq, dim / 2)` when each row has positions of its own (packed
/// rows restart them at every document).
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check(xs, cos, sin)?;
    let tables_f32 = cos.dtype() == DType::F32 && sin.dtype() == DType::F32;
    if fusable(xs) && tables_f32 && xs.dim(D::Minus1)? % 2 == 0 {
        let op = Rope {
            cos: cos.contiguous()?.detach(),
            sin: sin.contiguous()?.detach(),
            inverse: false,
            seq_first: false,
        };
        return xs.contiguous()?.apply_op1(op);
    }
    if cos.rank() == 3 {
        return rope_per_row(xs, cos, sin);
    }
    candle_nn::rotary_emb::rope_slow(xs, cos, sin)
}

/// [`rope`] for `xs: (batch, seq, heads, dim)`, a projection's own layout
/// reshaped, so the queries and keys need no transposed copy.
pub fn rope_seq_first(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let tables_f32 = cos.dtype() == DType::F32 && sin.dtype() == DType::F32;
    if fusable(xs) && tables_f32 && xs.dim(D::Minus1)? % 2 == 0 {
        check(&xs.transpose(1, 2)?, cos, sin)?;
        let op = Rope {
            cos: cos.contiguous()?.detach(),
            sin: sin.contiguous()?.detach(),
            inverse: false,
            seq_first: true,
        };
        return xs.contiguous()?.apply_op1(op);
    }
    rope(&xs.transpose(1, 2)?.contiguous()?, cos, sin)?.transpose(1, 2)
}

/// The per-row tables' composed rope (`rope_slow` takes one shared table).
fn rope_per_row(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, _, dim) = xs.dims4()?;
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
    if cos.rank() != 2 {
        candle::bail!(
            "rope_i: cos and sin must be (seq, dim / 2), got {:?}",
            cos.dims()
        );
    }
    check(xs, cos, sin)?;
    candle_nn::rotary_emb::rope_i_slow(xs, cos, sin)
}

/// The tables must be `(seq, dim / 2)`, or `(batch, seq, dim / 2)` for
/// per-row positions.
fn check(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
    let (b, _, seq, dim) = xs.dims4()?;
    let want = if cos.rank() == 3 {
        vec![b, seq, dim / 2]
    } else {
        vec![seq, dim / 2]
    };
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

    /// The fused kernel against the composed ops it replaces, for shared and
    /// per-row tables: values and the input gradient.
    #[test]
    fn fused_rope_matches_the_composed_one_with_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?;
        for table in [vec![5, 4], vec![2, 5, 4]] {
            let cos = Tensor::randn(0f32, 1.0, table.as_slice(), &dev)?;
            let sin = Tensor::randn(0f32, 1.0, table.as_slice(), &dev)?;
            let fused = rope(&x, &cos, &sin)?;
            let composed = if table.len() == 3 {
                rope_per_row(&x, &cos, &sin)?
            } else {
                candle_nn::rotary_emb::rope_slow(&x, &cos, &sin)?
            };
            let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            assert!(max_diff(&fused, &composed)? < 1e-5, "{table:?}");
            let grad = |y: Tensor| -> Result<Tensor> {
                let grads = (y * &probe)?.sum_all()?.backward()?;
                Ok(grads.get(&x).expect("a gradient").clone())
            };
            let (gf, gc) = (grad(fused)?, grad(composed)?);
            assert!(max_diff(&gf, &gc)? < 1e-5, "{table:?}");
            assert!(gf.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        // A table of the wrong shape is refused, fused or not.
        let short = Tensor::zeros((4, 4), candle::DType::F32, &dev)?;
        assert!(rope(&x, &short, &short).is_err());
        Ok(())
    }

    /// The sequence-first layout gives the heads-first result, transposed,
    /// and its gradient, for shared and per-row tables.
    #[test]
    fn sequence_first_layout_matches_heads_first() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 3, 8), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 5, 3, 8), &dev)?;
        for table in [vec![5, 4], vec![2, 5, 4]] {
            let cos = Tensor::randn(0f32, 1.0, table.as_slice(), &dev)?;
            let sin = Tensor::randn(0f32, 1.0, table.as_slice(), &dev)?;
            let seq_first = rope_seq_first(&x, &cos, &sin)?;
            let heads_first =
                rope(&x.transpose(1, 2)?.contiguous()?, &cos, &sin)?.transpose(1, 2)?;
            let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            assert!(max_diff(&seq_first, &heads_first)? < 1e-6, "{table:?}");
            let grad = |y: Tensor| -> Result<Tensor> {
                Ok((y * &probe)?
                    .sum_all()?
                    .backward()?
                    .get(&x)
                    .unwrap()
                    .clone())
            };
            assert!(max_diff(&grad(seq_first)?, &grad(heads_first)?)? < 1e-6);
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
