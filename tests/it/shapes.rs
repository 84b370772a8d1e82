//! Trainable parameter counts on the true roberta-base shapes.

use candle::{DType, Device, Result, Tensor};
use candle_nn::Linear;
use lora_mini::adapter::{
    AdapterConfig, AdapterRegistry, LinearFactory, LoraConfig, LoraMiniConfig, Method,
};

use crate::common::shared;

/// Every linear layer of RobertaForSequenceClassification (2 labels), with
/// zero weights of the true shapes.
fn roberta_base(config: AdapterConfig) -> Result<AdapterRegistry> {
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared("model-configs/roberta-base.json")).unwrap(),
    )
    .unwrap();
    let h = cfg["hidden_size"].as_u64().unwrap() as usize;
    let ff = cfg["intermediate_size"].as_u64().unwrap() as usize;
    let layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
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
    modules.push(("classifier.out_proj".into(), h, 2));
    let mut factory = LinearFactory::new(config)?;
    for (path, d_in, d_out) in modules {
        let base = Linear::new(
            Tensor::zeros((d_out, d_in), DType::F32, &Device::Cpu)?,
            Some(Tensor::zeros(d_out, DType::F32, &Device::Cpu)?),
        );
        factory.build(&path, &base)?;
    }
    factory.finish()
}

const DENSE_ATTENTION: [&str; 4] = ["query", "key", "value", "dense"];

#[test]
fn roberta_base_dense_attention_counts_match_the_issue() -> Result<()> {
    let mini = AdapterConfig::new(
        Method::LoraMini(LoraMiniConfig::new(8, 64, 64)),
        &DENSE_ATTENTION,
    )
    .with_modules_to_save(&["classifier"]);
    assert_eq!(roberta_base(mini)?.num_trainable(), 76_290);
    let lora = AdapterConfig::new(Method::Lora(LoraConfig::new(8)), &DENSE_ATTENTION)
        .with_modules_to_save(&["classifier"]);
    assert_eq!(roberta_base(lora)?.num_trainable(), 1_340_930);
    Ok(())
}
