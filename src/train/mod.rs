//! Training: the optimiser, schedules, evaluation, checkpoints and the loop.

#[cfg(feature = "train")]
pub mod checkpoint;
#[cfg(feature = "train")]
pub mod config;
#[cfg(feature = "train")]
mod dataset;
pub mod eval;
#[cfg(feature = "train")]
pub mod interrupt;
pub mod optim;
#[cfg(feature = "train")]
mod options;
#[cfg(feature = "train")]
pub mod plot;
#[cfg(feature = "train")]
mod run;
pub mod schedule;
#[cfg(feature = "train")]
mod setup;
#[cfg(feature = "train")]
pub mod sweep;
#[cfg(feature = "train")]
pub mod trainer;
