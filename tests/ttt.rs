//! The TTT step against the independent PyTorch implementation in tests/reference/ttt_reference.py,
//! on identical tiny random weights and features, fp32: per-step losses within 1e-6 relative,
//! identical metric counts, every gradient within 1e-4 relative (max |diff| / max |grad|).
//! Ours runs through `specforge-rs train-step`, so the shard reader and batching are covered too.

mod common;

use common::*;
use serde_json::Value;
use specforge_rs::draft::Eagle3Draft;
use specforge_rs::weights::SafetensorsFile;
use tch::Device;

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

    // Ours, through the CLI: the head in export layout, the chunk through the shard reader.
    let ours_json = fx.join(format!("ours-{ttt}.json"));
    let ours_grads = fx.join(format!("ours-grads-{ttt}.safetensors"));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_specforge-rs"))
        .args(["train-step", "--draft", d, "--target", t, "--features", f, "--ttt", &k, "--json"])
        .arg(&ours_json)
        .arg("--grads")
        .arg(&ours_grads)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "train-step failed");
    let got: Value = serde_json::from_str(&std::fs::read_to_string(&ours_json).unwrap()).unwrap();
    let draft = Eagle3Draft::load(&draft_dir, Device::Cpu).unwrap();
    let floats = |v: &Value| -> Vec<f64> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    let ints = |v: &Value| -> Vec<i64> { v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    for (k, (a, e)) in floats(&got["loss"]).iter().zip(floats(&want["loss"])).enumerate() {
        assert!((a - e).abs() <= 1e-6 * e.abs(), "loss_{k}: {a} vs reference {e}");
    }
    for key in ["acc_correct", "acc_denominator", "cond_correct", "cond_denominator"] {
        assert_eq!(ints(&got[key]), ints(&want[key]), "{key}");
    }
    assert_eq!(got["positions"], want["positions"]);
    assert!((got["sim_accept_len"].as_f64().unwrap() - want["sim_accept_len"].as_f64().unwrap()).abs() < 1e-12);

    let grads = SafetensorsFile::open(&grads_out).unwrap();
    let ours = SafetensorsFile::open(&ours_grads).unwrap();
    let params = draft.named_parameters();
    assert_eq!(params.len(), grads.names().count(), "same set of trainable tensors");
    for (name, p) in params {
        let r = grads.tensor(&name).unwrap_or_else(|_| panic!("reference has no gradient for {name}"));
        let g = ours.tensor(&name).unwrap_or_else(|_| panic!("train-step saved no gradient for {name}"));
        assert_eq!(g.size(), p.size());
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
