//! Data-parallel gradient synchronisation on top of [`ProcessGroup`]: gradients are flattened
//! into buckets of at most `bucket_bytes` (one dtype and device per bucket), every bucket's
//! all-reduce is started before the first is awaited, and the sums are copied back. The trainer
//! calls it only on accumulation boundaries, so non-boundary micro-steps communicate nothing.

use std::time::Duration;

use tch::Tensor;

use super::{ProcessGroup, ReduceOp};
use crate::error::Result;

/// The collective operations the trainer needs; one process is the trivial case.
pub trait Collective {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// Sums every tensor in place across ranks.
    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()>;
    /// Copies rank `root`'s tensors into every rank's.
    fn broadcast(&self, tensors: &mut [Tensor], root: usize) -> Result<()>;
    /// Every rank's `values` (the same length everywhere), indexed by rank.
    fn all_gather_i64(&self, values: &[i64]) -> Result<Vec<Vec<i64>>>;
}

/// A single process: collectives are identities.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [Tensor], _: usize) -> Result<()> {
        Ok(())
    }
    fn all_gather_i64(&self, values: &[i64]) -> Result<Vec<Vec<i64>>> {
        Ok(vec![values.to_vec()])
    }
}

/// A process group seen by the trainer.
pub struct DdpGroup {
    pg: ProcessGroup,
    bucket_bytes: usize,
    timeout: Duration,
}

impl DdpGroup {
    /// Wraps a joined group.
    pub fn new(pg: ProcessGroup, bucket_mb: f64, timeout: Duration) -> Self {
        DdpGroup { pg, bucket_bytes: ((bucket_mb * 1024.0 * 1024.0) as usize).max(1), timeout }
    }

    /// Consecutive runs of tensors sharing dtype and device, each at most `bucket_bytes` (a
    /// tensor larger than that forms a bucket of its own).
    fn buckets(&self, tensors: &[Tensor]) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut bytes = 0;
        for (i, t) in tensors.iter().enumerate() {
            let b = t.numel() * t.kind().elt_size_in_bytes();
            let same = i > start && tensors[start].kind() == t.kind() && tensors[start].device() == t.device();
            if i > start && (!same || bytes + b > self.bucket_bytes) {
                out.push(start..i);
                start = i;
                bytes = 0;
            }
            bytes += b;
        }
        if start < tensors.len() {
            out.push(start..tensors.len());
        }
        out
    }
}

impl Collective for DdpGroup {
    fn rank(&self) -> usize {
        self.pg.rank()
    }

    fn world_size(&self) -> usize {
        self.pg.world_size()
    }

    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        let ranges = self.buckets(tensors);
        let mut flats: Vec<Tensor> =
            ranges.iter().map(|r| Tensor::cat(&tensors[r.clone()].iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0)).collect();
        let mut works = Vec::with_capacity(flats.len());
        for f in flats.iter_mut() {
            works.push(self.pg.all_reduce_async(f, ReduceOp::Sum, self.timeout)?);
        }
        for w in works {
            w.wait(self.timeout)?;
        }
        for (r, flat) in ranges.iter().zip(&flats) {
            let mut off = 0;
            for t in &mut tensors[r.clone()] {
                let n = t.numel() as i64;
                t.f_copy_(&flat.narrow(0, off, n).view_as(t))?;
                off += n;
            }
        }
        Ok(())
    }

    fn broadcast(&self, tensors: &mut [Tensor], root: usize) -> Result<()> {
        for t in tensors.iter_mut() {
            let mut c = t.contiguous();
            self.pg.broadcast(&mut c, root, self.timeout)?;
            if c.data_ptr() != t.data_ptr() {
                t.f_copy_(&c)?;
            }
        }
        Ok(())
    }

    fn all_gather_i64(&self, values: &[i64]) -> Result<Vec<Vec<i64>>> {
        // A CPU tensor: Gloo carries it whatever backend the gradients use.
        let t = Tensor::from_slice(values);
        let all = self.pg.all_gather(&t, self.timeout)?;
        Ok(all.iter().map(|t| Vec::<i64>::try_from(t).unwrap_or_default()).collect())
    }
}

/// The trainer's collective for a process at `env`: a single process unless the world size is > 1 (set by
/// `specforge-rs launch`, torchrun or SLURM), then a joined [`ProcessGroup`].
pub fn collective_for(env: &super::DistEnv, bucket_mb: f64, timeout: Duration) -> Result<Box<dyn Collective>> {
    let env = env.clone();
    if env.world_size <= 1 {
        return Ok(Box::new(SingleProcess));
    }
    let pg = ProcessGroup::new(env, &super::GroupOptions::with_timeout(timeout))?;
    Ok(Box::new(DdpGroup::new(pg, bucket_mb, timeout)))
}
