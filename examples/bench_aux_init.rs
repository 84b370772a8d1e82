//! How long LoRA-Mini's frozen projections take to build, per `aux_init`, on
//! roberta-base shapes: every adapted module of the `dense+attention` preset
//! (query, key, value and every dense layer, 73 modules), r=8, a=b=64.
//!
//! `cargo run --release --example bench_aux_init [-- path/to/roberta-base.json]`
//!
//! The weights are random (seeded) with the true shapes: an SVD's cost does
//! not depend on the values.

use std::time::Instant;

use candle::{Device, Result, Tensor};
use candle_nn::Linear;
use lora_mini::adapter::{AdapterConfig, AuxInit, LinearFactory, LoraMiniConfig, Method};
use lora_mini::models::bert::BertConfig;
use lora_mini::models::presets::Family;
use lora_mini::models::shapes::encoder_classifier;

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "../shared/model-configs/roberta-base.json".into());
    let bert = BertConfig::from_json(&std::fs::read_to_string(&path)?)?;
    let linears = encoder_classifier(Family::Roberta, &bert, 2).linears;
    let bases: Vec<(String, Linear)> = linears
        .iter()
        .map(|l| {
            let w = Tensor::randn(0f32, 0.02, (l.d_out, l.d_in), &Device::Cpu)?;
            Ok((l.path.clone(), Linear::new(w, None)))
        })
        .collect::<Result<_>>()?;
    println!("| aux_init | adapted modules | build time |\n| --- | --- | --- |");
    for init in [AuxInit::Kaiming, AuxInit::Orthogonal, AuxInit::Svd] {
        let method = Method::LoraMini(LoraMiniConfig {
            aux_init: init,
            ..LoraMiniConfig::new(8, 64, 64)
        });
        let config = AdapterConfig::new(method, &["query", "key", "value", "dense"]);
        let mut factory = LinearFactory::new(config)?;
        let start = Instant::now();
        for (path, base) in &bases {
            factory.build(path, base)?;
        }
        let seconds = start.elapsed().as_secs_f64();
        let registry = factory.finish()?;
        let modules = registry.modules().count();
        println!("| {} | {modules} | {seconds:.2} s |", init.name());
    }
    Ok(())
}
