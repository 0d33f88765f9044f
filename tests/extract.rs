//! Extraction and the shard reader: features read back equal the target's own forward bit for
//! bit (bf16), kill -9 + rerun equals an uninterrupted run, W ranks split the data disjointly,
//! the disk budget is enforced up front, corrupt shards are named, and the batch plan is
//! deterministic.
//!
//! "Computed directly" means: the test builds the forward batch itself (right-padded ids and
//! attention mask, from the writer's public batch plan) and calls `TargetModel::forward` with the
//! same aux ids, casting to bf16 as the writer does. With `--max-batch-size 1` the direct
//! computation is the per-sample forward with no padding and no mask at all.

mod common;
mod data_support;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use data_support::*;
use specforge_rs::config::TargetConfig;
use specforge_rs::data::{read_jsonl, tokenize, ReadOptions, Sample, TokenizeOptions, Tokenizer};
use specforge_rs::extract::reader::{load_batch, plan_batches, BatchOptions, BatchSpec, Chunk, Prefetcher, SampleRef};
use specforge_rs::extract::writer::{self, plan_forward_batches, ExtractOptions};
use specforge_rs::extract::RunInfo;
use specforge_rs::target::{self, ForwardInput, TargetModel};
use tch::{Device, Kind, Tensor};

/// Samples of a JSONL file tokenised with the target's tokenizer.
fn samples_of(model_dir: &Path, data: &Path, max_len: usize) -> Vec<Sample> {
    let tok = Tokenizer::from_dir(model_dir).unwrap();
    let cfg = TargetConfig::from_path(model_dir).unwrap();
    let (convs, mut report) = read_jsonl(data, &ReadOptions::default()).unwrap();
    let s = tokenize(&convs, &tok, &cfg.eos_token_ids, &TokenizeOptions { max_len, ..Default::default() }, &mut report);
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    s
}

fn run_info(data: &Path) -> RunInfo {
    RunInfo {
        dataset: data.display().to_string(),
        dataset_xxh3: "test".into(),
        max_len: 4096,
        truncation: "truncate".into(),
        compute_dtype: "f32".into(),
        world_size: 1,
        shard_bytes: 0,
        planned_samples: 0,
        planned_tokens: 0,
        batch_tokens: 0,
        max_batch_size: 0,
        tokenizer_xxh3: String::new(),
        chunk: 0,
        chunk_samples: 0,
    }
}

/// Extracts through the library and returns the plan.
fn extract_lib(model: &dyn TargetModel, model_dir: &Path, samples: &[Sample], out: &Path, opts: &ExtractOptions) -> writer::ExtractPlan {
    let cfg = TargetConfig::from_path(model_dir).unwrap();
    let tmpl = writer::manifest_template("test", &cfg, &opts.aux_layer_ids, opts.store_kind, run_info(out));
    let plan = writer::plan(samples, tmpl, opts);
    writer::run(model, samples, &plan, out, opts, Device::Cpu).unwrap();
    plan
}

/// Raw bits of a bf16 tensor, so that "equal" means bitwise (NaN and ±0 included).
fn bits(t: &Tensor) -> Tensor {
    t.contiguous().view_dtype(Kind::Int16)
}

/// Direct features per dataset index: `(aux [len, A·H], last [len, H])` in bf16, computed on
/// the writer's batch composition (or per sample when `max_batch_size == 1`).
fn direct_features(
    model: &dyn TargetModel,
    samples: &[Sample],
    plan: &writer::ExtractPlan,
    opts: &ExtractOptions,
) -> HashMap<usize, (Tensor, Tensor)> {
    let pad = model.config().pad_token_id.unwrap_or(0);
    let mut out = HashMap::new();
    for shard in &plan.shards {
        let lengths: Vec<usize> = shard.iter().map(|&i| samples[i].input_ids.len()).collect();
        for batch in plan_forward_batches(&lengths, opts.batch_tokens, opts.max_batch_size) {
            let rows: Vec<&Sample> = batch.iter().map(|&j| &samples[shard[j]]).collect();
            let t = rows.iter().map(|s| s.input_ids.len()).max().unwrap() as i64;
            let b = rows.len() as i64;
            let ids = Tensor::full([b, t], pad, (Kind::Int64, Device::Cpu));
            let mask = Tensor::zeros([b, t], (Kind::Int64, Device::Cpu));
            for (r, s) in rows.iter().enumerate() {
                let n = s.input_ids.len() as i64;
                ids.get(r as i64).narrow(0, 0, n).copy_(&Tensor::from_slice(&s.input_ids));
                let _ = mask.get(r as i64).narrow(0, 0, n).fill_(1);
            }
            let single = opts.max_batch_size == 1;
            let o = tch::no_grad(|| {
                model.forward(
                    &ForwardInput {
                        input_ids: &ids,
                        attention_mask: if single { None } else { Some(&mask) },
                        position_ids: None,
                        capture: &opts.aux_layer_ids,
                    },
                    None,
                )
            })
            .unwrap();
            let aux = Tensor::cat(&o.aux, -1).to_kind(Kind::BFloat16);
            let last = o.last_hidden.to_kind(Kind::BFloat16);
            for (r, s) in rows.iter().enumerate() {
                let n = s.input_ids.len() as i64;
                out.insert(s.index, (aux.get(r as i64).narrow(0, 0, n), last.get(r as i64).narrow(0, 0, n)));
            }
        }
    }
    out
}

