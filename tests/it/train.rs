//! The trainer end to end on a tiny random BERT, and config validation.

use std::path::PathBuf;

use candle::{DType, Device, Result};
use lora_mini::adapter::{AdapterFile, LinearFactory};
use lora_mini::models::task::load_task_model;
use lora_mini::train::config::TrainConfig;
use lora_mini::train::trainer::{adapter_config, train, train_with, TrainOptions, CHECKPOINT};

use crate::common::{random_encoder, shared};

/// The table examples' runner (clap, so the `cli` feature), tested here
/// on tiny checkpoints.
#[cfg(feature = "cli")]
#[path = "../../examples/common/tables.rs"]
mod tables;

fn workdir(name: &str) -> PathBuf {
    crate::common::scratch(&format!("train-{name}"))
}

/// A tiny BERT with MiniLM's vocabulary (so its tokenizer fits) and a
/// sentiment toy task that a few steps can learn.
fn tiny_setup() -> Result<(PathBuf, PathBuf)> {
    tiny_setup_in("tiny")
}

/// [`tiny_setup`] in its own folders (tests run in parallel).
pub fn tiny_setup_in(tag: &str) -> Result<(PathBuf, PathBuf)> {
    let model = workdir(&format!("{tag}-model"));
    let config = r#"{"model_type": "bert", "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1,
      "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64, "type_vocab_size": 2}"#;
    std::fs::write(model.join("config.json"), config)?;
    let tensors = random_encoder(
        "bert",
        [30522, 16, 32, 1, 64, 2],
        &[("bert.pooler.dense", 16, 16)],
    )?;
    candle::safetensors::save(&tensors, model.join("model.safetensors"))?;
    std::fs::copy(
        shared("models/all-MiniLM-L6-v2/tokenizer.json"),
        model.join("tokenizer.json"),
    )?;
    let data = workdir(&format!("{tag}-data"));
    let good = [
        "a wonderful film",
        "great and moving",
        "truly excellent acting",
        "a delight",
        "superb fun",
    ];
    let bad = [
        "a dreadful mess",
        "boring and dull",
        "truly awful acting",
        "a disaster",
        "tedious junk",
    ];
    let mut rows = String::from("sentence\tlabel\n");
    for i in 0..40 {
        rows += &format!("{}\t1\n{}\t0\n", good[i % 5], bad[i % 5]);
    }
    std::fs::write(data.join("train.tsv"), &rows)?;
    let dev: Vec<&str> = rows.lines().take(21).collect();
    std::fs::write(data.join("dev.tsv"), dev.join("\n") + "\n")?;
    Ok((model, data))
}

pub fn config_text(
    model: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
) -> String {
    format!(
        r#"[model]
source = "{}"
[task]
name = "sst2"
data = "{}"
max_len = 16
[adapter]
method = "lora-mini"
targets = "dense+attention"
r = 4
a = 8
b = 8
[optim]
epochs = 8
batch_size = 8
lr = 0.01
warmup_ratio = 0.0
[run]
device = "cpu"
output_dir = "{}"
log_every = 5
"#,
        model.display(),
        data.display(),
        out.display()
    )
}

/// [`config_text`] written into a fresh folder `tag` and loaded with
/// `overrides`; returns the config and its run folder (`<tag>/out`).
pub fn tiny_config(
    tag: &str,
    model: &std::path::Path,
    data: &std::path::Path,
    overrides: &[&str],
) -> (TrainConfig, PathBuf) {
    let dir = workdir(tag);
    let run = dir.join("out");
    let path = dir.join("config.toml.in");
    std::fs::write(&path, config_text(model, data, &run)).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|o| o.to_string()).collect();
    (TrainConfig::load(&path, &overrides).unwrap(), run)
}

