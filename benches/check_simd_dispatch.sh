#!/bin/sh
# Runs the CPU kernel tests (fused softmax / layer norm / GELU / attention and
# the frozen-weight gemm) under qemu-user on CPU models without AVX-512
# (qemu64: SSE only; Haswell: AVX2 + FMA), to check that gemm's x86-v4
# kernels and the crate's vectorized() paths are chosen at run time and fall
# back cleanly: an AVX-512 instruction on these models is a SIGILL.
# Needs qemu-user (Debian: apt-get install qemu-user).
set -eu
cd "$(dirname "$0")/.."
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 not found (apt-get install qemu-user)" >&2; exit 2; }
bin=$(cargo test --lib --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
for cpu in qemu64 Haswell; do
    echo "== CPU model $cpu"
    qemu-x86_64 -cpu "$cpu" "$bin" fused attention frozen_matmul
done
