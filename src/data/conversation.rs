//! Conversations: the message types and the JSONL reader that validates dataset lines into them.
//!
//! Kept apart from tokenisation because `regenerate` and `import` read and write conversations
//! without ever tokenising them.
//!
//! # Input
//! One JSON object per line. The conversation is under `messages`, `conversations` or
//! `conversation`, either in OpenAI form (`{"role", "content"}`, where `content` is a string or a
//! list of parts `{"type": "text", "text"}` / `{"type": "image_url", "image_url": {"url"}}` /
//! `{"type": "image", "image" | "path" | "url"}`, images given as a path relative to the dataset
//! file or as a `data:` URI) or in ShareGPT form (`{"from", "value"}`, `human`/`gpt`/`system`,
//! with an optional top-level `system`). An optional `id` (string or number) names the sample;
//! without one it is `line-N`. Optional `tools` are passed to the chat template.
//!
//! A line that cannot be used is skipped and recorded in the [`Report`] (see [`super::report`]).

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Value as Json};

use super::report::{BadKind, LineError, Report};
use crate::error::{Error, Result};

/// A line longer than this (bytes) is reported as over-long without parsing it.
pub const DEFAULT_MAX_LINE_BYTES: usize = 256 << 20;

/// A conversation role, normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `system` (also `developer`).
    System,
    /// `user` (ShareGPT `human`).
    User,
    /// `assistant` (ShareGPT `gpt`, `model`, ...).
    Assistant,
    /// `tool` (also `function`, `ipython`, `observation`).
    Tool,
}

impl Role {
    /// The role name chat templates expect.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    /// Parses an OpenAI role or a ShareGPT `from`.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "system" | "developer" => Role::System,
            "user" | "human" => Role::User,
            "assistant" | "gpt" | "chatgpt" | "bard" | "bing" | "model" | "function_call" => Role::Assistant,
            "tool" | "function" | "ipython" | "observation" => Role::Tool,
            _ => return None,
        })
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageRef {
    /// A file, resolved against the dataset's directory.
    Path(PathBuf),
    /// An inline `data:` URI (kept verbatim; the payload was decoded once to validate it).
    DataUri(String),
}

/// A piece of message content.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Text.
    Text(String),
    /// An image.
    Image(ImageRef),
}

/// One message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// Text and images in order. A plain-string content is one text part.
    pub parts: Vec<Part>,
}

impl Message {
    /// A text-only message.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message { role, parts: vec![Part::Text(text.into())] }
    }

    /// Whether any part is an image.
    pub fn has_images(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Image(_)))
    }

    /// The text parts joined with newlines (how text-only chat servers flatten part lists).
    pub fn text_content(&self) -> String {
        let texts: Vec<&str> = self
            .parts
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                Part::Image(_) => None,
            })
            .collect();
        texts.join("\n")
    }

    /// The message as a chat template sees it: `{"role", "content"}` with string content for
    /// text-only messages and a part list (`{"type": "text"}` / `{"type": "image"}`) otherwise.
    pub fn to_template_json(&self) -> Json {
        if !self.has_images() {
            return json!({"role": self.role.as_str(), "content": self.text_content()});
        }
        let parts: Vec<Json> = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => json!({"type": "text", "text": t}),
                Part::Image(ImageRef::Path(p)) => {
                    json!({"type": "image", "image": p.display().to_string()})
                }
                Part::Image(ImageRef::DataUri(u)) => json!({"type": "image", "image": u}),
            })
            .collect();
        json!({"role": self.role.as_str(), "content": parts})
    }
}

/// A validated conversation from one dataset line.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// 1-based line number in the source file.
    pub line: usize,
    /// The sample id: the line's `id`, or `line-N`.
    pub id: String,
    /// The messages, in order.
    pub messages: Vec<Message>,
    /// Tool definitions for the template, if the line had any.
    pub tools: Option<Json>,
}

impl Conversation {
    /// The messages as the chat template sees them.
    pub fn template_messages(&self) -> Vec<Json> {
        self.messages.iter().map(Message::to_template_json).collect()
    }

