//! `lora-mini chat`, and `eval` / `predict --task causal-lm`, on the real
//! SmolLM2-135M-Instruct GGUF in ../shared.

use std::io::Write;
use std::process::{Command, Stdio};

const SMOLLM: &str = "../shared/models/SmolLM2-135M-Instruct-GGUF";

fn run(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lora-mini"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-mini-decoder-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The dequantized base, which answers as transformers does; the default
/// quantized base answers as candle-transformers' quantized_llama does
/// (see `predict_writes_completions_for_prompts_and_messages`).
#[test]
fn chat_answers_keeps_the_conversation_resets_and_ends_at_eof() {
    let input = "What is the capital of France?\n/reset\nWhat is the capital of France?\n";
    let (ok, stdout, stderr) = run(
        &[
            "chat",
            "--model",
            SMOLLM,
            "--dequantize",
            "--max-new-tokens",
            "24",
        ],
        input,
    );
    assert!(ok, "{stderr}");
    let answers: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        answers,
        [
            "The capital of France is Paris.",
            "The capital of France is Paris."
        ],
        "{stdout}"
    );
    assert!(stderr.contains("(new conversation)"), "{stderr}");
    assert!(!stderr.contains("kept quantized"), "{stderr}");
}

#[test]
fn chat_stops_at_a_stop_string_and_samples_repeatably() {
    let (ok, stdout, stderr) = run(
        &[
            "chat",
            "--model",
            SMOLLM,
            "--dequantize",
            "--stop",
            " is",
            "--max-new-tokens",
            "24",
        ],
        "What is the capital of France?\n",
    );
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim_end(), "The capital of France");
    let sample = |seed: &str| {
        let args = [
            "chat",
            "--model",
            SMOLLM,
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "--max-new-tokens",
            "12",
        ];
        let (ok, stdout, stderr) = run(&args, "Tell me a story.\n");
        assert!(ok, "{stderr}");
        assert!(stderr.contains("kept quantized"), "{stderr}");
        stdout
    };
    let first = sample("3");
    assert_eq!(first, sample("3"), "the same seed repeats");
    assert_ne!(first, sample("4"), "another seed differs");
}

