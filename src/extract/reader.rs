//! The shard reader the trainer consumes: memory-mapped shards checked on open, a deterministic
//! global batch plan (token budget, length bucketing, seed- and epoch-shuffled across shards),
//! batch assembly, and a background prefetcher.
//!
//! ```no_run
//! # use specforge_rs::extract::reader::*;
//! # fn main() -> specforge_rs::Result<()> {
//! let chunks = std::sync::Arc::new(vec![Chunk::open("feats/".as_ref())?]);
//! let opts = BatchOptions::default();
//! let plan = plan_batches(&chunks, &opts, 42, 0);
//! // Rank r of W takes batches r, r + W, ... of the same global plan.
//! let mine: Vec<BatchSpec> = plan.into_iter().skip(0).step_by(1).collect();
//! for batch in Prefetcher::new(chunks.clone(), mine, tch::Device::Cpu, 4) {
//!     let batch = batch?;
//!     batch.check_finite()?;
//! }
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::Dtype;
use tch::{Device, Kind, Tensor};

use super::manifest::{Manifest, MANIFEST};
use crate::config::StoreDtype;
use crate::error::{Error, Result};
use crate::weights::SafetensorsFile;

/// Asks libtorch's CPU allocator to back large tensors with transparent huge pages
/// (`THP_MEM_ALLOC_ENABLE=1`, read once by c10 at its first allocation), unless the environment
/// already says otherwise. Call it at program start, before any tensor exists.
///
/// Why: every batch is a fresh allocation of hundreds of MB, and with 4 KiB pages the kernel's
/// page faults (one per page, each zero-filling it) cost more than copying the features out of
/// the page cache: on our 2-core CI VM the reader assembles batches at ~1.1 GB/s without this and
/// ~3.9 GB/s with it (docs/benchmarks.md).
pub fn enable_huge_page_allocations() {
    if std::env::var_os("THP_MEM_ALLOC_ENABLE").is_none() {
        std::env::set_var("THP_MEM_ALLOC_ENABLE", "1");
    }
}

/// One mapped shard.
struct Shard {
    file: SafetensorsFile,
    /// Bytes per token row of `aux` / `last_hidden`.
    aux_row: usize,
    last_row: usize,
}

/// Where one sample lives.
#[derive(Debug, Clone, Copy)]
struct SampleLoc {
    shard: u32,
    /// First token within the shard.
    start: usize,
    len: usize,
    /// Dataset index.
    index: i64,
}

/// A chunk: a directory of shards and its `manifest.json`, every shard mapped and verified.
pub struct Chunk {
    dir: PathBuf,
    manifest: Manifest,
    kind: Kind,
    shards: Vec<Shard>,
    samples: Vec<SampleLoc>,
}

fn shard_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Shard { path: path.to_path_buf(), reason: reason.into() }
}

fn read_i64s(f: &SafetensorsFile, name: &str) -> Result<Vec<i64>> {
    let b = f.bytes(name).ok_or_else(|| shard_err(f.path(), format!("tensor `{name}` is missing")))?;
    Ok(b.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect())
}

fn expect(f: &SafetensorsFile, name: &str, dtype: Dtype, shape: &[i64]) -> Result<()> {
    match (f.dtype(name), f.shape(name)) {
        (Some(d), Some(s)) if d == dtype && s == shape => Ok(()),
        (Some(d), Some(s)) => Err(shard_err(f.path(), format!("tensor `{name}` is {d:?} {s:?}, expected {dtype:?} {shape:?}"))),
        _ => Err(shard_err(f.path(), format!("tensor `{name}` is missing"))),
    }
}