/// Reads every sample back through the reader (shuffled, bucketed batches) and checks ids,
/// masks and features bitwise against `direct`. Returns the dataset indices seen.
fn check_read_back(chunk_dir: &Path, samples: &[Sample], direct: &HashMap<usize, (Tensor, Tensor)>, what: &str) -> Vec<i64> {
    let chunks = Arc::new(vec![Chunk::open(chunk_dir).unwrap()]);
    let opts = BatchOptions { token_budget: 400, max_batch_size: 4, max_len: 100_000, bucket_by_length: true, shuffle: true };
    let plan = plan_batches(&chunks, &opts, 7, 1);
    let mut seen = Vec::new();
    for batch in Prefetcher::new(chunks.clone(), plan, Device::Cpu, 2) {
        let batch = batch.unwrap();
        assert!(batch.is_finite());
        for (r, &idx) in batch.sample_index.iter().enumerate() {
            let s = &samples[idx as usize];
            let n = s.input_ids.len() as i64;
            let r = r as i64;
            assert_eq!(batch.lengths[r as usize], n);
            let ids: Vec<i64> = Vec::try_from(batch.input_ids.get(r).narrow(0, 0, n)).unwrap();
            assert_eq!(ids, s.input_ids, "{what}: input_ids of sample {idx}");
            let lm: Vec<i64> = Vec::try_from(batch.loss_mask.get(r).narrow(0, 0, n)).unwrap();
            let want: Vec<i64> = s.loss_mask.iter().map(|&m| i64::from(m)).collect();
            assert_eq!(lm, want, "{what}: loss_mask of sample {idx}");
            let (aux, last) = &direct[&(idx as usize)];
            assert!(
                bits(&batch.aux.get(r).narrow(0, 0, n)).equal(&bits(aux)),
                "{what}: aux of sample {idx} differs from the direct forward"
            );
            assert!(
                bits(&batch.last_hidden.get(r).narrow(0, 0, n)).equal(&bits(last)),
                "{what}: last_hidden of sample {idx} differs from the direct forward"
            );
            // Padding is zero and masked out.
            let t = batch.input_ids.size()[1];
            if n < t {
                let pad_mask: i64 = batch.attention_mask.get(r).narrow(0, n, t - n).sum(Kind::Int64).int64_value(&[]);
                assert_eq!(pad_mask, 0);
                let pad_loss: i64 = batch.loss_mask.get(r).narrow(0, n, t - n).sum(Kind::Int64).int64_value(&[]);
                assert_eq!(pad_loss, 0);
            }
            seen.push(idx);
        }
    }
    seen.sort_unstable();
    seen
}

