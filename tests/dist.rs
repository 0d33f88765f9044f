//! Distributed engine and launcher: real multi-process runs of `specforge-rs dist-selftest` over
//! c10d's TCPStore + ProcessGroupGloo on loopback, under `launch`, under plain torchrun-style
//! variables, under torchrun itself, across two `launch` invocations (two "nodes"), and with a
//! rank killed (SIGKILL) or frozen (SIGSTOP). Every multi-process test uses its own free port and
//! a hard deadline, so a regression shows up as a failure, never as a hung test run.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use specforge_rs::dist::{first_host, DistEnv, EnvSource, ProcessGroup, ReduceOp, StoreMode};
use tch::{Kind, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_specforge-rs");
/// Upper bound for any single multi-process run in these tests (the brief allows 60 s for a
/// failure to surface; the runs here take a few seconds).
const DEADLINE: Duration = Duration::from_secs(60);

/// A port nobody listens on right now (the OS does not hand it out again at once).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// Output of a finished process.
struct Done {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Done {
    fn all(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// A started process whose output is collected by threads (so full pipes never block it).
struct Running {
    child: Child,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
    started: Instant,
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

fn start(mut cmd: Command) -> Running {
    // Backtraces would bury the one-line errors the assertions look at.
    cmd.env("RUST_BACKTRACE", "0").env("RUST_LIB_BACKTRACE", "0").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let out = reader(child.stdout.take().expect("stdout"));
    let err = reader(child.stderr.take().expect("stderr"));
    Running { child, out, err, started: Instant::now() }
}

impl Running {
    /// Waits for the process; kills it and fails the test past `deadline`.
    fn finish(mut self, deadline: Duration) -> Done {
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Done {
                    status,
                    stdout: self.out.join().unwrap_or_default(),
                    stderr: self.err.join().unwrap_or_default(),
                    elapsed: self.started.elapsed(),
                };
            }
            if self.started.elapsed() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "process did not finish within {deadline:?}:\n--- stdout\n{}--- stderr\n{}",
                    self.out.join().unwrap_or_default(),
                    self.err.join().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

fn launch_cmd(port: u16, nproc: usize, extra: &[&str], selftest: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["launch", "--nproc-per-node", &nproc.to_string()])
        .args(["--master-port", &port.to_string()])
        .args(extra)
        .arg("--")
        .arg("dist-selftest")
        .args(selftest);
    c
}

/// One rank started directly with the variables torchrun would set (rank 0 hosts the store).
fn plain_rank(port: u16, rank: usize, world: usize, selftest: &[&str]) -> Running {
    let mut c = Command::new(BIN);
    c.arg("dist-selftest")
        .args(selftest)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env_remove("TORCHELASTIC_USE_AGENT_STORE");
    start(c)
}

fn assert_ok(d: &Done, ranks: usize) {
    assert!(d.status.success(), "run failed: {}\n{}", d.status, d.all());
    for r in 0..ranks {
        assert!(d.stdout.contains(&format!("dist-selftest: rank {r}/{ranks} ok")), "rank {r} did not report success:\n{}", d.all());
    }
}

/// Waits until every rank wrote its pid file; returns the pids by rank.
fn wait_pids(dir: &Path, ranks: usize) -> Vec<i32> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let pids: Vec<Option<i32>> = (0..ranks)
            .map(|r| std::fs::read_to_string(dir.join(format!("rank{r}.pid"))).ok().and_then(|s| s.trim().parse().ok()))
            .collect();
        if pids.iter().all(Option::is_some) {
            return pids.into_iter().flatten().collect();
        }
        assert!(Instant::now() < until, "ranks did not all start within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn assert_all_gone(pids: &[i32]) {
    let until = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pids {
        if alive(*p) {
            signal(*p, libc::SIGKILL);
            panic!("pid {p} still alive after the job ended");
        }
    }
}

const CHECK_ARGS: &[&str] = &["--timeout-ms", "20000", "--sizes", "1,1000,1048576", "--dtypes", "f32,bf16,i64"];

#[test]
fn launch_two_ranks_collectives_exact() {
    let d = start(launch_cmd(free_port(), 2, &[], CHECK_ARGS)).finish(DEADLINE);
    assert_ok(&d, 2);
    // Rank 0 passes through unprefixed, the others are prefixed.
    assert!(d.stdout.contains("[rank 1] dist-selftest: rank 1/2 ok"), "{}", d.all());
}

#[test]
fn launch_three_ranks_collectives_exact() {
    let d = start(launch_cmd(free_port(), 3, &[], CHECK_ARGS)).finish(DEADLINE);
    assert_ok(&d, 3);
}

#[test]
fn rank_zero_hosted_store_with_launch() {
    // --no-agent-store: rank 0 hosts the TCPStore, as under torchrun without an agent store.
    let d = start(launch_cmd(free_port(), 2, &["--no-agent-store"], &["--timeout-ms", "20000", "--sizes", "1,1000"])).finish(DEADLINE);
    assert_ok(&d, 2);
}

#[test]
fn plain_torchrun_variables_without_launcher() {
    let port = free_port();
    let args = ["--timeout-ms", "20000", "--sizes", "1,1000,1048576"];
    let ranks: Vec<Running> = (0..2).map(|r| plain_rank(port, r, 2, &args)).collect();
    for (r, run) in ranks.into_iter().enumerate() {
        let d = run.finish(DEADLINE);
        assert!(d.status.success(), "rank {r}: {}\n{}", d.status, d.all());
        assert!(d.stdout.contains(&format!("rank {r}/2 ok")), "{}", d.all());
    }
}

#[test]
fn under_torchrun_itself() {
    // The real torchrun (from the project venv) with its agent store: the binary runs unchanged.
    let torchrun = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/torchrun");
    assert!(torchrun.exists(), "{} missing: run scripts/setup.sh", torchrun.display());
    let port = free_port();
    let mut c = Command::new(&torchrun);
    c.args(["--nproc-per-node", "2", "--master-port", &port.to_string()])
        .args(["--no-python", BIN, "dist-selftest", "--timeout-ms", "20000"])
        .args(["--sizes", "1,1000"]);
    let d = start(c).finish(DEADLINE);
    assert!(d.status.success(), "torchrun run failed: {}\n{}", d.status, d.all());
    for r in 0..2 {
        assert!(d.stdout.contains(&format!("rank {r}/2 ok")), "{}", d.all());
    }
}

#[test]
fn two_launch_invocations_form_one_group() {
    let port = free_port();
    let node = |n: usize| {
        start(launch_cmd(
            port,
            1,
            &["--nnodes", "2", "--node-rank", &n.to_string()],
            &["--timeout-ms", "20000", "--sizes", "1,1000,1048576"],
        ))
    };
    // Node 1 first: its rank must wait for node 0's store to appear.
    let n1 = node(1);
    std::thread::sleep(Duration::from_millis(300));
    let n0 = node(0);
    let d0 = n0.finish(DEADLINE);
    let d1 = n1.finish(DEADLINE);
    assert!(d0.status.success(), "node 0: {}\n{}", d0.status, d0.all());
    assert!(d1.status.success(), "node 1: {}\n{}", d1.status, d1.all());
    assert!(d0.stdout.contains("rank 0/2 ok"), "{}", d0.all());
    assert!(d1.stdout.contains("[rank 1] dist-selftest: rank 1/2 ok"), "{}", d1.all());
}

/// Ranks that keep all-reducing (3 s collective timeout) and report their pids.
fn looping(dir: &Path) -> Vec<String> {
    ["--timeout-ms", "3000", "--sizes", "1", "--dtypes", "f32", "--loop-secs", "120", "--pid-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.display().to_string()])
        .collect()
}

#[test]
fn kill9_of_a_rank_stops_the_launcher_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = looping(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = start(launch_cmd(free_port(), 3, &["--grace-period", "3"], &args));
    let pids = wait_pids(dir.path(), 3);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    signal(pids[1], libc::SIGKILL);
    let d = run.finish(DEADLINE);
    let took = t.elapsed();
    assert!(!d.status.success(), "launcher succeeded:\n{}", d.all());
    assert!(
        d.stderr.contains("rank 1 (local rank 1 on node 0") && d.stderr.contains("killed by signal 9 (SIGKILL)"),
        "launcher error does not name rank 1 and SIGKILL:\n{}",
        d.all()
    );
    assert!(took < Duration::from_secs(20), "took {took:?}:\n{}", d.all());
    assert_all_gone(&pids);
}

#[test]
fn sigstop_of_a_rank_times_out_and_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = looping(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = start(launch_cmd(free_port(), 3, &["--grace-period", "3"], &args));
    let pids = wait_pids(dir.path(), 3);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    signal(pids[1], libc::SIGSTOP);
    let d = run.finish(DEADLINE);
    let took = t.elapsed();
    assert!(!d.status.success(), "launcher succeeded:\n{}", d.all());
    // The launcher saw the stop; the survivors' own errors name the silent rank.
    assert!(
        d.stderr.contains("rank 1 (local rank 1 on node 0") && d.stderr.contains("SIGSTOP"),
        "launcher error does not name the stopped rank 1:\n{}",
        d.all()
    );
    assert!(d.stderr.contains("no heartbeat from rank 1"), "survivors did not name rank 1:\n{}", d.all());
    assert!(d.stderr.contains("timed out"), "{}", d.all());
    // 3 s timeout + 2.5 s diagnosis + shutdown; far below the 60 s bound.
    assert!(took < Duration::from_secs(25), "took {took:?}:\n{}", d.all());
    assert_all_gone(&pids);
}

#[test]
fn frozen_rank_without_launcher_survivors_name_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = looping(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let port = free_port();
    let mut ranks: Vec<Running> = (0..3).map(|r| plain_rank(port, r, 3, &args)).collect();
    let pids = wait_pids(dir.path(), 3);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    signal(pids[2], libc::SIGSTOP);
    let frozen = ranks.pop().expect("rank 2");
    for (r, run) in ranks.into_iter().enumerate() {
        let d = run.finish(DEADLINE);
        assert!(!d.status.success(), "rank {r} succeeded:\n{}", d.all());
        assert!(
            d.stderr.contains(&format!("rank {r}/3: all_reduce timed out")) && d.stderr.contains("no heartbeat from rank 2"),
            "rank {r} does not name rank 2:\n{}",
            d.all()
        );
    }
    assert!(t.elapsed() < Duration::from_secs(25), "took {:?}", t.elapsed());
    signal(frozen.pid(), libc::SIGKILL);
    let _ = frozen.finish(DEADLINE);
}

#[test]
fn killed_store_host_without_launcher_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = looping(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let port = free_port();
    let mut ranks: Vec<Running> = (0..3).map(|r| plain_rank(port, r, 3, &args)).collect();
    let pids = wait_pids(dir.path(), 3);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    signal(pids[0], libc::SIGKILL);
    let host = ranks.remove(0);
    for (i, run) in ranks.into_iter().enumerate() {
        let r = i + 1;
        let d = run.finish(DEADLINE);
        assert!(!d.status.success(), "rank {r} succeeded:\n{}", d.all());
        assert!(
            d.stderr.contains(&format!("rank {r}/3: all_reduce failed")) && d.stderr.contains("rank 0 is likely dead or stopped"),
            "rank {r} does not name rank 0:\n{}",
            d.all()
        );
    }
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
    let _ = host.finish(DEADLINE);
}

#[test]
fn failing_rank_exit_code_is_reported() {
    let d = start(launch_cmd(free_port(), 2, &["--grace-period", "2"], &["--timeout-ms", "5000", "--fail-rank", "1", "--loop-secs", "60"]))
        .finish(DEADLINE);
    assert!(!d.status.success(), "{}", d.all());
    assert!(d.stderr.contains("rank 1 (local rank 1 on node 0") && d.stderr.contains("exited with code 3"), "{}", d.all());
}

#[test]
fn sigterm_to_launcher_is_forwarded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = looping(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = start(launch_cmd(free_port(), 2, &["--grace-period", "3"], &args));
    let pids = wait_pids(dir.path(), 2);
    let t = Instant::now();
    signal(run.pid(), libc::SIGTERM);
    let d = run.finish(DEADLINE);
    assert!(!d.status.success(), "{}", d.all());
    assert!(d.stderr.contains("interrupted by SIGTERM"), "{}", d.all());
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    assert_all_gone(&pids);
}

#[test]
fn missing_rank_fails_rendezvous_within_timeout() {
    // Only rank 0 of 2 starts: the store gives up after the timeout and says who is missing.
    let d = plain_rank(free_port(), 0, 2, &["--timeout-ms", "2000"]).finish(DEADLINE);
    assert!(!d.status.success(), "{}", d.all());
    assert!(d.stderr.contains("rank 0: rendezvous at 127.0.0.1:") && d.stderr.contains("1/2 clients joined"), "{}", d.all());
    assert!(d.elapsed < Duration::from_secs(15), "took {:?}", d.elapsed);
}

// ---- in-process: the single-process group and the environment parsing ----------------------

#[test]
fn single_process_group_is_identity() {
    let pg = ProcessGroup::single();
    assert_eq!((pg.rank(), pg.world_size(), pg.is_main()), (0, 1, true));
    let t0 = Tensor::from_slice(&[1.5f32, -2.0, 3.0]);
    let to = Duration::from_secs(1);
    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
        let mut t = t0.copy();
        pg.all_reduce(&mut t, op, to).expect("all_reduce");
        assert!(t.equal(&t0), "{op:?}");
    }
    let mut t = t0.copy();
    pg.broadcast(&mut t, 0, to).expect("broadcast");
    assert!(t.equal(&t0));
    let g = pg.all_gather(&t0, to).expect("all_gather");
    assert_eq!(g.len(), 1);
    assert!(g[0].equal(&t0));
    pg.barrier(to).expect("barrier");
    // The same argument checks as a real group, so code that runs on one process runs on N.
    let mut strided = Tensor::zeros([4, 4], (Kind::Float, tch::Device::Cpu)).transpose(0, 1);
    let e = pg.all_reduce(&mut strided, ReduceOp::Sum, to).expect_err("non-contiguous");
    assert!(e.to_string().contains("not contiguous"), "{e}");
    let mut ints = Tensor::from_slice(&[1i64, 2]);
    assert!(pg.all_reduce(&mut ints, ReduceOp::Avg, to).is_err());
    assert!(pg.broadcast(&mut t, 1, to).is_err());
}

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k| m.get(k).cloned()
}

#[test]
fn env_torchrun_variables() {
    let e = DistEnv::from_vars(vars(&[
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "10.0.0.7"),
        ("MASTER_PORT", "29999"),
        // torchrun's variables win over SLURM's.
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
    ]))
    .expect("parse");
    assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (5, 8, 1, 4));
    assert_eq!((e.master_addr.as_str(), e.master_port), ("10.0.0.7", 29999));
    assert_eq!((e.store.clone(), e.source), (StoreMode::RankZeroHosts, EnvSource::Torchrun));

    let e = DistEnv::from_vars(vars(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "3"),
    ]))
    .expect("parse");
    assert_eq!(e.store, StoreMode::Agent { prefix: "/worker/attempt_3".into() });
    assert_eq!((e.master_addr.as_str(), e.master_port), ("127.0.0.1", 29500));
}

