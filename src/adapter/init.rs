//! Seeded, portable initialisers that produce Candle tensors.

use candle::{DType, Device, Result, Tensor};

use crate::rng::SeededRng;

/// PyTorch's `kaiming_uniform_(w, a=sqrt(5))` bound for a weight with
/// `fan_in` input columns: `gain·sqrt(3/fan_in)` with `gain = sqrt(2/(1+a²))`,
/// which simplifies to `1/sqrt(fan_in)`. `nn.Linear` and PEFT's `lora_A` use it.
pub fn kaiming_uniform_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

/// The values of a `(rows, cols)` Kaiming-uniform matrix (fan-in `cols`) drawn
/// from the stream `name` under `seed`, in row-major order. The same inputs give
/// bit-identical values everywhere.
pub fn kaiming_uniform_values(seed: u64, name: &str, rows: usize, cols: usize) -> Vec<f32> {
    SeededRng::for_stream(seed, name)
        .uniform_symmetric_f32(rows * cols, kaiming_uniform_bound(cols))
}

/// A `(rows, cols)` Kaiming-uniform tensor; see [`kaiming_uniform_values`].
///
/// ```
/// use candle::{DType, Device};
/// use lora_mini::adapter::init::kaiming_uniform;
/// let w = kaiming_uniform(7, "layer.A", 4, 16, DType::F32, &Device::Cpu)?;
/// let bound = 0.25f32; // 1/sqrt(16)
/// assert!(w.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.abs() <= bound));
/// # Ok::<(), candle::Error>(())
/// ```
pub fn kaiming_uniform(
    seed: u64,
    name: &str,
    rows: usize,
    cols: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    Tensor::from_vec(
        kaiming_uniform_values(seed, name, rows, cols),
        (rows, cols),
        device,
    )?
    .to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_matches_pytorch_formula() {
        let a = 5f64.sqrt();
        let gain = (2.0 / (1.0 + a * a)).sqrt();
        let fan_in = 768;
        let torch_bound = gain * (3.0 / fan_in as f64).sqrt();
        assert!((kaiming_uniform_bound(fan_in) - torch_bound).abs() < 1e-15);
    }

    #[test]
    fn values_depend_on_seed_and_name_only() {
        let a = kaiming_uniform_values(1, "m.A_aux", 3, 5);
        assert_eq!(a, kaiming_uniform_values(1, "m.A_aux", 3, 5));
        assert_ne!(a, kaiming_uniform_values(2, "m.A_aux", 3, 5));
        assert_ne!(a, kaiming_uniform_values(1, "m.B_aux", 3, 5));
        // A prefix of a larger draw: rows are drawn in order.
        assert_eq!(a[..5], kaiming_uniform_values(1, "m.A_aux", 1, 5)[..]);
    }
}

/// `n` values from `N(0, std²)` (Box–Muller on the stream `name`), as
/// transformers initialises a new task head's weights.
pub fn normal_values(seed: u64, name: &str, n: usize, std: f64) -> Vec<f32> {
    let mut rng = SeededRng::for_stream(seed, name);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // 1 - u lies in (0, 1], so the log is finite.
        let radius = (-2.0 * (1.0 - rng.next_f64()).ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * rng.next_f64();
        out.push((radius * angle.cos() * std) as f32);
        out.push((radius * angle.sin() * std) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod normal_tests {
    use super::normal_values;

    #[test]
    fn normal_values_have_the_asked_spread() {
        let v = normal_values(1, "head", 20_001, 0.02);
        assert_eq!(v.len(), 20_001);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let std =
            (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
            "mean {mean} std {std}"
        );
    }
}
