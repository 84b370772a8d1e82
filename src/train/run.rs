//! One training run in progress: what [`train_with`](super::trainer::train_with)
//! sets up (the model, data, optimizer and files of a run) and the three
//! things it does to them: [`Run::step`], [`Run::evaluate`] and
//! [`Run::checkpoint`].

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle::backprop::GradStore;
use candle::{DType, Device, Tensor, Var};
use indicatif::ProgressBar;
use serde_json::json;
use tokenizers::Tokenizer;

use super::checkpoint::{config_differences, save_checkpoint, Best, RunState, SavedCheckpoint};
use super::config::{OptimSection, TrainConfig};
use super::dataset::{source_prefix, Data};
use super::eval::{classify_batch, EvalSet};
use super::optim::{global_norm, AdamWConfig, GroupedAdamW, ParamGroup};
use super::options::{StopReason, TrainOptions, TrainSummary, CHECKPOINT};
use super::plot::{write_svg, Curves};
use super::schedule::learning_rate;
use super::setup::{adapter_config, device, param_groups};
use crate::adapter::{save_adapter, AdapterConfig, DataSettings, LinearFactory, SaveOptions};
use crate::data::batch::{
    collate_classification, collate_seq2seq, load_tokenizer, BatchPlan, Encoded, EncodedPair,
};
use crate::data::{task, Task, TaskKind};
use crate::decoder::chat_tokenizer_for;
use crate::decoder::data::{collate as collate_lm, LmExample};
use crate::models::bert::sequence_classification_loss;
use crate::models::task::{load_task_model, LoadedModel, TaskModel};
use crate::Error;

/// Config keys that may change between a run and its resumption: they do
/// not affect what is trained.
const RESUMABLE_KEYS: &[&str] = &[
    "run.output_dir",
    "run.device",
    "run.time_budget_minutes",
    "run.log_every",
    "run.save_every",
];

/// The files that mark an earlier run in an output folder.
const RUN_FILES: &[&str] = &[
    CHECKPOINT,
    "results.json",
    "adapter-best.safetensors",
    "metrics.jsonl",
];

/// How many optimizer steps a run takes.
struct StepBudget {
    per_epoch: u64,
    total: u64,
    warmup: u64,
}

impl StepBudget {
    fn new(o: &OptimSection, examples: usize) -> Self {
        let batches_per_epoch = examples.div_ceil(o.batch_size);
        let per_epoch = batches_per_epoch.div_ceil(o.grad_accum) as u64;
        let total = match o.max_steps {
            Some(m) if o.epochs == 0 => m as u64,
            Some(m) => (m as u64).min(per_epoch * o.epochs as u64),
            None => per_epoch * o.epochs as u64,
        };
        let warmup = (o.warmup_ratio * total as f64).round() as u64;
        StepBudget {
            per_epoch,
            total,
            warmup,
        }
    }
}

/// How the training loop ended.
enum Ending {
    /// Every scheduled step ran.
    Finished,
    /// `run.time_budget_minutes` ran out first.
    OutOfTime,
    /// [`TrainOptions::stop`] was set.
    Interrupted,
    /// The loss stopped being finite; the error to return.
    Diverged(String),
}

/// A training run between its setup and its `results.json`.
pub(super) struct Run<'a> {
    config: &'a TrainConfig,
    options: &'a TrainOptions,
    task: &'static Task,
    device: Device,
    out: PathBuf,
    /// The resolved config, as written to `config.toml` and checkpoints.
    config_toml: String,
    adapter: AdapterConfig,
    loaded: LoadedModel,
    tokenizer: Tokenizer,
    data: Data,
    pad_id: u32,
    train_lengths: Vec<usize>,
    steps: StepBudget,
    vars: Vec<(String, Var)>,
    opt: GroupedAdamW,
    groups: Vec<ParamGroup>,
    state: RunState,
    metrics_log: std::fs::File,
    bar: ProgressBar,
    /// The headline metric's name, which best-step selection compares.
    headline: String,
    started: Instant,
    /// When this invocation's training began (earlier sessions' time is in
    /// `state.train_seconds`).
    session_start: Instant,
    /// Gradients summed over `optim.grad_accum` batches.
    accumulated: BTreeMap<String, Tensor>,
    loss_sum: f64,
    loss_n: usize,
}

