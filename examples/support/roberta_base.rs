//! The linear layers of `RobertaForSequenceClassification` with the true
//! roberta-base shapes (zero weights), built through the adapter factory.
//! Shared by `examples/adapter_sizes.rs` and the integration tests.

use candle::{DType, Device, Result, Tensor};
use candle_nn::Linear;
use lora_mini::adapter::{AdapterConfig, AdapterRegistry, LinearFactory};

/// `(module path, d_in, d_out)` of every linear layer, from a Hugging Face
/// roberta `config.json`, with a `num_labels`-way classifier.
pub fn linear_shapes(
    config_json: &std::path::Path,
    num_labels: usize,
) -> Result<Vec<(String, usize, usize)>> {
    let text = std::fs::read_to_string(config_json)
        .map_err(|e| candle::Error::msg(format!("reading {}: {e}", config_json.display())))?;
    let cfg: serde_json::Value = serde_json::from_str(&text).map_err(candle::Error::wrap)?;
    let field = |k: &str| {
        cfg[k].as_u64().map(|v| v as usize).ok_or_else(|| {
            candle::Error::msg(format!(
                "{}: missing integer field {k}",
                config_json.display()
            ))
        })
    };
    let (h, ff, layers) = (
        field("hidden_size")?,
        field("intermediate_size")?,
        field("num_hidden_layers")?,
    );
    let mut modules = Vec::new();
    for i in 0..layers {
        let p = format!("roberta.encoder.layer.{i}");
        for m in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            modules.push((format!("{p}.{m}"), h, h));
        }
        modules.push((format!("{p}.intermediate.dense"), h, ff));
        modules.push((format!("{p}.output.dense"), ff, h));
    }
    modules.push(("classifier.dense".into(), h, h));
    modules.push(("classifier.out_proj".into(), h, num_labels));
    Ok(modules)
}

/// Builds every linear layer through a factory for `config` and returns the
/// registry of trainable tensors.
pub fn registry(
    config_json: &std::path::Path,
    num_labels: usize,
    config: AdapterConfig,
) -> Result<AdapterRegistry> {
    let mut factory = LinearFactory::new(config)?;
    for (path, d_in, d_out) in linear_shapes(config_json, num_labels)? {
        let base = Linear::new(
            Tensor::zeros((d_out, d_in), DType::F32, &Device::Cpu)?,
            Some(Tensor::zeros(d_out, DType::F32, &Device::Cpu)?),
        );
        factory.build(&path, &base)?;
    }
    factory.finish()
}
