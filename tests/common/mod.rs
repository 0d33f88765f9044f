//! Shared test helpers: the project venv's Python for reference scripts, cached reference
//! outputs, and the one tolerance helper per dtype.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use tch::{Kind, Tensor};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project venv's python. Tests that need a reference fail (not skip) without it: `make
/// test` creates it, and a parity test that silently skips would prove nothing.
pub fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(p.exists(), "{} missing: run `make setup` (scripts/setup.sh) first", p.display());
    p
}

static LOCK: Mutex<()> = Mutex::new(());

/// Runs `tests/reference/<script> <out> <args...>` once per distinct (script, args) and returns
/// the output directory, under target/reference-cache. Reruns when the script changes. An arg
/// `{out}` is replaced by the directory instead (for scripts taking a subcommand first).
pub fn reference(script: &str, args: &[&str]) -> PathBuf {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let script_path = root().join("tests/reference").join(script);
    let text = std::fs::read(&script_path).expect("reference script exists");
    let key = xxhash_rust::xxh3::xxh3_64(&[text.as_slice(), args.join("\0").as_bytes()].concat());
    let out = root().join("target/reference-cache").join(format!("{}-{key:016x}", script.trim_end_matches(".py")));
    let done = out.join(".done");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let mut cmd = Command::new(python());
        cmd.arg(&script_path);
        if args.contains(&"{out}") {
            cmd.args(args.iter().map(|a| if *a == "{out}" { out.to_str().unwrap() } else { a }));
        } else {
            cmd.arg(&out).args(args);
        }
        let status = cmd.status().expect("spawn python");
        assert!(status.success(), "reference {script} {args:?} failed: {status}");
        std::fs::write(&done, b"ok").unwrap();
    }
    out
}

/// Reads every tensor of a safetensors file.
pub fn load_all(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_iter().collect()
}

/// Tolerance policy, one per dtype: the error relative to the reference's largest magnitude,
/// `max|a - e| / max|e|`. Per-tensor, so one tiny element cannot dominate.
pub fn tol_for(kind: Kind) -> f64 {
    match kind {
        Kind::Float => 1e-5,
        Kind::Double => 1e-12,
        Kind::BFloat16 => 1.6e-2,
        Kind::Half => 2e-3,
        _ => 0.0,
    }
}

/// `max|a - e| / max|e|` in f64.
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> f64 {
    let a = actual.to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    assert_eq!(a.size(), e.size(), "shape mismatch");
    let diff = (&a - &e).abs().max().double_value(&[]);
    let scale = e.abs().max().double_value(&[]).max(1e-30);
    diff / scale
}

/// Asserts `actual` is within the dtype tolerance of `expected`, naming `what` on failure.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, kind: Kind) {
    let r = rel_err(actual, expected);
    assert!(r <= tol_for(kind), "{what}: relative error {r:.3e} > {:.1e}", tol_for(kind));
}

/// Copies the one-shard fixture chunk `src` to `dst` with `edit(tensor name, tensor, offsets)`
/// applied to its tensors, and the manifest's size and checksum recomputed (the reader would
/// otherwise refuse the shard as corrupt).
pub fn edited_chunk(src: &Path, dst: &Path, edit: impl Fn(&str, &mut Tensor, &[i64])) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    let name = "shard-00000-00000.safetensors";
    let f = specforge_rs::weights::SafetensorsFile::open(&src.join(name)).unwrap();
    let mut tensors: Vec<(String, Tensor)> = f.names().map(|n| (n.to_string(), f.tensor(n).unwrap())).collect();
    let offsets: Vec<i64> = Vec::try_from(&f.tensor("offsets").unwrap()).unwrap();
    for (n, t) in tensors.iter_mut() {
        edit(n, t, &offsets);
    }
    specforge_rs::weights::save_safetensors(&dst.join(name), &tensors, None).unwrap();
    let bytes = std::fs::read(dst.join(name)).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("manifest.json")).unwrap()).unwrap();
    m["shards"][0]["xxh3"] = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)).into();
    m["shards"][0]["bytes"] = bytes.len().into();
    std::fs::write(dst.join("manifest.json"), serde_json::to_string_pretty(&m).unwrap()).unwrap();
    dst.to_path_buf()
}
