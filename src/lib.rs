#![doc = include_str!("../README.md")]

pub mod adapter;
pub mod alloc;
#[cfg(feature = "cli")]
pub mod cli;
pub mod data;
pub mod error;
#[cfg(feature = "hub")]
pub mod hub;
pub mod metrics;
pub mod models;
pub mod train;
