//! Seeded dropout on an adapter's input.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle::{Result, Tensor};
use rayon::prelude::*;

use crate::rng::{stream_seed, SeededRng};

/// Elements per independently seeded block of a mask.
const MASK_BLOCK: usize = 1 << 14;

/// Inverted dropout whose masks come from the crate's seeded RNG.
///
/// Masks are counter-based: the `k`-th training call draws from streams
/// derived from `(seed, name, k)`, one per block of 16,384 elements so that
/// blocks are drawn in parallel. The whole state is therefore one counter,
/// which [`SeededDropout::calls`] and [`SeededDropout::set_calls`] expose so a
/// checkpoint can resume the exact same sequence of masks. Clones share the
/// counter.
#[derive(Clone, Debug)]
pub struct SeededDropout {
    p: f64,
    stream: u64,
    calls: Arc<AtomicU64>,
    /// What `Module::forward` does (see [`SeededDropout::set_training`]).
    training: Arc<AtomicBool>,
}

impl SeededDropout {
    pub fn new(p: f64, seed: u64, name: &str) -> Self {
        Self {
            p,
            stream: stream_seed(seed, &format!("{name}/dropout")),
            calls: Arc::new(AtomicU64::new(0)),
            training: Arc::new(AtomicBool::new(true)),
        }
    }

    pub fn p(&self) -> f64 {
        self.p
    }

    /// How many masks have been drawn.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub fn set_calls(&self, calls: u64) {
        self.calls.store(calls, Ordering::Relaxed)
    }

    /// Whether [`candle::Module::forward`] drops: `true` until switched off.
    /// Clones share the flag.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed)
    }

    /// Applies dropout in training and is the identity otherwise.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(xs.clone());
        }
        let mask = self.next_mask(xs.elem_count(), self.keep_scale(), 0f32);
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs.mul(&mask)
    }

    /// `1 / (1 - p)`, the factor kept elements are scaled by.
    pub fn keep_scale(&self) -> f32 {
        (1.0 / (1.0 - self.p)) as f32
    }

    /// Draws the next training mask over `n` elements (advancing the
    /// counter), with `keep` where an element is kept and `drop` where it is
    /// dropped. [`SeededDropout::forward_t`] multiplies by the mask with
    /// `keep = 1/(1-p)`, `drop = 0`; fused kernels that apply dropout
    /// themselves draw the same mask as bytes.
    pub fn next_mask<T: Copy + Send + Sync>(&self, n: usize, keep: T, drop: T) -> Vec<T> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let call_stream = self.stream ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let p = self.p as f32;
        let mut mask = vec![drop; n];
        mask.par_chunks_mut(MASK_BLOCK)
            .enumerate()
            .for_each(|(block, values)| {
                let mut rng = SeededRng::new(
                    call_stream ^ (block as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
                );
                for v in values {
                    *v = if rng.next_f32() < p { drop } else { keep };
                }
            });
        mask
    }
}

/// Dropout in the layer's mode: training unless switched off.
impl candle::Module for SeededDropout {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, self.is_training())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn drops_about_p_and_rescales() -> Result<()> {
        let d = SeededDropout::new(0.25, 9, "m");
        let x = Tensor::ones((100, 100), candle::DType::F32, &Device::Cpu)?;
        let y: Vec<f32> = d.forward_t(&x, true)?.flatten_all()?.to_vec1()?;
        let zeros = y.iter().filter(|&&v| v == 0.0).count();
        assert!((2200..2800).contains(&zeros), "{zeros} zeros");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        // Eval is the identity and draws nothing.
        assert_eq!(
            d.forward_t(&x, false)?.to_vec2::<f32>()?,
            x.to_vec2::<f32>()?
        );
        assert_eq!(d.calls(), 1);
        // Blocks of a large mask come from distinct streams.
        let big: Vec<f32> = d
            .forward_t(
                &Tensor::ones(3 * MASK_BLOCK, candle::DType::F32, &Device::Cpu)?,
                true,
            )?
            .to_vec1()?;
        let blocks: Vec<&[f32]> = big.chunks(MASK_BLOCK).collect();
        assert!(blocks[0] != blocks[1] && blocks[1] != blocks[2]);
        Ok(())
    }

    #[test]
    fn masks_replay_from_the_counter() -> Result<()> {
        let x = Tensor::ones((8, 8), candle::DType::F32, &Device::Cpu)?;
        let d = SeededDropout::new(0.5, 1, "m");
        let first = d.forward_t(&x, true)?.to_vec2::<f32>()?;
        let second = d.forward_t(&x, true)?.to_vec2::<f32>()?;
        assert_ne!(first, second);
        let resumed = SeededDropout::new(0.5, 1, "m");
        resumed.set_calls(1);
        assert_eq!(resumed.forward_t(&x, true)?.to_vec2::<f32>()?, second);
        Ok(())
    }
}
