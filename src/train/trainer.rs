//! The training loop: forward, loss, backward, clipping, AdamW on the
//! registry's `Var`s, scheduled learning rate, periodic evaluation, and the
//! run's files (resolved config, `metrics.jsonl`, best and last adapters,
//! `results.json`).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle::{DType, Device, Tensor, D};
use serde_json::json;

use super::config::TrainConfig;
use super::eval::score_labels;
use super::optim::{global_norm, AdamW, AdamWConfig};
use super::schedule::learning_rate;
use crate::adapter::rng::SeededRng;
use crate::adapter::targets::ALL_LINEAR;
use crate::adapter::{
    save_adapter, AdapterConfig, LinearFactory, LoraConfig, LoraMiniConfig, Method, SaveOptions,
};
use crate::data::batch::{
    collate_classification, collate_seq2seq, encode_examples, encode_translation, load_tokenizer,
    BatchPlan, Encoded, EncodedPair,
};
use crate::data::{
    read_examples, read_parallel, task, Direction, Example, Label, Task, TaskKind, TranslationPair,
};
use crate::models::bert::sequence_classification_loss;
use crate::models::presets::resolve_targets;
use crate::models::task::{load_task_model, LoadedModel, TaskModel};

type Error = String;

fn msg(e: candle::Error) -> Error {
    crate::error::message(&e)
}

/// What a finished run reports (also written to `results.json`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSummary {
    pub best: BTreeMap<String, Option<f64>>,
    pub best_step: u64,
    pub steps: u64,
    pub trainable: usize,
    pub total: usize,
    pub wall_seconds: f64,
    pub train_examples_per_second: f64,
    pub peak_rss_bytes: Option<u64>,
    pub crate_version: &'static str,
    pub output_dir: PathBuf,
}

/// The device a config asks for.
pub fn device(name: &str) -> Result<Device, Error> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| format!("run.device = \"cuda\": {}", msg(e))),
        "metal" => Device::new_metal(0).map_err(|e| format!("run.device = \"metal\": {}", msg(e))),
        _ => Ok(if candle::utils::cuda_is_available() {
            Device::new_cuda(0).map_err(msg)?
        } else if candle::utils::metal_is_available() {
            Device::new_metal(0).map_err(msg)?
        } else {
            Device::Cpu
        }),
    }
}

/// The adapter config a training config asks for.
pub fn adapter_config(
    config: &TrainConfig,
    loaded_family: crate::models::presets::Family,
    gated: bool,
) -> Result<AdapterConfig, Error> {
    let a = &config.adapter;
    let (method, targets) = match a.method.as_str() {
        "full" => (Method::Full, vec![ALL_LINEAR.to_string()]),
        "lora" => (
            Method::Lora(LoraConfig {
                alpha: a.alpha,
                dropout: a.dropout,
                use_rslora: a.use_rslora,
                inner_init: a.inner_init,
                seed: a.seed,
                ..LoraConfig::new(a.r)
            }),
            resolve_targets(loaded_family, &a.targets, gated).map_err(msg)?,
        ),
        _ => (
            Method::LoraMini(LoraMiniConfig {
                alpha: a.alpha,
                dropout: a.dropout,
                use_rslora: a.use_rslora,
                inner_init: a.inner_init,
                seed: a.seed,
                ..LoraMiniConfig::new(a.r, a.a, a.b)
            }),
            resolve_targets(loaded_family, &a.targets, gated).map_err(msg)?,
        ),
    };
    Ok(AdapterConfig {
        method,
        targets,
        modules_to_save: loaded_family.head_modules(),
    })
}

/// Tokenised training and evaluation data.
pub(crate) enum Data {
    Classification {
        train: Vec<Encoded>,
        dev: Vec<Encoded>,
    },
    Translation {
        train: Vec<EncodedPair>,
        dev: Vec<EncodedPair>,
        dev_refs: Vec<String>,
    },
}

