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
    for sub in ["demo", "params"] {
        let (ok, stdout, _) = lora_mini(&[sub, "--help"]);
        assert!(
            ok && stdout.contains("Usage: lora-mini") && stdout.contains("Example"),
            "{stdout}"
        );
    }
}