impl<'a> Run<'a> {
    /// Loads the model and data, builds the optimizer, and resumes from the
    /// output folder's checkpoint or clears it for a fresh start.
    pub(super) fn open(config: &'a TrainConfig, options: &'a TrainOptions) -> Result<Self, Error> {
        let started = Instant::now();
        let task = task(&config.task.name)?;
        let device = device(config.run.device)?;
        let out = config.run.output_dir.clone();
        check_fresh_start(&out, options)?;
        let config_toml = write_config(&out, config)?;
        let (source_dir, adapter, loaded) = load_model(config, task, &device)?;
        let (tokenizer, data) = match (&loaded.model, task.kind) {
            (TaskModel::Llama(m), TaskKind::CausalLm) => {
                let (source, revision) = (&config.model.source, &config.model.revision);
                let text = chat_tokenizer_for(source, Some(revision), m.config())?;
                let data = Data::load_causal_lm(config, &text)?;
                (text.tokenizer, data)
            }
            (_, TaskKind::CausalLm) => {
                return Err("task causal-lm needs a Llama-family decoder (llama, mistral, qwen2 or a GGUF file)".into())
            }
            (TaskModel::Llama(m), _) => {
                let (source, revision) = (&config.model.source, &config.model.revision);
                let text = chat_tokenizer_for(source, Some(revision), m.config())?;
                let data = Data::load_instructions(task, config, &text)?;
                (text.tokenizer, data)
            }
            _ => {
                let tokenizer = load_tokenizer(&source_dir.join("tokenizer.json"))?;
                let data = Data::load(task, config, &tokenizer)?;
                (tokenizer, data)
            }
        };
        let train_lengths = data.train_lengths();
        if train_lengths.is_empty() {
            return Err("no training examples".into());
        }
        let vars = loaded.registry.trainable();
        let (mut opt, groups) = optimizer(config, &adapter, &vars)?;
        let state = if options.resume {
            resume(&out, &config_toml, &loaded, &mut opt)?
        } else {
            clear_earlier_run(&out)?;
            RunState::default()
        };
        let steps = StepBudget::new(&config.optim, train_lengths.len());
        let bar = progress_bar(steps.total);
        bar.set_position(state.step);
        Ok(Run {
            config,
            options,
            task,
            pad_id: loaded.pad_token_id(),
            metrics_log: open_metrics_log(&out, options.resume)?,
            headline: task.metrics[0].name(),
            device,
            out,
            config_toml,
            adapter,
            loaded,
            tokenizer,
            data,
            train_lengths,
            steps,
            vars,
            opt,
            groups,
            state,
            bar,
            started,
            session_start: Instant::now(),
            accumulated: BTreeMap::new(),
            loss_sum: 0.0,
            loss_n: 0,
        })
    }

    /// Trains until the schedule, the time budget or a stop request ends
    /// the run, then writes its results.
    pub(super) fn run(mut self) -> Result<TrainSummary, Error> {
        let ending = self.train()?;
        self.finish(ending)
    }

    fn train(&mut self) -> Result<Ending, Error> {
        let plan = BatchPlan {
            batch_size: self.config.optim.batch_size,
            shuffle: true,
            bucket_by_length: self.config.run.bucket_by_length,
            seed: self.config.run.seed,
        };
        let grad_accum = self.config.optim.grad_accum;
        while self.state.step < self.steps.total {
            let epoch = self.state.epoch;
            let batches = plan.batches(&self.train_lengths, epoch as u64);
            for (i, batch) in batches.iter().enumerate().skip(self.state.next_batch) {
                if let Some(error) = self.accumulate(batch, epoch, i)? {
                    return Ok(Ending::Diverged(error));
                }
                let epoch_end = i + 1 == batches.len();
                if (i + 1) % grad_accum != 0 && !epoch_end {
                    continue;
                }
                self.step(epoch, i, epoch_end)?;
                if let Some(ending) = self.after_step(epoch_end)? {
                    return Ok(ending);
                }
            }
        }
        Ok(Ending::Finished)
    }

