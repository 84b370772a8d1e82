//! The training loop: forward, loss, backward, clipping, AdamW on the
//! registry's `Var`s, scheduled learning rate, periodic evaluation, and the
//! run's files (resolved config, `metrics.jsonl`, best and last adapters,
//! `results.json`).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle::{DType, Device, Tensor};
use serde_json::json;

use super::checkpoint::{config_differences, save_checkpoint, Best, RunState, SavedCheckpoint};
use super::config::{DeviceChoice, MethodName, TrainConfig};
use super::eval::{evaluate, EvalSet};
use super::optim::{global_norm, AdamWConfig, GroupedAdamW, ParamGroup};
use super::plot::{write_svg, Curves};
use super::schedule::learning_rate;
use crate::adapter::targets::ALL_LINEAR;
use crate::adapter::{
    save_adapter, AdapterConfig, DataSettings, LinearFactory, LoraConfig, LoraMiniConfig, Method,
    SaveOptions,
};
use crate::data::batch::{
    collate_classification, collate_seq2seq, encode_examples, encode_translation, load_tokenizer,
    BatchPlan, ClassificationBatch, Encoded, EncodedPair,
};
use crate::data::locate::{locate_data, DataSource};
use crate::data::{read_examples, read_parallel, task, Example, Task, TaskKind, TranslationPair};
use crate::models::bert::sequence_classification_loss;
use crate::models::presets::resolve_targets;
use crate::models::task::{load_task_model, LoadedModel, TaskModel};
use crate::rng::SeededRng;

pub(crate) type Error = String;

pub(crate) fn msg(e: candle::Error) -> Error {
    crate::error::message(&e)
}

/// The checkpoint's file name inside the output directory.
pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// Config keys that may change between a run and its resumption: they do
/// not affect what is trained.
const RESUMABLE_KEYS: &[&str] = &[
    "run.output_dir",
    "run.device",
    "run.time_budget_minutes",
    "run.log_every",
    "run.save_every",
];

/// How a run is started and stopped from outside its config.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Continue from the output directory's checkpoint.
    pub resume: bool,
    /// When set (by a Ctrl-C handler, say), the run stops after the step in
    /// progress, writes a checkpoint and returns with `interrupted`.
    pub stop: Option<Arc<AtomicBool>>,
    /// Start afresh even when the output folder holds an earlier run
    /// (otherwise that is refused, so a finished run is never lost by
    /// accident).
    pub overwrite: bool,
}

/// Why a run stopped, as `results.json` records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Every scheduled epoch ran.
    Completed,
    /// `run.time_budget_minutes` ran out first; the schedule is unfinished.
    TimeBudget,
    /// `optim.max_steps` ended it before the epochs did.
    MaxSteps,
    /// Stopped from outside (Ctrl-C); a checkpoint holds the progress.
    Interrupted,
    /// The loss stopped being finite; training returned an error.
    Nan,
}

impl StopReason {
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Completed => "completed",
            StopReason::TimeBudget => "time_budget",
            StopReason::MaxSteps => "max_steps",
            StopReason::Interrupted => "interrupted",
            StopReason::Nan => "nan",
        }
    }
}

/// The files that mark an earlier run in an output folder.
const RUN_FILES: &[&str] = &[
    CHECKPOINT,
    "results.json",
    "adapter-best.safetensors",
    "metrics.jsonl",
];

/// Refuses to start afresh over an earlier run unless told to.
fn check_fresh_start(out: &Path, options: &TrainOptions) -> Result<(), Error> {
    if options.resume || options.overwrite {
        return Ok(());
    }
    if let Some(found) = RUN_FILES.iter().find(|f| out.join(f).exists()) {
        return Err(format!(
            "{} holds an earlier run ({found}): pass --resume to continue it, --overwrite to replace it, or choose another --output-dir",
            out.display()
        ));
    }
    Ok(())
}

