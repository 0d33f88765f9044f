//! What every stage runs with, resolved once in `main`: where this process sits in the job, the
//! device it computes on, its thread count and whether it prints.
//!
//! Nothing else in the crate reads `RANK`, `LOCAL_RANK`, SLURM's variables or asks libtorch for
//! CUDA: stages take a [`Runtime`]. The job environment comes from [`DistEnv`] (torchrun and
//! `launch` variables first, SLURM's as the fallback, a single process otherwise); the device is
//! `cuda:{local_rank}` when CUDA is present, the CPU otherwise, unless `--device` says.
//!
//! [`LoadedTarget`] is the other thing stages share: the resolved target directory, its config,
//! tokenizer and (loaded on first use) frozen model, so `run` loads the target once for all its
//! stages while each command loads it for itself through the same code.

use std::cell::OnceCell;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::Args;
use tch::{Device, Kind};

use crate::config::{DataConfig, TargetConfig, TargetSpec};
use crate::data::Tokenizer;
use crate::data::{Sample, TokenizeOptions};
use crate::dist::{DistEnv, DistError};
use crate::error::{Error, Result};
use crate::target::{self, registry, TargetModel};

/// `--device`: where tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// `cuda:{local_rank}` when CUDA is present, else the CPU.
    #[default]
    Auto,
    /// The CPU, even on a GPU host.
    Cpu,
    /// `cuda:N` (`cuda` alone = `cuda:{local_rank}`).
    Cuda(Option<usize>),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(None)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| DeviceChoice::Cuda(Some(n)))
                .ok_or_else(|| format!("`{other}`: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(None) => f.write_str("cuda"),
            DeviceChoice::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// The global flags every command takes.
#[derive(Args, Debug, Clone, Default)]
pub struct RuntimeArgs {
    /// Device: auto (cuda:LOCAL_RANK when CUDA is present, else cpu), cpu, cuda or cuda:N.
    #[arg(long, global = true, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Intra-op CPU threads (0 = libtorch's default, or OMP_NUM_THREADS).
    #[arg(long, global = true, default_value_t = 0)]
    pub threads: usize,
}

/// Where and how this process runs.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The job environment (rank, world size, local rank, rendezvous).
    pub env: DistEnv,
    /// The device this process computes on.
    pub device: Device,
    /// Intra-op threads (0 = libtorch's default).
    pub threads: usize,
    /// Whether this process prints results and draws progress bars (rank 0).
    pub prints: bool,
}

/// An error resolving the runtime: a malformed job environment or an impossible `--device`.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The torchrun / SLURM variables are malformed or inconsistent.
    #[error(transparent)]
    Env(#[from] DistError),
    /// `--device cuda:N` where N GPUs are not there.
    #[error("--device {asked}: this host reports {count} CUDA device(s)")]
    NoSuchDevice {
        /// What was asked.
        asked: String,
        /// CUDA devices present.
        count: usize,
    },
}

impl Runtime {
    /// Resolves the runtime of this process from its environment and libtorch's CUDA count.
    pub fn resolve(args: &RuntimeArgs) -> std::result::Result<Self, RuntimeError> {
        let cuda = if tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 };
        Self::from_parts(args, |k| std::env::var(k).ok(), cuda)
    }

    /// Resolves from variables read through `get` and `cuda_devices` CUDA devices (injectable
    /// for tests).
    pub fn from_parts(
        args: &RuntimeArgs,
        get: impl Fn(&str) -> Option<String>,
        cuda_devices: usize,
    ) -> std::result::Result<Self, RuntimeError> {
        let env = DistEnv::from_vars(get)?;
        let local = env.local_rank;
        let device = match args.device {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Auto if cuda_devices == 0 => Device::Cpu,
            DeviceChoice::Auto => Device::Cuda(local % cuda_devices),
            DeviceChoice::Cuda(n) => {
                let i = n.unwrap_or(local);
                if i >= cuda_devices {
                    return Err(RuntimeError::NoSuchDevice { asked: args.device.to_string(), count: cuda_devices });
                }
                Device::Cuda(i)
            }
        };
        Ok(Runtime { prints: env.rank == 0, env, device, threads: args.threads })
    }

    /// One CPU process, rank 0 of 1 (tests and library callers).
    pub fn cpu() -> Self {
        Runtime { env: DistEnv::single(), device: Device::Cpu, threads: 0, prints: true }
    }

    /// Global rank.
    pub fn rank(&self) -> usize {
        self.env.rank
    }

    /// Ranks in the job.
    pub fn world_size(&self) -> usize {
        self.env.world_size
    }

    /// Rank on this node.
    pub fn local_rank(&self) -> usize {
        self.env.local_rank
    }

    /// `cpu` or `cuda:N`, as logs and reports write it.
    pub fn device_name(&self) -> String {
        match self.device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        }
    }

    /// Applies the process-wide parts: the thread count and whether progress bars draw.
    pub fn install(&self) {
        if self.threads > 0 {
            tch::set_num_threads(self.threads as i32);
        }
        crate::util::progress::set_visible(self.prints);
    }
}