#[test]
fn tiny_target_features_read_back_bitwise() {
    one_thread();
    let dir = tiny_target();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, synthetic_conversations(24, 1)).unwrap();
    let samples = samples_of(&dir, &data, 4096);
    let model = target::load(&dir, Kind::Float, Device::Cpu).unwrap();
    // Batched with padding, several shards; and per-sample batches of one.
    for (name, batch_tokens, max_bs) in [("batched", 600, 8), ("per-sample", 1 << 20, 1)] {
        let out = tmp.path().join(name);
        let opts = ExtractOptions {
            aux_layer_ids: vec![1, 2, 4],
            store_kind: Kind::BFloat16,
            batch_tokens,
            max_batch_size: max_bs,
            shard_bytes: 60_000,
            rank: 0,
            world_size: 1,
        };
        let plan = extract_lib(model.as_ref(), &dir, &samples, &out, &opts);
        assert!(plan.shards.len() > 2, "want several shards");
        let direct = direct_features(model.as_ref(), &samples, &plan, &opts);
        let seen = check_read_back(&out, &samples, &direct, name);
        assert_eq!(seen, (0..samples.len() as i64).collect::<Vec<_>>());
        let m = Chunk::open(&out).unwrap();
        assert!(m.manifest().complete);
        assert_eq!(m.manifest().aux_layer_ids, vec![1, 2, 4]);
        assert_eq!(m.manifest().hidden_size, 64);
    }
    // The batched features are the per-sample ones up to bf16 rounding of fp32 noise.
    let a = Chunk::open(&tmp.path().join("batched")).unwrap();
    let b = Chunk::open(&tmp.path().join("per-sample")).unwrap();
    let chunks = vec![a, b];
    let mut exact = 0;
    for (i, sample) in samples.iter().enumerate() {
        let idx_a = (0..chunks[0].num_samples()).find(|&k| chunks[0].sample_index(k) == Some(i as i64)).unwrap();
        let idx_b = (0..chunks[1].num_samples()).find(|&k| chunks[1].sample_index(k) == Some(i as i64)).unwrap();
        let spec = |c: u32, s: usize| BatchSpec {
            samples: vec![SampleRef { chunk: c, sample: s as u32 }],
            seq_len: sample.input_ids.len(),
            tokens: sample.input_ids.len(),
        };
        let x = load_batch(&chunks, &spec(0, idx_a), Device::Cpu).unwrap();
        let y = load_batch(&chunks, &spec(1, idx_b), Device::Cpu).unwrap();
        common::assert_close("batched vs per-sample aux", &x.aux, &y.aux, Kind::BFloat16);
        exact += usize::from(bits(&x.aux).equal(&bits(&y.aux)));
    }
    eprintln!("batched == per-sample bitwise for {exact} of {} samples", samples.len());
}

#[test]
fn smollm2_features_read_back_bitwise_on_bundled_prompts() {
    one_thread();
    use specforge_rs::generate::regenerate::{regenerate, select, RegenerateOptions};
    use specforge_rs::generate::GenerateOptions;
    let dir = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    // Four bundled prompts: single-turn, system prompt, two multi-turn; SmolLM2 answers them.
    let lines: Vec<String> =
        std::fs::read_to_string(common::root().join("data/prompts.jsonl")).unwrap().lines().map(str::to_string).collect();
    let pick = [0usize, 40, 44, 45];
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(&prompts, pick.iter().map(|&i| format!("{}\n", lines[i])).collect::<String>()).unwrap();
    let model = target::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let cfg = model.config().clone();
    let (convs, mut report) = read_jsonl(&prompts, &ReadOptions::default()).unwrap();
    let regen = tmp.path().join("regen.jsonl");
    let opts = RegenerateOptions {
        gen: GenerateOptions {
            max_new_tokens: 6,
            stop_ids: specforge_rs::data::stop_ids(&tok, &cfg.eos_token_ids),
            temperature: 0.0,
            top_p: 1.0,
        },
        batch_size: 4,
        seed: 0,
        max_len: 512,
        multimodal: false,
        target_name: "smollm2-135m".into(),
        config_hash: cfg.config_hash.clone(),
    };
    let todo = select(&tok, &convs, &opts, &mut report);
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    regenerate(model.as_ref(), &tok, &todo, &regen, &opts, Device::Cpu).unwrap();
    let samples = samples_of(&dir, &regen, 512);
    assert_eq!(samples.len(), 4);
    let opts = ExtractOptions {
        aux_layer_ids: specforge_rs::extract::default_aux_ids(30),
        store_kind: Kind::BFloat16,
        batch_tokens: 1 << 16,
        max_batch_size: 4,
        shard_bytes: 1 << 30,
        rank: 0,
        world_size: 1,
    };
    assert_eq!(opts.aux_layer_ids, vec![2, 15, 27]);
    let out = tmp.path().join("feats");
    let plan = extract_lib(model.as_ref(), &dir, &samples, &out, &opts);
    let direct = direct_features(model.as_ref(), &samples, &plan, &opts);
    let seen = check_read_back(&out, &samples, &direct, "smollm2");
    assert_eq!(seen, vec![0, 1, 2, 3]);
}

