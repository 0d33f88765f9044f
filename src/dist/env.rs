//! Where this process sits in the job: read from torchrun's environment (which our `launch` sets
//! too) or, as a fallback, from SLURM's.
//!
//! | field | torchrun / `launch` | SLURM fallback | default |
//! |---|---|---|---|
//! | rank | `RANK` | `SLURM_PROCID` | 0 |
//! | world size | `WORLD_SIZE` | `SLURM_NTASKS` (`SLURM_NPROCS`) | 1 |
//! | local rank | `LOCAL_RANK` | `SLURM_LOCALID` | rank mod local world size |
//! | local world size | `LOCAL_WORLD_SIZE` | `SLURM_NTASKS_PER_NODE`, `SLURM_TASKS_PER_NODE` (leading number) | world size |
//! | store address | `MASTER_ADDR` | first host of `SLURM_STEP_NODELIST` / `SLURM_JOB_NODELIST`, then `SLURM_LAUNCH_NODE_IPADDR` | 127.0.0.1 |
//! | store port | `MASTER_PORT` | 15000 + `SLURM_JOB_ID` mod 20000 | 29500 |
//! | run id (in every store key) | `TORCHELASTIC_RUN_ID` | `slurm-<SLURM_JOB_ID>.<SLURM_STEP_ID>` | `none` |
//!
//! torchrun's variables win over SLURM's (under `srun torchrun ...` SLURM describes the agents,
//! torchrun the workers). `TORCHELASTIC_USE_AGENT_STORE=True` means the store is hosted by the
//! launcher (torchrun's agent or our `launch`) and every rank is a client; keys then live under
//! `/worker/attempt_<TORCHELASTIC_RESTART_COUNT>` exactly as in torch.distributed.

use super::DistError;

/// Who hosts the rendezvous store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreMode {
    /// Rank 0 hosts a TCPStore at MASTER_ADDR:MASTER_PORT; the others connect to it.
    RankZeroHosts,
    /// The launcher (torchrun's agent, or `specforge-rs launch`) hosts it; every rank is a client
    /// and uses keys under `prefix`.
    Agent {
        /// Key prefix of this restart attempt, `/worker/attempt_<n>`.
        prefix: String,
    },
}

/// Which environment the values came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvSource {
    /// torchrun-style variables (RANK, WORLD_SIZE, ...), as set by torchrun or `launch`.
    Torchrun,
    /// SLURM's variables (srun without torchrun).
    Slurm,
    /// Nothing set: a single process.
    Single,
}

/// The distributed environment of this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, 0-based.
    pub rank: usize,
    /// Number of ranks in the job.
    pub world_size: usize,
    /// Rank on this node (selects the GPU).
    pub local_rank: usize,
    /// Ranks on this node.
    pub local_world_size: usize,
    /// Host of the rendezvous store.
    pub master_addr: String,
    /// Port of the rendezvous store.
    pub master_port: u16,
    /// Who hosts the store.
    pub store: StoreMode,
    /// The job's id (`TORCHELASTIC_RUN_ID`, set by torchrun and `launch`; SLURM's job and step
    /// ids under srun; `none` otherwise): part of every store key, so processes of two jobs that
    /// reach the same store never join each other's group.
    pub run_id: String,
    /// Where the values came from.
    pub source: EnvSource,
}

/// torch's default store port.
pub const DEFAULT_PORT: u16 = 29500;

