//! Push (after export): an export directory → a Hugging Face model repo, in one commit.
//!
//! The Hub's HTTP API, the way `huggingface_hub`'s `upload_folder` speaks it (see `docs/push.md`):
//!
//! 1. `POST /api/repos/create` (HTTP 409: it exists, fine);
//! 2. `POST /api/models/{repo}/preupload/{revision}`: the Hub says, per file, `regular` or `lfs`
//!    and whether the repo's `.gitignore` drops it;
//! 3. LFS files: sha256, the git-lfs batch API (`{repo}.git/info/lfs/objects/batch`), then one PUT
//!    of the file (or one per part when the Hub asks for a multipart upload) straight from disk to
//!    the storage URL it returns, then its `verify` call; objects the Hub already holds are skipped;
//! 4. `POST /api/models/{repo}/commit/{revision}` (NDJSON): a header with the message, the regular
//!    files inline (base64), the LFS files as `(path, sha256, size)` pointers.
//!
//! Why not the `hf-hub` crate: up to 0.4 it only downloads; 1.0 uploads, but hands LFS files to
//! Xet only (`hf-xet` plus a tokio / reqwest tree, far heavier than the rest of this crate's
//! networking) and, when the Hub does not pick Xet, inlines them in the commit body, which is no
//! way to send a 2 GB head. The protocol above is small enough to speak over a blocking client
//! (`ureq`, rustls with webpki roots).
//!
//! The token: `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the token file the
//! `hf auth login` command writes: `$HF_TOKEN_PATH`, else `$HF_HOME/token` with `HF_HOME`
//! defaulting to `$XDG_CACHE_HOME/huggingface`, then `~/.cache/huggingface`. It is sent only as
//! `Authorization: Bearer` and only to the endpoint's own origin (never to the presigned storage
//! URLs), is never logged, and is scrubbed from every error message, the server's included.

mod hub;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use hub::Hub;

/// The Hub's default endpoint (`HF_ENDPOINT` overrides it).
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Bytes of each file the Hub sees in `preupload` (it sniffs them for binary content).
const SAMPLE_BYTES: usize = 512;

/// Above this size the Hub refuses regular (non-LFS) files; the local rule uses the same bound.
pub const LFS_THRESHOLD: u64 = 10 * 1024 * 1024;

/// Extensions the local rule (`--dry-run`) sends through LFS whatever their size.
const LFS_EXTENSIONS: &[&str] = &[
    "safetensors",
    "bin",
    "pt",
    "pth",
    "ckpt",
    "gguf",
    "onnx",
    "npy",
    "npz",
    "h5",
    "msgpack",
    "png",
    "jpg",
    "jpeg",
    "gif",
    "webp",
    "zip",
    "gz",
    "tar",
];

/// Errors of `push`. No variant ever holds the token: HTTP errors carry the method, the URL
/// (query string dropped: presigned storage URLs carry signatures there), the status and the
/// server's message with the token scrubbed out; request headers are never included.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Reading a local file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The directory is not an export (`specforge-rs export` / `run` output).
    #[error("{}: not an export directory: {reason} (write one with `specforge-rs export` or `specforge-rs run`)", dir.display())]
    NotAnExport {
        /// The directory given.
        dir: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },

    /// The `--repo` argument is not a valid `ORG/NAME`.
    #[error("--repo `{repo}`: {reason}")]
    RepoId {
        /// The value given.
        repo: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The `--revision` argument is unusable.
    #[error("--revision `{revision}`: {reason}")]
    Revision {
        /// The value given.
        revision: String,
        /// What is wrong with it.
        reason: String,
    },

    /// No token in the environment nor in the token file.
    #[error("no Hugging Face token: {looked}; set HF_TOKEN or log in with `hf auth login`")]
    NoToken {
        /// Where we looked (variable names and the file path; never a value).
        looked: String,
    },

    /// `HF_ENDPOINT` is not an http(s) URL.
    #[error("HF_ENDPOINT `{endpoint}`: {reason}")]
    Endpoint {
        /// The value seen.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The server answered with an error status.
    #[error("{method} {url}: HTTP {status}: {message}{}", status_hint(*status))]
    Http {
        /// `POST`, `PUT`, `GET`.
        method: &'static str,
        /// The URL, query string dropped.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The server's message (`X-Error-Message`, the JSON `error`, or the body's start).
        message: String,
    },

    /// The request did not complete (connection refused, TLS, timeout, a file read mid-upload).
    #[error("{method} {url}: {message}")]
    Transport {
        /// `POST`, `PUT`, `GET`.
        method: &'static str,
        /// The URL, query string dropped.
        url: String,
        /// What failed.
        message: String,
    },

    /// The server answered 2xx with something we cannot use.
    #[error("{url}: unexpected reply: {reason}")]
    Protocol {
        /// The URL, query string dropped.
        url: String,
        /// What is wrong, with the value seen.
        reason: String,
    },
}

fn status_hint(status: u16) -> &'static str {
    match status {
        401 => " (is the token valid? check HF_TOKEN / the token file)",
        403 => " (does the token have write access to this repo or organization?)",
        _ => "",
    }
}

