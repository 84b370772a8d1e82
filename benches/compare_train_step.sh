#!/bin/sh
# Times a LoRA-Mini training step on MiniLM (examples/bench_train_step.rs) and
# its PyTorch + PEFT peer (benches/reference/train_step.py) one after the
# other on the same machine, and prints the ratios. Extra arguments (e.g.
# --steps 7) go to both. PYTHON picks the interpreter (default python3).
set -eu
cd "$(dirname "$0")/.."
cargo build --release --quiet --example bench_train_step
ours=$(./target/release/examples/bench_train_step "$@")
theirs=$("${PYTHON:-python3}" benches/reference/train_step.py "$@")
"${PYTHON:-python3}" - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{'':24}{'lora-mini':>14}{'pytorch+peft':>16}{'ratio':>9}")
for key, label in [("step_ms_median", "train step (ms)"), ("eval_ms_median", "forward only (ms)")]:
    print(f"{label:24}{a[key]:14.0f}{b[key]:16.0f}{a[key] / b[key]:9.2f}x")
ra, rb = a["peak_rss_bytes"] / 2**30, b["peak_rss_bytes"] / 2**30
print(f"{'peak RSS (GiB)':24}{ra:14.2f}{rb:16.2f}{ra / rb:9.2f}x")
print(f"trainable: {a['trainable']} vs {b['trainable']}; peer: {b['impl']}")
PY
