//! `specforge-rs train` end to end on the tiny TTT fixture: exact resume after kill -9, and bad
//! inputs (shards of another target, an aux width the draft does not read, NaN / inf features).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use specforge_rs::weights::SafetensorsFile;
use tch::{Kind, Tensor};

fn fixture() -> PathBuf {
    reference("ttt_reference.py", &["make", "{out}", "--eagle31", "--seed", "1"])
}

/// A recipe training on the fixture's target and features.
fn recipe(dir: &Path, fx: &Path, extra: &str) -> PathBuf {
    let p = dir.join("recipe.toml");
    let text = format!(
        "[target]\nname = {:?}\ndtype = \"f32\"\n\n[data]\nfeatures = [{:?}]\n\n[draft]\nvariant = \"eagle3.1\"\naux_layer_ids = [1, 2, 3]\ndraft_vocab_size = 256\ninit_lm_head_from_target = true\n\n[train]\nttt_steps = 3\nlr = 3e-3\nepochs = 8\nmax_batch_size = 1\nsave_every = 1\nkeep_last = 3\nseed = 5\n{extra}",
        fx.join("target").to_str().unwrap(),
        fx.join("features").to_str().unwrap()
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn train_cmd(recipe: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_specforge-rs"));
    c.args(["train", "--recipe", recipe.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null());
    c
}

fn final_weights(run: &Path) -> Vec<(String, Tensor)> {
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let f = SafetensorsFile::open(&run.join("checkpoints").join(latest.trim()).join("model.safetensors")).unwrap();
    f.names().map(|n| (n.to_string(), f.tensor(n).unwrap())).collect()
}

#[test]
fn resume_after_kill9_is_bitwise_identical() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), &fx, "");

    let straight = dir.path().join("straight");
    assert!(train_cmd(&r, &straight).status().unwrap().success());

    // Kill -9 once step 12 of 32 is checkpointed, then run the same command again.
    let resumed = dir.path().join("resumed");
    let mut child = train_cmd(&r, &resumed).spawn().unwrap();
    let start = Instant::now();
    while !resumed.join("checkpoints/step-00000012").exists() {
        assert!(child.try_wait().unwrap().is_none(), "training finished before it could be killed");
        assert!(start.elapsed() < Duration::from_secs(300));
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed_at = std::fs::read_to_string(resumed.join("checkpoints/latest")).unwrap();
    assert!(killed_at.trim() < "step-00000032", "killed too late: {killed_at}");
    assert!(train_cmd(&r, &resumed).status().unwrap().success());

    let a = final_weights(&straight);
    let b = final_weights(&resumed);
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after resume");
    }
    // The metrics log holds each step once, with the same values.
    let log_a = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let log_b = std::fs::read_to_string(resumed.join("metrics.jsonl")).unwrap();
    assert_eq!(log_a.lines().count(), 32);
    assert_eq!(log_a, log_b);
    // And training learned something on this fixture.
    let first: serde_json::Value = serde_json::from_str(log_a.lines().next().unwrap()).unwrap();
    let last: serde_json::Value = serde_json::from_str(log_a.lines().last().unwrap()).unwrap();
    assert!(last["loss"].as_f64().unwrap() < first["loss"].as_f64().unwrap());
}

#[test]
fn shards_of_another_target_are_refused() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let other = reference("dense_targets.py", &[]).join("llama");
    let r = recipe(dir.path(), &fx, "");
    let text = std::fs::read_to_string(&r).unwrap().replace(fx.join("target").to_str().unwrap(), other.to_str().unwrap());
    std::fs::write(&r, text).unwrap();
    let out = train_cmd(&r, &dir.path().join("run")).stderr(Stdio::piped()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("another target") && err.contains("config hash"), "{err}");
}

#[test]
fn aux_width_mismatch_is_refused() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), &fx, "");
    let text = std::fs::read_to_string(&r).unwrap().replace("aux_layer_ids = [1, 2, 3]", "aux_layer_ids = [1, 3]");
    std::fs::write(&r, text).unwrap();
    let out = train_cmd(&r, &dir.path().join("run")).stderr(Stdio::piped()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("aux ids [1, 2, 3]") && err.contains("[1, 3]"), "{err}");
}

