//! Our BERT against candle-transformers' on the real MiniLM weights, and
//! gradients through the whole classification model.

use candle::{DType, Device, Result, Tensor};
use lora_mini::adapter::{AdapterConfig, InnerInit, LinearFactory, LoraMiniConfig, Method};
use lora_mini::models::bert::{
    mean_pool, sequence_classification_loss, BertConfig, BertForSequenceClassification, BertModel,
};
use lora_mini::models::loader::Checkpoint;
use lora_mini::nn::VarBuilder;

use crate::common::{max_abs_diff, shared};

const SENTENCES: [&str; 4] = [
    "A man is playing a guitar on the stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply today.",
    "Cats sleep.",
];

/// Token ids and masks, padded to the longest sentence.
fn batch() -> Result<(Tensor, Tensor)> {
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(shared("models/all-MiniLM-L6-v2/tokenizer.json"))
            .map_err(candle::Error::msg)?;
    tokenizer
        .with_padding(None)
        .with_truncation(None)
        .map_err(candle::Error::msg)?;
    let encodings: Vec<tokenizers::Encoding> = SENTENCES
        .iter()
        .map(|s| tokenizer.encode(*s, true).map_err(candle::Error::msg))
        .collect::<Result<_>>()?;
    let len = encodings.iter().map(|e| e.len()).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for e in &encodings {
        for i in 0..len {
            ids.push(e.get_ids().get(i).copied().unwrap_or(0));
            mask.push(u32::from(i < e.len()));
        }
    }
    let n = encodings.len();
    Ok((
        Tensor::from_vec(ids, (n, len), &Device::Cpu)?,
        Tensor::from_vec(mask, (n, len), &Device::Cpu)?,
    ))
}

#[test]
fn minilm_hidden_states_match_candle_transformers() -> Result<()> {
    let dev = Device::Cpu;
    let ckpt = Checkpoint::read_dir(shared("models/all-MiniLM-L6-v2"), &dev)?;
    let config = BertConfig::from_json(&ckpt.config_json)?;
    let vb = VarBuilder::frozen(ckpt.var_builder(DType::F32, &dev));
    let ours = BertModel::new(vb, &config)?;
    let ct_config: candle_transformers::models::bert::Config =
        serde_json::from_str(&ckpt.config_json).map_err(candle::Error::wrap)?;
    let reference = candle_transformers::models::bert::BertModel::load(
        ckpt.var_builder(DType::F32, &dev),
        &ct_config,
    )?;

    let (ids, mask) = batch()?;
    let types = ids.zeros_like()?;
    let a = ours.forward_t(&ids, Some(&types), Some(&mask), false)?;
    let b = reference.forward(&ids, &types, Some(&mask))?;
    // Compare attended positions; padded ones are never read downstream.
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let err = max_abs_diff(&a.broadcast_mul(&m)?, &b.broadcast_mul(&m)?)?;
    eprintln!("MiniLM last hidden state, max |ours - candle-transformers| = {err:e}");
    assert!(err < 1e-4, "{err}");

    // Mean-pooled, normalised embeddings rank the paraphrase first.
    let pooled = mean_pool(&a, &mask)?;
    let normed = pooled.broadcast_div(&pooled.sqr()?.sum_keepdim(1)?.sqrt()?)?;
    let sims = normed.matmul(&normed.t()?)?.to_vec2::<f32>()?;
    assert!(
        sims[0][1] > sims[0][2] + 0.3,
        "paraphrase {} vs unrelated {}",
        sims[0][1],
        sims[0][2]
    );
    Ok(())
}

#[test]
fn every_trainable_tensor_of_the_classifier_gets_a_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let mut ckpt = Checkpoint::read_dir(shared("models/all-MiniLM-L6-v2"), &dev)?
        .with_prefix("bert", &["embeddings", "encoder", "pooler"]);
    let config = BertConfig::from_json(&ckpt.config_json)?;
    assert!(ckpt.init_missing_linear(
        "classifier",
        config.hidden_size,
        2,
        config.initializer_range,
        0
    )?);
    // Non-zero inner inits: with B_in = 0, A_in's gradient would be exactly 0.
    let method = Method::LoraMini(LoraMiniConfig {
        inner_init: InnerInit::Kaiming,
        ..LoraMiniConfig::new(4, 16, 16)
    });
    let adapter = AdapterConfig::new(method, &["query", "key", "value", "dense"])
        .with_modules_to_save(&["classifier"]);
    let factory = LinearFactory::new(adapter)?.with_dropout_seed(7);
    let vb = VarBuilder::new(ckpt.var_builder(DType::F32, &dev), factory);
    let model = BertForSequenceClassification::new(vb.clone(), &config, 2)?;
    let registry = vb.finish()?;
    // 6 layers x 6 modules + pooler.dense, plus the classifier in full.
    assert_eq!(registry.num_trainable(), (6 * 6 + 1) * 4 * 32 + 384 * 2 + 2);

    let (ids, mask) = batch()?;
    let logits = model.forward_t(&ids, None, Some(&mask), true)?;
    let labels = Tensor::new(&[1u32, 1, 0, 0], &dev)?;
    let grads = sequence_classification_loss(&logits, &labels)?.backward()?;
    for (name, var) in registry.trainable() {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let values = g.flatten_all()?.to_vec1::<f32>()?;
        assert!(
            values.iter().all(|v| v.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(values.iter().any(|v| *v != 0.0), "{name}: zero gradient");
    }
    // Dropout is active in training and off in eval.
    let eval_a = model.forward_t(&ids, None, Some(&mask), false)?;
    let eval_b = model.forward_t(&ids, None, Some(&mask), false)?;
    assert_eq!(eval_a.to_vec2::<f32>()?, eval_b.to_vec2::<f32>()?);
    assert!(max_abs_diff(&model.forward_t(&ids, None, Some(&mask), true)?, &eval_a)? > 0.0);
    Ok(())
}
