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
//! Each layer imports only from the rows above it.
//!
//! | module | holds | imports |
//! | --- | --- | --- |
//! | [`error`], [`rng`], [`dropout`], [`io`], `kernels` | the crate's one [`Error`]; the portable seeded RNG; seeded dropout; atomic file writers; the CPU kernels (crate-private) | Candle |
//! | [`adapter`] | LoRA-Mini, LoRA, full and frozen linears; their seeded (or SVD) init; the factory keyed by module path; the registry; adapter files; merging into a checkpoint; PEFT export and import | the leaves |
//! | [`nn`] | candle-nn's builders made adapter-aware (`VarBuilder`, `linear`, norms, `embedding`) and ops with a backward (`layer_norm`, `rms_norm`, `softmax_last_dim`, `sdpa`, `rope`) | `adapter` |
//! | [`models`] | BERT, RoBERTa, T5 and the Llama family written on `nn`; the checkpoint and GGUF loaders; token-by-token generation | `nn`, `adapter` |
//! | [`data`], [`metrics`] | the GLUE and WMT16 task registry, readers, tokenising and batching; the reference metrics | the leaves |
//! | `decoder` (feature `data`) | Llama-family decoders as users run them: a model with its tokenizer and chat template, from GGUF or Hugging Face files; chat rendering; streamed generation with stop strings; the built-in tasks as instructions (label words, translation requests) | `models`, `data` |
//! | [`train`] | the TOML config, AdamW with parameter groups, schedules, the training loop, evaluation, checkpoints, sweeps | all of the above |
//!
//! The `lora-mini` binary (`src/main.rs`, `src/cli/`) uses only the public
//! API. `cargo add lora-mini --no-default-features` keeps everything but
//! `train` and the data readers: enough to adapt your own Candle model
//! (`examples/fork_candle_model` forks candle-transformers' Llama in six
//! lines; `examples/readme_snippet.rs` is the smallest program).

pub mod adapter;
pub mod alloc;
pub mod data;
#[cfg(feature = "data")]
pub mod decoder;
pub mod dropout;
pub mod error;
#[cfg(feature = "hub")]
pub mod hub;
pub mod io;
mod kernels;
pub mod metrics;
pub mod models;
pub mod nn;
pub mod rng;
pub mod threads;
pub mod train;

pub use error::{Error, Result};
