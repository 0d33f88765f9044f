//! Reader throughput from the page cache.
//!
//! Writes a synthetic chunk with the widths of a real target (default: chandra-ocr-2's H 2560 with
//! three aux layers, bf16, ≈2 GB), opens it (the checksum pass reads every byte), reads one full
//! epoch of batches to warm the page cache, then times a second epoch: directly with
//! `load_batch`, and through the `Prefetcher` thread. Prints one JSON line.
//!
//! ```text
//! cargo run --release --example bench_reader -- [--dir DIR] [--hidden 2560] [--aux 3]
//!     [--tokens 100000] [--seq 2048] [--budget 8192]
//! ```

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use specforge_rs::data::Sample;
use specforge_rs::extract::manifest::{self, Manifest, RunInfo, TargetInfo, FORMAT, VERSION};
use specforge_rs::extract::reader::{load_batch, plan_batches, BatchOptions, Chunk, Prefetcher};
use specforge_rs::extract::writer::{bytes_per_token, write_shard, SampleFeatures};
use tch::{Device, Kind, Tensor};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    let n = t.numel();
    let mut b = vec![0u8; n * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut b, n);
    b
}

fn main() -> anyhow::Result<()> {
    // Set THP_MEM_ALLOC_ENABLE=0 to measure without huge pages.
    specforge_rs::extract::reader::enable_huge_page_allocations();
    let hidden: i64 = arg("--hidden", "2560").parse()?;
    let num_aux: usize = arg("--aux", "3").parse()?;
    let total: usize = arg("--tokens", "100000").parse()?;
    let seq: usize = arg("--seq", "2048").parse()?;
    let budget: usize = arg("--budget", "8192").parse()?;
    let dir = std::path::PathBuf::from(arg("--dir", "target/bench-reader"));
    let bpt = bytes_per_token(num_aux, hidden, Kind::BFloat16);

    // A synthetic chunk: lengths between seq/8 and seq, 256 MB shards.
    let mut lengths = Vec::new();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut sum = 0;
    while sum < total {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let l = (seq / 8 + (state as usize) % (seq - seq / 8)).min(total - sum).max(1);
        lengths.push(l);
        sum += l;
    }
    let reuse = std::env::args().any(|a| a == "--reuse") && dir.join("manifest.json").is_file();
    if !reuse {
        write_chunk(&dir, &lengths, hidden, num_aux, seq, sum)?;
    }

    // Open (checksums every byte; the files are in the page cache after writing them).
    let t = Instant::now();
    let chunk = Chunk::open(&dir)?;
    let open_secs = t.elapsed().as_secs_f64();
    let file_bytes: u64 = chunk.manifest().shards.iter().map(|e| e.bytes).sum();
    let chunks = Arc::new(vec![chunk]);
    let opts = BatchOptions { token_budget: budget, max_batch_size: 64, max_len: seq, bucket_by_length: true, shuffle: true };
    let plan = plan_batches(&chunks, &opts, 0, 0);
    let epoch = |e: u64| -> anyhow::Result<(f64, u64, u64)> {
        let plan = plan_batches(&chunks, &opts, 0, e);
        let t = Instant::now();
        let (mut real, mut padded) = (0u64, 0u64);
        for spec in &plan {
            let b = load_batch(&chunks, spec, Device::Cpu)?;
            real += spec.tokens as u64 * bpt;
            padded += (spec.samples.len() * spec.seq_len) as u64 * bpt;
            std::hint::black_box(&b);
        }
        Ok((t.elapsed().as_secs_f64(), real, padded))
    };
    epoch(0)?; // warm
    let (secs, real, padded) = epoch(1)?;
    let t = Instant::now();
    let mut n = 0;
    for b in Prefetcher::new(chunks.clone(), plan_batches(&chunks, &opts, 0, 2), Device::Cpu, 4) {
        std::hint::black_box(b?);
        n += 1;
    }
    let pf_secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "bench": "reader",
            "hidden": hidden, "aux": num_aux, "dtype": "bf16",
            "tokens": sum, "samples": lengths.len(), "shards": chunks[0].manifest().shards.len(),
            "chunk_bytes": file_bytes,
            "open_secs": open_secs, "open_gb_per_s": file_bytes as f64 / open_secs / 1e9,
            "batches": plan.len(), "token_budget": budget,
            "epoch_secs": secs,
            "read_gb_per_s": real as f64 / secs / 1e9,
            "delivered_gb_per_s": padded as f64 / secs / 1e9,
            "prefetch_epoch_secs": pf_secs, "prefetch_batches": n,
            "prefetch_read_gb_per_s": real as f64 / pf_secs / 1e9,
            "tokens_per_s": sum as f64 / secs,
        })
    );
    Ok(())
}

