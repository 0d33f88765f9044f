//! The command line: one subcommand per pipeline stage.

mod dist_selftest;
mod generate;
mod launch;

use clap::{Parser, Subcommand};

/// specforge-rs: train EAGLE-3 draft heads for frozen Hugging Face targets.
#[derive(Parser, Debug)]
#[command(name = "specforge-rs", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Answer prompts with the target (greedy or sampled), batched with the KV cache.
    Generate(generate::GenerateArgs),
    /// Start N ranks of a data-parallel job on this node, torchrun-style:
    /// `launch --nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P] -- <subcommand ...>`.
    Launch(launch::LaunchArgs),
    /// Internal: exercise the process group (used by the tests and the bandwidth benchmark).
    #[command(hide = true)]
    DistSelftest(dist_selftest::SelftestArgs),
}

/// Parses the command line and runs it.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    crate::util::logging::init(cli.verbose);
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Launch(a) => launch::run(a),
        Command::DistSelftest(a) => dist_selftest::run(a),
    }
}