#[test]
fn env_slurm_fallbacks() {
    let e = DistEnv::from_vars(vars(&[
        ("SLURM_PROCID", "6"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_NTASKS_PER_NODE", "4"),
        ("SLURM_JOB_NODELIST", "gpu[07-08,11],login1"),
        ("SLURM_LAUNCH_NODE_IPADDR", "10.1.2.3"),
        ("SLURM_JOB_ID", "123456"),
    ]))
    .expect("parse");
    assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (6, 8, 2, 4));
    assert_eq!(e.master_addr, "gpu07");
    assert_eq!(e.master_port, 15000 + (123456 % 20000) as u16);
    assert_eq!(e.source, EnvSource::Slurm);

    let e = DistEnv::from_vars(vars(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_TASKS_PER_NODE", "2(x2)"),
        ("SLURM_LAUNCH_NODE_IPADDR", "10.1.2.3"),
        ("MASTER_PORT", "4000"),
    ]))
    .expect("parse");
    assert_eq!((e.local_world_size, e.local_rank), (2, 0));
    assert_eq!((e.master_addr.as_str(), e.master_port), ("10.1.2.3", 4000));
}

#[test]
fn env_single_and_errors() {
    let e = DistEnv::from_vars(vars(&[])).expect("parse");
    assert_eq!((e.world_size, e.source), (1, EnvSource::Single));
    for bad in [
        vec![("RANK", "2"), ("WORLD_SIZE", "2")],
        vec![("RANK", "0")],
        vec![("RANK", "x"), ("WORLD_SIZE", "2")],
        vec![("RANK", "0"), ("WORLD_SIZE", "0")],
        vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")],
    ] {
        let err = DistEnv::from_vars(vars(&bad)).expect_err("must fail");
        assert!(err.to_string().starts_with("distributed environment:"), "{err}");
    }
    assert_eq!(first_host("node[01-04,07],gpu5").as_deref(), Some("node01"));
    assert_eq!(first_host("a,b").as_deref(), Some("a"));
    assert_eq!(first_host("n[3-4]-ib").as_deref(), Some("n3-ib"));
    assert_eq!(first_host("").as_deref(), None);
}

