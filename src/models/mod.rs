//! Transformer models whose linear layers can carry adapters: each linear is
//! built by the [`LinearFactory`](crate::adapter::LinearFactory) under its full
//! Hugging Face module path. Every op on the training path has a backward.

pub mod bert;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod loader;
pub mod loss;
pub mod presets;
pub mod roberta;
pub mod shapes;
pub mod t5;
pub mod task;
