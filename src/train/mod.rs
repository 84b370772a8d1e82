//! Training: the optimiser, schedules, evaluation, checkpoints and the loop.

#[cfg(feature = "train")]
pub mod checkpoint;
#[cfg(feature = "train")]
pub mod config;
pub mod eval;
#[cfg(feature = "train")]
pub mod interrupt;
pub mod optim;
#[cfg(feature = "train")]
pub mod plot;
pub mod schedule;
#[cfg(feature = "train")]
pub mod sweep;
#[cfg(feature = "train")]
pub mod tables;
#[cfg(feature = "train")]
pub mod trainer;
