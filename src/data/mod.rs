//! Data: tokenizer, chat templates and (later) conversation datasets with loss masks.

pub mod template;
pub mod tokenizer;

pub use template::{ChatTemplate, RenderOptions};
pub use tokenizer::Tokenizer;
