//! The LoRA-Mini layer.

use candle::Module;
use candle::{Result, Tensor, Var};

use super::base::BaseLinear;
use super::config::{AuxInit, InnerInit, LoraMiniConfig};
use super::host::AdapterHost;
use super::init::kaiming_uniform;
use super::low_rank::{LowRankLayer, LowRankUpdate, B_IN_ROLE};
use super::matmul::linear_fwd;
use super::projections::{aux_values, values_hash, weight_hash};

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
/// use lora_mini::adapter::{LoraMiniConfig, LoraMiniLinear, LowRankLayer};
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
    /// The base is a `candle_nn::Linear` or a [`BaseLinear`] (possibly
    /// quantized; the SVD projections then come from its dequantized
    /// weight).
    pub fn new(base: impl Into<BaseLinear>, config: &LoraMiniConfig, path: &str) -> Result<Self> {
        let base: BaseLinear = base.into();
        config.validate()?;
        let (d_out, d_in) = base.dims2()?;
        let (dtype, device) = (base.weight().dtype(), base.weight().device());
        let (a_vals, b_vals) = aux_values(config, path, base.weight())?;
        let aux_fingerprint = match config.aux_init {
            AuxInit::Kaiming => None,
            AuxInit::Orthogonal => Some(values_hash(a_vals.iter().chain(&b_vals))),
            AuxInit::Svd | AuxInit::SvdScaled => Some(weight_hash(&base.weight().to_dense()?)?),
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
            host: AdapterHost::new(&base, config.dropout, seed, path),
            aux_fingerprint,
            a_aux,
            b_aux,
            a_in: Var::from_tensor(&a_in)?,
            b_in: Var::from_tensor(&b_in)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &LoraMiniConfig {
        &self.config
    }

    pub fn scaling(&self) -> f64 {
        self.config.scaling()
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
}

impl LoraMiniLinear {
    /// The forward pass in an explicit mode: `train = true` applies dropout
    /// and keeps the factored update, `false` infers. [`Module::forward`]
    /// takes the mode from [`Self::is_training`] instead.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.host.forward_t(xs, train, || self.effective_factors())
    }
}

impl LowRankLayer for LoraMiniLinear {
    fn host(&self) -> &AdapterHost {
        &self.host
    }

    fn host_mut(&mut self) -> &mut AdapterHost {
        &mut self.host
    }

    /// `(A_in·A_aux, B_aux·B_in, scaling)`: LoRA-Mini as an exact rank-`r`
    /// LoRA pair.
    fn update(&self) -> Result<LowRankUpdate> {
        Ok(LowRankUpdate {
            a: self.a_in.as_tensor().matmul(&self.a_aux)?,
            b: self.b_aux.matmul(self.b_in.as_tensor())?,
            scaling: self.scaling(),
        })
    }

    fn trainable_vars(&self) -> Vec<(&'static str, &Var)> {
        vec![("lora_mini_A_in", &self.a_in), (B_IN_ROLE, &self.b_in)]
    }

    fn frozen_aux(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("lora_mini_A_aux", &self.a_aux),
            ("lora_mini_B_aux", &self.b_aux),
        ]
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
