//! A frozen base layer plus a low-rank update, `x·Wᵀ + b + h·Bᵀ` with
//! `h = dropout(x)·A_effᵀ`, as one op: how every adapted layer computes its
//! output in training on the CPU. Without dropout the op takes `A_eff`
//! itself and computes `h` inside ([`low_rank_linear`]); with it, the
//! caller computes `h` from the dropped input ([`low_rank_output`]).
//!
//! Composed, the update's output and the base's are two tensors and a sum,
//! and the sum's backward copies the output gradient into a fresh zero
//! tensor for each of its inputs (Candle's `GradStore::or_insert`): three
//! passes over `rows x d_out` values per adapted layer, forward and
//! backward, for nothing. Here the update's gemm accumulates into the
//! base's output, and the backward hands the one output gradient to all
//! three inputs. The base is dense (with its bias) or quantized (GGUF
//! blocks, dequantized a band at a time as in `quantized_matmul`).
//!
//! Taking `A_eff` saves more of the same: `h`'s own matmul node is gone,
//! and with it the reshape and matmul nodes whose backward each added a
//! `rows x d_in` gradient into a fresh zero tensor and then into `x`'s.
//! The op's backward writes `dX = dY·W + (dY·B)·A` into one buffer.

use std::sync::{Arc, OnceLock};

use candle::quantized::QTensor;
use candle::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::frozen_matmul::frozen_linear;
use super::quantized_matmul::{add_banded_grad, banded_gemm, QuantizedMatmul, GEMM_MIN_ROWS};
use super::{add_g_w, add_x_wt, f32_rows, gt_x, with_cpu_f32, written_by};

/// The frozen weight of a base layer, as the caller holds it.
#[derive(Clone, Copy)]
pub(crate) enum FrozenWeight<'a> {
    /// `(d_out, d_in)` and the optional `(d_out)` bias.
    Dense(&'a Tensor, Option<&'a Tensor>),
    /// Quantized blocks, without a bias.
    Quantized(&'a Arc<QTensor>),
}

/// A fused op's own copy of the frozen base.
pub(crate) enum Base {
    Dense {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    Quantized(Arc<QTensor>),
}

impl Base {
    /// The op's copy of `frozen`; `None` for a dense weight or bias that is
    /// not a frozen, contiguous f32 CPU tensor.
    pub(crate) fn frozen(frozen: FrozenWeight) -> Option<Self> {
        match frozen {
            FrozenWeight::Dense(weight, bias) => {
                let frozen = |t: &Tensor| {
                    t.device().is_cpu()
                        && t.dtype() == DType::F32
                        && t.is_contiguous()
                        && !t.track_op()
                };
                (frozen(weight) && bias.is_none_or(frozen)).then(|| Self::Dense {
                    weight: weight.clone(),
                    bias: bias.cloned(),
                })
            }
            FrozenWeight::Quantized(q) => Some(Self::Quantized(Arc::clone(q))),
        }
    }

    /// `(d_out, d_in)`.
    pub(crate) fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense { weight, .. } => weight.dims2(),
            Self::Quantized(q) => q.shape().dims2(),
        }
    }

    /// `x·Wᵀ + b` for `m` rows of `x`.
    pub(crate) fn forward(&self, x: &[f32], (m, n, k): (usize, usize, usize)) -> Result<Vec<f32>> {
        match self {
            Self::Dense { weight, bias } => with_cpu_f32(weight, "frozen weight", |w| {
                frozen_linear(x, w, bias.as_ref(), (m, n, k))
            }),
            Self::Quantized(q) => banded_gemm(q, x, m, n, k),
        }
    }

    /// `dX = dY·W` (`m x k` values) from `m` rows of `dY`.
    pub(crate) fn input_grad_values(
        &self,
        g: &[f32],
        dims: (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        // SAFETY: without accumulating, add_input_grad writes all of dx.
        unsafe {
            written_by(dims.0 * dims.2, |dx| {
                self.add_input_grad(dx, g, dims, false)
            })
        }
    }

    /// `dX (+)= dY·W` into `m x k` values from `m` rows of `dY`;
    /// `accumulate` adds onto `dx` instead of overwriting it.
    pub(crate) fn add_input_grad(
        &self,
        dx: &mut [f32],
        g: &[f32],
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        match self {
            Self::Dense { weight, .. } => with_cpu_f32(weight, "frozen weight", |w| {
                add_g_w(dx, g, n, w, (m, k, n), accumulate)
            }),
            Self::Quantized(q) => add_banded_grad(dx, q, g, (m, n, k), accumulate),
        }
    }

    /// `dX = dY·W`, shaped like `x`.
    fn input_grad(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense { weight, .. } => {
                let n = weight.dim(0)?;
                let rows = grad.elem_count() / n.max(1);
                grad.detach()
                    .reshape((rows, n))?
                    .matmul(weight)?
                    .reshape(x.dims())
            }
            Self::Quantized(q) => {
                let base = QuantizedMatmul {
                    weight: Arc::clone(q),
                };
                candle::CustomOp1::bwd(&base, x, y, grad)?
                    .ok_or_else(|| candle::Error::msg("quantized matmul: no input gradient"))
            }
        }
    }
}

