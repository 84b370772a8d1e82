//! The kernels' computations from basic Candle ops, all of which have a
//! backward: what the dispatchers in `nn::ops` run on devices and dtypes
//! the fused kernels do not cover, and the kernels' test references.

use candle::{DType, Result, Tensor, D};

/// `nn::ops::layer_norm` from basic ops (any device and dtype).
pub(crate) fn composed_layer_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let x = upcast(xs)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// `nn::ops::softmax_last_dim` from basic ops. The row maximum is subtracted for
/// stability and detached: softmax does not depend on it, so it needs no
/// gradient.
pub(crate) fn composed_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    num.broadcast_div(&num.sum_keepdim(D::Minus1)?)
}

fn upcast(xs: &Tensor) -> Result<Tensor> {
    match xs.dtype() {
        DType::F16 | DType::BF16 => xs.to_dtype(DType::F32),
        _ => Ok(xs.clone()),
    }
}
