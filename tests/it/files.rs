//! Adapter files: round trips, options and clear refusals.

use candle::{DType, Device, Result};
use lora_mini::adapter::{
    save_adapter, AdapterConfig, AdapterFile, AuxInit, LinearFactory, LoraConfig, LoraMiniConfig,
    Method, SaveOptions,
};

use crate::common::{uniform, ToyModel};

fn mini(seed: u64) -> AdapterConfig {
    let method = Method::LoraMini(LoraMiniConfig {
        seed,
        ..LoraMiniConfig::new(4, 8, 8)
    });
    AdapterConfig::new(method, &["query", "value", "dense"]).with_modules_to_save(&["classifier"])
}

fn tmp(name: &str) -> std::path::PathBuf {
    crate::common::scratch("files").join(name)
}

#[test]
fn round_trip_reproduces_the_trained_model() -> Result<()> {
    let trained = ToyModel::build(mini(3))?;
    trained.perturb(1)?;
    let x = uniform(2, &[5, 64], 1.0, DType::F32)?;
    let path = tmp("round_trip.safetensors");
    let options = SaveOptions {
        base_model: Some("roberta-base".into()),
        ..Default::default()
    };
    save_adapter(&path, &trained.registry, &mini(3), &options)?;

    let file = AdapterFile::read(&path, &Device::Cpu)?;
    assert_eq!(file.config, mini(3));
    for (key, value) in [
        ("method", "lora-mini"),
        ("r", "4"),
        ("a", "8"),
        ("b", "8"),
        ("seed", "3"),
        ("scaling", "4"),
        ("dtype", "f32"),
        ("base_model", "roberta-base"),
        ("aux_stored", "false"),
    ] {
        assert_eq!(
            file.metadata.get(key).map(String::as_str),
            Some(value),
            "{key}"
        );
    }
    assert!(file.metadata["aux_checksum"].starts_with("fnv1a64:"));
    assert!(!file.tensors.keys().any(|k| k.contains("aux")));
    assert!(file
        .tensors
        .contains_key("roberta.encoder.layer.0.attention.self.query.lora_mini_A_in"));
    assert!(file.tensors.contains_key("classifier.out_proj.weight"));

    let fresh = ToyModel::build(file.config.clone())?;
    assert_ne!(fresh.outputs(&x)?, trained.outputs(&x)?);
    file.apply(&fresh.registry)?;
    assert_eq!(fresh.outputs(&x)?, trained.outputs(&x)?);
    Ok(())
}

#[test]
fn stored_aux_and_bf16_options() -> Result<()> {
    let trained = ToyModel::build(mini(4))?;
    trained.perturb(5)?;
    let plain = tmp("plain.safetensors");
    let with_aux = tmp("aux.safetensors");
    let bf16 = tmp("bf16.safetensors");
    save_adapter(&plain, &trained.registry, &mini(4), &SaveOptions::default())?;
    save_adapter(
        &with_aux,
        &trained.registry,
        &mini(4),
        &SaveOptions {
            store_aux: true,
            ..Default::default()
        },
    )?;
    save_adapter(
        &bf16,
        &trained.registry,
        &mini(4),
        &SaveOptions {
            dtype: Some(DType::BF16),
            ..Default::default()
        },
    )?;
    let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
    assert!(size(&with_aux) > size(&plain));
    assert!(size(&bf16) < size(&plain));

    let file = AdapterFile::read(&with_aux, &Device::Cpu)?;
    assert!(file
        .tensors
        .contains_key("classifier.dense.lora_mini_B_aux"));
    let fresh = ToyModel::build(mini(4))?;
    file.apply(&fresh.registry)?;

    let file = AdapterFile::read(&bf16, &Device::Cpu)?;
    assert_eq!(file.metadata["dtype"], "bf16");
    let fresh = ToyModel::build(mini(4))?;
    file.apply(&fresh.registry)?;
    let x = uniform(6, &[3, 64], 1.0, DType::F32)?;
    let (a, b) = (fresh.outputs(&x)?, trained.outputs(&x)?);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.05, "bf16 round trip drifted by {worst}");
    Ok(())
}