    /// Whether any message holds an image.
    pub fn has_images(&self) -> bool {
        self.messages.iter().any(Message::has_images)
    }

    /// The conversation in OpenAI form, as `regenerate` and `import` write it.
    pub fn to_openai_json(&self) -> Json {
        let msgs: Vec<Json> = self
            .messages
            .iter()
            .map(|m| {
                if !m.has_images() {
                    return json!({"role": m.role.as_str(), "content": m.text_content()});
                }
                let parts: Vec<Json> = m
                    .parts
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => json!({"type": "text", "text": t}),
                        Part::Image(ImageRef::Path(p)) => {
                            json!({"type": "image_url", "image_url": {"url": p.display().to_string()}})
                        }
                        Part::Image(ImageRef::DataUri(u)) => {
                            json!({"type": "image_url", "image_url": {"url": u}})
                        }
                    })
                    .collect();
                json!({"role": m.role.as_str(), "content": parts})
            })
            .collect();
        let mut v = json!({"id": self.id, "messages": msgs});
        if let (Some(t), Some(obj)) = (&self.tools, v.as_object_mut()) {
            obj.insert("tools".into(), t.clone());
        }
        v
    }
}

/// How dataset lines are read.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Relative image paths are resolved against this directory (default: the dataset's).
    pub base_dir: Option<PathBuf>,
    /// Lines longer than this many bytes are `over_long` without being parsed.
    pub max_line_bytes: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions { base_dir: None, max_line_bytes: DEFAULT_MAX_LINE_BYTES }
    }
}

fn short(v: &Json) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// Decodes standard or URL-safe base64 (padding optional, whitespace ignored).
///
/// The URL-safe alphabet is used when the payload holds a `-` or `_`, the standard one otherwise.
/// Non-zero bits in the last symbol are ignored, as the old hand-written decoder (and Python's
/// `base64.b64decode`) ignored them.
///
/// # Errors
/// The base64 crate's message (bad symbol and its offset in the payload without whitespace, bad
/// length, bad padding).
pub fn decode_base64(s: &str) -> std::result::Result<Vec<u8>, String> {
    use base64::alphabet;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;

    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent).with_decode_allow_trailing_bits(true);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, CONFIG);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, CONFIG);

    let compact: Vec<u8> = s.bytes().filter(|c| !matches!(c, b' ' | b'\n' | b'\r' | b'\t')).collect();
    let engine = if compact.iter().any(|&c| c == b'-' || c == b'_') { &URL_SAFE } else { &STANDARD };
    engine.decode(&compact).map_err(|e| format!("invalid base64: {e}"))
}

/// The image format of `head`, from its magic bytes.
fn image_format(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else if head.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("jpeg")
    } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        Some("gif")
    } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        Some("webp")
    } else if head.starts_with(b"BM") {
        Some("bmp")
    } else if head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
        Some("tiff")
    } else {
        None
    }
}

fn parse_image(src: &str, base: &Path) -> std::result::Result<ImageRef, LineError> {
    if let Some(rest) = src.strip_prefix("data:") {
        let Some((meta, payload)) = rest.split_once(',') else {
            return Err((BadKind::BadImage, "data URI without a `,`".into()));
        };
        if !meta.ends_with(";base64") {
            return Err((BadKind::BadImage, format!("data URI `data:{meta},…` is not base64")));
        }
        let bytes = decode_base64(payload).map_err(|e| (BadKind::BadImage, format!("data URI: {e}")))?;
        if image_format(&bytes).is_none() {
            return Err((
                BadKind::BadImage,
                format!(
                    "data URI (`{}`, {} bytes) is not a PNG, JPEG, GIF, WebP, BMP or TIFF image",
                    meta.trim_end_matches(";base64"),
                    bytes.len()
                ),
            ));
        }
        return Ok(ImageRef::DataUri(src.to_string()));
    }
    if src.starts_with("http://") || src.starts_with("https://") {
        return Err((BadKind::BadImage, format!("remote image `{src}`: nothing is downloaded at run time; save it and give its path")));
    }
    let path = PathBuf::from(src.strip_prefix("file://").unwrap_or(src));
    let path = if path.is_absolute() { path } else { base.join(path) };
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err((BadKind::MissingImage, format!("image `{src}` not found (looked at {})", path.display())))
        }
        Err(e) => return Err((BadKind::MissingImage, format!("image `{src}` ({}) cannot be read: {e}", path.display()))),
    };
    let mut head = [0u8; 16];
    let n = std::io::Read::read(&mut f, &mut head).unwrap_or(0);
    if image_format(&head[..n]).is_none() {
        return Err((BadKind::BadImage, format!("`{}` is not a PNG, JPEG, GIF, WebP, BMP or TIFF image", path.display())));
    }
    Ok(ImageRef::Path(path))
}