/// Writes the synthetic chunk: random ids and bf16 features, 256 MB shards.
fn write_chunk(dir: &std::path::Path, lengths: &[usize], hidden: i64, num_aux: usize, seq: usize, sum: usize) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let bpt = bytes_per_token(num_aux, hidden, Kind::BFloat16);
    let aux_width = hidden * num_aux as i64;
    tch::manual_seed(0);
    let mut entries = Vec::new();
    let mut shard: Vec<(Sample, SampleFeatures)> = Vec::new();
    let mut shard_bytes = 0u64;
    let flush = |shard: &mut Vec<(Sample, SampleFeatures)>, entries: &mut Vec<manifest::ShardEntry>| -> anyhow::Result<()> {
        if shard.is_empty() {
            return Ok(());
        }
        let samples: Vec<&Sample> = shard.iter().map(|(s, _)| s).collect();
        let feats: Vec<SampleFeatures> = shard.iter().map(|(_, f)| f.clone()).collect();
        entries.push(write_shard(dir, 0, entries.len(), &samples, &feats, aux_width, hidden, Kind::BFloat16)?);
        shard.clear();
        Ok(())
    };
    for (i, &l) in lengths.iter().enumerate() {
        let li = l as i64;
        let s = Sample {
            index: i,
            line: i + 1,
            id: format!("s{i}"),
            input_ids: Vec::try_from(Tensor::randint(49152, [li], (Kind::Int64, Device::Cpu)))?,
            loss_mask: (0..l).map(|t| u8::from(t > l / 3)).collect(),
            truncated: false,
        };
        let f = SampleFeatures {
            aux: bytes_of(&Tensor::randn([li, aux_width], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)),
            last_hidden: bytes_of(&Tensor::randn([li, hidden], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)),
        };
        shard_bytes += l as u64 * bpt;
        shard.push((s, f));
        if shard_bytes > 256_000_000 {
            flush(&mut shard, &mut entries)?;
            shard_bytes = 0;
        }
    }
    flush(&mut shard, &mut entries)?;
    let m = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        target: TargetInfo {
            name: "synthetic".into(),
            model_type: "llama".into(),
            config_hash: "0".into(),
            vocab_size: 49152,
            num_hidden_layers: 32,
        },
        aux_layer_ids: (0..num_aux as i64).collect(),
        hidden_size: hidden,
        dtype: "bf16".into(),
        samples: lengths.len(),
        tokens: sum as u64,
        planned_shards: Some(entries.len()),
        shards: entries,
        run: RunInfo {
            dataset: "synthetic".into(),
            dataset_xxh3: "0".into(),
            max_len: seq,
            truncation: "truncate".into(),
            compute_dtype: "bf16".into(),
            world_size: 1,
            shard_bytes: 256_000_000,
            planned_samples: lengths.len(),
            planned_tokens: sum as u64,
            batch_tokens: 0,
            max_batch_size: 0,
            tokenizer_xxh3: String::new(),
            chunk: 0,
            chunk_samples: 0,
        },
        complete: true,
        rank: Some(0),
        skipped_nonfinite: Vec::new(),
    };
    m.write(&Manifest::rank_path(dir, 0))?;
    manifest::merge(dir)?;

    Ok(())
}
