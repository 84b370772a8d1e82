//! Loading checkpoints: prefixes, missing heads and clear refusals.

use std::collections::HashMap;
use std::path::PathBuf;

use candle::{DType, Device, Result, Tensor};
use lora_mini::adapter::LinearFactory;
use lora_mini::models::presets::Family;
use lora_mini::models::task::{load_task_model, TaskModel};

use crate::common::{random_encoder, shared};

const BERT_CONFIG: &str = r#"{"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
  "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 24, "type_vocab_size": 2}"#;

/// A tiny BERT checkpoint folder; `edit` changes its tensors first.
fn checkpoint(name: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> Result<PathBuf> {
    let dir = crate::common::scratch(&format!("load-{name}"));
    std::fs::write(dir.join("config.json"), BERT_CONFIG)?;
    let mut tensors = random_encoder(
        "bert",
        [50, 16, 32, 1, 24, 2],
        &[("bert.pooler.dense", 16, 16)],
    )?;
    edit(&mut tensors);
    candle::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(dir)
}

fn load(dir: &std::path::Path) -> Result<lora_mini::models::task::LoadedModel> {
    load_task_model(
        dir.to_str().unwrap(),
        None,
        Some(2),
        LinearFactory::frozen(),
        DType::F32,
        &Device::Cpu,
        0,
    )
}

#[test]
fn loads_bare_and_prefixed_names_and_adds_the_head() -> Result<()> {
    let prefixed = load(&checkpoint("prefixed", |_| {})?)?;
    let bare = load(&checkpoint("bare", |t| {
        *t = t
            .drain()
            .map(|(n, v)| (n.trim_start_matches("bert.").to_string(), v))
            .collect();
    })?)?;
    let ids = Tensor::new(&[[2u32, 7, 9, 3]], &Device::Cpu)?;
    let logits = |m: &TaskModel| match m {
        TaskModel::Bert(b) => b.forward_t(&ids, None, None, false)?.to_vec2::<f32>(),
        _ => unreachable!(),
    };
    assert_eq!(prefixed.family, Family::Bert);
    assert_eq!(logits(&prefixed.model)?, logits(&bare.model)?);
    // The real MiniLM (a bare BertModel with an I64 position_ids buffer) loads too.
    let minilm = load_task_model(
        shared("models/all-MiniLM-L6-v2").to_str().unwrap(),
        None,
        Some(3),
        LinearFactory::frozen(),
        DType::F32,
        &Device::Cpu,
        0,
    )?;
    assert!(matches!(minilm.model, TaskModel::Bert(ref b) if b.num_labels() == 3));
    Ok(())
}

#[test]
fn bad_checkpoints_are_errors_naming_the_tensor() -> Result<()> {
    let missing = checkpoint("missing", |t| {
        t.remove("bert.encoder.layer.0.attention.self.key.weight");
    })?;
    let err = crate::common::message(load(&missing).unwrap_err());
    assert!(
        err.contains("bert.encoder.layer.0.attention.self.key.weight"),
        "{err}"
    );

    let wrong_shape = checkpoint("shape", |t| {
        t.insert(
            "bert.encoder.layer.0.output.dense.weight".into(),
            Tensor::zeros((16, 31), DType::F32, &Device::Cpu).unwrap(),
        );
    })?;
    let err = crate::common::message(load(&wrong_shape).unwrap_err());
    assert!(
        err.contains("bert.encoder.layer.0.output.dense.weight") && err.contains("31"),
        "{err}"
    );

    let int = checkpoint("dtype", |t| {
        t.insert(
            "bert.embeddings.LayerNorm.weight".into(),
            Tensor::zeros(16, DType::U32, &Device::Cpu).unwrap(),
        );
    })?;
    let err = crate::common::message(load(&int).unwrap_err());
    assert!(
        err.contains("bert.embeddings.LayerNorm.weight") && err.contains("U32"),
        "{err}"
    );
    Ok(())
}

#[test]
#[cfg(feature = "hub")]
fn offline_hub_ids_fail_without_the_network() {
    let home = crate::common::scratch("hf-home");
    // Only this test reads these variables.
    std::env::set_var("HF_HOME", &home);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let result = load_task_model(
        "org/not-cached",
        None,
        Some(2),
        LinearFactory::frozen(),
        DType::F32,
        &Device::Cpu,
        0,
    );
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_HOME");
    let err = crate::common::message(result.unwrap_err());
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("org/not-cached@main/config.json"),
        "{err}"
    );
}
