//! What a training config resolves to: the device, the adapter config and
//! the optimizer's parameter groups.

use candle::Device;

use super::config::{DeviceChoice, MethodName, TrainConfig};
use super::optim::ParamGroup;
use crate::adapter::is_b_factor;
use crate::adapter::targets::ALL_LINEAR;
use crate::adapter::{AdapterConfig, LoraConfig, LoraMiniConfig, Method};
use crate::models::presets::resolve_targets;
use crate::Error;

/// The optimizer's parameter groups: the head (`modules_to_save`) at
/// `optim.head_lr` and `optim.head_weight_decay`, everything else at
/// `optim.lr` and `optim.weight_decay`. Both always appear, so a run's
/// `results.json` says what each tensor trained at. With
/// `optim.b_lr_ratio` (LoRA+), a third group `adapter_b` holds the
/// zero-initialised factors at `optim.lr · b_lr_ratio`.
pub fn param_groups(
    config: &TrainConfig,
    adapter: &AdapterConfig,
    trainable: &[(String, candle::Var)],
) -> Vec<ParamGroup> {
    let o = &config.optim;
    let in_head = |name: &str| {
        adapter
            .modules_to_save
            .iter()
            .any(|m| crate::adapter::targets::is_within(name, m))
    };
    let (head, rest): (Vec<String>, Vec<String>) = trainable
        .iter()
        .map(|(n, _)| n.clone())
        .partition(|n| in_head(n));
    // LoRA+'s faster factor gets a group only when asked for, so runs
    // without it keep the two groups (and results.json) they always had.
    let (b_factors, rest): (Vec<String>, Vec<String>) = match o.b_lr_ratio {
        Some(_) => rest.into_iter().partition(|n| is_b_factor(n)),
        None => (Vec::new(), rest),
    };
    let mut groups = vec![ParamGroup {
        name: "adapter".into(),
        lr_scale: 1.0,
        weight_decay: o.weight_decay,
        tensors: rest,
    }];
    if let Some(ratio) = o.b_lr_ratio {
        groups.push(ParamGroup {
            name: "adapter_b".into(),
            lr_scale: ratio,
            weight_decay: o.weight_decay,
            tensors: b_factors,
        });
    }
    groups.push(ParamGroup {
        name: "head".into(),
        lr_scale: o.head_lr.map_or(1.0, |h| h / o.lr),
        weight_decay: o.head_weight_decay.unwrap_or(o.weight_decay),
        tensors: head,
    });
    groups
}

/// The device a config asks for.
pub fn device(choice: DeviceChoice) -> Result<Device, Error> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            Device::new_cuda(0).map_err(|e| Error::from(e).context("run.device = \"cuda\""))
        }
        DeviceChoice::Metal => {
            Device::new_metal(0).map_err(|e| Error::from(e).context("run.device = \"metal\""))
        }
        DeviceChoice::Auto => Ok(if candle::utils::cuda_is_available() {
            Device::new_cuda(0)?
        } else if candle::utils::metal_is_available() {
            Device::new_metal(0)?
        } else {
            Device::Cpu
        }),
    }
}

/// The adapter config a training config asks for.
pub fn adapter_config(
    config: &TrainConfig,
    loaded_family: crate::models::presets::Family,
    gated: bool,
) -> Result<AdapterConfig, Error> {
    let a = &config.adapter;
    let (method, targets) = match a.method {
        MethodName::Full => (Method::Full, vec![ALL_LINEAR.to_string()]),
        MethodName::Lora => (
            Method::Lora(LoraConfig {
                alpha: a.alpha,
                dropout: a.dropout,
                use_rslora: a.use_rslora,
                inner_init: a.inner_init,
                seed: a.seed,
                ..LoraConfig::new(a.r)
            }),
            resolve_targets(loaded_family, &a.targets, gated)?,
        ),
        MethodName::LoraMini => (
            Method::LoraMini(LoraMiniConfig {
                alpha: a.alpha,
                dropout: a.dropout,
                use_rslora: a.use_rslora,
                inner_init: a.inner_init,
                aux_init: a.aux_init,
                seed: a.seed,
                ..LoraMiniConfig::new(a.r, a.a, a.b)
            }),
            resolve_targets(loaded_family, &a.targets, gated)?,
        ),
    };
    Ok(AdapterConfig {
        method,
        targets,
        modules_to_save: loaded_family.head_modules(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::presets::Family;
    use crate::train::config::TrainConfig;
    use candle::DType;
    use std::path::Path;

    /// The groups of the quickstart config (cores 3e-3, head 1e-2) with
    /// `overrides`, over one LoRA-Mini module and the head, as
    /// `(name, lr_scale, tensors)`.
    fn groups_with(overrides: &[&str]) -> Vec<(String, f64, Vec<String>)> {
        let overrides: Vec<String> = overrides.iter().map(|o| o.to_string()).collect();
        let config = TrainConfig::load(Path::new("configs/quickstart.toml"), &overrides).unwrap();
        let adapter = adapter_config(&config, Family::Bert, false).unwrap();
        let names = ["q.lora_mini_A_in", "q.lora_mini_B_in", "classifier.weight"];
        let trainable: Vec<(String, candle::Var)> = names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    candle::Var::zeros(1, DType::F32, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        param_groups(&config, &adapter, &trainable)
            .into_iter()
            .map(|g| (g.name, g.lr_scale, g.tensors))
            .collect()
    }

    #[test]
    fn lora_plus_trains_the_zero_initialised_factor_in_a_group_of_its_own() {
        let plus = groups_with(&["optim.b_lr_ratio=16"]);
        let names: Vec<&str> = plus.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(names, ["adapter", "adapter_b", "head"]);
        assert_eq!(plus[0].2, ["q.lora_mini_A_in"]);
        assert_eq!(
            (plus[1].1, plus[1].2.as_slice()),
            (16.0, &["q.lora_mini_B_in".to_string()][..])
        );
        assert_eq!(plus[2].2, ["classifier.weight"]);
        // Without it, both factors share the adapter's group, as before.
        let plain = groups_with(&[]);
        assert_eq!(plain.len(), 2);
        assert_eq!(plain[0].2, ["q.lora_mini_A_in", "q.lora_mini_B_in"]);
    }

    #[test]
    fn lora_plus_refuses_full_fine_tuning_and_a_non_positive_ratio() {
        let load = |set: &[&str]| {
            let set: Vec<String> = set.iter().map(|o| o.to_string()).collect();
            TrainConfig::load(Path::new("configs/quickstart.toml"), &set)
                .unwrap_err()
                .to_string()
        };
        let full = load(&["optim.b_lr_ratio=16", "adapter.method=full"]);
        assert!(
            full.contains("optim.b_lr_ratio") && full.contains("not full"),
            "{full}"
        );
        let zero = load(&["optim.b_lr_ratio=0"]);
        assert!(
            zero.contains("optim.b_lr_ratio") && zero.contains("must be positive"),
            "{zero}"
        );
    }

    #[test]
    fn auto_uses_the_cpu_when_no_accelerator_is_compiled_in() {
        let built_with_accelerator = cfg!(any(feature = "cuda", feature = "metal"));
        if !built_with_accelerator {
            assert!(device(DeviceChoice::Auto).unwrap().is_cpu());
            // Asking for one that is not there names the setting.
            let err = device(DeviceChoice::Cuda).unwrap_err().to_string();
            assert!(err.starts_with("run.device = \"cuda\""), "{err}");
        }
        assert!(device(DeviceChoice::Cpu).unwrap().is_cpu());
    }
}
