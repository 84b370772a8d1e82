//! The ordered registry of everything a run trains.

use std::collections::BTreeMap;

use candle::{Result, Var};

use super::config::AuxInit;
use super::linear::AdaptedLinear;
use super::low_rank::LowRankLayer;
use super::projections::aux_values;
use crate::dropout::SeededDropout;
use crate::rng::fnv1a64_extend;

/// Every trainable tensor of a model, keyed by full Hugging Face name.
///
/// Adapted linear layers are kept by module path (a clone shares the layer's
/// `Var`s, so training the model trains what the registry sees); other
/// trainable tensors (embeddings or norms under full fine-tuning) are kept by
/// tensor name. Iteration is sorted by name, so optimiser state, gradient
/// norms and files never depend on hash order.
///
/// ```
/// use candle::{Device, Tensor};
/// use candle_nn::Linear;
/// use lora_mini::adapter::{AdaptedLinear, AdapterRegistry, LoraMiniConfig, Method};
///
/// let mut registry = AdapterRegistry::new();
/// for path in ["layer.1.query", "layer.0.query"] {
///     let base = Linear::new(Tensor::zeros((32, 32), candle::DType::F32, &Device::Cpu)?, None);
///     let layer = AdaptedLinear::new(&base, &Method::LoraMini(LoraMiniConfig::new(2, 8, 8)), path)?;
///     registry.register(path, &layer)?;
/// }
/// let names: Vec<String> = registry.trainable().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names[0], "layer.0.query.lora_mini_A_in");
/// assert_eq!(registry.num_trainable(), 2 * 2 * (8 + 8));
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct AdapterRegistry {
    modules: BTreeMap<String, AdaptedLinear>,
    extra: BTreeMap<String, Var>,
    /// The model's own dropouts (hidden, attention-probability, classifier),
    /// kept so a checkpoint can resume their mask sequences exactly.
    dropouts: BTreeMap<String, SeededDropout>,
}