/// With the `nccl` feature: on a host with 2+ GPUs, the selftest runs through ProcessGroupNCCL on
/// CUDA tensors (f32 and bf16); without a GPU, asking for NCCL fails cleanly with c10d's own
/// message instead of crashing or hanging.
#[cfg(feature = "nccl")]
#[test]
fn nccl_collectives_or_clean_error_without_gpu() {
    let gpus = tch::Cuda::device_count().max(0) as usize;
    let args = ["--cuda", "--timeout-ms", "60000", "--sizes", "1,1000,1048576"];
    if gpus >= 2 {
        let n = gpus.min(4);
        let d = start(launch_cmd(free_port(), n, &[], &args)).finish(DEADLINE);
        assert_ok(&d, n);
    } else if gpus == 1 {
        // NCCL cannot put two ranks on one GPU; world size 1 still checks the CUDA path.
        let d = start(launch_cmd(free_port(), 1, &[], &args)).finish(DEADLINE);
        assert_ok(&d, 1);
    } else {
        let d = start(launch_cmd(free_port(), 2, &[], &args)).finish(DEADLINE);
        assert!(!d.status.success(), "{}", d.all());
        assert!(d.stderr.contains("ProcessGroupNCCL is only supported with GPUs, no GPUs found"), "{}", d.all());
    }
}

