//! The shard writer: the frozen target over a tokenised dataset, features into shard format v1.
//!
//! Determinism is what makes resume exact. Everything is planned from the dataset before the
//! first forward: rank r of W takes the contiguous slice `[r·n/W, (r+1)·n/W)` of the usable
//! samples; the slice is cut, in order, into shards of at most `shard_bytes`; inside a shard the
//! samples are sorted by length (longest first, ties by index) and packed into right-padded
//! forward batches of at most `batch_tokens` padded tokens and `max_batch_size` rows
//! ([`plan_forward_batches`]). A rerun plans the same shards and batches, skips the shards its
//! rank manifest lists, and computes the rest exactly as an uninterrupted run would have.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use safetensors::tensor::{Dtype, TensorView};
use tch::{Device, Kind, Tensor};

use super::manifest::{self, Manifest, ShardEntry, FORMAT, VERSION};
use crate::data::Sample;
use crate::error::{Error, Result};
use crate::target::{ForwardInput, TargetModel};

/// How to extract.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Aux ids to capture, in storage order.
    pub aux_layer_ids: Vec<i64>,
    /// Feature dtype on disk (bf16 by default).
    pub store_kind: Kind,
    /// Padded tokens per forward batch (B · T_max).
    pub batch_tokens: usize,
    /// Rows per forward batch.
    pub max_batch_size: usize,
    /// Shard size limit in bytes (a single sample larger than this gets a shard of its own).
    pub shard_bytes: u64,
    /// This process's rank.
    pub rank: usize,
    /// Writer processes.
    pub world_size: usize,
}

/// The name of a dtype as manifests write it.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        Kind::Float => "f32",
        Kind::Double => "f64",
        _ => "unsupported",
    }
}

/// Bytes one token takes in a shard: id (8) + mask (1) + (A + 1) · H features.
pub fn bytes_per_token(num_aux: usize, hidden: i64, store: Kind) -> u64 {
    9 + (num_aux as u64 + 1) * hidden as u64 * store.elt_size_in_bytes() as u64
}

/// Safetensors header and alignment, per shard (a generous bound for the estimate).
const SHARD_OVERHEAD: u64 = 1024;

/// Groups sample lengths into forward batches: longest first (ties by position), each batch at
/// most `max_batch_size` rows and `rows · longest ≤ batch_tokens` padded tokens (a single longer
/// sample forms its own batch). Returns positions into `lengths`.
pub fn plan_forward_batches(lengths: &[usize], batch_tokens: usize, max_batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut longest = 0usize;
    for i in order {
        let l = lengths[i];
        let t = longest.max(l);
        if !cur.is_empty() && ((cur.len() + 1) * t > batch_tokens || cur.len() >= max_batch_size) {
            out.push(std::mem::take(&mut cur));
            longest = 0;
        }
        longest = longest.max(l);
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The manifest a run of `target_name` (config `cfg`) with these aux ids and storage dtype starts
/// from; `run` describes the dataset and settings (its counts are filled in by [`plan`]).
pub fn manifest_template(
    target_name: &str,
    cfg: &crate::config::TargetConfig,
    aux_layer_ids: &[i64],
    store: Kind,
    run: manifest::RunInfo,
) -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        target: manifest::TargetInfo {
            name: target_name.to_string(),
            model_type: cfg.model_type.clone(),
            config_hash: cfg.config_hash.clone(),
            vocab_size: cfg.vocab_size,
            num_hidden_layers: cfg.num_hidden_layers,
        },
        aux_layer_ids: aux_layer_ids.to_vec(),
        hidden_size: cfg.hidden_size,
        dtype: dtype_name(store).into(),
        samples: 0,
        tokens: 0,
        shards: Vec::new(),
        run,
        complete: false,
        rank: None,
        planned_shards: None,
        skipped_nonfinite: Vec::new(),
    }
}

/// What this rank will do, decided before the target is loaded.
#[derive(Debug, Clone)]
pub struct ExtractPlan {
    /// The rank manifest this run writes (no shards yet).
    pub template: Manifest,
    /// Positions into the sample list, per shard of this rank, in order.
    pub shards: Vec<Vec<usize>>,
    /// Estimated bytes of the whole chunk (all ranks).
    pub chunk_bytes: u64,
    /// Estimated bytes of this rank's shards.
    pub rank_bytes: u64,
    /// Bytes per token.
    pub bytes_per_token: u64,
    /// Tokens of this rank.
    pub rank_tokens: u64,
}

