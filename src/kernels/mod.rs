//! The crate's CPU kernels (f32, AVX-512 where the CPU has it), each a
//! Candle custom op with its backward. Crate-private: the public entry
//! points are the dispatchers in [`crate::nn::ops`] and the adapter layers,
//! which fall back to composed Candle ops on other devices and dtypes.

pub(crate) mod attention;
pub(crate) mod composed;
pub(crate) mod frozen_matmul;
pub(crate) mod fused;
