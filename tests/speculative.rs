//! Speculative decoding is lossless and its statistics are right: on SmolLM2 over 24 bundled
//! prompts, `SpecDecoder` with the target verifying gives exactly the plain greedy tokens, its
//! counters equal an independent count, and offline evaluation against the greedy answers
//! (`Verify::Reference`) reports the same counters.
//!
//! The draft has a one-token vocabulary (the token the target emits most often), so every draft
//! is that token and acceptance happens exactly when the target emits it: accepts, bonus tokens,
//! cache truncation and the draft's context passes are all exercised, and the expected counters
//! can be computed from the greedy output alone.

mod common;

use common::*;
use specforge_rs::data::Tokenizer;
use specforge_rs::draft::{Eagle3Config, Eagle3Draft};
use specforge_rs::eval::{SpecDecoder, SpecStats, Verify};
use specforge_rs::generate::{generate, GenerateOptions};
use specforge_rs::target;
use tch::{Device, Kind, Tensor};

/// The counters a one-token draft must produce on `greedy` (first token from the prefill).
fn expected_stats(greedy: &[i64], token: i64, k: usize, stop: &[i64], max_new: usize) -> SpecStats {
    let mut s = SpecStats { accepted_per_pos: vec![0; k], ..Default::default() };
    let mut i = 1; // tokens produced so far
    while i < greedy.len() && !stop.contains(&greedy[i - 1]) {
        let kk = k.min(max_new - i);
        let mut a = 0;
        while a < kk && i + a < greedy.len() && greedy[i + a] == token {
            a += 1;
        }
        s.num_drafts += 1;
        s.num_draft_tokens += kk as u64;
        s.num_accepted_tokens += a as u64;
        s.accepted_per_pos.iter_mut().take(a).for_each(|c| *c += 1);
        i += a + 1;
    }
    s
}

/// Runs live and offline speculative decoding over `prompts` with a one-token draft (the token
/// the target emits most often), checking losslessness and the counters; returns the totals.
fn check(model: &dyn target::TargetModel, aux: Vec<i64>, prompts: &[Vec<i64>], max_new: usize, k: usize, stop: Vec<i64>) -> SpecStats {
    let greedy =
        generate(model, prompts, &GenerateOptions { max_new_tokens: max_new, stop_ids: stop.clone(), ..Default::default() }, Device::Cpu)
            .unwrap();
    let mut counts = std::collections::HashMap::new();
    greedy.iter().flatten().for_each(|t| *counts.entry(*t).or_insert(0) += 1);
    let (&token, _) = counts.iter().max_by_key(|(t, n)| (**n, -**t)).unwrap();
    let cfg = Eagle3Config::for_target(model.config(), aux, 1, true);
    let t2d = Tensor::zeros([cfg.vocab_size], (Kind::Bool, Device::Cpu));
    let _ = t2d.narrow(0, token, 1).fill_(1);
    tch::manual_seed(0);
    let draft = Eagle3Draft::new(cfg, &t2d, Device::Cpu).unwrap();
    let dec = SpecDecoder::new(model, &draft, k, stop.clone(), Device::Cpu).unwrap();
    let mut live = SpecStats::default();
    let mut offline = SpecStats::default();
    for (p, g) in prompts.iter().zip(&greedy) {
        let (out, stats) = dec.run(p, max_new, Verify::Target).unwrap();
        assert_eq!(&out, g, "speculative output differs from greedy");
        assert_eq!(stats, expected_stats(g, token, k, &stop, max_new), "counters for {g:?}");
        let (out2, stats2) = dec.run(p, max_new, Verify::Reference(g)).unwrap();
        assert_eq!(&out2, g);
        assert_eq!(stats2, stats, "offline evaluation counters differ from the live run");
        live.add(&stats);
        offline.add(&stats2);
    }
    assert_eq!(live, offline);
    live
}

#[test]
fn speculative_decoding_is_lossless_on_smollm2() {
    let dir = root().join(".cache/smollm2-135m-instruct");
    let model = target::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let lines = std::fs::read_to_string(root().join("data/prompts.jsonl")).unwrap();
    let prompts: Vec<Vec<i64>> = lines
        .lines()
        .take(20)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            tok.encode(&tok.apply_chat_template(&v["messages"], true).unwrap(), false).unwrap()
        })
        .collect();
    let stats = check(model.as_ref(), vec![2, 15, 27], &prompts, 16, 4, vec![2]);
    assert!(stats.num_accepted_tokens >= 10, "acceptance must be exercised: {stats:?}");
}

/// Tiny random targets fall into loops of one token, so the one-token draft is accepted several
/// tokens at a time: multi-token acceptance and cache truncation at every depth.
#[test]
fn speculative_decoding_is_lossless_on_tiny_targets() {
    let refdir = reference("dense_targets.py", &[]);
    for arch in ["llama", "qwen2", "qwen3"] {
        let model = target::load(&refdir.join(arch), Kind::Float, Device::Cpu).unwrap();
        let prompts: Vec<Vec<i64>> = (0..6).map(|i| (0..5 + i).map(|j| 3 + (i * 7 + j * 13) % 90).collect()).collect();
        let stats = check(model.as_ref(), vec![1, 2, 4], &prompts, 40, 5, vec![2]);
        assert!(stats.accepted_per_pos[2] > 0, "{arch}: multi-token acceptance must be exercised: {stats:?}");
    }
}
