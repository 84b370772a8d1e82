//! The adapter file: one `.safetensors` with the trained tensors and the
//! metadata needed to rebuild the adapter.
//!
//! # Format (version 1)
//! * Tensors are named `<full module path>.<role>`, the module path being the
//!   Hugging Face one (`roberta.encoder.layer.0.attention.self.query`). Roles:
//!   `lora_mini_A_in`, `lora_mini_B_in` (LoRA-Mini), `lora_A`, `lora_B` (LoRA),
//!   `weight`, `bias` (fully trained layers), and, only when saved with
//!   [`SaveOptions::store_aux`], `lora_mini_A_aux`, `lora_mini_B_aux`.
//!   Trainable tensors outside linear layers keep their own tensor name.
//! * The safetensors `__metadata__` holds string keys:
//!   `format` (`lora-mini-adapter`), `format_version` (`1`), `method`, `r`,
//!   `a`, `b`, `alpha`, `scaling`, `seed`, `targets` (a JSON list),
//!   `modules_to_save`, `base_model`, `base_revision`, `dtype`,
//!   `crate_version`, `aux_checksum`, `aux_stored`, `aux_init` (LoRA-Mini),
//!   `base_weights` (a JSON map from module path to a hash of its frozen
//!   weight, for projections made from that weight's SVD), `module_shapes`
//!   (each adapted module's `[d_out, d_in]`, so that an adapter loaded onto
//!   another model names the first module that differs), optionally `task`,
//!   `max_len`, `max_target_len` and `source_prefix` (how the training data
//!   was read; see [`DataSettings`]), and `config`: the whole
//!   [`AdapterConfig`] as JSON, which is what loading reads.
//!
//! The frozen auxiliary matrices are not stored by default: they are
//! regenerated from the seed and the module paths. `aux_checksum` is a hash of
//! the regenerated values; loading refuses a file whose checksum does not
//! reproduce, since its inner matrices would be meaningless.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle::{DType, Device, Result, Tensor};

use super::config::AdapterConfig;
use super::config::Method;
use super::registry::AdapterRegistry;

pub const FORMAT: &str = "lora-mini-adapter";
pub const FORMAT_VERSION: u32 = 1;

/// Options of [`save_adapter`].
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    /// Also store LoRA-Mini's frozen `A_aux` and `B_aux` (bigger files, but
    /// readable without this crate's generator).
    pub store_aux: bool,
    /// Store trainable tensors in this dtype (e.g. `BF16` for the smallest
    /// files); by default, their own.
    pub dtype: Option<DType>,
    /// Hub id or path of the base model.
    pub base_model: Option<String>,
    pub base_revision: Option<String>,
    /// How the training data was read, so that evaluation reads data the
    /// same way by default: the task name, `max_len`, and for translation
    /// the target length and source prefix.
    pub data: Option<DataSettings>,
}

/// How a run read its data (stored as the metadata keys `task`, `max_len`,
/// `max_target_len` and `source_prefix`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataSettings {
    pub task: String,
    pub max_len: usize,
    pub max_target_len: Option<usize>,
    pub source_prefix: Option<String>,
}

/// Writes the registry's trainable tensors and metadata to `path`, atomically
/// (a crash mid-write leaves any earlier file intact).
pub fn save_adapter(
    path: impl AsRef<Path>,
    registry: &AdapterRegistry,
    config: &AdapterConfig,
    options: &SaveOptions,
) -> Result<()> {
    check_config_matches(registry, config)?;
    let mut tensors = BTreeMap::new();
    let mut dtype = None;
    for (name, var) in registry.trainable() {
        let t = match options.dtype {
            Some(dt) => var.as_tensor().to_dtype(dt)?,
            None => var.as_tensor().clone(),
        };
        dtype.get_or_insert(t.dtype());
        tensors.insert(name, t);
    }
    if options.store_aux {
        for (module, layer) in registry.modules() {
            for (role, t) in layer.frozen_aux() {
                tensors.insert(format!("{module}.{role}"), t.clone());
            }
        }
    }
    let mut meta: HashMap<String, String> = HashMap::new();
    let mut put = |k: &str, v: String| {
        meta.insert(k.to_string(), v);
    };
    put("format", FORMAT.to_string());
    put("format_version", FORMAT_VERSION.to_string());
    put("method", config.method.name().to_string());
    match &config.method {
        Method::LoraMini(c) => {
            put("r", c.r.to_string());
            put("a", c.a.to_string());
            put("b", c.b.to_string());
            put("alpha", c.alpha.to_string());
            put("seed", c.seed.to_string());
            put("aux_init", c.aux_init.name().to_string());
        }
        Method::Lora(c) => {
            put("r", c.r.to_string());
            put("alpha", c.alpha.to_string());
            put("seed", c.seed.to_string());
        }
        Method::Full | Method::Frozen => {}
    }
    if let Some(s) = config.method.scaling() {
        put("scaling", s.to_string());
    }
    put("targets", json(&config.targets)?);
    put("modules_to_save", json(&config.modules_to_save)?);
    put("base_model", options.base_model.clone().unwrap_or_default());
    put(
        "base_revision",
        options.base_revision.clone().unwrap_or_default(),
    );
    put(
        "dtype",
        dtype.map(|d| d.as_str().to_string()).unwrap_or_default(),
    );
    put("crate_version", env!("CARGO_PKG_VERSION").to_string());
    put("aux_checksum", registry.aux_checksum()?.unwrap_or_default());
    put("aux_stored", options.store_aux.to_string());
    if let Some(d) = &options.data {
        put("task", d.task.clone());
        put("max_len", d.max_len.to_string());
        if let Some(n) = d.max_target_len {
            put("max_target_len", n.to_string());
        }
        if let Some(p) = &d.source_prefix {
            put("source_prefix", p.clone());
        }
    }
    let shapes: BTreeMap<&str, (usize, usize)> = registry
        .modules()
        .map(|(m, layer)| Ok((m, layer.dims()?)))
        .collect::<Result<_>>()?;
    put("module_shapes", json(&shapes)?);
    let base_weights = registry.base_weight_hashes()?;
    if !base_weights.is_empty() {
        put("base_weights", json(&base_weights)?);
    }
    put("config", json(config)?);
    crate::io::write_safetensors_atomic(path.as_ref(), &tensors, meta)
}