/// What the op's second argument is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UpdateInput {
    /// `h` (`rows x r`), computed by the caller from the dropped input.
    Hidden,
    /// `A_eff` (`r x d_in`): `h = x·A_effᵀ` is computed in the op and
    /// kept for its backward.
    Factor,
}

/// The op: arguments `(x, h or A_eff, B)`, state the frozen base.
struct LowRankOutput {
    base: Base,
    input: UpdateInput,
    /// `h` as the forward pass computed it from `A_eff` (`rows x r`, a
    /// few KB): recomputing it in the backward would read all of `x`
    /// again.
    hidden: OnceLock<Vec<f32>>,
}

impl CustomOp3 for LowRankOutput {
    fn name(&self) -> &'static str {
        "lora-mini-low-rank-output"
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
        let (n, k) = self.base.dims2()?;
        let (x, width) = f32_rows(s1, l1, self.name())?;
        // `h`'s width is r; `A_eff`'s is d_in (its r is found below).
        let (h, r) = f32_rows(s2, l2, self.name())?;
        let (b, _) = f32_rows(s3, l3, self.name())?;
        if width != k {
            candle::bail!(
                "{}: input has {width} features, the weight {k}",
                self.name()
            );
        }
        let m = x.len() / k.max(1);
        let mut y = self.base.forward(x, (m, n, k))?;
        match self.input {
            UpdateInput::Hidden => add_x_wt(&mut y, h, b, (m, n, r), true)?,
            UpdateInput::Factor => {
                if r != k {
                    candle::bail!("{}: A has {r} columns, the weight {k}", self.name());
                }
                let r = h.len() / k.max(1);
                let hidden = hidden(x, h, (m, r, k))?;
                add_x_wt(&mut y, &hidden, b, (m, n, r), true)?;
                // A second forward of the same op (none is made) would
                // compute the same h.
                let _ = self.hidden.set(hidden);
            }
        }
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = n;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.input == UpdateInput::Factor {
            let (dx, da, db) = factor_grads(&self.base, x, h, b, grad, self.hidden.get())?;
            return Ok((Some(dx), Some(da), Some(db)));
        }
        let dx = self.base.input_grad(x, y, grad)?;
        let (dh, db) = low_rank_grads(grad, h, b)?;
        Ok((Some(dx), Some(dh), Some(db)))
    }
}

/// `h = x·A_effᵀ` (`m x r`) for `m` rows of `x` and `A_eff (r x k)`.
pub(crate) fn hidden(x: &[f32], a: &[f32], (m, r, k): (usize, usize, usize)) -> Result<Vec<f32>> {
    // SAFETY: a gemm that does not accumulate writes all of h.
    unsafe { written_by(m * r, |h| add_x_wt(h, x, a, (m, r, k), false)) }
}