impl AdapterRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an adapted layer under its module path. Frozen layers hold
    /// nothing trainable and are skipped.
    ///
    /// Takes any layer type (`&LoraMiniLinear`, `&LoraLinear`, `&FullLinear`
    /// or `&AdaptedLinear`); the registry keeps a clone, which shares the
    /// layer's trainable `Var`s.
    pub fn register<L: Clone + Into<AdaptedLinear>>(
        &mut self,
        path: &str,
        layer: &L,
    ) -> Result<()> {
        let layer: AdaptedLinear = layer.clone().into();
        if matches!(layer, AdaptedLinear::Frozen(_)) {
            return Ok(());
        }
        if self.modules.contains_key(path) {
            candle::bail!("module {path} is registered twice");
        }
        self.modules.insert(path.to_string(), layer);
        Ok(())
    }

    /// Records a trainable tensor that is not part of a linear layer, under
    /// its full tensor name (e.g. `bert.embeddings.word_embeddings.weight`).
    pub fn register_var(&mut self, name: &str, var: &Var) -> Result<()> {
        if self.extra.contains_key(name) {
            candle::bail!("trainable tensor {name} is registered twice");
        }
        self.extra.insert(name.to_string(), var.clone());
        Ok(())
    }

    /// Records one of the model's own dropouts under the name that seeds
    /// its masks. Two dropouts of one name would draw identical masks, so a
    /// repeated name is an error.
    pub fn register_dropout(&mut self, name: &str, dropout: &SeededDropout) -> Result<()> {
        if self.dropouts.contains_key(name) {
            candle::bail!("dropout {name} is registered twice (its masks would repeat)");
        }
        self.dropouts.insert(name.to_string(), dropout.clone());
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty() && self.extra.is_empty()
    }

    pub fn module(&self, path: &str) -> Option<&AdaptedLinear> {
        self.modules.get(path)
    }

    /// The adapted (non-frozen) layers, sorted by path.
    pub fn modules(&self) -> impl Iterator<Item = (&str, &AdaptedLinear)> {
        self.modules.iter().map(|(p, l)| (p.as_str(), l))
    }

    /// Trainable tensors outside linear layers, sorted by name.
    pub fn extra_vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.extra.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// Every trainable tensor with its full name, sorted by name.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut all: BTreeMap<String, Var> = self
            .extra
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        for (path, layer) in &self.modules {
            for (role, var) in layer.trainable() {
                all.insert(format!("{path}.{role}"), var.clone());
            }
        }
        all.into_iter().collect()
    }

    /// The trainable `Var`s in registry order, ready for an optimiser.
    pub fn vars(&self) -> Vec<Var> {
        self.trainable().into_iter().map(|(_, v)| v).collect()
    }

    pub fn num_trainable(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// A checksum of every LoRA-Mini module's frozen `A_aux` and `B_aux` as
    /// the seeded generator produces them (in f32, before any dtype cast), or
    /// `None` when there are none. Adapter files carry it so that loading can
    /// prove the regenerated matrices are the ones the adapter was trained with.
    ///
    /// Orthogonal projections enter through their hash, and projections
    /// from the weight's SVD through the weight's hash (see
    /// [`Self::base_weight_hashes`]) rather than the singular vectors, whose
    /// last bits may differ between CPUs; both hashes are computed once, when
    /// the layer is built, not at every save.
    pub fn aux_checksum(&self) -> Result<Option<String>> {
        let mut hash = None;
        for (path, layer) in &self.modules {
            if let AdaptedLinear::LoraMini(l) = layer {
                let config = l.config();
                let (d_out, d_in) = l.base().dims2()?;
                let mut h = hash.unwrap_or(0xCBF2_9CE4_8422_2325);
                h = fnv1a64_extend(h, path.as_bytes());
                for dim in [config.a, d_in, d_out, config.b] {
                    h = fnv1a64_extend(h, &(dim as u64).to_le_bytes());
                }
                if config.aux_init != AuxInit::Kaiming {
                    // Kaiming files predate the choice: their checksum stays.
                    h = fnv1a64_extend(h, config.aux_init.name().as_bytes());
                }
                if let Some(fingerprint) = l.aux_fingerprint() {
                    // Computed once when the layer was built.
                    h = fnv1a64_extend(h, fingerprint.as_bytes());
                } else {
                    let (a, b) = aux_values(config, path, l.base().weight())?;
                    for v in a.iter().chain(b.iter()) {
                        h = fnv1a64_extend(h, &v.to_bits().to_le_bytes());
                    }
                }
                hash = Some(h);
            }
        }
        Ok(hash.map(|h| format!("fnv1a64:{h:016x}")))
    }

    /// The hash of the frozen weight of every LoRA-Mini module whose
    /// projections derive from it (`aux_init = "svd"` or `"svd-scaled"`), by
    /// module path. Adapter files record it, and loading names the first
    /// module whose base weight differs.
    pub fn base_weight_hashes(&self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for (path, layer) in &self.modules {
            if let AdaptedLinear::LoraMini(l) = layer {
                if let Some(hash) = l.base_weight_hash() {
                    out.insert(path.clone(), hash.to_string());
                }
            }
        }
        Ok(out)
    }

    /// Dropout-mask counters of every adapted layer (keyed by module path)
    /// and of the model's own dropouts (keyed `dropout:<name>`), for
    /// checkpoints: with them a resumed run draws the masks the uninterrupted
    /// run would have drawn.
    pub fn dropout_state(&self) -> BTreeMap<String, u64> {
        let adapters = self
            .modules
            .iter()
            .filter_map(|(p, l)| l.dropout_calls().map(|c| (p.clone(), c)));
        let model = self
            .dropouts
            .iter()
            .map(|(n, d)| (format!("dropout:{n}"), d.calls()));
        adapters.chain(model).collect()
    }

    /// Switches every registered layer and dropout between training (the
    /// default) and inference, as PyTorch's `model.train()` / `model.eval()`
    /// do. It decides what `Module::forward` does; an explicit
    /// `forward_t(xs, train)` is unaffected.
    pub fn set_training(&self, training: bool) {
        for layer in self.modules.values() {
            layer.set_training(training);
        }
        for dropout in self.dropouts.values() {
            dropout.set_training(training);
        }
    }

    /// Restores [`Self::dropout_state`]. A name the model does not have is
    /// an error: the checkpoint belongs to another model or config.
    pub fn set_dropout_state(&self, state: &BTreeMap<String, u64>) -> Result<()> {
        for (key, calls) in state {
            if let Some(name) = key.strip_prefix("dropout:") {
                match self.dropouts.get(name) {
                    Some(d) => d.set_calls(*calls),
                    None => candle::bail!("the model has no dropout {name}"),
                }
            } else {
                match self.modules.get(key) {
                    Some(layer) => layer.set_dropout_calls(*calls),
                    None => candle::bail!("the model has no adapted layer {key}"),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{LoraMiniConfig, Method};
    use candle::{DType, Device, Tensor};
    use candle_nn::Linear;

    #[test]
    fn aux_checksum_is_pinned() -> Result<()> {
        // Saved adapters regenerate A_aux and B_aux and compare this checksum:
        // a change here means every adapter file ever written stops loading.
        let base = Linear::new(Tensor::zeros((8, 16), DType::F32, &Device::Cpu)?, None);
        let config = LoraMiniConfig {
            seed: 1,
            ..LoraMiniConfig::new(2, 4, 3)
        };
        let layer = AdaptedLinear::new(
            &base,
            &Method::LoraMini(config),
            "encoder.layer.0.attention.self.query",
        )?;
        let mut registry = AdapterRegistry::new();
        registry.register("encoder.layer.0.attention.self.query", &layer)?;
        assert_eq!(registry.aux_checksum()?.as_deref(), Some(PINNED));
        Ok(())
    }

    const PINNED: &str = "fnv1a64:99617ac44d1ccbee";
}
