//! Data: tokenizer, chat templates, and conversation datasets with loss masks and a bad-line
//! report.

pub mod dataset;
pub mod import;
pub mod template;
pub mod tokenizer;

pub use dataset::{Conversation, Report, Sample, TokenizeOptions, Truncation};
pub use template::{ChatTemplate, RenderOptions};
pub use tokenizer::Tokenizer;
