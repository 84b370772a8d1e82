//! `x·Wᵀ` for a frozen quantized `W` (a GGUF block format), with a
//! backward to `x`.
//!
//! Candle's `QMatMul` records no backward: an adapter in an early layer of
//! a quantized model would get no gradient. This op's backward computes
//! `dX = dY·W` with `W` dequantized a band of rows at a time, so the f32
//! copy alive at once is a few MB, never the layer (let alone the model).
//! `W` itself gets no gradient: it is frozen.
//!
//! Forward, a few rows (decoding, short prompts) go through Candle's
//! quantized matmul, which also rounds the activations to 8 bits, as
//! llama.cpp does. Many rows (a training batch, a long prompt) go through
//! the same banded dequantization and an f32 gemm per band: Candle's
//! quantized kernel is a dot product per output value, and on 1,280 rows
//! of SmolLM2 a training step took 6x as long through it as through the
//! dequantized base (162 s against 28 s for 3 steps, measured 2026-12-04).

use std::borrow::Cow;
use std::sync::Arc;

use candle::quantized::{GgmlDType, QStorage, QTensor};
use candle::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use super::{add_g_w, f32_rows, gemm_parallelism, gemm_strided, with_cpu_f32, written_by};

/// About this many f32 values are dequantized at once.
const BAND_VALUES: usize = 1 << 20;

/// From this many input rows on, the forward dequantizes band by band and
/// runs an f32 gemm instead of Candle's quantized kernel.
pub(crate) const GEMM_MIN_ROWS: usize = 64;

pub(crate) struct QuantizedMatmul {
    pub(crate) weight: Arc<QTensor>,
}

impl CustomOp1 for QuantizedMatmul {
    fn name(&self) -> &'static str {
        "lora-mini-quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.weight.shape().dims2()?;
        let rows = layout.shape().elem_count() / k.max(1);
        match storage {
            CpuStorage::F32(_) if rows >= GEMM_MIN_ROWS => {
                let (x, width) = f32_rows(storage, layout, self.name())?;
                if width != k {
                    candle::bail!(
                        "{}: input has {width} features, the weight {k}",
                        self.name()
                    );
                }
                let y = banded_gemm(&self.weight, x, rows, n, k)?;
                let mut dims = layout.shape().dims().to_vec();
                *dims.last_mut().expect("rank >= 1") = n;
                Ok((CpuStorage::F32(y), Shape::from(dims)))
            }
            _ => self.weight.cpu_fwd(storage, layout),
        }
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
        let on_cpu_f32 = grad.device().is_cpu() && grad.dtype() == candle::DType::F32;
        let dx = if on_cpu_f32 {
            let grad = grad.contiguous()?;
            let dx = with_cpu_f32(&grad, "gradient", |g| {
                banded_grad(&self.weight, g, rows, n, k)
            })?;
            Tensor::from_vec(dx, (rows, k), grad.device())?
        } else {
            self.composed_grad(&grad, rows, n, k)?
        };
        Ok(Some(dx.reshape(x.dims())?))
    }
}

impl QuantizedMatmul {
    /// `dY·W` from Candle ops, band by band (CUDA, Metal, other dtypes).
    fn composed_grad(&self, grad: &Tensor, rows: usize, n: usize, k: usize) -> Result<Tensor> {
        let band = (BAND_VALUES / k.max(1)).clamp(1, n.max(1));
        let mut dx = Tensor::zeros((rows, k), grad.dtype(), grad.device())?;
        for start in (0..n).step_by(band) {
            let len = band.min(n - start);
            let w = row_band(&self.weight, start, len)?
                .dequantize(grad.device())?
                .to_dtype(grad.dtype())?;
            dx = (dx + grad.narrow(1, start, len)?.contiguous()?.matmul(&w)?)?;
        }
        Ok(dx)
    }
}