impl ExtractPlan {
    /// File name of shard `n` of this rank.
    pub fn shard_name(&self, n: usize) -> String {
        shard_file_name(self.template.rank.unwrap_or(0), n)
    }
}

/// `shard-RRRRR-NNNNN.safetensors`.
pub fn shard_file_name(rank: usize, n: usize) -> String {
    format!("shard-{rank:05}-{n:05}.safetensors")
}

/// Plans this rank's shards. `template` carries the target, aux ids, dtype and run info; its
/// counts are filled in here.
pub fn plan(samples: &[Sample], mut template: Manifest, opts: &ExtractOptions) -> ExtractPlan {
    let n = samples.len();
    let (r, w) = (opts.rank, opts.world_size.max(1));
    let lo = r * n / w;
    let hi = (r + 1) * n / w;
    let bpt = bytes_per_token(opts.aux_layer_ids.len(), template.hidden_size, opts.store_kind);
    let per_sample = 16u64; // offsets + sample_index entries
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_bytes = 0u64;
    let mut rank_tokens = 0u64;
    for (i, s) in samples.iter().enumerate().take(hi).skip(lo) {
        let b = s.input_ids.len() as u64 * bpt + per_sample;
        if !cur.is_empty() && cur_bytes + b > opts.shard_bytes {
            shards.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
        cur.push(i);
        cur_bytes += b;
        rank_tokens += s.input_ids.len() as u64;
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    let all_tokens: u64 = samples.iter().map(|s| s.input_ids.len() as u64).sum();
    let est_shards = |tokens: u64, count: usize| tokens * bpt + count as u64 * per_sample;
    let rank_bytes = est_shards(rank_tokens, hi - lo) + shards.len() as u64 * SHARD_OVERHEAD;
    // Other ranks cut their slices the same way; their shard count is about proportional.
    let chunk_bytes = est_shards(all_tokens, n) + (shards.len().max(1) * w) as u64 * SHARD_OVERHEAD + 4096;
    template.rank = Some(r);
    template.planned_shards = Some(shards.len());
    template.run.world_size = w;
    template.run.shard_bytes = opts.shard_bytes;
    template.run.planned_samples = n;
    template.run.planned_tokens = all_tokens;
    template.samples = 0;
    template.tokens = 0;
    template.shards.clear();
    template.complete = false;
    ExtractPlan { template, shards, chunk_bytes, rank_bytes, bytes_per_token: bpt, rank_tokens }
}

/// Reads this rank's manifest if a previous run left one, checks it belongs to the same run and
/// that every shard it lists is on disk with its recorded size, and removes this rank's orphan
/// temp files. Returns the manifest to continue from.
pub fn resume_state(plan: &ExtractPlan, out: &Path) -> Result<Manifest> {
    let rank = plan.template.rank.unwrap_or(0);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // Temp files of a killed run of this rank (other ranks' temp files are theirs to clean).
    let entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    for e in entries {
        let p = e.map_err(|e| Error::io(out, e))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let mine = name.starts_with(&format!(".shard-{rank:05}-")) || name.starts_with(&format!(".manifest.rank-{rank:05}.json"));
        if mine && name.contains(".tmp-") {
            tracing::debug!(file = %p.display(), "removing an orphan temp file");
            let _ = std::fs::remove_file(&p);
        }
    }
    let path = Manifest::rank_path(out, rank);
    if !path.exists() {
        return Ok(plan.template.clone());
    }
    let old = Manifest::read(&path)?;
    plan.template.check_same_run(&old, &path)?;
    for s in &old.shards {
        let p = out.join(&s.file);
        let size = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
        if size != s.bytes {
            return Err(Error::Shard { path: p, reason: format!("is {size} bytes but {} lists {} bytes", path.display(), s.bytes) });
        }
    }
    let mut m = plan.template.clone();
    m.shards = old.shards;
    m.skipped_nonfinite = old.skipped_nonfinite;
    m.samples = m.shards.iter().map(|s| s.samples).sum();
    m.tokens = m.shards.iter().map(|s| s.tokens).sum();
    Ok(m)
}

/// Throughput of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExtractStats {
    /// Tokens forwarded in this run (resumed shards excluded).
    pub tokens: u64,
    /// Samples written in this run.
    pub samples: usize,
    /// Shards written in this run.
    pub shards: usize,
    /// Shards skipped because a previous run wrote them.
    pub resumed_shards: usize,
    /// Bytes written in this run.
    pub bytes: u64,
    /// Seconds in the target forward (incl. the cast to the storage dtype).
    pub forward_secs: f64,
    /// Wall seconds of the whole loop.
    pub wall_secs: f64,
}

/// The features of one forward batch, on the CPU in the storage dtype.
pub struct BatchFeatures {
    /// `[B, T, A·H]`.
    pub aux: Tensor,
    /// `[B, T, H]`.
    pub last_hidden: Tensor,
}

/// Runs the target on `samples` as one right-padded batch and returns the features cast to
/// `store` on the CPU. Rows are padded with the config's pad id (0 when it has none) and an
/// attention mask that is 0 on padding; positions are `0..T` (exact for right padding).
pub fn forward_batch(model: &dyn TargetModel, samples: &[&Sample], aux_ids: &[i64], store: Kind, device: Device) -> Result<BatchFeatures> {
    let b = samples.len();
    let t = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let pad = model.config().pad_token_id.unwrap_or(0).clamp(0, model.config().vocab_size - 1);
    let mut ids = vec![pad; b * t];
    let mut mask = vec![0i64; b * t];
    for (r, s) in samples.iter().enumerate() {
        ids[r * t..r * t + s.input_ids.len()].copy_from_slice(&s.input_ids);
        mask[r * t..r * t + s.input_ids.len()].fill(1);
    }
    let (bi, ti) = (b as i64, t as i64);
    let input_ids = Tensor::from_slice(&ids).view([bi, ti]).to_device(device);
    let attention_mask = Tensor::from_slice(&mask).view([bi, ti]).to_device(device);
    let out = tch::no_grad(|| {
        model.forward(
            &ForwardInput { input_ids: &input_ids, attention_mask: Some(&attention_mask), position_ids: None, capture: aux_ids },
            None,
        )
    })?;
    let aux = Tensor::f_cat(&out.aux, -1)?.f_to_kind(store)?.f_to_device(Device::Cpu)?;
    let last_hidden = out.last_hidden.f_to_kind(store)?.f_to_device(Device::Cpu)?;
    Ok(BatchFeatures { aux, last_hidden })
}

/// The raw little-endian bytes of rows `0..len` of `t` (`[T, D]`).
fn row_bytes(t: &Tensor, len: usize) -> Result<Vec<u8>> {
    let rows = t.f_narrow(0, 0, len as i64)?.f_contiguous()?;
    let numel = rows.numel();
    let mut buf = vec![0u8; numel * rows.kind().elt_size_in_bytes()];
    rows.f_copy_data_u8(&mut buf, numel)?;
    Ok(buf)
}

fn le_bytes_i64(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One sample's features as raw little-endian bytes in the storage dtype.
#[derive(Debug, Clone)]
pub struct SampleFeatures {
    /// `[len, A·H]`.
    pub aux: Vec<u8>,
    /// `[len, H]`.
    pub last_hidden: Vec<u8>,
}

/// Serialises one shard in format v1. Returns the file bytes.
#[allow(clippy::too_many_arguments)]
fn encode_shard(
    path: &Path,
    samples: &[&Sample],
    feats: &[SampleFeatures],
    aux_width: i64,
    hidden: i64,
    store: Kind,
    rank: usize,
    index: usize,
) -> Result<Vec<u8>> {
    let n: usize = samples.iter().map(|s| s.input_ids.len()).sum();
    let mut ids = Vec::with_capacity(n);
    let mut mask = Vec::with_capacity(n);
    let mut offsets = vec![0i64];
    let mut index_of = Vec::with_capacity(samples.len());
    let mut aux = Vec::new();
    let mut last = Vec::new();
    for (s, f) in samples.iter().zip(feats) {
        ids.extend_from_slice(&s.input_ids);
        mask.extend_from_slice(&s.loss_mask);
        offsets.push(ids.len() as i64);
        index_of.push(s.index as i64);
        aux.extend_from_slice(&f.aux);
        last.extend_from_slice(&f.last_hidden);
    }
    let dtype = crate::weights::dtype_of(store).ok_or_else(|| Error::Dtype {
        name: "aux".into(),
        expected: "bf16, f16 or f32".into(),
        got: format!("{store:?}"),
        path: Some(path.to_path_buf()),
    })?;
    let ids_b = le_bytes_i64(&ids);
    let off_b = le_bytes_i64(&offsets);
    let idx_b = le_bytes_i64(&index_of);
    fn view<'a>(path: &Path, d: Dtype, shape: Vec<usize>, data: &'a [u8]) -> Result<TensorView<'a>> {
        TensorView::new(d, shape, data).map_err(|e| Error::Shard { path: path.to_path_buf(), reason: e.to_string() })
    }
    let views = vec![
        ("input_ids".to_string(), view(path, Dtype::I64, vec![n], &ids_b)?),
        ("loss_mask".to_string(), view(path, Dtype::U8, vec![n], &mask)?),
        ("aux".to_string(), view(path, dtype, vec![n, aux_width as usize], &aux)?),
        ("last_hidden".to_string(), view(path, dtype, vec![n, hidden as usize], &last)?),
        ("offsets".to_string(), view(path, Dtype::I64, vec![samples.len() + 1], &off_b)?),
        ("sample_index".to_string(), view(path, Dtype::I64, vec![samples.len()], &idx_b)?),
    ];
    // One metadata key: safetensors writes the metadata map in hash order, and a shard must be
    // byte-identical across runs (resume is checked against uninterrupted runs by checksum).
    let meta: HashMap<String, String> =
        HashMap::from([("specforge".to_string(), format!(r#"{{"format":"{FORMAT}","version":{VERSION},"rank":{rank},"shard":{index}}}"#))]);
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::Shard { path: path.to_path_buf(), reason: e.to_string() })
}

/// Writes shard `index` of `rank` into `dir` atomically (temp file + rename) and returns its
/// manifest entry (size, xxh3, counts). `feats[i]` holds sample `i`'s rows in `store`; the
/// caller lists the entry in a manifest only after this returns.
#[allow(clippy::too_many_arguments)]
pub fn write_shard(
    dir: &Path,
    rank: usize,
    index: usize,
    samples: &[&Sample],
    feats: &[SampleFeatures],
    aux_width: i64,
    hidden: i64,
    store: Kind,
) -> Result<ShardEntry> {
    let name = shard_file_name(rank, index);
    let path = dir.join(&name);
    let elt = store.elt_size_in_bytes();
    for (s, f) in samples.iter().zip(feats) {
        let n = s.input_ids.len();
        if s.loss_mask.len() != n || f.aux.len() != n * aux_width as usize * elt || f.last_hidden.len() != n * hidden as usize * elt {
            return Err(Error::Shard {
                path,
                reason: format!(
                    "sample {}: {n} ids, {} mask entries, {} aux bytes and {} last_hidden bytes do not agree (A·H {aux_width}, H {hidden}, {elt}-byte dtype)",
                    s.index,
                    s.loss_mask.len(),
                    f.aux.len(),
                    f.last_hidden.len()
                ),
            });
        }
    }
    if samples.len() != feats.len() {
        return Err(Error::Shard { path, reason: format!("{} samples but {} feature sets", samples.len(), feats.len()) });
    }
    let bytes = encode_shard(&path, samples, feats, aux_width, hidden, store, rank, index)?;
    let xxh3 = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes));
    crate::util::fs::write_atomic(&path, &bytes)?;
    Ok(ShardEntry {
        file: name,
        samples: samples.len(),
        tokens: samples.iter().map(|s| s.input_ids.len() as u64).sum(),
        bytes: bytes.len() as u64,
        xxh3,
        first_sample: samples.first().map_or(-1, |s| s.index as i64),
        rank,
    })
}

/// Runs the plan: every shard of this rank not already on disk is computed, written atomically
/// and added to the rank manifest, which is then merged into `manifest.json`.
///
/// Samples whose features are not finite are skipped (recorded in `skipped_nonfinite` and
/// logged with their line), as SpecForge skips NaN samples.
pub fn run(
    model: &dyn TargetModel,
    samples: &[Sample],
    plan: &ExtractPlan,
    out: &Path,
    opts: &ExtractOptions,
    device: Device,
) -> Result<ExtractStats> {
    let start = Instant::now();
    let mut m = resume_state(plan, out)?;
    let rank = opts.rank;
    let hidden = m.hidden_size;
    let aux_width = hidden * opts.aux_layer_ids.len() as i64;
    let done: HashMap<String, ShardEntry> = m.shards.iter().map(|s| (s.file.clone(), s.clone())).collect();
    let mut stats = ExtractStats::default();
    let pb = crate::util::progress::bar(plan.rank_tokens, "extract");
    // Publish the (possibly empty) rank manifest first so `manifest.json` knows this rank.
    m.write(&Manifest::rank_path(out, rank))?;
    manifest::merge(out)?;
    for (n, shard) in plan.shards.iter().enumerate() {
        let name = plan.shard_name(n);
        let shard_samples: Vec<&Sample> = shard.iter().map(|&i| &samples[i]).collect();
        let shard_tokens: u64 = shard_samples.iter().map(|s| s.input_ids.len() as u64).sum();
        if let Some(e) = done.get(&name) {
            let first = shard_samples.first().map_or(-1, |s| s.index as i64);
            if e.first_sample != first {
                return Err(Error::Shard {
                    path: out.join(&name),
                    reason: format!("starts at sample {} but this run plans sample {first} there", e.first_sample),
                });
            }
            stats.resumed_shards += 1;
            pb.inc(shard_tokens);
            continue;
        }
        let lengths: Vec<usize> = shard_samples.iter().map(|s| s.input_ids.len()).collect();
        let mut feats: Vec<Option<SampleFeatures>> = (0..shard_samples.len()).map(|_| None).collect();
        let mut nonfinite: Vec<usize> = Vec::new();
        for batch in plan_forward_batches(&lengths, opts.batch_tokens, opts.max_batch_size) {
            let rows: Vec<&Sample> = batch.iter().map(|&i| shard_samples[i]).collect();
            let t0 = Instant::now();
            let f = forward_batch(model, &rows, &opts.aux_layer_ids, opts.store_kind, device)?;
            stats.forward_secs += t0.elapsed().as_secs_f64();
            for (r, &i) in batch.iter().enumerate() {
                let len = lengths[i];
                let a = f.aux.f_get(r as i64)?;
                let l = f.last_hidden.f_get(r as i64)?;
                let finite = bool::try_from(
                    a.f_narrow(0, 0, len as i64)?
                        .f_isfinite()?
                        .f_all()?
                        .f_logical_and(&l.f_narrow(0, 0, len as i64)?.f_isfinite()?.f_all()?)?,
                )?;
                if !finite {
                    nonfinite.push(i);
                    continue;
                }
                feats[i] = Some(SampleFeatures { aux: row_bytes(&a, len)?, last_hidden: row_bytes(&l, len)? });
            }
            let tokens: u64 = batch.iter().map(|&i| lengths[i] as u64).sum();
            stats.tokens += tokens;
            pb.inc(tokens);
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!("{:.0} tok/s, {} written", stats.tokens as f64 / secs, crate::util::bytes::human(stats.bytes)));
        }
        nonfinite.sort_unstable();
        for &i in &nonfinite {
            let s = shard_samples[i];
            tracing::warn!(
                sample = s.index,
                line = s.line,
                id = %s.id,
                "non-finite features: sample skipped"
            );
            m.skipped_nonfinite.push(s.index as i64);
        }
        let kept: Vec<&Sample> = shard_samples.iter().enumerate().filter(|(i, _)| feats[*i].is_some()).map(|(_, s)| *s).collect();
        let kept_feats: Vec<SampleFeatures> = feats.into_iter().flatten().collect();
        let entry = write_shard(out, rank, n, &kept, &kept_feats, aux_width, hidden, opts.store_kind)?;
        // The shard's first *planned* sample, so a resume can check it is the same shard even
        // when its first sample was skipped as non-finite.
        let first = shard_samples.first().map_or(-1, |s| s.index as i64);
        let entry = ShardEntry { first_sample: first, ..entry };
        let tokens = entry.tokens;
        stats.bytes += entry.bytes;
        m.shards.push(entry);
        m.samples += kept.len();
        m.tokens += tokens;
        stats.samples += kept.len();
        stats.shards += 1;
        // Shard first, then the manifest that lists it: a crash in between leaves an unlisted
        // shard that the rerun simply writes again.
        m.write(&Manifest::rank_path(out, rank))?;
        manifest::merge(out)?;
    }
    pb.finish_and_clear();
    stats.wall_secs = start.elapsed().as_secs_f64();
    Ok(stats)
}
