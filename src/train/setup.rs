//! What a training config resolves to: the device, the adapter config and
//! the optimizer's parameter groups.

use candle::Device;

use super::config::{DeviceChoice, MethodName, TrainConfig};
use super::optim::ParamGroup;
use crate::adapter::targets::ALL_LINEAR;
use crate::adapter::{AdapterConfig, LoraConfig, LoraMiniConfig, Method};
use crate::models::presets::resolve_targets;
use crate::Error;

/// The optimizer's parameter groups: the head (`modules_to_save`) at
/// `optim.head_lr` and `optim.head_weight_decay`, everything else at
/// `optim.lr` and `optim.weight_decay`. Both always appear, so a run's
/// `results.json` says what each tensor trained at.
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
    vec![
        ParamGroup {
            name: "adapter".into(),
            lr_scale: 1.0,
            weight_decay: o.weight_decay,
            tensors: rest,
        },
        ParamGroup {
            name: "head".into(),
            lr_scale: o.head_lr.map_or(1.0, |h| h / o.lr),
            weight_decay: o.head_weight_decay.unwrap_or(o.weight_decay),
            tensors: head,
        },
    ]
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
