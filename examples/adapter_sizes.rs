//! Trainable parameters and adapter file sizes on roberta-base shapes.
//!
//! `cargo run --release --example adapter_sizes [-- path/to/roberta-base/config.json]`
//!
//! Builds every linear layer of RobertaForSequenceClassification (2 labels)
//! with zero weights of the true shapes, adapts `query`, `key`, `value` and
//! every `dense` module (the `dense+attention` preset) with LoRA-Mini r=8,
//! a=b=64 and with LoRA r=8, trains the classifier in full, and writes each
//! adapter file variant to a temporary folder to measure its size.

use std::path::{Path, PathBuf};

use candle::{DType, Device, Result, Tensor};
use candle_nn::Linear;
use lora_mini::adapter::{
    export_peft, save_adapter, AdapterConfig, AdapterRegistry, LinearFactory, LoraConfig,
    LoraMiniConfig, Method, PeftExportOptions, SaveOptions,
};
use lora_mini::models::bert::BertConfig;
use lora_mini::models::presets::Family;
use lora_mini::models::shapes::encoder_classifier;

/// Every linear layer of the model, with zero weights of the true shapes,
/// built through the factory.
fn registry(config_json: &Path, config: AdapterConfig) -> Result<AdapterRegistry> {
    let bert = BertConfig::from_json(&std::fs::read_to_string(config_json)?)?;
    let mut factory = LinearFactory::new(config)?;
    for l in encoder_classifier(Family::Roberta, &bert, 2).linears {
        let weight = Tensor::zeros((l.d_out, l.d_in), DType::F32, &Device::Cpu)?;
        let bias = Tensor::zeros(l.d_out, DType::F32, &Device::Cpu)?;
        factory.build(&l.path, Linear::new(weight, Some(bias)))?;
    }
    factory.finish()
}

fn main() -> Result<()> {
    let config_json = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared/model-configs/roberta-base.json"));
    let out = std::env::temp_dir().join(format!("lora-mini-sizes-{}", std::process::id()));
    let targets = ["query", "key", "value", "dense"];
    let peft_options = PeftExportOptions {
        modules_to_save: vec!["classifier".into()],
        ..Default::default()
    };

    let mini = AdapterConfig::new(Method::LoraMini(LoraMiniConfig::new(8, 64, 64)), &targets)
        .with_modules_to_save(&["classifier"]);
    let lora = AdapterConfig::new(Method::Lora(LoraConfig::new(8)), &targets)
        .with_modules_to_save(&["classifier"]);

    println!(
        "roberta-base shapes from {}, dense+attention, 2 labels\n",
        config_json.display()
    );
    println!("{:<54} {:>12} {:>12}", "adapter", "trainable", "bytes");
    for (name, config) in [("LoRA-Mini r=8 a=b=64", &mini), ("LoRA r=8", &lora)] {
        let registry = registry(&config_json, config.clone())?;
        let n = registry.num_trainable();
        let mut variants = vec![
            ("f32", SaveOptions::default()),
            (
                "bf16",
                SaveOptions {
                    dtype: Some(DType::BF16),
                    ..Default::default()
                },
            ),
        ];
        if matches!(config.method, Method::LoraMini(_)) {
            variants.push((
                "f32 + stored aux",
                SaveOptions {
                    store_aux: true,
                    ..Default::default()
                },
            ));
        }
        for (label, options) in variants {
            let path =
                out.join(format!("{}-{label}.safetensors", config.method.name()).replace(' ', ""));
            save_adapter(&path, &registry, config, &options)?;
            println!(
                "{:<54} {:>12} {:>12}",
                format!("{name}, lora-mini file, {label}"),
                n,
                size(&path)
            );
        }
        let peft_dir = out.join(format!("peft-{}", config.method.name()));
        export_peft(&registry, &peft_options, &peft_dir)?;
        println!(
            "{:<54} {:>12} {:>12}",
            format!("{name}, PEFT export (f32)"),
            n,
            size(&peft_dir.join(lora_mini::adapter::peft::WEIGHTS_FILE))
        );
    }
    std::fs::remove_dir_all(&out).ok();
    Ok(())
}

fn size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}