impl Chunk {
    /// Opens `dir/manifest.json` and every shard it lists: checks each file's size and xxh3
    /// against the manifest, then the tensors' names, dtypes, shapes and offsets. A corrupt,
    /// truncated or missing shard is an error naming the file.
    pub fn open(dir: &Path) -> Result<Chunk> {
        let mpath = dir.join(MANIFEST);
        let manifest = Manifest::read(&mpath)?;
        let kind = <StoreDtype as clap::ValueEnum>::from_str(&manifest.dtype, false)
            .map(StoreDtype::kind)
            .map_err(|_| Error::config(&mpath, "dtype", format!("is `{}`, expected bf16, f16 or f32", manifest.dtype)))?;
        if !manifest.complete {
            tracing::warn!(
                dir = %dir.display(),
                "chunk is incomplete (an extraction is running or was interrupted): reading the {} shards listed so far",
                manifest.shards.len()
            );
        }
        let hidden = manifest.hidden_size;
        let aux_width = hidden * manifest.aux_layer_ids.len() as i64;
        let elt = kind.elt_size_in_bytes();
        let st_dtype = crate::weights::dtype_of(kind).unwrap_or(Dtype::BF16);
        // Hashing reads every byte once: do the shards in parallel.
        let opened: Vec<Result<(Shard, Vec<SampleLoc>)>> = manifest
            .shards
            .par_iter()
            .map(|e| {
                let path = dir.join(&e.file);
                let file = std::fs::File::open(&path).map_err(|err| Error::io(&path, err))?;
                let size = file.metadata().map_err(|err| Error::io(&path, err))?.len();
                if size != e.bytes {
                    return Err(shard_err(
                        &path,
                        format!("is {size} bytes but the manifest lists {} bytes (truncated or overwritten)", e.bytes),
                    ));
                }
                // SAFETY: read-only map of a file nobody writes once it is listed (shards are
                // renamed into place complete, never modified).
                let map = unsafe { Mmap::map(&file) }.map_err(|err| Error::io(&path, err))?;
                let h = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&map));
                if h != e.xxh3 {
                    return Err(shard_err(
                        &path,
                        format!("checksum mismatch: xxh3 is {h}, the manifest lists {} (the file is corrupt)", e.xxh3),
                    ));
                }
                drop(map);
                let f = SafetensorsFile::open(&path)?;
                let n = e.tokens as i64;
                let s = e.samples as i64;
                expect(&f, "input_ids", Dtype::I64, &[n])?;
                expect(&f, "loss_mask", Dtype::U8, &[n])?;
                expect(&f, "aux", st_dtype, &[n, aux_width])?;
                expect(&f, "last_hidden", st_dtype, &[n, hidden])?;
                expect(&f, "offsets", Dtype::I64, &[s + 1])?;
                expect(&f, "sample_index", Dtype::I64, &[s])?;
                let offsets = read_i64s(&f, "offsets")?;
                let index = read_i64s(&f, "sample_index")?;
                if offsets.first() != Some(&0) || offsets.last() != Some(&n) || offsets.windows(2).any(|w| w[1] < w[0]) {
                    return Err(shard_err(&path, format!("offsets must rise from 0 to {n}; saw {:?}…", &offsets[..offsets.len().min(8)])));
                }
                // Token ids index the target's embedding and lm_head: one outside the vocabulary
                // would be an out-of-bounds gather deep inside training.
                let vocab = manifest.target.vocab_size;
                if let Some((pos, id)) = read_i64s(&f, "input_ids")?.into_iter().enumerate().find(|(_, id)| !(0..vocab).contains(id)) {
                    return Err(shard_err(&path, format!("input_ids[{pos}] = {id} is outside the target vocabulary 0..{vocab}")));
                }
                let locs = (0..e.samples)
                    .map(|i| SampleLoc {
                        shard: 0,
                        start: offsets[i] as usize,
                        len: (offsets[i + 1] - offsets[i]) as usize,
                        index: index[i],
                    })
                    .collect();
                Ok((Shard { file: f, aux_row: aux_width as usize * elt, last_row: hidden as usize * elt }, locs))
            })
            .collect();
        let mut shards = Vec::with_capacity(opened.len());
        let mut samples = Vec::new();
        for (i, r) in opened.into_iter().enumerate() {
            let (shard, locs) = r?;
            samples.extend(locs.into_iter().map(|mut l| {
                l.shard = i as u32;
                l
            }));
            shards.push(shard);
        }
        Ok(Chunk { dir: dir.to_path_buf(), manifest, kind, shards, samples })
    }

    /// The chunk's manifest (target config hash, aux ids, hidden size, counts).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The chunk directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Feature dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Samples in the chunk.
    pub fn num_samples(&self) -> usize {
        self.samples.len()
    }

    /// Tokens of sample `i` (untruncated).
    pub fn sample_len(&self, i: usize) -> usize {
        self.samples.get(i).map_or(0, |s| s.len)
    }

    /// Dataset index of sample `i`.
    pub fn sample_index(&self, i: usize) -> Option<i64> {
        self.samples.get(i).map(|s| s.index)
    }

    /// Token ids and loss mask of sample `i` (for vocabulary counts and checks).
    pub fn tokens(&self, i: usize) -> Result<(&[i64], &[u8])> {
        let loc = self.loc(i)?;
        let f = &self.shards[loc.shard as usize].file;
        let ids = f.bytes("input_ids").ok_or_else(|| shard_err(f.path(), "tensor `input_ids` is missing"))?;
        let mask = f.bytes("loss_mask").ok_or_else(|| shard_err(f.path(), "tensor `loss_mask` is missing"))?;
        let ids = &ids[loc.start * 8..(loc.start + loc.len) * 8];
        // SAFETY: the mmap is page-aligned and safetensors data offsets are multiples of the
        // dtype size from an 8-byte-aligned header end (the writer serialises i64 first, at
        // offset 0 of the data section), so the slice is i64-aligned; checked below anyway.
        let (pre, ids, post) = unsafe { ids.align_to::<i64>() };
        if !pre.is_empty() || !post.is_empty() {
            return Err(shard_err(f.path(), "input_ids is not 8-byte aligned"));
        }
        Ok((ids, &mask[loc.start..loc.start + loc.len]))
    }

    fn loc(&self, i: usize) -> Result<SampleLoc> {
        self.samples
            .get(i)
            .copied()
            .ok_or_else(|| Error::Input(format!("sample {i} out of range: chunk {} has {}", self.dir.display(), self.samples.len())))
    }
}

