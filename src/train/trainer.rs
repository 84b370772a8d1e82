//! The training loop: forward, loss, backward, clipping, AdamW on the
//! registry's `Var`s, scheduled learning rate, periodic evaluation, and the
//! run's files (resolved config, `metrics.jsonl`, best and last adapters,
//! `results.json`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle::{Device, Tensor};

use super::config::{DeviceChoice, MethodName, TrainConfig};
use super::optim::ParamGroup;
use super::run::Run;
use crate::adapter::targets::ALL_LINEAR;
use crate::adapter::{AdapterConfig, LoraConfig, LoraMiniConfig, Method};
use crate::data::batch::ClassificationBatch;
use crate::models::presets::resolve_targets;
use crate::models::task::TaskModel;

pub use crate::Error;

/// The checkpoint's file name inside the output directory.
pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// How a run is started and stopped from outside its config.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Continue from the output directory's checkpoint.
    pub resume: bool,
    /// When set (by a Ctrl-C handler, say), the run stops after the step in
    /// progress, writes a checkpoint and returns with `interrupted`.
    pub stop: Option<Arc<AtomicBool>>,
    /// Start afresh even when the output folder holds an earlier run
    /// (otherwise that is refused, so a finished run is never lost by
    /// accident).
    pub overwrite: bool,
}

/// Why a run stopped, as `results.json` records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Every scheduled epoch ran.
    Completed,
    /// `run.time_budget_minutes` ran out first; the schedule is unfinished.
    TimeBudget,
    /// `optim.max_steps` ended it before the epochs did.
    MaxSteps,
    /// Stopped from outside (Ctrl-C); a checkpoint holds the progress.
    Interrupted,
    /// The loss stopped being finite; training returned an error.
    Nan,
}

impl StopReason {
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Completed => "completed",
            StopReason::TimeBudget => "time_budget",
            StopReason::MaxSteps => "max_steps",
            StopReason::Interrupted => "interrupted",
            StopReason::Nan => "nan",
        }
    }
}

/// What a run reports (also written to `results.json` when it finishes).
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSummary {
    pub best: BTreeMap<String, Option<f64>>,
    pub best_step: u64,
    pub steps: u64,
    pub trainable: usize,
    pub total: usize,
    /// This invocation's wall time, loading and evaluation included.
    pub wall_seconds: f64,
    /// Time in the training loop, summed over interruptions.
    pub train_seconds: f64,
    pub train_examples_per_second: f64,
    pub peak_rss_bytes: Option<u64>,
    pub crate_version: &'static str,
    pub output_dir: PathBuf,
    /// Stopped by [`TrainOptions::stop`] before the end; a checkpoint holds
    /// the progress.
    pub interrupted: bool,
    /// Why the run stopped.
    pub stopped: StopReason,
    /// Which trained tensor got which learning rate and weight decay.
    pub param_groups: Vec<ParamGroup>,
    /// What chose the best step: `dev` (the official dev set, the old
    /// protocol) or `validation-split` (a slice of the training data; the
    /// dev metrics in `best` were then never used to choose anything).
    pub selection: &'static str,
    /// The validation-slice metrics at the best step (empty under `dev`).
    pub best_validation: BTreeMap<String, Option<f64>>,
}

/// The optimizer's parameter groups: the head (`modules_to_save`) at
/// `optim.head_lr` and `optim.head_weight_decay`, everything else at
/// `optim.lr` and `optim.weight_decay`. Both always appear, so a run's
/// `results.json` says what each tensor trained at.
pub fn param_groups(
    config: &TrainConfig,
    adapter: &AdapterConfig,
    trainable: &[(String, candle::Var)],
) -> Vec<ParamGroup> {
    let o = &config.optim;
    let in_head = |name: &str| {
        adapter
            .modules_to_save
            .iter()
            .any(|m| crate::adapter::targets::is_within(name, m))
    };
    let (head, rest): (Vec<String>, Vec<String>) = trainable
        .iter()
        .map(|(n, _)| n.clone())
        .partition(|n| in_head(n));
    vec![
        ParamGroup {
            name: "adapter".into(),
            lr_scale: 1.0,
            weight_decay: o.weight_decay,
            tensors: rest,
        },
        ParamGroup {
            name: "head".into(),
            lr_scale: o.head_lr.map_or(1.0, |h| h / o.lr),
            weight_decay: o.head_weight_decay.unwrap_or(o.weight_decay),
            tensors: head,
        },
    ]
}

/// The device a config asks for.
pub fn device(choice: DeviceChoice) -> Result<Device, Error> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            Device::new_cuda(0).map_err(|e| Error::from(e).context("run.device = \"cuda\""))
        }
        DeviceChoice::Metal => {
            Device::new_metal(0).map_err(|e| Error::from(e).context("run.device = \"metal\""))
        }
        DeviceChoice::Auto => Ok(if candle::utils::cuda_is_available() {
            Device::new_cuda(0)?
        } else if candle::utils::metal_is_available() {
            Device::new_metal(0)?
        } else {
            Device::Cpu
        }),
    }
}

/// The adapter config a training config asks for.
pub fn adapter_config(
    config: &TrainConfig,
    loaded_family: crate::models::presets::Family,
    gated: bool,
) -> Result<AdapterConfig, Error> {
    let a = &config.adapter;
    let (method, targets) = match a.method {
        MethodName::Full => (Method::Full, vec![ALL_LINEAR.to_string()]),
        MethodName::Lora => (
            Method::Lora(LoraConfig {
                alpha: a.alpha,
                dropout: a.dropout,
                use_rslora: a.use_rslora,
                inner_init: a.inner_init,
                seed: a.seed,
                ..LoraConfig::new(a.r)
            }),
            resolve_targets(loaded_family, &a.targets, gated)?,
        ),
        MethodName::LoraMini => (
            Method::LoraMini(LoraMiniConfig {
                alpha: a.alpha,
                dropout: a.dropout,
                use_rslora: a.use_rslora,
                inner_init: a.inner_init,
                aux_init: a.aux_init,
                seed: a.seed,
                ..LoraMiniConfig::new(a.r, a.a, a.b)
            }),
            resolve_targets(loaded_family, &a.targets, gated)?,
        ),
    };
    Ok(AdapterConfig {
        method,
        targets,
        modules_to_save: loaded_family.head_modules(),
    })
}

/// Runs a whole training as configured, writing into `config.run.output_dir`.
pub fn train(config: &TrainConfig) -> Result<TrainSummary, Error> {
    train_with(config, &TrainOptions::default())
}

/// [`train`], resumable and stoppable.
pub fn train_with(config: &TrainConfig, options: &TrainOptions) -> Result<TrainSummary, Error> {
    Run::open(config, options)?.run()
}

/// The model's logits on a padded batch; `train` switches dropout on.
pub fn classify_batch(
    model: &TaskModel,
    batch: &ClassificationBatch,
    train: bool,
) -> candle::Result<Tensor> {
    model.classify(
        &batch.input_ids,
        Some(&batch.token_type_ids),
        Some(&batch.attention_mask),
        train,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_uses_the_cpu_when_no_accelerator_is_compiled_in() {
        let built_with_accelerator = cfg!(any(feature = "cuda", feature = "metal"));
        if !built_with_accelerator {
            assert!(device(DeviceChoice::Auto).unwrap().is_cpu());
            // Asking for one that is not there names the setting.
            let err = device(DeviceChoice::Cuda).unwrap_err().to_string();
            assert!(err.starts_with("run.device = \"cuda\""), "{err}");
        }
        assert!(device(DeviceChoice::Cpu).unwrap().is_cpu());
    }
}
