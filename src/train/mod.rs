//! Training: the optimiser, schedules, evaluation and (later) the loop.

#[cfg(feature = "train")]
pub mod config;
pub mod eval;
pub mod optim;
pub mod schedule;
#[cfg(feature = "train")]
pub mod trainer;
