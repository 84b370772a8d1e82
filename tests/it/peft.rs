//! PEFT LoRA export and import.

use std::collections::HashMap;

use candle::{DType, Device, Result, Tensor};
use lora_mini::adapter::{
    export_peft, AdapterConfig, AuxInit, InnerInit, LinearFactory, LoraMiniConfig, Method,
    PeftAdapter, PeftExportOptions,
};

use crate::common::{max_abs_diff, shared, uniform, ToyModel};

const AUX_INITS: [AuxInit; 4] = [
    AuxInit::Kaiming,
    AuxInit::Orthogonal,
    AuxInit::Svd,
    AuxInit::SvdScaled,
];

fn trained_mini(aux_init: AuxInit) -> Result<(AdapterConfig, ToyModel)> {
    let method = Method::LoraMini(LoraMiniConfig {
        alpha: 6.0,
        inner_init: InnerInit::Kaiming,
        aux_init,
        ..LoraMiniConfig::new(4, 8, 8)
    });
    let config = AdapterConfig::new(method, &["query", "value", "dense"])
        .with_modules_to_save(&["classifier"]);
    let model = ToyModel::build(config.clone())?;
    model.perturb(21)?;
    Ok((config, model))
}

fn options() -> PeftExportOptions {
    PeftExportOptions {
        base_model: Some("roberta-base".into()),
        modules_to_save: vec!["classifier".into()],
        ..Default::default()
    }
}

fn out_dir(name: &str) -> std::path::PathBuf {
    crate::common::scratch(&format!("peft-{name}"))
}

#[test]
fn export_writes_peft_names_and_an_equivalent_scaling() -> Result<()> {
    for init in AUX_INITS {
        export_is_an_exact_lora(init)?;
    }
    Ok(())
}

fn export_is_an_exact_lora(init: AuxInit) -> Result<()> {
    let (_, model) = trained_mini(init)?;
    let dir = out_dir(&format!("names-{}", init.name()));
    export_peft(&model.registry, &options(), &dir)?;
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["r"], 4);
    assert_eq!(config["modules_to_save"], serde_json::json!(["classifier"]));
    let targets: Vec<String> = serde_json::from_value(config["target_modules"].clone()).unwrap();
    assert_eq!(targets.len(), 5);
    assert!(!targets.iter().any(|t| t.starts_with("classifier")));
    let tensors: HashMap<String, Tensor> =
        candle::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    assert_eq!(names.len(), 5 * 2 + 4);
    assert!(names.iter().all(|n| n.starts_with("base_model.model.")));

    // PEFT's own arithmetic on the written files: W + (lora_alpha / r)·B·A
    // must equal our merged weight, for every exported module.
    let peft_scaling = config["lora_alpha"].as_f64().unwrap() / config["r"].as_f64().unwrap();
    for path in &targets {
        let a = &tensors[&format!("base_model.model.{path}.lora_A.weight")];
        let b = &tensors[&format!("base_model.model.{path}.lora_B.weight")];
        let layer = model.registry.module(path).unwrap();
        let peft_weight = (layer.weight() + (b.matmul(a)? * peft_scaling)?)?;
        assert!(
            max_abs_diff(&peft_weight, &layer.merged_weight()?)? < 1e-5,
            "{path} ({init:?})"
        );
    }
    // The head is saved whole, with classifier.dense's ΔW folded in.
    let dense = model.registry.module("classifier.dense").unwrap();
    let saved = &tensors["base_model.model.classifier.dense.weight"];
    assert!(max_abs_diff(saved, &dense.merged_weight()?)? < 1e-6);
    assert!(max_abs_diff(saved, &dense.weight()?)? > 1e-3);
    assert!(tensors.contains_key("base_model.model.classifier.out_proj.bias"));
    Ok(())
}

#[test]
fn exported_adapter_imports_back_to_the_same_function() -> Result<()> {
    for init in AUX_INITS {
        imports_back(init)?;
    }
    Ok(())
}

fn imports_back(init: AuxInit) -> Result<()> {
    let (_, model) = trained_mini(init)?;
    let dir = out_dir(&format!("round_trip-{}", init.name()));
    export_peft(&model.registry, &options(), &dir)?;
    let adapter = PeftAdapter::read(&dir, &Device::Cpu)?;
    assert_eq!(adapter.lora_modules().count(), 5);
    let imported = ToyModel::build_with(LinearFactory::from_peft(adapter))?;
    let x = uniform(22, &[6, 64], 1.0, DType::F32)?;
    let (a, b) = (imported.outputs(&x)?, model.outputs(&x)?);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-4,
        "imported adapter ({init:?}) differs by {worst}"
    );
    Ok(())
}

#[test]
fn export_refuses_full_layers_outside_modules_to_save() -> Result<()> {
    let config = AdapterConfig::new(Method::Full, &["query"]);
    let model = ToyModel::build(config)?;
    let err = export_peft(
        &model.registry,
        &PeftExportOptions::default(),
        out_dir("full"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("roberta.encoder.layer.0.attention.self.query")
            && err.contains("fully trained"),
        "{err}"
    );
    Ok(())
}

#[test]
fn reads_a_real_peft_adapter_for_t5_large() -> Result<()> {
    let adapter = PeftAdapter::read(shared("adapters/peft-lora-t5-large"), &Device::Cpu)?;
    let t5: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared("model-configs/t5-large.json")).unwrap(),
    )
    .unwrap();
    let d_model = t5["d_model"].as_u64().unwrap() as usize;
    let inner = (t5["num_heads"].as_u64().unwrap() * t5["d_kv"].as_u64().unwrap()) as usize;
    let enc = t5["num_layers"].as_u64().unwrap() as usize;
    let dec = t5["num_decoder_layers"].as_u64().unwrap_or(enc as u64) as usize;
    assert_eq!((adapter.config.r, adapter.config.lora_alpha), (16, 32.0));
    assert_eq!(adapter.config.task_type.as_deref(), Some("SEQ_2_SEQ_LM"));

    let mut expected = Vec::new();
    for i in 0..enc {
        for m in ["q", "v"] {
            expected.push(format!("encoder.block.{i}.layer.0.SelfAttention.{m}"));
        }
    }
    for i in 0..dec {
        for m in ["q", "v"] {
            expected.push(format!("decoder.block.{i}.layer.0.SelfAttention.{m}"));
            expected.push(format!("decoder.block.{i}.layer.1.EncDecAttention.{m}"));
        }
    }
    expected.sort();
    let found: Vec<String> = adapter.lora_modules().cloned().collect();
    assert_eq!(found, expected);
    let targets: Vec<String> =
        serde_json::from_value(adapter.config.target_modules.clone()).unwrap();
    for path in &found {
        assert!(targets
            .iter()
            .any(|t| lora_mini::adapter::targets::matches_target(path, t)));
        let (a, b) = adapter.factors(path).unwrap();
        // q and v project d_model -> num_heads * d_kv.
        assert_eq!(
            (a.dims(), b.dims()),
            (&[16, d_model][..], &[inner, 16][..]),
            "{path}"
        );
        assert_eq!(adapter.scaling_for(path), Some(2.0));
    }
    // The factors carry a trained update (B is no longer zero).
    let (_, b) = adapter.factors(&found[0]).unwrap();
    assert!(b.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);

    // Attaching to a layer of the wrong shape is an error naming the module.
    let wrong = candle_nn::Linear::new(Tensor::zeros((512, 512), DType::F32, &Device::Cpu)?, None);
    let err = adapter
        .lora_linear(&found[0], &wrong)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&found[0]), "{err}");
    Ok(())
}
