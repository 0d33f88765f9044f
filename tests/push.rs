//! `specforge-rs push` against a loopback fake Hub that speaks the Hub's commit API (repo create,
//! preupload, the git-lfs batch with basic and multipart transfers, verify, the NDJSON commit):
//! every file arrives byte-identical, LFS files by sha256 through storage URLs that never see the
//! token, and the token appears in no output, on success or failure.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The token the tests hand the binary: distinctive, so a leak anywhere is found by substring.
const TOKEN: &str = "hf_tEsTsEcReT0123456789abcdefLEAKCHECK";

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// The fake Hub.

#[derive(Debug, Clone)]
struct Request {
    method: String,
    /// Path and query.
    target: String,
    headers: Vec<(String, String)>,
    chunked: bool,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct State {
    /// The token the Hub accepts.
    token: String,
    /// Every request, in arrival order.
    requests: Vec<Request>,
    repo_exists: bool,
    created_private: Option<bool>,
    /// Stored LFS objects, by sha256.
    objects: HashMap<String, Vec<u8>>,
    /// Multipart parts received, by (oid, part number).
    parts: HashMap<(String, usize), Vec<u8>>,
    /// LFS objects verified.
    verified: Vec<String>,
    /// The repo's files after the last commit.
    repo: BTreeMap<String, Vec<u8>>,
    /// Each commit's NDJSON lines.
    commits: Vec<Vec<Value>>,
    /// Answer the commit with this status and error message.
    fail_commit: Option<(u16, String)>,
    /// LFS objects above this size go multipart, in chunks of `chunk_size`.
    multipart_above: u64,
    chunk_size: u64,
}

struct FakeHub {
    base: String,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    fn start(token: &str) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state =
            Arc::new(Mutex::new(State { token: token.into(), multipart_above: 16 * 1024, chunk_size: 8 * 1024, ..Default::default() }));
        let (st, b) = (state.clone(), base.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (st, b) = (st.clone(), b.clone());
                std::thread::spawn(move || serve(stream, &st, &b));
            }
        });
        FakeHub { base, state }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut it = line.split_whitespace();
    let (method, target) = (it.next()?.to_string(), it.next()?.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let chunked = get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = get("content-length") {
        body = vec![0u8; n.parse().ok()?];
        r.read_exact(&mut body).ok()?;
    }
    Some(Request { method, target, headers, chunked, body })
}

fn serve(stream: TcpStream, state: &Mutex<State>, base: &str) {
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    while let Some(req) = read_request(&mut r) {
        let (status, extra, body) = {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.requests.push(req.clone());
            route(&mut s, &req, base)
        };
        let reason = if status < 300 { "OK" } else { "Error" };
        let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("Connection: keep-alive\r\n\r\n");
        head.push_str(&body); // one write: no Nagle / delayed-ACK stall between head and body
        if w.write_all(head.as_bytes()).is_err() {
            return;
        }
    }
}

type Answer = (u16, Vec<(String, String)>, String);

fn answer(status: u16, v: Value) -> Answer {
    (status, Vec::new(), v.to_string())
}

