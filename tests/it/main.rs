//! Integration tests, in one binary to save link time.

#[cfg(feature = "data")]
mod bert;
mod common;
mod files;
mod layers;
mod params;
mod peft;
mod roberta;
mod shapes;
