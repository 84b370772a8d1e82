//! Times one training step of an adapter on SmolLM2-135M-Instruct: the
//! workload of `benches/reference/decoder_train_step.py`, its PyTorch +
//! PEFT peer.
//!
//! The real GGUF from ../shared, its linear weights kept quantized (the
//! default) or dequantized to f32 (`--dequantize`, what transformers does
//! with a GGUF), LoRA r=8 or LoRA-Mini r=8 a=b=64 (alpha 16, no dropout) on
//! q, k, v, o, gate, up and down in every layer (PEFT's all-linear), batch
//! 8 x 128 random tokens with the loss on every next token, and an AdamW
//! step; `--checkpointing` recomputes each layer's activations in the
//! backward pass (`optim.gradient_checkpointing`). Prints one JSON line: median and every step's milliseconds, and
//! peak RSS.
//!
//! ```sh
//! cargo run --release --example bench_decoder_step -- --method lora --steps 3
//! benches/compare_decoder_step.sh     # ours (both bases) and the PyTorch peer
//! ```

use std::time::Instant;

use candle::{Device, Tensor};
use lora_mini::adapter::{AdapterConfig, LinearFactory, LoraConfig, LoraMiniConfig, Method};
use lora_mini::decoder::{load_decoder, DecoderSource};
use lora_mini::models::presets::{resolve_targets, Family};
use lora_mini::rng::SeededRng;
use lora_mini::train::optim::{AdamWConfig, GroupedAdamW};

#[path = "common/timing.rs"]
mod timing;

struct Args {
    model: String,
    method: String,
    dequantize: bool,
    steps: usize,
    warmup: usize,
    batch: usize,
    len: usize,
    checkpointing: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        model: "../shared/models/SmolLM2-135M-Instruct-GGUF".into(),
        method: "lora".into(),
        dequantize: false,
        steps: 3,
        warmup: 1,
        batch: 8,
        len: 128,
        checkpointing: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value(),
            "--method" => args.method = value(),
            "--dequantize" => args.dequantize = true,
            "--checkpointing" => args.checkpointing = true,
            "--steps" => args.steps = value().parse().expect("--steps N"),
            "--warmup" => args.warmup = value().parse().expect("--warmup N"),
            "--batch" => args.batch = value().parse().expect("--batch N"),
            "--len" => args.len = value().parse().expect("--len N"),
            "--help" | "-h" => {
                println!(
                    "bench_decoder_step [--model GGUF_OR_DIR] [--method lora|lora-mini] [--dequantize] [--checkpointing] [--steps 3] [--warmup 1] [--batch 8] [--len 128]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown flag {other}; see --help"),
        }
    }
    args
}

fn adapter(method: &str) -> candle::Result<AdapterConfig> {
    let method = match method {
        "lora" => Method::Lora(LoraConfig {
            alpha: 16.0,
            ..LoraConfig::new(8)
        }),
        "lora-mini" => Method::LoraMini(LoraMiniConfig {
            alpha: 16.0,
            ..LoraMiniConfig::new(8, 64, 64)
        }),
        other => candle::bail!("--method {other}: lora or lora-mini"),
    };
    Ok(AdapterConfig {
        method,
        targets: resolve_targets(Family::Llama, "dense+attention", false)?,
        modules_to_save: Vec::new(),
    })
}

fn main() -> candle::Result<()> {
    let args = parse_args();
    lora_mini::alloc::keep_freed_buffers();
    lora_mini::threads::shorten_idle_spinning();
    let device = Device::Cpu;
    let factory =
        LinearFactory::new(adapter(&args.method)?)?.with_dequantized_base(args.dequantize);
    let source = DecoderSource {
        dequantize: args.dequantize,
        ..DecoderSource::new(&args.model)
    };
    let decoder = load_decoder(&source, factory).map_err(candle::Error::wrap)?;
    let vars = decoder.registry.trainable();
    let mut opt = GroupedAdamW::new(vars.clone(), AdamWConfig::default())?;

    let vocab = decoder.model.config().vocab_size as u64;
    let mut rng = SeededRng::new(7);
    let ids: Vec<u32> = (0..args.batch * args.len)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (args.batch, args.len), &device)?;
    let mask = ids.ones_like()?;
    let labels = ids.to_dtype(candle::DType::I64)?;

    let mut step_ms = Vec::new();
    for i in 0..args.warmup + args.steps {
        let t = Instant::now();
        let loss = if args.checkpointing {
            let params: Vec<&Tensor> = vars.iter().map(|(_, v)| v.as_tensor()).collect();
            let (loss, grads) = decoder.model.loss_backward_checkpointed(
                &ids,
                Some(&mask),
                &labels,
                &params,
                1.0,
            )?;
            timing::adamw_step_with(grads, &vars, &mut opt)?;
            loss
        } else {
            let loss = decoder.model.loss(&ids, Some(&mask), &labels, true)?;
            timing::adamw_step(&loss, &vars, &mut opt)?;
            loss
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        eprintln!(
            "step {i}: {ms:.0} ms, loss {:.4}{}",
            loss.to_scalar::<f32>()?,
            if i < args.warmup { " (warm-up)" } else { "" }
        );
        if i >= args.warmup {
            step_ms.push(ms);
        }
    }
    let base = match (args.dequantize, args.checkpointing) {
        (false, false) => "quantized",
        (true, false) => "f32",
        (false, true) => "quantized, checkpointed",
        (true, true) => "f32, checkpointed",
    };
    println!(
        "{}",
        serde_json::json!({
            "impl": format!("lora-mini ({base} base)"),
            "method": format!("{} r=8 on q,k,v,o,gate,up,down", args.method),
            "batch": args.batch,
            "len": args.len,
            "trainable": decoder.registry.num_trainable(),
            "step_ms_median": timing::median(&step_ms),
            "step_ms": step_ms,
            "peak_rss_bytes": lora_mini::alloc::peak_rss_bytes(),
        })
    );
    Ok(())
}
