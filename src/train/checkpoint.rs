//! Training checkpoints: everything a run needs to continue exactly where it
//! stopped, in one safetensors file written atomically.
//!
//! Tensors: the trainable parameters as `param/<name>` and the optimiser's
//! moments (and f32 master weights) as `optim/<name>.<exp_avg|exp_avg_sq|master>`.
//! Metadata: `format` (`lora-mini-checkpoint`), `version` (1), `state` (a
//! [`RunState`] as JSON) and `config` (the resolved TOML config). One file
//! renamed into place means a crash at any moment leaves either the previous
//! checkpoint or the new one, never a mixture.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::GroupedAdamW;
use crate::adapter::AdapterRegistry;
use crate::io::write_safetensors_atomic;

const FORMAT: &str = "lora-mini-checkpoint";
const VERSION: &str = "1";

/// The best evaluation so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// The headline metric (what "best" compares).
    pub value: Option<f64>,
    /// The dev metrics at the best step.
    pub metrics: BTreeMap<String, Option<f64>>,
    /// The validation-slice metrics at the best step, when a run holds one
    /// out (`task.validation_split`); `value` is then read from them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub validation: BTreeMap<String, Option<f64>>,
    pub step: u64,
}

/// Where a run stands between two optimiser steps.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Optimiser steps taken.
    pub step: u64,
    /// The epoch in progress and the index of its next batch: the data
    /// order of an epoch is a function of the seed and the epoch, so these
    /// two numbers are the data position.
    pub epoch: usize,
    pub next_batch: usize,
    /// Training examples consumed.
    pub seen: usize,
    /// Every dropout's mask counter ([`AdapterRegistry::dropout_state`]).
    pub dropout: BTreeMap<String, u64>,
    pub best: Best,
    /// Training seconds spent before this checkpoint (for throughput and
    /// wall time across interruptions).
    pub train_seconds: f64,
}

/// Writes a checkpoint of `registry`'s trainable tensors, `optimizer`'s
/// state and `state` to `path` (temp file, then rename).
pub fn save_checkpoint(
    path: &Path,
    registry: &AdapterRegistry,
    optimizer: &GroupedAdamW,
    state: &RunState,
    config_toml: &str,
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (name, var) in registry.trainable() {
        tensors.insert(
            format!("param/{name}"),
            var.as_tensor().to_device(&Device::Cpu)?,
        );
    }
    let (_, moments) = optimizer.state();
    for (name, t) in moments {
        tensors.insert(format!("optim/{name}"), t.to_device(&Device::Cpu)?);
    }
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), VERSION.to_string()),
        (
            "state".to_string(),
            serde_json::to_string(state).map_err(candle::Error::wrap)?,
        ),
        ("config".to_string(), config_toml.to_string()),
    ]);
    write_safetensors_atomic(path, &tensors, metadata)
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct SavedCheckpoint {
    pub state: RunState,
    /// The config the checkpointed run was started with (TOML).
    pub config_toml: String,
    params: BTreeMap<String, Tensor>,
    moments: BTreeMap<String, Tensor>,
}

impl SavedCheckpoint {
    pub fn read(path: &Path) -> Result<Self> {
        let context = |e: String| candle::Error::msg(format!("{}: {e}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| context(e.to_string()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| context(format!("not a safetensors file ({e})")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(context(format!("not a {FORMAT} file")));
        }
        if meta.get("version").map(String::as_str) != Some(VERSION) {
            return Err(context(format!(
                "checkpoint version {:?}; this build reads version {VERSION}",
                meta.get("version")
            )));
        }
        let state: RunState = serde_json::from_str(meta.get("state").map_or("", |s| s))
            .map_err(|e| context(format!("bad run state ({e})")))?;
        let config_toml = meta.get("config").cloned().unwrap_or_default();
        let all = candle::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| context(e.to_string()))?;
        let (mut params, mut moments) = (BTreeMap::new(), BTreeMap::new());
        for (name, t) in all {
            if let Some(n) = name.strip_prefix("param/") {
                params.insert(n.to_string(), t);
            } else if let Some(n) = name.strip_prefix("optim/") {
                moments.insert(n.to_string(), t);
            }
        }
        Ok(Self {
            state,
            config_toml,
            params,
            moments,
        })
    }

