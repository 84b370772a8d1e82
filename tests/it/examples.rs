//! Runnable examples that `cargo test` runs, not only compiles.

use std::path::PathBuf;
use std::process::Command;

/// An example binary that `cargo test` built beside this test binary.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    profile_dir.join("examples").join(name)
}

/// Build your own model through the factory, train it, save the adapter,
/// reload it into a fresh model: the outputs are equal bit for bit.
#[test]
fn custom_model_trains_saves_and_reloads_exactly() {
    let out = crate::common::scratch("custom-model");
    let run = Command::new(example("custom_model"))
        .arg(&out)
        .output()
        .expect("examples/custom_model is built by a plain `cargo test` (or `cargo build --example custom_model`)");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("outputs equal bit for bit"), "{stdout}");
    let last: f64 = stdout
        .lines()
        .rev()
        .find_map(|l| l.split("accuracy ").nth(1)?.trim().parse().ok())
        .unwrap();
    assert!(last > 0.8, "the toy task was not learned: {stdout}");
}

/// Our adapter, merged, runs on candle-transformers' own BERT with the same
/// predictions (here on the tiny random BERT the trainer tests use).
#[cfg(feature = "train")]
#[test]
fn candle_transformers_bert_runs_our_merged_adapter() {
    let (model, data) = crate::train::tiny_setup_in("ct-bert").unwrap();
    let (config, run) = crate::train::tiny_config("ct-bert-run", &model, &data, &[]);
    lora_mini::train::trainer::train(&config).unwrap();
    let out = Command::new(example("candle_transformers_bert"))
        .arg(&model)
        .arg(run.join("adapter-best.safetensors"))
        .arg(data.join("dev.tsv"))
        .output()
        .expect("examples/candle_transformers_bert is built by a plain `cargo test`");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("same prediction as ours on 20"), "{stdout}");
}