/// The Hub's side of each call. API calls must carry the token; storage PUTs must not.
fn route(s: &mut State, req: &Request, base: &str) -> Answer {
    let path = req.path().to_string();
    let authed = req.header("authorization") == Some(&format!("Bearer {}", s.token));
    let storage = path.starts_with("/storage/") || path.starts_with("/part/");
    if storage {
        if req.header("authorization").is_some() {
            return answer(400, json!({"error": "storage must not receive the Hub token"}));
        }
        if req.chunked || req.header("content-length").is_none() {
            return answer(501, json!({"error": "storage needs Content-Length (no chunked uploads)"}));
        }
    } else if !authed {
        // Echo what came, as a careless proxy might: the client must scrub it.
        let got = req.header("authorization").unwrap_or("nothing");
        return answer(401, json!({"error": format!("Invalid credentials in Authorization header (received {got})")}));
    }
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method.as_str(), segs.as_slice()) {
        ("POST", ["api", "repos", "create"]) => {
            let v = req.json();
            assert_eq!(v["type"], "model");
            if s.repo_exists {
                return answer(409, json!({"error": "You already created this model repo"}));
            }
            s.repo_exists = true;
            s.created_private = v["private"].as_bool();
            answer(200, json!({"url": format!("{base}/{}/{}", v["organization"].as_str().unwrap_or(""), v["name"].as_str().unwrap_or(""))}))
        }
        ("POST", ["api", "models", _, _, "preupload", _]) => {
            let files: Vec<Value> = req.json()["files"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|f| {
                    let p = f["path"].as_str().unwrap_or("");
                    let sample = b64().decode(f["sample"].as_str().unwrap_or("")).unwrap_or_default();
                    let lfs = sample.contains(&0) || p.ends_with(".safetensors") || f["size"].as_u64().unwrap_or(0) > 10 << 20;
                    json!({"path": p, "uploadMode": if lfs { "lfs" } else { "regular" }, "shouldIgnore": p.ends_with(".log")})
                })
                .collect();
            answer(200, json!({"files": files}))
        }
        ("POST", [_, repo_git, "info", "lfs", "objects", "batch"]) if repo_git.ends_with(".git") => {
            if req.header("accept") != Some("application/vnd.git-lfs+json")
                || req.header("content-type") != Some("application/vnd.git-lfs+json")
            {
                return answer(406, json!({"error": "git-lfs media type expected"}));
            }
            let v = req.json();
            assert_eq!(v["operation"], "upload");
            assert_eq!(v["hash_algo"], "sha256");
            let mut out = Vec::new();
            for o in v["objects"].as_array().cloned().unwrap_or_default() {
                let (oid, size) = (o["oid"].as_str().unwrap_or("").to_string(), o["size"].as_u64().unwrap_or(0));
                if s.objects.contains_key(&oid) {
                    out.push(json!({"oid": oid, "size": size}));
                    continue;
                }
                let verify = json!({"href": format!("{base}/verify/{oid}"), "header": {}});
                let upload = if size > s.multipart_above {
                    let mut header = json!({"chunk_size": s.chunk_size.to_string()});
                    for i in 1..=size.div_ceil(s.chunk_size) {
                        header[i.to_string()] = json!(format!("{base}/part/{oid}/{i}?X-Amz-Signature=partsig{i}"));
                    }
                    json!({"href": format!("{base}/complete/{oid}?sig=completesig"), "header": header})
                } else {
                    json!({"href": format!("{base}/storage/{oid}?X-Amz-Signature=storagesig"), "header": {}})
                };
                out.push(json!({"oid": oid, "size": size, "actions": {"upload": upload, "verify": verify}}));
            }
            answer(200, json!({"transfer": "basic", "objects": out}))
        }
        ("PUT", ["storage", oid]) => {
            if sha256(&req.body) != *oid {
                return answer(400, json!({"error": "content does not match the oid"}));
            }
            s.objects.insert(oid.to_string(), req.body.clone());
            answer(200, json!({}))
        }
        ("PUT", ["part", oid, n]) => {
            let n: usize = n.parse().unwrap_or(0);
            s.parts.insert((oid.to_string(), n), req.body.clone());
            (200, vec![("ETag".into(), format!("\"etag-{oid}-{n}\""))], String::new())
        }
        ("POST", ["complete", oid]) => {
            let v = req.json();
            let mut bytes = Vec::new();
            for (i, p) in v["parts"].as_array().cloned().unwrap_or_default().iter().enumerate() {
                let n = p["partNumber"].as_u64().unwrap_or(0) as usize;
                if n != i + 1 || p["etag"] != json!(format!("\"etag-{oid}-{n}\"")) {
                    return answer(400, json!({"error": format!("bad part list {v}")}));
                }
                bytes.extend_from_slice(s.parts.get(&(oid.to_string(), n)).map(Vec::as_slice).unwrap_or_default());
            }
            if sha256(&bytes) != *oid || v["oid"] != json!(oid) {
                return answer(400, json!({"error": "assembled parts do not match the oid"}));
            }
            s.objects.insert(oid.to_string(), bytes);
            answer(200, json!({}))
        }
        ("POST", ["verify", oid]) => {
            let v = req.json();
            match s.objects.get(*oid) {
                Some(b) if v["oid"] == json!(oid) && v["size"] == json!(b.len()) => {
                    s.verified.push(oid.to_string());
                    answer(200, json!({"message": "Everything good"}))
                }
                _ => answer(404, json!({"error": "object not found"})),
            }
        }
        ("POST", ["api", "models", ns, name, "commit", rev]) => {
            if let Some((status, msg)) = &s.fail_commit {
                return answer(*status, json!({"error": msg}));
            }
            assert_eq!(req.header("content-type"), Some("application/x-ndjson"));
            let lines: Vec<Value> =
                req.body.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
            let mut repo = s.repo.clone();
            for l in &lines {
                let v = &l["value"];
                let p = v["path"].as_str().unwrap_or("").to_string();
                match l["key"].as_str() {
                    Some("file") => {
                        assert_eq!(v["encoding"], "base64");
                        repo.insert(p, b64().decode(v["content"].as_str().unwrap_or("")).unwrap());
                    }
                    Some("lfsFile") => {
                        let oid = v["oid"].as_str().unwrap_or("");
                        match s.objects.get(oid) {
                            Some(b) if v["size"] == json!(b.len()) && v["algo"] == "sha256" => {
                                repo.insert(p, b.clone());
                            }
                            _ => return answer(422, json!({"error": format!("{p}: LFS object {oid} was never uploaded")})),
                        }
                    }
                    _ => {}
                }
            }
            s.repo = repo;
            s.commits.push(lines);
            let oid = format!("{:040x}", s.commits.len());
            answer(200, json!({"commitUrl": format!("{base}/{ns}/{name}/commit/{oid}"), "commitOid": oid, "revision": rev}))
        }
        _ => answer(404, json!({"error": format!("no route for {} {path}", req.method)})),
    }
}

