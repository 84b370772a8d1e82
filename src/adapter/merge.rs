//! Folding an adapter file into a base checkpoint's tensors, so that an
//! unmodified Candle model (candle-transformers' BERT or Llama) runs the
//! fine-tuned weights with no lora-mini type in its forward pass.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle::{Result, Tensor, Var};
use candle_nn::Linear;

use super::config::Method;
use super::file::{module_of, AdapterFile};
use super::linear::{AdaptedLinear, FullLinear};
use super::registry::AdapterRegistry;

impl AdapterFile {
    /// The base checkpoint's tensors with this adapter folded in, ready for
    /// `VarBuilder::from_tensors`: each low-rank module's weight becomes
    /// `W + ΔW`, and fully trained tensors (a task head, or everything under
    /// full fine-tuning) replace or join the base's.
    ///
    /// Module paths are matched as stored (`bert.encoder.layer.0...`) or
    /// without their first component, since task models prefix a base
    /// checkpoint's names (`encoder.layer.0...` in a bare `BertModel`); each
    /// merged tensor keeps the base's name. The adapter is checked as
    /// [`AdapterFile::apply`] checks it: shapes, frozen projections and
    /// (for SVD projections) the base weights it was trained on.
    pub fn merge_into(&self, base: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        let mut registry = AdapterRegistry::new();
        let mut names = HashMap::new();
        for module in self.modules() {
            let method = self.config.method_for(&module);
            let found = base_name(base, &module);
            if let Some(found) = &found {
                names.insert(module.clone(), found.clone());
            }
            match method {
                Method::Lora(_) | Method::LoraMini(_) => {
                    let Some(found) = found else {
                        candle::bail!(
                            "{}: module {module} has no weight in the base checkpoint (looked for {module}.weight{})",
                            self.path.display(),
                            strip_first(&module).map(|s| format!(" and {s}.weight")).unwrap_or_default()
                        );
                    };
                    let bias = base.get(&format!("{found}.bias")).cloned();
                    let linear = Linear::new(base[&format!("{found}.weight")].clone(), bias);
                    registry.register(&module, &AdaptedLinear::new(&linear, &method, &module)?)?;
                }
                _ => self.register_saved(&mut registry, &module)?,
            }
        }
        self.apply(&registry)?;
        let mut merged = base.clone();
        let rename = |module: &str| names.get(module).cloned().unwrap_or(module.to_string());
        for (module, layer) in registry.modules() {
            let name = rename(module);
            merged.insert(format!("{name}.weight"), layer.merged_weight()?);
            if let Some(bias) = layer.bias() {
                merged.insert(format!("{name}.bias"), bias.clone());
            }
        }
        for (tensor, var) in registry.extra_vars() {
            let (module, role) = tensor.rsplit_once('.').unwrap_or((tensor, ""));
            merged.insert(
                format!("{}.{role}", rename(module)),
                var.as_tensor().clone(),
            );
        }
        Ok(merged)
    }

    /// The modules the file holds tensors for.
    fn modules(&self) -> BTreeSet<String> {
        self.tensors
            .keys()
            .map(|n| module_of(n).to_string())
            .collect()
    }

    /// A fully trained module: a linear layer when `module_shapes` lists
    /// it (or, in files before that entry, when its `weight` is 2-D and its
    /// method is `full`); otherwise separate tensors (embedding tables and
    /// norms under full fine-tuning).
    fn register_saved(&self, registry: &mut AdapterRegistry, module: &str) -> Result<()> {
        let tensor = |role: &str| self.tensors.get(&format!("{module}.{role}")).cloned();
        let is_linear = match self.metadata.get("module_shapes") {
            Some(text) => serde_json::from_str::<BTreeMap<String, (usize, usize)>>(text)
                .map_err(|e| {
                    candle::Error::msg(format!(
                        "{}: invalid `module_shapes` metadata: {e}",
                        self.path.display()
                    ))
                })?
                .contains_key(module),
            None => {
                self.config.method_for(module) == Method::Full
                    && tensor("weight").is_some_and(|w| w.rank() == 2)
            }
        };
        match tensor("weight") {
            Some(weight) if is_linear => {
                let layer = FullLinear::new(Linear::new(weight, tensor("bias")))?;
                registry.register(module, &layer)
            }
            _ => {
                let prefix = format!("{module}.");
                for (name, t) in self.tensors.iter().filter(|(n, _)| {
                    n.strip_prefix(&prefix)
                        .is_some_and(|role| !role.contains('.'))
                }) {
                    registry.register_var(name, &Var::from_tensor(t)?)?;
                }
                Ok(())
            }
        }
    }
}

/// The name `module` has in `base`: as given, or without its first
/// component.
fn base_name(base: &HashMap<String, Tensor>, module: &str) -> Option<String> {
    let has = |m: &str| base.contains_key(&format!("{m}.weight"));
    if has(module) {
        Some(module.to_string())
    } else {
        strip_first(module).filter(|m| has(m)).map(String::from)
    }
}

fn strip_first(module: &str) -> Option<&str> {
    module.split_once('.').map(|(_, rest)| rest)
}
