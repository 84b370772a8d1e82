//! Token-by-token decoding for causal language models: greedy by default,
//! or seeded sampling (temperature, top-k, top-p) that repeats exactly for
//! a seed.

use candle::{Result, Tensor};

use crate::rng::SeededRng;

/// How the next token is picked from the logits.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first on ties).
    Greedy,
    /// Sampled from the softmax at `temperature`, restricted to the `top_k`
    /// most likely tokens (0: all) and then to the smallest set whose
    /// probability reaches `top_p` (1: all), drawn from the crate's
    /// portable RNG seeded with `seed`.
    Sample {
        temperature: f64,
        top_k: usize,
        top_p: f64,
        seed: u64,
    },
}

/// Picks tokens as a [`Sampling`] says, keeping its RNG across calls.
#[derive(Clone, Debug)]
pub struct Sampler {
    sampling: Sampling,
    rng: SeededRng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Result<Self> {
        let seed = match &sampling {
            Sampling::Greedy => 0,
            Sampling::Sample {
                temperature,
                top_p,
                seed,
                ..
            } => {
                if temperature.is_nan() || *temperature <= 0.0 {
                    candle::bail!("temperature must be above 0 (use greedy decoding for 0), got {temperature}");
                }
                if top_p.is_nan() || *top_p <= 0.0 || *top_p > 1.0 {
                    candle::bail!("top_p must be in (0, 1], got {top_p}");
                }
                *seed
            }
        };
        Ok(Self {
            sampling,
            rng: SeededRng::new(seed),
        })
    }

    /// The next token for `logits (vocab)`.
    pub fn pick(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.to_dtype(candle::DType::F32)?.to_vec1()?;
        Ok(match &self.sampling {
            Sampling::Greedy => argmax(&logits),
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                ..
            } => {
                let candidates = nucleus(&logits, *temperature, *top_k, *top_p);
                let mut u = self.rng.next_f64();
                let mut chosen = candidates[candidates.len() - 1].0;
                for (id, p) in &candidates {
                    if u < *p {
                        chosen = *id;
                        break;
                    }
                    u -= p;
                }
                chosen
            }
        })
    }
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// `(token, probability)` of the tokens top-k and top-p keep, most likely
/// first, renormalised to sum to 1.
fn nucleus(logits: &[f32], temperature: f64, top_k: usize, top_p: f64) -> Vec<(u32, f64)> {
    let mut order: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, *l as f64 / temperature))
        .collect();
    // Stable: equal logits keep token order, so a seed repeats exactly.
    order.sort_by(|a, b| b.1.total_cmp(&a.1));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let max = order[0].1;
    let total: f64 = order.iter().map(|(_, l)| (l - max).exp()).sum();
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (id, l) in order {
        let p = (l - max).exp() / total;
        kept.push((id, p));
        mass += p;
        if mass >= top_p {
            break;
        }
    }
    kept.iter_mut().for_each(|(_, p)| *p /= mass);
    kept
}

/// The caller's check on the tokens generated so far: true stops.
pub type StopCheck<'a> = &'a mut dyn FnMut(&[u32]) -> bool;

/// What ends a generation besides `max_new_tokens`: one of `eos_ids`, or
/// the caller's `stop` check on the tokens so far (stop strings, which need
/// the tokenizer the model does not have).
pub struct Generation<'a> {
    pub max_new_tokens: usize,
    pub eos_ids: Vec<u32>,
    pub stop: Option<StopCheck<'a>>,
}

/// Runs `next_logits` (logits after the given new tokens, the model keeping
/// its own cache) from `prompt` until an end, returning the new tokens
/// (an EOS token is not included).
pub fn generate(
    prompt: &[u32],
    sampler: &mut Sampler,
    mut generation: Generation,
    mut next_logits: impl FnMut(&[u32]) -> Result<Tensor>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        candle::bail!("cannot generate from an empty prompt");
    }
    let mut out = Vec::new();
    let mut logits = next_logits(prompt)?;
    while out.len() < generation.max_new_tokens {
        let token = sampler.pick(&logits)?;
        if generation.eos_ids.contains(&token) {
            break;
        }
        out.push(token);
        if let Some(stop) = generation.stop.as_mut() {
            if stop(&out) {
                break;
            }
        }
        if out.len() < generation.max_new_tokens {
            logits = next_logits(&[token])?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    fn logits(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn greedy_takes_the_first_maximum() -> Result<()> {
        let mut s = Sampler::new(Sampling::Greedy)?;
        assert_eq!(s.pick(&logits(&[0.1, 2.0, 2.0, -1.0]))?, 1);
        Ok(())
    }

    #[test]
    fn sampling_repeats_for_a_seed_and_respects_top_k() -> Result<()> {
        let sampling = |seed| Sampling::Sample {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
            seed,
        };
        let l = logits(&[1.0, 0.9, 0.8, 0.7, 5.0, -3.0]);
        let draw = |seed| -> Result<Vec<u32>> {
            let mut s = Sampler::new(sampling(seed))?;
            (0..200).map(|_| s.pick(&l)).collect()
        };
        let a = draw(7)?;
        assert_eq!(a, draw(7)?);
        assert_ne!(a, draw(8)?);
        assert!(a.iter().all(|t| [4, 0, 1].contains(t)), "top-3 only: {a:?}");
        assert!(
            a.iter().filter(|t| **t == 4).count() > 150,
            "the likely token dominates"
        );
        Ok(())
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let kept = nucleus(&[0.0, (3f32).ln(), -30.0], 1.0, 0, 0.7);
        assert_eq!(kept.len(), 1, "0.75 alone reaches 0.7: {kept:?}");
        assert_eq!(kept[0].0, 1);
        let kept = nucleus(&[0.0, (3f32).ln(), -30.0], 1.0, 0, 0.9);
        assert_eq!(kept.iter().map(|k| k.0).collect::<Vec<_>>(), vec![1, 0]);
        assert!((kept.iter().map(|k| k.1).sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn generation_stops_at_eos_and_at_the_callers_check() -> Result<()> {
        // A fake model: after token t comes t + 1.
        let next = |toks: &[u32]| {
            let mut v = vec![0f32; 10];
            v[(*toks.last().unwrap() as usize + 1) % 10] = 1.0;
            Ok(logits(&v))
        };
        let mut s = Sampler::new(Sampling::Greedy)?;
        let g = |eos| Generation {
            max_new_tokens: 20,
            eos_ids: vec![eos],
            stop: None,
        };
        assert_eq!(generate(&[2], &mut s, g(6), next)?, vec![3, 4, 5]);
        let mut at_5 = |t: &[u32]| t.ends_with(&[5]);
        let g = Generation {
            max_new_tokens: 20,
            eos_ids: vec![],
            stop: Some(&mut at_5),
        };
        assert_eq!(generate(&[2], &mut s, g, next)?, vec![3, 4, 5]);
        let g = Generation {
            max_new_tokens: 2,
            eos_ids: vec![],
            stop: None,
        };
        assert_eq!(generate(&[2], &mut s, g, next)?, vec![3, 4]);
        Ok(())
    }
}