/// `dX = dY·W` (`m x k`) with `W` dequantized `BAND_VALUES` at a time:
/// each band's gemm reads its columns of `dY` in place and accumulates
/// into one `dX`, so nothing but the band is allocated per band.
pub(crate) fn banded_grad(
    q: &QTensor,
    g: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> Result<Vec<f32>> {
    if n == 0 {
        // No output columns: no band, so nothing would write dx.
        return Ok(vec![0f32; m * k]);
    }
    // SAFETY: n > 0, so there is a first band; without accumulating, its
    // gemm writes all of dx.
    unsafe { written_by(m * k, |dx| add_banded_grad(dx, q, g, (m, n, k), false)) }
}

/// `dx (m x k) (+)= g · W` for `g (m x n)` and the quantized `W (n x k)`,
/// a band of `W`'s rows at a time; `accumulate` adds onto `dx` (with no
/// columns, `n == 0`, it then leaves `dx` as it is).
pub(crate) fn add_banded_grad(
    dx: &mut [f32],
    q: &QTensor,
    g: &[f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    if n == 0 {
        if !accumulate {
            dx.fill(0.0);
        }
        return Ok(());
    }
    let band = (BAND_VALUES / k.max(1)).clamp(1, n);
    let mut bands = Bands::new(q, band, k);
    for (i, start) in (0..n).step_by(band).enumerate() {
        let len = band.min(n - start);
        let w = bands.rows(start, len)?;
        // dx (m x k) (+)= g[:, start..start+len] (row stride n) · w; the
        // first band overwrites dx unless accumulating, the later ones add.
        add_g_w(dx, &g[start..], n, w, (m, k, len), accumulate || i > 0)?;
    }
    Ok(())
}

/// One allocation that a quantized weight's bands of rows are dequantized
/// into in turn, each in parallel over its rows: dequantizing on one
/// thread left the other cores idle before every banded gemm.
struct Bands<'a> {
    q: &'a QTensor,
    k: usize,
    /// Capacity for a band; only the current band's values are written.
    values: Vec<f32>,
}

impl<'a> Bands<'a> {
    fn new(q: &'a QTensor, band: usize, k: usize) -> Self {
        Self {
            q,
            k,
            values: Vec::with_capacity(band * k),
        }
    }

    /// Rows `start..start + len` of the weight as f32 (`len·k` values).
    fn rows(&mut self, start: usize, len: usize) -> Result<&[f32]> {
        let n = len * self.k;
        if n > self.values.capacity() {
            candle::bail!("a band of {len} rows is larger than its buffer");
        }
        // SAFETY: the capacity holds n values; dequantize_rows_parallel
        // writes all of them (or fails, and then nothing reads them).
        let out = unsafe { std::slice::from_raw_parts_mut(self.values.as_mut_ptr(), n) };
        dequantize_rows_parallel(self.q, start, len, out)?;
        Ok(out)
    }
}

/// `y = x·Wᵀ` (`m x n`, row-major) with `W` dequantized `BAND_VALUES` at a
/// time; each band's gemm writes its columns of `y` in place.
pub(crate) fn banded_gemm(
    q: &QTensor,
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> Result<Vec<f32>> {
    if x.len() != m * k {
        candle::bail!("banded gemm: {} input values for {m}x{k}", x.len());
    }
    let band = (BAND_VALUES / k.max(1)).clamp(1, n.max(1));
    let mut bands = Bands::new(q, band, k);
    // SAFETY (written_by): the bands' gemms, which do not accumulate, write
    // columns start..start+len of every row, and the bands cover 0..n.
    unsafe {
        written_by(m * n, |y| {
            for start in (0..n).step_by(band) {
                let len = band.min(n - start);
                let w = bands.rows(start, len)?;
                // y[:, start..start+len] (row stride n) = x (m x k) · wᵀ,
                // where wᵀ's element (i, j) is w[j][i]: row stride 1,
                // column stride k.
                // SAFETY: y covers m rows of stride n from column `start`,
                // with start + len <= n; x holds m·k values and w len·k.
                gemm_strided(
                    (m, len, k),
                    (y.as_mut_ptr().add(start), 1, n as isize),
                    (x.as_ptr(), 1, k as isize),
                    (w.as_ptr(), k as isize, 1),
                    0.0,
                    1.0,
                    gemm_parallelism(),
                )
            }
            Ok(())
        })
    }
}

/// Dequantizes rows `start..start + len` of a 2-D quantized CPU tensor into
/// `out` (`len·k` values), straight from its blocks: no copy of the bytes,
/// no allocation.
pub(crate) fn dequantize_rows(
    q: &QTensor,
    start: usize,
    len: usize,
    out: &mut [f32],
) -> Result<()> {
    use candle::quantized::k_quants::*;
    fn blocks<T: GgmlType>(bytes: &[u8], out: &mut [f32]) -> Result<()> {
        let size = std::mem::size_of::<T>();
        if !bytes.len().is_multiple_of(size)
            || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        {
            candle::bail!("quantized rows are not whole, aligned blocks");
        }
        // SAFETY: the bytes are a whole number of `T` blocks, aligned for
        // `T` (checked above), taken from a tensor stored as `T` blocks.
        let xs =
            unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) };
        T::to_float(xs, out);
        Ok(())
    }
    let (_, k) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row_bytes = k / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let bytes = &data[start * row_bytes..(start + len) * row_bytes];
    let out = &mut out[..len * k];
    match dtype {
        GgmlDType::Q4_0 => blocks::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => blocks::<BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => blocks::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => blocks::<BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => blocks::<BlockQ8_0>(bytes, out),
        GgmlDType::Q8_1 => blocks::<BlockQ8_1>(bytes, out),
        GgmlDType::Q2K => blocks::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => blocks::<BlockQ3K>(bytes, out),
        GgmlDType::Q4K => blocks::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => blocks::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => blocks::<BlockQ6K>(bytes, out),
        GgmlDType::Q8K => blocks::<BlockQ8K>(bytes, out),
        other => {
            let w = row_band(q, start, len)?.dequantize(&candle::Device::Cpu)?;
            let values = w.flatten_all()?.to_vec1::<f32>()?;
            if values.len() != out.len() {
                candle::bail!(
                    "dequantizing {other:?}: {} values for {}",
                    values.len(),
                    out.len()
                );
            }
            out.copy_from_slice(&values);
            Ok(())
        }
    }
}

