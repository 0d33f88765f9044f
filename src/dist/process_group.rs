//! [`ProcessGroup`]: collectives over PyTorch's c10d backends, with explicit timeouts and errors
//! that name the rank at fault.
//!
//! A group of world size > 1 owns
//! * a TCPStore connection (rank 0 or the launcher hosts the server, see [`StoreMode`]),
//! * a ProcessGroupGloo for CPU tensors and barriers,
//! * with the `nccl` feature and a visible GPU, a ProcessGroupNCCL for CUDA tensors,
//! * a heartbeat thread that bumps `hb/<rank>` in the store every second on its own connection.
//!
//! When an operation fails (a peer died: Gloo reports a reset connection within milliseconds; a
//! peer froze: the operation's timeout fires), the group reads the heartbeats twice, 2.5 s apart,
//! and names the ranks whose counter stopped, then marks itself failed: every later call returns
//! [`DistError::Failed`] at once, because c10d groups are unusable after an error (torchrun
//! restarts the whole job in that case; so should callers).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::env::{DistEnv, StoreMode};
use super::ffi::{RawGroup, RawOp, RawStore, RawWork};
use super::DistError;

/// How often each rank bumps its heartbeat counter.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(1000);
/// How long a diagnosis watches the counters: more than two beats, so one late beat is no alarm.
const DIAGNOSIS_WINDOW: Duration = Duration::from_millis(2500);
/// Hard bound on a diagnosis (the store itself may be the frozen part).
const DIAGNOSIS_DEADLINE: Duration = Duration::from_secs(6);
/// How long rank 0 keeps a store it hosts alive at shutdown for the other ranks to sign off.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(10);
/// Extra time `Work::wait` gives the backend beyond the operation's own timeout, so that the
/// backend's precise error (e.g. Gloo naming the peer address it waited for) arrives first.
const WAIT_GRACE: Duration = Duration::from_millis(500);

/// Counts the groups this process created: each gets its own key prefix in the store, so a
/// second group in the same job never reads the first one's keys. Every rank creates its groups
/// in the same order, so the numbers agree across ranks.
static GROUP_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A reduction for [`ProcessGroup::all_reduce`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise mean over ranks (floating-point tensors only). NCCL averages natively; with
    /// Gloo it is a sum followed by an in-place division by the world size.
    Avg,
    /// Element-wise maximum.
    Max,
    /// Element-wise minimum.
    Min,
    /// Element-wise product.
    Product,
}

/// Which backends a group creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// Gloo for CPU tensors, plus NCCL for CUDA tensors when built with the `nccl` feature and a
    /// GPU is visible.
    Auto,
    /// Gloo only (CUDA tensors are then refused).
    GlooOnly,
    /// Gloo and NCCL; creating the group fails when NCCL cannot be set up (no GPU, or built
    /// without the `nccl` feature), with c10d's own message.
    RequireNccl,
}

/// The backend an operation ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// No communication: world size 1.
    Single,
    /// ProcessGroupGloo (CPU tensors, barriers).
    Gloo,
    /// ProcessGroupNCCL (CUDA tensors).
    Nccl,
}

/// Options for [`ProcessGroup::new`].
#[derive(Clone, Debug)]
pub struct GroupOptions {
    /// Rendezvous timeout (store connection, all ranks joining) and the backends' default
    /// operation timeout. Every collective still takes its own timeout.
    pub timeout: Duration,
    /// Backends to create.
    pub backend: BackendChoice,
    /// Gloo worker threads (torch's default is 2).
    pub gloo_threads: usize,
    /// Run the heartbeat thread that lets a failed operation name the unresponsive rank.
    pub heartbeat: bool,
}

impl GroupOptions {
    /// Defaults with the given rendezvous / default operation timeout.
    pub fn with_timeout(timeout: Duration) -> Self {
        GroupOptions { timeout, backend: BackendChoice::Auto, gloo_threads: 2, heartbeat: true }
    }
}

