//! `specforge-rs launch`: a torchrun-style launcher.
//!
//! It starts `nproc_per_node` copies of a program (normally this binary with a subcommand) with
//! torchrun's environment, hosts the rendezvous store on node 0 (like torchrun's agent, so that
//! the store outlives any one rank and the survivors can still diagnose which rank died),
//! forwards SIGINT / SIGTERM / SIGHUP to the ranks, and when one rank fails (non-zero exit or
//! killed by a signal) stops the others (SIGTERM, SIGKILL after a grace period) and returns an
//! error naming the failed rank and how it failed.
//!
//! Rank 0's stdout/stderr are the launcher's own (progress bars keep their terminal); the other
//! ranks' lines are prefixed `[rank r] `. Every rank's stdin is /dev/null. Each rank runs in its own process group (so a
//! signal reaches the programs it starts too) and dies with the launcher (PR_SET_PDEATHSIG).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::ffi::RawStore;
use super::DistError;

/// What to launch and how.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// Ranks on this node.
    pub nproc_per_node: usize,
    /// Nodes in the job.
    pub nnodes: usize,
    /// This node's index, 0-based.
    pub node_rank: usize,
    /// Address of node 0, where the store is hosted.
    pub master_addr: String,
    /// Port of the store.
    pub master_port: u16,
    /// Node 0's launcher hosts the store and every rank is a client
    /// (TORCHELASTIC_USE_AGENT_STORE=True); otherwise rank 0 hosts it.
    pub agent_store: bool,
    /// Time between SIGTERM and SIGKILL when stopping the ranks.
    pub grace: Duration,
    /// The program each rank runs.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

/// Last signal the launcher received (0 = none); set by the async-signal-safe handler.
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: anything else is not async-signal-safe.
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_handlers() -> Result<(), DistError> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid starting value; we set a handler that only
        // touches an atomic, with an empty mask, and pass valid pointers to sigaction.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(DistError::Launch(format!("installing the handler for {}: {}", signal_name(sig), std::io::Error::last_os_error())));
        }
    }
    Ok(())
}

/// How a rank ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal(s) => write!(f, "was killed by signal {s} ({})", signal_name(*s)),
        }
    }
}

struct Rank {
    rank: usize,
    local_rank: usize,
    pid: libc::pid_t,
    exit: Option<Exit>,
    /// When it was stopped (SIGSTOP / SIGTSTP ...) and by which signal, while it is.
    stopped: Option<(Instant, i32)>,
}

impl Rank {
    fn describe(&self, node: usize) -> String {
        format!("rank {} (local rank {} on node {node}, pid {})", self.rank, self.local_rank, self.pid)
    }
}

/// The job's id, in every store key its ranks use: `TORCHELASTIC_RUN_ID` when set (torchrun's
/// `--rdzv-id`); else unique to this launch on one node; else, across nodes (which must agree
/// without talking), derived from the store address, port and job shape — two multi-node jobs
/// sharing a port then need distinct `TORCHELASTIC_RUN_ID`s (docs/distributed.md).
fn run_id(opts: &LaunchOptions) -> String {
    if let Some(id) = std::env::var("TORCHELASTIC_RUN_ID").ok().filter(|v| !v.trim().is_empty()) {
        return id;
    }
    let key = if opts.nnodes == 1 {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("{} {nanos}", std::process::id())
    } else {
        format!("{}:{} {}x{}", opts.master_addr, opts.master_port, opts.nnodes, opts.nproc_per_node)
    };
    format!("launch-{:016x}", xxhash_rust::xxh3::xxh3_64(key.as_bytes()))
}