#[test]
fn trains_a_tiny_model_and_writes_its_files() -> Result<()> {
    let (model, data) = tiny_setup()?;
    let (config, run) = tiny_config("run", &model, &data, &[]);
    let summary = train(&config).unwrap();
    for file in [
        "config.toml",
        "metrics.jsonl",
        "curves.svg",
        "adapter-best.safetensors",
        "adapter-last.safetensors",
        "results.json",
        CHECKPOINT,
    ] {
        assert!(run.join(file).exists(), "{file}");
    }
    // The loss decreases over the logged steps.
    let losses: Vec<f64> = std::fs::read_to_string(run.join("metrics.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect();
    assert!(
        losses.len() >= 3 && losses.last() < losses.first(),
        "{losses:?}"
    );
    assert!(
        summary.best["accuracy"].unwrap() > 0.6,
        "{:?}",
        summary.best
    );
    // The saved adapter loads into a freshly built model and gives the trained predictions.
    let file = AdapterFile::read(run.join("adapter-best.safetensors"), &Device::Cpu)?;
    let family = lora_mini::models::presets::Family::Bert;
    assert_eq!(file.config, adapter_config(&config, family, false).unwrap());
    let fresh = load_task_model(
        model.to_str().unwrap(),
        None,
        Some(2),
        LinearFactory::new(file.config.clone())?,
        DType::F32,
        &Device::Cpu,
        42,
    )?;
    file.apply(&fresh.registry)?;
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json"))?).unwrap();
    assert_eq!(
        results["trainable"].as_u64().unwrap() as usize,
        fresh.registry.num_trainable()
    );
    Ok(())
}

/// bf16 runs through the composed (unfused) ops, the same path CUDA and
/// Metal take, so CPU tests keep that path training: every LoRA-Mini tensor
/// (inner matrices Kaiming-initialised, so none starts with a zero
/// gradient) and the head get a finite, non-zero gradient through a bf16
/// model with dropout on, and the trainer learns the toy task in bf16.
#[test]
fn bf16_trains_through_the_composed_ops() -> Result<()> {
    use lora_mini::adapter::{AdapterConfig, InnerInit, LoraMiniConfig, Method};

    let (model, data) = tiny_setup_in("bf16")?;
    let mini = LoraMiniConfig {
        inner_init: InnerInit::Kaiming,
        ..LoraMiniConfig::new(4, 8, 8)
    };
    let loaded = load_task_model(
        model.to_str().unwrap(),
        None,
        Some(2),
        LinearFactory::new(
            AdapterConfig::new(Method::LoraMini(mini), &["query", "key", "value", "dense"])
                .with_modules_to_save(&["classifier"]),
        )?,
        DType::BF16,
        &Device::Cpu,
        42,
    )?;
    let ids = candle::Tensor::new(
        &[[101u32, 2307, 3185, 102], [101, 6659, 102, 0]],
        &Device::Cpu,
    )?;
    let mask = candle::Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0]], &Device::Cpu)?;
    let logits = loaded.model.classify(&ids, None, Some(&mask), true)?;
    assert_eq!(logits.dtype(), DType::BF16);
    let loss = lora_mini::models::bert::sequence_classification_loss(
        &logits,
        &candle::Tensor::new(&[1u32, 0], &Device::Cpu)?,
    )?;
    let grads = loss.backward()?;
    let trainable = loaded.registry.trainable();
    assert!(trainable.iter().any(|(n, _)| n.ends_with("lora_mini_A_in")));
    for (name, var) in &trainable {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(norm.is_finite() && norm > 0.0, "gradient of {name}: {norm}");
    }

    let (config, run) = tiny_config("bf16-run", &model, &data, &["model.dtype=bf16"]);
    let summary = train(&config).unwrap();
    let losses: Vec<f64> = logged_losses(&run).into_iter().map(|(_, l)| l).collect();
    assert!(
        losses.len() >= 3 && losses.iter().all(|l| l.is_finite()) && losses.last() < losses.first(),
        "{losses:?}"
    );
    assert!(
        summary.best["accuracy"].unwrap() > 0.6,
        "{:?}",
        summary.best
    );
    Ok(())
}

#[test]
fn bad_configs_name_the_key_and_line() {
    let (model, data) = tiny_setup().unwrap();
    let out = workdir("bad");
    let base = config_text(&model, &data, &out);
    let cases: Vec<(String, &str)> = vec![
        (
            base.replace("r = 4", "r = 0"),
            ":10: adapter.r: must be at least 1",
        ),
        (
            base.replace("a = 8", "a = 0"),
            ":11: adapter.a: must be at least 1",
        ),
        (base.replace("lr = 0.01", "lr = -1.0"), ":16: optim.lr"),
        (
            base.replace("name = \"sst2\"", "name = \"sst3\""),
            ":4: task.name: unknown task",
        ),
        (
            base.replace("batch_size = 8", "batch_size = 8\nlearning_rate = 3"),
            ":16:1: unknown field `learning_rate`",
        ),
        (
            base.replace("method = \"lora-mini\"", "method = \"adapter\""),
            "adapter.method",
        ),
        (
            base.replace("targets = \"dense+attention\"", "targets = \"qeury\""),
            "\"qeury\"",
        ),
    ];
    for (i, (text, expected)) in cases.into_iter().enumerate() {
        let path = out.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let err = match TrainConfig::load(&path, &[]) {
            Err(e) => e.to_string(),
            Ok(config) => train(&config).map(|_| ()).unwrap_err().to_string(),
        };
        assert!(err.contains(expected), "case {i}: {err}");
        assert_eq!(err.lines().count(), 1, "case {i}: {err}");
    }
    // --set overrides apply, and bad ones are named.
    let path = out.join("good.toml");
    std::fs::write(&path, &base).unwrap();
    let c = TrainConfig::load(&path, &["optim.lr=0.5".into(), "run.seed=7".into()]).unwrap();
    assert_eq!((c.optim.lr, c.run.seed), (0.5, 7));
    assert!(TrainConfig::load(&path, &["optim.lr".into()])
        .unwrap_err()
        .to_string()
        .contains("section.key=value"));
    assert!(TrainConfig::load(&path, &["optim.lr=0".into()])
        .unwrap_err()
        .to_string()
        .contains("optim.lr"));
}

