//! specforge-rs: train EAGLE-3 / EAGLE-3.1 draft heads for frozen Hugging Face targets.
//!
//! | stage | module |
//! |---|---|
//! | load a frozen target, capture aux states | [`target`] |
//! | tokenizer and chat templates | [`data`] |
//! | greedy generation with the KV cache, on-policy regeneration | [`generate`] |
//! | draft vocabulary (d2t / t2d) | [`vocab`] |
//! | offline features: shard writer and reader | [`extract`] |
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod data;
pub mod error;
pub mod extract;
pub mod generate;
pub mod nn;
pub mod target;
pub mod util;
pub mod vocab;
pub mod weights;

pub use error::{Error, Result};
