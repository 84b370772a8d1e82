//! The training config (TOML): model, task and data, adapter, optimisation
//! and run settings. Unknown keys and out-of-range values are errors naming
//! the key and its line.

use std::path::{Path, PathBuf};

use candle::DType;
use serde::{Deserialize, Serialize};

use super::schedule::ScheduleKind;
use crate::adapter::targets::ALL_LINEAR;
use crate::adapter::{AuxInit, InnerInit};
use crate::data::translation::Direction;
use crate::models::presets::LINEAR_MODULE_NAMES;
use crate::Error;

/// The target presets `adapter.targets` accepts besides module names.
const PRESETS: &[&str] = &["dense", "attention", "dense+attention", "attention+dense"];

fn d_main() -> String {
    "main".into()
}
fn d_len() -> usize {
    128
}
fn d_targets() -> String {
    "dense+attention".into()
}
fn d_r() -> usize {
    8
}
fn d_ab() -> usize {
    64
}
fn d_alpha() -> f64 {
    16.0
}
fn d_seed() -> u64 {
    42
}
fn d_one() -> usize {
    1
}
fn d_batch() -> usize {
    32
}
fn d_lr() -> f64 {
    5e-4
}
fn d_wd() -> f64 {
    0.01
}
fn d_b1() -> f64 {
    0.9
}
fn d_b2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_warmup() -> f64 {
    0.06
}
fn d_clip() -> f64 {
    1.0
}
fn d_out() -> PathBuf {
    PathBuf::from("runs/train")
}
fn d_log() -> usize {
    10
}
fn d_save() -> usize {
    100
}
fn d_true() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A local checkpoint folder or a hub model id.
    pub source: String,
    #[serde(default = "d_main")]
    pub revision: String,
    /// The precision the frozen base is loaded in.
    #[serde(default)]
    pub dtype: WeightDtype,
    /// A GGUF base keeps its linear weights quantized (QLoRA-style: less
    /// memory, 8-bit activations in those matmuls) unless this is true;
    /// then it is dequantized to `dtype`. Other checkpoints ignore it.
    #[serde(default)]
    pub dequantize: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    pub name: String,
    /// A local folder (GLUE's `<TASK>/` with train.tsv and dev.tsv, or the
    /// WMT16 folder: newsdev2016 trains, newstest2016 evaluates), `hub`, or
    /// `auto`: the first local copy in `$LORA_MINI_DATA` or
    /// `../shared/data`, else the hub (see `data::locate`).
    pub data: String,
    #[serde(default)]
    pub max_train_examples: Option<usize>,
    #[serde(default)]
    pub max_dev_examples: Option<usize>,
    #[serde(default = "d_len")]
    pub max_len: usize,
    #[serde(default = "d_len")]
    pub max_target_len: usize,
    /// `en-ro` or `ro-en`.
    #[serde(default)]
    pub direction: Direction,
    /// The source prefix (T5); by default T5's for the direction.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Hold out this fraction of the training examples (seeded by
    /// `run.seed`) as a validation slice that chooses the best step; the
    /// official dev set is then only reported, never used to choose. Unset
    /// (or 0): the dev set chooses, as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_split: Option<f64>,
    /// `causal-lm` only: a JSONL file scored as the dev set (`task.data` is
    /// then the training JSONL). Without it, the validation slice is
    /// reported as the dev set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_data: Option<String>,
    /// Decoders only: pack several training rows into each sequence of up
    /// to `max_len` tokens (best-fit decreasing). Each row keeps its own
    /// attention and positions, so its loss is unchanged; a batch then
    /// holds `batch_size` packed sequences, with less padding to compute.
    /// Validation and dev rows are never packed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub packing: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    pub method: MethodName,
    /// A preset (`dense`, `attention`, `dense+attention`) or a comma list.
    #[serde(default = "d_targets")]
    pub targets: String,
    #[serde(default = "d_r")]
    pub r: usize,
    #[serde(default = "d_ab")]
    pub a: usize,
    #[serde(default = "d_ab")]
    pub b: usize,
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    /// `zero-b` (the default: `ΔW = 0` at step 0, so training starts from
    /// the pretrained model) or `kaiming` (the paper's literal reading: every
    /// inner matrix random, so step 0 already perturbs the model).
    #[serde(default)]
    pub inner_init: InnerInit,
    /// LoRA-Mini's frozen projections: `kaiming` (the paper's), `orthogonal`,
    /// `svd` or `svd-scaled` (from the frozen weight).
    #[serde(default, skip_serializing_if = "is_kaiming")]
    pub aux_init: AuxInit,
    #[serde(default = "d_seed")]
    pub seed: u64,
}

