//! Our adapter on an unmodified `candle_transformers::models::bert::BertModel`:
//! `AdapterFile::merge_into` folds the adapter into the base checkpoint's
//! tensors, candle-transformers reads them through a `VarBuilder`, the
//! pooler and classifier (which candle-transformers' BERT does not have)
//! come from the same tensors, and the logits are checked against ours.
//!
//! ```sh
//! cargo run --release -- train --config configs/quickstart.toml   # writes the adapter
//! cargo run --release --example candle_transformers_bert -- \
//!     ../shared/models/all-MiniLM-L6-v2 runs/quickstart/adapter-best.safetensors \
//!     ../shared/data/glue/SST-2/dev.tsv
//! ```
//!
//! Arguments: MODEL_DIR ADAPTER DATA_TSV (these three by default). The
//! adapter records its task and `max_len`; the tokenizer's own padding is
//! switched off by our encoder, and each batch is padded with an attention
//! mask. `cargo test` runs it on a tiny model (tests/it/examples.rs).

use candle::{DType, Device, Module, Result, D};
use candle_nn::VarBuilder;
use lora_mini::adapter::{AdapterFile, LinearFactory};
use lora_mini::data::batch::{collate_classification, encode_examples, load_tokenizer, Encoded};
use lora_mini::data::{read_examples, task, Label};
use lora_mini::models::loader::Checkpoint;
use lora_mini::models::task::load_task_model;
use lora_mini::train::trainer::classify_batch;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or(default.into());
    let model_dir = arg(0, "../shared/models/all-MiniLM-L6-v2");
    let adapter = arg(1, "runs/quickstart/adapter-best.safetensors");
    let data = arg(2, "../shared/data/glue/SST-2/dev.tsv");
    let dev = Device::Cpu;

    // Ours: the model built for adapters, with the adapter applied.
    let file = AdapterFile::read(&adapter, &dev)?;
    let settings = file
        .data_settings()
        .ok_or_else(|| candle::Error::msg(format!("{adapter}: records no task")))?;
    let task = task(&settings.task).map_err(candle::Error::msg)?;
    let factory = LinearFactory::new(file.config.clone())?;
    let ours = load_task_model(
        &model_dir,
        None,
        task.num_labels(),
        factory,
        DType::F32,
        &dev,
        0,
    )?;
    file.apply(&ours.registry)?;

    // candle-transformers: the adapter folded into the untouched base
    // checkpoint, read by its own BERT.
    let base = Checkpoint::read_dir(&ours.dir, &dev)?;
    let merged = file.merge_into(&base.tensors)?;
    // The pooler keeps the base's name; the classifier, new, has ours.
    let pooler_name = ["pooler.dense", "bert.pooler.dense"]
        .into_iter()
        .find(|n| merged.contains_key(&format!("{n}.weight")))
        .ok_or_else(|| candle::Error::msg("the base checkpoint has no pooler"))?;
    let config_json = base.config_json;
    let vb = VarBuilder::from_tensors(merged, DType::F32, &dev);
    // candle-transformers requires keys that transformers defaults when a
    // config.json omits them; fill in transformers' BertConfig defaults.
    let mut json: serde_json::Value =
        serde_json::from_str(&config_json).map_err(candle::Error::wrap)?;
    for (key, default) in [
        ("hidden_act", serde_json::json!("gelu")),
        ("hidden_dropout_prob", serde_json::json!(0.1)),
        ("initializer_range", serde_json::json!(0.02)),
        ("layer_norm_eps", serde_json::json!(1e-12)),
        ("pad_token_id", serde_json::json!(0)),
    ] {
        if json.get(key).is_none() {
            json[key] = default;
        }
    }
    let config: candle_transformers::models::bert::Config =
        serde_json::from_value(json).map_err(candle::Error::wrap)?;
    let encoder = candle_transformers::models::bert::BertModel::load(vb.clone(), &config)?;
    let (h, n) = (config.hidden_size, task.num_labels().unwrap_or(2));
    let pooler = candle_nn::linear(h, h, vb.pp(pooler_name))?;
    let classifier = candle_nn::linear(h, n, vb.pp("classifier"))?;

    let tokenizer = load_tokenizer(&ours.dir.join("tokenizer.json")).map_err(candle::Error::msg)?;
    let examples = read_examples(task, std::path::Path::new(&data))
        .map_err(|e| candle::Error::msg(e.to_string()))?;
    let encoded =
        encode_examples(&tokenizer, &examples, settings.max_len).map_err(candle::Error::msg)?;
    let (mut worst, mut agree, mut correct) = (0f32, 0usize, 0usize);
    for chunk in encoded.chunks(32) {
        let items: Vec<&Encoded> = chunk.iter().collect();
        let b = collate_classification(&items, ours.pad_token_id(), &dev)?;
        let ours_logits = classify_batch(&ours.model, &b, false)?;
        let hidden = encoder.forward(&b.input_ids, &b.token_type_ids, Some(&b.attention_mask))?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let theirs = classifier.forward(&pooler.forward(&cls)?.tanh()?)?;
        let diff = (&ours_logits - &theirs)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        worst = worst.max(diff);
        let (a, t) = (ours_logits.argmax(D::Minus1)?, theirs.argmax(D::Minus1)?);
        let (a, t) = (a.to_vec1::<u32>()?, t.to_vec1::<u32>()?);
        for ((x, y), e) in a.iter().zip(&t).zip(chunk) {
            agree += usize::from(x == y);
            correct += usize::from(e.label == Some(Label::Class(*y as usize)));
        }
    }
    let total = encoded.len();
    println!(
        "{total} examples: candle-transformers accuracy {:.4}; same prediction as ours on {agree}; max |logit difference| {worst:.2e}",
        correct as f64 / total as f64
    );
    if agree != total || worst > 1e-3 {
        candle::bail!("candle-transformers and lora-mini disagree");
    }
    Ok(())
}
