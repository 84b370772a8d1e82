//! Reading Hugging Face checkpoints from a local folder or the hub.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle::quantized::QTensor;
use candle::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// A checkpoint folder's `config.json` and weights.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config_json: String,
    pub tensors: HashMap<String, Tensor>,
    /// The linear weights of a GGUF checkpoint read quantized, as stored
    /// (for [`LinearFactory::with_quantized_weights`](crate::adapter::LinearFactory::with_quantized_weights));
    /// empty otherwise.
    pub quantized: HashMap<String, Arc<QTensor>>,
}

/// The local folder of a checkpoint named by `spec`: `spec` itself when it is
/// a folder, otherwise a hub model id whose `config.json`, weights
/// (`model.safetensors`, or `pytorch_model.bin`) and `tokenizer.json` (when
/// present) are fetched through the hub cache. `HF_HOME` and `HF_HUB_OFFLINE`
/// are honoured.
///
/// A hub id is first looked for in [`model_roots`] (on the main revision).
/// A `spec` that reads as a path ([`looks_like_path`]) is never sent to the
/// hub: a missing folder is reported as such.
pub fn resolve_checkpoint_dir(spec: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        candle::bail!("{spec} is a file; the model must be a checkpoint folder (holding config.json) or a hub id");
    }
    if looks_like_path(spec) {
        candle::bail!("no such directory: {spec}");
    }
    if matches!(revision, None | Some("main")) {
        if let Some(local) = local_copy(spec, model_roots()) {
            eprintln!("{spec}: using the local copy {}", local.display());
            return Ok(local);
        }
    }
    fetch_from_hub(spec, revision)
}

/// Folders searched for a local copy of a hub model before the hub (and
/// its cache), in order: those in the `LORA_MINI_MODELS` variable
/// (`:`-separated), then `../shared/models`, where this project's checkouts
/// keep their bundled models. A copy is `<folder>/<name>` for the hub id
/// `owner/<name>`, holding a `config.json`.
pub fn model_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = std::env::var_os("LORA_MINI_MODELS")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    roots.push(PathBuf::from("../shared/models"));
    roots
}

/// The first of `roots` holding the model `id` names.
fn local_copy(id: &str, roots: Vec<PathBuf>) -> Option<PathBuf> {
    let name = id.rsplit('/').next()?;
    roots
        .into_iter()
        .map(|root| root.join(name))
        .find(|dir| dir.join("config.json").is_file())
}

/// Whether a model spec names a local path rather than a hub id
/// (`owner/name` or `name`): it starts with `/`, `./`, `../` or `~`, or has
/// more than one `/`, or names something that exists.
pub fn looks_like_path(spec: &str) -> bool {
    spec.starts_with('/')
        || spec.starts_with("./")
        || spec.starts_with("../")
        || spec.starts_with('~')
        || spec == "."
        || spec == ".."
        || spec.matches('/').count() > 1
        || Path::new(spec).exists()
}