#[test]
fn refuses_mismatched_models_naming_the_module() -> Result<()> {
    let trained = ToyModel::build(mini(7))?;
    let path = tmp("mismatch.safetensors");
    save_adapter(&path, &trained.registry, &mini(7), &SaveOptions::default())?;
    let file = AdapterFile::read(&path, &Device::Cpu)?;

    // Another seed: the frozen matrices do not reproduce.
    let err = file
        .apply(&ToyModel::build(mini(8))?.registry)
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not reproduce"), "{err}");

    // Fewer adapted modules: the file holds tensors the model cannot take.
    let mut narrow = mini(7);
    narrow.targets = vec!["query".into(), "dense".into()];
    let narrow_model = ToyModel::build(narrow)?;
    let mut tampered = file.clone();
    tampered.metadata.insert(
        "aux_checksum".into(),
        narrow_model.registry.aux_checksum()?.unwrap(),
    );
    let err = tampered
        .apply(&narrow_model.registry)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("module roberta.encoder.layer.0.attention.self.value"),
        "{err}"
    );

    // A tensor of the wrong shape.
    let mut wrong = file.clone();
    let name = "roberta.encoder.layer.1.attention.self.value.lora_mini_A_in";
    wrong
        .tensors
        .insert(name.into(), uniform(1, &[4, 9], 1.0, DType::F32)?);
    let err = wrong
        .apply(&ToyModel::build(mini(7))?.registry)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("roberta.encoder.layer.1.attention.self.value") && err.contains("[4, 9]"),
        "{err}"
    );

    // A missing tensor.
    let mut missing = file.clone();
    missing.tensors.remove("classifier.out_proj.bias");
    let err = missing
        .apply(&ToyModel::build(mini(7))?.registry)
        .unwrap_err()
        .to_string();
    assert!(err.contains("classifier.out_proj"), "{err}");

    // Not an adapter file at all.
    let weights = crate::common::shared("models/all-MiniLM-L6-v2/model.safetensors");
    let err = AdapterFile::read(&weights, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a lora-mini adapter") && err.contains("model.safetensors"),
        "{err}"
    );
    Ok(())
}

#[test]
fn lora_and_full_adapters_round_trip_too() -> Result<()> {
    for method in [Method::Lora(LoraConfig::new(2)), Method::Full] {
        let config = AdapterConfig::new(method, &["query"]).with_modules_to_save(&["classifier"]);
        let trained = ToyModel::build(config.clone())?;
        trained.perturb(9)?;
        let path = tmp(&format!("{}.safetensors", config.method.name()));
        save_adapter(&path, &trained.registry, &config, &SaveOptions::default())?;
        let file = AdapterFile::read(&path, &Device::Cpu)?;
        assert!(file.metadata["aux_checksum"].is_empty());
        let fresh = ToyModel::build(file.config.clone())?;
        file.apply(&fresh.registry)?;
        let x = uniform(10, &[2, 64], 1.0, DType::F32)?;
        assert_eq!(fresh.outputs(&x)?, trained.outputs(&x)?);
    }
    Ok(())
}

fn mini_with(aux_init: AuxInit) -> AdapterConfig {
    let mut config = mini(9);
    if let Method::LoraMini(c) = &mut config.method {
        c.aux_init = aux_init;
    }
    config
}

#[test]
fn every_aux_init_round_trips_without_storing_the_projections() -> Result<()> {
    for init in [AuxInit::Orthogonal, AuxInit::Svd, AuxInit::SvdScaled] {
        let trained = ToyModel::build(mini_with(init))?;
        trained.perturb(3)?;
        let path = tmp(&format!("init-{}.safetensors", init.name()));
        save_adapter(
            &path,
            &trained.registry,
            &mini_with(init),
            &SaveOptions::default(),
        )?;
        let file = AdapterFile::read(&path, &Device::Cpu)?;
        assert_eq!(file.metadata["aux_init"], init.name());
        assert_eq!(
            file.metadata.contains_key("base_weights"),
            init.from_weight()
        );
        assert!(!file.tensors.keys().any(|k| k.contains("aux")));
        let fresh = ToyModel::build(file.config.clone())?;
        file.apply(&fresh.registry)?;
        let x = uniform(2, &[5, 64], 1.0, DType::F32)?;
        assert_eq!(fresh.outputs(&x)?, trained.outputs(&x)?, "{init:?}");
    }
    Ok(())
}

/// SVD projections come from the base weights, so an adapter loaded onto a
/// model whose weight differs is refused, naming the module.
#[test]
fn svd_refuses_a_changed_base_weight_naming_the_module() -> Result<()> {
    let config = AdapterConfig::new(
        Method::LoraMini(LoraMiniConfig {
            aux_init: AuxInit::Svd,
            ..LoraMiniConfig::new(2, 4, 4)
        }),
        &["query", "value"],
    );
    let registry = |value_seed: u64| -> Result<lora_mini::adapter::AdapterRegistry> {
        let mut factory = LinearFactory::new(config.clone())?;
        factory.build(
            "l.0.query",
            &crate::common::base_linear(1, 16, 16, false, DType::F32)?,
        )?;
        let value = crate::common::base_linear(value_seed, 16, 16, false, DType::F32)?;
        factory.build("l.0.value", &value)?;
        factory.finish()
    };
    let path = tmp("svd-base.safetensors");
    save_adapter(&path, &registry(2)?, &config, &SaveOptions::default())?;
    let file = AdapterFile::read(&path, &Device::Cpu)?;
    file.apply(&registry(2)?)?;
    let err = file.apply(&registry(3)?).unwrap_err().to_string();
    assert!(
        err.contains("module l.0.value")
            && err.contains("base weight")
            && !err.contains("l.0.query"),
        "{err}"
    );
    Ok(())
}