fn is_kaiming(init: &AuxInit) -> bool {
    *init == AuxInit::Kaiming
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    #[serde(default = "d_one")]
    pub epochs: usize,
    /// Stop after this many optimiser steps (overrides epochs when smaller).
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    /// The peak learning rate of the adapter's tensors (all trained tensors
    /// but the head's; under full fine-tuning, the whole model's).
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// The peak learning rate of the task head (`modules_to_save`, e.g.
    /// `classifier`); `lr` when unset. Frozen-projection adapters train
    /// their cores at rates a fresh head cannot take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_lr: Option<f64>,
    /// The head's weight decay; `weight_decay` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_weight_decay: Option<f64>,
    /// LoRA+ (Hayou et al., 2024; PEFT's `loraplus_lr_ratio`): the factor
    /// that starts at zero (LoRA's `lora_B`, LoRA-Mini's `B_in`) trains at
    /// `lr · b_lr_ratio`, its partner at `lr`. Unset: both at `lr`, and
    /// no group of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b_lr_ratio: Option<f64>,
    #[serde(default = "d_b1")]
    pub beta1: f64,
    #[serde(default = "d_b2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    #[serde(default = "d_warmup")]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// Global gradient-norm clipping; 0 disables it.
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// Decoders only: recompute each layer's activations in the backward
    /// pass instead of keeping them all (`nn::checkpoint`), trading one
    /// more forward pass for holding one layer's activations at a time.
    /// Gradients are unchanged.
    #[serde(default, skip_serializing_if = "is_false")]
    pub gradient_checkpointing: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// `auto`, `cpu`, `cuda` or `metal`.
    #[serde(default)]
    pub device: DeviceChoice,
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_out")]
    pub output_dir: PathBuf,
    /// Evaluate every this many steps; 0 evaluates at the end of each epoch.
    #[serde(default)]
    pub eval_every: usize,
    #[serde(default = "d_log")]
    pub log_every: usize,
    /// Write a checkpoint every this many steps (0: only at evaluations, on
    /// interruption and at the end).
    #[serde(default = "d_save")]
    pub save_every: usize,
    /// Stop (and evaluate) once this many minutes have passed.
    #[serde(default)]
    pub time_budget_minutes: Option<f64>,
    #[serde(default = "d_true")]
    pub bucket_by_length: bool,
}

/// `model.dtype`: the precision the frozen base is loaded in (adapters and
/// optimiser state stay f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        from_name(s, "f32, bf16 or f16")
    }
}

/// `adapter.method`: how the linear layers are fine-tuned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MethodName {
    /// Every weight trains.
    Full,
    /// LoRA on the target modules.
    Lora,
    /// LoRA-Mini on the target modules.
    LoraMini,
}

impl MethodName {
    /// The name configs and adapter files use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Lora => "lora",
            Self::LoraMini => "lora-mini",
        }
    }
}

impl std::fmt::Display for MethodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `run.device` (and `--device`): where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA if this build has it and a GPU is present, else Metal, else the
    /// CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        from_name(s, "auto, cpu, cuda or metal")
    }
}

/// A unit enum variant from its serde name, or an error listing `valid`.
fn from_name<T: serde::de::DeserializeOwned>(name: &str, valid: &str) -> Result<T, String> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name))
        .map_err(|_| format!("{name:?} is not {valid}"))
}

/// The whole config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub task: TaskSection,
    pub adapter: AdapterSection,
    pub optim: OptimSection,
    pub run: RunSection,
}

/// The 1-based line of `key` in `[section]` of a TOML text, if written there.
fn line_of(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            current = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        } else if current == section && t.split('=').next().map(str::trim) == Some(key) {
            return Some(i + 1);
        }
    }
    None
}

/// `section.key` of the assignment on 1-based `line`, if it is one.
fn key_at(text: &str, line: usize) -> Option<String> {
    let mut section = String::new();
    for (i, l) in text.lines().enumerate().take(line) {
        let t = l.trim();
        if t.starts_with('[') {
            section = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        } else if i + 1 == line {
            let key = t.split_once('=')?.0.trim();
            return Some(format!("{section}.{key}"));
        }
    }
    None
}

impl TrainConfig {
    /// Reads a config, applies `--set section.key=value` overrides, and
    /// validates it. Errors name the file, the key and its line.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(Error::io(&path))?;
        // Parse once as written, for one-line errors with line and column.
        let here = |e: toml::de::Error| match e.span() {
            Some(span) => {
                let line = text[..span.start].matches('\n').count() + 1;
                let column = span.start - text[..span.start].rfind('\n').map_or(0, |i| i + 1) + 1;
                let key = key_at(&text, line).map_or(String::new(), |k| format!(" ({k})"));
                format!(
                    "{}:{line}:{column}: {}{key}",
                    path.display(),
                    e.message().trim().replace('\n', " ")
                )
            }
            None => format!(
                "{}: {}",
                path.display(),
                e.message().trim().replace('\n', " ")
            ),
        };
        let _: TrainConfig = toml::from_str(&text).map_err(here)?;
        let mut table: toml::Table = text.parse().map_err(here)?;
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| format!("--set {o:?}: expected section.key=value"))?;
            let parts: Vec<&str> = key.trim().split('.').collect();
            let [section, field] = parts[..] else {
                return Err(
                    format!("--set {o:?}: the key must be section.key, e.g. optim.lr").into(),
                );
            };
            let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|t| t.get("v").cloned())
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| format!("--set {o:?}: {section} is not a section"))?
                .insert(field.to_string(), value);
        }
        let config: TrainConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e| format!("{} with --set overrides: {e}", path.display()))?;
        config
            .validate()
            .map_err(|(section, key, message)| Error::Config {
                path: path.to_path_buf(),
                line: line_of(&text, section, key),
                key: format!("{section}.{key}"),
                message,
            })?;
        Ok(config)
    }

    /// Range checks: `(section, key, message)` of the first problem.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str, String)> {
        let within = |section| move |(key, message)| (section, key, message);
        self.task.validate().map_err(within("task"))?;
        self.adapter.validate().map_err(within("adapter"))?;
        self.optim.validate().map_err(within("optim"))?;
        if self.optim.b_lr_ratio.is_some() && self.adapter.method == MethodName::Full {
            return Err((
                "optim",
                "b_lr_ratio",
                "applies to a low-rank adapter (lora, lora-mini), not full".into(),
            ));
        }
        Ok(())
    }
}