/// Closed sets (dtype, method, device) are enums: an unknown value is one
/// line naming the file, line, key and every valid value, never a silent
/// fallback.
#[test]
fn unknown_choices_list_the_valid_values() {
    let (model, data) = tiny_setup().unwrap();
    let out = workdir("choices");
    let base = config_text(&model, &data, &out);
    let cases = [
        (
            base.replace("method = \"lora-mini\"", "method = \"lora_mini\""),
            "(adapter.method)",
            "`full`, `lora`, `lora-mini`",
        ),
        (
            base.replace("device = \"cpu\"", "device = \"gpu\""),
            "(run.device)",
            "`auto`, `cpu`, `cuda`, `metal`",
        ),
        (
            base.replace("[model]", "[model]\ndtype = \"f64\""),
            "(model.dtype)",
            "`f32`, `bf16`, `f16`",
        ),
    ];
    for (i, (text, key, valid)) in cases.into_iter().enumerate() {
        let path = out.join(format!("choice{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let err = TrainConfig::load(&path, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}:", path.display()))
                && err.contains(key)
                && err.contains(valid),
            "case {i}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "case {i}: {err}");
    }
}

#[test]
fn shipped_configs_parse_and_validate_against_the_real_shapes() {
    use lora_mini::models::bert::BertConfig;
    use lora_mini::models::presets::Family;
    use lora_mini::models::shapes::{encoder_classifier, t5_conditional_generation};
    use lora_mini::models::t5::T5Config;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".toml") || name == "demo.toml" {
            continue;
        }
        let config = TrainConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
        let shape_file = match config.model.source.rsplit('/').next().unwrap() {
            "roberta-base" => "roberta-base",
            "bert-base-uncased" => "bert-base-uncased",
            "t5-small" => "t5-small",
            "t5-base" => "t5-base",
            _ => continue,
        };
        let text =
            std::fs::read_to_string(shared(&format!("model-configs/{shape_file}.json"))).unwrap();
        let family = Family::from_config_json(&text).unwrap();
        let task = lora_mini::data::task(&config.task.name).unwrap();
        let (shapes, gated) = match family {
            Family::T5 => {
                let c = T5Config::from_json(&text).unwrap();
                (t5_conditional_generation(&c), c.is_gated())
            }
            _ => (
                encoder_classifier(
                    family,
                    &BertConfig::from_json(&text).unwrap(),
                    task.num_labels().unwrap(),
                ),
                false,
            ),
        };
        let adapter = adapter_config(&config, family, gated).unwrap();
        let count = shapes
            .count(&adapter)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(count.trainable > 0, "{name}");
        checked += 1;
    }
    // 80 encoder settings, 18 T5 settings and the headline roberta-cola.
    assert_eq!(checked, 99);
    // The measured MiniLM table's configs parse, name the local model and
    // data, and map onto Table 2's rows.
    let minilm = dir.join("minilm");
    let mut rows = 0;
    for entry in std::fs::read_dir(&minilm).unwrap() {
        let path = entry.unwrap().path();
        let config = TrainConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.model.source.ends_with("all-MiniLM-L6-v2"));
        assert!(config.run.time_budget_minutes.is_some());
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        #[cfg(feature = "cli")]
        assert!(
            tables::row_of(tables::PaperTable::Table2, &stem).is_some(),
            "{stem}"
        );
        rows += 1;
    }
    assert_eq!(rows, 16);
    let c = TrainConfig::load(&dir.join("quickstart.toml"), &[]).unwrap();
    assert_eq!(
        (c.adapter.method.as_str(), c.task.name.as_str()),
        ("lora-mini", "sst2")
    );
}

