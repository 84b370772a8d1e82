//! The training loop's entry points: [`train`] and [`train_with`] run a
//! whole training as a config says (forward, loss, backward, clipping,
//! AdamW on the registry's `Var`s, scheduled learning rate, periodic
//! evaluation) and write the run's files (resolved config,
//! `metrics.jsonl`, best and last adapters, checkpoint, `results.json`).
//! The run itself is `run.rs`; its data `dataset.rs`.

use super::config::TrainConfig;
use super::run::Run;

pub use super::eval::classify_batch;
pub use super::options::{StopReason, TrainOptions, TrainSummary, CHECKPOINT};
pub use super::setup::{adapter_config, device, param_groups};
pub use crate::Error;

/// Runs a whole training as configured, writing into `config.run.output_dir`.
pub fn train(config: &TrainConfig) -> Result<TrainSummary, Error> {
    train_with(config, &TrainOptions::default())
}

/// [`train`], resumable and stoppable.
pub fn train_with(config: &TrainConfig, options: &TrainOptions) -> Result<TrainSummary, Error> {
    Run::open(config, options)?.run()
}