#[test]
fn predict_writes_completions_for_prompts_and_messages() {
    let input = temp(
        "prompts.jsonl",
        concat!(
            r#"{"messages": [{"role": "user", "content": "What is the capital of France?"}]}"#,
            "\n",
            r#"{"prompt": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"}"#,
            "\n"
        ),
    );
    let output = input.with_file_name("out.jsonl");
    let predict = |extra: &[&str]| -> Vec<String> {
        let mut args = vec![
            "predict",
            "--model",
            SMOLLM,
            "--task",
            "causal-lm",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--max-new-tokens",
            "24",
        ];
        args.extend_from_slice(extra);
        let (ok, _, stderr) = run(&args, "");
        assert!(ok, "{stderr}");
        std::fs::read_to_string(&output)
            .unwrap()
            .lines()
            .map(|l| {
                let row: serde_json::Value = serde_json::from_str(l).unwrap();
                row["completion"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let dequantized = predict(&["--dequantize"]);
    assert_eq!(dequantized.len(), 2);
    assert_eq!(dequantized[0], "The capital of France is Paris.");
    assert!(dequantized[1].contains("Paris"), "{dequantized:?}");
    // The default quantized base (Q4_1 weights, 8-bit activations) starts
    // as candle-transformers' quantized_llama does on this prompt (the
    // first seven tokens; they part after "L'Étoile, la ").
    let quantized = predict(&[]);
    assert!(quantized[0].starts_with("L'Étoile, la "), "{quantized:?}");
}

#[test]
fn eval_prints_loss_perplexity_and_tokens() {
    let data = temp(
        "texts.jsonl",
        concat!(
            r#"{"text": "The capital of France is Paris. The capital of Germany is Berlin."}"#,
            "\n",
            r#"{"prompt": "The capital of Italy is", "completion": " Rome."}"#,
            "\n"
        ),
    );
    let args = [
        "eval",
        "--model",
        SMOLLM,
        "--task",
        "causal-lm",
        "--data",
        data.to_str().unwrap(),
        "--json",
    ];
    let (ok, stdout, stderr) = run(&args, "");
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let (loss, ppl, tokens) = (
        v["loss"].as_f64().unwrap(),
        v["perplexity"].as_f64().unwrap(),
        v["tokens"].as_u64().unwrap(),
    );
    // 14 text tokens predict 13; " Rome." (2 tokens) and <|im_end|>: 3.
    assert_eq!(tokens, 13 + 3, "{v}");
    assert!(loss > 0.0 && loss < 5.0, "a fluent text scores well: {v}");
    assert!((ppl - loss.exp()).abs() < 1e-9);
}

#[test]
fn decoder_input_errors_are_one_line_and_name_the_place() {
    let bad = temp("bad.jsonl", "{\"text\": \"fine\"}\n{\"prompt\": 3}\n");
    let args = [
        "eval",
        "--model",
        SMOLLM,
        "--task",
        "causal-lm",
        "--data",
        bad.to_str().unwrap(),
    ];
    let (ok, _, stderr) = run(&args, "");
    assert!(!ok);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("bad.jsonl:2:") && stderr.contains("\"prompt\" must be a string"),
        "{stderr}"
    );

    // A quantized base computes in f32: another dtype needs --dequantize.
    let (ok, _, stderr) = run(&["chat", "--model", SMOLLM, "--dtype", "bf16"], "");
    assert!(!ok);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("SmolLM2-135M-Instruct-GGUF") && stderr.contains("--dequantize"),
        "{stderr}"
    );

    let long = temp(
        "long.jsonl",
        &format!("{{\"prompt\": \"{}\"}}\n", "word ".repeat(9000)),
    );
    let out = long.with_file_name("long-out.jsonl");
    let args = [
        "predict",
        "--model",
        SMOLLM,
        "--task",
        "causal-lm",
        "--input",
        long.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    let (ok, _, stderr) = run(&args, "");
    assert!(!ok);
    assert!(
        stderr.contains("long.jsonl:1:")
            && stderr.contains("longer than the model's context of 8192"),
        "{stderr}"
    );

    let (ok, _, stderr) = run(&["chat", "--model", "tests/fixtures/llama-gqa"], "hi\n");
    assert!(!ok);
    assert!(stderr.starts_with("error: "), "{stderr}");
}

/// `eval` asks a decoder a GLUE task as label words: after `train` on the
/// toy MRPC, `eval` with the adapter (which records its task) scores the
/// dev set as the training run's best evaluation did; STS-B, a regression,
/// is refused in one line.
#[cfg(feature = "train")]
#[test]
fn eval_scores_a_glue_task_on_a_decoder_as_training_did() {
    let data = crate::llama::toy_mrpc(&crate::common::scratch("cli-toy-mrpc"));
    let config = crate::llama::instruction_config_file("cli-mrpc", "mrpc", &data);
    let (ok, _, stderr) = run(&["train", "--config", config.to_str().unwrap()], "");
    assert!(ok, "{stderr}");
    let out = config.with_file_name("out");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let adapter = out.join("adapter-best.safetensors");
    let fixture = "tests/fixtures/llama-gqa";
    let args = [
        "eval",
        "--model",
        fixture,
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ];
    let (ok, stdout, stderr) = run(&args, "");
    assert!(ok, "{stderr}");
    let scores: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(scores["accuracy"], results["best"]["accuracy"], "{results}");
    assert_eq!(scores["f1"], results["best"]["f1"], "{results}");
    assert!(scores["accuracy"].as_f64().unwrap() >= 0.9, "{scores}");

    // predict on the same rows: the label words eval scored, one per row,
    // as accurate as eval said.
    let preds = config.with_file_name("preds.jsonl");
    let dev = data.join("dev.tsv");
    let args = [
        "predict",
        "--model",
        fixture,
        "--adapter",
        adapter.to_str().unwrap(),
        "--input",
        dev.to_str().unwrap(),
        "--output",
        preds.to_str().unwrap(),
    ];
    let (ok, _, stderr) = run(&args, "");
    assert!(ok, "{stderr}");
    // MRPC's labels are named "0" and "1", the TSV's first column.
    let gold: Vec<String> = std::fs::read_to_string(&dev)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l[..1].to_string())
        .collect();
    let predicted: Vec<serde_json::Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(predicted.len(), gold.len());
    let right = predicted
        .iter()
        .zip(&gold)
        .filter(|(p, g)| p["prediction"] == g.as_str())
        .count();
    assert_eq!(predicted[0]["answer_nll"].as_array().unwrap().len(), 2);
    let accuracy = right as f64 / gold.len() as f64;
    assert!(
        (accuracy - scores["accuracy"].as_f64().unwrap()).abs() < 1e-9,
        "{accuracy}"
    );

    let args = [
        "eval",
        "--model",
        fixture,
        "--task",
        "stsb",
        "--data",
        data.to_str().unwrap(),
    ];
    let (ok, _, stderr) = run(&args, "");
    assert!(!ok);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("stsb") && stderr.contains("label words"),
        "{stderr}"
    );
}

/// `predict --task wmt16-en-ro` on a decoder: one greedy translation per
/// source line, the same text `eval` would score for it.
#[test]
fn predict_translates_sources_on_a_decoder() {
    let input = temp("sources.txt", "one two three\nthe cat is red\n");
    let output = input.with_file_name("translations.jsonl");
    let args = [
        "predict",
        "--model",
        "tests/fixtures/llama-gqa",
        "--task",
        "wmt16-en-ro",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--max-new-tokens",
        "6",
    ];
    let (ok, _, stderr) = run(&args, "");
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let text = row["translation"].as_str().expect("a translation string");
        // At most 6 new tokens of the fixture's one-word vocabulary.
        assert!(text.split_whitespace().count() <= 6, "{text:?}");
    }
    assert!(stderr.contains("wrote 2 predictions"), "{stderr}");
}
