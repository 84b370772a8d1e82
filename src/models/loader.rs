//! Reading Hugging Face checkpoints from a local folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// A checkpoint folder's `config.json` and weights.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config_json: String,
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Reads `config.json` and `model.safetensors`, dropping buffers that are
    /// not parameters (`*.position_ids`).
    pub fn read_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let config_json = std::fs::read_to_string(&config_path)
            .map_err(|e| candle::Error::msg(format!("reading {}: {e}", config_path.display())))?;
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            candle::bail!(
                "{} not found (pytorch_model.bin checkpoints must be converted to safetensors)",
                weights.display()
            );
        }
        let tensors = candle::safetensors::load(&weights, device)
            .map_err(|e| {
                candle::Error::msg(format!(
                    "{}: {}",
                    weights.display(),
                    crate::error::message(&e)
                ))
            })?
            .into_iter()
            .filter(|(name, _)| !name.ends_with("position_ids"))
            .collect();
        Ok(Self {
            dir,
            config_json,
            tensors,
        })
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
}

impl Checkpoint {
    /// Adds a linear layer the checkpoint lacks (a new task head), initialised
    /// as transformers does: weights `N(0, std²)` from the seeded generator,
    /// zero bias. Returns whether it was missing; says so in one line.
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
        eprintln!(
            "{}: no {path} in the checkpoint; initialised it as transformers does (weights N(0, {std}^2), zero bias)",
            self.dir.display()
        );
        Ok(true)
    }
}