/// What a run reports (also written to `results.json` when it finishes).
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSummary {
    pub best: BTreeMap<String, Option<f64>>,
    pub best_step: u64,
    pub steps: u64,
    pub trainable: usize,
    pub total: usize,
    /// This invocation's wall time, loading and evaluation included.
    pub wall_seconds: f64,
    /// Time in the training loop, summed over interruptions.
    pub train_seconds: f64,
    pub train_examples_per_second: f64,
    pub peak_rss_bytes: Option<u64>,
    pub crate_version: &'static str,
    pub output_dir: PathBuf,
    /// Stopped by [`TrainOptions::stop`] before the end; a checkpoint holds
    /// the progress.
    pub interrupted: bool,
    /// Why the run stopped.
    pub stopped: StopReason,
    /// Which trained tensor got which learning rate and weight decay.
    pub param_groups: Vec<ParamGroup>,
    /// What chose the best step: `dev` (the official dev set, the old
    /// protocol) or `validation-split` (a slice of the training data; the
    /// dev metrics in `best` were then never used to choose anything).
    pub selection: &'static str,
    /// The validation-slice metrics at the best step (empty under `dev`).
    pub best_validation: BTreeMap<String, Option<f64>>,
}

/// The optimizer's parameter groups: the head (`modules_to_save`) at
/// `optim.head_lr` and `optim.head_weight_decay`, everything else at
/// `optim.lr` and `optim.weight_decay`. Both always appear, so a run's
/// `results.json` says what each tensor trained at.
pub fn param_groups(
    config: &TrainConfig,
    adapter: &AdapterConfig,
    trainable: &[(String, candle::Var)],
) -> Vec<ParamGroup> {
    let o = &config.optim;
    let in_head = |name: &str| {
        adapter
            .modules_to_save
            .iter()
            .any(|m| crate::adapter::targets::is_within(name, m))
    };
    let (head, rest): (Vec<String>, Vec<String>) = trainable
        .iter()
        .map(|(n, _)| n.clone())
        .partition(|n| in_head(n));
    vec![
        ParamGroup {
            name: "adapter".into(),
            lr_scale: 1.0,
            weight_decay: o.weight_decay,
            tensors: rest,
        },
        ParamGroup {
            name: "head".into(),
            lr_scale: o.head_lr.map_or(1.0, |h| h / o.lr),
            weight_decay: o.head_weight_decay.unwrap_or(o.weight_decay),
            tensors: head,
        },
    ]
}