/// A small chunk from the tiny target, written through the library.
fn tiny_chunk(dir: &Path, n: usize) -> (Vec<Sample>, PathBuf) {
    one_thread();
    let model_dir = tiny_target();
    let data = dir.join("data.jsonl");
    std::fs::write(&data, synthetic_conversations(n, 3)).unwrap();
    let samples = samples_of(&model_dir, &data, 4096);
    let model = target::load(&model_dir, Kind::Float, Device::Cpu).unwrap();
    let out = dir.join("chunk");
    let opts = ExtractOptions {
        aux_layer_ids: vec![1, 3],
        store_kind: Kind::BFloat16,
        batch_tokens: 2048,
        max_batch_size: 16,
        shard_bytes: 40_000,
        rank: 0,
        world_size: 1,
    };
    extract_lib(model.as_ref(), &model_dir, &samples, &out, &opts);
    (samples, out)
}

#[test]
fn corrupt_truncated_or_missing_shards_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, chunk) = tiny_chunk(tmp.path(), 12);
    let shard = chunk.join("shard-00000-00001.safetensors");
    let pristine = std::fs::read(&shard).unwrap();
    let err = |what: &str| match Chunk::open(&chunk) {
        Ok(_) => panic!("{what}: opening should fail"),
        Err(e) => e.to_string(),
    };
    // One flipped byte in the feature data.
    let mut bad = pristine.clone();
    let k = bad.len() - 100;
    bad[k] ^= 0x40;
    std::fs::write(&shard, &bad).unwrap();
    let e = err("corrupt");
    assert!(e.contains("shard-00000-00001.safetensors") && e.contains("checksum"), "{e}");
    // Truncated.
    std::fs::write(&shard, &pristine[..pristine.len() / 2]).unwrap();
    let e = err("truncated");
    assert!(e.contains("shard-00000-00001.safetensors") && e.contains("truncated"), "{e}");
    // Missing.
    std::fs::remove_file(&shard).unwrap();
    let e = err("missing");
    assert!(e.contains("shard-00000-00001.safetensors"), "{e}");
    // Restored: opens again.
    std::fs::write(&shard, &pristine).unwrap();
    Chunk::open(&chunk).unwrap();
    // Token ids outside the target vocabulary (here: a manifest claiming a 2-token vocabulary).
    let m = std::fs::read_to_string(chunk.join("manifest.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&m).unwrap();
    v["target"]["vocab_size"] = serde_json::json!(2);
    std::fs::write(chunk.join("manifest.json"), v.to_string()).unwrap();
    let e = err("vocabulary");
    assert!(e.contains("input_ids") && e.contains("outside the target vocabulary"), "{e}");
    std::fs::write(chunk.join("manifest.json"), &m).unwrap();
    // A manifest of another version.
    std::fs::write(chunk.join("manifest.json"), m.replace("\"version\": 1", "\"version\": 2")).unwrap();
    let e = err("version");
    assert!(e.contains("manifest.json") && e.contains("version"), "{e}");
}

#[test]
fn prefetcher_yields_errors_in_order_without_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, chunk) = tiny_chunk(tmp.path(), 6);
    let chunks = Arc::new(vec![Chunk::open(&chunk).unwrap()]);
    let good = plan_batches(&chunks, &BatchOptions::default(), 0, 0);
    let bogus = |c: u32, s: u32| BatchSpec { samples: vec![SampleRef { chunk: c, sample: s }], seq_len: 4, tokens: 4 };
    let specs = vec![good[0].clone(), bogus(3, 0), bogus(0, 999), good[0].clone()];
    let results: Vec<_> = Prefetcher::new(chunks, specs, Device::Cpu, 1).collect();
    assert_eq!(results.len(), 4);
    assert!(results[0].is_ok());
    let e1 = results[1].as_ref().err().unwrap().to_string();
    assert!(e1.contains("chunk 3"), "{e1}");
    let e2 = results[2].as_ref().err().unwrap().to_string();
    assert!(e2.contains("sample 999"), "{e2}");
    assert!(results[3].is_ok());
    // NaN features are detected and named.
    let b = results.into_iter().next().unwrap().unwrap();
    assert!(b.is_finite());
    let _ = b.aux.get(0).get(0).get(0).fill_(f64::NAN);
    assert!(!b.is_finite());
    let e = b.check_finite().unwrap_err().to_string();
    assert!(e.contains("aux") && e.contains(&format!("{}", b.sample_index[0])), "{e}");
}