impl PushError {
    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PushError::Io { path: path.into(), source }
    }
}

/// The result type of this module.
pub type Result<T, E = PushError> = std::result::Result<T, E>;

/// A Hugging Face access token. Its `Debug` prints no secret; only [`Hub`] reads the value.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// A token from a string (surrounding whitespace trimmed); `None` when empty.
    pub fn new(s: &str) -> Option<Token> {
        let t = s.trim();
        (!t.is_empty()).then(|| Token(t.to_string()))
    }

    fn secret(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the token replaced by `<token>`.
    pub fn scrub(&self, text: &str) -> String {
        text.replace(&self.0, "<token>")
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Where the token came from (for the log; never the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// An environment variable, by name.
    Env(&'static str),
    /// A token file.
    File(PathBuf),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Env(v) => write!(f, "${v}"),
            TokenSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The token file `huggingface_hub` reads and `hf auth login` writes, given an environment lookup.
pub fn token_file(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(p) = set("HF_TOKEN_PATH") {
        return Some(PathBuf::from(p));
    }
    let home = set("HF_HOME").map(PathBuf::from).or_else(|| {
        set("XDG_CACHE_HOME")
            .map(|c| PathBuf::from(c).join("huggingface"))
            .or_else(|| set("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")))
    })?;
    Some(home.join("token"))
}

/// Finds the token given an environment lookup: `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, then the
/// token file ([`token_file`]).
pub fn find_token_in(env: &dyn Fn(&str) -> Option<String>) -> Result<(Token, TokenSource)> {
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Some(t) = env(var).as_deref().and_then(Token::new) {
            return Ok((t, TokenSource::Env(var)));
        }
    }
    let mut looked = "HF_TOKEN and HUGGING_FACE_HUB_TOKEN are unset or empty".to_string();
    match token_file(env) {
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(text) => match Token::new(&text) {
                Some(t) => return Ok((t, TokenSource::File(path))),
                None => looked.push_str(&format!(", and the token file {} is empty", path.display())),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                looked.push_str(&format!(", and there is no token file at {} (HF_TOKEN_PATH, else $HF_HOME/token)", path.display()))
            }
            Err(e) => return Err(PushError::io(path, e)),
        },
        None => looked.push_str(", and neither HF_TOKEN_PATH, HF_HOME, XDG_CACHE_HOME nor HOME is set to locate a token file"),
    }
    Err(PushError::NoToken { looked })
}

/// [`find_token_in`] over the process environment.
pub fn find_token() -> Result<(Token, TokenSource)> {
    find_token_in(&|k| std::env::var(k).ok())
}

/// The endpoint: `HF_ENDPOINT` or [`DEFAULT_ENDPOINT`], without a trailing slash.
pub fn endpoint_from_env() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
        .trim()
        .trim_end_matches('/')
        .to_string()
}

/// A model repo id, `namespace/name` (a user or an organization).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    /// The user or organization.
    pub namespace: String,
    /// The repo name.
    pub name: String,
}

impl std::str::FromStr for RepoId {
    type Err = PushError;

