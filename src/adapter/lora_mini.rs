//! The LoRA-Mini layer.

use candle::Module;
use candle::{Result, Tensor, Var};
use candle_nn::Linear;

use super::config::{AuxInit, InnerInit, LoraMiniConfig};
use super::host::AdapterHost;
use super::init::kaiming_uniform;
use super::matmul::linear_fwd;
use super::projections::{aux_values, values_hash, weight_hash};
use crate::dropout::SeededDropout;

/// A frozen linear layer plus a LoRA-Mini update:
/// `y = W x + b + scaling · B_aux · B_in · A_in · A_aux · dropout(x)`.
///
/// * `A_aux: a x d_in` and `B_aux: d_out x b` are frozen and regenerated from
///   `(seed, module path)` (Kaiming-uniform or orthogonal) or from the frozen
///   weight's SVD (see [`AuxInit`]), so adapter files need
///   not store them;
/// * `A_in: r x a` (Kaiming) and `B_in: b x r` (zero by default) are trained:
///   `r·(a+b)` parameters, whatever the layer's width.
///
/// The forward pass first materialises `A_eff = A_in·A_aux` (`r x d_in`) and
/// `B_eff = scaling·B_aux·B_in` (`d_out x r`), then applies `x → A_eff → B_eff`:
/// the per-token work equals LoRA's at rank `r`.
///
/// ```
/// use candle::{DType, Device, Module, Tensor};
/// use candle_nn::Linear;
/// use lora_mini::adapter::{LoraMiniConfig, LoraMiniLinear};
///
/// let w = Tensor::randn(0f32, 0.02, (256, 128), &Device::Cpu)?;
/// let layer = LoraMiniLinear::new(&Linear::new(w, None), &LoraMiniConfig::new(4, 16, 16), "proj")?;
/// assert_eq!(layer.num_trainable(), 4 * (16 + 16));
/// let x = Tensor::randn(0f32, 1.0, (2, 7, 128), &Device::Cpu)?;
/// assert_eq!(layer.forward(&x)?.dims(), &[2, 7, 256]);
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct LoraMiniLinear {
    host: AdapterHost,
    a_aux: Tensor,
    b_aux: Tensor,
    a_in: Var,
    b_in: Var,
    config: LoraMiniConfig,
    /// What adapter files check the projections by, computed once here
    /// (files record it at every save): the hash of `W` for the SVD inits,
    /// the hash of the f32 projections for `orthogonal`. `None` for
    /// `kaiming`, whose projections are cheap to regenerate and whose
    /// checksum predates this field.
    aux_fingerprint: Option<String>,
}

impl LoraMiniLinear {
    /// Wraps `base` (kept frozen). `path` is the module's full Hugging Face
    /// path; it names the RNG streams, so keep it stable.
    pub fn new(base: &Linear, config: &LoraMiniConfig, path: &str) -> Result<Self> {
        config.validate()?;
        let (d_out, d_in) = base.weight().dims2()?;
        let (dtype, device) = (base.weight().dtype(), base.weight().device().clone());
        let (a_vals, b_vals) = aux_values(config, path, base.weight())?;
        let aux_fingerprint = match config.aux_init {
            AuxInit::Kaiming => None,
            AuxInit::Orthogonal => Some(values_hash(a_vals.iter().chain(&b_vals))),
            AuxInit::Svd | AuxInit::SvdScaled => Some(weight_hash(base.weight())?),
        };
        let a_aux = Tensor::from_vec(a_vals, (config.a, d_in), &device)?.to_dtype(dtype)?;
        let b_aux = Tensor::from_vec(b_vals, (d_out, config.b), &device)?.to_dtype(dtype)?;
        let seed = config.seed;
        let a_in = kaiming_uniform(
            seed,
            &format!("{path}/A_in"),
            config.r,
            config.a,
            dtype,
            &device,
        )?;
        let b_in = match config.inner_init {
            InnerInit::ZeroB => Tensor::zeros((config.b, config.r), dtype, &device)?,
            InnerInit::Kaiming => kaiming_uniform(
                seed,
                &format!("{path}/B_in"),
                config.b,
                config.r,
                dtype,
                &device,
            )?,
        };
        Ok(Self {
            host: AdapterHost::new(base, config.dropout, seed, path),
            aux_fingerprint,
            a_aux,
            b_aux,
            a_in: Var::from_tensor(&a_in)?,
            b_in: Var::from_tensor(&b_in)?,
            config: config.clone(),
        })
    }

    pub fn name(&self) -> &str {
        &self.host.name
    }

    pub fn config(&self) -> &LoraMiniConfig {
        &self.config
    }

