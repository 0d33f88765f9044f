//! Feature chunks as the trainer's micro-batches: the global plan of `extract::reader` split
//! across ranks like PyTorch's DistributedSampler (rank r takes plan entries r, r+W, r+2W, ...;
//! the tail that does not divide evenly is dropped so every rank steps the same number of times).

use std::sync::Arc;

use tch::Device;

use super::trainer::{MicroBatches, TrainBatch};
use crate::error::Result;
use crate::extract::reader::{plan_batches, BatchOptions, BatchSpec, Chunk, Prefetcher};

/// This rank's view of a set of chunks.
pub struct ChunkBatches {
    chunks: Arc<Vec<Chunk>>,
    opts: BatchOptions,
    seed: u64,
    rank: usize,
    world: usize,
    device: Device,
}

impl ChunkBatches {
    /// Batches of `chunks` for `rank` of `world`.
    pub fn new(chunks: Vec<Chunk>, opts: BatchOptions, seed: u64, rank: usize, world: usize, device: Device) -> Self {
        ChunkBatches { chunks: Arc::new(chunks), opts, seed, rank, world: world.max(1), device }
    }

    /// The chunks.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    fn specs(&self, epoch: u64) -> Vec<BatchSpec> {
        let plan = plan_batches(&self.chunks, &self.opts, self.seed, epoch);
        let per_rank = plan.len() / self.world;
        plan.into_iter().skip(self.rank).step_by(self.world).take(per_rank).collect()
    }
}

impl MicroBatches for ChunkBatches {
    fn len(&self, epoch: u64) -> Result<u64> {
        Ok(self.specs(epoch).len() as u64)
    }

    fn iter_from(&self, epoch: u64, start: u64) -> Result<Box<dyn Iterator<Item = Result<TrainBatch>> + '_>> {
        let specs: Vec<BatchSpec> = self.specs(epoch).into_iter().skip(start as usize).collect();
        Ok(prefetched(self.chunks.clone(), specs, self.device))
    }

    fn fingerprint(&self) -> String {
        let chunks: Vec<Vec<(i64, usize)>> = self
            .chunks
            .iter()
            .map(|c| (0..c.num_samples()).map(|k| (c.sample_index(k).unwrap_or(-1), c.sample_len(k))).collect())
            .collect();
        super::trainer::data_fingerprint(&chunks, &self.opts, self.seed, self.world)
    }
}

/// The batches `specs` of `chunks`, assembled on a background thread (two ahead), as the
/// trainer's micro-batches.
pub fn prefetched<'a>(chunks: Arc<Vec<Chunk>>, specs: Vec<BatchSpec>, device: Device) -> Box<dyn Iterator<Item = Result<TrainBatch>> + 'a> {
    Box::new(Prefetcher::new(chunks, specs, device, 2).map(|r| {
        r.map(|b| TrainBatch {
            input_ids: b.input_ids,
            attention_mask: b.attention_mask,
            loss_mask: b.loss_mask,
            aux: b.aux,
            last_hidden: b.last_hidden,
        })
    }))
}
