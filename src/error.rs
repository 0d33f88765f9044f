//! The crate's error type: every variant names the file, tensor or field at fault and the value seen.

use std::path::PathBuf;

/// Errors of the library. The binary wraps them in `anyhow` at its edges.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file did not parse into what we expect.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error (it carries line and column).
        #[source]
        source: serde_json::Error,
    },

    /// A TOML file did not parse into what we expect.
    #[error("{}: {message}", path.display())]
    Toml {
        /// The file.
        path: PathBuf,
        /// The parser's message (it carries the line and the key).
        message: String,
    },

    /// A config value is missing, out of range or inconsistent.
    #[error("{}: `{field}` {problem}", path.display())]
    Config {
        /// The config file (or a pseudo path naming where the value came from).
        path: PathBuf,
        /// The field at fault.
        field: String,
        /// What is wrong, with the value seen.
        problem: String,
    },

    /// A model_type we do not implement.
    #[error("{}: unsupported model_type `{model_type}`; supported: {supported}", path.display())]
    UnsupportedModel {
        /// The config.json.
        path: PathBuf,
        /// The model_type found.
        model_type: String,
        /// The supported model types, comma separated.
        supported: String,
    },

    /// A checkpoint file that is not safetensors (pickle `.bin` / `.pt` are never loaded).
    #[error("{}: refusing to load a pickle checkpoint ({reason}); only safetensors is loaded, convert it with `safetensors.torch.save_file`", path.display())]
    PickleRefused {
        /// The offending file.
        path: PathBuf,
        /// Why we think it is a pickle.
        reason: String,
    },

    /// A safetensors file that cannot be parsed (truncated, corrupt header, unsupported dtype).
    #[error("{}: invalid safetensors file: {reason}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// Tensors a model needs are absent from the checkpoint.
    #[error("{}: missing tensors: {}", path.display(), names.join(", "))]
    MissingTensors {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// The names looked for.
        names: Vec<String>,
    },

    /// A checkpoint holds tensors the model does not use.
    #[error("{}: unexpected tensors: {}", path.display(), names.join(", "))]
    UnexpectedTensors {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// The names found.
        names: Vec<String>,
    },

    /// A tensor has a different shape than the config implies.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}{}", origin(path))]
    Shape {
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<i64>,
        /// Shape seen.
        got: Vec<i64>,
        /// The file it came from, when there is one.
        path: Option<PathBuf>,
    },

    /// A tensor has a dtype we cannot use.
    #[error("tensor `{name}` has dtype {got}, expected {expected}{}", origin(path))]
    Dtype {
        /// Tensor name.
        name: String,
        /// Expected dtypes.
        expected: String,
        /// Dtype seen.
        got: String,
        /// The file it came from, when there is one.
        path: Option<PathBuf>,
    },

    /// Tokenizer loading or encoding failed.
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer {
        /// The tokenizer.json.
        path: PathBuf,
        /// The tokenizers crate's message.
        message: String,
    },

    /// A chat template failed to compile or render.
    #[error("chat template from {}: {message}", path.display())]
    Template {
        /// Where the template came from.
        path: PathBuf,
        /// minijinja's message.
        message: String,
    },

    /// An input the caller passed is invalid (shapes, ids out of range, ...).
    #[error("invalid input: {0}")]
    Input(String),

    /// A distributed operation failed (rendezvous, a collective, a dead or frozen rank, the
    /// launcher); the error names the rank.
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    /// One line of a dataset is unusable (invalid JSON, unknown role, missing image, ...).
    #[error("{}:{line}: {message}", path.display())]
    Dataset {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong, with the value seen.
        message: String,
    },

    /// Too large a share of a dataset's lines are bad: the run stops instead of training on the rest.
    #[error("{}: {bad} of {total} lines are bad ({:.1}%), more than the allowed {:.1}% (--max-bad-fraction {threshold}); every bad line with its reason is listed in {}", path.display(), 100.0 * *bad as f64 / (*total).max(1) as f64, 100.0 * threshold, report.display())]
    TooManyBadLines {
        /// The dataset file.
        path: PathBuf,
        /// Bad lines.
        bad: usize,
        /// Non-blank lines read.
        total: usize,
        /// The allowed fraction.
        threshold: f64,
        /// The report listing them.
        report: PathBuf,
    },

    /// A feature shard (or its manifest entry) is corrupt, truncated or inconsistent.
    #[error("shard {}: {reason}", path.display())]
    Shard {
        /// The shard file (or manifest).
        path: PathBuf,
        /// What is wrong, with the values seen.
        reason: String,
    },

    /// A run would exceed its disk budget; nothing was written.
    #[error("refusing to start: {what} needs {}, more than {limit_name} {}", crate::util::bytes::human(*needed), crate::util::bytes::human(*limit))]
    DiskBudget {
        /// What would be written.
        what: String,
        /// Bytes it needs.
        needed: u64,
        /// The budget name (`--max-disk`, `free space on /x`).
        limit_name: String,
        /// The budget in bytes.
        limit: u64,
    },

    /// A libtorch call failed.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

fn origin(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// A config error on `field` of `path`.
    pub fn config(path: impl Into<PathBuf>, field: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Config { path: path.into(), field: field.into(), problem: problem.into() }
    }
}

/// Reads a file's bytes, naming it on failure.
pub fn read_bytes(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads a file to a string, naming it on failure.
pub fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Reads and parses a JSON file, naming it on failure.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}
