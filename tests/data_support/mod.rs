//! Helpers for the data / extract / vocab tests: the embedded SmolLM2, a tiny random target with
//! SmolLM2's tokenizer, synthetic conversations, and running the built binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use crate::common::{reference, root};

/// One libtorch thread in this test process (see [`cmd`] for why).
pub fn one_thread() {
    tch::set_num_threads(1);
}

/// The embedded SmolLM2-135M-Instruct directory (made by `make setup`).
pub fn smollm2() -> PathBuf {
    let p = root().join(".cache/smollm2-135m-instruct");
    assert!(p.join("config.json").is_file(), "{} missing: run `make setup` first", p.display());
    p
}

/// A tiny random Llama (H 64, 4 layers) with SmolLM2's tokenizer and chat template.
pub fn tiny_target() -> PathBuf {
    let smol = smollm2();
    reference("tiny_target.py", &[smol.to_str().unwrap()])
}

/// Deterministic synthetic conversations (OpenAI form) of varied lengths; every `k`-th has a
/// system prompt and every `m`-th is multi-turn.
pub fn synthetic_conversations(n: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the", "cat", "sat", "on", "a", "warm", "mat", "while", "rain", "fell", "over", "quiet", "hills", "and", "rivers", "ran", "to",
        "sea", "under", "bright", "stars", "of", "night", "code", "compiles", "fast", "tests", "pass", "green", "light", "shines", "🌞",
        "café",
    ];
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut sentence = |min: u64, span: u64| {
        let len = min + next() % span;
        (0..len).map(|_| WORDS[(next() % WORDS.len() as u64) as usize]).collect::<Vec<_>>().join(" ")
    };
    let mut out = String::new();
    for i in 0..n {
        let mut msgs = Vec::new();
        if i % 5 == 3 {
            msgs.push(serde_json::json!({"role": "system", "content": sentence(3, 6)}));
        }
        let turns = if i % 7 == 2 { 2 } else { 1 };
        for _ in 0..turns {
            msgs.push(serde_json::json!({"role": "user", "content": sentence(2, 12)}));
            msgs.push(serde_json::json!({"role": "assistant", "content": sentence(3, 40)}));
        }
        out.push_str(&serde_json::json!({"id": format!("s{i}"), "messages": msgs}).to_string());
        out.push('\n');
    }
    out
}

/// The binary under test (a debug build in `cargo test`).
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_specforge-rs"))
}

/// A command for the binary with RANK / WORLD_SIZE cleared (tests may run under a launcher).
pub fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env("RUST_LOG", "warn")
        // Tests run side by side on CI's two cores: one intra-op thread each avoids OpenMP
        // spin-waiting against each other (tens of times slower on small models).
        .env("OMP_NUM_THREADS", "1");
    c
}

/// Runs the binary to completion.
pub fn run(args: &[&str]) -> Output {
    cmd(args).output().expect("spawn specforge-rs")
}

/// Runs the binary and asserts success, returning stdout.
pub fn run_ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "specforge-rs {args:?} failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Spawns `c`, waits until `ready()` holds (polling every 2 ms), then kills it with SIGKILL.
/// Returns whether the kill hit a running process (false: it had already exited).
pub fn kill_when(mut c: Command, timeout: Duration, ready: impl Fn() -> bool) -> bool {
    c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut child: Child = c.spawn().expect("spawn specforge-rs");
    let start = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if ready() {
            break;
        }
        assert!(start.elapsed() < timeout, "the process never reached the kill point");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 failed");
    let status = child.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(9)
}

/// Lines of a file (empty when missing).
pub fn count_lines(p: &Path) -> usize {
    std::fs::read(p).map(|b| b.iter().filter(|&&c| c == b'\n').count()).unwrap_or(0)
}

/// Number of shards `manifest.json` in `dir` lists (0 when it is absent or half-written).
pub fn listed_shards(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("shards").and_then(|s| s.as_array()).map(Vec::len))
        .unwrap_or(0)
}
