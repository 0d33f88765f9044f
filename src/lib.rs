//! specforge-rs: train EAGLE-3 / EAGLE-3.1 draft heads for frozen Hugging Face targets.
//!
//! | stage | module |
//! |---|---|
//! | load a frozen target, capture aux states | [`target`] |
//! | tokenizer and chat templates | [`data`] |
//! | greedy generation with the KV cache | [`generate`] |
//! | data-parallel process groups (c10d) and the launcher | [`dist`] |
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod draft;
pub mod error;
pub mod eval;
pub mod export;
pub mod generate;
pub mod nn;
pub mod target;
pub mod train;
pub mod util;
pub mod weights;

pub use error::{Error, Result};
