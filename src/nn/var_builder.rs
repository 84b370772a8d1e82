//! A candle-nn `VarBuilder` that also carries the adapter factory, so model
//! constructors keep Candle's `(vb, &config)` shape.

use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard};

use candle::{Result, Shape, Tensor};

use crate::adapter::{AdaptedLinear, AdapterRegistry, LinearFactory};
use crate::dropout::SeededDropout;

/// Candle's `VarBuilder` plus the [`LinearFactory`] that decides, by module
/// path, which linear layers get an adapter.
///
/// A model forked from candle-transformers imports this type instead of
/// `candle_nn::VarBuilder` (and [`linear`](super::linear),
/// [`embedding`](super::embedding)... from [`crate::nn`]); its constructors
/// and call sites stay as they were. The module path of every layer is the
/// prefix built with [`VarBuilder::pp`], so checkpoints, adapter files and
/// PEFT files all name layers as Hugging Face does. Clones share the
/// factory; [`VarBuilder::finish`] hands back what the model trains.
///
/// Everything else candle-nn's builder offers (`get_with_hints`,
/// `contains_tensor`, `dtype`...) is reachable through `Deref`.
#[derive(Clone)]
pub struct VarBuilder<'a> {
    vb: candle_nn::VarBuilder<'a>,
    factory: Arc<Mutex<LinearFactory>>,
}

impl<'a> VarBuilder<'a> {
    pub fn new(vb: candle_nn::VarBuilder<'a>, factory: LinearFactory) -> Self {
        Self {
            vb,
            factory: Arc::new(Mutex::new(factory)),
        }
    }

    /// Every layer frozen: plain inference on the checkpoint.
    pub fn frozen(vb: candle_nn::VarBuilder<'a>) -> Self {
        Self::new(vb, LinearFactory::frozen())
    }

    /// The builder one module further down (`vb.pp("q_proj")`).
    pub fn pp<S: ToString>(&self, name: S) -> Self {
        Self {
            vb: self.vb.pp(name),
            factory: Arc::clone(&self.factory),
        }
    }

    /// The same as [`VarBuilder::pp`], under candle-nn's other name.
    pub fn push_prefix<S: ToString>(&self, name: S) -> Self {
        self.pp(name)
    }

    /// The plain candle-nn builder, for code that needs exactly that type
    /// (its tensors load frozen).
    pub fn as_candle(&self) -> &candle_nn::VarBuilder<'a> {
        &self.vb
    }

    /// The tensor `name` under this prefix: trainable (a registered `Var`)
    /// under full fine-tuning, frozen otherwise. Embedding tables and norm
    /// parameters load through this.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        self.factory().tensor(&self.vb, shape, name)
    }

    /// The linear layer at this prefix, adapted as the factory's config says.
    pub fn linear(&self, d_in: usize, d_out: usize, bias: bool) -> Result<AdaptedLinear> {
        self.factory().linear(d_in, d_out, bias, self.vb.clone())
    }

    /// A dropout named by this prefix, seeded by the factory and registered
    /// so checkpoints resume its masks exactly.
    pub fn dropout(&self, p: f64) -> Result<SeededDropout> {
        self.factory().dropout(p, &self.vb.prefix())
    }

    /// Whether the layer at this prefix will hold trained values.
    pub fn trains(&self) -> bool {
        self.factory().trains(&self.vb.prefix())
    }

    /// Whether every weight trains (full fine-tuning).
    pub fn trains_everything(&self) -> bool {
        self.factory().trains_everything()
    }

    /// The registry of everything the model trains, after checking that
    /// every adapter target matched a layer. Call it once the model is
    /// built; the builder (and its clones) then adapt nothing more.
    pub fn finish(self) -> Result<AdapterRegistry> {
        let factory = std::mem::replace(&mut *self.factory(), LinearFactory::frozen());
        factory.finish()
    }

    /// The factory itself, for what the builder does not wrap.
    pub fn factory(&self) -> MutexGuard<'_, LinearFactory> {
        // A lock is poisoned only when a factory call panicked, and that
        // panic has already unwound through the model's constructor; code
        // that caught it gets the factory as the call left it.
        self.factory.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<'a> Deref for VarBuilder<'a> {
    type Target = candle_nn::VarBuilder<'a>;

    fn deref(&self) -> &Self::Target {
        &self.vb
    }
}