/// The first `max` items after a seeded shuffle (a fair slice of a dataset).
fn slice<T: Clone>(items: Vec<T>, max: Option<usize>, seed: u64, name: &str) -> Vec<T> {
    match max {
        Some(n) if n < items.len() => {
            let mut idx: Vec<usize> = (0..items.len()).collect();
            let mut rng = SeededRng::for_stream(seed, name);
            for i in (1..idx.len()).rev() {
                idx.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            let mut keep: Vec<usize> = idx[..n].to_vec();
            keep.sort_unstable();
            keep.into_iter().map(|i| items[i].clone()).collect()
        }
        _ => items,
    }
}

fn read_split(task: &Task, config: &TrainConfig, split: &str) -> Result<Vec<Example>, Error> {
    let path = if config.task.data == "hub" {
        let hf_split = if split == "train" {
            "train"
        } else {
            task.dev_splits[0]
        };
        crate::data::parquet::fetch_split(task, hf_split, None).map_err(msg)?
    } else {
        Path::new(&config.task.data).join(format!("{split}.tsv"))
    };
    read_examples(task, &path).map_err(|e| e.to_string())
}

fn read_pairs(
    task: &Task,
    config: &TrainConfig,
    split: &str,
) -> Result<Vec<TranslationPair>, Error> {
    if config.task.data == "hub" {
        let path = crate::data::parquet::fetch_split(
            task,
            if split == "train" {
                "train"
            } else {
                "validation"
            },
            None,
        )
        .map_err(msg)?;
        return crate::data::parquet::read_parquet_translation(&path).map_err(|e| e.to_string());
    }
    // No WMT16 training data is available locally: newsdev2016 trains and
    // newstest2016 evaluates.
    let set = if split == "train" {
        "newsdev2016"
    } else {
        "newstest2016"
    };
    let dir = Path::new(&config.task.data);
    read_parallel(
        &dir.join(format!("{set}-enro.en")),
        &dir.join(format!("{set}-enro.ro")),
    )
    .map_err(|e| e.to_string())
}

fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

struct Log {
    file: std::fs::File,
}

impl Log {
    fn write(&mut self, value: serde_json::Value) -> Result<(), Error> {
        writeln!(self.file, "{value}").map_err(|e| format!("writing metrics.jsonl: {e}"))
    }
}

/// Runs a whole training as configured, writing into `config.run.output_dir`.
pub fn train(config: &TrainConfig) -> Result<TrainSummary, Error> {
    let start = Instant::now();
    let task = task(&config.task.name)?;
    let dev = device(&config.run.device)?;
    let dtype = match config.model.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let out = &config.run.output_dir;
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    std::fs::write(
        out.join("config.toml"),
        toml::to_string(config).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("writing {}: {e}", out.join("config.toml").display()))?;

    // The model: read the family first so presets resolve for it.
    let source_dir = crate::models::loader::resolve_checkpoint_dir(
        &config.model.source,
        Some(&config.model.revision),
    )
    .map_err(msg)?;
    let config_json = std::fs::read_to_string(source_dir.join("config.json"))
        .map_err(|e| format!("{}: {e}", source_dir.display()))?;
    let family = crate::models::presets::Family::from_config_json(&config_json).map_err(msg)?;
    let gated = config_json.contains("gated-");
    let adapter = adapter_config(config, family, gated)?;
    let factory = LinearFactory::new(adapter.clone()).map_err(msg)?;
    let loaded = load_task_model(
        source_dir.to_str().unwrap_or_default(),
        None,
        task.num_labels(),
        factory,
        dtype,
        &dev,
        config.run.seed,
    )
    .map_err(msg)?;
    let trainable = loaded.registry.num_trainable();
    let total: usize = loaded
        .checkpoint
        .tensors
        .values()
        .map(|t| t.elem_count())
        .sum();
    eprintln!(
        "{}: {} on {}, {} trainable of {} parameters ({:.4}%)",
        config.model.source,
        adapter.method.name(),
        task.name,
        trainable,
        total,
        100.0 * trainable as f64 / total as f64
    );

    let tokenizer = load_tokenizer(&source_dir.join("tokenizer.json"))?;
    let seed = config.run.seed;
    let data = if task.kind == TaskKind::Translation {
        let direction = if config.task.direction == "ro-en" {
            Direction::RoEn
        } else {
            Direction::EnRo
        };
        let prefix = config
            .task
            .prefix
            .clone()
            .unwrap_or_else(|| direction.t5_prefix().to_string());
        let train = slice(
            read_pairs(task, config, "train")?,
            config.task.max_train_examples,
            seed,
            "train-slice",
        );
        let dev_pairs = slice(
            read_pairs(task, config, "dev")?,
            config.task.max_dev_examples,
            seed,
            "dev-slice",
        );
        let enc = |pairs: &[TranslationPair]| {
            encode_translation(
                &tokenizer,
                pairs,
                direction,
                &prefix,
                config.task.max_len,
                config.task.max_target_len,
            )
        };
        Data::Translation {
            train: enc(&train)?,
            dev: enc(&dev_pairs)?,
            dev_refs: dev_pairs
                .iter()
                .map(|p| direction.split(p).1.to_string())
                .collect(),
        }
    } else {
        let train = slice(
            read_split(task, config, "train")?,
            config.task.max_train_examples,
            seed,
            "train-slice",
        );
        let dev_examples = slice(
            read_split(task, config, "dev")?,
            config.task.max_dev_examples,
            seed,
            "dev-slice",
        );
        if dev_examples.iter().any(|e| e.label.is_none()) {
            return Err("the dev split has unlabelled rows".into());
        }
        Data::Classification {
            train: encode_examples(&tokenizer, &train, config.task.max_len)?,
            dev: encode_examples(&tokenizer, &dev_examples, config.task.max_len)?,
        }
    };
    let pad_id = pad_id(&loaded.model);
    let train_lengths: Vec<usize> = match &data {
        Data::Classification { train, .. } => train.iter().map(|e| e.ids.len()).collect(),
        Data::Translation { train, .. } => train
            .iter()
            .map(|e| e.source.len() + e.target.len())
            .collect(),
    };
    if train_lengths.is_empty() {
        return Err("no training examples".into());
    }
    let plan = BatchPlan {
        batch_size: config.optim.batch_size,
        shuffle: true,
        bucket_by_length: config.run.bucket_by_length,
        seed,
    };
    let o = &config.optim;
    let batches_per_epoch = train_lengths.len().div_ceil(o.batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(o.grad_accum) as u64;
    let total_steps = match o.max_steps {
        Some(m) => (m as u64)
            .min(steps_per_epoch * o.epochs.max(1) as u64)
            .max(if o.epochs == 0 { m as u64 } else { 0 }),
        None => steps_per_epoch * o.epochs as u64,
    };
    let warmup = (o.warmup_ratio * total_steps as f64).round() as u64;
    let vars = loaded.registry.trainable();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        },
    )
    .map_err(msg)?;

    let mut log = Log {
        file: std::fs::File::create(out.join("metrics.jsonl"))
            .map_err(|e| format!("creating metrics.jsonl: {e}"))?,
    };
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        indicatif::ProgressBar::new(total_steps).with_style(
            indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} {msg} ({eta})")
                .expect("static template")
                .progress_chars("=> "),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let headline = task.metrics[0];
    let headline_name = format!("{headline:?}").to_lowercase();
    let mut best: (Option<f64>, BTreeMap<String, Option<f64>>, u64) = (None, BTreeMap::new(), 0);
    let (mut step, mut seen, mut loss_sum, mut loss_n) = (0u64, 0usize, 0f64, 0usize);
    let train_start = Instant::now();
    let budget = config.run.time_budget_minutes.map(|m| m * 60.0);
    let save = |name: &str| -> Result<(), Error> {
        save_adapter(
            out.join(name),
            &loaded.registry,
            &adapter,
            &SaveOptions {
                base_model: Some(config.model.source.clone()),
                base_revision: Some(config.model.revision.clone()),
                ..Default::default()
            },
        )
        .map_err(msg)
    };
    let evaluate = |step: u64,
                    epoch: usize,
                    best: &mut (Option<f64>, BTreeMap<String, Option<f64>>, u64),
                    log: &mut Log|
     -> Result<(), Error> {
        let scores = evaluate(
            &loaded,
            task,
            &data,
            &tokenizer,
            config.optim.batch_size,
            config.task.max_target_len,
            pad_id,
            &dev,
        )?;
        let value = scores.get(&headline_name).copied().flatten();
        let improved = match (value, best.0) {
            (Some(v), Some(b)) => v > b,
            (Some(_), None) => true,
            _ => best.1.is_empty(),
        };
        if improved {
            *best = (value, scores.clone(), step);
            save("adapter-best.safetensors")?;
        }
        let shown = |v: Option<f64>| v.map_or("undefined".to_string(), |v| format!("{v:.4}"));
        let line = format!(
            "epoch {epoch} | step {step} | dev {headline_name} {} | best {}",
            shown(value),
            shown(best.0)
        );
        bar.suspend(|| eprintln!("{line}"));
        log.write(json!({"eval": true, "step": step, "epoch": epoch, "metrics": scores}))
    };

    'outer: for epoch in 0..o.epochs.max(1) {
        let batches = plan.batches(&train_lengths, epoch as u64);
        let mut accumulated: BTreeMap<String, Tensor> = BTreeMap::new();
        for (i, batch) in batches.iter().enumerate() {
            let loss = batch_loss(&loaded, &data, batch, pad_id, &dev).map_err(msg)?;
            let value = loss
                .to_dtype(DType::F32)
                .and_then(|l| l.to_scalar::<f32>())
                .map_err(msg)? as f64;
            if !value.is_finite() {
                return Err(format!(
                    "the loss is {value} at step {} (epoch {epoch}, batch {i}): training stopped; the last good adapter is {}",
                    step + 1,
                    out.join("adapter-best.safetensors").display()
                ));
            }
            let grads = (loss / o.grad_accum as f64)
                .and_then(|l| l.backward())
                .map_err(msg)?;
            for (name, var) in &vars {
                if let Some(g) = grads.get(var.as_tensor()) {
                    let sum = match accumulated.remove(name) {
                        Some(prev) => (prev + g).map_err(msg)?,
                        None => g.clone(),
                    };
                    accumulated.insert(name.clone(), sum);
                }
            }
            seen += batch.len();
            loss_sum += value;
            loss_n += 1;
            if (i + 1) % o.grad_accum != 0 && i + 1 != batches.len() {
                continue;
            }
            let norm = global_norm(&accumulated).map_err(msg)?;
            let scale = if o.max_grad_norm > 0.0 && norm > o.max_grad_norm {
                o.max_grad_norm / (norm + 1e-6)
            } else {
                1.0
            };
            let lr = learning_rate(o.schedule, o.lr, step, warmup, total_steps);
            opt.step_with(&accumulated, lr, scale).map_err(msg)?;
            accumulated.clear();
            step += 1;
            bar.inc(1);
            let rate = seen as f64 / train_start.elapsed().as_secs_f64();
            if step % config.run.log_every.max(1) as u64 == 0 || step == total_steps {
                let mean = loss_sum / loss_n.max(1) as f64;
                bar.set_message(format!("loss {mean:.4} lr {lr:.2e} {rate:.1} ex/s"));
                if !tty {
                    eprintln!(
                        "step {step}/{total_steps} | loss {mean:.4} | lr {lr:.2e} | {rate:.1} ex/s"
                    );
                }
                log.write(json!({"step": step, "epoch": epoch, "loss": mean, "lr": lr, "grad_norm": norm, "examples_per_second": rate}))?;
                loss_sum = 0.0;
                loss_n = 0;
            }
            let out_of_time = budget.is_some_and(|b| start.elapsed().as_secs_f64() > b);
            if config.run.eval_every > 0 && step % config.run.eval_every as u64 == 0 {
                evaluate(step, epoch, &mut best, &mut log)?;
            }
            if step >= total_steps || out_of_time {
                if out_of_time {
                    bar.suspend(|| eprintln!("time budget reached at step {step}"));
                }
                if config.run.eval_every == 0 || step % config.run.eval_every as u64 != 0 {
                    evaluate(step, epoch, &mut best, &mut log)?;
                }
                break 'outer;
            }
        }
        if config.run.eval_every == 0 {
            evaluate(step, epoch, &mut best, &mut log)?;
        }
    }
    bar.finish_and_clear();
    save("adapter-last.safetensors")?;
    let summary = TrainSummary {
        best: best.1,
        best_step: best.2,
        steps: step,
        trainable,
        total,
        wall_seconds: start.elapsed().as_secs_f64(),
        train_examples_per_second: seen as f64 / train_start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss(),
        crate_version: env!("CARGO_PKG_VERSION"),
        output_dir: out.clone(),
    };
    let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
    crate::adapter::file::write_atomic(&out.join("results.json"), json.as_bytes()).map_err(msg)?;
    Ok(summary)
}