#[cfg(feature = "hub")]
fn fetch_from_hub(repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    use crate::hub::{fetch, HubOptions};
    use hf_hub::RepoType;
    let options = HubOptions::from_env();
    let config = fetch(&options, repo, RepoType::Model, revision, "config.json")?;
    if fetch(
        &options,
        repo,
        RepoType::Model,
        revision,
        "model.safetensors",
    )
    .is_err()
    {
        fetch(
            &options,
            repo,
            RepoType::Model,
            revision,
            "pytorch_model.bin",
        )
        .map_err(|e| {
            candle::Error::msg(format!(
                "{repo}: neither model.safetensors nor pytorch_model.bin: {}",
                crate::error::message(&e)
            ))
        })?;
    }
    // Optional: not every checkpoint ships a fast tokenizer.
    let _ = fetch(&options, repo, RepoType::Model, revision, "tokenizer.json");
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

#[cfg(not(feature = "hub"))]
fn fetch_from_hub(repo: &str, _revision: Option<&str>) -> Result<PathBuf> {
    candle::bail!("{repo} is not a folder, and this build lacks the `hub` feature to download it")
}

impl Checkpoint {
    /// Reads `config.json` and `model.safetensors` (or `pytorch_model.bin`),
    /// dropping buffers that are not parameters (`*.position_ids`). A
    /// non-float parameter is an error naming it.
    pub fn read_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let config_json = std::fs::read_to_string(&config_path)
            .map_err(|e| candle::Error::msg(format!("reading {}: {e}", config_path.display())))?;
        let safetensors = dir.join("model.safetensors");
        let bin = dir.join("pytorch_model.bin");
        let index = dir.join("model.safetensors.index.json");
        let (file, raw): (PathBuf, Vec<(String, Tensor)>) =
            if !safetensors.exists() && index.exists() {
                (index.clone(), read_shards(&index, device)?)
            } else if safetensors.exists() {
                let t = candle::safetensors::load(&safetensors, device).map_err(|e| {
                    candle::Error::msg(format!(
                        "{}: {}",
                        safetensors.display(),
                        crate::error::message(&e)
                    ))
                })?;
                (safetensors, t.into_iter().collect())
            } else if bin.exists() {
                let t = candle::pickle::read_all(&bin).map_err(|e| {
                    candle::Error::msg(format!("{}: {}", bin.display(), crate::error::message(&e)))
                })?;
                let t = t
                    .into_iter()
                    .map(|(n, t)| Ok((n, t.to_device(device)?)))
                    .collect::<Result<_>>()?;
                (bin, t)
            } else {
                candle::bail!(
                "{} holds neither model.safetensors (or its sharded index) nor pytorch_model.bin",
                dir.display()
            );
            };
        let mut tensors = HashMap::new();
        for (name, tensor) in raw {
            if name.ends_with("position_ids") {
                continue;
            }
            if !tensor.dtype().is_float() {
                candle::bail!(
                    "{}: tensor {name} has dtype {:?}, expected a float type",
                    file.display(),
                    tensor.dtype()
                );
            }
            tensors.insert(name, tensor);
        }
        Ok(Self {
            dir,
            config_json,
            tensors,
            quantized: HashMap::new(),
        })
    }

    /// A llama.cpp GGUF file as a checkpoint, under Hugging Face names and
    /// row order, with the config its metadata describes. The decoder
    /// layers' linear weights stay quantized in [`Checkpoint::quantized`]
    /// unless `dequantize`; everything else (and then everything) is
    /// dequantized to f32. `dir` is the file's folder (for a
    /// `tokenizer.json` beside it).
    pub fn read_gguf(file: &Path, device: &Device, dequantize: bool) -> Result<Self> {
        let gguf = super::gguf::GgufFile::open(file)?;
        let config = gguf.config()?;
        let config_json = serde_json::to_string_pretty(&config).map_err(candle::Error::wrap)?;
        let (tensors, quantized) = if dequantize {
            (gguf.dequantized(device)?, HashMap::new())
        } else {
            gguf.quantized_base(device)?
        };
        Ok(Self {
            dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
            config_json,
            tensors,
            quantized,
        })
    }

    /// The checkpoint `spec` names: a `.gguf` file, a folder holding one
    /// (and no safetensors or PyTorch weights; its linear weights stay
    /// quantized unless `dequantize_gguf`), or a Hugging Face folder or hub
    /// id (see [`resolve_checkpoint_dir`]).
    pub fn read(
        spec: &str,
        revision: Option<&str>,
        device: &Device,
        dequantize_gguf: bool,
    ) -> Result<Self> {
        if let Some(file) = gguf_file_of(spec)? {
            return Self::read_gguf(&file, device, dequantize_gguf);
        }
        Self::read_dir(resolve_checkpoint_dir(spec, revision)?, device)
    }

    /// Puts `prefix.` in front of every tensor whose name starts with one of
    /// `roots` (e.g. a bare `BertModel` checkpoint read into a task model that
    /// expects `bert.embeddings...`). Names already prefixed are left alone.
    pub fn with_prefix(mut self, prefix: &str, roots: &[&str]) -> Self {
        self.tensors = self
            .tensors
            .into_iter()
            .map(|(name, t)| {
                let bare = roots
                    .iter()
                    .any(|r| name == *r || name.starts_with(&format!("{r}.")));
                (
                    if bare {
                        format!("{prefix}.{name}")
                    } else {
                        name
                    },
                    t,
                )
            })
            .collect();
        self
    }

    pub fn has_tensor_under(&self, prefix: &str) -> bool {
        let dotted = format!("{prefix}.");
        self.tensors.keys().any(|k| k.starts_with(&dotted))
    }

    /// A `VarBuilder` over the weights, casting to `dtype`. Missing tensors and
    /// wrong shapes are errors naming the tensor.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), dtype, device)
    }

    /// Adds a linear layer the checkpoint lacks (a new task head), initialised
    /// as transformers does: weights `N(0, std²)` from the seeded generator,
    /// zero bias. Returns whether it was missing (the caller knows whether
    /// training or an adapter will replace it, and warns when not).
    pub fn init_missing_linear(
        &mut self,
        path: &str,
        d_in: usize,
        d_out: usize,
        std: f64,
        seed: u64,
    ) -> Result<bool> {
        let weight_name = format!("{path}.weight");
        if self.tensors.contains_key(&weight_name) {
            return Ok(false);
        }
        let device = self
            .tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        let values = crate::adapter::init::normal_values(seed, &weight_name, d_in * d_out, std);
        self.tensors.insert(
            weight_name,
            Tensor::from_vec(values, (d_out, d_in), &device)?,
        );
        self.tensors.insert(
            format!("{path}.bias"),
            Tensor::zeros(d_out, DType::F32, &device)?,
        );
        Ok(true)
    }
}