/// `(key, message)` of a section's first out-of-range value.
type Problem = (&'static str, String);

impl TaskSection {
    fn validate(&self) -> Result<(), Problem> {
        if crate::data::task(&self.name).is_err() {
            return Err(("name", format!("unknown task {:?}", self.name)));
        }
        if self
            .validation_split
            .is_some_and(|f| !(0.0..0.5).contains(&f))
        {
            return Err((
                "validation_split",
                format!(
                    "{} is not in [0, 0.5)",
                    self.validation_split.unwrap_or_default()
                ),
            ));
        }
        if self.max_len < 2 {
            return Err(("max_len", "must be at least 2".into()));
        }
        Ok(())
    }
}

impl AdapterSection {
    fn validate(&self) -> Result<(), Problem> {
        let a = self;
        if a.method != MethodName::Full && !PRESETS.contains(&a.targets.trim()) {
            let unknown: Vec<&str> = a
                .targets
                .split(',')
                .map(str::trim)
                .filter(|t| *t != ALL_LINEAR)
                .filter(|t| {
                    let last = t.rsplit('.').next().unwrap_or(t);
                    !LINEAR_MODULE_NAMES.contains(&last)
                })
                .collect();
            if !unknown.is_empty() {
                return Err(("targets",
                    format!(
                        "unknown target {unknown:?}: use dense, attention, dense+attention or module names such as {}",
                        LINEAR_MODULE_NAMES.join(", ")
                    ),
                ));
            }
        }
        if a.method != MethodName::LoraMini && a.aux_init != AuxInit::Kaiming {
            return Err((
                "aux_init",
                format!("applies to lora-mini only, not {}", a.method),
            ));
        }
        if a.r == 0 {
            return Err(("r", "must be at least 1".into()));
        }
        if a.method == MethodName::LoraMini && a.a == 0 {
            return Err(("a", "must be at least 1".into()));
        }
        if a.method == MethodName::LoraMini && a.b == 0 {
            return Err(("b", "must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&a.dropout) {
            return Err(("dropout", format!("{} is not in [0, 1)", a.dropout)));
        }
        Ok(())
    }
}

impl OptimSection {
    fn validate(&self) -> Result<(), Problem> {
        let o = self;
        if !o.lr.is_finite() || o.lr <= 0.0 {
            return Err(("lr", format!("{} must be positive", o.lr)));
        }
        if o.head_lr.is_some_and(|lr| !lr.is_finite() || lr <= 0.0) {
            return Err((
                "head_lr",
                format!("{} must be positive", o.head_lr.unwrap_or_default()),
            ));
        }
        if o.b_lr_ratio.is_some_and(|r| !r.is_finite() || r <= 0.0) {
            return Err((
                "b_lr_ratio",
                format!("{} must be positive", o.b_lr_ratio.unwrap_or_default()),
            ));
        }
        if o.head_weight_decay.is_some_and(|wd| wd < 0.0) {
            return Err(("head_weight_decay", "must not be negative".into()));
        }
        if o.batch_size == 0 {
            return Err(("batch_size", "must be at least 1".into()));
        }
        if o.grad_accum == 0 {
            return Err(("grad_accum", "must be at least 1".into()));
        }
        if o.epochs == 0 && o.max_steps.is_none() {
            return Err(("epochs", "must be at least 1 (or set max_steps)".into()));
        }
        if !(0.0..1.0).contains(&o.warmup_ratio) {
            return Err((
                "warmup_ratio",
                format!("{} is not in [0, 1)", o.warmup_ratio),
            ));
        }
        if o.weight_decay < 0.0 {
            return Err(("weight_decay", "must not be negative".into()));
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            return Err((
                if (0.0..1.0).contains(&o.beta1) {
                    "beta2"
                } else {
                    "beta1"
                },
                "must be in [0, 1)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_key_lines_by_section() {
        let text = "[model]\nsource = \"x\"\n[optim]\nlr = 0\n";
        assert_eq!(line_of(text, "optim", "lr"), Some(4));
        assert_eq!(line_of(text, "model", "lr"), None);
    }
}