/// The gradients of `(x, A_eff, B)` through `y = x·Wᵀ + b + (x·A_effᵀ)·Bᵀ`
/// from `y`'s gradient `g`: `dX = g·W + (g·B)·A_eff` in one buffer,
/// `dA_eff = (g·B)ᵀ·x` and `dB = gᵀ·h`; `kept` is the forward's `h`, if
/// it was kept.
fn factor_grads(
    base: &Base,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    grad: &Tensor,
    kept: Option<&Vec<f32>>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let ((n, k), (r, _)) = (base.dims2()?, a.dims2()?);
    let m = x.elem_count() / k.max(1);
    let grad = grad.contiguous()?;
    let (x, a, b) = (x.contiguous()?, a.contiguous()?, b.contiguous()?);
    let (dx, da, db) = with_cpu_f32(&grad, "gradient", |g| {
        with_cpu_f32(&x, "input", |xv| {
            with_cpu_f32(&a, "factor A", |av| {
                with_cpu_f32(&b, "factor B", |bv| {
                    let recomputed;
                    let h = match kept {
                        Some(h) => h,
                        None => {
                            recomputed = hidden(xv, av, (m, r, k))?;
                            &recomputed
                        }
                    };
                    // SAFETY (each written_by): a gemm that does not
                    // accumulate writes all of its output.
                    let dh =
                        unsafe { written_by(m * r, |dh| add_g_w(dh, g, n, bv, (m, r, n), false))? };
                    let mut dx = base.input_grad_values(g, (m, n, k))?;
                    add_g_w(&mut dx, &dh, r, av, (m, k, r), true)?;
                    let da = unsafe { written_by(r * k, |da| gt_x(da, &dh, xv, (r, k, m)))? };
                    let db = unsafe { written_by(n * r, |db| gt_x(db, g, h, (n, r, m)))? };
                    Ok((dx, da, db))
                })
            })
        })
    })?;
    let dev = grad.device();
    Ok((
        Tensor::from_vec(dx, x.dims(), dev)?,
        Tensor::from_vec(da, a.dims(), dev)?,
        Tensor::from_vec(db, b.dims(), dev)?,
    ))
}

/// `x·Wᵀ + b + h·Bᵀ` for a frozen base (see the module docs); `None`
/// where the fused op does not apply (a weight with a graph, a trainable
/// bias, few rows on a quantized base, other devices or dtypes), for the
/// caller to compose.
pub(crate) fn low_rank_output(
    x: &Tensor,
    frozen: FrozenWeight,
    h: &Tensor,
    b: &Tensor,
) -> Result<Option<Tensor>> {
    fused(x, frozen, h, b, UpdateInput::Hidden)
}

/// `x·Wᵀ + b + (x·A_effᵀ)·Bᵀ` for a frozen base and an update without
/// dropout, `a` being `A_eff (r x d_in)`; `None` where the fused op does
/// not apply, as for [`low_rank_output`].
pub(crate) fn low_rank_linear(
    x: &Tensor,
    frozen: FrozenWeight,
    a: &Tensor,
    b: &Tensor,
) -> Result<Option<Tensor>> {
    fused(x, frozen, a, b, UpdateInput::Factor)
}

fn fused(
    x: &Tensor,
    frozen: FrozenWeight,
    h: &Tensor,
    b: &Tensor,
    input: UpdateInput,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(f32_cpu(x) && f32_cpu(h) && f32_cpu(b)) {
        return Ok(None);
    }
    if let FrozenWeight::Quantized(q) = frozen {
        // Few rows (decoding) take Candle's quantized kernel instead.
        let k = q.shape().dims2()?.1;
        if x.elem_count() / k.max(1) < GEMM_MIN_ROWS {
            return Ok(None);
        }
    }
    let Some(base) = Base::frozen(frozen) else {
        return Ok(None);
    };
    let y = x.contiguous()?.apply_op3(
        &h.contiguous()?,
        &b.contiguous()?,
        LowRankOutput {
            base,
            input,
            hidden: OnceLock::new(),
        },
    )?;
    Ok(Some(y))
}