/// A group of processes that run collectives together.
///
/// Every rank must issue the same collectives in the same order (as with torch.distributed).
/// Tensors are modified in place and must be contiguous; CPU tensors go through Gloo, CUDA
/// tensors through NCCL (the `nccl` feature; one GPU per local rank). Every call takes an
/// explicit timeout and never blocks longer than about that (plus the 2.5 s diagnosis when it
/// fails); c10d's own defaults (30 min, or forever for a plain `wait()`) are never used.
pub struct ProcessGroup {
    env: DistEnv,
    inner: Option<Shared>,
}

struct Shared {
    // Declaration order is drop order: the heartbeat stops first, then the backends go, then the
    // stores they use.
    heartbeat: Option<Heartbeat>,
    nccl: Option<(RawGroup, usize)>,
    gloo: RawGroup,
    /// Connection reserved for diagnosis (so a busy or blocked connection cannot delay it).
    diag_store: Arc<RawStore>,
    /// This group's key space in the store.
    store: RawStore,
    _base: RawStore,
    /// The first failure, once one happened.
    failed: Mutex<Option<String>>,
    /// "127.0.0.1:29500 (hosted by rank 0)": for messages.
    store_desc: String,
    /// Who hosts the store, for messages when it stops answering.
    store_host: String,
    /// Whether this process hosts the store (rank 0 without an agent store).
    hosts_store: bool,
    world: usize,
}

impl ProcessGroup {
    /// The group described by the environment (torchrun's variables, our `launch`'s, or
    /// SLURM's; see [`DistEnv`]). World size 1 gives [`ProcessGroup::single`]: no I/O at all.
    /// `timeout` bounds the rendezvous and is the backends' default operation timeout.
    pub fn from_env(timeout: Duration) -> Result<Self, DistError> {
        let env = DistEnv::from_env()?;
        Self::new(env, &GroupOptions::with_timeout(timeout))
    }

    /// A one-process group: collectives are identities (all_gather copies), nothing is opened.
    pub fn single() -> Self {
        ProcessGroup { env: DistEnv::single(), inner: None }
    }

    /// Joins the group described by `env`.
    pub fn new(env: DistEnv, opts: &GroupOptions) -> Result<Self, DistError> {
        if env.world_size <= 1 {
            return Ok(ProcessGroup { env, inner: None });
        }
        let seq = GROUP_SEQ.fetch_add(1, Ordering::SeqCst);
        let shared = Shared::connect(&env, opts, seq)?;
        Ok(ProcessGroup { env, inner: Some(shared) })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.env.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.env.world_size
    }

    /// Rank on this node.
    pub fn local_rank(&self) -> usize {
        self.env.local_rank
    }

    /// Whether this is rank 0 (the one that logs and writes checkpoints).
    pub fn is_main(&self) -> bool {
        self.env.rank == 0
    }

    /// The environment the group was built from.
    pub fn env(&self) -> &DistEnv {
        &self.env
    }

    /// The CUDA device NCCL operations expect tensors on, when the group has an NCCL backend.
    pub fn cuda_device(&self) -> Option<Device> {
        self.inner.as_ref().and_then(|s| s.nccl.as_ref()).map(|(_, d)| Device::Cuda(*d))
    }

    /// The backend that would carry an operation on `t`.
    pub fn backend_for(&self, t: &Tensor) -> Backend {
        match (&self.inner, t.device()) {
            (None, _) => Backend::Single,
            (Some(_), Device::Cuda(_)) => Backend::Nccl,
            (Some(_), _) => Backend::Gloo,
        }
    }

