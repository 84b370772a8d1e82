//! The `lora-mini` binary.

use std::process::Command;

fn lora_mini(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lora-mini"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn params_prints_json_with_integer_counts() {
    let (ok, stdout, stderr) = lora_mini(&[
        "params",
        "--model",
        "../shared/model-configs/roberta-base.json",
        "--task",
        "cola",
        "--method",
        "lora-mini",
        "--targets",
        "dense+attention",
        "--r",
        "8",
        "--a",
        "16",
        "--b",
        "16",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["trainable"], 20226);
    assert_eq!(v["total"], 124_647_170);
    let (ok, stdout, _) = lora_mini(&[
        "params",
        "--model",
        "../shared/model-configs",
        "--task",
        "stsb",
        "--method",
        "full",
    ]);
    assert!(!ok && stdout.is_empty());
}

#[test]
fn params_errors_name_the_problem_without_a_backtrace() {
    let (ok, _, stderr) = lora_mini(&[
        "params",
        "--model",
        "../shared/model-configs/bert-base-uncased.json",
        "--task",
        "stsb",
        "--method",
        "lora",
        "--targets",
        "qeury",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("target \"qeury\" matches no linear layer"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("backtrace") && stderr.lines().count() == 1,
        "{stderr}"
    );
    let (ok, _, stderr) = lora_mini(&[
        "params",
        "--model",
        "../shared/model-configs/t5-small.json",
        "--task",
        "colaa",
        "--method",
        "full",
    ]);
    assert!(!ok && stderr.contains("unknown task \"colaa\""), "{stderr}");
}

#[test]
fn every_subcommand_explains_itself() {
    for sub in ["train", "eval", "predict", "export", "params", "score"] {
        let (ok, stdout, _) = lora_mini(&[sub, "--help"]);
        assert!(
            ok && stdout.contains("Usage: lora-mini") && stdout.contains("Example"),
            "{stdout}"
        );
    }
}

#[test]
fn score_prints_sacrebleu_scale_json_and_names_count_mismatches() {
    let (ok, stdout, stderr) = lora_mini(&[
        "score",
        "--task",
        "wmt16-en-ro",
        "--predictions",
        "tests/fixtures/metrics/hyp.newstest2016.ro",
        "--references",
        "../shared/data/wmt16_en_ro/newsdev2016_newstest2016/newstest2016-enro.ro",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/metrics/metrics.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let expected = &fixture["newstest2016"]["ro"];
    assert!(
        (v["bleu"].as_f64().unwrap() - expected["bleu"]["score"].as_f64().unwrap()).abs() < 0.01
    );
    assert!(
        (v["bleu_2"].as_f64().unwrap() - expected["bleu"]["precisions"][1].as_f64().unwrap()).abs()
            < 0.01
    );
    assert!(
        (v["rougeL"].as_f64().unwrap() - expected["rouge"]["rougeL"].as_f64().unwrap()).abs()
            < 1e-9
    );

    let (ok, _, stderr) = lora_mini(&[
        "score",
        "--task",
        "wmt16-en-ro",
        "--predictions",
        "tests/fixtures/metrics/hyp.newstest2016.ro",
        "--references",
        "../shared/data/wmt16_en_ro/newsdev2016_newstest2016/PROVENANCE.txt",
    ]);
    assert!(!ok && stderr.contains("1999 predictions"), "{stderr}");
}

#[test]
fn score_reports_undefined_correlations_as_null_with_a_warning() {
    let dir = crate::common::scratch("score");
    let preds = dir.join("constant.txt");
    std::fs::write(&preds, "2.5\n".repeat(1500)).unwrap();
    let (ok, stdout, stderr) = lora_mini(&[
        "score",
        "--task",
        "stsb",
        "--predictions",
        preds.to_str().unwrap(),
        "--references",
        "../shared/data/glue/STS-B/dev.tsv",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), r#"{"pearson":null,"spearman":null}"#);
    assert!(stderr.contains("warning: pearson is undefined"), "{stderr}");
}

#[test]
fn export_writes_merged_and_peft_folders_that_reproduce_the_adapter() {
    use candle::{DType, Device, Tensor};
    use lora_mini::adapter::{
        save_adapter, AdapterConfig, InnerInit, LinearFactory, LoraMiniConfig, Method, SaveOptions,
    };
    use lora_mini::models::task::{load_task_model, TaskModel};

    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bert-2");
    let config = AdapterConfig::new(
        Method::LoraMini(LoraMiniConfig {
            inner_init: InnerInit::Kaiming,
            ..LoraMiniConfig::new(2, 8, 8)
        }),
        &["query", "value", "dense"],
    )
    .with_modules_to_save(&["classifier"]);
    let adapted = load_task_model(
        fixture,
        None,
        Some(2),
        LinearFactory::new(config.clone()).unwrap(),
        DType::F32,
        &Device::Cpu,
        1,
    )
    .unwrap();
    let dir = crate::common::scratch("export");
    let adapter = dir.join("adapter.safetensors");
    let with_task = SaveOptions {
        data: Some(lora_mini::adapter::DataSettings {
            task: "rte".into(),
            max_len: 16,
            ..Default::default()
        }),
        ..Default::default()
    };
    save_adapter(&adapter, &adapted.registry, &config, &with_task).unwrap();
    let logits = |m: &TaskModel| match m {
        TaskModel::Bert(b) => b
            .forward_t(
                &Tensor::new(&[[2u32, 17, 42, 8, 3]], &Device::Cpu).unwrap(),
                None,
                None,
                false,
            )
            .unwrap(),
        _ => unreachable!(),
    };
    let expected = logits(&adapted.model);
    for format in ["merged", "peft"] {
        let out = dir.join(format);
        let (ok, _, stderr) = lora_mini(&[
            "export",
            "--model",
            fixture,
            "--adapter",
            adapter.to_str().unwrap(),
            "--format",
            format,
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{format}: {stderr}");
        if format == "merged" {
            let merged = load_task_model(
                out.to_str().unwrap(),
                None,
                Some(2),
                LinearFactory::frozen(),
                DType::F32,
                &Device::Cpu,
                0,
            )
            .unwrap();
            let err = (logits(&merged.model) - &expected)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-5, "{err}");
            // transformers' AutoModelForSequenceClassification reads these.
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(config["architectures"][0], "BertForSequenceClassification");
            assert_eq!(config["num_labels"], 2);
            assert_eq!(config["id2label"]["1"], "not_entailment");
            assert_eq!(config["label2id"]["entailment"], 0);
            assert_eq!(config["problem_type"], "single_label_classification");
        } else {
            assert!(
                out.join("adapter_config.json").exists()
                    && out.join("adapter_model.safetensors").exists()
            );
            let config: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            let base = config["base_model_name_or_path"].as_str().unwrap();
            assert!(std::path::Path::new(base).is_absolute(), "{base}");
        }
    }
}

#[test]
fn ctrl_c_checkpoints_and_resume_finishes_the_run() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let (model, data) = crate::train::tiny_setup_in("ctrlc").unwrap();
    let dir = crate::common::scratch("ctrlc");
    let out = dir.join("run");
    let config = dir.join("config.toml");
    // Long enough that it is still running when the signal comes.
    let text = crate::train::config_text(&model, &data, &out)
        .replace("epochs = 8", "epochs = 400")
        .replace("log_every = 5", "log_every = 1\neval_every = 1000");
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lora-mini"))
        .args(["train", "--config", config.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "ended early: {seen}"
        );
        seen += &line;
        if line.starts_with("step 3/") {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("checkpoint saved to"), "{rest}");
    assert!(rest.contains("--resume"), "{rest}");
    assert!(!rest.contains("panicked"), "{rest}");
    let ckpt =
        lora_mini::train::checkpoint::SavedCheckpoint::read(&out.join("checkpoint.safetensors"))
            .unwrap();
    assert!(ckpt.state.step >= 3);

    // Resuming picks up from the checkpoint; a time budget (which may change
    // between a run and its resumption) ends it after one more step.
    let (ok, _, err) = lora_mini(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--resume",
        "--set",
        "run.time_budget_minutes=0.0001",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("resuming at step {}", ckpt.state.step)),
        "{err}"
    );
    assert!(
        err.contains(&format!("step {}/", ckpt.state.step + 1)),
        "{err}"
    );
    assert!(out.join("results.json").exists());
}

/// Bad configs and bad files through the binary: a non-zero exit and one
/// line that names the problem, never a panic.
#[test]
fn bad_configs_and_files_fail_with_one_line_naming_the_problem() {
    let (model, data) = crate::train::tiny_setup_in("cli-bad").unwrap();
    let dir = crate::common::scratch("cli-bad");
    let base = crate::train::config_text(&model, &data, &dir.join("run"));
    let broken_data = dir.join("broken-data");
    std::fs::create_dir_all(&broken_data).unwrap();
    std::fs::write(
        broken_data.join("train.tsv"),
        "sentence\tlabel\ngood\t1\nbad\tmaybe\n",
    )
    .unwrap();
    std::fs::write(broken_data.join("dev.tsv"), "sentence\tlabel\ngood\t1\n").unwrap();
    let not_an_adapter = dir.join("adapter.safetensors");
    std::fs::write(&not_an_adapter, b"not safetensors").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["train".into(), "--config".into(), "-".into()],
            "r = 0|:10: adapter.r: must be at least 1",
        ),
        (
            vec!["train".into(), "--config".into(), "-".into()],
            "lr = 0.01|optim.lr",
        ),
        (
            vec!["train".into(), "--config".into(), "-".into()],
            "dense+attention\"|:9: adapter.targets: unknown target [\"qeury\"]",
        ),
        (
            vec!["train".into(), "--config".into(), "-".into()],
            "DATA|train.tsv:3",
        ),
        (
            vec![
                "train".into(),
                "--config".into(),
                dir.join("missing.toml").display().to_string(),
            ],
            "|missing.toml",
        ),
        (
            vec![
                "eval".into(),
                "--model".into(),
                model.display().to_string(),
                "--adapter".into(),
                not_an_adapter.display().to_string(),
                "--task".into(),
                "sst2".into(),
                "--data".into(),
                data.display().to_string(),
            ],
            "|adapter.safetensors",
        ),
    ];
    for (i, (mut args, edit_and_expected)) in cases.into_iter().enumerate() {
        let (edit, expected) = edit_and_expected.split_once('|').unwrap();
        if args.get(2).map(String::as_str) == Some("-") {
            let text = match edit {
                "r = 0" => base.replace("r = 4", "r = 0"),
                "lr = 0.01" => base.replace("lr = 0.01", "lr = 0.0"),
                "dense+attention\"" => base.replace("dense+attention\"", "qeury\""),
                "DATA" => base.replace(
                    &data.display().to_string(),
                    &broken_data.display().to_string(),
                ),
                other => panic!("no edit {other}"),
            };
            let path = dir.join(format!("bad{i}.toml"));
            std::fs::write(&path, text).unwrap();
            args[2] = path.display().to_string();
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, stderr) = lora_mini(&refs);
        assert!(!ok, "case {i} succeeded");
        // Progress notes may come first; the error is the last line, whole.
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "case {i}: {stderr}");
        assert_eq!(
            Some(errors[0]),
            stderr.trim_end().lines().last(),
            "case {i}: {stderr}"
        );
        assert!(
            errors[0].starts_with("error: ") && errors[0].contains(expected),
            "case {i}: {stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "case {i}: {stderr}"
        );
    }
}

/// A run trained on a tiny model is read back by the binary: `eval`
/// reproduces the trainer's best dev accuracy from the saved adapter,
/// `predict` writes one JSON row per dev example in input order, and
/// `score` on those rows gives the same accuracy again.
#[test]
fn eval_and_predict_read_back_a_trained_run() {
    use lora_mini::train::trainer::train;

    let (model, data) = crate::train::tiny_setup_in("readback").unwrap();
    let (config, run) = crate::train::tiny_config("readback-run", &model, &data, &[]);
    let dir = crate::common::scratch("readback");
    let summary = train(&config).unwrap();
    let trained = summary.best["accuracy"].unwrap();

    let model = model.to_str().unwrap();
    let adapter = run.join("adapter-best.safetensors");
    let adapter = adapter.to_str().unwrap();
    let common = [
        "--model",
        model,
        "--adapter",
        adapter,
        "--task",
        "sst2",
        "--max-len",
        "16",
        "--batch-size",
        "8",
    ];
    let mut eval = vec!["eval", "--data", data.to_str().unwrap(), "--json"];
    eval.extend(common);
    let (ok, stdout, stderr) = lora_mini(&eval);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["accuracy"].as_f64(), Some(trained), "{stdout}");
    // The tiny checkpoint has no classifier, but the adapter supplies it.
    assert!(!stderr.contains("warning"), "{stderr}");
    // The adapter records its task and max_len (16): eval needs neither flag.
    let data_dir = data.to_str().unwrap();
    let recorded = [
        "eval",
        "--data",
        data_dir,
        "--json",
        "--model",
        model,
        "--adapter",
        adapter,
    ];
    let (ok, stdout, stderr) = lora_mini(&recorded);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["accuracy"].as_f64(), Some(trained), "{stdout}");
    let mut shorter = recorded.to_vec();
    shorter.extend(["--max-len", "8"]);
    let (ok, _, stderr) = lora_mini(&shorter);
    assert!(
        ok && stderr.contains("--max-len 8 overrides the adapter's 16"),
        "{stderr}"
    );
    // Without the adapter the head stays random, and eval says so.
    let bare = [
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model,
        "--task",
        "sst2",
        "--max-len",
        "16",
    ];
    let (ok, _, stderr) = lora_mini(&bare);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("no classifier and no adapter supplies one")
            && stderr.contains("meaningless"),
        "{stderr}"
    );

    let dev = data.join("dev.tsv");
    let preds = dir.join("preds.jsonl");
    let mut predict = vec![
        "predict",
        "--input",
        dev.to_str().unwrap(),
        "--output",
        preds.to_str().unwrap(),
    ];
    predict.extend(common);
    let (ok, _, stderr) = lora_mini(&predict);
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let dev_rows = std::fs::read_to_string(&dev).unwrap().lines().count() - 1;
    assert_eq!(rows.len(), dev_rows);
    for row in &rows {
        let logits = row["logits"].as_array().unwrap();
        assert_eq!(logits.len(), 2, "{row}");
        let argmax = if logits[1].as_f64() > logits[0].as_f64() {
            "1"
        } else {
            "0"
        };
        assert_eq!(row["prediction"], argmax, "{row}");
    }
    let (ok, stdout, stderr) = lora_mini(&[
        "score",
        "--task",
        "sst2",
        "--predictions",
        preds.to_str().unwrap(),
        "--references",
        dev.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["accuracy"].as_f64(), Some(trained), "{stdout}");
}
