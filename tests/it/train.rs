//! The trainer end to end on a tiny random BERT, and config validation.

use std::path::PathBuf;

use candle::{DType, Device, Result};
use lora_mini::adapter::{AdapterFile, LinearFactory};
use lora_mini::models::task::load_task_model;
use lora_mini::train::config::TrainConfig;
use lora_mini::train::trainer::{adapter_config, train};

use crate::common::{random_encoder, shared};

fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-mini-train-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny BERT with MiniLM's vocabulary (so its tokenizer fits) and a
/// sentiment toy task that a few steps can learn.
fn tiny_setup() -> Result<(PathBuf, PathBuf)> {
    let model = workdir("model");
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
    let data = workdir("data");
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

fn config_text(model: &std::path::Path, data: &std::path::Path, out: &std::path::Path) -> String {
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

#[test]
fn trains_a_tiny_model_and_writes_its_files() -> Result<()> {
    let (model, data) = tiny_setup()?;
    let out = workdir("run");
    let path = out.join("config.toml.in");
    std::fs::write(&path, config_text(&model, &data, &out.join("out")))?;
    let config = TrainConfig::load(&path, &[]).unwrap();
    let summary = train(&config).unwrap();
    let run = out.join("out");
    for file in [
        "config.toml",
        "metrics.jsonl",
        "adapter-best.safetensors",
        "adapter-last.safetensors",
        "results.json",
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
            Err(e) => e,
            Ok(config) => train(&config).map(|_| ()).unwrap_err(),
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
        .contains("section.key=value"));
    assert!(TrainConfig::load(&path, &["optim.lr=0".into()])
        .unwrap_err()
        .contains("optim.lr"));
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
    let c = TrainConfig::load(&dir.join("quickstart.toml"), &[]).unwrap();
    assert_eq!(
        (c.adapter.method.as_str(), c.task.name.as_str()),
        ("lora-mini", "sst2")
    );
}