    /// All-reduces `t` in place across ranks, waiting at most about `timeout`.
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp, timeout: Duration) -> Result<(), DistError> {
        self.all_reduce_async(t, op, timeout)?.wait(timeout + WAIT_GRACE)
    }

    /// Starts an in-place all-reduce and returns without waiting; complete it with
    /// [`Work::wait`]. Several may be in flight (e.g. gradient buckets); the tensor must not be
    /// read or written until then. `timeout` is the operation's own timeout in the backend.
    pub fn all_reduce_async(&self, t: &mut Tensor, op: ReduceOp, timeout: Duration) -> Result<Work<'_>, DistError> {
        let name = "all_reduce";
        self.check_tensor(name, t)?;
        if op == ReduceOp::Avg && !is_float(t.kind()) {
            return Err(self.tensor_err(name, format!("ReduceOp::Avg needs a floating-point tensor, got {:?}", t.kind())));
        }
        let Some(shared) = &self.inner else {
            return Ok(Work::done(self, name));
        };
        shared.usable(self.env.rank)?;
        let (group, backend) = self.group_for(name, t)?;
        let (raw_op, divide) = match (op, backend) {
            (ReduceOp::Sum, _) => (RawOp::Sum, None),
            (ReduceOp::Max, _) => (RawOp::Max, None),
            (ReduceOp::Min, _) => (RawOp::Min, None),
            (ReduceOp::Product, _) => (RawOp::Product, None),
            #[cfg(feature = "nccl")]
            (ReduceOp::Avg, Backend::Nccl) => (RawOp::Avg, None),
            // Gloo has no AVG: sum, then divide in place once the sum is complete.
            (ReduceOp::Avg, _) => (RawOp::Sum, Some(self.env.world_size as f64)),
        };
        let started = Instant::now();
        // SAFETY: `t` is a live tensor borrowed for this call; the backend takes its own
        // reference to the tensor before returning.
        let raw = unsafe { group.all_reduce(t.as_mut_ptr().cast(), raw_op, timeout) }.map_err(|m| self.fail(name, started, timeout, m))?;
        Ok(Work { pg: self, raw: Some(raw), op: name, started, op_timeout: timeout, divide: divide.map(|d| (t.shallow_clone(), d)) })
    }

    /// Copies `t` from rank `root` to every rank, in place, waiting at most about `timeout`.
    pub fn broadcast(&self, t: &mut Tensor, root: usize, timeout: Duration) -> Result<(), DistError> {
        self.broadcast_async(t, root, timeout)?.wait(timeout + WAIT_GRACE)
    }

    /// Starts an in-place broadcast from `root`; see [`ProcessGroup::all_reduce_async`].
    pub fn broadcast_async(&self, t: &mut Tensor, root: usize, timeout: Duration) -> Result<Work<'_>, DistError> {
        let name = "broadcast";
        self.check_tensor(name, t)?;
        if root >= self.env.world_size {
            return Err(self.tensor_err(name, format!("root {root} is not a rank (world size {})", self.env.world_size)));
        }
        let Some(shared) = &self.inner else {
            return Ok(Work::done(self, name));
        };
        shared.usable(self.env.rank)?;
        let (group, _) = self.group_for(name, t)?;
        let started = Instant::now();
        // SAFETY: `t` is a live tensor for this call; the backend keeps its own reference.
        let raw = unsafe { group.broadcast(t.as_mut_ptr().cast(), root, timeout) }.map_err(|m| self.fail(name, started, timeout, m))?;
        Ok(Work::pending(self, name, raw, started, timeout))
    }

    /// Gathers every rank's `t` (same shape and dtype everywhere): element `r` of the result is
    /// rank `r`'s tensor. Waits at most about `timeout`.
    pub fn all_gather(&self, t: &Tensor, timeout: Duration) -> Result<Vec<Tensor>, DistError> {
        let name = "all_gather";
        self.check_tensor(name, t)?;
        let Some(shared) = &self.inner else {
            return Ok(vec![t.detach().copy()]);
        };
        shared.usable(self.env.rank)?;
        let (group, _) = self.group_for(name, t)?;
        let mut outputs: Vec<Tensor> = (0..self.env.world_size).map(|_| t.empty_like()).collect();
        let ptrs: Vec<*mut std::ffi::c_void> = outputs.iter_mut().map(|o| o.as_mut_ptr().cast()).collect();
        let started = Instant::now();
        // SAFETY: `outputs` and `t` are live tensors for the whole call; the backend keeps its
        // own references. The input handle is only read (shallow-copied) by the shim.
        let raw =
            unsafe { group.all_gather(&ptrs, t.as_ptr().cast_mut().cast(), timeout) }.map_err(|m| self.fail(name, started, timeout, m))?;
        Work::pending(self, name, raw, started, timeout).wait(timeout + WAIT_GRACE)?;
        Ok(outputs)
    }

    /// Waits until every rank reached the barrier (and, with Gloo, finished its earlier
    /// operations), at most about `timeout`.
    pub fn barrier(&self, timeout: Duration) -> Result<(), DistError> {
        let name = "barrier";
        let Some(shared) = &self.inner else {
            return Ok(());
        };
        shared.usable(self.env.rank)?;
        let started = Instant::now();
        let raw = shared.gloo.barrier(timeout).map_err(|m| self.fail(name, started, timeout, m))?;
        Work::pending(self, name, raw, started, timeout).wait(timeout + WAIT_GRACE)
    }

    /// Sets `key` in this group's key space of the rendezvous store (small metadata exchange).
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<(), DistError> {
        let Some(shared) = &self.inner else {
            return Err(self.tensor_err("store_set", "a single-process group has no store".into()));
        };
        shared.store.set(&format!("user/{key}"), value).map_err(|message| DistError::Store {
            rank: self.env.rank,
            op: "set",
            key: key.to_string(),
            message,
        })
    }

    /// Reads `key`, waiting until some rank set it (at most the group's rendezvous timeout).
    pub fn store_get(&self, key: &str) -> Result<Vec<u8>, DistError> {
        let Some(shared) = &self.inner else {
            return Err(self.tensor_err("store_get", "a single-process group has no store".into()));
        };
        shared.store.get(&format!("user/{key}")).map_err(|message| DistError::Store {
            rank: self.env.rank,
            op: "get",
            key: key.to_string(),
            message,
        })
    }

    /// Whether an earlier operation failed (the group then refuses further operations).
    pub fn failure(&self) -> Option<String> {
        self.inner.as_ref().and_then(|s| s.failed.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn check_tensor(&self, op: &'static str, t: &Tensor) -> Result<(), DistError> {
        if !t.defined() {
            return Err(self.tensor_err(op, "undefined tensor".into()));
        }
        if !t.is_contiguous() {
            return Err(self.tensor_err(op, format!("tensor of shape {:?} is not contiguous (call .contiguous())", t.size())));
        }
        Ok(())
    }

    fn group_for(&self, op: &'static str, t: &Tensor) -> Result<(&RawGroup, Backend), DistError> {
        let Some(shared) = &self.inner else {
            return Err(self.tensor_err(op, "no backend in a single-process group".into()));
        };
        match t.device() {
            Device::Cpu => Ok((&shared.gloo, Backend::Gloo)),
            Device::Cuda(i) => match &shared.nccl {
                Some((g, dev)) if *dev == i => Ok((g, Backend::Nccl)),
                Some((_, dev)) => Err(self.tensor_err(op, format!("tensor is on cuda:{i}, this rank's NCCL group uses cuda:{dev}"))),
                None => Err(self.tensor_err(
                    op,
                    if cfg!(feature = "nccl") {
                        "CUDA tensor but the group has no NCCL backend (no GPU visible at creation, or BackendChoice::GlooOnly)".into()
                    } else {
                        "CUDA tensor but this binary was built without the `nccl` feature".into()
                    },
                )),
            },
            other => Err(self.tensor_err(op, format!("unsupported device {other:?}"))),
        }
    }

    fn tensor_err(&self, op: &'static str, problem: String) -> DistError {
        DistError::Invalid { rank: self.env.rank, op, problem }
    }

    /// Records the failure, diagnoses which peers stopped, and builds the error.
    fn fail(&self, op: &'static str, started: Instant, timeout: Duration, message: String) -> DistError {
        let elapsed = started.elapsed();
        let lower = message.to_lowercase();
        let timed_out = elapsed >= timeout || lower.contains("timed out") || lower.contains("timeout");
        let diagnosis = match &self.inner {
            Some(shared) => {
                {
                    let mut f = shared.failed.lock().unwrap_or_else(|e| e.into_inner());
                    if f.is_none() {
                        *f = Some(format!("{op}: {message}"));
                    }
                }
                shared.diagnose(self.env.rank, self.env.world_size)
            }
            None => String::new(),
        };
        DistError::Collective { rank: self.env.rank, world_size: self.env.world_size, op, elapsed, timed_out, message, diagnosis }
    }
}

fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

/// A started operation; finish it with [`Work::wait`]. Dropping it without waiting leaves the
/// operation running in the backend (its result is then not checked).
#[must_use = "a started operation must be waited on to know it succeeded"]
pub struct Work<'a> {
    pg: &'a ProcessGroup,
    raw: Option<RawWork>,
    op: &'static str,
    started: Instant,
    op_timeout: Duration,
    /// Gloo average: divide this (shallow) view of the result in place by the world size.
    divide: Option<(Tensor, f64)>,
}

