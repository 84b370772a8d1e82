//! LoRA-Mini's frozen projections (`A_aux`, `B_aux`): seeded Kaiming, seeded orthogonal, or
//! the truncated SVD of the frozen weight ([`AuxInit`]).

use candle::{DType, Result, Tensor};

use super::base::BaseWeight;
use super::config::{AuxInit, LoraMiniConfig};
use super::init::{kaiming_uniform_values, normal_values};
use crate::rng::fnv1a64_extend;

/// The stream names of the two frozen matrices of module `path`.
fn aux_stream_names(path: &str) -> (String, String) {
    (format!("{path}/A_aux"), format!("{path}/B_aux"))
}

/// The frozen `(A_aux: a x d_in, B_aux: d_out x b)` of module `path` over the
/// frozen `weight` (`d_out x d_in`), row-major f32, exactly as
/// [`super::LoraMiniLinear::new`] makes them. The seeded inits read only the
/// weight's shape; the SVD dequantizes a quantized weight.
pub fn aux_values(
    config: &LoraMiniConfig,
    path: &str,
    weight: &BaseWeight,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (d_out, d_in) = weight.dims2()?;
    let (a_name, b_name) = aux_stream_names(path);
    let (a, b) = (config.a, config.b);
    match config.aux_init {
        AuxInit::Kaiming => Ok((
            kaiming_uniform_values(config.seed, &a_name, a, d_in),
            kaiming_uniform_values(config.seed, &b_name, d_out, b),
        )),
        AuxInit::Orthogonal => {
            check_width(path, "a", a, "d_in", d_in)?;
            check_width(path, "b", b, "d_out", d_out)?;
            let a_rows = orthonormal_rows(config.seed, &a_name, a, d_in);
            // Orthonormal columns of B_aux: orthonormal rows of its transpose.
            let b_cols = orthonormal_rows(config.seed, &b_name, b, d_out);
            Ok((to_f32(&a_rows), to_f32(&transpose(&b_cols, b, d_out))))
        }
        AuxInit::Svd | AuxInit::SvdScaled => {
            let rank = d_out.min(d_in);
            check_width(path, "a", a, "min(d_out, d_in)", rank)?;
            check_width(path, "b", b, "min(d_out, d_in)", rank)?;
            let w = weight_values(&weight.to_dense()?)?;
            let scaled = config.aux_init == AuxInit::SvdScaled;
            truncated_svd_factors(&w, d_out, d_in, a, b, scaled)
                .map_err(|e| candle::Error::msg(format!("module {path}: {e}")))
        }
    }
}

fn check_width(path: &str, name: &str, value: usize, limit: &str, max: usize) -> Result<()> {
    if value > max {
        candle::bail!(
            "module {path}: adapter {name} = {value} exceeds {limit} = {max}, \
             so the frozen projection cannot be orthonormal (use aux_init = \"kaiming\" or a smaller {name})"
        );
    }
    Ok(())
}

/// The weight as row-major f64 values (the SVD runs in f64 whatever the
/// model's dtype).
fn weight_values(weight: &Tensor) -> Result<Vec<f64>> {
    weight.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// A hash of the frozen weight's values (as f32 bits), recorded by adapters
/// whose projections derive from it.
pub fn weight_hash(weight: &Tensor) -> Result<String> {
    let values = weight
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let dims = weight.dims().iter().map(|d| (*d as u64).to_le_bytes());
    let h = dims.fold(0xCBF2_9CE4_8422_2325, |h, d| fnv1a64_extend(h, &d));
    Ok(format!("fnv1a64:{:016x}", extend_values(h, values.iter())))
}

/// A hash of f32 values by their bits.
pub fn values_hash<'a>(values: impl Iterator<Item = &'a f32>) -> String {
    format!(
        "fnv1a64:{:016x}",
        extend_values(0xCBF2_9CE4_8422_2325, values)
    )
}

fn extend_values<'a>(h: u64, values: impl Iterator<Item = &'a f32>) -> u64 {
    values.fold(h, |h, v| fnv1a64_extend(h, &v.to_bits().to_le_bytes()))
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn transpose(v: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; v.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = v[i * cols + j];
        }
    }
    out
}

