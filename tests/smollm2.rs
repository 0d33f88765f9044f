//! The embedded real target, SmolLM2-135M-Instruct, against transformers: chat-template rendering
//! and tokenisation, and greedy generation token for token (64 new tokens, fp32, CPU).

mod common;

use common::*;
use serde_json::Value;
use specforge_rs::data::Tokenizer;
use specforge_rs::generate::{generate, GenerateOptions};
use specforge_rs::target;
use tch::{Device, Kind};

fn model_dir() -> std::path::PathBuf {
    let d = root().join(".cache/smollm2-135m-instruct");
    assert!(d.join("config.json").exists(), "{} missing: run `make setup`", d.display());
    d
}

fn reference_json() -> Value {
    let dir = model_dir();
    let out = reference("smollm2_reference.py", &[dir.to_str().unwrap()]);
    serde_json::from_str(&std::fs::read_to_string(out.join("reference.json")).unwrap()).unwrap()
}

#[test]
fn chat_template_and_tokens_match_transformers() {
    let r = reference_json();
    let tok = Tokenizer::from_dir(&model_dir()).unwrap();
    let cases = r["templates"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        let text = tok.apply_chat_template(&c["messages"], agp).unwrap();
        assert_eq!(text, c["text"].as_str().unwrap(), "rendering of {}", c["messages"]);
        let ids = tok.encode(&text, false).unwrap();
        let want: Vec<i64> = c["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(ids, want, "token ids of {text:?}");
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    let r = reference_json();
    let dir = model_dir();
    let model = target::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let gens = r["generations"].as_array().unwrap();
    let ids = |v: &Value| -> Vec<i64> { v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    let prompts: Vec<Vec<i64>> = gens
        .iter()
        .map(|g| {
            let text = tok.apply_chat_template(&g["messages"], true).unwrap();
            let p = tok.encode(&text, false).unwrap();
            assert_eq!(p, ids(&g["prompt_ids"]));
            p
        })
        .collect();
    let opts = GenerateOptions { max_new_tokens: 64, stop_ids: vec![2], ..Default::default() };
    // One batch of unequal prompt lengths (left padding), against transformers run one by one.
    let out = generate(model.as_ref(), &prompts, &opts, Device::Cpu).unwrap();
    let mut full_length = 0;
    for (g, got) in gens.iter().zip(&out) {
        let want = ids(&g["new_ids"]);
        assert_eq!(got, &want, "generation for {}", g["messages"]);
        full_length += usize::from(want.len() == 64);
    }
    assert!(full_length >= 3, "at least 3 prompts must run the full 64 tokens");
}
