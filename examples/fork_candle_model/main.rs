//! candle-transformers' Llama, forked to train LoRA-Mini: `llama.rs` beside
//! this file is `candle_transformers::models::llama` (0.11.1) with 6 changed
//! lines and nothing added or removed:
//!
//! * two `use` lines import `linear_no_bias`, `Linear`, `RmsNorm`,
//!   `embedding`, `Embedding`, `Module` and `VarBuilder` from
//!   `lora_mini::nn` instead of candle-nn and candle-transformers'
//!   `with_tracing`;
//! * `rope` and `softmax_last_dim` come from `lora_mini::nn`, whose versions
//!   have a backward (Candle's record none: the query and key adapters, and
//!   everything before the attention, would get no gradient);
//! * `crate::utils` becomes `candle_transformers::utils`, as for any file
//!   moved out of that crate.
//!
//! Every `forward` call stays as it was: an adapted layer's `Module::forward`
//! trains unless the registry is switched to inference. The model needs no
//! lora-mini feature, so `cargo add lora-mini --no-default-features` is
//! enough (CI builds this example that way); the fork keeps its own
//! dependencies (candle-transformers' utils, tracing).
//!
//! This program builds a tiny random Llama with grouped-query attention,
//! adapts every projection (q, k, v, o, gate, up, down) with LoRA-Mini,
//! trains a few steps on a next-token rule, and checks that every adapter
//! tensor gets a non-zero gradient. `cargo test` runs it
//! (tests/it/examples.rs) and recomputes the diff against the original.
//!
//! `cargo run --release --example fork_candle_model`

#[rustfmt::skip]
#[allow(unexpected_cfgs, dead_code, clippy::all)]
mod llama;

use std::collections::HashMap;

use candle::{DType, Device, Result, Tensor};
use candle_nn::Optimizer;
use lora_mini::adapter::{AdapterConfig, InnerInit, LinearFactory, LoraMiniConfig, Method};
use lora_mini::nn::VarBuilder;

const CONFIG: &str = r#"{
    "hidden_size": 64, "intermediate_size": 128, "vocab_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
    "tie_word_embeddings": false
}"#;

/// Random "pretrained" weights under Hugging Face's Llama names.
fn random_checkpoint(c: &llama::Config) -> Result<HashMap<String, Tensor>> {
    let (h, ff, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let kv = h / c.num_attention_heads * c.num_key_value_heads;
    let mut shapes = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
        ("lm_head.weight".into(), vec![v, h]),
    ];
    for i in 0..c.num_hidden_layers {
        let l = format!("model.layers.{i}");
        for (name, dims) in [
            ("self_attn.q_proj", vec![h, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, h]),
            ("mlp.gate_proj", vec![ff, h]),
            ("mlp.up_proj", vec![ff, h]),
            ("mlp.down_proj", vec![h, ff]),
        ] {
            shapes.push((format!("{l}.{name}.weight"), dims));
        }
        shapes.push((format!("{l}.input_layernorm.weight"), vec![h]));
        shapes.push((format!("{l}.post_attention_layernorm.weight"), vec![h]));
    }
    let dev = Device::Cpu;
    shapes
        .into_iter()
        .map(|(name, dims)| {
            let n = dims.iter().product();
            let values = if dims.len() == 1 {
                vec![1f32; n] // norm scales
            } else {
                lora_mini::adapter::init::normal_values(7, &name, n, 0.1)
            };
            Ok((name, Tensor::from_vec(values, dims, &dev)?))
        })
        .collect()
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let hf: llama::LlamaConfig = serde_json::from_str(CONFIG).map_err(candle::Error::wrap)?;
    let config = hf.into_config(false);
    let checkpoint =
        candle_nn::VarBuilder::from_tensors(random_checkpoint(&config)?, DType::F32, &dev);

    // PEFT's target names; B_in starts random so every tensor gets a
    // gradient from the first step (with the default zero B_in, A_in's
    // gradient is zero until B_in has moved).
    let method = Method::LoraMini(LoraMiniConfig {
        inner_init: InnerInit::Kaiming,
        ..LoraMiniConfig::new(4, 16, 16)
    });
    let targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let vb = VarBuilder::new(
        checkpoint,
        LinearFactory::new(AdapterConfig::new(method, &targets))?,
    );
    let model = llama::Llama::load(vb.clone(), &config)?;
    let registry = vb.finish()?;
    println!(
        "{} adapted linears, {} trainable parameters",
        registry.modules().count(),
        registry.num_trainable()
    );

    // The rule to learn: the next token after a sequence is its last token
    // plus one.
    let (batch, len) = (16usize, 6usize);
    let ids: Vec<u32> = (0..batch * len)
        .map(|i| ((i * 37 + i / len * 11) % 90) as u32)
        .collect();
    let targets: Vec<u32> = ids.chunks(len).map(|row| row[len - 1] + 1).collect();
    let input = Tensor::from_vec(ids, (batch, len), &dev)?;
    let labels = Tensor::from_vec(targets, batch, &dev)?;

    let mut opt = candle_nn::AdamW::new_lr(registry.vars(), 1e-2)?;
    let mut losses = Vec::new();
    for step in 0..30 {
        let mut cache = llama::Cache::new(false, DType::F32, &config, &dev)?;
        let logits = model.forward(&input, 0, &mut cache)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let grads = loss.backward()?;
        if step == 0 {
            check_gradients(&registry, &grads)?;
        }
        losses.push(loss.to_scalar::<f32>()?);
        opt.step(&grads)?;
    }
    println!("loss {:.4} -> {:.4}", losses[0], losses[losses.len() - 1]);
    if losses[losses.len() - 1] >= losses[0] {
        candle::bail!("the loss did not fall: {losses:?}");
    }
    Ok(())
}

/// Every trainable tensor has a finite, non-zero gradient.
fn check_gradients(
    registry: &lora_mini::adapter::AdapterRegistry,
    grads: &candle::backprop::GradStore,
) -> Result<()> {
    let trainable = registry.trainable();
    for (name, var) in &trainable {
        let norm = match grads.get(var) {
            Some(g) => g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?,
            None => 0.0,
        };
        if !(norm.is_finite() && norm > 0.0) {
            candle::bail!("{name} got no gradient (norm {norm})");
        }
    }
    println!(
        "all {} adapter tensors have a non-zero gradient",
        trainable.len()
    );
    Ok(())
}