impl<'a> Work<'a> {
    fn done(pg: &'a ProcessGroup, op: &'static str) -> Self {
        Work { pg, raw: None, op, started: Instant::now(), op_timeout: Duration::ZERO, divide: None }
    }

    fn pending(pg: &'a ProcessGroup, op: &'static str, raw: RawWork, started: Instant, op_timeout: Duration) -> Self {
        Work { pg, raw: Some(raw), op, started, op_timeout, divide: None }
    }

    /// Waits at most `timeout` (from now) for the operation. Its failure, or the timeout, is
    /// returned as [`DistError::Collective`] naming the unresponsive ranks when they can be told.
    pub fn wait(mut self, timeout: Duration) -> Result<(), DistError> {
        let Some(raw) = self.raw.take() else {
            return Ok(());
        };
        raw.wait(timeout).map_err(|m| self.pg.fail(self.op, self.started, self.op_timeout.min(timeout), m))?;
        if let Some((mut t, d)) = self.divide.take() {
            let _ = tch::no_grad(|| t.f_div_scalar_(d)).map_err(|e| DistError::Invalid {
                rank: self.pg.env.rank,
                op: self.op,
                problem: format!("dividing the sum for ReduceOp::Avg: {e}"),
            })?;
        }
        Ok(())
    }
}

