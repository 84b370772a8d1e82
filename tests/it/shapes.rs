//! Trainable parameter counts on the true roberta-base shapes.

use candle::Result;
use lora_mini::adapter::{AdapterConfig, LoraConfig, LoraMiniConfig, Method};

use crate::common::shared;

#[path = "../../examples/support/roberta_base.rs"]
mod roberta_base;

const DENSE_ATTENTION: [&str; 4] = ["query", "key", "value", "dense"];

#[test]
fn roberta_base_dense_attention_counts_match_the_issue() -> Result<()> {
    let config_json = shared("model-configs/roberta-base.json");
    let mini = AdapterConfig::new(
        Method::LoraMini(LoraMiniConfig::new(8, 64, 64)),
        &DENSE_ATTENTION,
    )
    .with_modules_to_save(&["classifier"]);
    assert_eq!(
        roberta_base::registry(&config_json, 2, mini)?.num_trainable(),
        76_290
    );
    let lora = AdapterConfig::new(Method::Lora(LoraConfig::new(8)), &DENSE_ATTENTION)
        .with_modules_to_save(&["classifier"]);
    assert_eq!(
        roberta_base::registry(&config_json, 2, lora)?.num_trainable(),
        1_340_930
    );
    Ok(())
}