// ---------------------------------------------------------------------------------------------
// A fake export and the binary.

/// An export directory: config, a real random head (multipart), a model card, two identical
/// plots (one basic LFS object), the metrics log, a log file the fake repo's .gitignore drops,
/// and a hidden temporary.
fn fake_export(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    // A real (random) head, written by `export`: push uploads only what export's validator passes.
    let cfg = specforge_rs::draft::Eagle3Config {
        hidden_size: 64,
        target_hidden_size: 64,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        intermediate_size: 96,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        max_position_embeddings: 4096,
        vocab_size: 128,
        draft_vocab_size: 32,
        aux_layer_ids: vec![1, 2, 3],
        fc_norm: true,
        norm_output: true,
        norm_before_fc: false,
    };
    let t2d = tch::Tensor::zeros([128], (tch::Kind::Bool, tch::Device::Cpu));
    let _ = t2d.narrow(0, 7, 32).fill_(1);
    let draft = specforge_rs::draft::Eagle3Draft::new(cfg, &t2d, tch::Device::Cpu).unwrap();
    specforge_rs::export::export(&draft, dir, specforge_rs::export::Format::Vllm, None).unwrap();
    let st = std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(st.len() > 5 * 8 * 1024, "the head must go multipart in 5+ parts: {} bytes", st.len());
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend((0..3000u32).map(|i| (i % 251) as u8));
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("config.json", std::fs::read(dir.join("config.json")).unwrap()),
        ("model.safetensors", st),
        ("README.md", "---\ntags:\n- eagle3\n---\n# EAGLE-3 draft head — tëst ✓\n".as_bytes().to_vec()),
        ("training_loss.png", png.clone()),
        // Identical content: one LFS object, sent once, named twice in the commit.
        ("acceptance.png", png),
        ("training_metrics.jsonl", b"{\"step\":1,\"loss\":2.5}\n{\"step\":2,\"loss\":2.1}\n".to_vec()),
    ];
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    std::fs::write(dir.join("logs/run.log"), "ignored by the repo\n").unwrap();
    std::fs::write(dir.join(".model.safetensors.tmp-42"), "an interrupted write").unwrap();
    for (name, bytes) in &files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    // What the model card adds to the export's record (the log is not in it: left out).
    specforge_rs::export::record_files(dir, &["README.md", "training_loss.png", "acceptance.png", "training_metrics.jsonl"], false)
        .unwrap();
    files.into_iter().map(|(n, b)| (n.to_string(), b)).collect()
}

