#!/usr/bin/env python3
"""The PyTorch + PEFT peer of examples/bench_decoder_step.rs.

Same workload: SmolLM2-135M-Instruct read by transformers from the same
GGUF (which dequantizes it to f32), LoRA r=8 (alpha 16, no dropout) on
q, k, v, o, gate, up and down in every layer, batch 8 x 128 random tokens
with the loss on every next token, f32, torch.set_num_threads(2), AdamW on
the trainable tensors. Prints one JSON line like the Rust side.
`--checkpointing` turns on transformers' gradient checkpointing
(non-reentrant), the peer of our `--checkpointing`.

    python3 benches/reference/decoder_train_step.py --steps 3

Needs torch, transformers, peft and gguf; CI does not run it.
"""
import argparse
import json
import resource
import statistics
import sys
import time

import peft
import torch
import transformers


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/models/SmolLM2-135M-Instruct-GGUF")
    p.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, gguf_file=args.gguf, torch_dtype=torch.float32
    )
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.len), generator=g)
    mask = torch.ones_like(ids)

    step_ms = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ms = (time.perf_counter() - t) * 1e3
        warm = " (warm-up)" if i < args.warmup else ""
        print(f"step {i}: {ms:.0f} ms, loss {out.loss.item():.4f}{warm}", flush=True, file=sys.stderr)
        if i >= args.warmup:
            step_ms.append(ms)
    print(json.dumps({
        "impl": f"torch {torch.__version__} + transformers {transformers.__version__} + peft {peft.__version__}",
        "method": "lora r=8 on q,k,v,o,gate,up,down (f32 base"
        + (", checkpointed)" if args.checkpointing else ")"),
        "batch": args.batch,
        "len": args.len,
        "trainable": sum(p.numel() for p in params),
        "step_ms_median": statistics.median(step_ms),
        "step_ms": step_ms,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
