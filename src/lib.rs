#![doc = include_str!("../README.md")]

pub mod adapter;
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "hub")]
pub mod hub;
pub mod models;
