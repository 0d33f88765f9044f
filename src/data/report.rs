//! The bad-line report: every dataset line that was skipped, with why and the value seen.
//!
//! Reading ([`super::conversation`]), tokenising ([`super::tokenize`]), extraction and import all
//! skip bad lines instead of failing on them; each skip becomes a [`BadLine`] (1-based line
//! number, [`BadKind`], reason) in one [`Report`] per dataset file. [`Report::check`] writes the
//! report and stops a run only when the bad fraction passes the threshold.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::{Error, Result};

/// Why a line was skipped. The snake_case name is what the report writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BadKind {
    /// The line is not valid UTF-8.
    InvalidUtf8,
    /// The line is not valid JSON.
    InvalidJson,
    /// The line is JSON but not an object.
    NotAnObject,
    /// No `messages` / `conversations` array.
    NoConversation,
    /// The conversation array is empty.
    EmptyConversation,
    /// A message has a role we do not know.
    UnknownRole,
    /// A message lacks its role or content, or has content of the wrong type.
    BadMessage,
    /// A content part of an unknown type.
    UnknownPart,
    /// An image path that does not exist.
    MissingImage,
    /// An image that cannot be used (bad data URI, not an image, remote URL).
    BadImage,
    /// Images given to a text-only target.
    ImagesUnsupported,
    /// An `id` seen on an earlier line.
    DuplicateId,
    /// Longer than the line limit or `--max-len` (see the truncation policy).
    OverLong,
    /// Nothing to train on (no assistant turn) or nothing to answer (no user turn).
    NoAssistant,
    /// The chat template refused the conversation.
    Template,
    /// The target produced NaN or inf features for it.
    NonFinite,
    /// A generation request that failed (`import`).
    FailedResponse,
}

impl BadKind {
    /// The report's name for the kind.
    pub fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    }
}

/// One skipped line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BadLine {
    /// 1-based line number in the dataset file.
    pub line: usize,
    /// Why.
    pub kind: BadKind,
    /// Details, with the value seen.
    pub reason: String,
}

/// What happened to a dataset's lines.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The dataset file.
    pub path: PathBuf,
    /// Non-blank lines read.
    pub total: usize,
    /// Lines skipped, in line order.
    pub bad: Vec<BadLine>,
    /// Lines kept but truncated to `--max-len`.
    pub truncated: Vec<usize>,
}

impl Report {
    /// Records a bad line.
    pub fn push(&mut self, line: usize, kind: BadKind, reason: impl Into<String>) {
        self.bad.push(BadLine { line, kind, reason: reason.into() });
    }

    /// Sorts entries by line (stages add entries out of order).
    pub fn sort(&mut self) {
        self.bad.sort_by_key(|b| b.line);
        self.truncated.sort_unstable();
    }

    /// `bad / total` (0 for an empty file).
    pub fn bad_fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.bad.len() as f64 / self.total as f64
        }
    }

    /// `kind: count` pairs, most frequent first.
    pub fn counts(&self) -> Vec<(BadKind, usize)> {
        let mut m = std::collections::BTreeMap::new();
        for b in &self.bad {
            *m.entry(b.kind).or_insert(0usize) += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// One line for the log: `3 of 20 lines bad (invalid_json 2, unknown_role 1)`.
    pub fn summary(&self) -> String {
        let kinds: Vec<String> = self.counts().iter().map(|(k, n)| format!("{} {n}", k.name())).collect();
        let mut s = format!("{}: {} of {} lines bad", self.path.display(), self.bad.len(), self.total);
        if !kinds.is_empty() {
            s.push_str(&format!(" ({})", kinds.join(", ")));
        }
        if !self.truncated.is_empty() {
            s.push_str(&format!(", {} truncated to --max-len", self.truncated.len()));
        }
        s
    }

    /// Writes the report as JSONL, one `{"file", "line", "kind", "reason"}` per bad line, sorted
    /// by line (atomically: temp file + rename).
    pub fn write(&self, out: &Path) -> Result<()> {
        let mut entries = self.bad.clone();
        entries.sort_by_key(|b| b.line);
        let mut text = String::new();
        for b in &entries {
            let v = json!({
                "file": self.path.display().to_string(),
                "line": b.line,
                "kind": b.kind,
                "reason": b.reason,
            });
            text.push_str(&v.to_string());
            text.push('\n');
        }
        crate::util::fs::write_atomic(out, text.as_bytes())
    }

    /// Writes the report to `out` (when `write`: only rank 0 writes it), logs the summary, and
    /// fails when the bad fraction passes `max_bad_fraction`.
    ///
    /// # Errors
    /// [`Error::TooManyBadLines`] naming the file, the counts and the report.
    pub fn check(&self, max_bad_fraction: f64, out: &Path, write: bool) -> Result<()> {
        if write {
            self.write(out)?;
        }
        if write && (!self.bad.is_empty() || !self.truncated.is_empty()) {
            tracing::warn!("{}; details in {}", self.summary(), out.display());
        }
        if self.bad_fraction() > max_bad_fraction {
            return Err(Error::TooManyBadLines {
                path: self.path.clone(),
                bad: self.bad.len(),
                total: self.total,
                threshold: max_bad_fraction,
                report: out.to_path_buf(),
            });
        }
        Ok(())
    }
}

/// A line-level failure: the kind and the reason.
pub(crate) type LineError = (BadKind, String);
