//! The draft vocabulary: d2t / t2d invariants, forced tokens, deterministic tie-breaks, coverage
//! against a direct count, and the CLI (from a dataset and from extracted shards).

mod common;
mod data_support;

use std::collections::BTreeSet;

use data_support::*;
use specforge_rs::config::TargetConfig;
use specforge_rs::data::{read_jsonl, tokenize, ReadOptions, TokenizeOptions, Tokenizer};
use specforge_rs::vocab;

#[test]
fn d2t_t2d_invariants_and_coverage_on_smollm2_data() {
    let dir = smollm2();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let cfg = TargetConfig::from_path(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    let mut text = synthetic_conversations(40, 4);
    text.push_str(&std::fs::read_to_string(common::root().join("data/loss-mask-cases.jsonl")).unwrap());
    std::fs::write(&data, text).unwrap();
    let (convs, mut report) = read_jsonl(&data, &ReadOptions::default()).unwrap();
    let samples = tokenize(&convs, &tok, &cfg.eos_token_ids, &TokenizeOptions::default(), &mut report);
    assert!(report.bad.is_empty());
    let v = cfg.vocab_size as usize;
    let counts = vocab::count_samples(&samples, v).unwrap();
    let forced = vocab::forced_tokens(&tok, &cfg.eos_token_ids);
    // <|endoftext|> (a stop token), <|im_start|> and <|im_end|> (the template's turn markers).
    assert_eq!(forced, vec![0, 1, 2]);
    for vd in [16usize, 64, 300] {
        let dv = vocab::build(&counts, vd, &forced).unwrap();
        // t2d has exactly Vd trues; d2t maps every draft id to one of them, in order.
        assert_eq!(dv.t2d.len(), v);
        assert_eq!(dv.t2d.iter().filter(|&&b| b).count(), vd);
        assert_eq!(dv.d2t.len(), vd);
        let mut targets = Vec::new();
        for (d, &off) in dv.d2t.iter().enumerate() {
            let t = d as i64 + off;
            assert!(off >= 0 && dv.t2d[t as usize], "draft {d} -> target {t}");
            targets.push(t);
        }
        assert!(targets.windows(2).all(|w| w[0] < w[1]), "one draft id per target id, ascending");
        assert_eq!(targets.len(), targets.iter().collect::<BTreeSet<_>>().len());
        vocab::check_invariants(&dv.d2t, &dv.t2d).unwrap();
        for f in &forced {
            assert!(dv.t2d[*f as usize], "forced token {f} missing");
        }
        // Coverage against a direct count over the samples.
        let (mut total, mut covered) = (0u64, 0u64);
        for s in &samples {
            for (&id, &m) in s.input_ids.iter().zip(&s.loss_mask) {
                if m == 1 {
                    total += 1;
                    covered += u64::from(dv.t2d[id as usize]);
                }
            }
        }
        assert_eq!((dv.total_tokens, dv.covered_tokens), (total, covered));
        assert!((dv.coverage() - covered as f64 / total as f64).abs() < 1e-12);
        // Frequency order with the smaller id winning ties: no unchosen id beats a chosen one.
        let chosen_free: Vec<usize> = (0..v).filter(|&i| dv.t2d[i] && !forced.contains(&(i as i64)) && counts[i] > 0).collect();
        let weakest = chosen_free.iter().map(|&i| (counts[i], std::cmp::Reverse(i))).min();
        if let Some(w) = weakest {
            for i in (0..v).filter(|&i| !dv.t2d[i]) {
                assert!((counts[i], std::cmp::Reverse(i)) < w, "id {i} ({}) should have been chosen over {w:?}", counts[i]);
            }
        }
        // Deterministic.
        assert_eq!(dv, vocab::build(&counts, vd, &forced).unwrap());
    }
    // More slots than distinct tokens: the smallest unseen ids pad the vocabulary.
    let distinct = counts.iter().filter(|&&c| c > 0).count();
    let dv = vocab::build(&counts, distinct + 10, &forced).unwrap();
    assert_eq!(dv.coverage(), 1.0);
    assert_eq!(dv.padded, 10 - forced.iter().filter(|&&f| counts[f as usize] == 0).count());
}

#[test]
fn vocab_cli_from_data_and_from_shards_agree() {
    one_thread();
    let model = tiny_target();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, synthetic_conversations(30, 8)).unwrap();
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let chunk = tmp.path().join("chunk");
    run_ok(&["extract", "--target", m, "--data", d, "--out", chunk.to_str().unwrap(), "--aux-layers", "1,4"]);
    let from_data = tmp.path().join("a/vocab.safetensors");
    let from_shards = tmp.path().join("b/vocab.safetensors");
    let s1 = run_ok(&["vocab", "--target", m, "--data", d, "--draft-vocab", "100", "--out", from_data.to_str().unwrap()]);
    let s2 = run_ok(&[
        "vocab",
        "--target",
        m,
        "--shards",
        chunk.to_str().unwrap(),
        "--draft-vocab",
        "100",
        "--out",
        from_shards.to_str().unwrap(),
    ]);
    assert!(s1.contains("Vd 100 of V 49152"), "{s1}");
    assert!(s2.contains("Vd 100 of V 49152"), "{s2}");
    assert_eq!(std::fs::read(&from_data).unwrap(), std::fs::read(&from_shards).unwrap(), "same tokens counted, same bytes written");
    let (d2t, t2d) = vocab::load(&from_data).unwrap();
    assert_eq!(d2t.size(), [100]);
    assert_eq!(t2d.size(), [49152]);
    assert_eq!(d2t.kind(), tch::Kind::Int64);
    assert_eq!(t2d.kind(), tch::Kind::Bool);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(from_data.with_extension("json")).unwrap()).unwrap();
    assert_eq!(report["draft_vocab_size"], 100);
    assert!(report["coverage"].as_f64().unwrap() > 0.5);
    let forced: Vec<&str> = report["forced"].as_array().unwrap().iter().map(|f| f["token"].as_str().unwrap()).collect();
    assert_eq!(forced, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]);
    // Shards of another target are refused.
    let o = run(&[
        "vocab",
        "--target",
        smollm2().to_str().unwrap(),
        "--shards",
        chunk.to_str().unwrap(),
        "--out",
        from_shards.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("config"), "{e}");
    // A damaged file is refused on load.
    let bad = tmp.path().join("bad.safetensors");
    let (d2t, _) = vocab::load(&from_data).unwrap();
    let wrong_t2d = tch::Tensor::zeros([49152], (tch::Kind::Bool, tch::Device::Cpu));
    specforge_rs::weights::save_safetensors(&bad, &[("d2t".into(), d2t), ("t2d".into(), wrong_t2d)], None).unwrap();
    let e = vocab::load(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.safetensors") && e.contains("t2d has 0 trues"), "{e}");
}