fn parse_part(p: &Json, base: &Path) -> std::result::Result<Part, LineError> {
    if let Json::String(s) = p {
        return Ok(Part::Text(s.clone()));
    }
    let ty = p.get("type").and_then(Json::as_str);
    let str_field = |v: Option<&Json>| -> Option<String> {
        match v {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Object(o)) => o.get("url").and_then(Json::as_str).map(str::to_string),
            _ => None,
        }
    };
    match ty {
        Some("text") | Some("input_text") => match p.get("text") {
            Some(Json::String(s)) => Ok(Part::Text(s.clone())),
            other => {
                Err((BadKind::BadMessage, format!("text part without a string `text` (saw {})", other.map_or("nothing".into(), short))))
            }
        },
        Some("image_url") | Some("image") | Some("input_image") => {
            let src = str_field(p.get("image_url"))
                .or_else(|| str_field(p.get("image")))
                .or_else(|| str_field(p.get("path")))
                .or_else(|| str_field(p.get("url")));
            match src {
                Some(s) => parse_image(&s, base).map(Part::Image),
                None => Err((BadKind::BadMessage, format!("image part without a path or URL: {}", short(p)))),
            }
        }
        Some(other) => Err((BadKind::UnknownPart, format!("content part of unknown type `{other}` (known: text, image_url, image)"))),
        None => Err((BadKind::UnknownPart, format!("content part without a `type`: {}", short(p)))),
    }
}

fn parse_message(m: &Json, i: usize, base: &Path) -> std::result::Result<Message, LineError> {
    let Json::Object(o) = m else {
        return Err((BadKind::BadMessage, format!("message {i} is not an object: {}", short(m))));
    };
    // ShareGPT spells role/content as from/value.
    let (role_v, content_v) =
        if o.contains_key("from") || o.contains_key("value") { (o.get("from"), o.get("value")) } else { (o.get("role"), o.get("content")) };
    let role_s = match role_v {
        Some(Json::String(s)) => s.as_str(),
        other => {
            return Err((
                BadKind::BadMessage,
                format!("message {i} has no string `role`/`from` (saw {})", other.map_or("nothing".into(), short)),
            ))
        }
    };
    let role = Role::parse(role_s).ok_or_else(|| {
        (
            BadKind::UnknownRole,
            format!("message {i} has unknown role `{role_s}` (known: system, user, assistant, tool; ShareGPT human, gpt)"),
        )
    })?;
    let parts = match content_v {
        Some(Json::String(s)) => vec![Part::Text(s.clone())],
        // Assistant turns that only call tools carry `content: null`.
        Some(Json::Null) if role == Role::Assistant => vec![Part::Text(String::new())],
        Some(Json::Array(list)) => list
            .iter()
            .map(|p| parse_part(p, base))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|(k, r)| (k, format!("message {i}: {r}")))?,
        other => {
            return Err((
                BadKind::BadMessage,
                format!("message {i} ({role_s}) has no string or list `content`/`value` (saw {})", other.map_or("nothing".into(), short)),
            ))
        }
    };
    Ok(Message { role, parts })
}