    /// Forward and backward on one batch, adding its gradients to the
    /// accumulated ones. Returns the error to stop with when the loss is not
    /// finite (nothing is accumulated then).
    fn accumulate(
        &mut self,
        batch: &[usize],
        epoch: usize,
        i: usize,
    ) -> Result<Option<String>, Error> {
        let scale = 1.0 / self.config.optim.grad_accum as f64;
        let (loss, grads) = if self.config.optim.gradient_checkpointing {
            let params: Vec<&Tensor> = self.vars.iter().map(|(_, v)| v.as_tensor()).collect();
            checkpointed_batch_backward(
                &self.loaded,
                &self.data,
                batch,
                self.pad_id,
                &self.device,
                &params,
                scale,
            )?
        } else {
            let loss = batch_loss(&self.loaded, &self.data, batch, self.pad_id, &self.device)?;
            let grads = (&loss * scale).and_then(|l| l.backward())?;
            (loss, grads)
        };
        let value = loss
            .to_dtype(DType::F32)
            .and_then(|l| l.to_scalar::<f32>())? as f64;
        if !value.is_finite() {
            return Ok(Some(self.divergence(value, epoch, i)));
        }
        for (name, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let sum = match self.accumulated.remove(name) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                self.accumulated.insert(name.clone(), sum);
            }
        }
        self.state.seen += batch.len();
        self.loss_sum += value;
        self.loss_n += 1;
        Ok(None)
    }

    fn divergence(&self, value: f64, epoch: usize, i: usize) -> String {
        let checkpoint_path = self.out.join(CHECKPOINT);
        let kept = if checkpoint_path.exists() {
            format!(
                "the last good checkpoint is kept at {}",
                checkpoint_path.display()
            )
        } else {
            "no checkpoint was written before it".to_string()
        };
        format!(
            "the loss is {value} at step {} (epoch {epoch}, batch {i}): training stopped; {kept}",
            self.state.step + 1,
        )
    }

    /// One optimizer step on the accumulated gradients (clipped to
    /// `optim.max_grad_norm`), moving the data position past batch `i`.
    pub(super) fn step(&mut self, epoch: usize, i: usize, epoch_end: bool) -> Result<(), Error> {
        let o = &self.config.optim;
        let norm = global_norm(&self.accumulated)?;
        let scale = if o.max_grad_norm > 0.0 && norm > o.max_grad_norm {
            o.max_grad_norm / (norm + 1e-6)
        } else {
            1.0
        };
        let lr = learning_rate(
            o.schedule,
            o.lr,
            self.state.step,
            self.steps.warmup,
            self.steps.total,
        );
        self.opt.step_with(&self.accumulated, lr, scale)?;
        self.accumulated.clear();
        self.state.step += 1;
        (self.state.epoch, self.state.next_batch) = if epoch_end {
            (epoch + 1, 0)
        } else {
            (epoch, i + 1)
        };
        self.bar.inc(1);
        let step = self.state.step;
        if step.is_multiple_of(self.config.run.log_every.max(1) as u64) || step == self.steps.total
        {
            self.log_training(epoch, lr, norm)?;
        }
        Ok(())
    }

    /// Logs the mean loss since the last log line.
    fn log_training(&mut self, epoch: usize, lr: f64, norm: f64) -> Result<(), Error> {
        let (step, total) = (self.state.step, self.steps.total);
        let rate = self.state.seen as f64 / self.train_seconds();
        let mean = self.loss_sum / self.loss_n.max(1) as f64;
        self.bar
            .set_message(format!("loss {mean:.4} lr {lr:.2e} {rate:.1} ex/s"));
        if self.bar.is_hidden() {
            eprintln!("step {step}/{total} | loss {mean:.4} | lr {lr:.2e} | {rate:.1} ex/s");
        }
        self.write_metrics(json!({"step": step, "epoch": epoch + 1, "loss": mean, "lr": lr, "grad_norm": norm, "examples_per_second": rate}))?;
        (self.loss_sum, self.loss_n) = (0.0, 0);
        Ok(())
    }

    /// Evaluates and checkpoints as scheduled after a step; says how the
    /// run ends if it ends here.
    fn after_step(&mut self, epoch_end: bool) -> Result<Option<Ending>, Error> {
        let run = &self.config.run;
        let step = self.state.step;
        let finished = step >= self.steps.total;
        let out_of_time = run
            .time_budget_minutes
            .is_some_and(|m| self.train_seconds() > m * 60.0);
        let stop_requested = self
            .options
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::SeqCst));
        let eval_due = if run.eval_every > 0 {
            step.is_multiple_of(run.eval_every as u64)
        } else {
            epoch_end
        };
        if eval_due || finished || out_of_time {
            self.evaluate()?;
        }
        let save_due = run.save_every > 0 && step.is_multiple_of(run.save_every as u64);
        if save_due || eval_due || finished || out_of_time || stop_requested {
            self.checkpoint()?;
        }
        Ok(if finished {
            Some(Ending::Finished)
        } else if stop_requested {
            let path = self.out.join(CHECKPOINT);
            self.bar.suspend(|| {
                eprintln!(
                    "interrupted at step {step}: checkpoint saved to {}; continue with --resume",
                    path.display()
                )
            });
            Some(Ending::Interrupted)
        } else if out_of_time {
            self.bar
                .suspend(|| eprintln!("time budget reached at step {step}"));
            Some(Ending::OutOfTime)
        } else {
            None
        })
    }

    /// Scores the dev set (and the validation slice, when there is one),
    /// logs the scores and keeps the best adapter. Model selection reads the
    /// validation slice when there is one; the dev set is then only
    /// reported.
    pub(super) fn evaluate(&mut self) -> Result<(), Error> {
        let scores = self.score(self.data.dev())?;
        let validation = self.data.validation().map(|s| self.score(s)).transpose()?;
        let chooser = validation.as_ref().unwrap_or(&scores);
        let value = chooser.get(&self.headline).copied().flatten();
        let best = &self.state.best;
        let improved = match (value, best.value) {
            (Some(v), Some(b)) => self.task.metrics[0].improves(v, b),
            (Some(_), None) => true,
            _ => best.metrics.is_empty(),
        };
        if improved {
            self.state.best = Best {
                value,
                metrics: scores.clone(),
                validation: validation.clone().unwrap_or_default(),
                step: self.state.step,
            };
            self.save_adapter("adapter-best.safetensors")?;
        }
        // The 1-based epoch the step belongs to, as training rows log it:
        // an epoch's last step has already moved `state` to the next epoch.
        let epoch = self.state.epoch + usize::from(self.state.next_batch != 0);
        let dev_value = scores.get(&self.headline).copied().flatten();
        let line = self.eval_line(epoch, value, dev_value, validation.is_some());
        self.bar.suspend(|| eprintln!("{line}"));
        self.write_metrics(json!({"eval": true, "step": self.state.step, "epoch": epoch, "metrics": scores, "validation": validation}))?;
        self.plot()
    }

    fn score(&self, set: EvalSet) -> Result<BTreeMap<String, Option<f64>>, Error> {
        super::eval::evaluate(
            &self.loaded,
            self.task,
            set,
            &self.tokenizer,
            self.config.optim.batch_size,
            self.config.task.max_target_len,
            self.pad_id,
            &self.device,
        )
    }

    fn eval_line(
        &self,
        epoch: usize,
        value: Option<f64>,
        dev_value: Option<f64>,
        has_validation: bool,
    ) -> String {
        let shown = |v: Option<f64>| v.map_or("undefined".to_string(), |v| format!("{v:.4}"));
        let (step, name, best) = (self.state.step, &self.headline, self.state.best.value);
        if has_validation {
            format!(
                "epoch {epoch} | step {step} | validation {name} {} | dev {} | best validation {}",
                shown(value),
                shown(dev_value),
                shown(best)
            )
        } else {
            format!(
                "epoch {epoch} | step {step} | dev {name} {} | best {}",
                shown(value),
                shown(best)
            )
        }
    }

    /// Writes the checkpoint `--resume` continues from.
    pub(super) fn checkpoint(&self) -> Result<(), Error> {
        let mut state = self.state.clone();
        state.dropout = self.loaded.registry.dropout_state();
        state.train_seconds = self.train_seconds();
        save_checkpoint(
            &self.out.join(CHECKPOINT),
            &self.loaded.registry,
            &self.opt,
            &state,
            &self.config_toml,
        )
        .map_err(Error::from)
    }

    fn save_adapter(&self, name: &str) -> Result<(), Error> {
        let config = self.config;
        let translation = self.task.kind == TaskKind::Translation;
        let data = DataSettings {
            task: self.task.name.to_string(),
            max_len: config.task.max_len,
            max_target_len: translation.then_some(config.task.max_target_len),
            source_prefix: translation.then(|| source_prefix(config)),
        };
        let options = SaveOptions {
            base_model: Some(config.model.source.clone()),
            base_revision: Some(config.model.revision.clone()),
            data: Some(data),
            ..Default::default()
        };
        save_adapter(
            self.out.join(name),
            &self.loaded.registry,
            &self.adapter,
            &options,
        )
        .map_err(Error::from)
    }

    fn plot(&self) -> Result<(), Error> {
        let path = self.out.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
        write_svg(
            &self.out.join("curves.svg"),
            &Curves::from_metrics_jsonl(&text, &self.headline),
        )
    }

    fn write_metrics(&mut self, value: serde_json::Value) -> Result<(), Error> {
        writeln!(self.metrics_log, "{value}").map_err(Error::io(self.out.join("metrics.jsonl")))
    }

    /// Time in the training loop, summed over interruptions.
    fn train_seconds(&self) -> f64 {
        self.state.train_seconds + self.session_start.elapsed().as_secs_f64()
    }

    /// The run's summary; `results.json` and the last adapter too, unless
    /// it was interrupted.
    fn finish(self, ending: Ending) -> Result<TrainSummary, Error> {
        self.bar.finish_and_clear();
        let summary = self.summary(&ending);
        match ending {
            Ending::Interrupted => Ok(summary),
            Ending::Diverged(error) => {
                // Recorded as finished (a rerun would diverge the same way);
                // the adapters and checkpoint stay as the last good
                // evaluation left them.
                write_results(&self.out, &summary)?;
                Err(error.into())
            }
            Ending::Finished | Ending::OutOfTime => {
                self.save_adapter("adapter-last.safetensors")?;
                self.plot()?;
                write_results(&self.out, &summary)?;
                Ok(summary)
            }
        }
    }

    fn summary(&self, ending: &Ending) -> TrainSummary {
        let o = &self.config.optim;
        let state = &self.state;
        let stopped = match ending {
            Ending::Diverged(_) => StopReason::Nan,
            Ending::Interrupted => StopReason::Interrupted,
            _ if state.step < self.steps.total => StopReason::TimeBudget,
            _ if o
                .max_steps
                .is_some_and(|m| (m as u64) < self.steps.per_epoch * o.epochs as u64) =>
            {
                StopReason::MaxSteps
            }
            _ => StopReason::Completed,
        };
        TrainSummary {
            best: state.best.metrics.clone(),
            best_step: state.best.step,
            steps: state.step,
            trainable: self.loaded.registry.num_trainable(),
            total: base_parameters(&self.loaded),
            wall_seconds: self.started.elapsed().as_secs_f64(),
            train_seconds: self.train_seconds(),
            train_examples_per_second: state.seen as f64 / self.train_seconds(),
            peak_rss_bytes: crate::alloc::peak_rss_bytes(),
            crate_version: env!("CARGO_PKG_VERSION"),
            output_dir: self.out.clone(),
            interrupted: matches!(ending, Ending::Interrupted),
            stopped,
            param_groups: self.groups.clone(),
            selection: if self.data.validation().is_some() {
                "validation-split"
            } else {
                "dev"
            },
            best_validation: state.best.validation.clone(),
        }
    }
}

