//! `specforge-rs run` on a tiny random target with SmolLM2's tokenizer: the whole pipeline, and
//! kill -9 at three different stages (regeneration, a chunk's extraction, training) followed by
//! the same command, ending exactly where an uninterrupted run ends.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn recipe(dir: &Path, target: &Path) -> PathBuf {
    let p = dir.join("tiny.toml");
    let root = root();
    let text = format!(
        r#"[target]
name = {target:?}
dtype = "f32"

[data]
path = {train:?}
eval_path = {eval:?}
limit = 48
max_len = 256
chunk_samples = 16

[regenerate]
max_new_tokens = 24
batch_size = 4

[draft]
variant = "eagle3.1"
aux_layer_ids = [1, 2, 4]
draft_vocab_size = 512

[train]
ttt_steps = 3
lr = 3e-3
epochs = 2
token_budget = 512
max_batch_size = 2
save_every = 2

[eval]
k = 3
max_new_tokens = 16
limit = 4
"#,
        target = target.to_str().unwrap(),
        train = root.join("data/prompts-train.jsonl").to_str().unwrap(),
        eval = root.join("data/prompts.jsonl").to_str().unwrap(),
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn run_cmd(recipe: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_specforge-rs"));
    c.args(["run", recipe.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// What must not change: the exported head's bytes and the measured numbers.
fn outcome(out: &Path) -> (Vec<u8>, serde_json::Value) {
    let head = std::fs::read(out.join("export/model.safetensors")).unwrap();
    let mut summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    summary.as_object_mut().unwrap().remove("export_dir");
    (head, summary)
}

fn kill_when(recipe: &Path, out: &Path, what: &str, ready: impl Fn(&Path) -> bool) {
    let mut child = run_cmd(recipe, out).spawn().unwrap();
    let start = Instant::now();
    while !ready(out) {
        assert!(child.try_wait().unwrap().is_none(), "run finished before the {what} stage could be interrupted");
        assert!(start.elapsed() < Duration::from_secs(600));
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

#[test]
fn run_resumes_after_kill9_at_three_stages() {
    let target = reference("tiny_target.py", &[root().join(".cache/smollm2-135m-instruct").to_str().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), &target);

    let straight = dir.path().join("straight");
    assert!(run_cmd(&r, &straight).status().unwrap().success());
    let want = outcome(&straight);
    assert!(want.1["trained"]["num_drafts"].as_u64().unwrap() > 0);
    assert_eq!(std::fs::read_dir(straight.join("chunks")).unwrap().count(), 0, "every chunk is deleted after training on it");

    // `eval` on the exported head reproduces the run's own evaluation (same prompts, k, budget),
    // and writes its table's numbers as JSON with a PNG beside.
    let eval_json = dir.path().join("eval.json");
    let st = Command::new(env!("CARGO_BIN_EXE_specforge-rs"))
        .args(["eval", "--draft"])
        .arg(straight.join("export"))
        .args(["--target", target.to_str().unwrap(), "--data", root().join("data/prompts.jsonl").to_str().unwrap()])
        .args(["--k", "3", "--max-new-tokens", "16", "--limit", "4", "--dtype", "f32", "--json"])
        .arg(&eval_json)
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let ev: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&eval_json).unwrap()).unwrap();
    assert_eq!(ev["counters"], want.1["trained"]);
    assert!(eval_json.with_extension("png").exists());
    // A standalone `export` of the run's training directory writes the same head, and a model card
    // from the checkpoint's recipe and the training log (acceptance left to `eval`).
    let again = dir.path().join("export-again");
    let st = Command::new(env!("CARGO_BIN_EXE_specforge-rs"))
        .args(["export", "--checkpoint"])
        .arg(straight.join("train"))
        .arg("--out")
        .arg(&again)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(std::fs::read(again.join("model.safetensors")).unwrap() == want.0, "standalone export differs from the run's");
    let card = std::fs::read_to_string(again.join("README.md")).unwrap();
    assert!(card.contains("## Training") && card.contains("Not measured yet") && again.join("training_loss.png").exists(), "{card}");
    // `generate --draft` answers exactly what plain greedy generation answers.
    let gen = |draft: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_specforge-rs"));
        c.args(["generate", "--target", target.to_str().unwrap(), "--prompts", root().join("data/prompts.jsonl").to_str().unwrap()])
            .args(["--limit", "4", "--max-new-tokens", "16"])
            .env("OMP_NUM_THREADS", "1");
        if draft {
            c.arg("--draft").arg(straight.join("export")).args(["--k", "3"]);
        }
        let out = String::from_utf8(c.output().unwrap().stdout).unwrap();
        out.split("\n").filter(|l| !l.contains("tokens/s")).collect::<Vec<_>>().join("\n")
    };
    assert_eq!(gen(true), gen(false));

    let lines = |p: &Path| std::fs::read_to_string(p.join("regenerated.jsonl")).map(|t| t.lines().count()).unwrap_or(0);
    let stage = |p: &Path| std::fs::read_to_string(p.join("run_state.json")).unwrap_or_default();
    let cases: [(&str, Box<dyn Fn(&Path) -> bool>); 3] = [
        ("regenerate", Box::new(move |p: &Path| lines(p) >= 12)),
        ("extract", Box::new(move |p: &Path| p.join("chunks/epoch-000-chunk-00001").exists())),
        ("train", Box::new(move |p: &Path| stage(p).contains("train") && p.join("train/checkpoints/step-00000008").exists())),
    ];
    for (name, ready) in cases {
        let out = dir.path().join(name);
        kill_when(&r, &out, name, ready);
        assert!(run_cmd(&r, &out).status().unwrap().success(), "rerun after a kill during {name} failed");
        let got = outcome(&out);
        assert_eq!(got.1, want.1, "summary after a kill during {name}");
        assert!(got.0 == want.0, "exported head after a kill during {name} differs");
    }
}

/// `run` never works in a directory it did not make: a non-empty one without its recipe is refused
/// before anything is loaded, and left as it was.
#[test]
fn run_refuses_a_foreign_non_empty_directory() {
    use specforge_rs::config::recipe::Recipe;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("precious.txt"), "mine").unwrap();
    let text = format!("[data]\npath = {:?}\n", root().join("data/prompts-train.jsonl").to_str().unwrap());
    let r = Recipe::parse(&text, Path::new("r.toml"), &[]).unwrap();
    let err = specforge_rs::pipeline::run(&r, dir.path(), &specforge_rs::runtime::Runtime::cpu()).unwrap_err().to_string();
    assert!(err.contains("not a run directory"), "{err}");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["precious.txt"]);
}

/// Every shipped recipe parses strictly; one whose target is not implemented stops at once.
#[test]
fn shipped_recipes_parse_and_unimplemented_targets_fail_at_once() {
    use specforge_rs::config::recipe::Recipe;
    let mut n = 0;
    for entry in std::fs::read_dir(root().join("recipes")).unwrap() {
        let p = entry.unwrap().path();
        let r = Recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        n += 1;
        if r.target.multimodal {
            let dir = tempfile::tempdir().unwrap();
            let err = specforge_rs::pipeline::run(&r, dir.path(), &specforge_rs::runtime::Runtime::cpu()).unwrap_err().to_string();
            assert!(err.contains("vision tower") && err.contains(&r.target.name), "{}: {err}", p.display());
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing is written");
        }
    }
    assert!(n >= 4);
}

fn spec(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_specforge-rs")).args(args).env("OMP_NUM_THREADS", "1").output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// The checksummed shard list of a chunk manifest (what makes its shards byte-identical).
fn shard_list(manifest: &Path) -> serde_json::Value {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    m["shards"].clone()
}

/// `run` and the separate commands are one wiring: the same regenerated data, vocabulary, shards,
/// final checkpoint and export, byte for byte.
#[test]
fn run_equals_the_separate_commands() {
    let target = reference("tiny_target.py", &[root().join(".cache/smollm2-135m-instruct").to_str().unwrap()]);
    let t = target.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let train_data = root().join("data/prompts-train.jsonl");
    let common = format!(
        "[target]\nname = {t:?}\ndtype = \"f32\"\n\n[draft]\nvariant = \"eagle3.1\"\naux_layer_ids = [1, 2, 4]\ndraft_vocab_size = 512\n\n\
         [train]\nttt_steps = 3\nlr = 3e-3\nepochs = 2\ntoken_budget = 512\nmax_batch_size = 2\nsave_every = 0\n"
    );
    let data = "limit = 24\nmax_len = 256\n";
    let run_recipe = dir.path().join("run.toml");
    std::fs::write(
        &run_recipe,
        format!("{common}\n[data]\npath = {:?}\n{data}\n[regenerate]\nmax_new_tokens = 16\nbatch_size = 4\n", train_data.to_str().unwrap()),
    )
    .unwrap();
    let out = dir.path().join("run");
    spec(&["run", run_recipe.to_str().unwrap(), "--out", out.to_str().unwrap()]);

    let sep = dir.path().join("sep");
    let p = |name: &str| sep.join(name).to_str().unwrap().to_string();
    let (regen, vocab, feats, train, export) = (p("regenerated.jsonl"), p("vocab.safetensors"), p("feats"), p("train"), p("export"));
    let flags = ["--target", t, "--dtype", "f32", "--limit", "24", "--max-len", "256"];
    fn cmd<'a>(stage: &'a str, flags: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [&[stage][..], flags, extra].concat()
    }
    spec(&cmd(
        "regenerate",
        &flags,
        &["--data", train_data.to_str().unwrap(), "--out", &regen, "--max-new-tokens", "16", "--batch-size", "4"],
    ));
    spec(&cmd("vocab", &flags, &["--data", &regen, "--draft-vocab-size", "512", "--out", &vocab]));
    spec(&cmd("extract", &flags, &["--data", &regen, "--out", &feats, "--aux-layer-ids", "1,2,4"]));
    let train_recipe = sep.join("train.toml");
    std::fs::write(&train_recipe, format!("{common}\n[data]\n{data}features = [{feats:?}]\n")).unwrap();
    spec(&["train", "--recipe", train_recipe.to_str().unwrap(), "--set", &format!("draft.vocab={vocab:?}"), "--out", &train]);
    spec(&["export", "--checkpoint", &train, "--out", &export]);

    let same = |a: PathBuf, b: PathBuf| {
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "{} and {} differ", a.display(), b.display());
    };
    same(out.join("regenerated.jsonl"), sep.join("regenerated.jsonl"));
    same(out.join("vocab.safetensors"), sep.join("vocab.safetensors"));
    // The run extracted its one chunk once per epoch; each time the shards equal `extract`'s.
    let kept: Vec<PathBuf> = std::fs::read_dir(out.join("chunk-manifests")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    for m in &kept {
        assert_eq!(shard_list(m), shard_list(&sep.join("feats/manifest.json")), "{}", m.display());
    }
    let latest = |run: &Path| {
        let root = run.join("checkpoints");
        root.join(std::fs::read_to_string(root.join("latest")).unwrap().trim())
    };
    let (a, b) = (latest(&out.join("train")), latest(&sep.join("train")));
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        same(a.join(f), b.join(f));
    }
    for f in ["model.safetensors", "config.json"] {
        same(out.join("export").join(f), sep.join("export").join(f));
    }
}