/// Parses one dataset line (already known to be UTF-8, not blank).
///
/// # Errors
/// The [`BadKind`] and a reason naming the value seen.
pub fn parse_line(text: &str, line: usize, base: &Path) -> std::result::Result<Conversation, (BadKind, String)> {
    let v: Json = serde_json::from_str(text).map_err(|e| (BadKind::InvalidJson, format!("invalid JSON: {e}")))?;
    let Json::Object(obj) = &v else {
        return Err((BadKind::NotAnObject, format!("expected a JSON object, saw {}", short(&v))));
    };
    let conv = ["messages", "conversations", "conversation"].iter().find_map(|k| obj.get(*k).map(|c| (*k, c)));
    let list = match conv {
        Some((_, Json::Array(a))) => a,
        Some((k, other)) => return Err((BadKind::NoConversation, format!("`{k}` is not an array (saw {})", short(other)))),
        None => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err((BadKind::NoConversation, format!("no `messages` or `conversations` array (keys: {})", keys.join(", "))));
        }
    };
    if list.is_empty() {
        return Err((BadKind::EmptyConversation, "the conversation is empty".into()));
    }
    let mut messages = Vec::with_capacity(list.len() + 1);
    // ShareGPT variants put the system prompt beside the turns.
    if let Some(Json::String(s)) = obj.get("system") {
        messages.push(Message::text(Role::System, s.clone()));
    }
    for (i, m) in list.iter().enumerate() {
        messages.push(parse_message(m, i, base)?);
    }
    let id = match obj.get("id") {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Number(n)) => n.to_string(),
        _ => format!("line-{line}"),
    };
    Ok(Conversation { line, id, messages, tools: obj.get("tools").filter(|t| !t.is_null()).cloned() })
}

/// Reads one line (up to and including `\n`) into `buf`, keeping at most `limit + 1` bytes of
/// it, so memory stays bounded whatever the line's length. Returns the line's full length, or
/// `None` at the end of the input. A line over the limit is consumed to its end (or up to the
/// first NUL byte, which is kept so the caller can stop on binary input).
fn read_line_bounded(r: &mut impl BufRead, buf: &mut Vec<u8>, limit: usize) -> std::io::Result<Option<usize>> {
    let mut total = 0usize;
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            return Ok((total > 0).then_some(total));
        }
        let newline = chunk.iter().position(|&b| b == b'\n');
        let take = newline.map_or(chunk.len(), |i| i + 1);
        let room = limit.saturating_add(1).saturating_sub(buf.len());
        let piece = &chunk[..take];
        buf.extend_from_slice(&piece[..take.min(room)]);
        let nul = piece.contains(&0);
        if nul {
            buf.push(0);
        }
        total += take;
        r.consume(take);
        if newline.is_some() || nul {
            return Ok(Some(total));
        }
    }
}

/// Reads a JSONL dataset. Blank lines are ignored (not counted); every other line either becomes
/// a [`Conversation`] or a [`BadLine`](super::BadLine) in the report.
///
/// # Errors
/// Only when the file cannot be read; bad content never fails here.
pub fn read_jsonl(path: &Path, opts: &ReadOptions) -> Result<(Vec<Conversation>, Report)> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let base = opts.base_dir.clone().unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")));
    let mut reader = std::io::BufReader::new(f);
    let mut report = Report { path: path.to_path_buf(), ..Default::default() };
    let mut raw = Vec::new();
    let mut lines: Vec<(usize, String)> = Vec::new();
    let mut line_no = 0usize;
    loop {
        raw.clear();
        let Some(n) = read_line_bounded(&mut reader, &mut raw, opts.max_line_bytes).map_err(|e| Error::io(path, e))? else {
            break;
        };
        line_no += 1;
        if raw.contains(&0) {
            // JSON text never holds a NUL byte: this is a binary file (or /dev/zero), and
            // reading on could go on forever.
            return Err(Error::Dataset {
                path: path.to_path_buf(),
                line: line_no,
                message: "holds a NUL byte: not a JSONL text file".into(),
            });
        }
        if n > opts.max_line_bytes {
            report.total += 1;
            report.push(line_no, BadKind::OverLong, format!("line is {n} bytes, above the {}-byte line limit", opts.max_line_bytes));
            continue;
        }
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        report.total += 1;
        match std::str::from_utf8(&raw) {
            Ok(s) => lines.push((line_no, s.trim_end_matches(['\n', '\r']).to_string())),
            Err(e) => report.push(line_no, BadKind::InvalidUtf8, format!("not UTF-8: {e}")),
        }
    }
    // Parsing (and decoding inline images) is independent per line.
    let parsed: Vec<(usize, std::result::Result<Conversation, LineError>)> =
        lines.into_par_iter().map(|(n, s)| (n, parse_line(&s, n, &base))).collect();
    let mut seen = HashSet::new();
    let mut convs = Vec::with_capacity(parsed.len());
    for (n, r) in parsed {
        match r {
            Ok(c) => {
                if !seen.insert(c.id.clone()) {
                    report.push(n, BadKind::DuplicateId, format!("id `{}` already used by an earlier line", c.id));
                } else {
                    convs.push(c);
                }
            }
            Err((k, r)) => report.push(n, k, r),
        }
    }
    report.sort();
    Ok((convs, report))
}