/// Refuses to start afresh over an earlier run unless told to.
fn check_fresh_start(out: &Path, options: &TrainOptions) -> Result<(), Error> {
    if options.resume || options.overwrite {
        return Ok(());
    }
    if let Some(found) = RUN_FILES.iter().find(|f| out.join(f).exists()) {
        return Err(format!(
            "{} holds an earlier run ({found}): pass --resume to continue it, --overwrite to replace it, or choose another --output-dir",
            out.display()
        ).into());
    }
    Ok(())
}

/// Creates the output folder and writes the resolved config into it.
fn write_config(out: &Path, config: &TrainConfig) -> Result<String, Error> {
    std::fs::create_dir_all(out).map_err(Error::io(out))?;
    let config_toml = toml::to_string(config).map_err(|e| e.to_string())?;
    let path = out.join("config.toml");
    std::fs::write(&path, &config_toml).map_err(Error::io(&path))?;
    Ok(config_toml)
}

/// The base model with the configured adapter, and the folder it came from.
/// The family is read first, so that target presets resolve for it.
fn load_model(
    config: &TrainConfig,
    task: &Task,
    device: &Device,
) -> Result<(PathBuf, AdapterConfig, LoadedModel), Error> {
    let (source_dir, config_json) =
        crate::models::loader::read_config(&config.model.source, Some(&config.model.revision))?;
    let family = crate::models::presets::Family::from_config_json(&config_json)?;
    let gated = config_json.contains("gated-");
    let adapter = adapter_config(config, family, gated)?;
    let factory =
        LinearFactory::new(adapter.clone())?.with_dequantized_base(config.model.dequantize);
    let dtype = config.model.dtype.dtype();
    // A local spec as given (a .gguf file among several stays that file);
    // a hub id as the folder it resolved to.
    let spec = match Path::new(&config.model.source).exists() {
        true => config.model.source.clone(),
        false => source_dir.to_string_lossy().into_owned(),
    };
    let loaded = load_task_model(
        &spec,
        None,
        task.num_labels(),
        factory,
        dtype,
        device,
        config.run.seed,
    )?;
    let (trainable, total) = (loaded.registry.num_trainable(), base_parameters(&loaded));
    eprintln!(
        "{}: {} on {} ({}, {dtype:?}), {trainable} trainable of {total} parameters ({:.4}%)",
        config.model.source,
        adapter.method.name(),
        task.name,
        match device {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
            Device::Metal(_) => "metal",
        },
        100.0 * trainable as f64 / total as f64
    );
    Ok((source_dir, adapter, loaded))
}