impl DistEnv {
    /// A single process (world size 1).
    pub fn single() -> Self {
        DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_PORT,
            store: StoreMode::RankZeroHosts,
            run_id: "none".into(),
            source: EnvSource::Single,
        }
    }

    /// Reads the process environment (see the module docs for the variables).
    pub fn from_env() -> Result<Self, DistError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `get` (the process environment in [`DistEnv::from_env`]; a map
    /// in tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, DistError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let parse = |k: &str| -> Result<Option<usize>, DistError> {
            match get(k) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| env_err(k, &v, "expected a non-negative integer")),
            }
        };
        let torchrun = get("RANK").is_some() || get("WORLD_SIZE").is_some();
        let slurm = !torchrun && get("SLURM_PROCID").is_some();
        let (rank_var, world_var) = if slurm { ("SLURM_PROCID", "SLURM_NTASKS") } else { ("RANK", "WORLD_SIZE") };
        let rank = parse(rank_var)?;
        let mut world = parse(world_var)?;
        if slurm && world.is_none() {
            world = parse("SLURM_NPROCS")?;
        }
        let (rank, world_size) = match (rank, world) {
            (None, None) => return Ok(Self::single()),
            (Some(r), Some(w)) => (r, w),
            (Some(_), None) => return Err(env_err(world_var, "", &format!("missing while {rank_var} is set"))),
            (None, Some(1)) => (0, 1),
            (None, Some(_)) => return Err(env_err(rank_var, "", &format!("missing while {world_var} is set"))),
        };
        if world_size == 0 {
            return Err(env_err(world_var, "0", "must be at least 1"));
        }
        if rank >= world_size {
            return Err(env_err(rank_var, &rank.to_string(), &format!("must be below {world_var}={world_size}")));
        }
        let local_world_size = if slurm {
            match parse_leading("SLURM_NTASKS_PER_NODE", &get)? {
                Some(n) => Some(n),
                None => parse_leading("SLURM_TASKS_PER_NODE", &get)?,
            }
        } else {
            parse("LOCAL_WORLD_SIZE")?
        }
        .unwrap_or(world_size)
        .clamp(1, world_size);
        let local_rank = if slurm { parse("SLURM_LOCALID")? } else { parse("LOCAL_RANK")? }.unwrap_or(rank % local_world_size);

        let master_addr = match get("MASTER_ADDR") {
            Some(a) => a.trim().to_string(),
            None if slurm => get("SLURM_STEP_NODELIST")
                .or_else(|| get("SLURM_JOB_NODELIST"))
                .and_then(|l| first_host(&l))
                .or_else(|| get("SLURM_LAUNCH_NODE_IPADDR"))
                .unwrap_or_else(|| "127.0.0.1".into()),
            None => "127.0.0.1".into(),
        };
        let master_port = match get("MASTER_PORT") {
            Some(p) => {
                p.trim().parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| env_err("MASTER_PORT", &p, "expected a port 1-65535"))?
            }
            None if slurm => match parse("SLURM_JOB_ID")? {
                // Every job gets its own port, so two jobs sharing a node do not collide.
                Some(id) => 15000 + (id % 20000) as u16,
                None => DEFAULT_PORT,
            },
            None => DEFAULT_PORT,
        };
        let store = if get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True") {
            let attempt = parse("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0);
            StoreMode::Agent { prefix: format!("/worker/attempt_{attempt}") }
        } else {
            StoreMode::RankZeroHosts
        };
        let run_id = match get("TORCHELASTIC_RUN_ID") {
            Some(id) => id.trim().to_string(),
            None if slurm => format!("slurm-{}.{}", get("SLURM_JOB_ID").unwrap_or_default(), get("SLURM_STEP_ID").unwrap_or_default()),
            None => "none".into(),
        };
        Ok(DistEnv {
            rank,
            run_id,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            store,
            source: if slurm { EnvSource::Slurm } else { EnvSource::Torchrun },
        })
    }
}

fn env_err(var: &str, value: &str, problem: &str) -> DistError {
    DistError::Env { var: var.to_string(), value: value.to_string(), problem: problem.to_string() }
}

/// SLURM's per-node task counts look like `4`, `4(x2)` or `4(x2),3`; the first number is this
/// job's count on the first node, which is what a homogeneous job has everywhere.
fn parse_leading(var: &str, get: &impl Fn(&str) -> Option<String>) -> Result<Option<usize>, DistError> {
    let Some(v) = get(var) else { return Ok(None) };
    let digits: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse::<usize>().map(Some).map_err(|_| env_err(var, &v, "expected a task count such as `4` or `4(x2)`"))
}

/// The first host of a SLURM node list: `node[01-04,07],gpu5` → `node01`; `a,b` → `a`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let mut name = String::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' => break,
            '[' => {
                let inside: String = chars.by_ref().take_while(|c| *c != ']').collect();
                let first = inside.split(',').next().unwrap_or("");
                name.push_str(first.split('-').next().unwrap_or(""));
                // A suffix after the bracket (`node[1-2]-ib`) belongs to every host.
                for c in chars.by_ref() {
                    if c == ',' {
                        break;
                    }
                    name.push(c);
                }
                break;
            }
            c => name.push(c),
        }
    }
    (!name.is_empty()).then_some(name)
}