/// The padding id of a model family (RoBERTa pads with 1).
pub(crate) fn pad_id(model: &TaskModel) -> u32 {
    match model {
        TaskModel::Roberta(_) => 1,
        _ => 0,
    }
}

fn batch_loss(
    loaded: &LoadedModel,
    data: &Data,
    batch: &[usize],
    pad_id: u32,
    dev: &Device,
) -> candle::Result<Tensor> {
    match (data, &loaded.model) {
        (Data::Classification { train, .. }, model) => {
            let items: Vec<&Encoded> = batch.iter().map(|&i| &train[i]).collect();
            let b = collate_classification(&items, pad_id, dev)?;
            let labels = b
                .labels
                .ok_or_else(|| candle::Error::msg("a training example has no label"))?;
            let logits = model.classify(
                &b.input_ids,
                Some(&b.token_type_ids),
                Some(&b.attention_mask),
                true,
            )?;
            sequence_classification_loss(&logits, &labels)
        }
        (Data::Translation { train, .. }, TaskModel::T5(m)) => {
            let items: Vec<&EncodedPair> = batch.iter().map(|&i| &train[i]).collect();
            let b = collate_seq2seq(&items, pad_id, dev)?;
            m.loss(&b.input_ids, Some(&b.attention_mask), &b.labels, true)
        }
        _ => candle::bail!("translation needs a T5 model"),
    }
}