/// All of a quantized `(n, k)` weight as f32, dequantized in parallel.
pub(crate) fn dequantize_all(q: &QTensor) -> Result<Vec<f32>> {
    let (n, k) = q.shape().dims2()?;
    // SAFETY: dequantize_rows_parallel writes all n·k values.
    unsafe { written_by(n * k, |w| dequantize_rows_parallel(q, 0, n, w)) }
}

/// [`dequantize_rows`] in parallel over pieces of the rows.
pub(crate) fn dequantize_rows_parallel(
    q: &QTensor,
    start: usize,
    len: usize,
    out: &mut [f32],
) -> Result<()> {
    let (_, k) = q.shape().dims2()?;
    if out.len() < len * k {
        candle::bail!("{len} rows of {k} values do not fit {} outputs", out.len());
    }
    let piece = len.div_ceil(4 * rayon::current_num_threads()).max(1);
    out[..len * k]
        .par_chunks_mut(piece * k.max(1))
        .enumerate()
        .try_for_each(|(i, out)| dequantize_rows(q, start + i * piece, out.len() / k.max(1), out))
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
    fn many_rows_multiply_by_the_dequantized_weight() -> Result<()> {
        let (n, k) = (40_000, 64);
        let q = weight(n, k)?;
        let w = q.dequantize(&Device::Cpu)?;
        for rows in [GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &Device::Cpu)?;
            let ours = quantized_matmul(&x, &q)?;
            let expected = x.matmul(&w.t()?.unsqueeze(0)?)?;
            let diff = (ours - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            // Below the threshold Candle's kernel rounds x to 8 bits.
            let tolerance = if rows < GEMM_MIN_ROWS { 0.5 } else { 1e-4 };
            assert!(diff < tolerance, "{rows} rows: max |y - x·Wᵀ| = {diff}");
        }
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
