//! Standard LoRA, the baseline LoRA-Mini is measured against.

use candle::Module;
use candle::{Result, Tensor, Var};

use super::base::BaseLinear;
use super::config::{InnerInit, LoraConfig};
use super::host::AdapterHost;
use super::init::kaiming_uniform;
use super::low_rank::{LowRankLayer, LowRankUpdate, LORA_B_ROLE};

/// A frozen linear layer plus `scaling · B · A · dropout(x)`, with
/// `A: r x d_in` Kaiming-uniform and `B: d_out x r` zero (PEFT's defaults).
///
/// ```
/// use candle::{Device, Module, Tensor};
/// use candle_nn::Linear;
/// use lora_mini::adapter::{LoraConfig, LoraLinear, LowRankLayer};
///
/// let w = Tensor::randn(0f32, 0.02, (64, 32), &Device::Cpu)?;
/// let layer = LoraLinear::new(&Linear::new(w, None), &LoraConfig::new(8), "proj")?;
/// assert_eq!(layer.num_trainable(), 8 * (64 + 32));
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct LoraLinear {
    host: AdapterHost,
    a: Var,
    b: Var,
    config: LoraConfig,
}

impl LoraLinear {
    /// Wraps `base` (kept frozen: a `candle_nn::Linear` or a
    /// [`BaseLinear`], possibly quantized) with a freshly initialised adapter.
    pub fn new(base: impl Into<BaseLinear>, config: &LoraConfig, path: &str) -> Result<Self> {
        let base: BaseLinear = base.into();
        config.validate()?;
        let (d_out, d_in) = base.dims2()?;
        let (dtype, device) = (base.weight().dtype(), &base.weight().device());
        let a = kaiming_uniform(
            config.seed,
            &format!("{path}/A"),
            config.r,
            d_in,
            dtype,
            device,
        )?;
        let b = match config.inner_init {
            InnerInit::ZeroB => Tensor::zeros((d_out, config.r), dtype, device)?,
            InnerInit::Kaiming => kaiming_uniform(
                config.seed,
                &format!("{path}/B"),
                d_out,
                config.r,
                dtype,
                device,
            )?,
        };
        Self::from_factors(&base, &a, &b, config, path)
    }

    /// Wraps `base` with given factors `A: r x d_in` and `B: d_out x r`, e.g.
    /// read from a PEFT adapter. Shapes are checked against the base layer.
    pub fn from_factors(
        base: impl Into<BaseLinear>,
        a: &Tensor,
        b: &Tensor,
        config: &LoraConfig,
        path: &str,
    ) -> Result<Self> {
        let base: BaseLinear = base.into();
        config.validate()?;
        let (d_out, d_in) = base.dims2()?;
        let r = config.r;
        if a.dims() != [r, d_in] || b.dims() != [d_out, r] {
            candle::bail!(
                "module {path}: LoRA factors A {:?} and B {:?} do not fit a {d_out}x{d_in} layer at r={r} \
                 (expected A [{r}, {d_in}] and B [{d_out}, {r}])",
                a.dims(),
                b.dims()
            );
        }
        let (dtype, device) = (base.weight().dtype(), base.weight().device());
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(dtype)?.to_device(&device)?)?,
            b: Var::from_tensor(&b.to_dtype(dtype)?.to_device(&device)?)?,
            host: AdapterHost::new(&base, config.dropout, config.seed, path),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn scaling(&self) -> f64 {
        self.config.scaling()
    }

    pub fn a(&self) -> &Var {
        &self.a
    }

    pub fn b(&self) -> &Var {
        &self.b
    }
}

impl LoraLinear {
    /// The forward pass in an explicit mode: `train = true` applies dropout
    /// and keeps the factored update, `false` infers. [`Module::forward`]
    /// takes the mode from [`Self::is_training`] instead.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.host.forward_t(xs, train, || self.effective_factors())
    }
}

impl LowRankLayer for LoraLinear {
    fn host(&self) -> &AdapterHost {
        &self.host
    }

    fn host_mut(&mut self) -> &mut AdapterHost {
        &mut self.host
    }

    fn update(&self) -> Result<LowRankUpdate> {
        Ok(LowRankUpdate {
            a: self.a.as_tensor().clone(),
            b: self.b.as_tensor().clone(),
            scaling: self.scaling(),
        })
    }

    fn trainable_vars(&self) -> Vec<(&'static str, &Var)> {
        vec![("lora_A", &self.a), (LORA_B_ROLE, &self.b)]
    }
}

/// Training mode by default, so a model that calls `layer.forward(x)` trains
/// the adapter as it should; switch to inference with `set_training(false)`
/// (or [`AdapterRegistry::set_training`](super::AdapterRegistry::set_training)).
impl Module for LoraLinear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, self.is_training())
    }
}
