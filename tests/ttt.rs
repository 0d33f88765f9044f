//! The TTT step against the independent PyTorch implementation in tests/reference/ttt_reference.py,
//! on identical tiny random weights and features, fp32: per-step losses within 1e-6 relative,
//! identical metric counts, every gradient within 1e-4 relative (max |diff| / max |grad|).

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;
use specforge_rs::draft::Eagle3Draft;
use specforge_rs::target::head::TargetHead;
use specforge_rs::train::ttt::{ttt_forward, TttBatch};
use specforge_rs::weights::SafetensorsFile;
use tch::{Device, Kind, Tensor};

/// Right-pads the samples of the fixture's single shard, as `train-step` batches a chunk.
fn collate(features: &Path) -> [Tensor; 5] {
    let f = SafetensorsFile::open(&features.join("shard-00000-00000.safetensors")).unwrap();
    let ids = f.tensor("input_ids").unwrap();
    let lm = f.tensor("loss_mask").unwrap().to_kind(Kind::Int64);
    let aux = f.tensor("aux").unwrap();
    let last = f.tensor("last_hidden").unwrap();
    let offsets: Vec<i64> = Vec::try_from(&f.tensor("offsets").unwrap()).unwrap();
    let lens: Vec<i64> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    let (b, t) = (lens.len() as i64, *lens.iter().max().unwrap());
    let pad = |x: &Tensor, start: i64, n: i64| {
        let piece = x.narrow(0, start, n);
        let mut shape = piece.size();
        shape[0] = t - n;
        Tensor::cat(&[piece.shallow_clone(), Tensor::zeros(shape, (x.kind(), Device::Cpu))], 0)
    };
    let rows = |x: &Tensor| Tensor::stack(&lens.iter().zip(&offsets).map(|(&n, &s)| pad(x, s, n)).collect::<Vec<_>>(), 0);
    let mask = Tensor::stack(&lens.iter().map(|&n| pad(&Tensor::ones([n], (Kind::Int64, Device::Cpu)), 0, n)).collect::<Vec<_>>(), 0);
    assert_eq!(mask.size(), [b, t]);
    [rows(&ids), mask, rows(&lm), rows(&aux), rows(&last)]
}

fn check_against_reference(eagle31: bool, ttt: usize) {
    let variant = if eagle31 { "--eagle31" } else { "--seed" };
    let seed_arg = if eagle31 { "--seed" } else { "0" };
    let args: Vec<&str> = if eagle31 { vec!["make", "{out}", variant, seed_arg, "1"] } else { vec!["make", "{out}", variant, seed_arg] };
    let fx = reference("ttt_reference.py", &args);
    let (draft_dir, target_dir, features) = (fx.join("draft"), fx.join("target"), fx.join("features"));
    let k = ttt.to_string();
    let (d, t, f) = (draft_dir.to_str().unwrap(), target_dir.to_str().unwrap(), features.to_str().unwrap());
    let json_out = fx.join(format!("step-{ttt}.json"));
    let grads_out = fx.join(format!("grads-{ttt}.safetensors"));
    if !json_out.exists() {
        let status = std::process::Command::new(python())
            .arg(root().join("tests/reference/ttt_reference.py"))
            .args(["step", "--draft", d, "--target", t, "--features", f, "--ttt", &k, "--json"])
            .arg(&json_out)
            .arg("--grads")
            .arg(&grads_out)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }
    let want: Value = serde_json::from_str(&std::fs::read_to_string(&json_out).unwrap()).unwrap();

    let draft = Eagle3Draft::load(&draft_dir, Device::Cpu).unwrap();
    let head = TargetHead::load(&target_dir, Kind::Float, Device::Cpu).unwrap();
    let [ids, mask, lm, aux, last] = collate(&features);
    let batch = TttBatch { input_ids: &ids, attention_mask: &mask, loss_mask: &lm, aux: &aux, last_hidden: &last };
    let out = ttt_forward(&draft, &head.embed_tokens, &head.lm_head, &batch, ttt, 0.8).unwrap();
    out.weighted_loss.backward();

    let floats = |v: &Value| -> Vec<f64> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    let ints = |v: &Value| -> Vec<i64> { v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    for (k, (a, e)) in out.losses.iter().zip(floats(&want["loss"])).enumerate() {
        assert!((a - e).abs() <= 1e-6 * e.abs(), "loss_{k}: {a} vs reference {e}");
    }
    assert_eq!(out.counts.acc_correct, ints(&want["acc_correct"]));
    assert_eq!(out.counts.acc_denominator, ints(&want["acc_denominator"]));
    assert_eq!(out.counts.cond_correct, ints(&want["cond_correct"]));
    assert_eq!(out.counts.cond_denominator, ints(&want["cond_denominator"]));
    assert_eq!(out.positions, want["positions"].as_i64().unwrap());
    assert!((out.counts.sim_accept_len() - want["sim_accept_len"].as_f64().unwrap()).abs() < 1e-12);

    let grads = SafetensorsFile::open(&grads_out).unwrap();
    let params = draft.named_parameters();
    assert_eq!(params.len(), grads.names().count(), "same set of trainable tensors");
    for (name, p) in params {
        let r = grads.tensor(&name).unwrap_or_else(|_| panic!("reference has no gradient for {name}"));
        let g = p.grad();
        let rel = (&g - &r).abs().max().double_value(&[]) / r.abs().max().double_value(&[]);
        assert!(rel <= 1e-4, "gradient of {name}: relative error {rel:.2e}");
    }
}

#[test]
fn eagle3_ttt7_matches_pytorch_reference() {
    check_against_reference(false, 7);
}

#[test]
fn eagle31_ttt7_matches_pytorch_reference() {
    check_against_reference(true, 7);
}

#[test]
fn eagle31_ttt3_matches_pytorch_reference() {
    check_against_reference(true, 3);
}
