//! RoBERTa against candle-transformers' XLM-RoBERTa classifier, on a random
//! checkpoint with Hugging Face tensor names.

use std::collections::HashMap;

use candle::{DType, Device, Result, Tensor};
use lora_mini::adapter::LinearFactory;
use lora_mini::models::bert::BertConfig;
use lora_mini::models::roberta::RobertaForSequenceClassification;
use lora_mini::nn::VarBuilder;

use crate::common::{max_abs_diff, random_encoder};

const CONFIG: &str = r#"{
  "model_type": "roberta", "vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 2,
  "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
  "max_position_embeddings": 40, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
  "pad_token_id": 1, "position_embedding_type": "absolute"
}"#;

/// Every tensor of a RobertaForSequenceClassification of `CONFIG`.
pub fn random_roberta(num_labels: usize) -> Result<HashMap<String, Tensor>> {
    let head = [
        ("classifier.dense", 32, 32),
        ("classifier.out_proj", 32, num_labels),
    ];
    random_encoder("roberta", [60, 32, 64, 2, 40, 1], &head)
}

#[test]
fn logits_match_candle_transformers_xlm_roberta() -> Result<()> {
    let dev = Device::Cpu;
    let tensors = random_roberta(3)?;
    let config = BertConfig::from_json(CONFIG)?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    let ours = RobertaForSequenceClassification::new(VarBuilder::frozen(vb), &config, 3)?;
    let ct_config: candle_transformers::models::xlm_roberta::Config =
        serde_json::from_str(CONFIG).map_err(candle::Error::wrap)?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let reference =
        candle_transformers::models::xlm_roberta::XLMRobertaForSequenceClassification::new(
            3, &ct_config, vb,
        )?;

    // Two rows, the second padded with pad_token_id = 1.
    let ids = Tensor::new(&[[0u32, 17, 42, 8, 33, 2], [0, 25, 9, 2, 1, 1]], &dev)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &dev)?;
    let a = ours.forward_t(&ids, Some(&mask), false)?;
    let b = reference.forward(&ids, &mask, &ids.zeros_like()?)?;
    let err = max_abs_diff(&a, &b)?;
    eprintln!("RoBERTa logits, max |ours - candle-transformers| = {err:e}");
    assert!(err < 1e-4, "{err}");
    // The logits depend on the input (the spread is wide enough to matter).
    assert!(max_abs_diff(&a.narrow(0, 0, 1)?, &a.narrow(0, 1, 1)?)? > 1e-2);
    Ok(())
}

#[test]
fn every_trainable_tensor_gets_a_gradient() -> Result<()> {
    use lora_mini::adapter::{AdapterConfig, InnerInit, LoraMiniConfig, Method};
    use lora_mini::models::bert::sequence_classification_loss;
    use lora_mini::models::presets::{resolve_targets, Family};
    let dev = Device::Cpu;
    let method = Method::LoraMini(LoraMiniConfig {
        inner_init: InnerInit::Kaiming,
        ..LoraMiniConfig::new(2, 8, 8)
    });
    let adapter = AdapterConfig {
        method,
        targets: resolve_targets(Family::Roberta, "dense+attention", false)?,
        modules_to_save: Family::Roberta.head_modules(),
    };
    let factory = LinearFactory::new(adapter)?.with_dropout_seed(1);
    let vb = candle_nn::VarBuilder::from_tensors(random_roberta(1)?, DType::F32, &dev);
    let vb = VarBuilder::new(vb, factory);
    let model =
        RobertaForSequenceClassification::new(vb.clone(), &BertConfig::from_json(CONFIG)?, 1)?;
    let registry = vb.finish()?;
    // 2 layers x 6 modules + classifier.dense, plus out_proj in full.
    assert_eq!(registry.num_trainable(), 13 * 2 * 16 + 32 + 1);
    let ids = Tensor::new(&[[0u32, 17, 42, 8, 33, 2], [0, 25, 9, 2, 1, 1]], &dev)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &dev)?;
    // num_labels = 1 is regression: MSE against float targets.
    let logits = model.forward_t(&ids, Some(&mask), true)?;
    let loss = sequence_classification_loss(&logits, &Tensor::new(&[3.5f32, 0.5], &dev)?)?;
    let grads = loss.backward()?;
    for (name, var) in registry.trainable() {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(
            g.iter().all(|x| x.is_finite()) && g.iter().any(|x| *x != 0.0),
            "{name}"
        );
    }
    Ok(())
}