/// How batches are formed.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOptions {
    /// Padded tokens per micro-batch: `B · T_max ≤ token_budget` (a single sample longer than
    /// the budget still forms a batch of one).
    pub token_budget: usize,
    /// Rows per micro-batch.
    pub max_batch_size: usize,
    /// Samples are cut to their first `max_len` tokens.
    pub max_len: usize,
    /// Group samples of similar length (within windows of `64 · max_batch_size` shuffled
    /// samples) to waste less padding.
    pub bucket_by_length: bool,
    /// Shuffle samples (and batch order) with the seed and epoch.
    pub shuffle: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions { token_budget: 16384, max_batch_size: 64, max_len: 2048, bucket_by_length: true, shuffle: true }
    }
}

/// A sample of a chunk list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleRef {
    /// Index into the chunk list.
    pub chunk: u32,
    /// Sample within the chunk.
    pub sample: u32,
}

/// One micro-batch of the global plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSpec {
    /// Its samples, in row order.
    pub samples: Vec<SampleRef>,
    /// Padded length T (longest truncated sample).
    pub seq_len: usize,
    /// Real tokens.
    pub tokens: usize,
}

/// SplitMix64: tiny, fast, and identical on every platform (the plan must be).
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64, epoch: u64) -> Self {
        let mut r = SplitMix64(seed ^ epoch.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-40 for our sizes).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

fn pack(items: &[(SampleRef, usize)], opts: &BatchOptions, out: &mut Vec<BatchSpec>) {
    let mut cur = BatchSpec { samples: Vec::new(), seq_len: 0, tokens: 0 };
    let max_rows = opts.max_batch_size.max(1);
    for &(r, len) in items {
        let t = cur.seq_len.max(len);
        if !cur.samples.is_empty() && ((cur.samples.len() + 1) * t > opts.token_budget || cur.samples.len() >= max_rows) {
            out.push(std::mem::replace(&mut cur, BatchSpec { samples: Vec::new(), seq_len: 0, tokens: 0 }));
        }
        cur.seq_len = cur.seq_len.max(len);
        cur.tokens += len;
        cur.samples.push(r);
    }
    if !cur.samples.is_empty() {
        out.push(cur);
    }
}

/// The global micro-batch plan of one epoch: every non-empty sample of every chunk exactly once.
///
/// Deterministic in `(chunks' (dataset index, length) pairs, opts, seed, epoch)` and independent
/// of the rank and of the order samples are stored in, so every process computes the same list
/// (the trainer hands batch `i` to rank `i % W`) and [`plan_batches_for_lengths`] can plan a chunk
/// before it is extracted. With `shuffle`, samples are permuted across all shards and chunks; with
/// `bucket_by_length`, each window of `64 · max_batch_size` permuted samples is sorted by length
/// (longest first) before packing, and the batch order is shuffled again so long batches are not
/// grouped.
pub fn plan_batches(chunks: &[Chunk], opts: &BatchOptions, seed: u64, epoch: u64) -> Vec<BatchSpec> {
    let items = chunks
        .iter()
        .enumerate()
        .flat_map(|(c, chunk)| {
            chunk.samples.iter().enumerate().map(move |(s, loc)| (SampleRef { chunk: c as u32, sample: s as u32 }, loc.index, loc.len))
        })
        .collect();
    plan_items(items, opts, seed, epoch)
}

/// The plan [`plan_batches`] makes for chunks holding samples with these `(dataset index,
/// length)` pairs, before any of them is extracted. `SampleRef::sample` indexes the given lists.
pub fn plan_batches_for_lengths(chunks: &[Vec<(i64, usize)>], opts: &BatchOptions, seed: u64, epoch: u64) -> Vec<BatchSpec> {
    let items = chunks
        .iter()
        .enumerate()
        .flat_map(|(c, v)| {
            v.iter().enumerate().map(move |(s, &(index, len))| (SampleRef { chunk: c as u32, sample: s as u32 }, index, len))
        })
        .collect();
    plan_items(items, opts, seed, epoch)
}

fn plan_items(mut all: Vec<(SampleRef, i64, usize)>, opts: &BatchOptions, seed: u64, epoch: u64) -> Vec<BatchSpec> {
    // Canonical order first (chunk, dataset index): the storage order must not matter.
    all.sort_by_key(|(r, index, _)| (r.chunk, *index));
    let mut items: Vec<(SampleRef, usize)> =
        all.into_iter().map(|(r, _, len)| (r, len.min(opts.max_len))).filter(|(_, len)| *len > 0).collect();
    let mut rng = SplitMix64::new(seed, epoch);
    if opts.shuffle {
        rng.shuffle(&mut items);
    }
    let mut out = Vec::new();
    if opts.bucket_by_length {
        let window = 64 * opts.max_batch_size.max(1);
        for w in items.chunks_mut(window) {
            // Stable: equal lengths keep their shuffled order.
            w.sort_by_key(|x| std::cmp::Reverse(x.1));
            pack(w, opts, &mut out);
        }
        if opts.shuffle {
            rng.shuffle(&mut out);
        }
    } else {
        pack(&items, opts, &mut out);
    }
    out
}

/// A padded micro-batch, right padding.
#[derive(Debug)]
pub struct Batch {
    /// `[B, T]` int64 token ids (0 at padding).
    pub input_ids: Tensor,
    /// `[B, T]` int64: 1 on real tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// `[B, T]` int64: 1 on supervised (assistant) tokens, 0 elsewhere and on padding.
    pub loss_mask: Tensor,
    /// `[B, T, A·H]` aux states in the stored dtype (0 at padding).
    pub aux: Tensor,
    /// `[B, T, H]` post-final-norm hidden in the stored dtype (0 at padding).
    pub last_hidden: Tensor,
    /// `[B]` dataset index of each row.
    pub sample_index: Vec<i64>,
    /// `[B]` real tokens per row.
    pub lengths: Vec<i64>,
}

impl Batch {
    /// Whether every feature is finite (one fused pass per tensor; cheap next to a train step).
    pub fn is_finite(&self) -> bool {
        let ok = |t: &Tensor| t.f_isfinite().and_then(|f| f.f_all()).ok().and_then(|b| bool::try_from(b).ok()).unwrap_or(false);
        ok(&self.aux) && ok(&self.last_hidden)
    }

    /// Like [`Batch::is_finite`], but an error naming the tensor and the dataset indices of the
    /// rows that hold NaN or inf.
    pub fn check_finite(&self) -> Result<()> {
        for (name, t) in [("aux", &self.aux), ("last_hidden", &self.last_hidden)] {
            let bad_rows = t.f_isfinite()?.f_logical_not()?.f_flatten(1, -1)?.f_any_dim(1, false)?;
            let rows: Vec<bool> = Vec::try_from(bad_rows.f_to_device(Device::Cpu)?)?;
            let bad: Vec<i64> = rows.iter().zip(&self.sample_index).filter(|(b, _)| **b).map(|(_, i)| *i).collect();
            if !bad.is_empty() {
                return Err(Error::Input(format!("`{name}` holds NaN or inf in samples {bad:?} (dataset indices)")));
            }
        }
        Ok(())
    }
}

/// One row of a batch being assembled: where its feature bytes come from.
struct RowSrc<'a> {
    aux: &'a [u8],
    last: &'a [u8],
}

