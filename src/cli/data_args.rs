//! Options shared by the subcommands that read a conversation dataset.

use std::path::{Path, PathBuf};

use clap::Args;
use tch::{Device, Kind};

use crate::data::{self as dataset, ReadOptions, Truncation};
use crate::data::{Report, TokenizeOptions};

/// How a dataset is read, tokenised and policed.
#[derive(Args, Debug, Clone)]
pub struct DatasetArgs {
    /// Longest sample in tokens (see --truncation).
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    /// Over-long samples: `truncate` keeps the first --max-len tokens if an assistant token
    /// survives (else the line is reported as over_long); `drop` reports every over-long sample.
    #[arg(long, value_enum, default_value_t = Truncation::Truncate)]
    pub truncation: Truncation,
    /// Stop when more than this fraction of lines is bad (every bad line is reported either way).
    #[arg(long, default_value_t = 0.05)]
    pub max_bad_fraction: f64,
    /// Where the bad-line report goes (JSONL: file, line, kind, reason).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Use only the first N usable samples.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl DatasetArgs {
    /// Tokenisation options from the flags.
    pub fn tokenize_options(&self) -> TokenizeOptions {
        TokenizeOptions { max_len: self.max_len, truncation: self.truncation, ..Default::default() }
    }

    /// Reads the dataset at `path` (no tokenisation).
    pub fn read(&self, path: &Path) -> crate::Result<(Vec<crate::data::Conversation>, Report)> {
        dataset::read_jsonl(path, &ReadOptions::default())
    }

    /// The report path: --report, or `default`.
    pub fn report_path(&self, default: PathBuf) -> PathBuf {
        self.report.clone().unwrap_or(default)
    }
}

/// `--dtype`: `auto` is bf16 on a GPU and f32 on the CPU (CPU bf16 matmuls are slow).
pub fn compute_kind(s: &str, device: Device) -> anyhow::Result<Kind> {
    if s == "auto" {
        return Ok(if device.is_cuda() { Kind::BFloat16 } else { Kind::Float });
    }
    super::generate::parse_kind(s)
}

/// The device: GPU `LOCAL_RANK` (as torchrun sets it) when CUDA is available, else the CPU.
pub fn device() -> Device {
    if tch::Cuda::is_available() {
        let local = std::env::var("LOCAL_RANK").ok().and_then(|r| r.parse::<usize>().ok()).unwrap_or(0);
        Device::Cuda(local % tch::Cuda::device_count().max(1) as usize)
    } else {
        Device::Cpu
    }
}
