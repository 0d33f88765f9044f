//! Data-parallel training over Gloo (CPU): `launch --nproc-per-node 2|3 -- train` ends with the
//! same weights as one process with the same global batch (grad_accum = world size), within
//! 1e-6 (and the same gradient norms and metrics at every step); two `launch --nnodes 2`
//! invocations on loopback train as one group.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use specforge_rs::weights::SafetensorsFile;
use tch::Tensor;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn recipe(dir: &Path, fx: &Path, accum: u64) -> PathBuf {
    let p = dir.join(format!("recipe-{accum}.toml"));
    let text = format!(
        "[target]\nname = {:?}\ndtype = \"f32\"\n\n[data]\nfeatures = [{:?}]\n\n[draft]\nvariant = \"eagle3\"\naux_layer_ids = [1, 2, 3]\ndraft_vocab_size = 256\n\n[train]\nttt_steps = 3\nlr = 2e-4\nepochs = 4\nmax_batch_size = 1\ngrad_accum = {accum}\nsave_every = 0\nseed = 9\ncollective_timeout_s = 60\n",
        fx.join("target").to_str().unwrap(),
        fx.join("features").to_str().unwrap()
    );
    std::fs::write(&p, text).unwrap();
    p
}

/// `launch` as node `rank` of a 2-node job (one rank each) training `recipe` into `out`.
fn node(port: &str, rank: &str, recipe: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.args(["launch", "--nnodes", "2", "--node-rank", rank, "--nproc-per-node", "1", "--master-port", port, "--", "train", "--recipe"])
        .arg(recipe)
        .arg("--out")
        .arg(out);
    c
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_specforge-rs"));
    c.env("OMP_NUM_THREADS", "1").stdout(Stdio::null());
    c
}

fn weights(run: &Path) -> Vec<(String, Tensor)> {
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let f = SafetensorsFile::open(&run.join("checkpoints").join(latest.trim()).join("model.safetensors")).unwrap();
    f.names().filter(|n| *n != "d2t" && *n != "t2d").map(|n| (n.to_string(), f.tensor(n).unwrap())).collect()
}

fn assert_same(a: &Path, b: &Path, what: &str) {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    for ((n, x), (_, y)) in wa.iter().zip(&wb) {
        let diff = (x - y).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{what}: {n} differs by {diff:e}");
    }
    let state = |p: &Path| -> serde_json::Value {
        let latest = std::fs::read_to_string(p.join("checkpoints/latest")).unwrap();
        serde_json::from_str(&std::fs::read_to_string(p.join("checkpoints").join(latest.trim()).join("state.json")).unwrap()).unwrap()
    };
    assert_eq!(state(a)["step"], state(b)["step"], "{what}: optimizer steps");
    // Adam hides a gradient scale error in the weights; the logged gradient norm and the
    // rank-reduced metrics do not.
    let log = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (la, lb) = (log(a), log(b));
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(&lb) {
        let rel = |k: &str| (x[k].as_f64().unwrap() - y[k].as_f64().unwrap()).abs() / x[k].as_f64().unwrap().abs().max(1e-12);
        assert!(rel("grad_norm") < 1e-5 && rel("loss") < 1e-5, "{what}: step {} differs: {x} vs {y}", x["step"]);
        assert_eq!(x["acc"], y["acc"], "{what}: metrics are reduced across ranks before the ratio");
        assert_eq!(x["positions"], y["positions"]);
    }
}

