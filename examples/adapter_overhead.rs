//! LoRA-Mini's training overhead over LoRA at the same rank, measured with the
//! variants interleaved so machine drift hits them all alike.
//!
//! `cargo run --release --no-default-features --example adapter_overhead [-- ROUNDS]`
//!
//! One 768x768 layer with bias, 4096 tokens (8 x 512), forward + backward with
//! the input as a `Var` (as inside a network). Prints median milliseconds per
//! variant and the ratios to LoRA r=8. The criterion bench
//! `adapter_forward_backward` times the same variants one after another.

use std::time::Instant;

use candle::{DType, Device, Result, Tensor, Var};
use candle_nn::Linear;
use lora_mini::adapter::{
    AdaptedLinear, InnerInit, LoraConfig, LoraMiniConfig, LoraMiniLinear, Method,
};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let dev = Device::Cpu;
    let base = Linear::new(
        Tensor::randn(0f32, 0.02, (768, 768), &dev)?,
        Some(Tensor::zeros(768, DType::F32, &dev)?),
    );
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 512, 768), &dev)?)?;
    let lora_config = LoraConfig {
        inner_init: InnerInit::Kaiming,
        ..LoraConfig::new(8)
    };
    let mini_config = LoraMiniConfig {
        inner_init: InnerInit::Kaiming,
        ..LoraMiniConfig::new(8, 64, 64)
    };
    let frozen = AdaptedLinear::new(&base, &Method::Frozen, "m")?;
    let lora = AdaptedLinear::new(&base, &Method::Lora(lora_config), "m")?;
    let mini = LoraMiniLinear::new(&base, &mini_config, "m")?;

    type Variant<'a> = (&'a str, Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>);
    let variants: Vec<Variant> = vec![
        ("frozen", Box::new(|x| frozen.forward_t(x, true))),
        ("LoRA r=8", Box::new(|x| lora.forward_t(x, true))),
        (
            "LoRA-Mini r=8 a=b=64 (materialised)",
            Box::new(|x| mini.forward_t(x, true)),
        ),
        (
            "LoRA-Mini r=8 a=b=64 (naive, 4 matmuls)",
            Box::new(|x| mini.forward_unfused(x, true)),
        ),
    ];
    let mut times = vec![Vec::new(); variants.len()];
    for round in 0..=rounds {
        for (i, (_, f)) in variants.iter().enumerate() {
            let start = Instant::now();
            let grads = f(x.as_tensor())?.sum_all()?.backward()?;
            std::hint::black_box(grads);
            if round > 0 {
                times[i].push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    // Ratios are taken within each round, then their median: drift between
    // rounds cancels out.
    let ratios: Vec<f64> = (0..times.len())
        .map(|i| {
            median(
                times[i]
                    .iter()
                    .zip(&times[1])
                    .map(|(t, lora)| t / lora)
                    .collect(),
            )
        })
        .collect();
    let medians: Vec<f64> = times.into_iter().map(median).collect();
    println!("forward+backward, 768x768, 4096 tokens, median of {rounds} interleaved rounds");
    for (((name, _), m), r) in variants.iter().zip(&medians).zip(&ratios) {
        println!("{name:<42} {m:>8.1} ms   {r:>5.3}x LoRA");
    }
    Ok(())
}