impl Shared {
    fn connect(env: &DistEnv, opts: &GroupOptions, seq: usize) -> Result<Self, DistError> {
        let rank = env.rank;
        let addr = format!("{}:{}", env.master_addr, env.master_port);
        let rdzv = |message: String| DistError::Rendezvous { rank, addr: addr.clone(), message };
        let (base, store_host) = match &env.store {
            StoreMode::RankZeroHosts => {
                let is_server = rank == 0;
                // Every rank passes the world size: each client then counts itself in, and rank
                // 0's constructor returns once all have joined.
                let base = if is_server {
                    store_listener(&env.master_addr, env.master_port).and_then(|l| RawStore::tcp_server(l, env.world_size, opts.timeout))
                } else {
                    RawStore::tcp(&env.master_addr, env.master_port, env.world_size, opts.timeout)
                }
                .map_err(|m| rdzv(store_hint(m, is_server, env)))?;
                (base, "rank 0".to_string())
            }
            StoreMode::Agent { prefix } => {
                let client =
                    RawStore::tcp(&env.master_addr, env.master_port, 0, opts.timeout).map_err(|m| rdzv(store_hint(m, false, env)))?;
                let base = client.prefixed(prefix).map_err(&rdzv)?;
                (base, "the launcher (agent store)".to_string())
            }
        };
        // The job's run id in every key: a process of another job that reaches this store (same
        // port) waits on keys nobody sets and times out, instead of joining this group.
        let store = base.prefixed(&format!("specforge/{}/pg{seq}", env.run_id)).map_err(&rdzv)?;
        let gloo_store = store.prefixed("gloo").map_err(&rdzv)?;
        let ifnames = std::env::var("GLOO_SOCKET_IFNAME").ok().filter(|s| !s.trim().is_empty());
        let hostname = if ifnames.is_some() { None } else { gloo_address(&env.master_addr, env.master_port) };
        let gloo = RawGroup::gloo(
            &gloo_store,
            rank,
            env.world_size,
            opts.timeout,
            ifnames.as_deref(),
            hostname.as_deref(),
            opts.gloo_threads.max(1),
        )
        .map_err(|m| rdzv(format!("creating the Gloo group: {m}")))?;
        let nccl = Self::maybe_nccl(env, opts, &store).map_err(&rdzv)?;
        let diag_store = store.clone_connection().map_err(&rdzv)?;
        // Diagnosis only reads keys that exist; the short timeout bounds a get on a slow store.
        diag_store.set_timeout(DIAGNOSIS_DEADLINE).map_err(&rdzv)?;
        let diag_store = Arc::new(diag_store);
        let heartbeat = if opts.heartbeat {
            let conn = store.clone_connection().map_err(&rdzv)?;
            Some(Heartbeat::start(conn, rank))
        } else {
            None
        };
        tracing::debug!(rank, world = env.world_size, %addr, "process group ready");
        Ok(Shared {
            heartbeat,
            nccl,
            gloo,
            diag_store,
            store,
            _base: base,
            failed: Mutex::new(None),
            store_desc: format!("{addr} (hosted by {store_host})"),
            store_host,
            hosts_store: env.store == StoreMode::RankZeroHosts && rank == 0,
            world: env.world_size,
        })
    }

