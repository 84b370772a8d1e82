//! RoBERTa against candle-transformers' XLM-RoBERTa classifier, on a random
//! checkpoint with Hugging Face tensor names.

use std::collections::HashMap;

use candle::{DType, Device, Result, Tensor};
use lora_mini::adapter::LinearFactory;
use lora_mini::models::bert::BertConfig;
use lora_mini::models::roberta::RobertaForSequenceClassification;

use crate::common::{max_abs_diff, uniform};

const CONFIG: &str = r#"{
  "model_type": "roberta", "vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 2,
  "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
  "max_position_embeddings": 40, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
  "pad_token_id": 1, "position_embedding_type": "absolute"
}"#;

/// Every tensor of a RobertaForSequenceClassification of `CONFIG`, with a
/// wider spread than transformers' init so outputs depend on the input.
pub fn random_roberta(num_labels: usize) -> Result<HashMap<String, Tensor>> {
    let (v, h, ff, p) = (60, 32, 64, 40);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            "roberta.embeddings.word_embeddings.weight".into(),
            vec![v, h],
        ),
        (
            "roberta.embeddings.position_embeddings.weight".into(),
            vec![p, h],
        ),
        (
            "roberta.embeddings.token_type_embeddings.weight".into(),
            vec![1, h],
        ),
        ("classifier.dense.weight".into(), vec![h, h]),
        ("classifier.dense.bias".into(), vec![h]),
        ("classifier.out_proj.weight".into(), vec![num_labels, h]),
        ("classifier.out_proj.bias".into(), vec![num_labels]),
    ];
    let mut norms = vec!["roberta.embeddings.LayerNorm".to_string()];
    for i in 0..2 {
        let l = format!("roberta.encoder.layer.{i}");
        for (m, d_in, d_out) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", h, ff),
            ("output.dense", ff, h),
        ] {
            shapes.push((format!("{l}.{m}.weight"), vec![d_out, d_in]));
            shapes.push((format!("{l}.{m}.bias"), vec![d_out]));
        }
        norms.push(format!("{l}.attention.output.LayerNorm"));
        norms.push(format!("{l}.output.LayerNorm"));
    }
    let mut tensors = HashMap::new();
    for (i, (name, dims)) in shapes.into_iter().enumerate() {
        let fan_in = *dims.last().unwrap() as f64;
        tensors.insert(
            name,
            uniform(500 + i as u64, &dims, 1.5 / fan_in.sqrt(), DType::F32)?,
        );
    }
    for (i, norm) in norms.into_iter().enumerate() {
        tensors.insert(
            format!("{norm}.weight"),
            (uniform(900 + i as u64, &[h], 0.3, DType::F32)? + 1.0)?,
        );
        tensors.insert(
            format!("{norm}.bias"),
            uniform(950 + i as u64, &[h], 0.3, DType::F32)?,
        );
    }
    Ok(tensors)
}

#[test]
fn logits_match_candle_transformers_xlm_roberta() -> Result<()> {
    let dev = Device::Cpu;
    let tensors = random_roberta(3)?;
    let config = BertConfig::from_json(CONFIG)?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    let mut factory = LinearFactory::frozen();
    let ours = RobertaForSequenceClassification::new(&config, 3, vb, &mut factory, 0)?;
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
