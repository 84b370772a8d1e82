//! The model side of the benchmark workload, shared by `bench_train_step`
//! and `bench_padding` (and mirrored by `benches/reference/train_step.py`):
//! LoRA-Mini `dense+attention` (query, key, value and every `dense`) at r=8,
//! a=b=64, alpha 16, with the classification head trained in full.

use candle::{DType, Device, Result};
use lora_mini::adapter::{AdapterConfig, LinearFactory, LoraMiniConfig, Method};
use lora_mini::models::presets::{resolve_targets, Family};
use lora_mini::models::task::{load_task_model, LoadedModel};

/// Loads the BERT checkpoint at `model` with the workload's adapters, in f32
/// on `device`, seed 42.
pub fn load_lora_mini_bert(
    model: &str,
    num_labels: Option<usize>,
    device: &Device,
) -> Result<LoadedModel> {
    let adapter = AdapterConfig {
        method: Method::LoraMini(LoraMiniConfig {
            alpha: 16.0,
            ..LoraMiniConfig::new(8, 64, 64)
        }),
        targets: resolve_targets(Family::Bert, "dense+attention", false)?,
        modules_to_save: Family::Bert.head_modules(),
    };
    load_task_model(
        model,
        None,
        num_labels,
        LinearFactory::new(adapter)?,
        DType::F32,
        device,
        42,
    )
}