/// The parameter count of the checkpoint the model was built from.
fn base_parameters(loaded: &LoadedModel) -> usize {
    let ckpt = &loaded.checkpoint;
    let dense: usize = ckpt.tensors.values().map(|t| t.elem_count()).sum();
    // A tied head held quantized is the embedding table again.
    let tied = matches!(&loaded.model, TaskModel::Llama(m) if m.config().tie_word_embeddings);
    let quantized: usize = ckpt
        .quantized
        .iter()
        .filter(|(name, _)| !(tied && name.as_str() == "lm_head.weight"))
        .map(|(_, q)| q.shape().elem_count())
        .sum();
    dense + quantized
}

/// AdamW over the trainable tensors, with the head and adapter groups
/// logged once.
fn optimizer(
    config: &TrainConfig,
    adapter: &AdapterConfig,
    vars: &[(String, Var)],
) -> Result<(GroupedAdamW, Vec<ParamGroup>), Error> {
    let o = &config.optim;
    let mut opt = GroupedAdamW::new(
        vars.to_vec(),
        AdamWConfig {
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        },
    )?;
    let groups = param_groups(config, adapter, vars);
    for group in &groups {
        opt.set_group(group)?;
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
    Ok((opt, groups))
}

/// Restores the output folder's checkpoint into the model and optimizer,
/// refusing one whose config differs in what it trains.
fn resume(
    out: &Path,
    config_toml: &str,
    loaded: &LoadedModel,
    opt: &mut GroupedAdamW,
) -> Result<RunState, Error> {
    let checkpoint_path = out.join(CHECKPOINT);
    let ckpt = SavedCheckpoint::read(&checkpoint_path).map_err(|e| {
        if checkpoint_path.exists() {
            Error::from(e)
        } else {
            Error::from(format!(
                "--resume: {} holds no checkpoint to resume from",
                out.display()
            ))
        }
    })?;
    let changed = config_differences(&ckpt.config_toml, config_toml, RESUMABLE_KEYS);
    if !changed.is_empty() {
        return Err(format!(
            "--resume: the config differs from the checkpointed run's, so the run would not continue as it began:\n  {}",
            changed.join("\n  ")
        ).into());
    }
    ckpt.restore(&loaded.registry, opt)?;
    let state = ckpt.state;
    truncate_metrics_after(&out.join("metrics.jsonl"), state.step)?;
    eprintln!(
        "resuming at step {} (epoch {}, batch {}) from {}",
        state.step,
        state.epoch,
        state.next_batch,
        checkpoint_path.display()
    );
    Ok(state)
}

/// Removes an earlier run's files. They exist here only with `overwrite`
/// (see [`check_fresh_start`]); all go, so that a replaced run interrupted
/// early never passes for the finished old one.
fn clear_earlier_run(out: &Path) -> Result<(), Error> {
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
        std::fs::remove_file(&path).map_err(Error::io(&path))?;
    }
    Ok(())
}

