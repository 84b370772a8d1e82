//! LoRA-Mini parameter-efficient fine-tuning for Candle.
//!
//! LoRA-Mini splits each LoRA matrix in two: for `y = W x`,
//! `ΔW = B_aux · B_in · A_in · A_aux`, with `A_aux: a x d_in` and
//! `B_aux: d_out x b` frozen (from a seed, or from `W`'s SVD) and only
//! `A_in: r x a` and `B_in: b x r` trained, `r·(a+b)` parameters per layer.
//! README.md has the quick start, the CLI and the measured results.
//!
//! # Layers, lowest first
//!
//! | module | holds | uses |
//! | --- | --- | --- |
//! | [`adapter`] | LoRA-Mini, LoRA, full and frozen linears; their seeded (or SVD) init; the factory keyed by module path; the registry; adapter files; PEFT export and import | Candle only |
//! | [`models`] | BERT, RoBERTa and T5 built through the factory; differentiable ops; the loader | `adapter` |
//! | [`data`] | the GLUE and WMT16 task registry, readers, tokenising and batching | nothing of ours |
//! | [`metrics`] | accuracy, F1, MCC, correlations, BLEU and ROUGE as the reference tools compute them | nothing of ours |
//! | [`train`] | the TOML config, AdamW with parameter groups, schedules, the training loop, checkpoints, sweeps | all of the above |
//! | `cli` | one file per `lora-mini` subcommand | the library |
//!
//! `cargo add lora-mini --no-default-features` keeps `adapter`, `models`
//! and `metrics`: enough to adapt your own Candle model
//! (`examples/readme_snippet.rs` is the smallest program that does).

pub mod adapter;
pub mod alloc;
#[cfg(feature = "cli")]
pub mod cli;
pub mod data;
pub mod dropout;
pub mod error;
#[cfg(feature = "hub")]
pub mod hub;
mod io;
mod kernels;
pub mod metrics;
pub mod models;
pub mod nn;
pub mod rng;
pub mod train;
