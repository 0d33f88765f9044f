//! Tokenisation: conversations become token ids with a loss mask over the assistant turns.
//!
//! # Loss mask
//! Derived from the rendered chat template, per assistant turn `j` (the construction of
//! vllm-project/speculators PR #774): render `messages[..j]` with the generation prompt (`P`) and
//! `messages[..=j]` without it (`S`); the turn's span starts where the two stop agreeing and ends
//! after the last end-of-turn token (`<|im_end|>`, the EOS, ...) inside `S`, so the assistant
//! content *and* its end-of-turn token are supervised, while template glue after it (a trailing
//! newline) and the assistant header are not. A token is masked in when its bytes overlap a span
//! of the full rendering. Templates that are not prefix-stable (they rewrite earlier turns) fall
//! back to locating each assistant content string in the full rendering.
//!
//! # Truncation policy (`--max-len`)
//! [`Truncation::Truncate`] (default): a sample longer than `max_len` tokens keeps its first
//! `max_len` tokens (as SpecForge does), and is kept only if at least one supervised token
//! survives; otherwise the line is reported as `over_long`. [`Truncation::Drop`]: every sample
//! longer than `max_len` is reported as `over_long` and skipped.

use std::path::Path;

use rayon::prelude::*;
use serde_json::Value as Json;

use super::conversation::{read_jsonl, Conversation, ReadOptions, Role};
use super::report::{BadKind, LineError, Report};
use super::template::RenderOptions;
use super::tokenizer::Tokenizer;
use crate::error::Result;

/// What to do with samples longer than `--max-len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Keep the first `max_len` tokens if a supervised token survives; else report `over_long`.
    #[default]
    Truncate,
    /// Report every over-long sample as `over_long` and skip it.
    Drop,
}

/// How conversations become samples.
#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    /// Longest sample in tokens.
    pub max_len: usize,
    /// Over-long policy.
    pub truncation: Truncation,
    /// Whether the target takes images (text-only targets report `images_unsupported`).
    pub multimodal: bool,
    /// Extra template variables (`enable_thinking`, ...).
    pub template_vars: serde_json::Map<String, Json>,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions { max_len: 2048, truncation: Truncation::Truncate, multimodal: false, template_vars: serde_json::Map::new() }
    }
}

/// A tokenised training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Position among the dataset's usable samples (line order after filtering).
    pub index: usize,
    /// 1-based line in the source file.
    pub line: usize,
    /// The sample id.
    pub id: String,
    /// Token ids `[T]`.
    pub input_ids: Vec<i64>,
    /// `[T]`: 1 on assistant tokens (content and end-of-turn token), 0 elsewhere.
    pub loss_mask: Vec<u8>,
    /// Whether `--max-len` cut it.
    pub truncated: bool,
}

/// End-of-turn strings used to close assistant spans: the tokenizer's EOS, the tokens of the
/// config's EOS ids, and the usual chat end-of-turn tokens the vocabulary has.
pub fn stop_strings(tok: &Tokenizer, eos_ids: &[i64]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    let mut add = |s: String| {
        if !s.is_empty() && !v.contains(&s) {
            v.push(s);
        }
    };
    if let Some(e) = &tok.eos_token {
        add(e.clone());
    }
    for &id in eos_ids {
        if let Some(s) = tok.id_to_token(id) {
            add(s);
        }
    }
    for s in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|end_of_text|>"] {
        if tok.token_to_id(s).is_some() {
            add(s.to_string());
        }
    }
    v
}

/// Token ids of the stop strings (for generation).
pub fn stop_ids(tok: &Tokenizer, eos_ids: &[i64]) -> Vec<i64> {
    let mut ids: Vec<i64> = eos_ids.to_vec();
    for s in stop_strings(tok, eos_ids) {
        if let Some(id) = tok.token_to_id(&s) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// Length of the longest common prefix of `a` and `b`, on a char boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            return i;
        }
        n = i + ca.len_utf8();
    }
    n
}

/// Byte spans of the assistant turns in the full rendering of `messages`.
fn assistant_spans(
    tok: &Tokenizer,
    messages: &[Json],
    tools: Option<&Json>,
    vars: &serde_json::Map<String, Json>,
    stops: &[String],
    full: &str,
) -> std::result::Result<Vec<(usize, usize)>, LineError> {
    let render = |msgs: &[Json], gen: bool| {
        tok.apply_chat_template_with(
            &Json::Array(msgs.to_vec()),
            RenderOptions { add_generation_prompt: gen, tools: tools.cloned(), extra: vars.clone(), ..Default::default() },
        )
        .map_err(|e| (BadKind::Template, e.to_string()))
    };
    let mut spans = Vec::new();
    let mut cursor = 0usize;
    for (j, m) in messages.iter().enumerate() {
        if m.get("role").and_then(Json::as_str) != Some("assistant") {
            continue;
        }
        let p = render(&messages[..j], true)?;
        let s = render(&messages[..=j], false)?;
        let start = common_prefix(&p, &s);
        let turn = &s[start..];
        let end =
            stops.iter().filter_map(|st| turn.rfind(st.as_str()).map(|i| i + st.len())).max().unwrap_or_else(|| turn.trim_end().len());
        let (start, end) = (start, start + end);
        if full.as_bytes().starts_with(&s.as_bytes()[..end]) && start >= cursor {
            spans.push((start, end));
            cursor = end;
            continue;
        }
        // Not prefix-stable (the template rewrites earlier turns): find the content itself.
        let content = m.get("content").and_then(Json::as_str).unwrap_or("");
        let Some(pos) = full[cursor..].find(content).map(|p| p + cursor) else {
            return Err((
                BadKind::Template,
                format!("assistant turn {j} cannot be located in the rendered conversation (the template changes it)"),
            ));
        };
        let mut e = pos + content.len();
        if let Some(st) = stops.iter().find(|st| full[e..].starts_with(st.as_str())) {
            e += st.len();
        }
        spans.push((pos, e));
        cursor = e;
    }
    Ok(spans)
}