/// Trainable tensors of an adapter file, by name, as exact f32 bits.
fn adapter_bits(path: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let file = AdapterFile::read(path, &Device::Cpu).unwrap();
    file.tensors
        .iter()
        .map(|(n, t)| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (n.clone(), v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn logged_losses(run: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v["loss"].as_f64()?))
        })
        .collect()
}

#[test]
fn a_run_stopped_after_every_step_and_resumed_ends_bitwise_equal() -> Result<()> {
    let (model, data) = tiny_setup_in("resume")?;
    let out = workdir("resume-run");
    // Adapter dropout and the model's own dropouts (0.1 by default) are on,
    // steps accumulate two batches, the head has its own learning rate and
    // weight decay, and a validation slice chooses the best step: every
    // piece of state must resume.
    let text = config_text(&model, &data, &out.join("straight"))
        .replace("b = 8", "b = 8\ndropout = 0.1\naux_init = \"orthogonal\"")
        .replace(
            "epochs = 8",
            "epochs = 2\ngrad_accum = 2\nhead_lr = 0.002\nhead_weight_decay = 0.1",
        )
        .replace("max_len = 16", "max_len = 16\nvalidation_split = 0.2")
        .replace("log_every = 5", "log_every = 1\neval_every = 3");
    let path = out.join("config.toml.in");
    std::fs::write(&path, &text)?;
    let straight = TrainConfig::load(&path, &[]).unwrap();
    let summary = train(&straight).unwrap();
    // 80 rows, 16 held out: 64 train in 8 batches, 4 steps an epoch.
    assert_eq!(summary.steps, 8);
    assert_eq!(summary.selection, "validation-split");
    assert!(summary.best_validation.contains_key("accuracy"));

    // The same run, stopped after each step and resumed from its checkpoint.
    let mut stopped = straight.clone();
    stopped.run.output_dir = out.join("stopped");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut resume = false;
    let mut runs = 0;
    loop {
        let s = train_with(
            &stopped,
            &TrainOptions {
                resume,
                stop: Some(stop.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        runs += 1;
        if !s.interrupted {
            assert_eq!(s.best, summary.best);
            break;
        }
        assert_eq!(s.steps, runs);
        assert!(!stopped.run.output_dir.join("results.json").exists());
        resume = true;
    }
    assert_eq!(runs, 8);
    let (a, b) = (out.join("straight"), out.join("stopped"));
    for file in ["adapter-last.safetensors", "adapter-best.safetensors"] {
        assert_eq!(
            adapter_bits(&a.join(file)),
            adapter_bits(&b.join(file)),
            "{file}"
        );
    }
    // Same losses, logged once per step despite ten restarts.
    assert_eq!(logged_losses(&a), logged_losses(&b));
    assert_eq!(logged_losses(&b).len(), 8);
    Ok(())
}

/// The head trains at `optim.head_lr`, the rest at `optim.lr`; results.json
/// and the log say which tensor got which, and a validation slice (never
/// the dev set) chooses the best step.
#[test]
fn head_lr_and_validation_split_are_recorded() -> Result<()> {
    let (model, data) = tiny_setup_in("groups")?;
    let (config, run) = tiny_config(
        "groups-run",
        &model,
        &data,
        &[
            "optim.head_lr=0.001",
            "optim.max_steps=6",
            "task.validation_split=0.25",
            "run.eval_every=3",
        ],
    );
    let summary = train(&config).unwrap();
    let head = &summary.param_groups[1];
    assert_eq!(head.name, "head");
    assert_eq!(
        head.tensors,
        vec![
            "classifier.bias".to_string(),
            "classifier.weight".to_string()
        ]
    );
    assert!((0.01 * head.lr_scale - 0.001).abs() < 1e-12);
    let adapter = &summary.param_groups[0];
    assert!(adapter.tensors.iter().all(|t| t.contains("lora_mini_")));
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json"))?).unwrap();
    assert_eq!(results["selection"], "validation-split");
    assert_eq!(results["param_groups"][1]["tensors"][0], "classifier.bias");
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["eval"] == true)
        .collect();
    assert_eq!(evals.len(), 2);
    assert!(evals
        .iter()
        .all(|e| e["validation"]["accuracy"].is_number()));
    // The best step is the one with the best validation accuracy.
    let best_val = evals
        .iter()
        .map(|e| e["validation"]["accuracy"].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    assert_eq!(summary.best_validation["accuracy"], Some(best_val));
    Ok(())
}

/// A sweep stopped in its first run resumes that run, then finishes the
/// grid; run again, it skips everything and rewrites the same table.
#[test]
fn sweep_resumes_an_interrupted_run_and_skips_finished_ones() -> Result<()> {
    use lora_mini::train::sweep::{run_sweep, GridAxis, SweepEnd, SweepOptions};
    let (model, data) = tiny_setup_in("sweep")?;
    let dir = workdir("sweep-run");
    let config = dir.join("base.toml");
    std::fs::write(&config, config_text(&model, &data, &dir.join("unused")))?;
    let options = |stop: bool| SweepOptions {
        config: config.clone(),
        set: vec![
            "optim.max_steps=3".into(),
            "run.log_every=1".into(),
            "task.validation_split=0.25".into(),
        ],
        axes: vec![GridAxis::parse("optim.lr=0.01,0.02").unwrap()],
        seeds: vec![1, 2],
        out_dir: dir.join("sweep"),
        stop: stop.then(|| std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true))),
    };
    let first = "optim.lr=0.01_seed=1";
    match run_sweep(&options(true), "accuracy").unwrap() {
        SweepEnd::Interrupted { run, runs } => {
            assert_eq!(run, first);
            assert!(runs.is_empty());
        }
        other => panic!("expected an interruption, got {other:?}"),
    }
    let run_dir = dir.join("sweep").join(first);
    assert!(run_dir.join(CHECKPOINT).exists() && !run_dir.join("results.json").exists());
    let SweepEnd::Finished(runs) = run_sweep(&options(false), "accuracy").unwrap() else {
        panic!("the sweep did not finish");
    };
    assert_eq!(runs.len(), 4);
    assert!(runs
        .iter()
        .all(|r| !r.skipped && r.validation.contains_key("accuracy")));
    // Resumed, not restarted: each of the three steps logged once.
    let steps: Vec<u64> = logged_losses(&run_dir).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![1, 2, 3]);
    let table = std::fs::read_to_string(dir.join("sweep").join("sweep.md"))?;
    assert!(
        table.contains("(chosen)") && table.contains("| 2 |"),
        "{table}"
    );
    let SweepEnd::Finished(again) = run_sweep(&options(false), "accuracy").unwrap() else {
        panic!("the second sweep did not finish");
    };
    assert!(again.iter().all(|r| r.skipped));
    assert_eq!(
        std::fs::read_to_string(dir.join("sweep").join("sweep.md"))?,
        table
    );
    Ok(())
}

