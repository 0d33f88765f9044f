//! The reliability suite (docs/reliability.md): kill -9 at seeded random moments of extract,
//! train and run, each rerun ending with the bytes of an uninterrupted run; writes that hit a
//! full disk (RLIMIT_FSIZE) during extract, a checkpoint and an export, each leaving the previous
//! state usable and saying what happened; and a corpus of bad inputs across datasets, configs,
//! safetensors, shards, recipes, chat templates and command-line values, each ending in a clear
//! error (exit code 1) or a counted skip, never a panic (101) or a hang. The counts go to
//! `target/reliability-summary.txt`, which `make test` prints.

mod common;
mod data_support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use data_support::{synthetic_conversations, tiny_target};

/// Counts per category, written once every test has added its own.
static COUNTS: Mutex<Vec<(&'static str, usize)>> = Mutex::new(Vec::new());

fn record(what: &'static str, n: usize) {
    let mut c = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    c.push((what, n));
    let text: String = c.iter().map(|(w, n)| format!("reliability: {n} {w}\n")).collect();
    let _ = std::fs::write(root().join("target/reliability-summary.txt"), text);
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_specforge-rs"));
    c.env("OMP_NUM_THREADS", "1").env("RUST_LOG", "warn").env_remove("RANK").env_remove("WORLD_SIZE").stdin(Stdio::null());
    c
}

fn output(c: &mut Command) -> Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped()).output().expect("spawn specforge-rs")
}

fn ok(c: &mut Command) {
    let o = output(c);
    assert!(o.status.success(), "{:?} failed: {}", c, String::from_utf8_lossy(&o.stderr));
}

/// A small deterministic generator (the kill moments are seeded: a failure reproduces).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Every regular file under `dir` (relative path → bytes), optionally filtered.
fn tree(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, keep: &dyn Fn(&str) -> bool, out: &mut Vec<(String, Vec<u8>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                walk(root, &p, keep, out);
            } else if keep(&rel) {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, keep, &mut out);
    out.sort();
    out
}