    #[cfg(feature = "nccl")]
    fn maybe_nccl(env: &DistEnv, opts: &GroupOptions, store: &RawStore) -> Result<Option<(RawGroup, usize)>, String> {
        let required = opts.backend == BackendChoice::RequireNccl;
        if opts.backend == BackendChoice::GlooOnly || (!required && !tch::Cuda::is_available()) {
            return Ok(None);
        }
        let count = tch::Cuda::device_count().max(0) as usize;
        // One GPU per local rank; with CUDA_VISIBLE_DEVICES narrowed to one GPU per process the
        // only visible device is 0. With no GPU at all (RequireNccl) c10d reports it itself.
        let device = if count <= 1 { 0 } else { env.local_rank };
        if count > 1 && device >= count {
            return Err(format!("local rank {} has no GPU: {count} visible (one GPU per local rank)", env.local_rank));
        }
        let nccl_store = store.prefixed("nccl")?;
        let g = RawGroup::nccl(&nccl_store, env.rank, env.world_size, opts.timeout, device)
            .map_err(|m| format!("creating the NCCL group on cuda:{device}: {m}"))?;
        Ok(Some((g, device)))
    }

    #[cfg(not(feature = "nccl"))]
    fn maybe_nccl(_env: &DistEnv, opts: &GroupOptions, _store: &RawStore) -> Result<Option<(RawGroup, usize)>, String> {
        if opts.backend == BackendChoice::RequireNccl {
            return Err("NCCL required, but this binary was built without the `nccl` feature".into());
        }
        Ok(None)
    }

