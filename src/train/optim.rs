//! AdamW with parameter groups (each its own learning rate and weight
//! decay), per-parameter decay rules, f32 moments and master weights, and
//! state that saves and loads.
//!
//! candle-nn's `AdamW` applies one weight decay to every parameter, keeps its
//! moments in the parameter's dtype and hides its state, so it can neither
//! follow Hugging Face's convention (no decay on biases and norm weights) nor
//! be checkpointed.

use std::collections::BTreeMap;

use candle::backprop::GradStore;
use candle::{DType, Result, Tensor, Var};

/// AdamW's hyper-parameters (the learning rate comes with each step).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Hugging Face's rule: biases and layer-norm weights get no weight decay.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias")
        || name.contains("LayerNorm")
        || name.contains("layer_norm")
        || name.ends_with("norm.weight"))
}

/// A set of parameters trained at their own learning rate and weight decay,
/// like a PyTorch optimizer's `param_groups` entry. Methods with frozen
/// random projections (LoRA-Mini, VeRA) train their small cores at a much
/// higher rate than the task head can take, so the head gets a group of its
/// own.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ParamGroup {
    /// A short name for logs and `results.json` (`adapter`, `head`).
    pub name: String,
    /// The group's peak learning rate, relative to which the schedule is
    /// applied: at a step where the scheduled base rate is `lr`, this group
    /// trains at `lr · lr_scale`.
    pub lr_scale: f64,
    pub weight_decay: f64,
    /// The full names of the tensors in the group.
    pub tensors: Vec<String>,
}

struct Slot {
    name: String,
    var: Var,
    /// The learning-rate multiplier and weight decay of the slot's group.
    lr_scale: f64,
    weight_decay: f64,
    /// f32 copy of the parameter when it is not f32 itself.
    master: Option<Tensor>,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW over named `Var`s (e.g. `AdapterRegistry::trainable()`), in
/// parameter groups. Named apart from candle-nn's `AdamW`, whose
/// `Optimizer` trait it does not implement.
///
/// Not candle-nn's `Optimizer`: that trait has no names, so it can neither
/// skip decay on biases nor save its state by parameter.
pub struct GroupedAdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl GroupedAdamW {
    /// One group: every parameter at the step's learning rate and
    /// `config.weight_decay`.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                // Detached: a copy made from the `Var` would record an op on
                // it, and every step's master would then hold the previous
                // one alive through its graph.
                let master = (var.dtype() != DType::F32)
                    .then(|| var.as_tensor().detach().to_dtype(DType::F32))
                    .transpose()?;
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(Slot {
                    decay: decays(&name),
                    lr_scale: 1.0,
                    weight_decay: config.weight_decay,
                    name,
                    var,
                    master,
                    m: zeros.clone(),
                    v: zeros,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            slots,
            step: 0,
        })
    }

    /// Moves the parameters named in `group.tensors` into that group: they
    /// then train at `lr · group.lr_scale` with `group.weight_decay`. A name
    /// the optimizer does not hold is an error naming it.
    pub fn set_group(&mut self, group: &ParamGroup) -> Result<()> {
        for name in &group.tensors {
            let Some(slot) = self.slots.iter_mut().find(|s| &s.name == name) else {
                candle::bail!("parameter group {}: no parameter {name}", group.name);
            };
            slot.lr_scale = group.lr_scale;
            slot.weight_decay = group.weight_decay;
        }
        Ok(())
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update with base learning rate `lr` (each group scales it) from
    /// `grads`, each gradient first
    /// multiplied by `grad_scale` (for clipping). Parameters without a
    /// gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        let by_name: BTreeMap<String, Tensor> = self
            .slots
            .iter()
            .filter_map(|s| {
                grads
                    .get(s.var.as_tensor())
                    .map(|g| (s.name.clone(), g.clone()))
            })
            .collect();
        self.step_with(&by_name, lr, grad_scale)
    }

