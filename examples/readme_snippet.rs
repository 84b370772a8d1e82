//! The README's "Use it in your own Candle model" program, compiled by
//! `cargo test` (it builds every example) and run with
//! `cargo run --example readme_snippet`. `tests/it/readme.rs` checks that
//! the README shows exactly the code below the marker line.

// This package names candle-core `candle`; a user's crate sees it as
// `candle_core`, as the README writes it.
extern crate candle as candle_core;
// --- README snippet ---
use candle_core::{Device, Module, Tensor};
use candle_nn::{Linear, Optimizer};
use lora_mini::adapter::{LoraMiniConfig, LoraMiniLinear};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // A pretrained layer: 64 -> 32, kept frozen.
    let base = Linear::new(Tensor::randn(0f32, 0.1, (32, 64), &dev)?, None);
    // r = 4, a = b = 16: 4·(16+16) = 128 trainable parameters.
    let layer = LoraMiniLinear::new(&base, &LoraMiniConfig::new(4, 16, 16), "my_model.proj")?;

    let xs = Tensor::randn(0f32, 1.0, (128, 64), &dev)?;
    let target = (base.forward(&xs)? + 0.5)?; // something to fit
    let vars = vec![layer.a_in().clone(), layer.b_in().clone()];
    let mut opt = candle_nn::AdamW::new_lr(vars, 1e-2)?;
    let loss_at = |layer: &LoraMiniLinear| -> candle_core::Result<f32> {
        // forward_t(.., false): inference, whatever the layer's mode.
        candle_nn::loss::mse(&layer.forward_t(&xs, false)?, &target)?.to_scalar::<f32>()
    };
    let before = loss_at(&layer)?;
    for _ in 0..20 {
        // Module::forward trains by default (dropout on, factored update),
        // as a PyTorch module starts in train() mode.
        let loss = candle_nn::loss::mse(&layer.forward(&xs)?, &target)?;
        opt.backward_step(&loss)?;
    }
    let after = loss_at(&layer)?;
    assert!(after < before);
    println!("loss {before:.4} -> {after:.4}");
    Ok(())
}
