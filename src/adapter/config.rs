//! Adapter hyper-parameters: which method, its ranks, scaling and init.
//!
//! The configs serialise to JSON (adapter file metadata) and TOML (the CLI's
//! training configs) with the same field names.

use candle::Result;
use serde::{Deserialize, Serialize};

use super::targets::{is_within, matches_target, ALL_LINEAR};

/// How the trainable matrix next to the output (`B_in` for LoRA-Mini, `B` for
/// LoRA) starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InnerInit {
    /// `B` starts at zero, so `ΔW = 0` at step 0 and fine-tuning starts from
    /// the pretrained function exactly (PEFT's default, and ours). The first
    /// step's gradient reaches only `B`; `A` starts moving from step 2.
    #[default]
    ZeroB,
    /// Every matrix is Kaiming-uniform, as the LoRA-Mini paper states ("all
    /// matrices are initialised with Kaiming"). `ΔW ≠ 0` at step 0: the model
    /// before any training is the pretrained one plus a random update, so its
    /// outputs already differ from the base model's.
    Kaiming,
}

/// How LoRA-Mini's frozen projections `A_aux: a x d_in` and `B_aux: d_out x b`
/// are made. Every choice is reproducible: adapter files never need to store
/// the matrices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuxInit {
    /// Seeded Kaiming-uniform (PyTorch's `a=√5`), as the paper states. Rows
    /// of `A_aux` have norm about `1/√3`, columns of `B_aux` about
    /// `√(d_out/3b)`.
    #[default]
    Kaiming,
    /// Seeded, with orthonormal rows of `A_aux` and orthonormal columns of
    /// `B_aux` (Gram–Schmidt on Gaussian draws, in f64, so every platform
    /// gets the same bits). Unit scale, chosen on purpose: the projections
    /// then preserve norms, so `ΔW` has the singular values of
    /// `B_in·A_in` and one optimizer step moves `ΔW` as much as a LoRA of
    /// the inner shape would, instead of shrinking it by the random
    /// factors' norms. Needs `a ≤ d_in` and `b ≤ d_out`.
    Orthogonal,
    /// From the frozen weight: `A_aux` holds the top-`a` right singular
    /// vectors of `W`, `B_aux` the top-`b` left ones (orthonormal, the
    /// singular values not folded in). The adapter then trains inside `W`'s
    /// principal subspaces, like LoRA-XS. The file records a hash of each
    /// `W`, and loading onto a different base weight is refused.
    Svd,
    /// [`AuxInit::Svd`] with the singular values folded into `B_aux`
    /// (`B_aux = U_b·Σ_b`), as LoRA-XS does: directions `W` uses strongly
    /// get proportionally larger updates. On MiniLM this acts like a
    /// higher learning rate (its top singular values average about 3) and
    /// did not beat `svd` on three of four GLUE tasks (REPRODUCTION.md),
    /// so `svd` is the documented choice.
    SvdScaled,
}

impl AuxInit {
    /// Whether the projections come from the base weight rather than the seed.
    pub fn from_weight(self) -> bool {
        matches!(self, AuxInit::Svd | AuxInit::SvdScaled)
    }

    pub fn name(self) -> &'static str {
        match self {
            AuxInit::Kaiming => "kaiming",
            AuxInit::Orthogonal => "orthogonal",
            AuxInit::Svd => "svd",
            AuxInit::SvdScaled => "svd-scaled",
        }
    }
}

fn default_alpha() -> f64 {
    16.0
}

fn default_seed() -> u64 {
    42
}

/// LoRA-Mini: `ΔW = scaling · B_aux · B_in · A_in · A_aux`, with `A_aux: a x d_in`
/// and `B_aux: d_out x b` frozen, and `A_in: r x a`, `B_in: b x r` trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraMiniConfig {
    /// Inner rank.
    pub r: usize,
    /// Rows of the frozen `A_aux` (the input-side bottleneck width).
    pub a: usize,
    /// Columns of the frozen `B_aux` (the output-side bottleneck width).
    pub b: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout probability on the adapter's input, in training only.
    #[serde(default)]
    pub dropout: f64,
    /// Scale by `alpha / sqrt(r)` (rsLoRA) instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub inner_init: InnerInit,
    /// How the frozen `A_aux` and `B_aux` are made.
    #[serde(default)]
    pub aux_init: AuxInit,
    /// Seed of every random draw; each module derives its own stream from it
    /// and its path.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

impl LoraMiniConfig {
    /// A config with the paper's defaults for everything but the sizes.
    pub fn new(r: usize, a: usize, b: usize) -> Self {
        Self {
            r,
            a,
            b,
            alpha: default_alpha(),
            dropout: 0.0,
            use_rslora: false,
            inner_init: InnerInit::ZeroB,
            aux_init: AuxInit::Kaiming,
            seed: default_seed(),
        }
    }

    pub fn scaling(&self) -> f64 {
        scaling(self.alpha, self.r, self.use_rslora)
    }

    /// Trainable parameters per adapted module: `r·(a+b)`, whatever its width.
    pub fn trainable_per_module(&self) -> usize {
        self.r * (self.a + self.b)
    }

    pub fn validate(&self) -> Result<()> {
        check_rank("r", self.r)?;
        check_rank("a", self.a)?;
        check_rank("b", self.b)?;
        check_common(self.alpha, self.dropout)
    }
}