    /// [`Self::step`] with gradients by parameter name (e.g. accumulated
    /// over several micro-batches).
    pub fn step_with(
        &mut self,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.name) else {
                continue;
            };
            // The optimizer's state must never hold a graph, whatever op
            // produced the gradient (an op's backward may return one built
            // from tracked tensors) and whatever the parameter is.
            let g = (g.detach().to_dtype(DType::F32)? * grad_scale)?;
            slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&slot.m / bc1)? / ((&slot.v / bc2)?.sqrt()? + c.eps)?)?;
            let param = match &slot.master {
                Some(m) => m.clone(),
                None => slot.var.as_tensor().detach(),
            };
            let lr = lr * slot.lr_scale;
            let decayed = if slot.decay && slot.weight_decay > 0.0 {
                (&param * (1.0 - lr * slot.weight_decay))?
            } else {
                param
            };
            let next = (decayed - (update * lr)?)?;
            match &mut slot.master {
                Some(m) => {
                    slot.var.set(&next.to_dtype(slot.var.dtype())?)?;
                    *m = next;
                }
                None => slot.var.set(&next)?,
            }
        }
        Ok(())
    }

    /// Moments (and master weights) by parameter name, for checkpoints.
    pub fn state(&self) -> (u64, BTreeMap<String, Tensor>) {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            out.insert(format!("{}.exp_avg", s.name), s.m.clone());
            out.insert(format!("{}.exp_avg_sq", s.name), s.v.clone());
            if let Some(m) = &s.master {
                out.insert(format!("{}.master", s.name), m.clone());
            }
        }
        (self.step, out)
    }

    /// Restores [`Self::state`]; a missing or misshapen entry is an error
    /// naming the parameter.
    pub fn load_state(&mut self, step: u64, state: &BTreeMap<String, Tensor>) -> Result<()> {
        for s in &mut self.slots {
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{}.{suffix}", s.name);
                let t = state
                    .get(&key)
                    .ok_or_else(|| candle::Error::msg(format!("optimizer state has no {key}")))?;
                if t.dims() != s.var.dims() {
                    candle::bail!(
                        "optimizer state {key} has shape {:?}, the parameter {:?}",
                        t.dims(),
                        s.var.dims()
                    );
                }
                t.to_dtype(DType::F32)?.to_device(s.var.device())
            };
            s.m = get("exp_avg")?;
            s.v = get("exp_avg_sq")?;
            if s.master.is_some() {
                s.master = Some(get("master")?);
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of gradients by parameter name (what clipping scales).
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    /// Moments and master weights hold no graph after a step, even for a
    /// bf16 parameter (master copy) and a gradient that carries one.
    #[test]
    fn state_holds_no_graph() -> Result<()> {
        let w =
            Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu)?.to_dtype(DType::BF16)?)?;
        let mut opt =
            GroupedAdamW::new(vec![("l.weight".into(), w.clone())], AdamWConfig::default())?;
        let tracked = Var::new(&[0.5f32, 0.25], &Device::Cpu)?;
        for _ in 0..2 {
            let grad = (tracked.as_tensor() * 2.0)?;
            assert!(grad.track_op());
            opt.step_with(&[("l.weight".to_string(), grad)].into(), 1e-2, 1.0)?;
        }
        for (name, t) in opt.state().1 {
            assert!(!t.track_op(), "{name} holds a graph");
        }
        Ok(())
    }

    #[test]
    fn matches_the_adamw_update_rule_and_skips_decay_on_biases() -> Result<()> {
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu)?)?;
        let b = Var::from_tensor(&Tensor::new(&[0.5f32], &Device::Cpu)?)?;
        let mut opt = GroupedAdamW::new(
            vec![("l.weight".into(), w.clone()), ("l.bias".into(), b.clone())],
            AdamWConfig::default(),
        )?;
        let loss = ((w.as_tensor() * 3.0)?.sum_all()? + (b.as_tensor() * 2.0)?.sum_all()?)?;
        opt.step(&loss.backward()?, 0.1, 1.0)?;
        // Step 1: m̂ = g, v̂ = g², update = g/(|g|+eps) ≈ sign(g).
        let w1: Vec<f32> = w.as_tensor().to_vec1()?;
        assert!(
            (w1[0] - (1.0 * (1.0 - 0.1 * 0.01) - 0.1)).abs() < 1e-6,
            "{w1:?}"
        );
        assert!((w1[1] - (-2.0 * (1.0 - 0.1 * 0.01) - 0.1)).abs() < 1e-6);
        let b1: Vec<f32> = b.as_tensor().to_vec1()?;
        assert!(
            (b1[0] - (0.5 - 0.1)).abs() < 1e-6,
            "bias must not decay: {b1:?}"
        );
        Ok(())
    }

    /// Step 1 of Adam moves each parameter by about `lr·sign(g)`, so each
    /// group's own rate (and decay) shows in the first update.
    #[test]
    fn each_group_trains_at_its_own_rate() -> Result<()> {
        let a = Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu)?)?;
        let head = Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu)?)?;
        let mut opt = GroupedAdamW::new(
            vec![
                ("m.lora_mini_A_in".into(), a.clone()),
                ("classifier.weight".into(), head.clone()),
            ],
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        opt.set_group(&ParamGroup {
            name: "head".into(),
            lr_scale: 0.1,
            weight_decay: 0.5,
            tensors: vec!["classifier.weight".into()],
        })?;
        let loss = (a.as_tensor() + head.as_tensor())?.sum_all()?;
        opt.step(&loss.backward()?, 1e-2, 1.0)?;
        let moved = |v: &Var| 1.0 - v.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!(
            (moved(&a) - 1e-2).abs() < 1e-6,
            "adapter moved {}",
            moved(&a)
        );
        // lr 1e-3, and decay 0.5 at that rate: 1 - (1 - 5e-4) + 1e-3.
        assert!(
            (moved(&head) - 1.5e-3).abs() < 1e-6,
            "head moved {}",
            moved(&head)
        );
        let unknown = ParamGroup {
            name: "head".into(),
            lr_scale: 1.0,
            weight_decay: 0.0,
            tensors: vec!["nope".into()],
        };
        let err = opt.set_group(&unknown).unwrap_err().to_string();
        assert!(err.contains("no parameter nope"), "{err}");
        Ok(())
    }

    #[test]
    fn state_round_trips() -> Result<()> {
        let make = || -> Result<(Var, GroupedAdamW)> {
            let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu)?)?;
            let opt = GroupedAdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default())?;
            Ok((w, opt))
        };
        let (w, mut a) = make()?;
        for _ in 0..3 {
            let loss = w.as_tensor().sqr()?.sum_all()?;
            a.step(&loss.backward()?, 0.05, 1.0)?;
        }
        let (w2, mut b) = make()?;
        w2.set(w.as_tensor())?;
        let (step, state) = a.state();
        b.load_state(step, &state)?;
        for (var, opt) in [(&w, &mut a), (&w2, &mut b)] {
            let loss = var.as_tensor().sqr()?.sum_all()?;
            opt.step(&loss.backward()?, 0.05, 1.0)?;
        }
        assert_eq!(
            w.as_tensor().to_vec1::<f32>()?,
            w2.as_tensor().to_vec1::<f32>()?
        );
        Ok(())
    }
}
