//! specforge-rs: train EAGLE-3 / EAGLE-3.1 draft heads for frozen Hugging Face targets.
//!
//! | stage | module |
//! |---|---|
//! | load a frozen target, capture aux states | [`target`] |
//! | datasets, loss masks, tokenizer and chat templates | [`data`] |
//! | greedy generation with the KV cache, on-policy regeneration | [`generate`] |
//! | draft vocabulary (d2t / t2d) | [`vocab`] |
//! | offline features: shard writer and reader | [`extract`] |
//! | the EAGLE-3 / 3.1 draft head | [`draft`] |
//! | TTT training, optimizer, checkpoints | [`train`] |
//! | data-parallel process groups (c10d), DDP and the launcher | [`dist`] |
//! | the serving export | [`export`] |
//! | speculative decoding and acceptance evaluation | [`eval`] |
//! | `run`: the whole pipeline, chunked-rolling, resumable; the export stage and the model card | [`pipeline`] |
//! | what every stage runs with: rank, device, threads, who prints; the opened target | [`runtime`] |
//! | upload an export to a Hugging Face repo | [`push`] |
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod draft;
pub mod error;
pub mod eval;
pub mod export;
pub mod extract;
pub mod generate;
pub mod nn;
pub mod pipeline;
pub mod push;
pub mod runtime;
pub mod target;
pub mod train;
pub mod util;
pub mod vocab;
pub mod weights;

pub use error::{Error, Result};