/// Standard LoRA (Hu et al.): `ΔW = scaling · B · A`, `A: r x d_in` Kaiming,
/// `B: d_out x r` zero, as in PEFT.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub inner_init: InnerInit,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

impl LoraConfig {
    pub fn new(r: usize) -> Self {
        Self {
            r,
            alpha: default_alpha(),
            dropout: 0.0,
            use_rslora: false,
            inner_init: InnerInit::ZeroB,
            seed: default_seed(),
        }
    }

    pub fn scaling(&self) -> f64 {
        scaling(self.alpha, self.r, self.use_rslora)
    }

    pub fn validate(&self) -> Result<()> {
        check_rank("r", self.r)?;
        check_common(self.alpha, self.dropout)
    }
}

/// What happens to one linear layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum Method {
    /// The pretrained weight, untouched.
    Frozen,
    /// The weight and bias themselves are trained (full fine-tuning, or a
    /// task head).
    Full,
    Lora(LoraConfig),
    LoraMini(LoraMiniConfig),
}

impl Method {
    /// The short name used in files and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Frozen => "frozen",
            Method::Full => "full",
            Method::Lora(_) => "lora",
            Method::LoraMini(_) => "lora-mini",
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Method::Frozen | Method::Full => Ok(()),
            Method::Lora(c) => c.validate(),
            Method::LoraMini(c) => c.validate(),
        }
    }

    /// The scale applied to `ΔW`, for the low-rank methods.
    pub fn scaling(&self) -> Option<f64> {
        match self {
            Method::Frozen | Method::Full => None,
            Method::Lora(c) => Some(c.scaling()),
            Method::LoraMini(c) => Some(c.scaling()),
        }
    }
}

/// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub fn scaling(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

fn check_rank(name: &str, value: usize) -> Result<()> {
    if value == 0 {
        candle::bail!("adapter {name} must be at least 1, got 0");
    }
    Ok(())
}

fn check_common(alpha: f64, dropout: f64) -> Result<()> {
    if !alpha.is_finite() || alpha <= 0.0 {
        candle::bail!("adapter alpha must be a positive number, got {alpha}");
    }
    if !(0.0..1.0).contains(&dropout) {
        candle::bail!("adapter dropout must be in [0, 1), got {dropout}");
    }
    Ok(())
}

/// What to adapt and how, like PEFT's `LoraConfig`.
///
/// A linear layer whose path matches one of `targets` (see
/// [`matches_target`]) gets `method`. Otherwise, a linear layer inside one of
/// `modules_to_save` (a task head such as `classifier`) is trained in full.
/// Every other layer stays frozen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    pub method: Method,
    pub targets: Vec<String>,
    #[serde(default)]
    pub modules_to_save: Vec<String>,
}

impl AdapterConfig {
    pub fn new(method: Method, targets: &[&str]) -> Self {
        Self {
            method,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            modules_to_save: Vec::new(),
        }
    }

    pub fn with_modules_to_save(mut self, modules: &[&str]) -> Self {
        self.modules_to_save = modules.iter().map(|m| m.to_string()).collect();
        self
    }

    pub fn validate(&self) -> Result<()> {
        self.method.validate()?;
        if self.targets.is_empty() && !matches!(self.method, Method::Frozen) {
            candle::bail!(
                "adapter targets are empty: name at least one module (or \"{ALL_LINEAR}\")"
            );
        }
        if let Some(t) = self.targets.iter().find(|t| t.is_empty()) {
            candle::bail!("adapter target {t:?} is empty");
        }
        Ok(())
    }

    /// The method for the linear layer at `path`.
    pub fn method_for(&self, path: &str) -> Method {
        if self.targets.iter().any(|t| matches_target(path, t)) {
            self.method.clone()
        } else if self.modules_to_save.iter().any(|m| is_within(path, m)) {
            Method::Full
        } else {
            Method::Frozen
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_follows_lora_and_rslora() {
        assert_eq!(LoraMiniConfig::new(8, 64, 64).scaling(), 2.0);
        let mut c = LoraMiniConfig::new(16, 64, 64);
        c.use_rslora = true;
        assert_eq!(c.scaling(), 4.0);
        assert_eq!(LoraMiniConfig::new(8, 64, 32).trainable_per_module(), 768);
    }

    #[test]
    fn invalid_values_are_named() {
        let err = LoraMiniConfig::new(0, 64, 64).validate().unwrap_err();
        assert!(err.to_string().contains("r must be at least 1"), "{err}");
        let err = LoraMiniConfig::new(8, 0, 64).validate().unwrap_err();
        assert!(err.to_string().contains("a must be"), "{err}");
        let mut c = LoraConfig::new(8);
        c.dropout = 1.0;
        assert!(c.validate().unwrap_err().to_string().contains("dropout"));
    }

    #[test]
    fn method_round_trips_through_json() {
        let m = Method::LoraMini(LoraMiniConfig::new(8, 64, 32));
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"method\":\"lora-mini\""), "{json}");
        assert_eq!(serde_json::from_str::<Method>(&json).unwrap(), m);
        let parsed: Method = serde_json::from_str(r#"{"method":"lora","r":4}"#).unwrap();
        assert_eq!(parsed, Method::Lora(LoraConfig::new(4)));
        assert!(serde_json::from_str::<Method>(r#"{"method":"lora","r":4,"rank":3}"#).is_err());
    }
}
