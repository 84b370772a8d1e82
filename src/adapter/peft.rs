//! Reading and writing PEFT LoRA adapters.
//!
//! # The format
//! A PEFT LoRA adapter is a folder with
//! * `adapter_config.json`: `peft_type: "LORA"`, `task_type`, `r`,
//!   `lora_alpha`, `use_rslora`, `target_modules`, `modules_to_save`, ...;
//! * `adapter_model.safetensors`: for each adapted module at path `P` of the
//!   transformers model, `base_model.model.P.lora_A.weight` (`r x d_in`) and
//!   `base_model.model.P.lora_B.weight` (`d_out x r`); for each module `M` in
//!   `modules_to_save`, its full tensors as `base_model.model.M.<tensor>`.
//!
//! PEFT computes `ΔW = (lora_alpha / r) · B · A` (or `/ sqrt(r)` with rsLoRA).
//!
//! # Export
//! LoRA-Mini's update `ΔW = s · (B_aux·B_in) · (A_in·A_aux)` is exactly a rank-`r`
//! LoRA, so [`export_peft`] writes `lora_A = A_in·A_aux`, `lora_B = B_aux·B_in`
//! and `lora_alpha = s·r` with `use_rslora: false`, making PEFT's scaling equal
//! ours. `target_modules` lists the exported modules' full paths, so PEFT
//! adapts exactly those. A module under `modules_to_save` is written in full,
//! with any low-rank update folded into its weight (RoBERTa's
//! `classifier.dense` under the `dense` preset, for instance).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::LoraConfig;
use super::lora::LoraLinear;
use super::registry::AdapterRegistry;
use super::targets::is_within;

const PREFIX: &str = "base_model.model.";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The fields of PEFT's `adapter_config.json` that this crate uses. Unknown
/// fields are ignored, since PEFT adds new ones with every release.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeftLoraConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    /// A list of names, or a regular expression string.
    #[serde(default)]
    pub target_modules: Value,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
}

/// A PEFT LoRA adapter read from disk.
#[derive(Clone, Debug)]
pub struct PeftAdapter {
    pub config: PeftLoraConfig,
    /// Module path (without `base_model.model.`) to `(lora_A, lora_B)`.
    lora: BTreeMap<String, (Tensor, Tensor)>,
    /// Full tensors of `modules_to_save`, by tensor name.
    saved: BTreeMap<String, Tensor>,
}

