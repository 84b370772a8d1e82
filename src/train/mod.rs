//! Training: the optimiser, schedules, evaluation and (later) the loop.

pub mod config;
pub mod eval;
pub mod optim;
pub mod schedule;
#[cfg(feature = "data")]
pub mod trainer;