/// Renders and tokenises one conversation. Returns `(input_ids, loss_mask)` before truncation.
///
/// # Errors
/// The [`BadKind`] (`template`, `images_unsupported`) and the reason.
pub fn tokenize_conversation(
    tok: &Tokenizer,
    conv: &Conversation,
    opts: &TokenizeOptions,
    stops: &[String],
) -> std::result::Result<(Vec<i64>, Vec<u8>), (BadKind, String)> {
    if conv.has_images() && !opts.multimodal {
        return Err((BadKind::ImagesUnsupported, "the conversation has images but the target is text-only".into()));
    }
    let messages = conv.template_messages();
    let full = tok
        .apply_chat_template_with(
            &Json::Array(messages.clone()),
            RenderOptions {
                add_generation_prompt: false,
                tools: conv.tools.clone(),
                extra: opts.template_vars.clone(),
                ..Default::default()
            },
        )
        .map_err(|e| (BadKind::Template, e.to_string()))?;
    let spans = assistant_spans(tok, &messages, conv.tools.as_ref(), &opts.template_vars, stops, &full)?;
    let (ids, offsets) = tok.encode_with_offsets(&full).map_err(|e| (BadKind::Template, e.to_string()))?;
    let mut mask = vec![0u8; ids.len()];
    let mut s = 0usize;
    for (i, &(a, b)) in offsets.iter().enumerate() {
        if b <= a {
            continue;
        }
        while s < spans.len() && spans[s].1 <= a {
            s += 1;
        }
        if s < spans.len() && spans[s].0 < b {
            mask[i] = 1;
        }
    }
    Ok((ids, mask))
}

/// Tokenises conversations into samples (in parallel, order kept), recording bad ones in
/// `report`. Conversations without an assistant turn are `no_assistant`.
pub fn tokenize(convs: &[Conversation], tok: &Tokenizer, eos_ids: &[i64], opts: &TokenizeOptions, report: &mut Report) -> Vec<Sample> {
    let stops = stop_strings(tok, eos_ids);
    type Tokenised = std::result::Result<(Vec<i64>, Vec<u8>, bool), LineError>;
    let results: Vec<Tokenised> = convs
        .par_iter()
        .map(|c| {
            if !c.messages.iter().any(|m| m.role == Role::Assistant) {
                return Err((BadKind::NoAssistant, "no assistant turn: nothing to train on (run `regenerate` first)".into()));
            }
            let (mut ids, mut mask) = tokenize_conversation(tok, c, opts, &stops)?;
            let n = ids.len();
            let mut truncated = false;
            if n > opts.max_len {
                let kept = mask[..opts.max_len].iter().map(|&m| m as usize).sum::<usize>();
                if opts.truncation == Truncation::Drop || kept == 0 {
                    let why = if opts.truncation == Truncation::Drop {
                        "--truncation drop"
                    } else {
                        "no assistant token would survive truncation"
                    };
                    return Err((BadKind::OverLong, format!("{n} tokens, above --max-len {} ({why})", opts.max_len)));
                }
                ids.truncate(opts.max_len);
                mask.truncate(opts.max_len);
                truncated = true;
            }
            if mask.iter().all(|&m| m == 0) {
                return Err((BadKind::NoAssistant, "no assistant token after rendering".into()));
            }
            Ok((ids, mask, truncated))
        })
        .collect();
    let mut out = Vec::with_capacity(convs.len());
    for (c, r) in convs.iter().zip(results) {
        match r {
            Ok((input_ids, loss_mask, truncated)) => {
                if truncated {
                    report.truncated.push(c.line);
                }
                out.push(Sample { index: out.len(), line: c.line, id: c.id.clone(), input_ids, loss_mask, truncated });
            }
            Err((k, r)) => report.push(c.line, k, r),
        }
    }
    report.sort();
    out
}

/// Reads and tokenises a dataset in one go: [`read_jsonl`] then [`tokenize`].
pub fn load_samples(
    path: &Path,
    tok: &Tokenizer,
    eos_ids: &[i64],
    read: &ReadOptions,
    opts: &TokenizeOptions,
) -> Result<(Vec<Sample>, Report)> {
    let (convs, mut report) = read_jsonl(path, read)?;
    let samples = tokenize(&convs, tok, eos_ids, opts, &mut report);
    Ok((samples, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_on_char_boundary() {
        assert_eq!(common_prefix("abé", "abè"), 2);
        assert_eq!(common_prefix("abc", "abc"), 3);
        assert_eq!(common_prefix("", "x"), 0);
    }
}