/// A resumed run appends to its log (trimmed by [`resume`]); a fresh one
/// starts it.
fn open_metrics_log(out: &Path, resume: bool) -> Result<std::fs::File, Error> {
    let path = out.join("metrics.jsonl");
    let file = if resume {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
    } else {
        std::fs::File::create(&path)
    };
    file.map_err(Error::io(path))
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
    crate::io::write_atomic(path, kept.as_bytes()).map_err(Error::from)
}

/// A progress bar on a terminal; hidden otherwise, where log lines stand in.
fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} {msg} ({eta})")
            .expect("static template")
            .progress_chars("=> "),
    )
}

/// The training loss of one batch (dropout on).
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
        (Data::CausalLm { train, .. } | Data::Instructions { train, .. }, TaskModel::Llama(m)) => {
            let items: Vec<&LmExample> = batch.iter().map(|&i| &train[i]).collect();
            let (ids, mask, labels) = collate_lm(&items, pad_id, dev)?;
            m.loss(&ids, Some(&mask), &labels, true)
        }
        _ => candle::bail!("translation needs a T5 model, causal-lm a decoder"),
    }
}

/// A decoder batch's loss and the gradients of `params` with activation
/// checkpointing (`optim.gradient_checkpointing`).
fn checkpointed_batch_backward(
    loaded: &LoadedModel,
    data: &Data,
    batch: &[usize],
    pad_id: u32,
    dev: &Device,
    params: &[&Tensor],
    scale: f64,
) -> candle::Result<(Tensor, GradStore)> {
    match (data, &loaded.model) {
        (Data::CausalLm { train, .. } | Data::Instructions { train, .. }, TaskModel::Llama(m)) => {
            let items: Vec<&LmExample> = batch.iter().map(|&i| &train[i]).collect();
            let (ids, mask, labels) = collate_lm(&items, pad_id, dev)?;
            m.loss_backward_checkpointed(&ids, Some(&mask), &labels, params, scale)
        }
        _ => candle::bail!("optim.gradient_checkpointing is implemented for decoders only"),
    }
}

fn write_results(out: &Path, summary: &TrainSummary) -> Result<(), Error> {
    let json = serde_json::to_string_pretty(summary).map_err(|e| e.to_string())?;
    crate::io::write_atomic(&out.join("results.json"), json.as_bytes()).map_err(Error::from)
}