/// The xxh3-64 of a file's bytes, streamed (identifies a dataset in manifests and resumes).
pub fn file_hash(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:016x}", h.digest()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_long_lines_are_skipped_with_bounded_memory_and_nul_bytes_stop_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        let ok = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
        std::fs::write(&p, format!("{}\n{ok}\n{}", "x".repeat(100_000), "y".repeat(50_000))).unwrap();
        let opts = ReadOptions { max_line_bytes: 1000, ..Default::default() };
        let (convs, report) = read_jsonl(&p, &opts).unwrap();
        assert_eq!(convs.len(), 1);
        let kinds: Vec<(usize, BadKind)> = report.bad.iter().map(|b| (b.line, b.kind)).collect();
        assert_eq!(kinds, [(1, BadKind::OverLong), (3, BadKind::OverLong)]);
        // The line buffer never holds more than the limit (+1 byte to see that it is over).
        let mut buf = Vec::new();
        let long = "z".repeat(10_000);
        let mut r = std::io::BufReader::new(long.as_bytes());
        assert_eq!(read_line_bounded(&mut r, &mut buf, 100).unwrap(), Some(10_000));
        assert_eq!(buf.len(), 101);
        // Binary input (e.g. /dev/zero) ends at once with an error naming the line.
        std::fs::write(&p, [ok.as_bytes(), b"\n\0\0\0"].concat()).unwrap();
        let e = read_jsonl(&p, &ReadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("NUL") && e.contains('2'), "{e}");
    }

    #[test]
    fn base64_decodes() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8").unwrap(), b"hello");
        assert!(decode_base64("aGV$bG8=").is_err());
        assert!(decode_base64("a").is_err());
        // URL-safe alphabet, whitespace, unpadded and padded forms.
        assert_eq!(decode_base64("-_8=").unwrap(), [0xfb, 0xff]);
        assert_eq!(decode_base64("+/8").unwrap(), [0xfb, 0xff]);
        assert_eq!(decode_base64(" aGVs\nbG8=\r\n").unwrap(), b"hello");
        // Non-zero trailing bits are ignored; data after padding is refused.
        assert_eq!(decode_base64("aGVsbG9").unwrap(), b"hello");
        assert!(decode_base64("aGVs=bG8").is_err());
    }

    #[test]
    fn roles_and_sharegpt() {
        let c = parse_line(
            r#"{"id": 7, "system": "S", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}"#,
            3,
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.id, "7");
        assert_eq!(
            c.messages,
            vec![Message::text(Role::System, "S"), Message::text(Role::User, "hi"), Message::text(Role::Assistant, "yo")]
        );
        let e = parse_line(r#"{"messages": [{"role": "wizard", "content": "x"}]}"#, 1, Path::new(".")).unwrap_err();
        assert_eq!(e.0, BadKind::UnknownRole);
        assert!(e.1.contains("wizard"), "{}", e.1);
    }
}