#[test]
fn resume_refuses_a_changed_config_or_a_missing_checkpoint() -> Result<()> {
    let (model, data) = tiny_setup_in("refuse")?;
    let (mut config, _) = tiny_config("refuse-run", &model, &data, &[]);
    let resume = TrainOptions {
        resume: true,
        ..Default::default()
    };
    let err = train_with(&config, &resume).unwrap_err().to_string();
    assert!(err.contains("holds no checkpoint"), "{err}");
    let stop = TrainOptions {
        stop: Some(std::sync::Arc::new(true.into())),
        ..Default::default()
    };
    let summary = train_with(&config, &stop).unwrap();
    assert!(summary.interrupted);
    assert_eq!(summary.stopped.name(), "interrupted");
    // A fresh start over it is refused, naming the way out.
    let err = train_with(&config, &stop).unwrap_err().to_string();
    assert!(
        err.contains("holds an earlier run") && err.contains("--overwrite"),
        "{err}"
    );
    config.optim.lr = 0.02;
    config.run.log_every = 2; // allowed to change
    let err = train_with(&config, &resume).unwrap_err().to_string();
    assert!(err.contains("optim.lr: 0.01 -> 0.02"), "{err}");
    assert!(!err.contains("log_every"), "{err}");
    // --overwrite replaces it; max_steps ending the run is recorded as such.
    config.optim.max_steps = Some(2);
    let overwrite = TrainOptions {
        overwrite: true,
        ..Default::default()
    };
    let summary = train_with(&config, &overwrite).unwrap();
    assert_eq!((summary.steps, summary.stopped.name()), (2, "max_steps"));
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        config.run.output_dir.join("results.json"),
    )?)
    .unwrap();
    assert_eq!(results["stopped"], "max_steps");
    Ok(())
}

