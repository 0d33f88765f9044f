//! `specforge-rs launch`: starts the ranks of a data-parallel job (see crate::dist::launch).

use std::ffi::OsString;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::dist::launch::{run as launch, LaunchOptions};
use crate::dist::DEFAULT_PORT;

/// `launch --nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P] -- <subcommand and args>`
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Ranks (processes) on this node; one GPU each when training on GPUs.
    #[arg(long, alias = "nproc_per_node")]
    nproc_per_node: usize,
    /// Nodes in the job; run one `launch` per node.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index, 0..nnodes.
    #[arg(long, alias = "node_rank", default_value_t = 0)]
    node_rank: usize,
    /// Address of node 0, reachable from every node (it hosts the rendezvous store).
    #[arg(long, alias = "master_addr", default_value = "127.0.0.1")]
    master_addr: String,
    /// TCP port of the rendezvous store on node 0.
    #[arg(long, alias = "master_port", default_value_t = DEFAULT_PORT)]
    master_port: u16,
    /// Let rank 0 host the store instead of node 0's launcher (TORCHELASTIC_USE_AGENT_STORE=False).
    #[arg(long)]
    no_agent_store: bool,
    /// Seconds between SIGTERM and SIGKILL when stopping the ranks after a failure or a signal.
    #[arg(long, default_value_t = 5.0)]
    grace_period: f64,
    /// The subcommand each rank runs, after `--` (e.g. `-- train --recipe r.toml`).
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

/// Runs the launcher; the error names the failed rank.
pub fn run(a: LaunchArgs) -> anyhow::Result<()> {
    let program = std::env::current_exe().context("finding this program's path")?;
    let grace = Duration::try_from_secs_f64(a.grace_period.max(0.0)).context("--grace-period is not a valid number of seconds")?;
    let opts = LaunchOptions {
        nproc_per_node: a.nproc_per_node,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
        agent_store: !a.no_agent_store,
        grace,
        program,
        args: a.command,
    };
    launch(&opts)?;
    Ok(())
}
