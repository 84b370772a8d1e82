//! Integration tests, in one binary to save link time.

#[cfg(feature = "data")]
mod bert;
#[cfg(feature = "cli")]
mod cli;
mod common;
#[cfg(feature = "data")]
mod data;
#[cfg(feature = "cli")]
mod decoder_cli;
mod examples;
mod files;
mod golden;
mod layers;
mod layout;
mod llama;
mod loading;
mod merged;
mod metrics;
mod params;
mod peft;
mod readme;
mod roberta;
mod t5;
#[cfg(feature = "train")]
mod train;
