//! The command line: one subcommand per pipeline stage.

mod data_args;
mod dist_selftest;
mod eval;
mod export;
mod extract;
mod generate;
mod import;
mod launch;
mod push;
mod regenerate;
mod run;
mod train;
mod vocab;

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
    /// The target writes the assistant turns of a dataset itself (on-policy data); resumable.
    Regenerate(regenerate::RegenerateArgs),
    /// Join answers generated elsewhere (OpenAI-format JSONL, e.g. vLLM) with their prompts.
    Import(import::ImportArgs),
    /// Draft vocabulary (d2t / t2d) from loss-masked token frequencies.
    Vocab(vocab::VocabArgs),
    /// Frozen target forward over a dataset: aux + final hidden states into feature shards.
    Extract(extract::ExtractArgs),
    /// Train a draft head on feature chunks (TTT-k forward KL; DDP under `launch` / torchrun).
    Train(train::TrainArgs),
    /// One TTT step on given head weights and features: losses, metrics, optionally gradients.
    TrainStep(train::TrainStepArgs),
    /// Write a checkpoint as a vLLM / SGLang head (validated before writing).
    Export(export::ExportArgs),
    /// Acceptance of a draft head on held-out prompts (vLLM's mean acceptance length and per-position rates).
    Eval(eval::EvalArgs),
    /// Everything from one recipe: regenerate, vocab, chunked extract+train, export, eval. Resumable.
    Run(run::RunArgs),
    /// Upload an export directory to a Hugging Face model repo in one commit (LFS for weights); `--dry-run` lists it.
    Push(push::PushArgs),
}

/// Parses the command line and runs it.
pub fn main() -> anyhow::Result<()> {
    // Before any tensor exists: large CPU tensors (feature batches) on huge pages.
    crate::extract::reader::enable_huge_page_allocations();
    let cli = Cli::parse();
    crate::util::logging::init(cli.verbose);
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Launch(a) => launch::run(a),
        Command::DistSelftest(a) => dist_selftest::run(a),
        Command::Regenerate(a) => regenerate::run(a),
        Command::Import(a) => import::run(a),
        Command::Vocab(a) => vocab::run(a),
        Command::Extract(a) => extract::run(a),
        Command::Train(a) => train::run(a),
        Command::TrainStep(a) => train::run_step(a),
        Command::Export(a) => export::run(a),
        Command::Run(a) => run::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Push(a) => push::run(a),
    }
}
