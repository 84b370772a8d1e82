//! The two weight operations every adapted layer shares: the linear map
//! (through the crate's frozen-weight kernel on the CPU) and `W + ΔW`. A
//! leaf, so the layer types and their host import it without a cycle.

use candle::{DType, Result, Tensor};

use crate::kernels::frozen_matmul::linear_2d;

/// `x·wᵀ + b` for inputs of shape `(.., d_in)`. Leading dimensions are folded
/// into one so the CPU and CUDA backends run a plain 2-D matmul, which is much
/// faster than a broadcast one.
pub fn linear_fwd(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = xs.dims();
    match dims.len() {
        0 => candle::bail!("linear layer input must have at least one dimension"),
        1 => linear_2d(&xs.unsqueeze(0)?, weight, bias)?.squeeze(0),
        // CUDA's matmul refuses a strided row slice (a [CLS] token taken
        // from (B, T, H)); the copy is a no-op for contiguous input.
        2 => linear_2d(&xs.contiguous()?, weight, bias),
        _ => {
            let d_in = dims[dims.len() - 1];
            let rows = xs.elem_count() / d_in.max(1);
            let mut out_dims = dims.to_vec();
            *out_dims.last_mut().expect("non-empty") = weight.dim(0)?;
            linear_2d(&xs.contiguous()?.reshape((rows, d_in))?, weight, bias)?.reshape(out_dims)
        }
    }
}

/// `W + ΔW`, added in at least f32 so low-precision weights lose nothing
/// extra (and f64 weights keep f64).
pub(crate) fn merged_weight(weight: &Tensor, delta: &Tensor) -> Result<Tensor> {
    let dtype = weight.dtype();
    let sum_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    (weight.to_dtype(sum_dtype)? + delta.to_dtype(sum_dtype)?)?.to_dtype(dtype)
}