#[test]
fn batch_plan_is_deterministic_budgeted_and_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let (samples, chunk) = tiny_chunk(tmp.path(), 60);
    // The same chunk opened twice stands for two chunks (two extraction runs).
    let chunks = vec![Chunk::open(&chunk).unwrap(), Chunk::open(&chunk).unwrap()];
    let opts = BatchOptions { token_budget: 500, max_batch_size: 6, max_len: 90, bucket_by_length: true, shuffle: true };
    let p1 = plan_batches(&chunks, &opts, 11, 3);
    let p2 = plan_batches(&chunks, &opts, 11, 3);
    assert_eq!(p1, p2, "same seed and epoch, same plan");
    assert_ne!(p1, plan_batches(&chunks, &opts, 11, 4), "another epoch reshuffles");
    assert_ne!(p1, plan_batches(&chunks, &opts, 12, 3), "another seed reshuffles");
    let mut seen = BTreeSet::new();
    for b in &p1 {
        assert!(b.samples.len() <= 6);
        assert!(b.samples.len() == 1 || b.samples.len() * b.seq_len <= 500, "{b:?}");
        let longest = b.samples.iter().map(|r| chunks[r.chunk as usize].sample_len(r.sample as usize).min(90)).max().unwrap();
        assert_eq!(longest, b.seq_len);
        for r in &b.samples {
            assert!(seen.insert((r.chunk, r.sample)), "{r:?} twice");
        }
    }
    assert_eq!(seen.len(), 2 * samples.len(), "every sample of every chunk once");
    // Shuffling mixes the chunks within batches.
    assert!(p1.iter().any(|b| b.samples.iter().any(|r| r.chunk == 0) && b.samples.iter().any(|r| r.chunk == 1)));
    // Bucketing wastes less padding than packing in shuffled order.
    let padded = |p: &[BatchSpec]| p.iter().map(|b| b.samples.len() * b.seq_len - b.tokens).sum::<usize>();
    let flat = plan_batches(&chunks, &BatchOptions { bucket_by_length: false, ..opts.clone() }, 11, 3);
    assert!(padded(&p1) < padded(&flat), "{} vs {}", padded(&p1), padded(&flat));
    // max_len cuts samples when loading.
    let b = load_batch(&chunks, &p1[0], Device::Cpu).unwrap();
    assert_eq!(b.input_ids.size()[1] as usize, p1[0].seq_len);
    assert!(b.lengths.iter().all(|&l| l <= 90));
}

/// `extract` through the binary on the tiny target; `extra` flags replace the defaults.
fn extract_args<'a>(model: &'a str, data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["extract", "--target", model, "--data", data, "--out", out];
    let defaults = [("--aux-layers", "1,2,4"), ("--shard-size", "300k"), ("--batch-tokens", "1024"), ("--max-batch-size", "8")];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            v.extend([flag, value]);
        }
    }
    v.extend_from_slice(extra);
    v
}

/// The manifest's shard list without timestamps, and every shard's bytes.
fn chunk_contents(dir: &Path) -> (serde_json::Value, Vec<(String, Vec<u8>)>) {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let files = m["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let f = s["file"].as_str().unwrap().to_string();
            let b = std::fs::read(dir.join(&f)).unwrap();
            (f, b)
        })
        .collect();
    (m["shards"].clone(), files)
}

fn sample_indices(dir: &Path) -> Vec<i64> {
    let c = Chunk::open(dir).unwrap();
    let mut v: Vec<i64> = (0..c.num_samples()).map(|i| c.sample_index(i).unwrap()).collect();
    v.sort_unstable();
    v
}