#[test]
fn ddp_equals_single_process_with_the_same_global_batch() {
    let fx = reference("ttt_reference.py", &["make", "{out}", "--seed", "3"]);
    let dir = tempfile::tempdir().unwrap();
    for world in [2u64, 3] {
        let single = dir.path().join(format!("single-{world}"));
        let r1 = recipe(dir.path(), &fx, world);
        assert!(bin().args(["train", "--recipe", r1.to_str().unwrap(), "--out", single.to_str().unwrap()]).status().unwrap().success());

        let multi = dir.path().join(format!("ddp-{world}"));
        let rw = recipe(dir.path(), &fx, 1);
        let status = bin()
            .args(["launch", "--nproc-per-node", &world.to_string(), "--master-port", &free_port().to_string(), "--", "train", "--recipe"])
            .arg(&rw)
            .arg("--out")
            .arg(&multi)
            .status()
            .unwrap();
        assert!(status.success(), "launch with {world} ranks failed");
        assert_same(&single, &multi, &format!("{world} ranks"));
        // Only rank 0 writes checkpoints and metrics.
        assert_eq!(
            std::fs::read_dir(multi.join("checkpoints"))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("step-"))
                .count(),
            1
        );
    }
}

#[test]
fn two_nodes_on_loopback_train_as_one_group() {
    let fx = reference("ttt_reference.py", &["make", "{out}", "--seed", "3"]);
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    let r2 = recipe(dir.path(), &fx, 2);
    assert!(bin().args(["train", "--recipe", r2.to_str().unwrap(), "--out", single.to_str().unwrap()]).status().unwrap().success());
    let r1 = recipe(dir.path(), &fx, 1);
    let port = free_port().to_string();
    let out = dir.path().join("two-nodes");
    let node = |rank: &str| node(&port, rank, &r1, &out).spawn().unwrap();
    let mut n1 = node("1");
    let mut n0 = node("0");
    assert!(n0.wait().unwrap().success() && n1.wait().unwrap().success());
    assert_same(&single, &out, "two nodes");
}

/// Two nodes started with different recipes stop before the first step, both naming what
/// differs, instead of training two different runs into one head (or hanging).
#[test]
fn ranks_with_different_recipes_stop_naming_the_difference() {
    let fx = reference("ttt_reference.py", &["make", "{out}", "--seed", "3"]);
    let dir = tempfile::tempdir().unwrap();
    let r1 = recipe(dir.path(), &fx, 1);
    let other = dir.path().join("other.toml");
    std::fs::write(&other, std::fs::read_to_string(&r1).unwrap().replace("lr = 2e-4", "lr = 3e-4")).unwrap();
    let port = free_port().to_string();
    let node = |rank: &str, recipe: &Path| {
        node(&port, rank, recipe, &dir.path().join(format!("out-{rank}"))).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let n1 = node("1", &other);
    let n0 = node("0", &r1);
    for n in [n0, n1] {
        let o = n.wait_with_output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("rank 1 disagrees with rank 0 on the recipe"), "{e}");
    }
}

/// A rank whose every micro-batch of a step is skipped (non-finite features) still takes part in
/// the gradient all-reduce: the job finishes instead of hanging on mismatched collectives.
#[test]
fn a_rank_with_only_skipped_batches_still_joins_the_collectives() {
    let fx = reference("ttt_reference.py", &["make", "{out}", "--seed", "3"]);
    let dir = tempfile::tempdir().unwrap();
    // Every sample but the first poisoned: whenever one rank holds sample 0, the other skips.
    let dst = edited_chunk(&fx.join("features"), &dir.path().join("mostly-nan"), |n, t, offsets| {
        if n == "aux" {
            for &start in &offsets[1..offsets.len() - 1] {
                let _ = t.get(start).fill_(f64::NAN);
            }
        }
    });
    let r = recipe(dir.path(), &fx, 1);
    let text = std::fs::read_to_string(&r).unwrap().replace("collective_timeout_s = 60", "collective_timeout_s = 20");
    std::fs::write(&r, text).unwrap();
    let out = dir.path().join("run");
    let o = bin()
        .args(["launch", "--nproc-per-node", "2", "--master-port", &free_port().to_string(), "--", "train", "--recipe"])
        .arg(&r)
        .args(["--features", dst.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints").join(latest.trim()).join("state.json")).unwrap()).unwrap();
    assert!(state["skipped_nonfinite"].as_u64().unwrap() > 0, "{state}");
}
