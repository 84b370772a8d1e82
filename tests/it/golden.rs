//! Our models against Hugging Face transformers' outputs, recorded by
//! tests/fixtures/make_golden.py on tiny random checkpoints saved with
//! `save_pretrained`.

use candle::{DType, Device, Result, Tensor};
use lora_mini::adapter::LinearFactory;
use lora_mini::models::task::{load_task_model, LoadedModel, TaskModel};
use serde_json::Value;

use crate::common::max_abs_diff;

fn golden() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn load(name: &str, labels: Option<usize>) -> Result<LoadedModel> {
    let dir = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    load_task_model(
        &dir,
        None,
        labels,
        LinearFactory::frozen(),
        DType::F32,
        &Device::Cpu,
        0,
    )
}

fn tensor_u32(v: &Value) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = serde_json::from_value(v.clone()).unwrap();
    let (n, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, t), &Device::Cpu)
}

fn tensor_f32(v: &Value) -> Result<Tensor> {
    let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
    let (n, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, t), &Device::Cpu)
}

#[test]
fn encoder_classifiers_match_transformers_logits() -> Result<()> {
    let g = golden();
    for (name, fixture, labels) in [
        ("bert-2", "bert-2", 2),
        ("bert-2", "bert-2-bin", 2),
        ("bert-1", "bert-1", 1),
        ("roberta-3", "roberta-3", 3),
    ] {
        let case = &g[name];
        let model = load(fixture, Some(labels))?;
        let ids = tensor_u32(&case["input_ids"])?;
        let mask = tensor_u32(&case["attention_mask"])?;
        let logits = match &model.model {
            TaskModel::Bert(m) => m.forward_t(
                &ids,
                Some(&tensor_u32(&case["token_type_ids"])?),
                Some(&mask),
                false,
            )?,
            TaskModel::Roberta(m) => m.forward_t(&ids, Some(&mask), false)?,
            TaskModel::T5(_) | TaskModel::Llama(_) => unreachable!(),
        };
        let err = max_abs_diff(&logits, &tensor_f32(&case["logits"])?)?;
        eprintln!("{fixture}: max |logits - transformers| = {err:e}");
        assert!(err < 1e-4, "{fixture}: {err}");
    }
    Ok(())
}

#[test]
fn t5_matches_transformers_logits_loss_and_generations() -> Result<()> {
    let g = golden();
    for name in ["t5-v1_0", "t5-v1_1"] {
        let case = &g[name];
        let loaded = load(name, None)?;
        let TaskModel::T5(model) = &loaded.model else {
            unreachable!()
        };
        let ids = tensor_u32(&case["input_ids"])?;
        let mask = tensor_u32(&case["attention_mask"])?;
        let labels: Vec<Vec<i64>> = serde_json::from_value(case["labels"].clone()).unwrap();
        let labels = Tensor::from_vec(labels.concat(), (2, 5), &Device::Cpu)?;
        let logits = model.forward_t(&ids, Some(&mask), &model.shift_right(&labels)?, false)?;
        let expected: Vec<Vec<Vec<f32>>> = serde_json::from_value(case["logits"].clone()).unwrap();
        let expected = Tensor::from_vec(expected.concat().concat(), logits.shape(), &Device::Cpu)?;
        let logit_err = max_abs_diff(&logits, &expected)?;
        let loss = model
            .loss(&ids, Some(&mask), &labels, false)?
            .to_scalar::<f32>()? as f64;
        let loss_err = (loss - case["loss"].as_f64().unwrap()).abs();
        eprintln!("{name}: max |logits - transformers| = {logit_err:e}, |loss - transformers| = {loss_err:e}");
        assert!(
            logit_err < 1e-4 && loss_err < 1e-4,
            "{name}: {logit_err} {loss_err}"
        );

        let up_to_eos = |v: &Value| -> Vec<u32> {
            let mut t: Vec<u32> = serde_json::from_value(v.clone()).unwrap();
            if let Some(p) = t.iter().position(|&x| x == 1) {
                t.truncate(p + 1);
            }
            t
        };
        let expected: Vec<Vec<u32>> = case["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(up_to_eos)
            .collect();
        assert_eq!(
            model.generate_greedy(&ids, Some(&mask), 12)?,
            expected,
            "{name} greedy"
        );
        let beam = model.generate_beam(&ids.narrow(0, 0, 1)?, 3, 12, 1.0)?;
        assert_eq!(
            beam,
            up_to_eos(&case["beam3"]),
            "{name} beam search, 3 beams"
        );
    }
    Ok(())
}