    fn usable(&self, rank: usize) -> Result<(), DistError> {
        match &*self.failed.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(first) => Err(DistError::Failed { rank, first: first.clone() }),
            None => Ok(()),
        }
    }

    /// Which peers stopped beating, as a sentence for the error message. Bounded by
    /// DIAGNOSIS_DEADLINE even when the store itself does not answer.
    fn diagnose(&self, rank: usize, world: usize) -> String {
        let store = Arc::clone(&self.diag_store);
        let (tx, rx) = std::sync::mpsc::channel();
        // A thread, because a frozen store host can block a store call for its whole timeout;
        // if it does, the thread is left behind (the process is about to report and exit).
        let spawned = std::thread::Builder::new().name("dist-diagnose".into()).spawn(move || {
            let _ = tx.send(read_heartbeats(&store, world, rank));
        });
        if spawned.is_err() {
            return "could not start the heartbeat diagnosis".into();
        }
        match rx.recv_timeout(DIAGNOSIS_DEADLINE) {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => format!("the store at {} did not answer ({e}): {} is likely dead or stopped", self.store_desc, self.store_host),
            Err(_) => format!(
                "the store at {} did not answer within {:.0} s: {} is likely dead or stopped",
                self.store_desc,
                DIAGNOSIS_DEADLINE.as_secs_f64(),
                self.store_host
            ),
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(hb) = self.heartbeat.take() {
            hb.stop();
        }
        let failed = self.failed.lock().map(|f| f.is_some()).unwrap_or(true);
        if let Some((g, _)) = &self.nccl {
            if failed {
                g.abort();
            } else if let Err(e) = g.shutdown() {
                tracing::warn!("NCCL shutdown: {e}");
            }
        }
        if !failed {
            self.sign_off();
        }
    }
}

impl Shared {
    /// At a clean shutdown every rank signs off in the store; a rank 0 that hosts the store
    /// waits (up to SHUTDOWN_LINGER) for the others, so it does not pull the store from under
    /// ranks still finishing their last store calls.
    fn sign_off(&self) {
        let Ok(mut seen) = self.store.add("exit", 1) else {
            return;
        };
        if !self.hosts_store {
            return;
        }
        let deadline = Instant::now() + SHUTDOWN_LINGER;
        while usize::try_from(seen).unwrap_or(0) < self.world && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            match self.store.add("exit", 0) {
                Ok(c) => seen = c,
                Err(_) => return,
            }
        }
    }
}

/// The heartbeat thread: bumps `hb/<rank>` every HEARTBEAT_EVERY on its own store connection.
struct Heartbeat {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: JoinHandle<()>,
}

impl Heartbeat {
    fn start(store: RawStore, rank: usize) -> Self {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&stop);
        let key = format!("hb/{rank}");
        let handle = std::thread::spawn(move || {
            let (lock, cv) = &*flag;
            let mut failures = 0u32;
            loop {
                match store.add(&key, 1) {
                    Ok(_) => failures = 0,
                    Err(e) => {
                        // The store host may be gone at the end of a job; a few misses are
                        // normal then, and nothing else depends on this thread.
                        failures += 1;
                        tracing::debug!("heartbeat: {e}");
                        if failures >= 5 {
                            return;
                        }
                    }
                }
                let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                let (guard, _) = cv.wait_timeout_while(guard, HEARTBEAT_EVERY, |stopped| !*stopped).unwrap_or_else(|e| e.into_inner());
                if *guard {
                    return;
                }
            }
        });
        Heartbeat { stop, handle }
    }

    /// Stops the thread. It is joined when it leaves promptly; one stuck in a store call (a
    /// frozen store host) is left behind rather than blocking shutdown: it owns its connection.
    fn stop(self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        let deadline = Instant::now() + Duration::from_millis(300);
        while !self.handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.handle.is_finished() {
            let _ = self.handle.join();
        }
    }
}

