//! Data: tokenizer, chat templates, conversation datasets, tokenised samples with loss masks, and
//! the report of skipped lines.
//!
//! [`conversation`] reads and validates JSONL conversations, [`tokenize`](mod@tokenize) turns them
//! into samples with loss masks, and [`report`] records every line either one skipped.

pub mod conversation;
pub mod import;
pub mod report;
pub mod template;
pub mod tokenize;
pub mod tokenizer;

pub use conversation::{file_hash, parse_line, read_jsonl, Conversation, ImageRef, Message, Part, ReadOptions, Role};
pub use report::{BadKind, BadLine, Report};
pub use template::{ChatTemplate, RenderOptions};
pub use tokenize::{load_samples, stop_ids, stop_strings, tokenize, tokenize_conversation, Sample, TokenizeOptions, Truncation};
pub use tokenizer::Tokenizer;
