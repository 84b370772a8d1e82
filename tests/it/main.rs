//! Integration tests, in one binary to save link time.

mod common;
mod files;
mod layers;
mod peft;
mod shapes;