    /// The Hub's rules: `ORG/NAME`, each part 1 to 96 of `A-Z a-z 0-9 _ . -`, starting and ending
    /// with a letter, digit or `_`, with no `--` or `..`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| PushError::RepoId { repo: s.to_string(), reason: reason.to_string() };
        let (ns, name) = s.split_once('/').ok_or_else(|| bad("expected ORG/NAME (a user or organization, a slash, the repo name)"))?;
        for part in [ns, name] {
            let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
            let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if part.is_empty() || part.len() > 96 {
                return Err(bad("each of ORG and NAME must have 1 to 96 characters"));
            }
            if !part.chars().all(ok_char) {
                return Err(bad("only letters, digits, `_`, `.` and `-` are allowed, with one `/` between ORG and NAME"));
            }
            if !edge(part.chars().next()) || !edge(part.chars().last()) {
                return Err(bad("ORG and NAME must start and end with a letter, a digit or `_`"));
            }
            if part.contains("--") || part.contains("..") {
                return Err(bad("`--` and `..` are not allowed"));
            }
        }
        Ok(RepoId { namespace: ns.to_string(), name: name.to_string() })
    }
}

impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Checks a `--revision` (a branch name, or `refs/pr/N`).
pub fn check_revision(revision: &str) -> Result<()> {
    let bad = |reason: &str| Err(PushError::Revision { revision: revision.to_string(), reason: reason.to_string() });
    if revision.is_empty() {
        return bad("empty");
    }
    if revision.chars().any(|c| c.is_control() || c.is_whitespace()) || revision.contains("..") {
        return bad("a branch name has no spaces, control characters or `..`");
    }
    Ok(())
}

/// How a file travels: inline in the commit, or through LFS storage with a pointer in the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadMode {
    /// Inline (base64) in the commit.
    Regular,
    /// Uploaded to LFS storage; the commit holds its sha256 and size.
    Lfs,
}

impl fmt::Display for UploadMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UploadMode::Regular => "regular",
            UploadMode::Lfs => "lfs",
        })
    }
}

/// A file of the export directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    /// Its path in the repo (`/`-separated, relative to the export directory).
    pub path: String,
    /// Its path on disk.
    pub abs: PathBuf,
    /// Its size in bytes when listed.
    pub size: u64,
}

/// The files an export directory would push, and the hidden entries left out.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// The files, sorted by path.
    pub files: Vec<LocalFile>,
    /// Hidden files and directories (a leading `.`: `.git`, `.cache`, temporaries of an
    /// interrupted write) and symlinks (never followed: one could point at a private file), which
    /// are not pushed.
    pub skipped: Vec<String>,
    /// Regular files the last export did not write (stale files of an older export, or added
    /// by hand), named and not pushed. Empty for a head without an export record.
    pub left_out: Vec<String>,
}

/// Checks that `dir` is an export, with export's own validator (config, every tensor's name,
/// shape and dtype, the vocabulary maps): nothing else is uploaded.
pub fn check_export(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(PushError::NotAnExport { dir: dir.to_path_buf(), reason: "no such directory".into() });
    }
    crate::export::validate_dir(dir).map(|_| ()).map_err(|e| PushError::NotAnExport { dir: dir.to_path_buf(), reason: e.to_string() })
}

/// Lists the files under `dir` (recursively, sorted), leaving hidden entries out.
pub fn collect(dir: &Path) -> Result<Listing> {
    let mut listing = Listing::default();
    walk(dir, "", &mut listing)?;
    if let Some(written) =
        crate::export::recorded_files(dir).map_err(|e| PushError::NotAnExport { dir: dir.to_path_buf(), reason: e.to_string() })?
    {
        let (keep, stale): (Vec<LocalFile>, Vec<LocalFile>) = listing.files.into_iter().partition(|f| written.contains(&f.path));
        listing.files = keep;
        listing.left_out = stale.into_iter().map(|f| f.path).collect();
    }
    listing.files.sort_by(|a, b| a.path.cmp(&b.path));
    listing.skipped.sort();
    listing.left_out.sort();
    Ok(listing)
}