    /// Puts the checkpoint's parameters, optimiser state and dropout
    /// counters back into a freshly built model and optimiser. The model
    /// must have exactly the checkpoint's trainable tensors.
    pub fn restore(&self, registry: &AdapterRegistry, optimizer: &mut GroupedAdamW) -> Result<()> {
        let trainable = registry.trainable();
        let expected: Vec<&String> = trainable.iter().map(|(n, _)| n).collect();
        let found: Vec<&String> = self.params.keys().collect();
        if expected != found {
            let missing: Vec<_> = expected
                .iter()
                .filter(|n| !self.params.contains_key(**n))
                .collect();
            let extra: Vec<_> = found
                .iter()
                .filter(|n| !trainable.iter().any(|(t, _)| t == **n))
                .collect();
            candle::bail!(
                "the checkpoint does not match the model: missing {missing:?}, unexpected {extra:?}"
            );
        }
        for (name, var) in &trainable {
            let t = &self.params[name];
            if t.dims() != var.dims() {
                candle::bail!(
                    "checkpoint tensor {name} has shape {:?}, the model {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        optimizer.load_state(self.state.step, &self.moments)?;
        registry.set_dropout_state(&self.state.dropout)
    }
}

/// The keys whose values differ between two TOML documents, as
/// `section.key: old -> new` lines, skipping `ignored` keys.
pub fn config_differences(old: &str, new: &str, ignored: &[&str]) -> Vec<String> {
    fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let parse = |s: &str| {
        let mut out = BTreeMap::new();
        if let Ok(v) = s.parse::<toml::Table>() {
            flatten("", &toml::Value::Table(v), &mut out);
        }
        out
    };
    let (a, b) = (parse(old), parse(new));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| !ignored.contains(&k.as_str()))
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |m: &BTreeMap<String, String>| m.get(k).cloned().unwrap_or("(unset)".into());
            format!("{k}: {} -> {}", show(&a), show(&b))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{AdaptedLinear, LoraMiniConfig, Method};
    use crate::train::optim::AdamWConfig;
    use candle::DType;
    use candle_nn::Linear;

    fn model(seed: u64) -> Result<AdapterRegistry> {
        let mut registry = AdapterRegistry::new();
        let base = Linear::new(Tensor::ones((8, 8), DType::F32, &Device::Cpu)?, None);
        let config = LoraMiniConfig {
            seed,
            dropout: 0.1,
            ..LoraMiniConfig::new(2, 4, 4)
        };
        let layer = AdaptedLinear::new(&base, &Method::LoraMini(config), "l")?;
        registry.register("l", &layer)?;
        Ok(registry)
    }

    #[test]
    fn round_trips_parameters_moments_and_counters() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lm-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("checkpoint.safetensors");
        let registry = model(1)?;
        let mut opt = GroupedAdamW::new(registry.trainable(), AdamWConfig::default())?;
        let grads: BTreeMap<String, Tensor> = registry
            .trainable()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().ones_like()?)))
            .collect::<Result<_>>()?;
        opt.step_with(&grads, 1e-2, 1.0)?;
        registry.set_dropout_state(&BTreeMap::from([("l".to_string(), 7)]))?;
        let state = RunState {
            step: 1,
            epoch: 0,
            next_batch: 3,
            seen: 12,
            dropout: registry.dropout_state(),
            ..Default::default()
        };
        save_checkpoint(&path, &registry, &opt, &state, "[run]\nseed = 1\n")?;

        // A model built from another seed takes the saved values exactly.
        let other = model(2)?;
        let mut other_opt = GroupedAdamW::new(other.trainable(), AdamWConfig::default())?;
        let ckpt = SavedCheckpoint::read(&path)?;
        assert_eq!(ckpt.state, state);
        assert_eq!(ckpt.config_toml, "[run]\nseed = 1\n");
        ckpt.restore(&other, &mut other_opt)?;
        for ((_, a), (_, b)) in registry.trainable().iter().zip(other.trainable().iter()) {
            let (a, b): (Vec<f32>, Vec<f32>) =
                (a.flatten_all()?.to_vec1()?, b.flatten_all()?.to_vec1()?);
            assert_eq!(a, b);
        }
        assert_eq!(other.dropout_state()["l"], 7);
        let (step, moments) = other_opt.state();
        assert_eq!(step, 1);
        assert_eq!(moments.len(), opt.state().1.len());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn config_differences_name_the_keys() {
        let old = "[optim]\nlr = 0.001\nepochs = 3\n[run]\noutput_dir = \"a\"\n";
        let new = "[optim]\nlr = 0.002\nepochs = 3\n[run]\noutput_dir = \"b\"\n";
        assert_eq!(
            config_differences(old, new, &["run.output_dir"]),
            vec!["optim.lr: 0.001 -> 0.002".to_string()]
        );
    }
}