#[test]
fn kill_9_during_extract_then_rerun_equals_uninterrupted() {
    let model = tiny_target();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    let n = 200;
    std::fs::write(&data, synthetic_conversations(n, 5)).unwrap();
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let a = tmp.path().join("a");
    run_ok(&extract_args(m, d, a.to_str().unwrap(), &[]));
    let b = tmp.path().join("b");
    let bs = b.to_str().unwrap();
    // Kill it twice at different points, then let it finish.
    for min_shards in [2, 9] {
        let mut c = cmd(&extract_args(m, d, bs, &[]));
        c.env("RUST_LOG", "error");
        let killed = kill_when(c, Duration::from_secs(120), || listed_shards(&b) >= min_shards);
        assert!(killed, "extract finished before it could be killed");
        let mf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(b.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(mf["complete"], false, "killed mid-run");
        // Whatever the manifest lists opens and verifies.
        Chunk::open(&b).unwrap();
    }
    let stdout = run_ok(&extract_args(m, d, bs, &[]));
    assert!(stdout.contains("shards resumed"), "{stdout}");
    let (ma, fa) = chunk_contents(&a);
    let (mb, fb) = chunk_contents(&b);
    assert!(ma == mb, "manifests' shard lists differ:\n{ma}\n{mb}");
    assert!(fa == fb, "shard bytes differ");
    assert_eq!(sample_indices(&b), (0..n as i64).collect::<Vec<_>>(), "no sample lost or duplicated");
    // No temp file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&b)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A rerun of a finished chunk does nothing.
    let stdout = run_ok(&extract_args(m, d, bs, &[]));
    assert!(stdout.contains("wrote 0 samples"), "{stdout}");
    // A rerun with other settings is refused, naming the field.
    let o = run(&extract_args(m, d, bs, &["--aux-layers", "1,3"]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("aux_layer_ids"), "{e}");
    // So is other batching (it changes the features' low bits), another --limit, and another
    // tokenizer or chat template (same config.json).
    let o = run(&extract_args(m, d, bs, &["--max-batch-size", "3"]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("run.max_batch_size"), "{e}");
    let o = run(&extract_args(m, d, bs, &["--limit", "3"]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("run.planned_samples"), "{e}");
    let other = tmp.path().join("same-config-other-template");
    std::fs::create_dir_all(&other).unwrap();
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, other.join(f.file_name().unwrap())).unwrap();
    }
    let template = ["chat_template.jinja", "tokenizer_config.json"].iter().map(|n| other.join(n)).find(|p| p.exists()).unwrap();
    let mut t = std::fs::read(&template).unwrap();
    t.extend_from_slice(b"\n");
    std::fs::write(&template, t).unwrap();
    let o = run(&extract_args(other.to_str().unwrap(), d, bs, &[]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("run.tokenizer_xxh3"), "{e}");
}

/// Samples `0..n` of chunks `a` and `b` hold bit-identical features.
fn assert_same_features(a: &Path, b: &Path, n: usize) {
    let chunks = vec![Chunk::open(a).unwrap(), Chunk::open(b).unwrap()];
    for i in 0..n as i64 {
        let find = |c: usize| (0..chunks[c].num_samples()).find(|&k| chunks[c].sample_index(k) == Some(i)).unwrap();
        let len = chunks[0].sample_len(find(0));
        let spec = |c: usize| BatchSpec { samples: vec![SampleRef { chunk: c as u32, sample: find(c) as u32 }], seq_len: len, tokens: len };
        let x = load_batch(&chunks, &spec(0), Device::Cpu).unwrap();
        let y = load_batch(&chunks, &spec(1), Device::Cpu).unwrap();
        assert!(bits(&x.aux).equal(&bits(&y.aux)) && bits(&x.last_hidden).equal(&bits(&y.last_hidden)), "sample {i}");
    }
}

#[test]
fn ranks_take_disjoint_slices_of_one_chunk() {
    let model = tiny_target();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    let n = 37;
    std::fs::write(&data, synthetic_conversations(n, 9)).unwrap();
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    // Per-sample forwards, so features do not depend on which samples share a batch.
    let one = ["--max-batch-size", "1"];
    let single = tmp.path().join("single");
    run_ok(&extract_args(m, d, single.to_str().unwrap(), &one));
    let multi = tmp.path().join("multi");
    let ms = multi.to_str().unwrap();
    // Three ranks one after the other, then three at once (as a launcher starts them), each
    // time all writing the same chunk.
    let children: Vec<_> = (0..3)
        .map(|r| {
            let mut c = cmd(&extract_args(m, d, ms, &one));
            c.env("RANK", r.to_string()).env("WORLD_SIZE", "3");
            c.output().expect("spawn")
        })
        .collect();
    for o in &children {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let multi2 = tmp.path().join("multi2");
    let m2 = multi2.to_str().unwrap();
    let handles: Vec<_> = (0..3)
        .map(|r| {
            let mut c = cmd(&extract_args(m, d, m2, &one));
            c.env("RANK", r.to_string()).env("WORLD_SIZE", "3").stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
            c.spawn().expect("spawn")
        })
        .collect();
    for h in handles {
        let o = h.wait_with_output().unwrap();
        assert!(o.status.success());
    }
    for dir in [&multi, &multi2] {
        let c = Chunk::open(dir).unwrap();
        assert!(c.manifest().complete);
        let ranks: BTreeSet<usize> = c.manifest().shards.iter().map(|s| s.rank).collect();
        assert_eq!(ranks, BTreeSet::from([0, 1, 2]));
        assert_eq!(sample_indices(dir), (0..n as i64).collect::<Vec<_>>());
    }
    // Same features per sample as the single-process run.
    assert_same_features(&single, &multi2, n);
    // A bad RANK is named.
    let mut c = cmd(&extract_args(m, d, ms, &[]));
    c.env("RANK", "3").env("WORLD_SIZE", "3");
    let o = c.output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("RANK") && e.contains("WORLD_SIZE=3"), "{e}");
}

/// Under `srun` without torchrun only SLURM's variables say who is who: two tasks write two
/// disjoint slices of one chunk, whose union is what one process writes.
#[test]
fn slurm_tasks_take_disjoint_slices_of_one_chunk() {
    let model = tiny_target();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    let n = 11;
    std::fs::write(&data, synthetic_conversations(n, 5)).unwrap();
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let one = ["--max-batch-size", "1"];
    let single = tmp.path().join("single");
    run_ok(&extract_args(m, d, single.to_str().unwrap(), &one));
    let slurm = tmp.path().join("slurm");
    let ss = slurm.to_str().unwrap();
    for task in 0..2 {
        let mut c = cmd(&extract_args(m, d, ss, &one));
        for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"] {
            c.env_remove(v);
        }
        c.env("SLURM_PROCID", task.to_string())
            .env("SLURM_NTASKS", "2")
            .env("SLURM_LOCALID", task.to_string())
            .env("SLURM_NTASKS_PER_NODE", "2");
        let o = c.output().expect("spawn");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let c = Chunk::open(&slurm).unwrap();
    assert!(c.manifest().complete);
    // Both tasks wrote, and every sample is there exactly once (sorted indices = 0..n).
    let ranks: BTreeSet<usize> = c.manifest().shards.iter().map(|s| s.rank).collect();
    assert_eq!(ranks, BTreeSet::from([0, 1]));
    assert_eq!(sample_indices(&slurm), (0..n as i64).collect::<Vec<_>>());
    assert_eq!(sample_indices(&single), sample_indices(&slurm));
    assert_same_features(&single, &slurm, n);
}

#[test]
fn max_disk_is_checked_before_anything_is_written() {
    let model = tiny_target();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, synthetic_conversations(10, 2)).unwrap();
    let out = tmp.path().join("out");
    let o = run(&extract_args(model.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap(), &["--max-disk", "10k"]));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stdout.contains("the chunk will take about"), "{stdout}");
    assert!(stderr.contains("refusing to start") && stderr.contains("--max-disk") && stderr.contains("10.00 kB"), "{stderr}");
    let written: Vec<_> = std::fs::read_dir(&out).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(written.iter().all(|f| !f.to_string_lossy().contains("shard") && !f.to_string_lossy().contains("manifest")), "{written:?}");
}

/// A log redirected to a file is plain text: no ANSI escapes in the log lines, and the progress
/// bar becomes plain progress lines.
#[test]
fn logs_and_progress_to_a_file_are_plain_text() {
    let model = tiny_target();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, synthetic_conversations(6, 3)).unwrap();
    let out = tmp.path().join("chunk");
    let o = cmd(&extract_args(model.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap(), &[]))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("loading target") && !e.contains('\u{1b}'), "{e:?}");
    assert!(e.lines().any(|l| l.starts_with("extract: ") && l.contains("elapsed")), "{e}");
}
