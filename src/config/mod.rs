//! Configuration: the lenient Hugging Face `config.json` mirror resolved into typed model configs.

pub mod hf;
pub mod recipe;

pub use hf::{Arch, LayerType, LinearAttnConfig, RopeConfig, RopeScaling, TargetConfig};