/// The device a config asks for.
pub fn device(choice: DeviceChoice) -> Result<Device, Error> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            Device::new_cuda(0).map_err(|e| format!("run.device = \"cuda\": {}", msg(e)))
        }
        DeviceChoice::Metal => {
            Device::new_metal(0).map_err(|e| format!("run.device = \"metal\": {}", msg(e)))
        }
        DeviceChoice::Auto => Ok(if candle::utils::cuda_is_available() {
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
    let (method, targets) = match a.method {
        MethodName::Full => (Method::Full, vec![ALL_LINEAR.to_string()]),
        MethodName::Lora => (
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
        MethodName::LoraMini => (
            Method::LoraMini(LoraMiniConfig {
                alpha: a.alpha,
                dropout: a.dropout,
                use_rslora: a.use_rslora,
                inner_init: a.inner_init,
                aux_init: a.aux_init,
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

/// The T5 source prefix: the config's, or T5's own for the direction.
fn source_prefix(config: &TrainConfig) -> String {
    config
        .task
        .prefix
        .clone()
        .unwrap_or_else(|| config.task.direction.t5_prefix().to_string())
}

/// Tokenised training and evaluation data. `validation` is carved out of
/// the training set (`task.validation_split`) and empty without it.
pub(crate) enum Data {
    Classification {
        train: Vec<Encoded>,
        validation: Vec<Encoded>,
        dev: Vec<Encoded>,
    },
    Translation {
        train: Vec<EncodedPair>,
        validation: Vec<EncodedPair>,
        validation_refs: Vec<String>,
        dev: Vec<EncodedPair>,
        dev_refs: Vec<String>,
    },
}

impl Data {
    /// The official dev set.
    fn dev(&self) -> EvalSet<'_> {
        match self {
            Data::Classification { dev, .. } => EvalSet::Classification(dev),
            Data::Translation { dev, dev_refs, .. } => EvalSet::Translation {
                pairs: dev,
                refs: dev_refs,
            },
        }
    }

    /// The validation slice carved out of the training data, if any.
    fn validation(&self) -> Option<EvalSet<'_>> {
        match self {
            Data::Classification { validation, .. } if !validation.is_empty() => {
                Some(EvalSet::Classification(validation))
            }
            Data::Translation {
                validation,
                validation_refs,
                ..
            } if !validation.is_empty() => Some(EvalSet::Translation {
                pairs: validation,
                refs: validation_refs,
            }),
            _ => None,
        }
    }
}

/// The indices `0..n` in a seeded random order (Fisher–Yates on the stream
/// `name`): the one shuffle behind slicing and validation splits.
fn seeded_permutation(n: usize, seed: u64, name: &str) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = SeededRng::for_stream(seed, name);
    for i in (1..idx.len()).rev() {
        idx.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    idx
}

/// The first `max` items after a seeded shuffle (a fair slice of a dataset).
fn slice<T: Clone>(items: Vec<T>, max: Option<usize>, seed: u64, name: &str) -> Vec<T> {
    match max {
        Some(n) if n < items.len() => {
            let mut keep: Vec<usize> = seeded_permutation(items.len(), seed, name)[..n].to_vec();
            keep.sort_unstable();
            keep.into_iter().map(|i| items[i].clone()).collect()
        }
        _ => items,
    }
}

/// The training examples a config uses (`task.max_train_examples` of them,
/// a seeded slice) and the validation slice carved out of those
/// (`task.validation_split`): `(train, validation)`.
fn training_examples<T: Clone>(items: Vec<T>, config: &TrainConfig) -> (Vec<T>, Vec<T>) {
    let seed = config.run.seed;
    let used = slice(items, config.task.max_train_examples, seed, "train-slice");
    split_validation(used, config.task.validation_split.unwrap_or(0.0), seed)
}

/// Splits `fraction` of `items` (rounded, at least one when the fraction
/// is positive) off as a seeded validation slice: `(train, validation)`,
/// disjoint, each in the original order.
pub fn split_validation<T>(items: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    if fraction <= 0.0 || items.len() < 2 {
        return (items, Vec::new());
    }
    let n = ((items.len() as f64 * fraction).round() as usize).clamp(1, items.len() - 1);
    let mut held = vec![false; items.len()];
    for i in &seeded_permutation(items.len(), seed, "validation-split")[..n] {
        held[*i] = true;
    }
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (item, held) in items.into_iter().zip(held) {
        if held {
            validation.push(item);
        } else {
            train.push(item);
        }
    }
    (train, validation)
}

fn read_split(task: &Task, config: &TrainConfig, split: &str) -> Result<Vec<Example>, Error> {
    let path = match locate_data(task, &config.task.data) {
        DataSource::Hub => {
            let hf_split = if split == "train" {
                "train"
            } else {
                task.dev_splits[0]
            };
            crate::data::parquet::fetch_split(task, hf_split, None).map_err(msg)?
        }
        DataSource::Folder(dir) => dir.join(format!("{split}.tsv")),
    };
    read_examples(task, &path).map_err(|e| e.to_string())
}

fn read_pairs(
    task: &Task,
    config: &TrainConfig,
    split: &str,
) -> Result<Vec<TranslationPair>, Error> {
    let dir = match locate_data(task, &config.task.data) {
        DataSource::Hub => {
            let hf_split = if split == "train" {
                "train"
            } else {
                "validation"
            };
            let path = crate::data::parquet::fetch_split(task, hf_split, None).map_err(msg)?;
            return crate::data::parquet::read_parquet_translation(&path)
                .map_err(|e| e.to_string());
        }
        DataSource::Folder(dir) => dir,
    };
    // No WMT16 training data is available locally: newsdev2016 trains and
    // newstest2016 evaluates.
    let set = if split == "train" {
        "newsdev2016"
    } else {
        "newstest2016"
    };
    read_parallel(
        &dir.join(format!("{set}-enro.en")),
        &dir.join(format!("{set}-enro.ro")),
    )
    .map_err(|e| e.to_string())
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
    train_with(config, &TrainOptions::default())
}

/// [`train`], resumable and stoppable.
pub fn train_with(config: &TrainConfig, options: &TrainOptions) -> Result<TrainSummary, Error> {
    let start = Instant::now();
    let task = task(&config.task.name)?;
    let dev = device(config.run.device)?;
    let dtype = config.model.dtype.dtype();
    let out = &config.run.output_dir;
    check_fresh_start(out, options)?;
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let config_toml = toml::to_string(config).map_err(|e| e.to_string())?;
    std::fs::write(out.join("config.toml"), &config_toml)
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
        "{}: {} on {} ({}, {dtype:?}), {} trainable of {} parameters ({:.4}%)",
        config.model.source,
        adapter.method.name(),
        task.name,
        match &dev {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
            Device::Metal(_) => "metal",
        },
        trainable,
        total,
        100.0 * trainable as f64 / total as f64
    );

    let tokenizer = load_tokenizer(&source_dir.join("tokenizer.json"))?;
    let seed = config.run.seed;
    let data = if task.kind == TaskKind::Translation {
        let direction = config.task.direction;
        let prefix = source_prefix(config);
        let (train, validation) = training_examples(read_pairs(task, config, "train")?, config);
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
        let refs = |pairs: &[TranslationPair]| {
            pairs
                .iter()
                .map(|p| direction.split(p).1.to_string())
                .collect()
        };
        Data::Translation {
            train: enc(&train)?,
            validation: enc(&validation)?,
            validation_refs: refs(&validation),
            dev: enc(&dev_pairs)?,
            dev_refs: refs(&dev_pairs),
        }
    } else {
        let (train, validation) = training_examples(read_split(task, config, "train")?, config);
        if validation.iter().any(|e| e.label.is_none()) {
            return Err("the training split has unlabelled rows".into());
        }
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
            validation: encode_examples(&tokenizer, &validation, config.task.max_len)?,
            dev: encode_examples(&tokenizer, &dev_examples, config.task.max_len)?,
        }
    };
    let translation = task.kind == TaskKind::Translation;
    let data_settings = DataSettings {
        task: task.name.to_string(),
        max_len: config.task.max_len,
        max_target_len: translation.then_some(config.task.max_target_len),
        source_prefix: translation.then(|| source_prefix(config)),
    };
    let pad_id = loaded.pad_token_id();
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
        Some(m) if o.epochs == 0 => m as u64,
        Some(m) => (m as u64).min(steps_per_epoch * o.epochs as u64),
        None => steps_per_epoch * o.epochs as u64,
    };
    let warmup = (o.warmup_ratio * total_steps as f64).round() as u64;
    let vars = loaded.registry.trainable();
    let mut opt = GroupedAdamW::new(
        vars.clone(),
        AdamWConfig {
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        },
    )
    .map_err(msg)?;
    let groups = param_groups(config, &adapter, &vars);
    for group in &groups {
        opt.set_group(group).map_err(msg)?;
        let params: usize = vars
            .iter()
            .filter(|(n, _)| group.tensors.contains(n))
            .map(|(_, v)| v.elem_count())
            .sum();
        eprintln!(
            "group {}: {} tensors, {params} parameters, lr {:.2e}, weight decay {}",
            group.name,
            group.tensors.len(),
            o.lr * group.lr_scale,
            group.weight_decay
        );
    }

    // Resume, or start afresh.
    let checkpoint_path = out.join(CHECKPOINT);
    let metrics_path = out.join("metrics.jsonl");
    let mut state = RunState::default();
    if options.resume {
        let ckpt = SavedCheckpoint::read(&checkpoint_path).map_err(|e| {
            if checkpoint_path.exists() {
                msg(e)
            } else {
                format!(
                    "--resume: {} holds no checkpoint to resume from",
                    out.display()
                )
            }
        })?;
        let changed = config_differences(&ckpt.config_toml, &config_toml, RESUMABLE_KEYS);
        if !changed.is_empty() {
            return Err(format!(
                "--resume: the config differs from the checkpointed run's, so the run would not continue as it began:\n  {}",
                changed.join("\n  ")
            ));
        }
        ckpt.restore(&loaded.registry, &mut opt).map_err(msg)?;
        state = ckpt.state;
        truncate_metrics_after(&metrics_path, state.step)?;
        eprintln!(
            "resuming at step {} (epoch {}, batch {}) from {}",
            state.step,
            state.epoch,
            state.next_batch,
            checkpoint_path.display()
        );
    } else {
        // Files of an earlier run exist here only with `overwrite` (see
        // `check_fresh_start`); remove them all, so that a replaced run
        // interrupted early never passes for the finished old one.
        let old: Vec<PathBuf> = RUN_FILES
            .iter()
            .map(|f| out.join(f))
            .chain([out.join("adapter-last.safetensors")])
            .filter(|p| p.exists())
            .collect();
        if !old.is_empty() {
            eprintln!(
                "--overwrite: starting afresh in {}; its earlier run is replaced",
                out.display()
            );
        }
        for path in old {
            std::fs::remove_file(&path).map_err(|e| format!("removing {}: {e}", path.display()))?;
        }
    }
    // A resumed run appends to its log (trimmed above); a fresh one starts it.
    let log_file = if options.resume {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
    } else {
        std::fs::File::create(&metrics_path)
    };
    let mut log = Log {
        file: log_file.map_err(|e| format!("opening {}: {e}", metrics_path.display()))?,
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
    bar.set_position(state.step);
    let headline = task.metrics[0];
    let headline_name = format!("{headline:?}").to_lowercase();
    let (mut loss_sum, mut loss_n) = (0f64, 0usize);
    let session_start = Instant::now();
    let train_seconds =
        |state: &RunState| state.train_seconds + session_start.elapsed().as_secs_f64();
    let budget = config.run.time_budget_minutes.map(|m| m * 60.0);
    let save = |name: &str| -> Result<(), Error> {
        save_adapter(
            out.join(name),
            &loaded.registry,
            &adapter,
            &SaveOptions {
                base_model: Some(config.model.source.clone()),
                base_revision: Some(config.model.revision.clone()),
                data: Some(data_settings.clone()),
                ..Default::default()
            },
        )
        .map_err(msg)
    };
    let checkpoint = |state: &RunState, opt: &GroupedAdamW| -> Result<(), Error> {
        let mut state = state.clone();
        state.dropout = loaded.registry.dropout_state();
        state.train_seconds = train_seconds(&state);
        save_checkpoint(
            &checkpoint_path,
            &loaded.registry,
            opt,
            &state,
            &config_toml,
        )
        .map_err(msg)
    };
    let plot = || -> Result<(), Error> {
        let text = std::fs::read_to_string(&metrics_path)
            .map_err(|e| format!("reading {}: {e}", metrics_path.display()))?;
        write_svg(
            &out.join("curves.svg"),
            &Curves::from_metrics_jsonl(&text, &headline_name),
        )
    };
    let selection = if data.validation().is_some() {
        "validation-split"
    } else {
        "dev"
    };
    let evaluate = |state: &mut RunState, log: &mut Log| -> Result<(), Error> {
        let run = |set: EvalSet| {
            evaluate(
                &loaded,
                task,
                set,
                &tokenizer,
                config.optim.batch_size,
                config.task.max_target_len,
                pad_id,
                &dev,
            )
        };
        let scores = run(data.dev())?;
        let validation = data.validation().map(run).transpose()?;
        // Model selection reads the validation slice when there is one; the
        // dev set is then only reported.
        let chooser = validation.as_ref().unwrap_or(&scores);
        let value = chooser.get(&headline_name).copied().flatten();
        let best = &mut state.best;
        let improved = match (value, best.value) {
            (Some(v), Some(b)) => v > b,
            (Some(_), None) => true,
            _ => best.metrics.is_empty(),
        };
        if improved {
            *best = Best {
                value,
                metrics: scores.clone(),
                validation: validation.clone().unwrap_or_default(),
                step: state.step,
            };
            save("adapter-best.safetensors")?;
        }
        let shown = |v: Option<f64>| v.map_or("undefined".to_string(), |v| format!("{v:.4}"));
        // The 1-based epoch the step belongs to, as training rows log it:
        // an epoch's last step has already moved `state` to the next epoch.
        let epoch = if state.next_batch == 0 {
            state.epoch
        } else {
            state.epoch + 1
        };
        let dev_value = scores.get(&headline_name).copied().flatten();
        let line = match &validation {
            Some(_) => format!(
                "epoch {epoch} | step {} | validation {headline_name} {} | dev {} | best validation {}",
                state.step,
                shown(value),
                shown(dev_value),
                shown(best.value)
            ),
            None => format!(
                "epoch {epoch} | step {} | dev {headline_name} {} | best {}",
                state.step,
                shown(value),
                shown(best.value)
            ),
        };
        bar.suspend(|| eprintln!("{line}"));
        log.write(json!({"eval": true, "step": state.step, "epoch": epoch, "metrics": scores, "validation": validation}))?;
        plot()
    };

    let mut interrupted = false;
    // The error of a run whose loss stopped being finite.
    let mut diverged: Option<String> = None;
    let mut accumulated: BTreeMap<String, Tensor> = BTreeMap::new();
    'outer: while state.step < total_steps {
        let epoch = state.epoch;
        let batches = plan.batches(&train_lengths, epoch as u64);
        for (i, batch) in batches.iter().enumerate().skip(state.next_batch) {
            let loss = batch_loss(&loaded, &data, batch, pad_id, &dev).map_err(msg)?;
            let value = loss
                .to_dtype(DType::F32)
                .and_then(|l| l.to_scalar::<f32>())
                .map_err(msg)? as f64;
            if !value.is_finite() {
                let kept = if checkpoint_path.exists() {
                    format!(
                        "the last good checkpoint is kept at {}",
                        checkpoint_path.display()
                    )
                } else {
                    "no checkpoint was written before it".to_string()
                };
                diverged = Some(format!(
                    "the loss is {value} at step {} (epoch {epoch}, batch {i}): training stopped; {kept}",
                    state.step + 1,
                ));
                break 'outer;
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
            state.seen += batch.len();
            loss_sum += value;
            loss_n += 1;
            let epoch_end = i + 1 == batches.len();
            if (i + 1) % o.grad_accum != 0 && !epoch_end {
                continue;
            }
            let norm = global_norm(&accumulated).map_err(msg)?;
            let scale = if o.max_grad_norm > 0.0 && norm > o.max_grad_norm {
                o.max_grad_norm / (norm + 1e-6)
            } else {
                1.0
            };
            let lr = learning_rate(o.schedule, o.lr, state.step, warmup, total_steps);
            opt.step_with(&accumulated, lr, scale).map_err(msg)?;
            accumulated.clear();
            state.step += 1;
            (state.epoch, state.next_batch) = if epoch_end {
                (epoch + 1, 0)
            } else {
                (epoch, i + 1)
            };
            let step = state.step;
            bar.inc(1);
            let rate = state.seen as f64 / train_seconds(&state);
            if step % config.run.log_every.max(1) as u64 == 0 || step == total_steps {
                let mean = loss_sum / loss_n.max(1) as f64;
                bar.set_message(format!("loss {mean:.4} lr {lr:.2e} {rate:.1} ex/s"));
                if !tty {
                    eprintln!(
                        "step {step}/{total_steps} | loss {mean:.4} | lr {lr:.2e} | {rate:.1} ex/s"
                    );
                }
                log.write(json!({"step": step, "epoch": epoch + 1, "loss": mean, "lr": lr, "grad_norm": norm, "examples_per_second": rate}))?;
                (loss_sum, loss_n) = (0.0, 0);
            }
            let finished = step >= total_steps;
            let out_of_time = budget.is_some_and(|b| train_seconds(&state) > b);
            let stop_requested = options
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::SeqCst));
            let eval_due = if config.run.eval_every > 0 {
                step % config.run.eval_every as u64 == 0
            } else {
                epoch_end
            };
            if eval_due || finished || out_of_time {
                evaluate(&mut state, &mut log)?;
            }
            let save_due = config.run.save_every > 0 && step % config.run.save_every as u64 == 0;
            if save_due || eval_due || finished || out_of_time || stop_requested {
                checkpoint(&state, &opt)?;
            }
            if out_of_time && !finished {
                bar.suspend(|| eprintln!("time budget reached at step {step}"));
            }
            if stop_requested && !finished {
                bar.suspend(|| {
                    eprintln!(
                        "interrupted at step {step}: checkpoint saved to {}; continue with --resume",
                        checkpoint_path.display()
                    )
                });
                interrupted = true;
            }
            if finished || out_of_time || interrupted {
                break 'outer;
            }
        }
    }
    bar.finish_and_clear();
    let summary = TrainSummary {
        best: state.best.metrics.clone(),
        best_step: state.best.step,
        steps: state.step,
        trainable,
        total,
        wall_seconds: start.elapsed().as_secs_f64(),
        train_seconds: train_seconds(&state),
        train_examples_per_second: state.seen as f64 / train_seconds(&state),
        peak_rss_bytes: crate::alloc::peak_rss_bytes(),
        crate_version: env!("CARGO_PKG_VERSION"),
        output_dir: out.clone(),
        interrupted,
        stopped: if diverged.is_some() {
            StopReason::Nan
        } else if interrupted {
            StopReason::Interrupted
        } else if state.step < total_steps {
            StopReason::TimeBudget
        } else if o
            .max_steps
            .is_some_and(|m| (m as u64) < steps_per_epoch * o.epochs as u64)
        {
            StopReason::MaxSteps
        } else {
            StopReason::Completed
        },
        param_groups: groups,
        selection,
        best_validation: state.best.validation.clone(),
    };
    if interrupted {
        return Ok(summary);
    }
    let write_results = || {
        let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
        crate::io::write_atomic(&out.join("results.json"), json.as_bytes()).map_err(msg)
    };
    if let Some(error) = diverged {
        // Recorded as finished (a rerun would diverge the same way); the
        // adapters and checkpoint stay as the last good evaluation left them.
        write_results()?;
        return Err(error);
    }
    save("adapter-last.safetensors")?;
    plot()?;
    write_results()?;
    Ok(summary)
}

/// Drops the `metrics.jsonl` lines logged after `step` (by a run that went
/// on past its last checkpoint), so a resumed run's log has no duplicates.
fn truncate_metrics_after(path: &Path, step: u64) -> Result<(), Error> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::io::write_atomic(path, kept.as_bytes()).map_err(msg)
}