/// Runs the job; returns when every local rank has ended. Ok only when all exited with code 0.
pub fn run(opts: &LaunchOptions) -> Result<(), DistError> {
    validate(opts)?;
    install_handlers()?;
    // Node 0 hosts the store for the whole job (torchrun's agent store): it outlives any rank,
    // so a surviving rank can still read the heartbeats that tell which rank died.
    let _store = if opts.agent_store && opts.node_rank == 0 {
        let listener = super::process_group::store_listener(&opts.master_addr, opts.master_port);
        let store = listener.and_then(|l| RawStore::tcp_server(l, 0, Duration::from_secs(60))).map_err(|m| {
            DistError::Launch(format!(
                "cannot host the rendezvous store on port {}: {m} (is the port in use? pick \
                 another with --master-port)",
                opts.master_port
            ))
        })?;
        Some(store)
    } else {
        None
    };

    let world = opts.nproc_per_node * opts.nnodes;
    let run_id = run_id(opts);
    let omp = std::env::var_os("OMP_NUM_THREADS").is_none().then(|| {
        // torchrun sets 1; sharing the cores between the local ranks keeps CPU jobs usable.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / opts.nproc_per_node).max(1)
    });
    let parent = std::process::id() as libc::pid_t;
    let mut ranks: Vec<Rank> = Vec::new();
    let mut pumps: Vec<JoinHandle<()>> = Vec::new();
    for local_rank in 0..opts.nproc_per_node {
        let rank = opts.node_rank * opts.nproc_per_node + local_rank;
        let mut cmd = Command::new(&opts.program);
        cmd.args(&opts.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", opts.nproc_per_node.to_string())
            .env("GROUP_RANK", opts.node_rank.to_string())
            .env("GROUP_WORLD_SIZE", opts.nnodes.to_string())
            .env("ROLE_RANK", rank.to_string())
            .env("ROLE_WORLD_SIZE", world.to_string())
            .env("ROLE_NAME", "default")
            .env("MASTER_ADDR", &opts.master_addr)
            .env("MASTER_PORT", opts.master_port.to_string())
            .env("TORCHELASTIC_RESTART_COUNT", "0")
            .env("TORCHELASTIC_MAX_RESTARTS", "0")
            .env("TORCHELASTIC_RUN_ID", &run_id)
            .env("TORCHELASTIC_USE_AGENT_STORE", if opts.agent_store { "True" } else { "False" })
            .stdin(Stdio::null())
            .process_group(0);
        if let Some(n) = omp {
            cmd.env("OMP_NUM_THREADS", n.to_string());
        }
        if rank != 0 {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        // SAFETY: the closure runs in the forked child before exec and only calls the
        // async-signal-safe prctl, getppid and _exit.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the launcher: a launcher killed by SIGKILL cannot stop its ranks.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // The launcher may have died between fork and prctl.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let started: Vec<libc::pid_t> = ranks.iter().map(|r| r.pid).collect();
                for pid in &started {
                    signal_rank(*pid, libc::SIGKILL);
                }
                for pid in started {
                    let mut status = 0;
                    // SAFETY: reaping our own child; status is a valid out pointer.
                    unsafe { libc::waitpid(pid, &mut status, 0) };
                }
                return Err(DistError::Launch(format!("starting rank {rank} ({}): {e}", opts.program.display())));
            }
        };
        let pid = child.id() as libc::pid_t;
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(out, rank, false));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(err, rank, true));
        }
        // The child is reaped below with waitpid (to see stops as well); std's handle is
        // dropped without waiting, which neither kills nor reaps it.
        drop(child);
        ranks.push(Rank { rank, local_rank, pid, exit: None, stopped: None });
    }
    tracing::debug!(world, node = opts.node_rank, "launched {} ranks", ranks.len());

    let outcome = supervise(&mut ranks, opts);

    // The ranks are gone; their pipes reach EOF unless a grandchild holds them, which must not
    // keep the launcher alive.
    let deadline = Instant::now() + Duration::from_secs(2);
    for p in pumps {
        while !p.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if p.is_finished() {
            let _ = p.join();
        }
    }
    outcome
}

fn validate(opts: &LaunchOptions) -> Result<(), DistError> {
    if opts.nproc_per_node == 0 {
        return Err(DistError::Launch("--nproc-per-node must be at least 1".into()));
    }
    if opts.nnodes == 0 {
        return Err(DistError::Launch("--nnodes must be at least 1".into()));
    }
    if opts.node_rank >= opts.nnodes {
        return Err(DistError::Launch(format!("--node-rank {} must be below --nnodes {}", opts.node_rank, opts.nnodes)));
    }
    if opts.master_port == 0 {
        return Err(DistError::Launch("--master-port must be 1-65535".into()));
    }
    Ok(())
}

/// Why the launcher is stopping the ranks.
enum Stopping {
    /// A rank failed: index into `ranks`, and who was stopped (frozen) at that moment.
    Failure(usize, Vec<(usize, Duration, i32)>),
    /// The launcher got a signal.
    Signal(i32),
}

