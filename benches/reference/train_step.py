#!/usr/bin/env python3
"""The PyTorch + PEFT peer of examples/bench_train_step.rs.

Same workload: the all-MiniLM-L6-v2 weights from the same folder with a
2-label head trained in full (modules_to_save), LoRA r=8 (alpha 16) on query,
key, value and every `dense` module, the config's dropout (0.1) active,
batch 32 x 128 random tokens, f32, torch.set_num_threads(2), AdamW on the
trainable tensors. Prints one JSON line like the Rust side.

    python3 benches/reference/train_step.py --steps 5

Needs torch, transformers and peft (measured with torch 2.15, transformers
5.24.0 and peft 0.21.2; CI does not run it).
"""
import argparse
import json
import resource
import statistics
import time

import peft
import torch
import transformers


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(args.model, num_labels=2)
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["query", "key", "value", "dense"],
        modules_to_save=["classifier"],
    )
    model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1000, 30000, (args.batch, args.len), generator=g)
    types = torch.zeros_like(ids)
    mask = torch.ones_like(ids)
    labels = torch.arange(args.batch) % 2

    step_ms = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        out = model(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ms = (time.perf_counter() - t) * 1e3
        print(f"step {i}: {ms:.0f} ms" + (" (warm-up)" if i < args.warmup else ""), flush=True,
              file=__import__("sys").stderr)
        if i >= args.warmup:
            step_ms.append(ms)
    model.eval()
    eval_ms = []
    with torch.no_grad():
        for _ in range(args.warmup + args.steps):
            t = time.perf_counter()
            model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits.tolist()
            eval_ms.append((time.perf_counter() - t) * 1e3)
    eval_ms = eval_ms[args.warmup:]
    print(json.dumps({
        "impl": f"torch {torch.__version__} + transformers {transformers.__version__} + peft {peft.__version__}",
        "method": "lora r=8 on query,key,value,dense; classifier in full",
        "batch": args.batch,
        "len": args.len,
        "trainable": sum(p.numel() for p in params),
        "step_ms_median": statistics.median(step_ms),
        "step_ms": step_ms,
        "eval_ms_median": statistics.median(eval_ms),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
