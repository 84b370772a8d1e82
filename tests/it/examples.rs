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