/// The model's logits on a padded batch; `train` switches dropout on.
pub fn classify_batch(
    model: &TaskModel,
    batch: &ClassificationBatch,
    train: bool,
) -> candle::Result<Tensor> {
    model.classify(
        &batch.input_ids,
        Some(&batch.token_type_ids),
        Some(&batch.attention_mask),
        train,
    )
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
                .as_ref()
                .ok_or_else(|| candle::Error::msg("a training example has no label"))?;
            sequence_classification_loss(&classify_batch(model, &b, true)?, labels)
        }
        (Data::Translation { train, .. }, TaskModel::T5(m)) => {
            let items: Vec<&EncodedPair> = batch.iter().map(|&i| &train[i]).collect();
            let b = collate_seq2seq(&items, pad_id, dev)?;
            m.loss(&b.input_ids, Some(&b.attention_mask), &b.labels, true)
        }
        _ => candle::bail!("translation needs a T5 model"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_split_is_seeded_and_disjoint() {
        let items: Vec<usize> = (0..100).collect();
        let (train, validation) = split_validation(items.clone(), 0.1, 7);
        assert_eq!((train.len(), validation.len()), (90, 10));
        assert!(validation.iter().all(|v| !train.contains(v)));
        let mut all = [train.clone(), validation.clone()].concat();
        all.sort_unstable();
        assert_eq!(all, items);
        assert_eq!(
            split_validation(items.clone(), 0.1, 7),
            (train, validation.clone())
        );
        assert_ne!(split_validation(items.clone(), 0.1, 8).1, validation);
        assert_eq!(split_validation(items, 0.0, 7).1, Vec::<usize>::new());
    }

    #[test]
    fn auto_uses_the_cpu_when_no_accelerator_is_compiled_in() {
        let built_with_accelerator = cfg!(any(feature = "cuda", feature = "metal"));
        if !built_with_accelerator {
            assert!(device(DeviceChoice::Auto).unwrap().is_cpu());
            // Asking for one that is not there names the setting.
            let err = device(DeviceChoice::Cuda).unwrap_err();
            assert!(err.starts_with("run.device = \"cuda\""), "{err}");
        }
        assert!(device(DeviceChoice::Cpu).unwrap().is_cpu());
    }
}
