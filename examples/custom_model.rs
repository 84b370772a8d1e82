//! LoRA-Mini in a model of your own: build it through a `LinearFactory`,
//! train a few steps, save the adapter, rebuild the model from the file
//! and check that it computes exactly what the trained one did.
//!
//! `cargo run --release --example custom_model [-- OUT_DIR]`
//!
//! `cargo test` runs it (tests/it/examples.rs).

use std::path::PathBuf;

use candle::{DType, Device, Result, Tensor, D};
use candle_nn::Linear;
use lora_mini::adapter::{
    save_adapter, AdaptedLinear, AdapterConfig, AdapterFile, AdapterRegistry, LinearFactory,
    LoraMiniConfig, Method, SaveOptions,
};
use lora_mini::train::optim::{AdamWConfig, GroupedAdamW};

/// A two-layer MLP with a classifier head. Every linear comes from the
/// factory, under the path its weights would have in a checkpoint.
struct Mlp {
    fc1: AdaptedLinear,
    fc2: AdaptedLinear,
    head: AdaptedLinear,
}

impl Mlp {
    /// "Pretrained" weights from a fixed seed; the factory adapts them.
    fn new(factory: &mut LinearFactory) -> Result<Self> {
        let dev = Device::Cpu;
        let linear = |seed: u64, d_in: usize, d_out: usize| -> Result<Linear> {
            let values = lora_mini::adapter::init::normal_values(seed, "w", d_in * d_out, 0.2);
            Ok(Linear::new(
                Tensor::from_vec(values, (d_out, d_in), &dev)?,
                None,
            ))
        };
        Ok(Self {
            fc1: factory.build("mlp.fc1", &linear(1, 16, 64)?)?,
            fc2: factory.build("mlp.fc2", &linear(2, 64, 64)?)?,
            head: factory.build("head", &linear(3, 64, 2)?)?,
        })
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.fc1.forward_t(xs, train)?.relu()?;
        let h = self.fc2.forward_t(&h, train)?.relu()?;
        self.head.forward_t(&h, train)
    }
}

fn config() -> AdapterConfig {
    let method = Method::LoraMini(LoraMiniConfig::new(4, 16, 16));
    AdapterConfig::new(method, &["fc1", "fc2"]).with_modules_to_save(&["head"])
}

fn build() -> Result<(Mlp, AdapterRegistry)> {
    let mut factory = LinearFactory::new(config())?;
    let model = Mlp::new(&mut factory)?;
    Ok((model, factory.finish()?))
}

fn main() -> Result<()> {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("runs/custom_model"));
    let (model, registry) = build()?;
    println!("trainable parameters: {}", registry.num_trainable());

    // A toy task: is the sum of the first four inputs positive?
    let values = lora_mini::adapter::init::normal_values(7, "toy-inputs", 256 * 16, 1.0);
    let xs = Tensor::from_vec(values, (256, 16), &Device::Cpu)?;
    let labels = xs.narrow(1, 0, 4)?.sum(1)?.ge(0f32)?.to_dtype(DType::U32)?;
    let mut opt = GroupedAdamW::new(registry.trainable(), AdamWConfig::default())?;
    for step in 1..=60 {
        let logits = model.forward_t(&xs, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        opt.step(&loss.backward()?, 1e-2, 1.0)?;
        if step % 20 == 0 {
            let accuracy = logits
                .argmax(D::Minus1)?
                .eq(&labels)?
                .to_dtype(DType::F32)?
                .mean_all()?;
            println!(
                "step {step}: loss {:.4}, accuracy {:.3}",
                loss.to_scalar::<f32>()?,
                accuracy.to_scalar::<f32>()?
            );
        }
    }

    let path = out.join("adapter.safetensors");
    save_adapter(&path, &registry, &config(), &SaveOptions::default())?;
    // A fresh model from the file: the frozen projections regenerate from
    // the seed, the trained tensors load into its registry.
    let file = AdapterFile::read(&path, &Device::Cpu)?;
    let mut factory = LinearFactory::new(file.config.clone())?;
    let reloaded = Mlp::new(&mut factory)?;
    file.apply(&factory.finish()?)?;
    let before = model
        .forward_t(&xs, false)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let after = reloaded
        .forward_t(&xs, false)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if before != after {
        candle::bail!("the reloaded model differs from the trained one");
    }
    println!(
        "saved {} and reloaded it: outputs equal bit for bit",
        path.display()
    );
    Ok(())
}