/// The listening sockets on `port` as (hex address, IPv6?) from /proc/net/tcp{,6}.
fn listeners(port: u16) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (f.get(1), f.get(3)) else { continue };
            let Some((addr, p)) = local.split_once(':') else { continue };
            if *state == "0A" && u16::from_str_radix(p, 16).ok() == Some(port) {
                out.push((addr.to_string(), v6));
            }
        }
    }
    out
}

/// The launcher's store listens on the loopback address it was given, not on every interface,
/// and a process of another job (another run id) that reaches it does not join the group: it
/// times out, and the job goes on.
#[test]
fn the_store_listens_where_told_and_other_jobs_cannot_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let args: Vec<String> = ["--timeout-ms", "20000", "--sizes", "1", "--dtypes", "f32", "--loop-secs", "6", "--pid-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path().display().to_string()])
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let job = start(launch_cmd(port, 2, &[], &args));
    wait_pids(dir.path(), 2);
    let l = listeners(port);
    assert!(!l.is_empty() && l.iter().all(|(a, v6)| a == "0100007F" && !v6), "store sockets on port {port}: {l:?}");

    let mut intruder = Command::new(BIN);
    intruder
        .args(["dist-selftest", "--timeout-ms", "2000", "--sizes", "1", "--dtypes", "f32"])
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("TORCHELASTIC_USE_AGENT_STORE", "True")
        .env("TORCHELASTIC_RUN_ID", "another-job");
    let d = start(intruder).finish(DEADLINE);
    assert!(!d.status.success(), "a process of another job joined:\n{}", d.all());
    let done = job.finish(DEADLINE);
    assert_ok(&done, 2);
}