    pub fn scaling(&self) -> f64 {
        self.config.scaling()
    }

    /// The frozen base weight `W` (unmerged).
    pub fn weight(&self) -> &Tensor {
        &self.host.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.host.bias.as_ref()
    }

    /// The hash of the frozen weight the projections were made from, for
    /// `svd` and `svd-scaled`; `None` for the seeded inits.
    pub fn base_weight_hash(&self) -> Option<&str> {
        self.aux_fingerprint
            .as_deref()
            .filter(|_| self.config.aux_init.from_weight())
    }

    /// See the field: `None` for `kaiming`.
    pub(crate) fn aux_fingerprint(&self) -> Option<&str> {
        self.aux_fingerprint.as_deref()
    }

    pub fn a_aux(&self) -> &Tensor {
        &self.a_aux
    }

    pub fn b_aux(&self) -> &Tensor {
        &self.b_aux
    }

    pub fn a_in(&self) -> &Var {
        &self.a_in
    }

    pub fn b_in(&self) -> &Var {
        &self.b_in
    }

    pub fn dropout(&self) -> Option<&SeededDropout> {
        self.host.dropout.as_ref()
    }

    pub fn num_trainable(&self) -> usize {
        self.a_in.elem_count() + self.b_in.elem_count()
    }

    /// `(A_eff, B_eff) = (A_in·A_aux, scaling·B_aux·B_in)`, of shapes
    /// `r x d_in` and `d_out x r`: an exact rank-`r` LoRA pair with
    /// `ΔW = B_eff·A_eff`. Differentiable with respect to `A_in` and `B_in`.
    pub fn effective_factors(&self) -> Result<(Tensor, Tensor)> {
        let a_eff = self.a_in.as_tensor().matmul(&self.a_aux)?;
        let b_eff = (self.b_aux.matmul(self.b_in.as_tensor())? * self.scaling())?;
        Ok((a_eff, b_eff))
    }

    /// The scaled update `ΔW` (`d_out x d_in`).
    pub fn delta_weight(&self) -> Result<Tensor> {
        let (a_eff, b_eff) = self.effective_factors()?;
        b_eff.matmul(&a_eff)
    }

    pub fn is_merged(&self) -> bool {
        self.host.is_merged()
    }

    /// Folds `ΔW` into the weight for inference at no extra latency. The
    /// original `W` is kept, so [`Self::unmerge`] restores it bit for bit.
    pub fn merge(&mut self) -> Result<()> {
        if !self.is_merged() {
            let delta = self.delta_weight()?;
            self.host.merge(&delta)?;
        }
        Ok(())
    }

    pub fn unmerge(&mut self) {
        self.host.unmerge()
    }

    /// The reference path: four thin matmuls on every token. Mathematically
    /// equal to the forward pass, and kept for tests and benchmarks only.
    #[doc(hidden)]
    pub fn forward_unfused(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let base = self.host.base_forward(xs)?;
        let xs = self.host.adapter_input(xs, train)?;
        let h = linear_fwd(&xs, &self.a_aux, None)?;
        let h = linear_fwd(&h, self.a_in.as_tensor(), None)?;
        let h = linear_fwd(&h, self.b_in.as_tensor(), None)?;
        let h = linear_fwd(&h, &self.b_aux, None)?;
        base + (h * self.scaling())?
    }

    pub(crate) fn vars(&self) -> Vec<(&'static str, &Var)> {
        vec![
            ("lora_mini_A_in", &self.a_in),
            ("lora_mini_B_in", &self.b_in),
        ]
    }

    pub(crate) fn frozen_aux(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("lora_mini_A_aux", &self.a_aux),
            ("lora_mini_B_aux", &self.b_aux),
        ]
    }

    pub(crate) fn as_plain(&self) -> Linear {
        self.host.as_plain()
    }
}

impl LoraMiniLinear {
    /// The forward pass in an explicit mode: `train = true` applies dropout
    /// and keeps the factored update, `false` infers. [`Module::forward`]
    /// takes the mode from [`Self::is_training`] instead.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.host.forward_t(xs, train, || self.effective_factors())
    }

    /// Whether [`Module::forward`] trains; `true` for a new layer, as in
    /// PyTorch. Clones share the flag.
    pub fn is_training(&self) -> bool {
        self.host.is_training()
    }

    pub fn set_training(&self, training: bool) {
        self.host.set_training(training)
    }
}

/// Training mode by default, so a model that calls `layer.forward(x)` trains
/// the adapter as it should; switch to inference with `set_training(false)`
/// (or [`AdapterRegistry::set_training`](super::AdapterRegistry::set_training)).
impl Module for LoraMiniLinear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, self.is_training())
    }
}