#[test]
fn a_diverging_loss_stops_naming_the_step_and_keeps_the_checkpoint() -> Result<()> {
    let (model, data) = tiny_setup_in("nan")?;
    let out = workdir("nan-run");
    let path = out.join("config.toml.in");
    let text = config_text(&model, &data, &out.join("run"))
        .replace("lr = 0.01", "lr = 1e30\nmax_grad_norm = 0.0")
        .replace("log_every = 5", "log_every = 5\nsave_every = 1");
    std::fs::write(&path, text)?;
    let config = TrainConfig::load(&path, &[]).unwrap();
    let err = train(&config).unwrap_err().to_string();
    assert!(
        err.contains("the loss is NaN at step 2") || err.contains("the loss is inf at step 2"),
        "{err}"
    );
    assert!(err.contains("last good checkpoint is kept"), "{err}");
    let ckpt =
        lora_mini::train::checkpoint::SavedCheckpoint::read(&out.join("run").join(CHECKPOINT))?;
    assert_eq!(ckpt.state.step, 1);
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        out.join("run").join("results.json"),
    )?)
    .unwrap();
    assert_eq!(results["stopped"], "nan");
    Ok(())
}

#[test]
fn full_fine_tuning_trains_embeddings_and_norms_too() -> Result<()> {
    use lora_mini::adapter::targets::ALL_LINEAR;
    use lora_mini::adapter::{AdapterConfig, Method};

    let (model, _) = tiny_setup_in("full")?;
    let loaded = load_task_model(
        model.to_str().unwrap(),
        None,
        Some(2),
        LinearFactory::new(AdapterConfig::new(Method::Full, &[ALL_LINEAR]))?,
        DType::F32,
        &Device::Cpu,
        42,
    )?;
    let trainable = loaded.registry.trainable();
    let names: Vec<&str> = trainable.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.LayerNorm.weight",
        "bert.encoder.layer.0.output.LayerNorm.bias",
        "bert.encoder.layer.0.attention.self.query.weight",
        "classifier.weight",
    ] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }
    // Every tensor of the checkpoint trains.
    let total: usize = loaded
        .checkpoint
        .tensors
        .values()
        .map(|t| t.elem_count())
        .sum();
    assert_eq!(loaded.registry.num_trainable(), total);
    // And every one of them receives a gradient.
    let ids = candle::Tensor::new(&[[101u32, 2307, 3185, 102]], &Device::Cpu)?;
    let logits = loaded.model.classify(&ids, None, None, true)?;
    let loss = lora_mini::models::bert::sequence_classification_loss(
        &logits,
        &candle::Tensor::new(&[1u32], &Device::Cpu)?,
    )?;
    let grads = loss.backward()?;
    for (name, var) in &trainable {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(norm > 0.0, "zero gradient for {name}");
    }
    Ok(())
}

/// The real MiniLM learns a real task: LoRA-Mini on a 2048-example slice of
/// SST-2 must beat the dev set's majority class by at least 5 points (about a
/// minute of CPU; the quickstart is the same recipe, longer).
#[test]
fn lora_mini_on_minilm_beats_the_majority_class_on_sst2() {
    use lora_mini::data::{read_examples, task, Label};

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = workdir("minilm-sst2");
    let overrides: Vec<String> = [
        format!(
            "model.source={}",
            shared("models/all-MiniLM-L6-v2").display()
        ),
        format!("task.data={}", shared("data/glue/SST-2").display()),
        "task.max_train_examples=2048".into(),
        "task.max_len=32".into(),
        "optim.batch_size=16".into(),
        "optim.lr=5e-3".into(),
        "run.device=cpu".into(),
        "run.time_budget_minutes=10".into(),
        format!("run.output_dir={}", out.display()),
    ]
    .into_iter()
    .collect();
    let config = TrainConfig::load(&root.join("configs/quickstart.toml"), &overrides).unwrap();
    assert_eq!(
        config.adapter.method,
        lora_mini::train::config::MethodName::LoraMini
    );
    let summary = train(&config).unwrap();
    assert_eq!(summary.steps, 128, "the time budget cut the run short");

    let sst2 = task("sst2").unwrap();
    let dev = read_examples(sst2, &shared("data/glue/SST-2/dev.tsv")).unwrap();
    let positive = dev
        .iter()
        .filter(|e| e.label == Some(Label::Class(1)))
        .count();
    let majority = positive.max(dev.len() - positive) as f64 / dev.len() as f64;
    let accuracy = summary.best["accuracy"].unwrap();
    eprintln!(
        "MiniLM SST-2: dev accuracy {accuracy:.4}, majority {majority:.4}, {:.0} s",
        summary.wall_seconds
    );
    assert!(
        accuracy >= majority + 0.05,
        "dev accuracy {accuracy:.4} vs majority {majority:.4}"
    );
}