/// Copies the fixture chunk with NaN / inf written into the features of samples 1 and 3, with
/// checksums recomputed (the reader would otherwise refuse the files as corrupt).
fn poisoned_chunk(fx: &Path, dir: &Path) -> PathBuf {
    edited_chunk(&fx.join("features"), &dir.join("poisoned"), |n, t, offsets| {
        if n == "aux" {
            let _ = t.get(offsets[1] + 2).fill_(f64::NAN);
        }
        if n == "last_hidden" {
            let _ = t.get(offsets[3]).fill_(f64::INFINITY);
        }
    })
}

#[test]
fn nonfinite_batches_are_skipped_and_counted() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let poisoned = poisoned_chunk(&fx, dir.path());
    let r = recipe(dir.path(), &fx, "");
    let text = std::fs::read_to_string(&r)
        .unwrap()
        .replace(fx.join("features").to_str().unwrap(), poisoned.to_str().unwrap())
        .replace("epochs = 8", "epochs = 1");
    std::fs::write(&r, text).unwrap();
    let run = dir.path().join("run");
    assert!(train_cmd(&r, &run).status().unwrap().success());
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["skipped_nonfinite"], 2, "{log}");
    for (name, t) in final_weights(&run) {
        if t.is_floating_point() {
            assert!(bool::try_from(t.isfinite().all()).unwrap(), "{name} saw a non-finite feature");
        }
    }
    let _ = Kind::Float;
}

/// A resume is the same run or is refused, naming what changed: a recipe value, or the data
/// (here the same chunk listed twice: other samples, another plan).
#[test]
fn resume_with_another_recipe_or_other_data_is_refused() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), &fx, "max_steps = 2\n");
    let out = dir.path().join("run");
    let run = |extra: &[&str]| {
        let o = train_cmd(&r, &out).args(extra).stdout(Stdio::piped()).stderr(Stdio::piped()).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    assert!(run(&[]).0);
    let (ok, e) = run(&["--set", "train.lr=1e-3"]);
    assert!(!ok && e.contains("train.lr") && e.contains("0.003") && e.contains("0.001"), "{e}");
    let chunk = fx.join("features");
    let (ok, e) = run(&["--features", chunk.to_str().unwrap(), "--features", chunk.to_str().unwrap()]);
    assert!(!ok && e.contains("data_fingerprint"), "{e}");
    let (ok, e) = run(&[]);
    assert!(ok, "the same command resumes: {e}");
}

/// `train --draft-config` takes a SpecForge-style llama EAGLE-3 config.json: its fields set the
/// head (here a narrower MLP than the target's), bookkeeping fields pass, and a field the head
/// cannot honour is refused by name.
#[test]
fn a_specforge_draft_config_sets_the_head_or_is_refused_by_name() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let target: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fx.join("target/config.json")).unwrap()).unwrap();
    let heads = target["num_attention_heads"].as_i64().unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "head_dim": target["hidden_size"].as_i64().unwrap() / heads, "hidden_act": "silu",
        "hidden_size": target["hidden_size"], "initializer_range": 0.02, "intermediate_size": 24,
        "max_position_embeddings": 2048, "num_attention_heads": heads, "num_hidden_layers": 1,
        "num_key_value_heads": target["num_key_value_heads"].as_i64().unwrap_or(heads), "rms_norm_eps": 1e-6, "rope_scaling": null,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.57.0",
        "use_cache": true, "use_sliding_window": false, "vocab_size": target["vocab_size"], "draft_vocab_size": 256,
        "fc_norm": true, "norm_output": true,
    });
    let cfg_path = dir.path().join("specforge-eagle3.json");
    std::fs::write(&cfg_path, config.to_string()).unwrap();
    let r = recipe(dir.path(), &fx, "max_steps = 2\n");
    let out = dir.path().join("run");
    let o = train_cmd(&r, &out).arg("--draft-config").arg(&cfg_path).stderr(Stdio::piped()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    let head: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints").join(latest.trim()).join("config.json")).unwrap()).unwrap();
    assert_eq!(head["intermediate_size"], 24, "{head}");
    assert_eq!(head["eagle_aux_hidden_state_layer_ids"], serde_json::json!([1, 2, 3]));
    for (field, value) in
        [("num_experts", serde_json::json!(8)), ("hidden_act", serde_json::json!("gelu")), ("attention_bias", serde_json::json!(true))]
    {
        let mut bad = config.clone();
        bad[field] = value;
        std::fs::write(&cfg_path, bad.to_string()).unwrap();
        let o = train_cmd(&r, &dir.path().join(format!("bad-{field}")))
            .arg("--draft-config")
            .arg(&cfg_path)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.code() == Some(1) && e.contains(field), "{field}: {e}");
    }
}