/// Kills `c` with SIGKILL after `delay` (or lets it finish first), returning whether it was
/// killed.
fn kill_after(c: &mut Command, delay: Duration) -> bool {
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    let start = Instant::now();
    while start.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

/// A recipe training the TTT fixture `fx` (a checkpoint every step), plus `extra` `[train]` keys.
fn train_recipe(fx: &Path, extra: &str) -> String {
    format!(
        "[target]\nname = {:?}\ndtype = \"f32\"\n\n[data]\nfeatures = [{:?}]\n\n[draft]\nvariant = \"eagle3.1\"\naux_layer_ids = [1, 2, 3]\ndraft_vocab_size = 256\n\n[train]\nttt_steps = 3\nlr = 3e-3\nepochs = 4\nmax_batch_size = 1\nsave_every = 1\nseed = 5\n{extra}",
        fx.join("target").to_str().unwrap(),
        fx.join("features").to_str().unwrap()
    )
}

/// Runs `cmd(dir)` uninterrupted, then `points` times in fresh directories killed at a seeded
/// moment within the uninterrupted run's duration and run again to the end; every outcome must
/// equal the uninterrupted one. Returns how many kills landed while the command ran.
fn kill_points<T: PartialEq>(
    tmp: &Path,
    name: &str,
    points: usize,
    rng: &mut Lcg,
    cmd: &dyn Fn(&Path) -> Command,
    outcome: &dyn Fn(&Path) -> T,
) -> usize {
    let straight = tmp.join(format!("{name}-straight"));
    let t = Instant::now();
    ok(&mut cmd(&straight));
    let span = t.elapsed();
    let want = outcome(&straight);
    let mut kills = 0;
    for i in 0..points {
        let out = tmp.join(format!("{name}-{i}"));
        kills += kill_after(&mut cmd(&out), span.mul_f64(rng.next())) as usize;
        ok(&mut cmd(&out));
        assert!(outcome(&out) == want, "{name} killed at point {i}: the result differs from an uninterrupted run's");
    }
    kills
}

/// kill -9 at seeded random moments, then the same command: the result equals an uninterrupted
/// run's, byte for byte.
#[test]
fn kill_9_at_random_moments_then_rerun_gives_the_same_bytes() {
    let mut rng = Lcg(20261207);
    let tmp = tempfile::tempdir().unwrap();
    let mut kills = 0;

    // extract: a tiny target over 120 conversations, several shards.
    let model = tiny_target();
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, synthetic_conversations(120, 11)).unwrap();
    let extract =
        |out: &Path| {
            let mut c = bin();
            c.args(["extract", "--target", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()])
                .args(["--shard-size", "200k", "--batch-tokens", "1024"]);
            c
        };
    let shards = |d: &Path| tree(d, &|f: &str| f.ends_with(".safetensors"));
    kills += kill_points(tmp.path(), "extract", 8, &mut rng, &extract, &shards);
    assert!(shards(&tmp.path().join("extract-straight")).len() >= 3, "several shards");

    // train: the TTT fixture, a checkpoint every step.
    let fx = reference("ttt_reference.py", &["make", "{out}", "--eagle31", "--seed", "1"]);
    let recipe = tmp.path().join("train.toml");
    std::fs::write(&recipe, train_recipe(&fx, "keep_last = 2\n")).unwrap();
    let train = |out: &Path| {
        let mut c = bin();
        c.args(["train", "--recipe", recipe.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        c
    };
    let head = |run: &Path| {
        let root = run.join("checkpoints");
        let latest = std::fs::read_to_string(root.join("latest")).unwrap();
        std::fs::read(root.join(latest.trim()).join("model.safetensors")).unwrap()
    };
    kills += kill_points(tmp.path(), "train", 8, &mut rng, &train, &head);

    // run: the whole pipeline on the tiny target.
    let run_recipe = tmp.path().join("run.toml");
    std::fs::write(
        &run_recipe,
        format!(
            "[target]\nname = {:?}\ndtype = \"f32\"\n\n[data]\npath = {:?}\nlimit = 24\nmax_len = 256\nchunk_samples = 8\n\n[regenerate]\nmax_new_tokens = 12\nbatch_size = 4\n\n[draft]\nvariant = \"eagle3\"\naux_layer_ids = [1, 2, 4]\ndraft_vocab_size = 512\n\n[train]\nttt_steps = 2\nlr = 3e-3\nepochs = 2\ntoken_budget = 512\nmax_batch_size = 2\nsave_every = 2\n",
            model.to_str().unwrap(),
            root().join("data/prompts-train.jsonl").to_str().unwrap()
        ),
    )
    .unwrap();
    let run = |out: &Path| {
        let mut c = bin();
        c.args(["run", run_recipe.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        c
    };
    let outcome = |out: &Path| {
        let mut s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        s.as_object_mut().unwrap().remove("export_dir");
        (std::fs::read(out.join("export/model.safetensors")).unwrap(), s)
    };
    kills += kill_points(tmp.path(), "run", 5, &mut rng, &run, &outcome);
    assert!(kills >= 15, "only {kills} of 21 seeded moments fell inside a run");
    record("kill -9 points (extract 8, train 8, run 5 seeded moments; every rerun byte-identical)", kills);
}

/// Runs `c` with writes limited to `bytes` per file (RLIMIT_FSIZE, SIGXFSZ ignored so the write
/// fails with EFBIG as on a full disk).
fn with_file_limit(c: &mut Command, bytes: u64) -> &mut Command {
    // SAFETY: only async-signal-safe calls (setrlimit, signal) between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        })
    }
}

/// A write that fails (file size limit, as on a full disk) during extract, a checkpoint and an
/// export: a clear error, and what was there before stays usable.
#[test]
fn a_full_disk_leaves_the_previous_state_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let mut faults = 0;
    let model = tiny_target();
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, synthetic_conversations(60, 4)).unwrap();
    let extract = |out: &Path| {
        let mut c = bin();
        c.args(["extract", "--target", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(["--shard-size", "200k"]);
        c
    };
    let fails = |c: &mut Command, what: &str| {
        let o = output(c);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.code() == Some(1) && e.contains("File too large"), "{what}: {:?} {e}", o.status.code());
    };

    // extract: the shard write fails; the chunk lists only complete shards; a rerun completes it.
    let straight = tmp.path().join("straight");
    ok(&mut extract(&straight));
    let out = tmp.path().join("full");
    let largest = std::fs::read_dir(&straight).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).max().unwrap();
    fails(with_file_limit(&mut extract(&out), largest / 2), "extract");
    if out.join("manifest.json").exists() {
        specforge_rs::extract::Chunk::open(&out).expect("a chunk cut short by a full disk still opens");
    }
    ok(&mut extract(&out));
    let shards = |d: &Path| tree(d, &|f: &str| f.ends_with(".safetensors"));
    assert!(shards(&out) == shards(&straight));
    faults += 1;

    // A checkpoint: the next one fails; the last good one is what export and resume use.
    let fx = reference("ttt_reference.py", &["make", "{out}", "--eagle31", "--seed", "1"]);
    let recipe = tmp.path().join("train.toml");
    std::fs::write(&recipe, train_recipe(&fx, "max_steps = 2\n")).unwrap();
    let run = tmp.path().join("run");
    let train = || {
        let mut c = bin();
        c.args(["train", "--recipe", recipe.to_str().unwrap(), "--out", run.to_str().unwrap()]);
        c
    };
    ok(&mut train());
    // Back to step 1, then the step-2 checkpoint hits the full disk.
    let opt = std::fs::metadata(run.join("checkpoints/step-00000002/optimizer.safetensors")).unwrap().len();
    std::fs::remove_dir_all(run.join("checkpoints/step-00000002")).unwrap();
    std::fs::remove_file(run.join("checkpoints/latest")).unwrap();
    fails(with_file_limit(&mut train(), opt - 1), "checkpoint");
    let latest = specforge_rs::train::checkpoint::latest(&run).unwrap().unwrap();
    assert_eq!(latest.state.step, 1, "the last good checkpoint");
    faults += 1;

    // An export over an older one: the old files stay whole (and valid).
    let head = tmp.path().join("head");
    ok(bin().args(["export", "--checkpoint", run.to_str().unwrap(), "--out", head.to_str().unwrap()]));
    let before = tree(&head, &|_| true);
    let weights = std::fs::metadata(head.join("model.safetensors")).unwrap().len();
    fails(
        with_file_limit(bin().args(["export", "--checkpoint", run.to_str().unwrap(), "--out", head.to_str().unwrap()]), weights / 2),
        "export",
    );
    specforge_rs::export::validate_dir(&head).expect("the earlier export is intact");
    assert!(tree(&head, &|f: &str| !f.starts_with('.')) == before.into_iter().filter(|(f, _)| !f.starts_with('.')).collect::<Vec<_>>());
    faults += 1;
    record("disk-full faults (extract, checkpoint, export; each leaves the previous state usable)", faults);
}

/// Bad inputs of many kinds: each ends in a clear error (exit 1, a message) or a counted skip,
/// never a panic or a hang.
#[test]
fn bad_inputs_end_in_a_clear_error_or_a_counted_skip() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_target();
    let m = model.to_str().unwrap();
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, synthetic_conversations(6, 2)).unwrap();
    let d = data.to_str().unwrap();
    let mut kinds = 0;
    let mut refused = |what: &str, c: &mut Command| {
        let start = Instant::now();
        let o = output(c);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.code() == Some(1) && e.contains("Error"), "{what}: exit {:?}, stderr {e}", o.status.code());
        assert!(start.elapsed() < Duration::from_secs(60), "{what}: took {:?}", start.elapsed());
        kinds += 1;
    };

    // Datasets: the bad-line corpus, every kind reported and counted.
    let corpus = root().join("data/bad-corpus/corpus.jsonl");
    let report = tmp.path().join("bad.jsonl");
    let o = output(
        bin().args(["vocab", "--target", m, "--data", corpus.to_str().unwrap(), "--draft-vocab-size", "64", "--max-len", "64"]).args([
            "--max-bad-fraction",
            "1",
            "--report",
            report.to_str().unwrap(),
            "--out",
            tmp.path().join("v.safetensors").to_str().unwrap(),
        ]),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reported: std::collections::BTreeSet<String> = std::fs::read_to_string(&report)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].as_str().unwrap().to_string())
        .collect();
    let expected: std::collections::BTreeSet<String> = std::fs::read_to_string(root().join("data/bad-corpus/expected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(expected.is_subset(&reported), "{expected:?} vs {reported:?}");
    let dataset_kinds = expected.len();
    refused(
        "a dataset over the bad-line threshold",
        bin().args([
            "vocab",
            "--target",
            m,
            "--data",
            corpus.to_str().unwrap(),
            "--out",
            tmp.path().join("v2.safetensors").to_str().unwrap(),
        ]),
    );
    refused(
        "binary dataset (/dev/zero)",
        bin().args(["vocab", "--target", m, "--data", "/dev/zero", "--out", tmp.path().join("z").to_str().unwrap()]),
    );

    // Target configs: a copy of the tiny target with one field broken.
    let broken_target = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in std::fs::read_dir(&model).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        dir
    };
    // `extract` on a broken target copy, into a directory of its own.
    let extract_with = |target: &Path| {
        let mut c = bin();
        let out = tmp.path().join(format!("out-{}", target.file_name().unwrap().to_string_lossy()));
        c.args(["extract", "--target", target.to_str().unwrap(), "--data", d, "--out", out.to_str().unwrap()]);
        c
    };
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("zero heads", Box::new(|c| c["num_attention_heads"] = 0.into())),
        ("negative kv heads", Box::new(|c| c["num_key_value_heads"] = (-2).into())),
        ("kv heads not dividing heads", Box::new(|c| c["num_key_value_heads"] = 3.into())),
        ("absurd vocabulary", Box::new(|c| c["vocab_size"] = (1i64 << 40).into())),
        ("missing hidden_size", Box::new(|c| c.as_object_mut().unwrap().remove("hidden_size").map(|_| ()).unwrap_or(()))),
        ("unknown model_type", Box::new(|c| c["model_type"] = "mystery".into())),
        ("unsupported activation", Box::new(|c| c["hidden_act"] = "relu".into())),
    ];
    for (i, (what, edit)) in cases.iter().enumerate() {
        let dir = broken_target(&format!("cfg-{i}"), edit.as_ref());
        refused(what, &mut extract_with(&dir));
    }

    // Weights: truncated, junk header, a pickle checkpoint instead of safetensors.
    type Damage<'a> = &'a dyn Fn(&Path);
    let weights_cases: [(&str, Damage); 3] = [
        ("truncated safetensors", &|dir: &Path| {
            let p = dir.join("model.safetensors");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
        }),
        ("junk safetensors header", &|dir: &Path| {
            std::fs::write(dir.join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap()
        }),
        ("pickle checkpoint", &|dir: &Path| {
            std::fs::remove_file(dir.join("model.safetensors")).unwrap();
            std::fs::write(dir.join("pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
        }),
    ];
    for (i, (what, edit)) in weights_cases.iter().enumerate() {
        let dir = broken_target(&format!("w-{i}"), &|_| {});
        edit(&dir);
        refused(what, &mut extract_with(&dir));
    }

    // Chat templates that never end or grow without bound.
    let big = format!("{{% for i in range(10000) %}}{}{{% endfor %}}", "0123456789".repeat(1000));
    for (i, (what, template)) in [
        ("endless chat template", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
        ("chat template output without bound", big.as_str()),
    ]
    .iter()
    .enumerate()
    {
        let dir = broken_target(&format!("t-{i}"), &|c| {
            let _ = c;
        });
        std::fs::write(dir.join("chat_template.jinja"), template).unwrap();
        let tc = dir.join("tokenizer_config.json");
        if tc.exists() {
            let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
            v.as_object_mut().unwrap().remove("chat_template");
            std::fs::write(&tc, v.to_string()).unwrap();
        }
        refused(what, bin().args(["generate", "--target", dir.to_str().unwrap(), "--prompt", "hi", "--max-new-tokens", "2"]));
    }

    // Feature shards: a flipped byte, a token id outside the vocabulary, a missing shard.
    let chunk = tmp.path().join("chunk");
    ok(bin().args(["extract", "--target", m, "--data", d, "--out", chunk.to_str().unwrap()]));
    let shard =
        std::fs::read_dir(&chunk).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|x| x == "safetensors")).unwrap();
    let pristine = std::fs::read(&shard).unwrap();
    let manifest = std::fs::read_to_string(chunk.join("manifest.json")).unwrap();
    let vocab_cmd = |c: &Path| {
        let mut cmd = bin();
        cmd.args([
            "vocab",
            "--target",
            m,
            "--shards",
            c.to_str().unwrap(),
            "--draft-vocab-size",
            "64",
            "--out",
            tmp.path().join("vs.safetensors").to_str().unwrap(),
        ]);
        cmd
    };
    let mut flipped = pristine.clone();
    let k = flipped.len() - 10;
    flipped[k] ^= 1;
    std::fs::write(&shard, &flipped).unwrap();
    refused("corrupt shard", &mut vocab_cmd(&chunk));
    std::fs::write(&shard, &pristine).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    v["target"]["vocab_size"] = 3.into();
    std::fs::write(chunk.join("manifest.json"), v.to_string()).unwrap();
    refused("token ids outside the vocabulary", &mut vocab_cmd(&chunk));
    std::fs::write(chunk.join("manifest.json"), &manifest).unwrap();
    std::fs::remove_file(&shard).unwrap();
    refused("missing shard", &mut vocab_cmd(&chunk));

    // Draft configs behind `export`.
    let head_cases: [(&str, serde_json::Value); 3] = [
        ("draft with zero heads", serde_json::json!({"num_attention_heads": 0})),
        ("draft with zero kv heads", serde_json::json!({"num_key_value_heads": 0})),
        ("draft of absurd width", serde_json::json!({"intermediate_size": 1i64 << 40})),
    ];
    for (i, (what, patch)) in head_cases.iter().enumerate() {
        let dir = tmp.path().join(format!("head-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 8, "intermediate_size": 24, "vocab_size": 40, "draft_vocab_size": 10, "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
        });
        for (k, v) in patch.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"").unwrap();
        refused(
            what,
            bin().args(["export", "--checkpoint", dir.to_str().unwrap(), "--out", tmp.path().join(format!("he{i}")).to_str().unwrap()]),
        );
    }

    // Recipes.
    for (i, (what, extra)) in [
        ("recipe with an unknown key", "[train]\nlearning_rate = 1.0\n"),
        ("recipe with an unknown variant", "[draft]\nvariant = \"eagle4\"\n"),
        ("recipe with ttt_steps 0", "[train]\nttt_steps = 0\n"),
        ("recipe with warmup_ratio 1.5", "[train]\nwarmup_ratio = 1.5\n"),
        ("recipe that is not TOML", "[train\n"),
    ]
    .iter()
    .enumerate()
    {
        let r = tmp.path().join(format!("r{i}.toml"));
        std::fs::write(&r, format!("[target]\nname = {m:?}\n{extra}")).unwrap();
        refused(what, bin().args(["train", "--recipe", r.to_str().unwrap(), "--out", tmp.path().join(format!("ro{i}")).to_str().unwrap()]));
    }

    // Command-line values.
    for (what, args) in [
        ("--top-p 0", vec!["generate", "--target", m, "--prompt", "hi", "--top-p", "0"]),
        ("--temperature -1", vec!["generate", "--target", m, "--prompt", "hi", "--temperature=-1"]),
        ("--max-new-tokens huge", vec!["generate", "--target", m, "--prompt", "hi", "--max-new-tokens", "18446744073709551615"]),
        ("--k 0", vec!["eval", "--target", m, "--draft", tmp.path().to_str().unwrap(), "--data", d, "--k", "0"]),
        ("--device cuda:7 on a host without it", vec!["generate", "--target", m, "--prompt", "hi", "--device", "cuda:7"]),
        (
            "--chunk past the end",
            vec![
                "extract",
                "--target",
                m,
                "--data",
                d,
                "--out",
                tmp.path().join("oc").to_str().unwrap(),
                "--chunk-samples",
                "4",
                "--chunk",
                "9",
            ],
        ),
        ("regenerate --out = --data", vec!["regenerate", "--target", m, "--data", d, "--out", d]),
    ] {
        refused(what, bin().args(&args));
    }
    let total = kinds + dataset_kinds;
    assert!(total >= 30, "{total} kinds");
    record("bad-input kinds (dataset line kinds counted and skipped, the rest refused with exit 1, none panicked or hung)", total);
}