/// The table runner's command line in quick mode: configs from this
/// repository, the paper from ../shared, on the CPU.
fn runner_args(
    only: &str,
    model: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
) -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    vec![
        "--quick".into(),
        "--only".into(),
        only.into(),
        "--model".into(),
        path(model),
        "--data".into(),
        path(data),
        "--out".into(),
        path(out),
        "--configs".into(),
        path(&root.join("configs")),
        "--paper".into(),
        path(&shared("paper/lora-mini-paper.txt")),
        "--set".into(),
        "run.device=cpu".into(),
    ]
}

/// The table examples' runner in quick mode on a tiny random BERT and the
/// real RTE files: every row runs, the table sets ours beside the paper's
/// numbers, and a second invocation skips the finished runs.
#[cfg(feature = "cli")]
#[test]
fn table2_quick_runs_every_row_and_skips_finished_runs() {
    use crate::train::tables::{example_run, PaperTable};

    let (model, _) = tiny_setup_in("table2").unwrap();
    let out = workdir("table2-out");
    let args = || runner_args("rte", &model, &shared("data/glue"), &out);
    example_run(PaperTable::Table2, "table2_bert_glue", args()).unwrap();
    let md = std::fs::read_to_string(out.join("table.md")).unwrap();
    let rows: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| ---"))
        .collect();
    // Header, full, LoRA x3, LoRA-Mini dense x3 and dense+attention x3.
    assert_eq!(rows.len(), 11, "{md}");
    let fft = rows.iter().find(|l| l.starts_with("| FFT")).unwrap();
    assert!(
        fft.contains("| 110M |") && fft.contains("(64.98) |"),
        "{fft}"
    );
    // RTE measured on every row; the other tasks were filtered out.
    for row in &rows[1..] {
        let rte = row.trim_end_matches(" |").rsplit(" | ").next().unwrap();
        assert!(
            rte.split(' ').next().unwrap().parse::<f64>().is_ok(),
            "{row}"
        );
    }
    let records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(records.as_array().unwrap().len(), 10);
    // Rerunning skips every finished run.
    example_run(PaperTable::Table2, "table2_bert_glue", args()).unwrap();
    let records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert!(records
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["skipped"] == true));
}