/// An adapter trained on another model (same module names, other widths)
/// is refused naming the module and both shapes, before any checksum.
#[test]
fn another_models_adapter_names_the_module_and_both_shapes() -> Result<()> {
    let config = AdapterConfig::new(Method::LoraMini(LoraMiniConfig::new(2, 4, 4)), &["query"]);
    let registry = |width: usize| -> Result<lora_mini::adapter::AdapterRegistry> {
        let mut factory = LinearFactory::new(config.clone())?;
        let base = crate::common::base_linear(1, width, width, false, DType::F32)?;
        factory.build("l.0.query", &base)?;
        factory.finish()
    };
    let path = tmp("other-model.safetensors");
    let options = SaveOptions {
        base_model: Some("small-model".into()),
        ..Default::default()
    };
    save_adapter(&path, &registry(16)?, &config, &options)?;
    let file = AdapterFile::read(&path, &Device::Cpu)?;
    let err = file.apply(&registry(24)?).unwrap_err().to_string();
    assert!(
        err.contains("module l.0.query")
            && err.contains("[16, 16]")
            && err.contains("[24, 24]")
            && err.contains("trained on small-model"),
        "{err}"
    );
    Ok(())
}

/// A registry saved with a config that does not describe it (here: empty
/// targets) is refused, since the file could never be loaded back.
#[test]
fn save_refuses_a_config_that_does_not_describe_the_registry() -> Result<()> {
    let base = crate::common::base_linear(1, 16, 16, false, DType::F32)?;
    let layer =
        lora_mini::adapter::LoraMiniLinear::new(&base, &LoraMiniConfig::new(2, 4, 4), "m.fc")?;
    let mut registry = lora_mini::adapter::AdapterRegistry::new();
    registry.register("m.fc", &layer)?; // no AdaptedLinear::LoraMini(...) needed
    let method = Method::LoraMini(LoraMiniConfig::new(2, 4, 4));
    let path = tmp("undescribed.safetensors");
    let empty = AdapterConfig::new(method.clone(), &[]);
    let err = save_adapter(&path, &registry, &empty, &SaveOptions::default()).unwrap_err();
    assert!(err.to_string().contains("targets are empty"), "{err}");
    let other = AdapterConfig::new(method.clone(), &["proj"]);
    let err = save_adapter(&path, &registry, &other, &SaveOptions::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("module m.fc is lora-mini in the registry"),
        "{err}"
    );
    save_adapter(
        &path,
        &registry,
        &AdapterConfig::new(method, &["fc"]),
        &SaveOptions::default(),
    )?;
    Ok(())
}

/// `merge_into` folds the adapter into bare base tensors (names without the
/// task model's `roberta.` prefix) exactly as the layers merge themselves,
/// adds the trained head, and names a module the base lacks.
#[test]
fn merge_into_gives_the_merged_weights_under_the_base_names() -> Result<()> {
    use crate::common::{base_linear, TOY_PATHS};
    let trained = ToyModel::build(mini(5))?;
    trained.perturb(2)?;
    let path = tmp("merge_into.safetensors");
    save_adapter(&path, &trained.registry, &mini(5), &SaveOptions::default())?;
    let file = AdapterFile::read(&path, &Device::Cpu)?;

    let mut base = std::collections::HashMap::new();
    for (i, (module, d_in, d_out)) in TOY_PATHS.iter().enumerate() {
        // The fully trained head is new: only the adapter has it. (The
        // adapted `classifier.dense` is in the base, as the loader adds it.)
        if *module == "classifier.out_proj" {
            continue;
        }
        let bare = module.strip_prefix("roberta.").unwrap_or(module);
        let layer = base_linear(100 + i as u64, *d_in, *d_out, true, DType::F32)?;
        base.insert(format!("{bare}.weight"), layer.weight().clone());
        base.insert(format!("{bare}.bias"), layer.bias().unwrap().clone());
    }
    let merged = file.merge_into(&base)?;
    for (module, layer) in &trained.layers {
        let name = module.strip_prefix("roberta.").unwrap_or(module);
        let got = merged
            .get(&format!("{name}.weight"))
            .unwrap_or_else(|| panic!("{name}.weight missing"));
        let want = layer.merged_weight()?;
        assert_eq!(
            got.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?,
            "{module}"
        );
    }
    assert_eq!(
        merged.len(),
        base.len() + 2,
        "the head's weight and bias join"
    );

    base.remove("encoder.layer.1.attention.self.value.weight");
    let err = file.merge_into(&base).unwrap_err().to_string();
    assert!(
        err.contains("module roberta.encoder.layer.1.attention.self.value has no weight"),
        "{err}"
    );
    Ok(())
}
