//! The adapter core: LoRA-Mini, LoRA, full fine-tuning and frozen linears
//! behind one type, their seeded initialisation, the registry of trainable
//! tensors, and adapter files (our own format and PEFT's).
//!
//! This module depends on Candle alone, so a user who only wants to adapt
//! their own model gets nothing else.

pub mod base;
pub mod config;
pub mod factory;
pub mod file;
mod host;
pub mod init;
pub mod linear;
pub mod lora;
pub mod lora_mini;
mod low_rank;
mod matmul;
mod merge;
pub mod peft;
pub mod projections;
pub mod registry;
pub mod targets;

pub use base::{BaseLinear, BaseWeight};
pub use config::{AdapterConfig, AuxInit, InnerInit, LoraConfig, LoraMiniConfig, Method};
pub use factory::LinearFactory;
pub use file::{save_adapter, AdapterFile, DataSettings, SaveOptions};
pub use host::AdapterHost;
pub use linear::{AdaptedLinear, FullLinear};
pub use lora::LoraLinear;
pub use lora_mini::LoraMiniLinear;
pub use low_rank::LowRankUpdate;
pub use low_rank::{is_b_factor, LowRankLayer};
/// The linear map adapted layers run, for tests and benchmarks.
#[doc(hidden)]
pub use matmul::linear_fwd;
pub use peft::{export_peft, PeftAdapter, PeftExportOptions};
pub use registry::AdapterRegistry;