/// `rows` orthonormal vectors of length `cols` (`rows ≤ cols`), row-major:
/// Gaussian draws from the stream `name`, orthonormalised by modified
/// Gram–Schmidt, run twice so orthogonality holds to f64 precision. Plain
/// sequential f64 arithmetic, so the bits are the same on every platform.
pub fn orthonormal_rows(seed: u64, name: &str, rows: usize, cols: usize) -> Vec<f64> {
    let mut q: Vec<f64> = normal_values(seed, name, rows * cols, 1.0)
        .into_iter()
        .map(f64::from)
        .collect();
    for i in 0..rows {
        for _pass in 0..2 {
            for j in 0..i {
                let dot: f64 = (0..cols).map(|k| q[i * cols + k] * q[j * cols + k]).sum();
                for k in 0..cols {
                    q[i * cols + k] -= dot * q[j * cols + k];
                }
            }
        }
        let norm = (0..cols)
            .map(|k| q[i * cols + k] * q[i * cols + k])
            .sum::<f64>()
            .sqrt();
        for k in 0..cols {
            q[i * cols + k] /= norm;
        }
    }
    q
}

/// `(A_aux, B_aux)` from the thin SVD `W = U·Σ·Vᵀ` of the row-major
/// `d_out x d_in` matrix `w`: `A_aux = V_aᵀ` (`a x d_in`) and `B_aux = U_b`
/// (`d_out x b`), or `U_b·Σ_b` when `scaled`. Each singular pair's sign is
/// fixed (the largest entry of `u_i` is positive), since an SVD routine may
/// return `(-u_i, -v_i)` and the trained inner matrices depend on the sign.
pub fn truncated_svd_factors(
    w: &[f64],
    d_out: usize,
    d_in: usize,
    a: usize,
    b: usize,
    scaled: bool,
) -> std::result::Result<(Vec<f32>, Vec<f32>), String> {
    let m = faer::Mat::<f64>::from_fn(d_out, d_in, |i, j| w[i * d_in + j]);
    let svd = m
        .thin_svd()
        .map_err(|e| format!("the SVD of the frozen weight did not converge ({e:?})"))?;
    let (u, v) = (svd.U(), svd.V());
    let s = svd.S().column_vector();
    let sign: Vec<f64> = (0..a.max(b))
        .map(|i| {
            let col = (0..d_out).map(|r| u[(r, i)]);
            let largest = col.fold(
                0.0f64,
                |best, x| if x.abs() > best.abs() { x } else { best },
            );
            if largest < 0.0 {
                -1.0
            } else {
                1.0
            }
        })
        .collect();
    let a_aux: Vec<f32> = (0..a)
        .flat_map(|i| (0..d_in).map(move |j| (i, j)))
        .map(|(i, j)| (sign[i] * v[(j, i)]) as f32)
        .collect();
    let b_aux: Vec<f32> = (0..d_out)
        .flat_map(|r| (0..b).map(move |i| (r, i)))
        .map(|(r, i)| {
            let scale = if scaled { s[i] } else { 1.0 };
            (sign[i] * u[(r, i)] * scale) as f32
        })
        .collect();
    Ok((a_aux, b_aux))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gram(q: &[f32], rows: usize, cols: usize) -> Vec<f64> {
        let mut g = vec![0.0; rows * rows];
        for i in 0..rows {
            for j in 0..rows {
                g[i * rows + j] = (0..cols)
                    .map(|k| q[i * cols + k] as f64 * q[j * cols + k] as f64)
                    .sum();
            }
        }
        g
    }

    fn assert_identity(g: &[f64], n: usize) {
        for i in 0..n {
            for j in 0..n {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!(
                    (g[i * n + j] - want).abs() < 1e-5,
                    "QQᵀ[{i},{j}] = {}",
                    g[i * n + j]
                );
            }
        }
    }

    #[test]
    fn orthogonal_projections_are_orthonormal() -> Result<()> {
        let config = LoraMiniConfig {
            aux_init: AuxInit::Orthogonal,
            ..LoraMiniConfig::new(2, 12, 10)
        };
        let w = Tensor::zeros((40, 30), DType::F32, &candle::Device::Cpu)?;
        let (a, b) = aux_values(&config, "m", &BaseWeight::Dense(w.clone()))?;
        assert_identity(&gram(&a, 12, 30), 12);
        // Columns of B_aux (40 x 10): rows of its transpose.
        let bt: Vec<f32> = (0..10)
            .flat_map(|i| (0..40).map(move |r| (r, i)))
            .map(|(r, i)| b[r * 10 + i])
            .collect();
        assert_identity(&gram(&bt, 10, 40), 10);
        // Seeded: the same config and path give the same bits.
        assert_eq!(
            aux_values(&config, "m", &BaseWeight::Dense(w.clone()))?,
            (a, b)
        );
        Ok(())
    }

    #[test]
    fn too_wide_a_projection_is_refused_naming_the_module() {
        let config = LoraMiniConfig {
            aux_init: AuxInit::Orthogonal,
            ..LoraMiniConfig::new(2, 64, 8)
        };
        let w = Tensor::zeros((16, 32), DType::F32, &candle::Device::Cpu).unwrap();
        let err = aux_values(&config, "layer.0.query", &BaseWeight::Dense(w.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer.0.query") && err.contains("a = 64"),
            "{err}"
        );
    }

    /// A matrix built from known singular vectors and values: the top-k
    /// factors span the known subspaces, and the error of the rank-k
    /// reconstruction `B_aux·(B_auxᵀ W A_auxᵀ)·A_aux` equals the discarded
    /// singular values' norm.
    #[test]
    fn svd_factors_reconstruct_up_to_the_discarded_singular_values() {
        let (d_out, d_in, k) = (9, 7, 3);
        let u = orthonormal_rows(1, "u", d_in, d_out); // 7 orthonormal rows of length 9
        let v = orthonormal_rows(2, "v", d_in, d_in);
        let sigma = [5.0, 4.0, 3.0, 1.0, 0.5, 0.25, 0.1];
        let mut w = vec![0.0; d_out * d_in];
        for (i, s) in sigma.iter().enumerate() {
            for r in 0..d_out {
                for c in 0..d_in {
                    w[r * d_in + c] += s * u[i * d_out + r] * v[i * d_in + c];
                }
            }
        }
        let (a_aux, b_aux) = truncated_svd_factors(&w, d_out, d_in, k, k, false).unwrap();
        // P = B_aux B_auxᵀ W A_auxᵀ A_aux, the projection onto the top-k pairs.
        let a = |i: usize, c: usize| a_aux[i * d_in + c] as f64;
        let b = |r: usize, i: usize| b_aux[r * k + i] as f64;
        let mut err2 = 0.0;
        for r in 0..d_out {
            for c in 0..d_in {
                let mut p = 0.0;
                for i in 0..k {
                    for j in 0..k {
                        // core[i][j] = u_iᵀ W v_j
                        let core: f64 = (0..d_out)
                            .flat_map(|rr| (0..d_in).map(move |cc| (rr, cc)))
                            .map(|(rr, cc)| b(rr, i) * w[rr * d_in + cc] * a(j, cc))
                            .sum();
                        p += b(r, i) * core * a(j, c);
                    }
                }
                err2 += (w[r * d_in + c] - p).powi(2);
            }
        }
        let discarded: f64 = sigma[k..].iter().map(|s| s * s).sum();
        assert!(
            (err2.sqrt() - discarded.sqrt()).abs() < 1e-5,
            "reconstruction error {} vs discarded {}",
            err2.sqrt(),
            discarded.sqrt()
        );
        // Scaled: B_aux's columns carry the singular values.
        let (_, scaled) = truncated_svd_factors(&w, d_out, d_in, k, k, true).unwrap();
        let norm0 = (0..d_out)
            .map(|r| (scaled[r * k] as f64).powi(2))
            .sum::<f64>();
        assert!((norm0.sqrt() - 5.0).abs() < 1e-5, "{}", norm0.sqrt());
        // Signs are canonical: each B_aux column's largest entry is positive.
        for i in 0..k {
            let col: Vec<f32> = (0..d_out).map(|r| b_aux[r * k + i]).collect();
            let largest = col
                .iter()
                .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
            assert!(largest > 0.0);
        }
    }
}
