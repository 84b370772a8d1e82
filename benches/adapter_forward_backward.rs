//! Forward + backward of one 768x768 layer on 4096 tokens, per method.
//!
//! `cargo bench --bench adapter_forward_backward`
//!
//! The input is a `Var`, as it would be inside a network, so every variant
//! also pays for the input gradient. LoRA-Mini's materialised path should cost
//! within a few percent of LoRA at the same rank; the naive path shows what
//! the four thin matmuls per token would cost instead.

use candle::{DType, Device, Result, Tensor, Var};
use candle_nn::Linear;
use criterion::{criterion_group, criterion_main, Criterion};
use lora_mini::adapter::{
    AdaptedLinear, InnerInit, LoraConfig, LoraMiniConfig, LoraMiniLinear, Method,
};

const D: usize = 768;
const TOKENS: usize = 4096;

fn setup() -> Result<(Linear, Var)> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (D, D), &dev)?;
    let b = Tensor::zeros(D, DType::F32, &dev)?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, TOKENS / 8, D), &dev)?)?;
    Ok((Linear::new(w, Some(b)), x))
}

fn step(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Var) -> Result<()> {
    let y = f(x.as_tensor())?;
    let grads = y.sum_all()?.backward()?;
    std::hint::black_box(grads);
    Ok(())
}

fn bench(c: &mut Criterion) {
    let (base, x) = setup().unwrap();
    let mini_config = LoraMiniConfig {
        inner_init: InnerInit::Kaiming,
        ..LoraMiniConfig::new(8, 64, 64)
    };
    let lora_config = LoraConfig {
        inner_init: InnerInit::Kaiming,
        ..LoraConfig::new(8)
    };
    let frozen = AdaptedLinear::new(&base, &Method::Frozen, "m").unwrap();
    let lora = AdaptedLinear::new(&base, &Method::Lora(lora_config), "m").unwrap();
    let mini = LoraMiniLinear::new(&base, &mini_config, "m").unwrap();

    let mut group = c.benchmark_group("linear_768_4096tok_fwd_bwd");
    group.sample_size(20);
    group.bench_function("frozen", |bch| {
        bch.iter(|| step(|x| frozen.forward_t(x, true), &x).unwrap())
    });
    group.bench_function("lora_r8", |bch| {
        bch.iter(|| step(|x| lora.forward_t(x, true), &x).unwrap())
    });
    group.bench_function("lora_mini_r8_a64_b64", |bch| {
        bch.iter(|| step(|x| mini.forward_t(x, true), &x).unwrap())
    });
    group.bench_function("lora_mini_r8_a64_b64_naive", |bch| {
        bch.iter(|| step(|x| mini.forward_unfused(x, true), &x).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
