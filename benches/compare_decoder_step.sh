#!/bin/sh
# Times a training step on SmolLM2-135M-Instruct (examples/bench_decoder_step.rs)
# against its PyTorch + PEFT peer (benches/reference/decoder_train_step.py),
# interleaved in ROUNDS rounds (default 2) on the same machine: ours with
# LoRA on the quantized base, PyTorch's LoRA on the f32 base transformers
# dequantizes, ours with LoRA on the f32 base, ours with LoRA-Mini on the
# quantized base, then both sides with gradient checkpointing (ours with
# LoRA-Mini on the quantized base). Prints each run's median step and peak
# RSS, and the ratios to PyTorch without checkpointing. Extra arguments (e.g. --steps 5) go to every run. PYTHON picks
# the interpreter (default python3).
set -eu
cd "$(dirname "$0")/.."
cargo build --release --quiet --example bench_decoder_step
bench=./target/release/examples/bench_decoder_step
out=$(mktemp)
for round in $(seq "${ROUNDS:-2}"); do
  "$bench" --method lora "$@" >> "$out"
  "${PYTHON:-python3}" benches/reference/decoder_train_step.py "$@" >> "$out"
  "$bench" --method lora --dequantize "$@" >> "$out"
  "$bench" --method lora-mini "$@" >> "$out"
  "$bench" --method lora-mini --checkpointing "$@" >> "$out"
  "${PYTHON:-python3}" benches/reference/decoder_train_step.py --checkpointing "$@" >> "$out"
done
"${PYTHON:-python3}" - "$out" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
torch_runs = [r for r in runs if r["impl"].startswith("torch") and "checkpointed" not in r["method"]]
ref_ms = sorted(r["step_ms_median"] for r in torch_runs)[len(torch_runs) // 2]
ref_rss = max(r["peak_rss_bytes"] for r in torch_runs)
print(f"{'run':58}{'step (ms)':>11}{'vs torch':>10}{'peak RSS (GB)':>15}{'vs torch':>10}")
for r in runs:
    name = f"{r['impl']}: {r['method']}"
    name = name if len(name) < 58 else name[:30] + "…" + name[-26:]
    ms, rss = r["step_ms_median"], r["peak_rss_bytes"]
    print(f"{name:58}{ms:11.0f}{ms / ref_ms:9.2f}x{rss / 1e9:15.2f}{rss / ref_rss:9.2f}x")
print("trainable:", sorted({(r['method'], r['trainable']) for r in runs}))
PY
rm -f "$out"