/// A target as stages use it: directory, config and tokenizer at once, the model on first use.
pub struct LoadedTarget {
    /// What the recipe or `--target` named.
    pub spec: TargetSpec,
    /// The resolved model directory.
    pub dir: PathBuf,
    /// Its config.
    pub cfg: TargetConfig,
    /// Its tokenizer and chat template.
    pub tok: Tokenizer,
    /// Compute dtype on the runtime's device.
    pub kind: Kind,
    device: Device,
    model: OnceCell<Box<dyn TargetModel>>,
}

impl LoadedTarget {
    /// Resolves `spec` to a directory and reads its config and tokenizer (no weights yet).
    pub fn open(spec: &TargetSpec, rt: &Runtime) -> Result<Self> {
        let dir = registry::resolve(&spec.name)?;
        let cfg = TargetConfig::from_path(&dir)?;
        let tok = Tokenizer::from_dir(&dir)?;
        Ok(LoadedTarget { spec: spec.clone(), kind: spec.dtype.kind(rt.device), dir, cfg, tok, device: rt.device, model: OnceCell::new() })
    }

    /// The frozen model, loaded on first use.
    pub fn model(&self) -> Result<&dyn TargetModel> {
        if let Some(m) = self.model.get() {
            return Ok(m.as_ref());
        }
        tracing::info!(target = %self.dir.display(), kind = ?self.kind, device = ?self.device, "loading target");
        let m = target::load(&self.dir, self.kind, self.device)?;
        Ok(self.model.get_or_init(|| m).as_ref())
    }

    /// Token ids that end an answer (config EOS ids and the tokenizer's end-of-turn tokens).
    pub fn stop_ids(&self) -> Vec<i64> {
        crate::data::stop_ids(&self.tok, &self.cfg.eos_token_ids)
    }

    /// How `data` tokenises for this target.
    pub fn tokenize_options(&self, data: &DataConfig) -> TokenizeOptions {
        TokenizeOptions { max_len: data.max_len, truncation: data.truncation, multimodal: self.spec.multimodal, ..Default::default() }
    }

    /// The usable samples of the dataset at `path` as this target tokenises them, the first
    /// `data.limit` of them. Bad lines go to `report` (written by the process that prints); too
    /// many of them, or none usable, is an error.
    pub fn samples(&self, path: &Path, data: &DataConfig, report: &Path, rt: &Runtime) -> Result<Vec<Sample>> {
        let (convs, mut bad) = crate::data::read_jsonl(path, &Default::default())?;
        let mut samples = crate::data::tokenize(&convs, &self.tok, &self.cfg.eos_token_ids, &self.tokenize_options(data), &mut bad);
        bad.check(data.max_bad_fraction, report, rt.prints)?;
        if let Some(n) = data.limit {
            samples.truncate(n);
        }
        if samples.is_empty() {
            return Err(Error::Input(format!("{}: no usable sample (see {})", path.display(), report.display())));
        }
        Ok(samples)
    }
}

/// `path` with `suffix` appended to its file name (`out.jsonl` → `out.jsonl.bad-lines.jsonl`).
pub fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn rt(vars: &[(&str, &str)], cuda: usize, device: &str) -> Runtime {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let args = RuntimeArgs { device: device.parse().unwrap(), threads: 0 };
        Runtime::from_parts(&args, |k| map.get(k).cloned(), cuda).unwrap()
    }

    #[test]
    fn torchrun_slurm_and_plain_environments() {
        let plain = rt(&[], 0, "auto");
        assert_eq!((plain.rank(), plain.local_rank(), plain.world_size(), plain.device_name()), (0, 0, 1, "cpu".into()));
        assert!(plain.prints);

        let torchrun = [("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")];
        let r = rt(&torchrun, 2, "auto");
        assert_eq!((r.rank(), r.local_rank(), r.world_size(), r.device_name()), (3, 1, 4, "cuda:1".into()));
        assert!(!r.prints);
        assert_eq!(rt(&torchrun, 0, "auto").device_name(), "cpu");
        assert_eq!(rt(&torchrun, 2, "cpu").device_name(), "cpu");
        assert_eq!(rt(&torchrun, 2, "cuda").device_name(), "cuda:1");
        assert_eq!(rt(&torchrun, 2, "cuda:0").device_name(), "cuda:0");

        let slurm = [("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "1"), ("SLURM_NTASKS_PER_NODE", "2")];
        let s = rt(&slurm, 2, "auto");
        assert_eq!((s.rank(), s.local_rank(), s.world_size(), s.device_name()), (1, 1, 2, "cuda:1".into()));
        // torchrun's variables win under `srun torchrun`.
        let both = [("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("RANK", "0"), ("WORLD_SIZE", "1")];
        assert_eq!(rt(&both, 0, "auto").rank(), 0);
    }

    #[test]
    fn impossible_devices_and_environments_are_errors() {
        let args = RuntimeArgs { device: "cuda:3".parse().unwrap(), threads: 0 };
        let e = Runtime::from_parts(&args, |_| None, 2).unwrap_err().to_string();
        assert!(e.contains("cuda:3") && e.contains('2'), "{e}");
        let e = Runtime::from_parts(&RuntimeArgs::default(), |k| (k == "RANK").then(|| "x".to_string()), 0).unwrap_err().to_string();
        assert!(e.contains("RANK"), "{e}");
        assert!("tpu".parse::<DeviceChoice>().is_err());
    }
}