impl PeftAdapter {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir`.
    pub fn read(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| candle::Error::msg(format!("reading {}: {e}", config_path.display())))?;
        let config: PeftLoraConfig = serde_json::from_str(&text)
            .map_err(|e| candle::Error::msg(format!("{}: {e}", config_path.display())))?;
        if config.peft_type != "LORA" {
            candle::bail!(
                "{}: peft_type is {:?}, only LORA is supported",
                config_path.display(),
                config.peft_type
            );
        }
        if config.use_dora || config.fan_in_fan_out {
            candle::bail!(
                "{}: DoRA and fan_in_fan_out adapters are not supported",
                config_path.display()
            );
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.exists() {
            candle::bail!(
                "{} not found (a PyTorch adapter_model.bin must be converted to safetensors first)",
                weights_path.display()
            );
        }
        let tensors = candle::safetensors::load(&weights_path, device).map_err(|e| {
            candle::Error::msg(format!(
                "{}: {}",
                weights_path.display(),
                crate::error::message(&e)
            ))
        })?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        let mut saved = BTreeMap::new();
        for (name, tensor) in tensors {
            let Some(rest) = name.strip_prefix(PREFIX) else {
                candle::bail!(
                    "{}: tensor {name} does not start with {PREFIX}",
                    weights_path.display()
                );
            };
            if let Some(path) = rest.strip_suffix(".lora_A.weight") {
                halves.entry(path.to_string()).or_default().0 = Some(tensor);
            } else if let Some(path) = rest.strip_suffix(".lora_B.weight") {
                halves.entry(path.to_string()).or_default().1 = Some(tensor);
            } else {
                saved.insert(rest.to_string(), tensor);
            }
        }
        let mut lora = BTreeMap::new();
        for (path, pair) in halves {
            match pair {
                (Some(a), Some(b)) => {
                    let (r_a, _) = a.dims2()?;
                    let (_, r_b) = b.dims2()?;
                    if r_a != r_b {
                        candle::bail!(
                            "{}: module {path} has lora_A rank {r_a} but lora_B rank {r_b}",
                            weights_path.display()
                        );
                    }
                    lora.insert(path, (a, b));
                }
                _ => candle::bail!(
                    "{}: module {path} lacks lora_A or lora_B",
                    weights_path.display()
                ),
            }
        }
        Ok(Self {
            config,
            lora,
            saved,
        })
    }

    /// The adapted module paths, sorted.
    pub fn lora_modules(&self) -> impl Iterator<Item = &String> {
        self.lora.keys()
    }

    /// `(lora_A, lora_B)` of a module.
    pub fn factors(&self, path: &str) -> Option<&(Tensor, Tensor)> {
        self.lora.get(path)
    }

    pub fn is_saved_module(&self, path: &str) -> bool {
        self.config
            .modules_to_save
            .iter()
            .flatten()
            .any(|m| is_within(path, m))
    }

    /// A saved tensor `<path>.<role>`, looked up with PEFT's own key layout
    /// and with the `modules_to_save.default.` infix some versions write.
    pub fn saved_tensor(&self, path: &str, role: &str) -> Result<Option<Tensor>> {
        if let Some(t) = self.saved.get(&format!("{path}.{role}")) {
            return Ok(Some(t.clone()));
        }
        for m in self.config.modules_to_save.iter().flatten() {
            if let Some(pos) = path.find(m.as_str()) {
                let (head, tail) = path.split_at(pos + m.len());
                let key = format!("{head}.modules_to_save.default{tail}.{role}");
                if let Some(t) = self.saved.get(&key) {
                    return Ok(Some(t.clone()));
                }
            }
        }
        Ok(None)
    }

    /// PEFT's scaling for one module, honouring `rank_pattern` and `alpha_pattern`.
    pub fn scaling_for(&self, path: &str) -> Option<f64> {
        let (a, _) = self.lora.get(path)?;
        let r = a.dims()[0];
        let alpha =
            pattern_value(&self.config.alpha_pattern, path).unwrap_or(self.config.lora_alpha);
        Some(super::config::scaling(alpha, r, self.config.use_rslora))
    }

    /// The LoRA config of module `path` in this crate's terms.
    pub fn lora_config(&self, path: &str) -> Option<LoraConfig> {
        let (a, _) = self.lora.get(path)?;
        let r = a.dims()[0];
        Some(LoraConfig {
            alpha: pattern_value(&self.config.alpha_pattern, path)
                .unwrap_or(self.config.lora_alpha),
            dropout: self.config.lora_dropout,
            use_rslora: self.config.use_rslora,
            ..LoraConfig::new(r)
        })
    }

    /// A [`LoraLinear`] around `base` carrying this adapter's update for
    /// `path`, or `None` when the adapter does not touch `path`. A shape that
    /// does not fit `base` is an error naming the module.
    pub fn lora_linear(
        &self,
        path: &str,
        base: impl Into<super::BaseLinear>,
    ) -> Result<Option<LoraLinear>> {
        let (Some((a, b)), Some(config)) = (self.lora.get(path), self.lora_config(path)) else {
            return Ok(None);
        };
        LoraLinear::from_factors(base, a, b, &config, path).map(Some)
    }
}

fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, path: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(key, _)| super::targets::matches_target(path, key))
        .map(|(_, v)| *v)
}

/// What [`export_peft`] writes besides the tensors.
#[derive(Clone, Debug)]
pub struct PeftExportOptions {
    /// PEFT's `task_type`: `SEQ_CLS`, `SEQ_2_SEQ_LM`, `FEATURE_EXTRACTION`, ...
    pub task_type: String,
    pub base_model: Option<String>,
    pub revision: Option<String>,
    /// Modules written in full (a trained task head, e.g. `classifier`).
    pub modules_to_save: Vec<String>,
    /// Dropout recorded in the config (PEFT uses it if training resumes).
    pub lora_dropout: f64,
}

impl Default for PeftExportOptions {
    fn default() -> Self {
        Self {
            task_type: "SEQ_CLS".to_string(),
            base_model: None,
            revision: None,
            modules_to_save: Vec::new(),
            lora_dropout: 0.0,
        }
    }
}

/// Writes the registry's adapters as a standard PEFT LoRA adapter in `dir`.
/// See the module docs for the mapping. Fails, naming the module, when a
/// fully trained tensor is not under `modules_to_save` (PEFT LoRA cannot
/// carry it) or when modules disagree on rank or scaling.
pub fn export_peft(
    registry: &AdapterRegistry,
    options: &PeftExportOptions,
    dir: impl AsRef<Path>,
) -> Result<()> {
    let dir = dir.as_ref();
    let saved = |path: &str| options.modules_to_save.iter().any(|m| is_within(path, m));
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut targets = Vec::new();
    let mut rank_scaling: Option<(usize, f64, String)> = None;
    for (path, layer) in registry.modules() {
        if saved(path) {
            tensors.insert(format!("{PREFIX}{path}.weight"), layer.merged_weight()?);
            if let Some(b) = layer.bias() {
                tensors.insert(format!("{PREFIX}{path}.bias"), b.clone());
            }
            continue;
        }
        let Some(update) = layer.low_rank()? else {
            candle::bail!(
                "module {path} is fully trained but not under modules_to_save {:?}: a PEFT LoRA adapter cannot carry it",
                options.modules_to_save
            );
        };
        let r = update.rank();
        match &rank_scaling {
            None => rank_scaling = Some((r, update.scaling, path.to_string())),
            Some((r0, s0, first)) if *r0 != r || *s0 != update.scaling => candle::bail!(
                "module {path} has r={r}, scaling={} but {first} has r={r0}, scaling={s0}: one PEFT config cannot hold both",
                update.scaling
            ),
            Some(_) => {}
        }
        tensors.insert(format!("{PREFIX}{path}.lora_A.weight"), update.a.clone());
        tensors.insert(format!("{PREFIX}{path}.lora_B.weight"), update.b.clone());
        targets.push(path.to_string());
    }
    for (name, var) in registry.extra_vars() {
        if !saved(name) {
            candle::bail!(
                "tensor {name} is fully trained but not under modules_to_save {:?}: a PEFT LoRA adapter cannot carry it",
                options.modules_to_save
            );
        }
        tensors.insert(format!("{PREFIX}{name}"), var.as_tensor().clone());
    }
    let (r, scaling) = rank_scaling.map(|(r, s, _)| (r, s)).unwrap_or((8, 1.0));
    let lora_alpha = scaling * r as f64;
    let alpha_json = if lora_alpha.fract() == 0.0 && lora_alpha.abs() < 1e15 {
        Value::from(lora_alpha as i64)
    } else {
        Value::from(lora_alpha)
    };
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": options.task_type,
        "r": r,
        "lora_alpha": alpha_json,
        "lora_dropout": options.lora_dropout,
        "use_rslora": false,
        "use_dora": false,
        "fan_in_fan_out": false,
        "bias": "none",
        "init_lora_weights": true,
        "inference_mode": true,
        "target_modules": targets,
        "modules_to_save": if options.modules_to_save.is_empty() { Value::Null } else { Value::from(options.modules_to_save.clone()) },
        "base_model_name_or_path": options.base_model,
        "revision": options.revision,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "layers_pattern": null,
        "auto_mapping": null,
    });
    std::fs::create_dir_all(dir)
        .map_err(|e| candle::Error::msg(format!("creating {}: {e}", dir.display())))?;
    let tensors: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    crate::io::write_safetensors_atomic(&dir.join(WEIGHTS_FILE), &tensors, metadata)?;
    let json = serde_json::to_string_pretty(&config).map_err(candle::Error::wrap)?;
    crate::io::write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
}