/// The binary with a clean Hugging Face environment: `HF_HOME` and `HOME` under `home`, no
/// token variables, no proxies, `HF_ENDPOINT` at the fake.
fn push_cmd(hub: &FakeHub, home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_specforge-rs"));
    c.arg("push").args(args).env("OMP_NUM_THREADS", "1").env("HF_ENDPOINT", &hub.base).env("HF_HOME", home.join("hf")).env("HOME", home);
    for v in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "XDG_CACHE_HOME", "RUST_LOG", "RUST_BACKTRACE", "RUST_LIB_BACKTRACE"] {
        c.env_remove(v);
    }
    for v in ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        c.env_remove(v);
    }
    c.env("NO_PROXY", "127.0.0.1,localhost");
    c
}

/// Runs it; returns (success, stdout + stderr), asserting the token is nowhere in the output.
fn run(c: &mut Command) -> (bool, String) {
    let Output { status, stdout, stderr } = c.output().expect("spawn specforge-rs");
    let text = format!("--- stdout\n{}\n--- stderr\n{}", String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    // Any 10 consecutive characters: a hex dump splits its ASCII column into 16-byte lines, and
    // a 37-character token spans at least one whole line of it.
    for w in TOKEN.as_bytes().windows(10) {
        let w = std::str::from_utf8(w).unwrap();
        assert!(!text.contains(w), "the token (`{w}`) leaked into the output:\n{text}");
    }
    (status.success(), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn push_sends_every_file_byte_identical_and_never_the_token() {
    let hub = FakeHub::start(TOKEN);
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let files = fake_export(&export);
    let args = ["-vv", s(&export), "--repo", "my-org/tiny-eagle3", "--private", "--message", "first head"];
    let (ok, out) = run(push_cmd(&hub, tmp.path(), &args).env("HF_TOKEN", TOKEN));
    assert!(ok, "push failed:\n{out}");
    assert!(out.contains(&format!("commit: {}/my-org/tiny-eagle3/commit/", hub.base)), "{out}");
    // Public or private is said before the repo is created.
    let said = out.find("created PRIVATE").unwrap_or_else(|| panic!("visibility not said:\n{out}"));
    assert!(out.find("commit:").is_some_and(|c| c > said), "{out}");

    let st = hub.state();
    assert_eq!(st.created_private, Some(true));
    // Every file arrived, byte for byte; the ignored log and the hidden temporary did not.
    assert_eq!(st.repo.keys().collect::<Vec<_>>(), files.keys().collect::<Vec<_>>());
    for (name, bytes) in &files {
        assert!(st.repo[name] == *bytes, "{name} differs on the Hub");
    }
    // The commit: the message, regular files inline, LFS files by sha256 pointer.
    let commit = &st.commits[0];
    assert_eq!(commit[0], json!({"key": "header", "value": {"summary": "first head", "description": ""}}));
    let entry = |path: &str| commit.iter().find(|l| l["value"]["path"] == path).unwrap_or_else(|| panic!("{path} not in the commit"));
    for name in ["config.json", "README.md", "training_metrics.jsonl"] {
        assert_eq!(entry(name)["key"], "file", "{name}");
    }
    for name in ["model.safetensors", "training_loss.png", "acceptance.png"] {
        let e = entry(name);
        assert_eq!(e["key"], "lfsFile", "{name}");
        assert_eq!(e["value"]["oid"], json!(sha256(&files[name])), "{name}");
        assert_eq!(e["value"]["size"], json!(files[name].len()), "{name}");
        assert!(st.verified.contains(&sha256(&files[name])), "{name} was not verified");
    }
    assert_eq!(commit.len(), 1 + files.len());
    // The head went multipart (5+ parts), the plot in one PUT; no storage request saw the token
    // (the fake refuses those) or a chunked body.
    let puts: Vec<&Request> = st.requests.iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(
        puts.iter().filter(|r| r.path().starts_with("/part/")).count() as u64,
        files["model.safetensors"].len().div_ceil(8 * 1024) as u64
    );
    assert_eq!(puts.iter().filter(|r| r.path().starts_with("/storage/")).count(), 1);
    assert!(puts.iter().all(|r| r.header("authorization").is_none() && !r.chunked));
    // Every API call carried the token.
    for r in st.requests.iter().filter(|r| r.method != "PUT") {
        assert_eq!(r.header("authorization"), Some(format!("Bearer {TOKEN}").as_str()), "{} {}", r.method, r.target);
    }
    let n_requests = st.requests.len();
    drop(st);

    // Again: the repo exists (409) and the Hub holds both objects, so nothing is re-sent.
    let args = [s(&export), "--repo", "my-org/tiny-eagle3", "--message", "second"];
    let (ok, out) = run(push_cmd(&hub, tmp.path(), &args).env("HF_TOKEN", TOKEN));
    assert!(ok, "second push failed:\n{out}");
    // Below -vv no URL is shown with its query string (presigned signatures live there).
    assert!(!out.contains("storagesig") && !out.contains("partsig"), "{out}");
    assert!(out.contains("2 LFS object(s) already there"), "{out}");
    let st = hub.state();
    assert!(st.requests[n_requests..].iter().all(|r| r.method != "PUT"));
    assert_eq!(st.commits.len(), 2);
    assert_eq!(st.commits[1][0]["value"]["summary"], "second");
    for (name, bytes) in &files {
        assert!(st.repo[name] == *bytes, "{name} differs on the Hub after the second push");
    }
}

#[test]
fn a_wrong_token_or_a_refused_commit_fails_clearly_without_the_token() {
    // The Hub accepts another token and echoes what it got in its 401 message.
    let hub = FakeHub::start("hf_theRightOne");
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    fake_export(&export);
    let (ok, out) = run(push_cmd(&hub, tmp.path(), &["-vv", s(&export), "--repo", "org/name"]).env("HF_TOKEN", TOKEN));
    assert!(!ok, "{out}");
    assert!(out.contains("HTTP 401") && out.contains("Invalid credentials") && out.contains("/api/repos/create"), "{out}");
    assert!(out.contains("Bearer <token>"), "the echoed token should show as scrubbed:\n{out}");
    assert_eq!(hub.state().requests.len(), 1, "nothing after the refused call");

    // The right token, but the Hub rejects the commit (echoing the token again).
    let hub = FakeHub::start(TOKEN);
    hub.state().fail_commit = Some((422, format!("Your push was rejected (request had Bearer {TOKEN})")));
    let (ok, out) = run(push_cmd(&hub, tmp.path(), &[s(&export), "--repo", "org/name"]).env("HF_TOKEN", TOKEN));
    assert!(!ok, "{out}");
    assert!(
        out.contains("HTTP 422") && out.contains("/api/models/org/name/commit/main") && out.contains("Your push was rejected"),
        "{out}"
    );
}

#[test]
fn the_token_comes_from_the_hf_home_token_file_and_its_absence_is_explained() {
    let hub = FakeHub::start(TOKEN);
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let files = fake_export(&export);
    // No token anywhere: a clear error naming where it looked, and no request sent.
    let (ok, out) = run(&mut push_cmd(&hub, tmp.path(), &[s(&export), "--repo", "org/name"]));
    assert!(!ok, "{out}");
    assert!(out.contains("no Hugging Face token") && out.contains("HF_TOKEN") && out.contains(s(&tmp.path().join("hf/token"))), "{out}");
    assert!(hub.state().requests.is_empty());
    // The file `hf auth login` writes, whitespace around the token.
    std::fs::create_dir_all(tmp.path().join("hf")).unwrap();
    std::fs::write(tmp.path().join("hf/token"), format!("  {TOKEN}\n")).unwrap();
    let (ok, out) = run(&mut push_cmd(&hub, tmp.path(), &["-v", s(&export), "--repo", "org/name"]));
    assert!(ok, "{out}");
    assert!(out.contains("token from") && out.contains("hf/token"), "{out}");
    assert_eq!(hub.state().repo.len(), files.len());
}

#[test]
fn dry_run_lists_the_files_and_sends_nothing() {
    let hub = FakeHub::start(TOKEN);
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let files = fake_export(&export);
    // No token set: a dry run needs none.
    let (ok, out) = run(&mut push_cmd(&hub, tmp.path(), &[s(&export), "--repo", "org/name", "--dry-run"]));
    assert!(ok, "{out}");
    assert!(out.contains(&format!("{}/org/name (revision main)", hub.base)), "{out}");
    let line = |name: &str| {
        out.lines().find(|l| l.trim_end().ends_with(&format!(" {name}"))).unwrap_or_else(|| panic!("{name} not listed:\n{out}"))
    };
    for name in files.keys().map(String::as_str) {
        let want = if name.ends_with(".safetensors") || name.ends_with(".png") { "lfs" } else { "regular" };
        assert!(line(name).trim_start().starts_with(want), "{name}: {}", line(name));
    }
    // A file the export did not write is named and left out.
    assert!(line("logs/run.log").trim_start().starts_with("left out"), "{}", line("logs/run.log"));
    assert!(out.contains("skipped  .model.safetensors.tmp-42"), "{out}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(hub.state().requests.is_empty(), "a dry run sent requests");
}

#[test]
fn a_directory_that_is_not_an_export_or_a_bad_repo_id_is_refused() {
    let hub = FakeHub::start(TOKEN);
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("notes");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("README.md"), "just notes").unwrap();
    for extra in [&[][..], &["--dry-run"][..]] {
        let mut args = vec![s(&dir), "--repo", "org/name"];
        args.extend_from_slice(extra);
        let (ok, out) = run(push_cmd(&hub, tmp.path(), &args).env("HF_TOKEN", TOKEN));
        assert!(!ok, "{out}");
        assert!(out.contains("not an export directory") && out.contains("config.json"), "{out}");
    }
    // A config that is not an EAGLE-3 head.
    std::fs::write(dir.join("config.json"), r#"{"architectures": ["LlamaForCausalLM"]}"#).unwrap();
    let (ok, out) = run(push_cmd(&hub, tmp.path(), &[s(&dir), "--repo", "org/name"]).env("HF_TOKEN", TOKEN));
    assert!(!ok && out.contains("LlamaForCausalLMEagle3"), "{out}");
    // A repo id without an organization.
    let export = tmp.path().join("export");
    fake_export(&export);
    let (ok, out) = run(push_cmd(&hub, tmp.path(), &[s(&export), "--repo", "just-a-name"]).env("HF_TOKEN", TOKEN));
    assert!(!ok && out.contains("expected ORG/NAME"), "{out}");
    assert!(hub.state().requests.is_empty());
}