/// The config is what loading rebuilds the model from, so it must give
/// every registered layer the method it has (a hand-built registry saved
/// with empty or wrong `targets` would otherwise write a file that never
/// loads back).
fn check_config_matches(registry: &AdapterRegistry, config: &AdapterConfig) -> Result<()> {
    config.validate()?;
    for (module, layer) in registry.modules() {
        let expected = config.method_for(module);
        if expected.name() != layer.method_name() {
            candle::bail!(
                "module {module} is {} in the registry, but the adapter config gives it {} \
                 (targets {:?}, modules_to_save {:?}): the file would not load back",
                layer.method_name(),
                expected.name(),
                config.targets,
                config.modules_to_save
            );
        }
    }
    Ok(())
}

fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(candle::Error::wrap)
}

/// An adapter file read from disk.
#[derive(Clone, Debug)]
pub struct AdapterFile {
    pub path: PathBuf,
    pub config: AdapterConfig,
    /// Every `__metadata__` entry, as stored.
    pub metadata: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, Tensor>,
}

impl AdapterFile {
    /// Reads and checks the header of an adapter file. Build the model with
    /// [`AdapterFile::config`], then call [`AdapterFile::apply`].
    pub fn read(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let ctx =
            |e: &dyn std::fmt::Display| candle::Error::msg(format!("{}: {e}", path.display()));
        let bytes = std::fs::read(&path).map_err(|e| ctx(&e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| ctx(&e))?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        match metadata.get("format").map(String::as_str) {
            Some(FORMAT) => {}
            other => {
                return Err(ctx(&format!(
                    "not a lora-mini adapter (metadata format is {other:?}; a PEFT adapter folder is read with PeftAdapter::read)"
                )))
            }
        }
        let version: u32 = metadata
            .get("format_version")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ctx(&"missing or invalid format_version"))?;
        if version > FORMAT_VERSION {
            return Err(ctx(&format!(
                "format_version {version} is newer than this lora-mini supports ({FORMAT_VERSION})"
            )));
        }
        let config: AdapterConfig = serde_json::from_str(
            metadata
                .get("config")
                .ok_or_else(|| ctx(&"missing the `config` metadata entry"))?,
        )
        .map_err(|e| ctx(&format!("invalid `config` metadata: {e}")))?;
        let tensors = candle::safetensors::load_buffer(&bytes, device)
            .map_err(|e| ctx(&crate::error::message(&e)))?
            .into_iter()
            .collect();
        Ok(Self {
            path,
            config,
            metadata,
            tensors,
        })
    }

