//! What a run takes from outside its config, and what it reports.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::optim::ParamGroup;

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