/// A tiny random T5 v1.0 with the real T5 tokenizer (32,100 pieces).
fn tiny_t5_with_real_tokenizer(tag: &str) -> PathBuf {
    use crate::t5::{config_json_with_vocab, random_t5_with_vocab};

    let model = workdir(&format!("{tag}-model"));
    std::fs::write(
        model.join("config.json"),
        config_json_with_vocab(false, 32100),
    )
    .unwrap();
    candle::safetensors::save(
        &random_t5_with_vocab(false, 32100).unwrap(),
        model.join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        shared("tokenizers/t5/tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    model
}

/// Table 3's runner in quick mode on a tiny random T5 with the real T5
/// tokenizer: trains on newsdev2016, scores BLEU and ROUGE-L on
/// newstest2016, and writes the table beside the paper's numbers.
#[cfg(feature = "cli")]
#[test]
fn table3_quick_trains_a_tiny_t5_on_newsdev_and_scores_newstest() {
    use crate::train::tables::{example_run, PaperTable};

    let model = tiny_t5_with_real_tokenizer("table3");
    let out = workdir("table3-out");
    let args = runner_args(
        "lora-mini-dense+attention-r8",
        &model,
        &shared("data/wmt16_en_ro/newsdev2016_newstest2016"),
        &out,
    );
    example_run(PaperTable::Table3, "table3_t5_small_wmt", args).unwrap();
    let records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let runs = records.as_array().unwrap();
    assert_eq!(runs.len(), 1, "{records}");
    let bleu = runs[0]["metrics"]["bleu"].as_f64().unwrap();
    let rouge = runs[0]["metrics"]["rougeL"].as_f64().unwrap();
    assert!(
        (0.0..=100.0).contains(&bleu) && (0.0..=1.0).contains(&rouge),
        "{records}"
    );
    let md = std::fs::read_to_string(out.join("table.md")).unwrap();
    let row = md
        .lines()
        .find(|l| l.starts_with("| Ours") && l.contains("| 8 |"))
        .unwrap_or_else(|| panic!("{md}"));
    // Our (tiny, 4-step) score beside the paper's: "x.xx (yy.yy)".
    assert!(row.contains(" ("), "{row}");
}

/// The appendix sweep and Figure 2 in quick mode on a tiny random BERT:
/// one row of the grid and the figure's SVG.
#[cfg(feature = "cli")]
#[test]
fn appendix_grid_and_figure2_quick() {
    use crate::train::tables::{appendix_main, figure2_main};

    let (model, _) = tiny_setup_in("appendix").unwrap();
    let common =
        |out: &std::path::Path, only: &str| runner_args(only, &model, &shared("data/glue"), out);
    let out = workdir("appendix-out");
    let mut args = common(&out, "-r16-a64-b32");
    args.extend(["--family", "bert", "--task", "rte"].map(String::from));
    appendix_main(args).unwrap();
    let md = std::fs::read_to_string(out.join("table.md")).unwrap();
    let row = md
        .lines()
        .find(|l| l.starts_with("| 16 | 64 | 32 |"))
        .unwrap();
    // Both presets ran; the paper's BERT RTE cell and counts sit beside ours.
    assert!(row.contains("(58370)") && row.contains("(113666)"), "{row}");
    assert!(
        row.contains("(64.260)") || row.contains("(67.870)"),
        "{row}"
    );
    assert!(!row.contains("| - ("), "{row}");

    // A bad flag is one line naming it, with clap's usage left out.
    let err = appendix_main(vec!["--bogus".into()]).unwrap_err();
    assert_eq!(err.to_string(), "unexpected argument '--bogus' found");

    let out = workdir("figure2-out");
    figure2_main(common(&out, "rte")).unwrap();
    let svg = std::fs::read_to_string(out.join("figure2.svg")).unwrap();
    assert!(
        svg.contains("\nrte\n</text>") && svg.matches("<circle").count() == 3,
        "{svg}"
    );
}

/// Tables 1 and 4 in quick mode, one row each: Table 1 on a tiny random
/// RoBERTa (with MiniLM's tokenizer, whose vocabulary it shares) over the
/// real RTE files, Table 4 on the tiny T5 over newsdev/newstest2016.
#[cfg(feature = "cli")]
#[test]
fn table1_and_table4_quick_run_on_tiny_random_checkpoints() {
    use crate::train::tables::{example_run, PaperTable};

    let roberta = workdir("table1-model");
    let config = r#"{"model_type": "roberta", "vocab_size": 30522, "hidden_size": 16,
      "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
      "max_position_embeddings": 130, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
      "pad_token_id": 1}"#;
    std::fs::write(roberta.join("config.json"), config).unwrap();
    let head = [("classifier.dense", 16, 16), ("classifier.out_proj", 16, 2)];
    let tensors = random_encoder("roberta", [30522, 16, 32, 1, 130, 1], &head).unwrap();
    candle::safetensors::save(&tensors, roberta.join("model.safetensors")).unwrap();
    std::fs::copy(
        shared("models/all-MiniLM-L6-v2/tokenizer.json"),
        roberta.join("tokenizer.json"),
    )
    .unwrap();

    let t5 = tiny_t5_with_real_tokenizer("table4");
    let wmt = shared("data/wmt16_en_ro/newsdev2016_newstest2016");
    let cases = [
        (
            PaperTable::Table1,
            "table1_roberta_glue",
            roberta,
            shared("data/glue"),
            "rte",
        ),
        (PaperTable::Table4, "table4_t5_base_wmt", t5, wmt, "wmt16"),
    ];
    for (table, name, model, data, task) in cases {
        let out = workdir(&format!("{name}-out"));
        let mut args = runner_args(task, &model, &data, &out);
        args.extend(["--only", "lora-mini-dense+attention-r8"].map(String::from));
        example_run(table, name, args).unwrap();
        let records: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap())
                .unwrap();
        let runs = records.as_array().unwrap();
        assert_eq!(runs.len(), 1, "{name}: {records}");
        let metrics = runs[0]["metrics"].as_object().unwrap();
        let metric = if task == "rte" { "accuracy" } else { "bleu" };
        assert!(
            metrics[metric].as_f64().is_some_and(f64::is_finite),
            "{name}: {records}"
        );
        let md = std::fs::read_to_string(out.join("table.md")).unwrap();
        // A measured cell of a rank-8 LoRA-Mini row beside the paper's:
        // "x.xx (yy.yy)", where unmeasured cells read "- (yy.yy)".
        let measured = |cell: &str| {
            cell.contains(" (") && cell.split(' ').next().unwrap().parse::<f64>().is_ok()
        };
        assert!(
            md.lines().any(|l| l.starts_with("| Ours")
                && l.contains("| 8 |")
                && l.split(" | ").any(measured)),
            "{name}: {md}"
        );
    }
}