/// Reads every rank's heartbeat counter twice, DIAGNOSIS_WINDOW apart, and describes the ranks
/// whose counter did not move (or never appeared).
fn read_heartbeats(store: &RawStore, world: usize, me: usize) -> Result<String, String> {
    let read = |r: usize| -> Result<Option<i64>, String> {
        let key = format!("hb/{r}");
        if !store.check(&key)? {
            return Ok(None);
        }
        // add(0) reads the counter without the blocking semantics of get.
        store.add(&key, 0).map(Some)
    };
    let first: Vec<Option<i64>> = (0..world).map(read).collect::<Result<_, _>>()?;
    std::thread::sleep(DIAGNOSIS_WINDOW);
    let second: Vec<Option<i64>> = (0..world).map(read).collect::<Result<_, _>>()?;
    let mut silent = Vec::new();
    let mut never = Vec::new();
    for r in (0..world).filter(|r| *r != me) {
        match (first[r], second[r]) {
            (_, None) => never.push(r),
            (Some(a), Some(b)) if a == b => silent.push(r),
            (None, Some(_)) | (Some(_), Some(_)) => {}
        }
    }
    let list = |v: &[usize]| v.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
    let mut parts = Vec::new();
    if !silent.is_empty() {
        parts.push(format!(
            "no heartbeat from rank{} {} for {:.1} s (dead, stopped, or the whole process is stuck)",
            if silent.len() > 1 { "s" } else { "" },
            list(&silent),
            DIAGNOSIS_WINDOW.as_secs_f64()
        ));
    }
    if !never.is_empty() {
        parts.push(format!("rank{} {} never joined the group", if never.len() > 1 { "s" } else { "" }, list(&never)));
    }
    if parts.is_empty() {
        parts.push(
            "all other ranks are alive (heartbeats advancing): a rank may be slow, or in a \
             different collective than this one"
                .into(),
        );
    }
    Ok(parts.join("; "))
}

/// Adds what usually causes a store error to c10d's message.
/// The socket a rendezvous store listens on: `addr:port` exactly — the loopback address for a
/// single-node job (the default), the given host address for a multi-node one, every interface
/// only when `addr` says so (`0.0.0.0` or `::`). c10d's own bind would take every interface
/// whatever the address. The store has no authentication: run multi-node jobs on a trusted
/// network (docs/distributed.md).
pub(crate) fn store_listener(addr: &str, port: u16) -> Result<std::net::TcpListener, String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<std::net::SocketAddr> =
        (addr, port).to_socket_addrs().map_err(|e| format!("cannot resolve the store address {addr}: {e}"))?.collect();
    let mut last = format!("{addr} resolves to no address");
    for a in addrs {
        match std::net::TcpListener::bind(a) {
            Ok(l) => return Ok(l),
            Err(e) => last = format!("cannot listen on {a}: {e}"),
        }
    }
    Err(format!("{last} (the store listens only on MASTER_ADDR, which must be an address of this host)"))
}

fn store_hint(message: String, is_server: bool, env: &DistEnv) -> String {
    if is_server {
        format!(
            "{message} (rank 0 hosts the store on port {}: is the port free, and did all {} ranks \
             start with the same MASTER_ADDR/MASTER_PORT?)",
            env.master_port, env.world_size
        )
    } else {
        format!(
            "{message} (could not reach the store at {}:{}: is its host up, the address right, \
             and the port open in the firewall?)",
            env.master_addr, env.master_port
        )
    }
}

/// The address Gloo binds its transport to when GLOO_SOCKET_IFNAME is not set: 127.0.0.1 for a
/// loopback store (single-node jobs then never depend on this host's name resolving), otherwise
/// the local address the kernel would use to reach the store host: reachable by the peers on the
/// same network, unlike the 127.0.1.1 that `hostname` resolves to on many Debian hosts. A UDP
/// connect sends nothing; it only asks the routing table. None: Gloo's default (the hostname).
fn gloo_address(master_addr: &str, port: u16) -> Option<String> {
    use std::net::{ToSocketAddrs, UdpSocket};
    let target = (master_addr, port).to_socket_addrs().ok()?.next()?;
    if target.ip().is_loopback() {
        return Some("127.0.0.1".into());
    }
    let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = UdpSocket::bind(bind).ok()?;
    sock.connect(target).ok()?;
    let local = sock.local_addr().ok()?.ip();
    (!local.is_unspecified()).then(|| local.to_string())
}
