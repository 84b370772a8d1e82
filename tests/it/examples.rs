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

/// The fork of candle-transformers' Llama trains LoRA-Mini on every
/// projection, every adapter tensor gets a gradient, and the fork differs
/// from the original in exactly the lines its docs state.
#[test]
fn forked_candle_llama_trains_with_a_six_line_diff() {
    let run = Command::new(example("fork_candle_model"))
        .output()
        .expect("examples/fork_candle_model is built by a plain `cargo test`");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("all 28 adapter tensors have a non-zero gradient"),
        "{stdout}"
    );

    let original = candle_transformers_source("src/models/llama.rs");
    let fork = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/fork_candle_model/llama.rs"),
    )
    .unwrap();
    let (removed, added) = changed_lines(&original, &fork);
    assert_eq!((removed, added), (6, 6), "the docs say 6 changed lines");
}

/// A file of the candle-transformers version this crate's tests build
/// against, from Cargo's registry sources.
fn candle_transformers_source(file: &str) -> String {
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let registry = cargo_home.join("registry/src");
    let found = std::fs::read_dir(&registry)
        .unwrap_or_else(|e| panic!("{}: {e}", registry.display()))
        .filter_map(|index| {
            let path = index
                .ok()?
                .path()
                .join("candle-transformers-0.11.1")
                .join(file);
            path.exists().then_some(path)
        })
        .next()
        .unwrap_or_else(|| {
            panic!(
                "candle-transformers 0.11.1 sources not under {}",
                registry.display()
            )
        });
    std::fs::read_to_string(found).unwrap()
}

/// Lines only in `a` and lines only in `b`, by longest common subsequence
/// (what `diff` counts as `<` and `>` lines).
fn changed_lines(a: &str, b: &str) -> (usize, usize) {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    (a.len() - lcs[0][0], b.len() - lcs[0][0])
}

/// The demo fits both methods on one real MiniLM layer, then saves,
/// reloads (bit for bit) and exports the LoRA-Mini adapter.
#[cfg(feature = "cli")]
#[test]
fn demo_fits_saves_reloads_and_exports() {
    let out = crate::common::scratch("demo");
    let run = Command::new(example("demo"))
        .args(["--steps", "30", "--output-dir"])
        .arg(&out)
        .output()
        .expect("examples/demo is built by a plain `cargo test`");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("outputs identical"), "{stdout}");
    assert!(out.join("results.json").exists(), "{stdout}");
}
