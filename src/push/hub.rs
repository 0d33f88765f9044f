//! The HTTP side of `push`: one blocking client (`ureq`), the token attached only to requests for
//! the endpoint's own origin, errors that name the method, the URL without its query string, the
//! status and the server's message, and never a request header.

use std::collections::HashMap;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::time::Duration;

use base64::Engine as _;
use indicatif::ProgressBar;
use serde_json::{json, Value};
use ureq::http;

use super::{LocalFile, PushError, RepoId, Result, Token, UploadMode};

const LFS_JSON: &str = "application/vnd.git-lfs+json";

/// Files per preupload / LFS batch request (the Hub's page size).
const PAGE: usize = 256;

/// An LFS file: the local file (its size as hashed) and its sha256.
#[derive(Debug, Clone)]
pub(crate) struct LfsFile {
    pub file: LocalFile,
    pub oid: String,
}

/// A URL and the headers the Hub asks to send along.
#[derive(Debug, Clone)]
pub(crate) struct Href {
    url: String,
    header: Vec<(String, String)>,
}

/// How the Hub wants an object's bytes.
#[derive(Debug, Clone)]
pub(crate) enum Transfer {
    /// One PUT of the whole file.
    Basic(Href),
    /// One PUT per part (each answering an ETag), then a completion POST listing them.
    Multipart { complete: Href, chunk_size: u64, parts: Vec<String> },
}

/// What the LFS batch answered for an object that is not stored yet.
#[derive(Debug, Clone)]
pub(crate) struct LfsAction {
    upload: Transfer,
    verify: Option<Href>,
}

/// The commit the Hub made.
#[derive(Debug, Clone)]
pub(crate) struct Committed {
    pub url: String,
    pub oid: Option<String>,
}

/// Whether a request may carry the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// Never: storage uploads (presigned URLs; `huggingface_hub` sends them no token either).
    Never,
    /// When the URL is on the endpoint's origin: API calls, LFS verify and multipart completion.
    SameOrigin,
}

struct Reply {
    status: u16,
    etag: Option<String>,
    location: Option<String>,
    error_header: Option<String>,
    body: Vec<u8>,
}

/// A client for one Hub endpoint with one token.
pub struct Hub {
    agent: ureq::Agent,
    endpoint: String,
    origin: String,
    token: Token,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("endpoint", &self.endpoint).field("token", &self.token).finish()
    }
}

