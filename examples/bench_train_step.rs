//! Times one training step, and one forward-only batch, of LoRA-Mini on a
//! real BERT: the workload of `benches/reference/train_step.py`, its
//! PyTorch + PEFT peer.
//!
//! The real all-MiniLM-L6-v2 weights with a 2-label head trained in full,
//! LoRA-Mini `dense+attention` (query, key, value and every `dense`) at r=8,
//! a=b=64, the config's dropout (0.1) active, batch 32 x 128 tokens, f32, and
//! an AdamW step. Prints one JSON line: median and every step's milliseconds,
//! the forward-only median, and peak RSS.
//!
//! ```sh
//! cargo run --release --example bench_train_step -- --steps 5
//! benches/compare_train_step.sh        # this and the PyTorch peer, and the ratios
//! ```

use std::time::Instant;

use candle::{DType, Device, Tensor};
use lora_mini::models::bert::sequence_classification_loss;
use lora_mini::rng::SeededRng;
use lora_mini::train::optim::{AdamWConfig, GroupedAdamW};

#[path = "common/timing.rs"]
mod timing;
#[path = "common/workload.rs"]
mod workload;

struct Args {
    model: String,
    steps: usize,
    warmup: usize,
    batch: usize,
    len: usize,
    eval_only: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        model: "../shared/models/all-MiniLM-L6-v2".into(),
        steps: 5,
        warmup: 1,
        batch: 32,
        len: 128,
        eval_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value(),
            "--steps" => args.steps = value().parse().expect("--steps N"),
            "--warmup" => args.warmup = value().parse().expect("--warmup N"),
            "--batch" => args.batch = value().parse().expect("--batch N"),
            "--len" => args.len = value().parse().expect("--len N"),
            "--eval-only" => args.eval_only = true,
            "--help" | "-h" => {
                println!(
                    "bench_train_step [--model DIR] [--steps 5] [--warmup 1] [--batch 32] [--len 128] [--eval-only]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown flag {other}; see --help"),
        }
    }
    args
}

fn main() -> candle::Result<()> {
    let args = parse_args();
    lora_mini::alloc::keep_freed_buffers();
    lora_mini::threads::shorten_idle_spinning();
    let device = Device::Cpu;
    let loaded = workload::load_lora_mini_bert(&args.model, Some(2), &device)?;
    let vars = loaded.registry.trainable();
    let mut opt = GroupedAdamW::new(vars.clone(), AdamWConfig::default())?;

    let mut rng = SeededRng::new(7);
    let ids: Vec<u32> = (0..args.batch * args.len)
        .map(|_| 1000 + (rng.next_u64() % 29000) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (args.batch, args.len), &device)?;
    let types = ids.zeros_like()?;
    let mask = Tensor::ones((args.batch, args.len), DType::U32, &device)?;
    let labels: Vec<u32> = (0..args.batch as u32).map(|i| i % 2).collect();
    let labels = Tensor::new(labels, &device)?;

    let mut step_ms = Vec::new();
    let train_steps = if args.eval_only {
        0
    } else {
        args.warmup + args.steps
    };
    for i in 0..train_steps {
        let t = Instant::now();
        let logits = loaded
            .model
            .classify(&ids, Some(&types), Some(&mask), true)?;
        let loss = sequence_classification_loss(&logits, &labels)?;
        timing::adamw_step(&loss, &vars, &mut opt)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        eprintln!(
            "step {i}: {ms:.0} ms{}",
            if i < args.warmup { " (warm-up)" } else { "" }
        );
        if i >= args.warmup {
            step_ms.push(ms);
        }
    }
    let mut eval_ms = Vec::new();
    for _ in 0..args.warmup + args.steps {
        let t = Instant::now();
        let logits = loaded
            .model
            .classify(&ids, Some(&types), Some(&mask), false)?;
        logits.to_vec2::<f32>()?;
        eval_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let eval_ms = &eval_ms[args.warmup..];
    println!(
        "{}",
        serde_json::json!({
            "impl": "lora-mini",
            "method": "lora-mini dense+attention r=8 a=b=64, head in full",
            "batch": args.batch,
            "len": args.len,
            "trainable": loaded.registry.num_trainable(),
            "step_ms_median": (!step_ms.is_empty()).then(|| timing::median(&step_ms)),
            "step_ms": step_ms,
            "eval_ms_median": timing::median(eval_ms),
            "peak_rss_bytes": lora_mini::alloc::peak_rss_bytes(),
        })
    );
    Ok(())
}