fn walk(dir: &Path, prefix: &str, out: &mut Listing) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| PushError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| PushError::io(dir, e))?;
        let abs = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(PushError::io(&abs, std::io::Error::new(std::io::ErrorKind::InvalidData, "file name is not UTF-8")));
        };
        let rel = format!("{prefix}{name}");
        if name.starts_with('.') {
            out.skipped.push(rel);
            continue;
        }
        // The entry itself, never what a symlink points at.
        let meta = std::fs::symlink_metadata(&abs).map_err(|e| PushError::io(&abs, e))?;
        if meta.is_dir() {
            walk(&abs, &format!("{rel}/"), out)?;
        } else if meta.is_file() {
            out.files.push(LocalFile { path: rel, abs, size: meta.len() });
        } else {
            out.skipped.push(rel);
        }
    }
    Ok(())
}

/// The first [`SAMPLE_BYTES`] bytes of a file.
fn sample(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| PushError::io(path, e))?;
    let mut buf = Vec::with_capacity(SAMPLE_BYTES);
    f.take(SAMPLE_BYTES as u64).read_to_end(&mut buf).map_err(|e| PushError::io(path, e))?;
    Ok(buf)
}

/// The local rule `--dry-run` shows (the Hub decides for a real push, by much the same rule):
/// LFS for weights and images by extension, for files over [`LFS_THRESHOLD`], and for binary
/// files (a NUL byte in the first 512); regular otherwise, and always for empty files.
pub fn local_mode(f: &LocalFile) -> Result<UploadMode> {
    if f.size == 0 {
        return Ok(UploadMode::Regular);
    }
    let ext = Path::new(&f.path).extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).unwrap_or_default();
    if LFS_EXTENSIONS.contains(&ext.as_str()) || f.size > LFS_THRESHOLD || sample(&f.abs)?.contains(&0) {
        return Ok(UploadMode::Lfs);
    }
    Ok(UploadMode::Regular)
}

/// The sha256 of a file (hex), streamed from disk.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| PushError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| PushError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What to push where.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The target repo (created if missing).
    pub repo: RepoId,
    /// The branch to commit to.
    pub revision: String,
    /// Create the repo private (no effect on an existing one).
    pub private: bool,
    /// The commit message.
    pub message: String,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The commit's URL on the Hub.
    pub commit_url: String,
    /// The commit's id, when the Hub returned it.
    pub commit_oid: Option<String>,
    /// Whether the repo was created by this push (false: it existed).
    pub created: bool,
    /// The files committed, each with how it went.
    pub files: Vec<(LocalFile, UploadMode)>,
    /// Files the repo's `.gitignore` drops (the Hub's `shouldIgnore`), not committed.
    pub ignored: Vec<String>,
    /// LFS bytes sent (objects the Hub already held are not sent again).
    pub lfs_bytes_sent: u64,
    /// LFS objects the Hub already held.
    pub lfs_already_present: usize,
}