fn supervise(ranks: &mut [Rank], opts: &LaunchOptions) -> Result<(), DistError> {
    let node = opts.node_rank;
    let mut stopping: Option<(Stopping, Instant)> = None;
    let mut killed = false;
    let mut later_failures: Vec<String> = Vec::new();
    loop {
        let sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            match stopping {
                None => {
                    tracing::warn!("launch: got {}, forwarding it to the ranks", signal_name(sig));
                    for r in ranks.iter().filter(|r| r.exit.is_none()) {
                        signal_rank(r.pid, sig);
                        signal_rank(r.pid, libc::SIGCONT);
                    }
                    stopping = Some((Stopping::Signal(sig), Instant::now() + opts.grace));
                }
                Some(_) => {
                    // A second signal: the user wants out now.
                    for r in ranks.iter().filter(|r| r.exit.is_none()) {
                        signal_rank(r.pid, libc::SIGKILL);
                    }
                    killed = true;
                }
            }
        }

        for i in 0..ranks.len() {
            if ranks[i].exit.is_some() {
                continue;
            }
            let mut status: libc::c_int = 0;
            // SAFETY: polling our own child; status is a valid out pointer.
            let rc = unsafe { libc::waitpid(ranks[i].pid, &mut status, libc::WNOHANG | libc::WUNTRACED | libc::WCONTINUED) };
            if rc == 0 {
                continue;
            }
            if rc < 0 {
                // ECHILD: nothing left to wait for; count it as a failure we cannot explain.
                ranks[i].exit = Some(Exit::Code(-1));
            } else if libc::WIFSTOPPED(status) {
                let s = libc::WSTOPSIG(status);
                tracing::warn!("launch: {} was stopped by {} and is not running", ranks[i].describe(node), signal_name(s));
                ranks[i].stopped = Some((Instant::now(), s));
                continue;
            } else if libc::WIFCONTINUED(status) {
                ranks[i].stopped = None;
                continue;
            } else if libc::WIFEXITED(status) {
                ranks[i].exit = Some(Exit::Code(libc::WEXITSTATUS(status)));
            } else if libc::WIFSIGNALED(status) {
                ranks[i].exit = Some(Exit::Signal(libc::WTERMSIG(status)));
            } else {
                continue;
            }
            ranks[i].stopped = None;
            let exit = ranks[i].exit.unwrap_or(Exit::Code(-1));
            if exit == Exit::Code(0) {
                continue;
            }
            match &stopping {
                None => {
                    let frozen: Vec<(usize, Duration, i32)> =
                        ranks.iter().enumerate().filter_map(|(j, r)| r.stopped.map(|(t, s)| (j, t.elapsed(), s))).collect();
                    tracing::error!("launch: {} {exit}; stopping the other ranks", ranks[i].describe(node));
                    for r in ranks.iter().filter(|r| r.exit.is_none()) {
                        signal_rank(r.pid, libc::SIGTERM);
                        // A stopped process only acts on SIGTERM once it runs again.
                        signal_rank(r.pid, libc::SIGCONT);
                    }
                    stopping = Some((Stopping::Failure(i, frozen), Instant::now() + opts.grace));
                }
                Some((Stopping::Failure(..), _)) => {
                    // Failures other than our SIGTERM are independent evidence (e.g. the
                    // survivors' own timeout errors naming the rank they waited for).
                    if exit != Exit::Signal(libc::SIGTERM) && exit != Exit::Signal(libc::SIGKILL) {
                        later_failures.push(format!("{} {exit}", ranks[i].describe(node)));
                    }
                }
                Some((Stopping::Signal(_), _)) => {}
            }
        }

        if ranks.iter().all(|r| r.exit.is_some()) {
            break;
        }
        if let Some((_, deadline)) = &stopping {
            if !killed && Instant::now() >= *deadline {
                for r in ranks.iter().filter(|r| r.exit.is_none()) {
                    tracing::warn!(
                        "launch: {} did not stop within {:.0} s of SIGTERM; sending SIGKILL",
                        r.describe(node),
                        opts.grace.as_secs_f64()
                    );
                    signal_rank(r.pid, libc::SIGKILL);
                }
                killed = true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    match stopping {
        None => Ok(()),
        Some((Stopping::Signal(sig), _)) => {
            Err(DistError::Launch(format!("interrupted by {}; forwarded to the ranks, which have ended", signal_name(sig))))
        }
        Some((Stopping::Failure(i, frozen), _)) => {
            let r = &ranks[i];
            let mut msg = format!("{} {}", r.describe(node), r.exit.map_or_else(|| "failed".to_string(), |e| e.to_string()));
            for (j, for_how_long, s) in frozen {
                msg.push_str(&format!(
                    "; {} had been stopped by {} for {:.1} s (not running: it is the likely \
                     cause, the others time out waiting for it)",
                    ranks[j].describe(node),
                    signal_name(s),
                    for_how_long.as_secs_f64()
                ));
            }
            if !later_failures.is_empty() {
                msg.push_str(&format!("; also {}", later_failures.join(", ")));
            }
            msg.push_str(&format!("; the other ranks were stopped (SIGTERM, SIGKILL after {:.0} s)", opts.grace.as_secs_f64()));
            if opts.nnodes > 1 {
                msg.push_str("; ranks on other nodes are stopped by their own launchers once their collectives fail");
            }
            Err(DistError::Launch(msg))
        }
    }
}

/// Sends `sig` to a rank's process group (the rank and anything it started), and to the rank
/// itself in case it left the group.
fn signal_rank(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: plain kill(2) calls on a pid we started; a vanished target only yields ESRCH.
    unsafe {
        libc::kill(-pid, sig);
        libc::kill(pid, sig);
    }
}

/// Copies a rank's output line by line to ours, prefixed with `[rank r] `.
fn pump(src: impl Read + Send + 'static, rank: usize, stderr: bool) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let prefix = format!("[rank {rank}] ");
        let mut reader = BufReader::new(src);
        let mut line = Vec::with_capacity(256);
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    // Whole lines under the lock, so ranks never interleave within a line.
                    let _ = if stderr {
                        let mut o = std::io::stderr().lock();
                        o.write_all(prefix.as_bytes()).and_then(|_| o.write_all(&line)).and_then(|_| o.flush())
                    } else {
                        let mut o = std::io::stdout().lock();
                        o.write_all(prefix.as_bytes()).and_then(|_| o.write_all(&line)).and_then(|_| o.flush())
                    };
                }
            }
        }
    })
}

/// The conventional name of a signal number.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGTTIN => "SIGTTIN",
        libc::SIGTTOU => "SIGTTOU",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}