/// The `.gguf` file a local `spec` names: the file itself, or the one in a
/// folder that holds no Hugging Face weights (safetensors, single or
/// sharded, or `pytorch_model.bin`). `None` for anything else.
pub fn gguf_file_of(spec: &str) -> Result<Option<PathBuf>> {
    let path = Path::new(spec);
    let hf_weights = [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
    ];
    let has_hf = path.is_dir() && hf_weights.iter().any(|w| path.join(w).exists());
    if !path.exists() || has_hf {
        return Ok(None);
    }
    super::gguf::find_gguf(path)
}

/// The folder and `config.json` text of the checkpoint `spec` names,
/// without reading its weights: for a GGUF file, the config its metadata
/// describes.
pub fn read_config(spec: &str, revision: Option<&str>) -> Result<(PathBuf, String)> {
    if let Some(file) = gguf_file_of(spec)? {
        let config = super::gguf::GgufFile::open(&file)?.config()?;
        let json = serde_json::to_string_pretty(&config).map_err(candle::Error::wrap)?;
        return Ok((
            file.parent().map(Path::to_path_buf).unwrap_or_default(),
            json,
        ));
    }
    let dir = resolve_checkpoint_dir(spec, revision)?;
    let config_path = dir.join("config.json");
    let json = std::fs::read_to_string(&config_path)
        .map_err(|e| candle::Error::msg(format!("{}: {e}", config_path.display())))?;
    Ok((dir, json))
}

/// Every tensor of a sharded safetensors checkpoint, from the shards its
/// `model.safetensors.index.json` lists.
fn read_shards(index: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let in_index = |m: String| candle::Error::msg(format!("{}: {m}", index.display()));
    let text = std::fs::read_to_string(index).map_err(|e| in_index(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| in_index(e.to_string()))?;
    let map = value["weight_map"]
        .as_object()
        .ok_or_else(|| in_index("no weight_map".into()))?;
    let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    shards.sort_unstable();
    shards.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut all = Vec::new();
    for shard in shards {
        let path = dir.join(shard);
        let tensors = candle::safetensors::load(&path, device).map_err(|e| {
            candle::Error::msg(format!("{}: {}", path.display(), crate::error::message(&e)))
        })?;
        all.extend(tensors);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_hub_id_finds_its_local_copy_by_name() {
        let root = std::env::temp_dir().join(format!("lora-mini-roots-{}", std::process::id()));
        std::fs::create_dir_all(root.join("all-MiniLM-L6-v2")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::write(root.join("all-MiniLM-L6-v2/config.json"), "{}").unwrap();
        let roots = || vec![root.join("absent"), root.clone()];
        assert_eq!(
            local_copy("sentence-transformers/all-MiniLM-L6-v2", roots()),
            Some(root.join("all-MiniLM-L6-v2"))
        );
        assert_eq!(local_copy("someone/empty", roots()), None, "no config.json");
        assert_eq!(local_copy("someone/other", roots()), None);
        std::fs::remove_dir_all(root).unwrap();
    }

    use super::*;

    #[test]
    fn paths_are_never_sent_to_the_hub() {
        for spec in [
            "../shared/models/MiniLM",
            "./model",
            "/nonexistent/bert",
            "~/models/bert",
            "a/b/c",
        ] {
            assert!(looks_like_path(spec), "{spec}");
            let err = resolve_checkpoint_dir(spec, None).unwrap_err();
            assert_eq!(
                crate::error::message(&err),
                format!("no such directory: {spec}")
            );
        }
        for id in [
            "bert-base-uncased",
            "sentence-transformers/all-MiniLM-L6-v2",
        ] {
            assert!(!looks_like_path(id), "{id}");
        }
    }
}