    /// Loads the trained tensors into the registry's `Var`s (casting to each
    /// `Var`'s dtype). Refuses, naming the module, a missing tensor, a wrong
    /// shape, a tensor for a module the model does not adapt, and frozen
    /// matrices that do not reproduce.
    pub fn apply(&self, registry: &AdapterRegistry) -> Result<()> {
        let file = self.path.display();
        self.check_module_shapes(registry)?;
        self.check_base_weights(registry)?;
        let expected = self.metadata.get("aux_checksum").filter(|c| !c.is_empty());
        let actual = registry.aux_checksum()?;
        if expected != actual.as_ref() {
            candle::bail!(
                "{file}: the frozen auxiliary matrices do not reproduce (file checksum {}, regenerated {}): \
                 the model's adapted modules, the seed, or the generator differ from the ones the adapter was trained with{}",
                expected.map_or("none", |s| s.as_str()),
                actual.as_deref().unwrap_or("none"),
                self.trained_on()
            );
        }
        let trainable = registry.trainable();
        let mut known: std::collections::BTreeSet<String> =
            trainable.iter().map(|(n, _)| n.clone()).collect();
        for (module, layer) in registry.modules() {
            for (role, aux) in layer.frozen_aux() {
                let name = format!("{module}.{role}");
                if let Some(stored) = self.tensors.get(&name) {
                    let same = stored.dims() == aux.dims()
                        && stored
                            .to_dtype(DType::F32)?
                            .flatten_all()?
                            .to_vec1::<f32>()?
                            == aux.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    if !same {
                        candle::bail!("{file}: stored {role} of module {module} differs from the regenerated one");
                    }
                }
                known.insert(name);
            }
        }
        if let Some(extra) = self.tensors.keys().find(|n| !known.contains(*n)) {
            candle::bail!(
                "{file}: tensor {extra} is for module {}, which this model does not have or does not adapt",
                module_of(extra)
            );
        }
        for (name, var) in &trainable {
            let Some(t) = self.tensors.get(name) else {
                candle::bail!("{file}: no tensor {name} for module {}", module_of(name));
            };
            if t.dims() != var.dims() {
                candle::bail!(
                    "{file}: tensor {name} of module {} has shape {:?}, the model expects {:?}",
                    module_of(name),
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

impl AdapterFile {
    /// ` (the adapter was trained on M)`, when the file records its base model.
    fn trained_on(&self) -> String {
        match self.metadata.get("base_model").filter(|m| !m.is_empty()) {
            Some(m) => format!(" (the adapter was trained on {m})"),
            None => String::new(),
        }
    }

    /// Refuses, naming the first mismatch, an adapter whose modules the
    /// model does not adapt or whose base weights have other shapes (an
    /// adapter trained on another model). Files before `module_shapes` was
    /// recorded skip this check.
    fn check_module_shapes(&self, registry: &AdapterRegistry) -> Result<()> {
        let Some(text) = self.metadata.get("module_shapes") else {
            return Ok(());
        };
        let file = self.path.display();
        let recorded: BTreeMap<String, (usize, usize)> =
            serde_json::from_str(text).map_err(|e| {
                candle::Error::msg(format!("{file}: invalid `module_shapes` metadata: {e}"))
            })?;
        for (module, (d_out, d_in)) in &recorded {
            let Some(layer) = registry.module(module) else {
                candle::bail!(
                    "{file}: module {module} of the adapter is not adapted in this model{}",
                    self.trained_on()
                );
            };
            let (found_out, found_in) = layer.dims()?;
            if (found_out, found_in) != (*d_out, *d_in) {
                candle::bail!(
                    "{file}: module {module}: the adapter expects a base weight of shape [{d_out}, {d_in}], this model's is [{found_out}, {found_in}]{}",
                    self.trained_on()
                );
            }
        }
        Ok(())
    }

    /// The data settings the adapter was trained with, when recorded.
    pub fn data_settings(&self) -> Option<DataSettings> {
        let m = &self.metadata;
        Some(DataSettings {
            task: m.get("task").filter(|t| !t.is_empty())?.clone(),
            max_len: m.get("max_len")?.parse().ok()?,
            max_target_len: m.get("max_target_len").and_then(|v| v.parse().ok()),
            source_prefix: m.get("source_prefix").cloned(),
        })
    }

    /// For projections made from the base weights' SVD: refuses, naming the
    /// first module, a base weight that differs from the one trained on.
    fn check_base_weights(&self, registry: &AdapterRegistry) -> Result<()> {
        let Some(text) = self.metadata.get("base_weights") else {
            return Ok(());
        };
        let file = self.path.display();
        let recorded: BTreeMap<String, String> = serde_json::from_str(text).map_err(|e| {
            candle::Error::msg(format!("{file}: invalid `base_weights` metadata: {e}"))
        })?;
        let actual = registry.base_weight_hashes()?;
        for (module, hash) in &recorded {
            match actual.get(module) {
                Some(h) if h == hash => {}
                Some(_) => candle::bail!(
                    "{file}: the base weight of module {module} differs from the one the adapter was trained on \
                     (its frozen projections come from that weight's SVD): load it onto the same base model"
                ),
                None => candle::bail!(
                    "{file}: module {module} has no LoRA-Mini layer with SVD projections in this model"
                ),
            }
        }
        Ok(())
    }
}

pub(crate) fn module_of(tensor_name: &str) -> &str {
    tensor_name.rsplit_once('.').map_or(tensor_name, |(m, _)| m)
}