/// Fills `t` (`[B, T, W]`, freshly allocated, contiguous, CPU) row by row in parallel: row b gets
/// `src(b)` at its start and zeros after it. Returns `t`.
fn fill_rows<'a>(t: Tensor, row_bytes: usize, rows: &[RowSrc<'a>], pick: fn(&RowSrc<'a>) -> &'a [u8]) -> Tensor {
    let base = t.data_ptr() as usize;
    rows.par_iter().enumerate().for_each(|(b, r)| {
        let src = pick(r);
        let len = src.len().min(row_bytes);
        // SAFETY: `t` is a contiguous CPU tensor of B · `row_bytes` bytes that nothing else
        // references yet; every row writes only its own disjoint `row_bytes` range.
        unsafe {
            let dst = (base as *mut u8).add(b * row_bytes);
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, len);
            std::ptr::write_bytes(dst.add(len), 0, row_bytes - len);
        }
    });
    t
}

/// Assembles the batch `spec` from the mapped shards and moves it to `device`. Each sample is
/// cut to `spec.seq_len` tokens.
///
/// # Errors
/// A reference outside the chunks, or chunks that disagree on dtype or widths.
pub fn load_batch(chunks: &[Chunk], spec: &BatchSpec, device: Device) -> Result<Batch> {
    let first = spec.samples.first().ok_or_else(|| Error::Input("empty batch".into()))?;
    let c0 = chunks
        .get(first.chunk as usize)
        .ok_or_else(|| Error::Input(format!("batch refers to chunk {} of {}", first.chunk, chunks.len())))?;
    let kind = c0.kind;
    let hidden = c0.manifest.hidden_size;
    let aux_width = hidden * c0.manifest.aux_layer_ids.len() as i64;
    let (b, t) = (spec.samples.len(), spec.seq_len);
    let mut ids = vec![0i64; b * t];
    let mut attn = vec![0i64; b * t];
    let mut loss = vec![0i64; b * t];
    let elt = kind.elt_size_in_bytes();
    let mut sample_index = Vec::with_capacity(b);
    let mut lengths = Vec::with_capacity(b);
    let mut srcs: Vec<RowSrc<'_>> = Vec::with_capacity(b);
    for (row, r) in spec.samples.iter().enumerate() {
        let chunk =
            chunks.get(r.chunk as usize).ok_or_else(|| Error::Input(format!("batch refers to chunk {} of {}", r.chunk, chunks.len())))?;
        if chunk.kind != kind || chunk.manifest.hidden_size != hidden || chunk.manifest.aux_layer_ids.len() as i64 * hidden != aux_width {
            return Err(Error::Input(format!(
                "chunk {} ({:?}, H {}, aux {:?}) does not match chunk {} ({kind:?}, H {hidden}) in one batch",
                chunk.dir.display(),
                chunk.kind,
                chunk.manifest.hidden_size,
                chunk.manifest.aux_layer_ids,
                c0.dir.display()
            )));
        }
        let loc = chunk.loc(r.sample as usize)?;
        let len = loc.len.min(t);
        let shard = &chunk.shards[loc.shard as usize];
        let f = &shard.file;
        let (sid, smask) = chunk.tokens(r.sample as usize)?;
        ids[row * t..row * t + len].copy_from_slice(&sid[..len]);
        attn[row * t..row * t + len].fill(1);
        for (d, &m) in loss[row * t..row * t + len].iter_mut().zip(&smask[..len]) {
            *d = i64::from(m);
        }
        let src_aux = f.bytes("aux").ok_or_else(|| shard_err(f.path(), "tensor `aux` is missing"))?;
        let src_last = f.bytes("last_hidden").ok_or_else(|| shard_err(f.path(), "tensor `last_hidden` is missing"))?;
        srcs.push(RowSrc {
            aux: &src_aux[loc.start * shard.aux_row..(loc.start + len) * shard.aux_row],
            last: &src_last[loc.start * shard.last_row..(loc.start + len) * shard.last_row],
        });
        sample_index.push(loc.index);
        lengths.push(len as i64);
    }
    // Uninitialised storage, filled in full by `fill_rows` (data, then zero padding): zeroing
    // it first would touch every byte twice.
    let aux =
        fill_rows(Tensor::f_empty([b as i64, t as i64, aux_width], (kind, Device::Cpu))?, t * aux_width as usize * elt, &srcs, |r| r.aux);
    let last = fill_rows(Tensor::f_empty([b as i64, t as i64, hidden], (kind, Device::Cpu))?, t * hidden as usize * elt, &srcs, |r| r.last);
    let shape = [b as i64, t as i64];
    let to = |v: &[i64]| -> Result<Tensor> { Ok(Tensor::from_slice(v).f_view(shape)?.f_to_device(device)?) };
    Ok(Batch {
        input_ids: to(&ids)?,
        attention_mask: to(&attn)?,
        loss_mask: to(&loss)?,
        aux: aux.f_to_device(device)?,
        last_hidden: last.f_to_device(device)?,
        sample_index,
        lengths,
    })
}

/// Loads a sequence of batches on a background thread, at most `depth` ahead, and yields them in
/// order. A batch that fails to load is yielded as its error (the thread never panics the
/// caller); dropping the prefetcher stops the thread.
pub struct Prefetcher {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts loading `specs` from `chunks` onto `device`.
    pub fn new(chunks: Arc<Vec<Chunk>>, specs: Vec<BatchSpec>, device: Device, depth: usize) -> Self {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                for spec in specs {
                    let r =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_batch(&chunks, &spec, device))).unwrap_or_else(|p| {
                            let msg = p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            Err(Error::Input(format!("loading a batch panicked: {msg}")))
                        });
                    if tx.send(r).is_err() {
                        break; // the consumer is gone
                    }
                }
            })
            .ok();
        Prefetcher { rx: Some(rx), handle }
    }
}

impl Iterator for Prefetcher {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        match &self.handle {
            None if self.rx.is_some() => {
                self.rx = None;
                Some(Err(Error::Input("could not start the prefetch thread".into())))
            }
            _ => self.rx.as_ref()?.recv().ok(),
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the channel makes the thread's next send fail, so it exits.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
