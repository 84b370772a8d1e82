//! `x·Wᵀ` for a frozen quantized `W` (a GGUF block format), with a
//! backward to `x`.
//!
//! Candle's `QMatMul` records no backward: an adapter in an early layer of
//! a quantized model would get no gradient. This op runs Candle's quantized
//! matmul forward and, backward, `dX = dY·W` with `W` dequantized a band of
//! rows at a time, so the f32 copy alive at once is a few MB, never the
//! layer (let alone the model). `W` itself gets no gradient: it is frozen.

use std::borrow::Cow;
use std::sync::Arc;

use candle::quantized::{QStorage, QTensor};
use candle::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// About this many f32 values are dequantized at once in the backward.
const BAND_VALUES: usize = 1 << 20;

pub(crate) struct QuantizedMatmul {
    pub(crate) weight: Arc<QTensor>,
}

impl CustomOp1 for QuantizedMatmul {
    fn name(&self) -> &'static str {
        "lora-mini-quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.weight.cpu_fwd(storage, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.weight.cuda_fwd(storage, layout)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        storage: &candle::MetalStorage,
        layout: &Layout,
    ) -> Result<(candle::MetalStorage, Shape)> {
        self.weight.metal_fwd(storage, layout)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, k) = self.weight.shape().dims2()?;
        let rows = grad.elem_count() / n.max(1);
        let grad = grad.detach().reshape((rows, n))?;
        let band = (BAND_VALUES / k.max(1)).clamp(1, n.max(1));
        let mut dx: Option<Tensor> = None;
        for start in (0..n).step_by(band) {
            let len = band.min(n - start);
            let w = row_band(&self.weight, start, len)?
                .dequantize(&grad.device().clone())?
                .to_dtype(grad.dtype())?;
            let part = grad.narrow(1, start, len)?.contiguous()?.matmul(&w)?;
            dx = Some(match dx {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        let dx = match dx {
            Some(dx) => dx,
            None => Tensor::zeros((rows, k), grad.dtype(), grad.device())?,
        };
        Ok(Some(dx.reshape(x.dims())?))
    }
}

/// Rows `start..start + len` of a 2-D quantized tensor, as their own
/// tensor. A row is a whole number of blocks, so the bytes are copied as
/// they are.
pub(crate) fn row_band(q: &QTensor, start: usize, len: usize) -> Result<QTensor> {
    let (n, k) = q.shape().dims2()?;
    if start + len > n {
        candle::bail!(
            "rows {start}..{} of a {n}-row quantized tensor",
            start + len
        );
    }
    let dtype = q.dtype();
    let row_bytes = k / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let bytes = &data[start * row_bytes..(start + len) * row_bytes];
    let storage = QStorage::from_data(Cow::Borrowed(bytes), &q.device(), dtype)?;
    QTensor::new(storage, (len, k))
}

/// The rows of a 2-D quantized tensor in the order `order` gives (row `i`
/// of the result is row `order[i]` of `q`), moving whole rows of blocks.
pub(crate) fn reorder_rows(q: &QTensor, order: &[usize]) -> Result<QTensor> {
    let (n, k) = q.shape().dims2()?;
    if order.len() != n || order.iter().any(|&r| r >= n) {
        candle::bail!("a row order of {} entries for {n} rows", order.len());
    }
    let dtype = q.dtype();
    let row_bytes = k / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut out = Vec::with_capacity(n * row_bytes);
    for &r in order {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &q.device(), dtype)?;
    QTensor::new(storage, (n, k))
}

/// `x·Wᵀ` over the last dimension of `x`, for any leading dimensions.
pub(crate) fn quantized_matmul(xs: &Tensor, weight: &Arc<QTensor>) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(QuantizedMatmul {
        weight: Arc::clone(weight),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::quantized::GgmlDType;
    use candle::{Device, Var};

    fn weight(n: usize, k: usize) -> Result<Arc<QTensor>> {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        Ok(Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1)?))
    }

    #[test]
    fn backward_is_the_gradient_through_the_dequantized_weight() -> Result<()> {
        // 5 bands of 2^20 / 64 rows would be too coarse to test banding, so
        // the weight is tall enough to take several bands.
        let (n, k) = (40_000, 64);
        let q = weight(n, k)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, k), &Device::Cpu)?)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 3, n), &Device::Cpu)?;
        let y = quantized_matmul(x.as_tensor(), &q)?;
        let grads = (&y * &probe)?.sum_all()?.backward()?;
        let ours = grads.get(&x).expect("a gradient for x");
        let w = q.dequantize(&Device::Cpu)?;
        let expected = probe.reshape((6, n))?.matmul(&w)?.reshape((2, 3, k))?;
        let diff = (ours - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-2, "max |dX - dY·W| = {diff}");
        Ok(())
    }

    #[test]
    fn bands_and_reordered_rows_hold_the_same_blocks() -> Result<()> {
        let q = weight(8, 64)?;
        let full = q.dequantize(&Device::Cpu)?;
        let band = row_band(&q, 3, 4)?.dequantize(&Device::Cpu)?;
        assert_eq!(
            band.to_vec2::<f32>()?,
            full.narrow(0, 3, 4)?.to_vec2::<f32>()?
        );
        let order = [7, 6, 5, 4, 3, 2, 1, 0];
        let reversed = reorder_rows(&q, &order)?.dequantize(&Device::Cpu)?;
        let mut rows = full.to_vec2::<f32>()?;
        rows.reverse();
        assert_eq!(reversed.to_vec2::<f32>()?, rows);
        Ok(())
    }
}