/// `scheme://host[:port]` of a URL, lowercased; `None` when it is not http(s).
fn origin(url: &str) -> Option<String> {
    let lower = url.to_ascii_lowercase();
    let rest = lower.strip_prefix("https://").or_else(|| lower.strip_prefix("http://"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.contains('@') {
        return None;
    }
    Some(format!("{}{host}", &lower[..lower.len() - rest.len()]))
}

/// A URL fit for messages: the query string (presigned storage URLs sign there) dropped.
fn shown(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?..."),
        None => url.to_string(),
    }
}

/// Percent-encodes a path segment (a revision such as `refs/pr/1` becomes one segment).
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A JSON string or number as a string (LFS headers carry either).
fn json_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Counts the bytes read into a progress bar.
struct Counted<'a, R> {
    inner: R,
    bar: &'a ProgressBar,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

impl Hub {
    /// A client for `endpoint` (`https://huggingface.co`, or an `HF_ENDPOINT` such as a mirror).
    pub fn new(endpoint: &str, token: Token) -> Result<Hub> {
        let endpoint = endpoint.trim().trim_end_matches('/').to_string();
        let Some(origin) = origin(&endpoint) else {
            return Err(PushError::Endpoint { endpoint, reason: "expected an http:// or https:// URL with a host".into() });
        };
        let loopback =
            ["http://127.0.0.1", "http://localhost", "http://[::1]"].iter().any(|l| origin == *l || origin.starts_with(&format!("{l}:")));
        if origin.starts_with("http://") && !loopback {
            tracing::warn!("{endpoint} is plain http: the token travels unencrypted");
        }
        // ureq logs through the `log` crate; at trace level it hex-dumps raw requests, the
        // Authorization header included, and prints presigned URLs whole. Its debug records
        // redact both, so cap `log` there whatever RUST_LOG or -vv asked for.
        log::set_max_level(log::max_level().min(log::LevelFilter::Debug));
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(600)))
            .user_agent(format!("specforge-rs/{}", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Hub { agent: ureq::Agent::new_with_config(config), endpoint, origin, token })
    }

    /// The endpoint, without a trailing slash.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends one request. The token goes along only with `auth` and when `url` is on the
    /// endpoint's origin. `context` (a file) prefixes transport errors.
    fn send(
        &self,
        method: &'static str,
        url: &str,
        auth: Auth,
        headers: &[(&str, &str)],
        body: Option<(&mut dyn Read, u64)>,
        context: &str,
    ) -> Result<Reply> {
        let scrub = |m: String| self.token.scrub(&m.replace(url, &shown(url)));
        let transport = |m: String| PushError::Transport { method, url: shown(url), message: scrub(format!("{context}{m}")) };
        let mut req = http::Request::builder().method(method).uri(url);
        if auth == Auth::SameOrigin && origin(url).as_deref() == Some(self.origin.as_str()) {
            req = req.header("Authorization", format!("Bearer {}", self.token.secret()));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        tracing::debug!("{method} {}", shown(url));
        let response = match body {
            Some((reader, len)) => {
                let req = req.header("Content-Length", len.to_string());
                let request = req.body(ureq::SendBody::from_reader(reader)).map_err(|e| transport(format!("building the request: {e}")))?;
                self.agent.run(request)
            }
            None => {
                let request = req.body(()).map_err(|e| transport(format!("building the request: {e}")))?;
                self.agent.run(request)
            }
        };
        let mut response = response.map_err(|e| transport(e.to_string()))?;
        let header = |k: &str| response.headers().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (etag, location, error_header) = (header("etag"), header("location"), header("x-error-message"));
        let status = response.status().as_u16();
        let body =
            response.body_mut().with_config().limit(64 << 20).read_to_vec().map_err(|e| transport(format!("reading the reply: {e}")))?;
        tracing::debug!("{method} {} -> {status}", shown(url));
        Ok(Reply { status, etag, location, error_header, body })
    }

    /// The error for a reply with a failing status: the server's message, scrubbed.
    fn http_error(&self, method: &'static str, url: &str, r: &Reply) -> PushError {
        let json: Option<Value> = serde_json::from_slice(&r.body).ok();
        let from_json = json.as_ref().and_then(|v| v.get("error").or_else(|| v.get("message"))).and_then(|e| match e {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        });
        let text: String = String::from_utf8_lossy(&r.body).trim().chars().take(500).collect();
        let mut message = r.error_header.clone().or(from_json).unwrap_or(text);
        if message.is_empty() {
            message = "(no message)".into();
        }
        if let (300..=399, Some(loc)) = (r.status, &r.location) {
            message = format!("{message} (redirected to {}; was the repo renamed?)", shown(loc));
        }
        PushError::Http { method, url: shown(url), status: r.status, message: self.token.scrub(&message) }
    }

    /// POSTs JSON; returns the raw reply, whatever its status.
    fn post_json_raw(&self, url: &str, body: &Value, content_type: &str) -> Result<Reply> {
        let bytes =
            serde_json::to_vec(body).map_err(|e| PushError::Protocol { url: shown(url), reason: format!("encoding the request: {e}") })?;
        let len = bytes.len() as u64;
        let accept = if content_type == LFS_JSON { LFS_JSON } else { "application/json" };
        let headers = [("Content-Type", content_type), ("Accept", accept)];
        self.send("POST", url, Auth::SameOrigin, &headers, Some((&mut Cursor::new(bytes), len)), "")
    }

    /// POSTs JSON; a status other than 2xx is an error, a 2xx reply must be JSON (or empty: `Null`).
    fn post_json(&self, url: &str, body: &Value, content_type: &str) -> Result<Value> {
        let r = self.post_json_raw(url, body, content_type)?;
        if !(200..300).contains(&r.status) {
            return Err(self.http_error("POST", url, &r));
        }
        if r.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&r.body).map_err(|e| PushError::Protocol {
            url: shown(url),
            reason: format!(
                "not JSON ({e}): {}",
                self.token.scrub(&String::from_utf8_lossy(&r.body).chars().take(200).collect::<String>())
            ),
        })
    }

    /// Creates the model repo; `Ok(false)` when it already exists (HTTP 409, or a 403 on create
    /// for a repo the token can still see, as in an organization where it may write but not create).
    pub(crate) fn create_repo(&self, repo: &RepoId, private: bool) -> Result<bool> {
        let url = format!("{}/api/repos/create", self.endpoint);
        let body = json!({"type": "model", "name": repo.name, "organization": repo.namespace, "private": private});
        let r = self.post_json_raw(&url, &body, "application/json")?;
        match r.status {
            200..=299 => Ok(true),
            409 => Ok(false),
            403 => {
                let info = format!("{}/api/models/{repo}", self.endpoint);
                if self.send("GET", &info, Auth::SameOrigin, &[], None, "")?.status == 200 {
                    tracing::info!("{repo} exists; the token may not create repos there, trying to commit anyway");
                    Ok(false)
                } else {
                    Err(self.http_error("POST", &url, &r))
                }
            }
            _ => Err(self.http_error("POST", &url, &r)),
        }
    }

    /// Asks the Hub how each file travels: `(mode, ignored by .gitignore)`, in `files`' order.
    pub(crate) fn preupload(&self, repo: &RepoId, revision: &str, files: &[(&LocalFile, Vec<u8>)]) -> Result<Vec<(UploadMode, bool)>> {
        let url = format!("{}/api/models/{repo}/preupload/{}", self.endpoint, encode_segment(revision));
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut modes: HashMap<String, (UploadMode, bool)> = HashMap::new();
        let bad = |reason: String| PushError::Protocol { url: shown(&url), reason };
        for page in files.chunks(PAGE) {
            let list: Vec<Value> = page.iter().map(|(f, s)| json!({"path": f.path, "size": f.size, "sample": b64.encode(s)})).collect();
            let v = self.post_json(&url, &json!({"files": list}), "application/json")?;
            let answered = v.get("files").and_then(Value::as_array).ok_or_else(|| bad(format!("no `files` list in {v}")))?;
            for e in answered {
                let path = e.get("path").and_then(Value::as_str).ok_or_else(|| bad(format!("a file without `path`: {e}")))?;
                let mode = match e.get("uploadMode").and_then(Value::as_str) {
                    Some("lfs") => UploadMode::Lfs,
                    Some("regular") => UploadMode::Regular,
                    other => return Err(bad(format!("{path}: uploadMode {other:?}, expected \"regular\" or \"lfs\""))),
                };
                let ignore = e.get("shouldIgnore").and_then(Value::as_bool).unwrap_or(false);
                modes.insert(path.to_string(), (mode, ignore));
            }
        }
        files.iter().map(|(f, _)| modes.get(&f.path).copied().ok_or_else(|| bad(format!("no upload mode for {}", f.path)))).collect()
    }

    /// The git-lfs batch call: per file, `None` when the Hub already holds the object, else how
    /// to upload it.
    pub(crate) fn lfs_batch(&self, repo: &RepoId, revision: &str, files: &[LfsFile]) -> Result<Vec<Option<LfsAction>>> {
        let url = format!("{}/{repo}.git/info/lfs/objects/batch", self.endpoint);
        let bad = |reason: String| PushError::Protocol { url: shown(&url), reason };
        let mut unique: Vec<&LfsFile> = Vec::new();
        for f in files {
            if !unique.iter().any(|u| u.oid == f.oid) {
                unique.push(f);
            }
        }
        let mut actions: HashMap<String, Option<LfsAction>> = HashMap::new();
        for page in unique.chunks(PAGE) {
            let objects: Vec<Value> = page.iter().map(|f| json!({"oid": f.oid, "size": f.file.size})).collect();
            let body = json!({
                "operation": "upload",
                "transfers": ["basic", "multipart"],
                "objects": objects,
                "hash_algo": "sha256",
                "ref": {"name": revision},
            });
            let v = self.post_json(&url, &body, LFS_JSON)?;
            let answered = v.get("objects").and_then(Value::as_array).ok_or_else(|| bad(format!("no `objects` list in {v}")))?;
            for o in answered {
                let oid = o.get("oid").and_then(Value::as_str).ok_or_else(|| bad(format!("an object without `oid`: {o}")))?;
                let Some(f) = page.iter().find(|f| f.oid == oid) else { continue };
                if let Some(err) = o.get("error") {
                    let code = err.get("code").map(|c| c.to_string()).unwrap_or_default();
                    let msg = err.get("message").and_then(Value::as_str).unwrap_or("no message");
                    return Err(bad(format!("LFS object for {} refused: {code} {}", f.file.path, self.token.scrub(msg))));
                }
                let upload = o.pointer("/actions/upload");
                let action = match upload {
                    None | Some(Value::Null) => None,
                    Some(u) => Some(self.parse_action(u, o.pointer("/actions/verify"), f).map_err(bad)?),
                };
                actions.insert(oid.to_string(), action);
            }
        }
        files
            .iter()
            .map(|f| actions.get(&f.oid).cloned().ok_or_else(|| bad(format!("no answer for {} (oid {})", f.file.path, f.oid))))
            .collect()
    }

    fn parse_action(&self, upload: &Value, verify: Option<&Value>, f: &LfsFile) -> std::result::Result<LfsAction, String> {
        let href = |v: &Value| -> std::result::Result<Href, String> {
            let url = v.get("href").and_then(Value::as_str).ok_or_else(|| format!("{}: an action without `href`", f.file.path))?;
            let header = v
                .get("header")
                .and_then(Value::as_object)
                // The body's framing is ours to set.
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| !k.eq_ignore_ascii_case("content-length") && !k.eq_ignore_ascii_case("transfer-encoding"))
                        .filter_map(|(k, v)| Some((k.clone(), json_str(v)?)))
                        .collect()
                })
                .unwrap_or_default();
            Ok(Href { url: url.to_string(), header })
        };
        let up = href(upload)?;
        let chunk = up.header.iter().find(|(k, _)| k == "chunk_size").map(|(_, v)| v.clone());
        let transfer = match chunk {
            None => Transfer::Basic(up),
            Some(c) => {
                let chunk_size: u64 = c
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("{}: chunk_size {c:?} is not a positive integer", f.file.path))?;
                let mut parts: Vec<(u64, String)> = up
                    .header
                    .iter()
                    .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
                    .filter_map(|(k, v)| Some((k.parse().ok()?, v.clone())))
                    .collect();
                parts.sort();
                let want = f.file.size.div_ceil(chunk_size);
                if parts.len() as u64 != want {
                    return Err(format!(
                        "{}: {} part URLs for {} bytes in chunks of {chunk_size} (expected {want})",
                        f.file.path,
                        parts.len(),
                        f.file.size
                    ));
                }
                Transfer::Multipart {
                    complete: Href { url: up.url, header: Vec::new() },
                    chunk_size,
                    parts: parts.into_iter().map(|(_, u)| u).collect(),
                }
            }
        };
        let verify = match verify {
            None | Some(Value::Null) => None,
            Some(v) => Some(href(v)?),
        };
        Ok(LfsAction { upload: transfer, verify })
    }

    /// Streams one LFS file from disk to storage (one PUT, or one per part then the completion
    /// call), then calls `verify` when the Hub asked for it.
    pub(crate) fn lfs_upload(&self, f: &LfsFile, action: &LfsAction, bar: &ProgressBar) -> Result<()> {
        let path = &f.file.abs;
        let io = |e| PushError::Io { path: path.clone(), source: e };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let context = format!("sending {}: ", f.file.path);
        match &action.upload {
            Transfer::Basic(h) => {
                tracing::info!("uploading {} ({})", f.file.path, crate::util::bytes::human(f.file.size));
                let headers: Vec<(&str, &str)> = h.header.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let mut reader = Counted { inner: (&mut file).take(f.file.size), bar };
                let r = self.send("PUT", &h.url, Auth::Never, &headers, Some((&mut reader, f.file.size)), &context)?;
                if !(200..300).contains(&r.status) {
                    return Err(self.http_error("PUT", &h.url, &r));
                }
            }
            Transfer::Multipart { complete, chunk_size, parts } => {
                tracing::info!("uploading {} ({}, {} parts)", f.file.path, crate::util::bytes::human(f.file.size), parts.len());
                let mut done = Vec::with_capacity(parts.len());
                for (i, url) in parts.iter().enumerate() {
                    let start = i as u64 * chunk_size;
                    let len = (*chunk_size).min(f.file.size - start);
                    file.seek(SeekFrom::Start(start)).map_err(io)?;
                    let mut reader = Counted { inner: (&mut file).take(len), bar };
                    let r = self.send("PUT", url, Auth::Never, &[], Some((&mut reader, len)), &context)?;
                    if !(200..300).contains(&r.status) {
                        return Err(self.http_error("PUT", url, &r));
                    }
                    let etag = r.etag.filter(|e| !e.is_empty()).ok_or_else(|| PushError::Protocol {
                        url: shown(url),
                        reason: format!("{}: part {} answered without an ETag", f.file.path, i + 1),
                    })?;
                    done.push(json!({"partNumber": i + 1, "etag": etag}));
                }
                self.post_json(&complete.url, &json!({"oid": f.oid, "parts": done}), LFS_JSON)?;
            }
        }
        if let Some(v) = &action.verify {
            self.post_json(&v.url, &json!({"oid": f.oid, "size": f.file.size}), LFS_JSON)?;
        }
        Ok(())
    }

    /// The commit: a header line, the regular files inline (base64), the LFS files as pointers.
    pub(crate) fn commit(
        &self,
        repo: &RepoId,
        revision: &str,
        message: &str,
        regular: &[&LocalFile],
        lfs: &[LfsFile],
    ) -> Result<Committed> {
        let url = format!("{}/api/models/{repo}/commit/{}", self.endpoint, encode_segment(revision));
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut lines = vec![json!({"key": "header", "value": {"summary": message, "description": ""}})];
        for f in regular {
            let bytes = std::fs::read(&f.abs).map_err(|e| PushError::Io { path: f.abs.clone(), source: e })?;
            lines.push(json!({"key": "file", "value": {"content": b64.encode(&bytes), "path": f.path, "encoding": "base64"}}));
        }
        for f in lfs {
            lines.push(json!({"key": "lfsFile", "value": {"path": f.file.path, "algo": "sha256", "oid": f.oid, "size": f.file.size}}));
        }
        let mut body = Vec::new();
        for l in &lines {
            body.extend_from_slice(l.to_string().as_bytes());
            body.push(b'\n');
        }
        drop(lines);
        let len = body.len() as u64;
        let r = self.send(
            "POST",
            &url,
            Auth::SameOrigin,
            &[("Content-Type", "application/x-ndjson"), ("Accept", "application/json")],
            Some((&mut Cursor::new(body), len)),
            "",
        )?;
        if !(200..300).contains(&r.status) {
            return Err(self.http_error("POST", &url, &r));
        }
        let bad = |reason: String| PushError::Protocol { url: shown(&url), reason };
        let v: Value = serde_json::from_slice(&r.body).map_err(|e| bad(format!("the commit reply is not JSON: {e}")))?;
        let oid = v.get("commitOid").and_then(Value::as_str).map(str::to_string);
        let commit_url = match (v.get("commitUrl").and_then(Value::as_str), &oid) {
            (Some(u), _) => u.to_string(),
            (None, Some(o)) => format!("{}/{repo}/commit/{o}", self.endpoint),
            (None, None) => return Err(bad(format!("neither commitUrl nor commitOid in {v}"))),
        };
        Ok(Committed { url: commit_url, oid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(origin("https://HuggingFace.co/api/x?y=1").as_deref(), Some("https://huggingface.co"));
        assert_eq!(origin("http://127.0.0.1:4000").as_deref(), Some("http://127.0.0.1:4000"));
        assert_eq!(origin("http://127.0.0.1:4001/x"), Some("http://127.0.0.1:4001".into()));
        assert_eq!(origin("ftp://x"), None);
        assert_eq!(origin("https://user@evil"), None);
        assert_eq!(shown("https://s3/obj?X-Amz-Signature=abc"), "https://s3/obj?...");
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_segment("main"), "main");
        assert!(Hub::new("huggingface.co", Token::new("t").unwrap()).is_err());
    }
}
