//! Data-parallel plumbing: PyTorch's own distributed engine (c10d) inside libtorch, reached
//! through a thin C++ shim, plus a torchrun-style launcher.
//!
//! * [`ProcessGroup`]: rendezvous through c10d's TCPStore at MASTER_ADDR:MASTER_PORT, collectives
//!   (all_reduce, broadcast, all_gather, barrier) on ProcessGroupGloo for CPU tensors and, with
//!   the `nccl` cargo feature, ProcessGroupNCCL for CUDA tensors. Every call has an explicit
//!   timeout; failures come back as [`DistError`] naming the rank, never as a hang.
//! * [`DistEnv`]: the job layout from torchrun's variables or SLURM's.
//! * [`launch`]: `specforge-rs launch`, which starts the ranks with torchrun's environment.
//!
//! docs/distributed.md is the user guide (torchrun, SLURM, multi-node, diagnosing hangs).

mod ddp;
mod env;
mod ffi;
pub mod launch;
mod process_group;

use std::time::Duration;

pub use ddp::{collective_for, Collective, DdpGroup, SingleProcess};
pub use env::{first_host, DistEnv, EnvSource, StoreMode, DEFAULT_PORT};
pub use ffi::set_autocast_cuda_bf16;
pub use process_group::{Backend, BackendChoice, GroupOptions, ProcessGroup, ReduceOp, Work};

/// Errors of the distributed layer. Each names the rank it happened on where there is one.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A distributed environment variable is malformed or inconsistent.
    #[error("distributed environment: {var}={value:?}: {problem}")]
    Env {
        /// The variable.
        var: String,
        /// Its value ("" when missing).
        value: String,
        /// What is wrong.
        problem: String,
    },

    /// Joining the group failed: the store could not be reached or hosted, or not every rank
    /// joined within the timeout.
    #[error("rank {rank}: rendezvous at {addr} failed: {message}")]
    Rendezvous {
        /// This rank.
        rank: usize,
        /// MASTER_ADDR:MASTER_PORT.
        addr: String,
        /// c10d's message, with a hint.
        message: String,
    },

    /// A collective failed or timed out.
    #[error(
        "rank {rank}/{world_size}: {op} {} after {:.1} s: {message}{}",
        if *timed_out { "timed out" } else { "failed" },
        elapsed.as_secs_f64(),
        if diagnosis.is_empty() { String::new() } else { format!(" -- {diagnosis}") }
    )]
    Collective {
        /// This rank.
        rank: usize,
        /// The group's size.
        world_size: usize,
        /// The operation (all_reduce, broadcast, all_gather, barrier).
        op: &'static str,
        /// Time from the start of the operation to the error.
        elapsed: Duration,
        /// Whether it was a timeout (rather than e.g. a reset connection).
        timed_out: bool,
        /// The backend's message.
        message: String,
        /// Which peers stopped responding, from the heartbeats in the store.
        diagnosis: String,
    },

    /// The group failed earlier; c10d groups are unusable after an error.
    #[error("rank {rank}: the process group failed earlier ({first}); rebuild it or exit")]
    Failed {
        /// This rank.
        rank: usize,
        /// The first failure.
        first: String,
    },

    /// A store operation failed.
    #[error("rank {rank}: store {op} of `{key}` failed: {message}")]
    Store {
        /// This rank.
        rank: usize,
        /// set / get.
        op: &'static str,
        /// The key.
        key: String,
        /// c10d's message.
        message: String,
    },

    /// An argument is unusable (non-contiguous tensor, wrong device, bad root rank ...).
    #[error("rank {rank}: {op}: {problem}")]
    Invalid {
        /// This rank.
        rank: usize,
        /// The operation.
        op: &'static str,
        /// What is wrong.
        problem: String,
    },

    /// The launcher failed: a rank failed (named in the message), or the ranks could not be
    /// started.
    #[error("launch: {0}")]
    Launch(String),
}

impl DistError {
    /// The rank the error happened on, when it concerns one process.
    pub fn rank(&self) -> Option<usize> {
        match self {
            DistError::Rendezvous { rank, .. }
            | DistError::Collective { rank, .. }
            | DistError::Failed { rank, .. }
            | DistError::Store { rank, .. }
            | DistError::Invalid { rank, .. } => Some(*rank),
            DistError::Env { .. } | DistError::Launch(_) => None,
        }
    }

    /// Whether the error is a timeout of a collective.
    pub fn is_timeout(&self) -> bool {
        matches!(self, DistError::Collective { timed_out: true, .. })
    }
}
