//! The one place that decides which linear layer gets which adapter.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use candle::quantized::QTensor;
use candle::{Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::base::{BaseLinear, BaseWeight};
use super::config::{AdapterConfig, Method};
use super::linear::AdaptedLinear;
use super::peft::PeftAdapter;
use super::registry::AdapterRegistry;
use super::targets::matches_target;
use crate::dropout::SeededDropout;

enum Source {
    Config(AdapterConfig),
    Peft(PeftAdapter),
    Frozen,
}

/// Builds every linear layer of a model, keyed by its full Hugging Face
/// module path, and records the trainable ones in an [`AdapterRegistry`].
///
/// ```
/// use candle::{DType, Device, Tensor};
/// use candle_nn::Linear;
/// use lora_mini::adapter::{AdapterConfig, LinearFactory, LoraMiniConfig, Method};
///
/// let config = AdapterConfig::new(Method::LoraMini(LoraMiniConfig::new(4, 8, 8)), &["query"]);
/// let mut factory = LinearFactory::new(config)?;
/// let w = || Tensor::zeros((16, 16), DType::F32, &Device::Cpu);
/// let q = factory.build("layer.0.attention.self.query", &Linear::new(w()?, None))?;
/// let k = factory.build("layer.0.attention.self.key", &Linear::new(w()?, None))?;
/// assert_eq!((q.method_name(), k.method_name()), ("lora-mini", "frozen"));
/// let registry = factory.finish()?;
/// assert_eq!(registry.num_trainable(), 4 * (8 + 8));
/// # Ok::<(), candle::Error>(())
/// ```
pub struct LinearFactory {
    source: Source,
    registry: AdapterRegistry,
    used_targets: BTreeSet<String>,
    /// Seeds the model's own dropout masks (see [`LinearFactory::dropout`]).
    dropout_seed: u64,
    /// Linear weights to keep quantized, by full tensor name; each is
    /// taken by the first [`LinearFactory::linear`] call for its module.
    quantized: HashMap<String, Arc<QTensor>>,
    /// Whether a quantized (GGUF) checkpoint is to be dequantized on load.
    dequantize: bool,
}

impl LinearFactory {
    pub fn new(config: AdapterConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self::with_source(Source::Config(config)))
    }

    /// Every layer frozen: plain inference.
    pub fn frozen() -> Self {
        Self::with_source(Source::Frozen)
    }

    /// LoRA layers from an imported PEFT adapter; other layers frozen.
    pub fn from_peft(adapter: PeftAdapter) -> Self {
        Self::with_source(Source::Peft(adapter))
    }

    fn with_source(source: Source) -> Self {
        Self {
            source,
            registry: AdapterRegistry::new(),
            used_targets: BTreeSet::new(),
            dropout_seed: 0,
            quantized: HashMap::new(),
            dequantize: false,
        }
    }

    /// Whether a quantized checkpoint (a GGUF file) loads dequantized (to
    /// f32, or the dtype asked for) instead of staying quantized, the
    /// default. The loaders read this before they read the weights.
    pub fn with_dequantized_base(mut self, dequantize: bool) -> Self {
        self.dequantize = dequantize;
        self
    }

    pub fn dequantizes_base(&self) -> bool {
        self.dequantize
    }

    /// Whether the weight `name` (a full tensor name) is held quantized,
    /// waiting for its layer.
    pub fn has_quantized(&self, name: &str) -> bool {
        self.quantized.contains_key(name)
    }

    /// Linear weights that stay quantized, by full tensor name
    /// (`model.layers.0.self_attn.q_proj.weight`): [`LinearFactory::linear`]
    /// builds those layers on them instead of reading the `VarBuilder`.
    pub fn with_quantized_weights(mut self, weights: HashMap<String, Arc<QTensor>>) -> Self {
        self.quantized = weights;
        self
    }

    /// Seeds the dropouts the model registers (the run's seed; 0 unless set).
    /// Adapter dropouts keep the adapter config's own seed.
    pub fn with_dropout_seed(mut self, seed: u64) -> Self {
        self.dropout_seed = seed;
        self
    }

    /// The config this factory applies, when built from one.
    pub fn config(&self) -> Option<&AdapterConfig> {
        match &self.source {
            Source::Config(c) => Some(c),
            _ => None,
        }
    }

    /// Whether the layer at `path` will hold trained values (adapted or
    /// fully trained, from the config or a PEFT adapter) rather than stay
    /// as the checkpoint has it.
    pub fn trains(&self, path: &str) -> bool {
        match &self.source {
            Source::Frozen => false,
            Source::Config(config) => config.method_for(path) != Method::Frozen,
            Source::Peft(adapter) => {
                adapter.is_saved_module(path) || adapter.lora_modules().any(|m| m == path)
            }
        }
    }

    /// Wraps `base`, the pretrained layer at `path` (a `candle_nn::Linear`
    /// or a [`BaseLinear`], possibly quantized).
    pub fn build(&mut self, path: &str, base: impl Into<BaseLinear>) -> Result<AdaptedLinear> {
        let base: BaseLinear = base.into();
        let layer = match &self.source {
            Source::Frozen => AdaptedLinear::Frozen(base.clone()),
            Source::Config(config) => {
                for t in config.targets.iter().filter(|t| matches_target(path, t)) {
                    self.used_targets.insert(t.clone());
                }
                AdaptedLinear::new(&base, &config.method_for(path), path)?
            }
            Source::Peft(adapter) => match adapter.lora_linear(path, &base)? {
                Some(lora) => {
                    self.used_targets.insert(path.to_string());
                    AdaptedLinear::Lora(lora)
                }
                None if adapter.is_saved_module(path) => {
                    let weight = match adapter.saved_tensor(path, "weight")? {
                        Some(w) => w,
                        None => base.weight().to_dense()?,
                    };
                    let bias: Option<Tensor> = match adapter.saved_tensor(path, "bias")? {
                        Some(b) => Some(b),
                        None => base.bias().cloned(),
                    };
                    AdaptedLinear::Full(super::linear::FullLinear::new(Linear::new(weight, bias))?)
                }
                None => AdaptedLinear::Frozen(base),
            },
        };
        self.registry.register(path, &layer)?;
        Ok(layer)
    }

    /// Loads the `(d_out, d_in)` weight (and bias) under `vb` and wraps
    /// the layer; its module path is `vb`'s prefix, as candle-nn's
    /// `linear_b(d_in, d_out, bias, vb)` names it. A weight given to
    /// [`LinearFactory::with_quantized_weights`] stays quantized.
    pub fn linear(
        &mut self,
        d_in: usize,
        d_out: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<AdaptedLinear> {
        let path = vb.prefix();
        let weight = match self.quantized.remove(&format!("{path}.weight")) {
            Some(q) => {
                let dims = q.shape().dims();
                if dims != [d_out, d_in] {
                    candle::bail!(
                        "{path}.weight: shape mismatch, expected [{d_out}, {d_in}], got {dims:?}"
                    );
                }
                BaseWeight::Quantized(q)
            }
            None => BaseWeight::Dense(vb.get((d_out, d_in), "weight")?),
        };
        let bias = if bias {
            Some(vb.get(d_out, "bias")?)
        } else {
            None
        };
        self.build(&path, BaseLinear::new(weight, bias))
    }

    /// Whether every weight of the model trains (full fine-tuning), not only
    /// its linear layers' adapters.
    pub fn trains_everything(&self) -> bool {
        matches!(&self.source, Source::Config(c) if c.method == Method::Full)
    }

    /// Loads the non-linear weight `name` under `vb` (an embedding table, a
    /// norm's scale or shift). Under full fine-tuning it becomes a trainable
    /// `Var`, registered under its full Hugging Face name; otherwise it
    /// stays a frozen tensor.
    pub fn tensor<S: Into<candle::Shape>>(
        &mut self,
        vb: &VarBuilder,
        shape: S,
        name: &str,
    ) -> Result<Tensor> {
        let t = vb.get(shape, name)?;
        if !self.trains_everything() {
            return Ok(t);
        }
        let var = candle::Var::from_tensor(&t)?;
        self.registry
            .register_var(&format!("{}.{name}", vb.prefix()), &var)?;
        Ok(var.as_tensor().clone())
    }

    /// A dropout of the model itself, registered so checkpoints capture its
    /// mask counter. `name` (with the factory's dropout seed) seeds its
    /// masks and must be unique.
    pub fn dropout(&mut self, p: f64, name: &str) -> Result<SeededDropout> {
        let dropout = SeededDropout::new(p, self.dropout_seed, name);
        self.registry.register_dropout(name, &dropout)?;
        Ok(dropout)
    }

    /// Registers a trainable tensor that is not a linear layer.
    pub fn registry_mut(&mut self) -> &mut AdapterRegistry {
        &mut self.registry
    }

    /// The registry, after checking that every target matched some layer (a
    /// misspelt target would otherwise silently train nothing).
    pub fn finish(self) -> Result<AdapterRegistry> {
        match &self.source {
            Source::Config(config) => {
                let unused: Vec<&String> = config
                    .targets
                    .iter()
                    .filter(|t| !self.used_targets.contains(*t))
                    .collect();
                if !unused.is_empty() {
                    candle::bail!(
                        "adapter targets {unused:?} matched no linear layer of the model"
                    );
                }
            }
            Source::Peft(adapter) => {
                let missing: Vec<&String> = adapter
                    .lora_modules()
                    .filter(|p| !self.used_targets.contains(*p))
                    .collect();
                if !missing.is_empty() {
                    candle::bail!(
                        "PEFT adapter modules {missing:?} are not linear layers of the model"
                    );
                }
            }
            Source::Frozen => {}
        }
        Ok(self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{LoraConfig, LoraMiniConfig};
    use candle::{DType, Device};

    fn base(d: usize) -> Linear {
        Linear::new(
            Tensor::zeros((d, d), DType::F32, &Device::Cpu).unwrap(),
            None,
        )
    }

    #[test]
    fn targets_win_over_modules_to_save() -> Result<()> {
        let config = AdapterConfig::new(Method::LoraMini(LoraMiniConfig::new(2, 4, 4)), &["dense"])
            .with_modules_to_save(&["classifier"]);
        assert_eq!(config.method_for("classifier.dense").scaling(), Some(8.0));
        assert_eq!(config.method_for("classifier.out_proj"), Method::Full);
        assert_eq!(
            config.method_for("encoder.layer.0.attention.self.query"),
            Method::Frozen
        );
        Ok(())
    }

    #[test]
    fn unknown_target_is_an_error_naming_it() -> Result<()> {
        let mut f = LinearFactory::new(AdapterConfig::new(
            Method::Lora(LoraConfig::new(2)),
            &["query", "qeury"],
        ))?;
        f.build("l.0.query", base(8))?;
        let err = f.finish().unwrap_err().to_string();
        assert!(err.contains("qeury") && !err.contains("\"query\""), "{err}");
        Ok(())
    }
}