/// The task's metrics on the evaluation half of `data`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn evaluate(
    loaded: &LoadedModel,
    task: &Task,
    data: &Data,
    tokenizer: &tokenizers::Tokenizer,
    batch_size: usize,
    max_new_tokens: usize,
    pad_id: u32,
    dev: &Device,
) -> Result<BTreeMap<String, Option<f64>>, Error> {
    match (data, &loaded.model) {
        (Data::Classification { dev: examples, .. }, model) => {
            let mut predicted = Vec::with_capacity(examples.len());
            for chunk in examples.chunks(batch_size) {
                let items: Vec<&Encoded> = chunk.iter().collect();
                let b = collate_classification(&items, pad_id, dev).map_err(msg)?;
                let logits = model
                    .classify(
                        &b.input_ids,
                        Some(&b.token_type_ids),
                        Some(&b.attention_mask),
                        false,
                    )
                    .map_err(msg)?;
                if logits.dim(1).map_err(msg)? == 1 {
                    let v: Vec<f32> = logits
                        .squeeze(1)
                        .and_then(|l| l.to_dtype(DType::F32)?.to_vec1())
                        .map_err(msg)?;
                    predicted.extend(v.into_iter().map(Label::Score));
                } else {
                    let v: Vec<u32> = logits
                        .argmax(D::Minus1)
                        .and_then(|l| l.to_vec1())
                        .map_err(msg)?;
                    predicted.extend(v.into_iter().map(|c| Label::Class(c as usize)));
                }
            }
            let gold: Vec<Label> = examples
                .iter()
                .map(|e| e.label.expect("dev labels were checked"))
                .collect();
            Ok(score_labels(task, &predicted, &gold))
        }
        (
            Data::Translation {
                dev: pairs,
                dev_refs,
                ..
            },
            TaskModel::T5(m),
        ) => {
            let mut hyps = Vec::with_capacity(pairs.len());
            for chunk in pairs.chunks(batch_size) {
                let items: Vec<&EncodedPair> = chunk.iter().collect();
                let b = collate_seq2seq(&items, pad_id, dev).map_err(msg)?;
                let out = m
                    .generate_greedy(&b.input_ids, Some(&b.attention_mask), max_new_tokens)
                    .map_err(msg)?;
                for ids in out {
                    hyps.push(tokenizer.decode(&ids, true).map_err(|e| e.to_string())?);
                }
            }
            let bleu = crate::metrics::corpus_bleu(&hyps, dev_refs);
            let rouge = crate::metrics::corpus_rouge(&hyps, dev_refs, false);
            let mut scores = BTreeMap::new();
            scores.insert("bleu".to_string(), Some(bleu.score));
            scores.insert("rougeL".to_string(), rouge.map(|r| r.rouge_l));
            Ok(scores)
        }
        _ => Err("translation needs a T5 model".into()),
    }
}