/// Pushes the export in `dir` to `opts.repo` in one commit. See the module docs for the protocol.
pub fn push(dir: &Path, opts: &PushOptions, hub: &Hub) -> Result<Pushed> {
    check_export(dir)?;
    check_revision(&opts.revision)?;
    let listing = collect(dir)?;
    for s in &listing.skipped {
        tracing::info!("skipping {s} (hidden or a symlink)");
    }
    for s in &listing.left_out {
        tracing::warn!("leaving out {s}: the last export did not write it (stale, or added by hand)");
    }
    let created = hub.create_repo(&opts.repo, opts.private)?;
    if created {
        tracing::info!("created {}{}", opts.repo, if opts.private { " (private)" } else { "" });
    } else if opts.private {
        tracing::warn!("{} already exists; its visibility is left as it is", opts.repo);
    }

    let samples = listing.files.iter().map(|f| Ok((f, sample(&f.abs)?))).collect::<Result<Vec<_>>>()?;
    let modes = hub.preupload(&opts.repo, &opts.revision, &samples)?;
    let mut regular = Vec::new();
    let mut lfs = Vec::new();
    let mut ignored = Vec::new();
    for (f, (mode, ignore)) in listing.files.iter().zip(modes) {
        if ignore {
            tracing::info!("{}: ignored by the repo's .gitignore, not pushed", f.path);
            ignored.push(f.path.clone());
        } else if mode == UploadMode::Lfs && f.size > 0 {
            lfs.push(f);
        } else {
            regular.push(f);
        }
    }

    let mut lfs_files = Vec::with_capacity(lfs.len());
    for f in lfs {
        tracing::info!("hashing {} ({})", f.path, crate::util::bytes::human(f.size));
        let oid = sha256_file(&f.abs)?;
        // The size the Hub is told must be the size hashed.
        let size = std::fs::metadata(&f.abs).map_err(|e| PushError::io(&f.abs, e))?.len();
        lfs_files.push(hub::LfsFile { file: LocalFile { size, ..f.clone() }, oid });
    }
    let mut todo = hub.lfs_batch(&opts.repo, &opts.revision, &lfs_files)?;
    // Identical files share one object: send it once.
    let (mut seen, mut present) = (std::collections::HashSet::new(), 0);
    for (f, t) in lfs_files.iter().zip(todo.iter_mut()) {
        if !seen.insert(f.oid.as_str()) {
            *t = None;
        } else if t.is_none() {
            present += 1;
        }
    }
    let to_send: u64 = lfs_files.iter().zip(&todo).filter(|(_, t)| t.is_some()).map(|(f, _)| f.file.size).sum();
    if present > 0 {
        tracing::info!("{present} LFS object(s) already on the Hub, not sent again");
    }
    let bar = crate::util::progress::bar(to_send, "upload");
    for (f, action) in lfs_files.iter().zip(&todo) {
        if let Some(action) = action {
            bar.set_message(f.file.path.clone());
            hub.lfs_upload(f, action, &bar)?;
        }
    }
    bar.finish_and_clear();

    let committed = hub.commit(&opts.repo, &opts.revision, &opts.message, &regular, &lfs_files)?;
    let mut files: Vec<(LocalFile, UploadMode)> = regular.into_iter().map(|f| (f.clone(), UploadMode::Regular)).collect();
    files.extend(lfs_files.into_iter().map(|f| (f.file, UploadMode::Lfs)));
    files.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    Ok(Pushed {
        commit_url: committed.url,
        commit_oid: committed.oid,
        created,
        files,
        ignored,
        lfs_bytes_sent: to_send,
        lfs_already_present: present,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn token_sources_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("hf");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("token"), "  hf_fromfile \n").unwrap();
        let h = home.to_str().unwrap();
        let (t, s) = find_token_in(&env(&[("HF_TOKEN", "hf_env"), ("HF_HOME", h)])).unwrap();
        assert_eq!((t.secret(), s), ("hf_env", TokenSource::Env("HF_TOKEN")));
        let (t, s) = find_token_in(&env(&[("HF_TOKEN", " "), ("HF_HOME", h)])).unwrap();
        assert_eq!((t.secret(), s), ("hf_fromfile", TokenSource::File(home.join("token"))));
        // HF_TOKEN_PATH wins over HF_HOME; HOME/.cache/huggingface is the default.
        std::fs::write(dir.path().join("other"), "hf_other").unwrap();
        let other = dir.path().join("other");
        let (t, _) = find_token_in(&env(&[("HF_TOKEN_PATH", other.to_str().unwrap()), ("HF_HOME", h)])).unwrap();
        assert_eq!(t.secret(), "hf_other");
        assert_eq!(token_file(&env(&[("HOME", "/home/u")])), Some(PathBuf::from("/home/u/.cache/huggingface/token")));
        assert_eq!(token_file(&env(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/c")])), Some(PathBuf::from("/c/huggingface/token")));
        let e = find_token_in(&env(&[("HF_HOME", dir.path().join("none").to_str().unwrap())])).unwrap_err().to_string();
        assert!(e.contains("HF_TOKEN") && e.contains("none/token"), "{e}");
    }

    #[test]
    fn token_never_printed() {
        let t = Token::new("hf_SECRETvalue").unwrap();
        assert!(!format!("{t:?}").contains("SECRET"));
        assert_eq!(t.scrub("got Bearer hf_SECRETvalue here"), "got Bearer <token> here");
    }

    #[test]
    fn repo_ids() {
        let r: RepoId = "my-org/eagle3_head.v1".parse().unwrap();
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("my-org", "eagle3_head.v1"));
        assert_eq!(r.to_string(), "my-org/eagle3_head.v1");
        for bad in ["name", "a/b/c", "/x", "x/", "a/-x", "a/x.", "a/x--y", "a/x..y", "a/x y", "a/é"] {
            assert!(bad.parse::<RepoId>().is_err(), "{bad}");
        }
        assert!(check_revision("main").is_ok() && check_revision("refs/pr/3").is_ok());
        assert!(check_revision("a b").is_err() && check_revision("").is_err());
    }

    #[test]
    fn local_rule_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("config.json"), "{}").unwrap();
        std::fs::write(d.join("model.safetensors"), "text-looking but weights").unwrap();
        std::fs::write(d.join("plot.png"), b"\x89PNG").unwrap();
        std::fs::write(d.join("blob.dat"), b"a\0b").unwrap();
        std::fs::write(d.join("empty.bin"), b"").unwrap();
        std::fs::write(d.join(".model.safetensors.tmp-1"), b"partial").unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/notes.md"), "hi").unwrap();
        // Symlinks are never followed: not to a private file, not to a directory.
        let private = tempfile::tempdir().unwrap();
        std::fs::write(private.path().join("id_rsa"), "secret").unwrap();
        std::os::unix::fs::symlink(private.path().join("id_rsa"), d.join("key.txt")).unwrap();
        std::os::unix::fs::symlink(private.path(), d.join("home")).unwrap();
        let l = collect(d).unwrap();
        let names: Vec<&str> = l.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["blob.dat", "config.json", "empty.bin", "model.safetensors", "plot.png", "sub/notes.md"]);
        assert_eq!(l.skipped, [".model.safetensors.tmp-1", "home", "key.txt"]);
        assert!(l.left_out.is_empty());
        // With an export record, only what the export wrote goes; the rest is named.
        crate::export::record_files(d, &["config.json", "model.safetensors", "plot.png"], true).unwrap();
        let r = collect(d).unwrap();
        let names: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["config.json", "model.safetensors", "plot.png"]);
        assert_eq!(r.left_out, ["blob.dat", "empty.bin", "sub/notes.md"]);
        std::fs::remove_file(d.join(crate::export::RECORD)).unwrap();
        let l = collect(d).unwrap();
        let modes: Vec<UploadMode> = l.files.iter().map(|f| local_mode(f).unwrap()).collect();
        use UploadMode::*;
        assert_eq!(modes, [Lfs, Regular, Regular, Lfs, Lfs, Regular]);
        assert_eq!(sha256_file(&d.join("config.json")).unwrap(), "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a");
    }

    #[test]
    fn export_check() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let err = |d: &Path| check_export(d).unwrap_err().to_string();
        assert!(err(&d.join("absent")).contains("no such directory"));
        assert!(err(d).contains("no config.json"));
        std::fs::write(d.join("config.json"), r#"{"architectures": ["LlamaForCausalLM"]}"#).unwrap();
        assert!(err(d).contains("LlamaForCausalLMEagle3"));
        // A real export passes; junk or a missing tensor in its weights does not.
        let draft = crate::draft::tiny_draft(true);
        crate::export::export(&draft, d, crate::export::Format::Vllm, None).unwrap();
        check_export(d).unwrap();
        let other = tempfile::tempdir().unwrap();
        let good = other.path().join("good.safetensors");
        std::fs::copy(d.join("model.safetensors"), &good).unwrap();
        std::fs::write(d.join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
        assert!(err(d).contains("model.safetensors"));
        let f = crate::weights::SafetensorsFile::open(&good).unwrap();
        let kept: Vec<(String, tch::Tensor)> = f.names().filter(|n| *n != "d2t").map(|n| (n.to_string(), f.tensor(n).unwrap())).collect();
        crate::weights::save_safetensors(&d.join("model.safetensors"), &kept, None).unwrap();
        assert!(err(d).contains("d2t"));
    }
}
