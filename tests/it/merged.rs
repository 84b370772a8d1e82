//! Merged checkpoints: adapters folded into plain Hugging Face weights give
//! the same outputs as model + adapter through our own loader.

use candle::{DType, Device, Result, Tensor};
use lora_mini::adapter::{AdapterConfig, InnerInit, LinearFactory, LoraMiniConfig, Method};
use lora_mini::models::presets::{resolve_targets, Family};
use lora_mini::models::task::{load_task_model, LoadedModel, TaskModel};

use crate::common::max_abs_diff;

fn load(dir: &str, family: Family, adapted: bool) -> Result<LoadedModel> {
    let factory = if adapted {
        let method = Method::LoraMini(LoraMiniConfig {
            inner_init: InnerInit::Kaiming,
            ..LoraMiniConfig::new(2, 8, 8)
        });
        LinearFactory::new(AdapterConfig {
            method,
            targets: resolve_targets(family, "dense+attention", false)?,
            modules_to_save: family.head_modules(),
        })?
    } else {
        LinearFactory::frozen()
    };
    let labels = match family {
        Family::Bert => Some(2),
        Family::Roberta => Some(3),
        Family::T5 | Family::Llama => None,
    };
    load_task_model(dir, None, labels, factory, DType::F32, &Device::Cpu, 5)
}

fn outputs(model: &TaskModel) -> Result<Tensor> {
    let dev = Device::Cpu;
    match model {
        TaskModel::Bert(m) => m.forward_t(
            &Tensor::new(&[[2u32, 17, 42, 8, 3]], &dev)?,
            None,
            None,
            false,
        ),
        TaskModel::Roberta(m) => {
            m.forward_t(&Tensor::new(&[[0u32, 17, 42, 8, 2]], &dev)?, None, false)
        }
        TaskModel::T5(m) => {
            let ids = Tensor::new(&[[5u32, 17, 42, 8, 1]], &dev)?;
            m.forward_t(&ids, None, &Tensor::new(&[[0u32, 7, 22]], &dev)?, false)
        }
        TaskModel::Llama(m) => m.forward_t(
            &Tensor::new(&[[1u32, 17, 42, 8, 3]], &dev)?,
            None,
            None,
            false,
        ),
    }
}

#[test]
fn merged_checkpoints_reproduce_model_plus_adapter() -> Result<()> {
    for (fixture, family) in [
        ("bert-2", Family::Bert),
        ("roberta-3", Family::Roberta),
        ("t5-v1_0", Family::T5),
        ("llama-gqa", Family::Llama),
        ("qwen2-bias", Family::Llama),
    ] {
        let dir = format!("{}/tests/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR"));
        let adapted = load(&dir, family, true)?;
        // Train-like perturbation of the fully trained head.
        for (name, var) in adapted.registry.trainable() {
            if !name.contains("lora_mini") {
                var.set(&(var.as_tensor() * 1.5)?)?;
            }
        }
        let expected = outputs(&adapted.model)?;
        assert!(
            max_abs_diff(&expected, &outputs(&load(&dir, family, false)?.model)?)? > 1e-3,
            "{fixture}: the adapter changes nothing"
        );

        let out = crate::common::scratch(&format!("merged-{fixture}"));
        adapted.save_merged(&out)?;
        let merged = load(out.to_str().unwrap(), family, false)?;
        let err = max_abs_diff(&outputs(&merged.model)?, &expected)?;
        eprintln!("{fixture}: merged vs model + adapter, max err {err:e}");
        assert!(err < 1e-5, "{fixture}: {err}");
        if family == Family::T5 {
            let config = std::fs::read_to_string(out.join("config.json"))?;
            assert!(
                config.contains("\"tie_word_embeddings\": false"),
                "{config}"
            );
        }
    }
    Ok(())
}