/// The gradients of `h` and `B` through `y += h·Bᵀ` from `y`'s gradient:
/// `(grad·B, gradᵀ·h)`, from detached operands so that neither carries the
/// step's graph (a leaf's gradient is stored as given).
fn low_rank_grads(grad: &Tensor, h: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, r) = b.dims2()?;
    let rows = grad.elem_count() / n.max(1);
    let grad = grad.detach().reshape((rows, n))?;
    let dh = grad.matmul(&b.detach())?.reshape(h.dims())?;
    let db = grad.t()?.matmul(&h.detach().reshape((rows, r))?)?;
    Ok((dh, db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quantized_matmul::quantized_matmul;
    use candle::quantized::GgmlDType;
    use candle::{Device, Var};

    /// The fused base-plus-update op against its composition: values and
    /// the gradients of all three inputs.
    #[test]
    fn quantized_base_plus_update_matches_its_composition() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, r) = (96, 64, 4);
        let q = Arc::new(QTensor::quantize(
            &Tensor::randn(0f32, 1.0, (n, k), &dev)?,
            GgmlDType::Q4_1,
        )?);
        let var = |shape: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?);
        let (x, h, b) = (var(&[2, 40, k])?, var(&[2, 40, r])?, var(&[n, r])?);
        let probe = Tensor::randn(0f32, 1.0, (2, 40, n), &dev)?;
        let fused = low_rank_output(&x, FrozenWeight::Quantized(&q), &h, &b)?
            .expect("80 rows take the fused op");
        let update = h.reshape((80, r))?.matmul(&b.t()?)?.reshape((2, 40, n))?;
        let composed = (quantized_matmul(&x, &q)? + update)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(max_diff(&fused, &composed)? < 1e-4);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (composed * &probe)?.sum_all()?.backward()?;
        for v in [&x, &h, &b] {
            let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(max_diff(f, c)? < 1e-3, "{:?}", v.dims());
            assert!(c.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        // Few rows (decoding) are left to the composed path.
        assert!(low_rank_output(
            &x.narrow(1, 0, 1)?,
            FrozenWeight::Quantized(&q),
            &h.narrow(1, 0, 1)?,
            &b
        )?
        .is_none());
        Ok(())
    }

    /// The op that takes `A_eff` itself against its composition, on a
    /// dense base with a bias and on a quantized one: values and the
    /// gradients of the input and both factors.
    #[test]
    fn factor_input_matches_its_composition() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, r) = (96, 64, 4);
        let w = Tensor::randn(0f32, 0.2, (n, k), &dev)?;
        let bias = Tensor::randn(0f32, 0.2, n, &dev)?;
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1)?);
        let var = |shape: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?);
        let (x, a, b) = (var(&[2, 40, k])?, var(&[r, k])?, var(&[n, r])?);
        let probe = Tensor::randn(0f32, 1.0, (2, 40, n), &dev)?;
        let update = x
            .reshape((80, k))?
            .matmul(&a.t()?)?
            .matmul(&b.t()?)?
            .reshape((2, 40, n))?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        let dense_base = x.reshape((80, k))?.matmul(&w.t()?)?.broadcast_add(&bias)?;
        let cases = [
            (
                FrozenWeight::Dense(&w, Some(&bias)),
                dense_base.reshape((2, 40, n))?,
            ),
            (FrozenWeight::Quantized(&q), quantized_matmul(&x, &q)?),
        ];
        for (frozen, base) in cases {
            let fused = low_rank_linear(&x, frozen, &a, &b)?.expect("a frozen f32 base");
            let composed = (base + &update)?;
            assert!(max_diff(&fused, &composed)? < 1e-4);
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gc = (composed * &probe)?.sum_all()?.backward()?;
            for v in [&x, &a, &b] {
                let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(max_diff(f, c)? < 1e-3, "{:?}", v.dims());
                assert!(c.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
                assert!(!f.track_op(), "a leaf's gradient holds no graph");
            }
        }
        Ok(())
    }

    /// The fused base-plus-update op against its composition, with a bias:
    /// values and the gradients of the input, the hidden and the factor; a
    /// weight with a graph is left to the composed path.
    #[test]
    fn dense_base_plus_update_matches_its_composition() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, r) = (35, 48, 4);
        let var = |shape: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?);
        let (x, h, b) = (var(&[2, 9, k])?, var(&[2, 9, r])?, var(&[n, r])?);
        let w = Tensor::randn(0f32, 0.2, (n, k), &dev)?;
        let bias = Tensor::randn(0f32, 0.2, n, &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 9, n), &dev)?;
        let fused = low_rank_output(&x, FrozenWeight::Dense(&w, Some(&bias)), &h, &b)?
            .expect("a frozen f32 base");
        let base = x.reshape((18, k))?.matmul(&w.t()?)?.broadcast_add(&bias)?;
        let update = h.reshape((18, r))?.matmul(&b.t()?)?;
        let composed = (base + update)?.reshape((2, 9, n))?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(max_diff(&fused, &composed)? < 1e-5);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (composed * &probe)?.sum_all()?.backward()?;
        for v in [&x, &h, &b] {
            let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(max_diff(f, c)? < 1e-4, "{:?}", v.dims());
            assert!(c.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
            assert!(!f.track_op(), "a leaf's gradient holds no graph");
        }
        let w_var = Var::from_tensor(&w)?;
        assert!(low_rank_output(
            &x,
            FrozenWeight::Dense(&(w_var.as_tensor() * 1.0)?, None),
            &h,
            &b
        )?
        .is_none());
        Ok(())
    }
}
