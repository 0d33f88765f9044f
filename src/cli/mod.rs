//! The command line: one subcommand per pipeline stage. Each stage's arguments are its typed job
//! (the recipe sections flattened in), parsed here and handed with the [`Runtime`] to the stage's
//! library function; these files only parse, call and print.

mod dist_selftest;
mod import;
mod launch;
mod push;
mod stages;

use clap::{Parser, Subcommand};

use crate::runtime::{Runtime, RuntimeArgs};

/// specforge-rs: train EAGLE-3 draft heads for frozen Hugging Face targets.
#[derive(Parser, Debug)]
#[command(name = "specforge-rs", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Answer prompts with the target (greedy or sampled), batched with the KV cache.
    Generate(crate::generate::GenerateJob),
    /// Start N ranks of a data-parallel job on this node, torchrun-style:
    /// `launch --nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P] -- <subcommand ...>`.
    Launch(launch::LaunchArgs),
    /// Internal: exercise the process group (used by the tests and the bandwidth benchmark).
    #[command(hide = true)]
    DistSelftest(dist_selftest::SelftestArgs),
    /// The target writes the assistant turns of a dataset itself (on-policy data); resumable.
    Regenerate(crate::generate::regenerate::RegenerateJob),
    /// Join answers generated elsewhere (OpenAI-format JSONL, e.g. vLLM) with their prompts.
    Import(import::ImportArgs),
    /// Draft vocabulary (d2t / t2d) from loss-masked token frequencies.
    Vocab(crate::vocab::VocabJob),
    /// Frozen target forward over a dataset: aux + final hidden states into feature shards.
    Extract(crate::extract::ExtractJob),
    /// Train a draft head on feature chunks (TTT-k forward KL; DDP under `launch` / torchrun).
    Train(crate::train::TrainJob),
    /// One TTT step on given head weights and features: losses, metrics, optionally gradients.
    TrainStep(crate::train::step::TrainStepJob),
    /// Write a checkpoint as a vLLM / SGLang head (validated before writing).
    Export(crate::pipeline::ExportJob),
    /// Acceptance of a draft head on held-out prompts (vLLM's mean acceptance length and per-position rates).
    Eval(crate::eval::EvalJob),
    /// Everything from one recipe: regenerate, vocab, chunked extract+train, export, eval. Resumable.
    Run(stages::RunArgs),
    /// Upload an export directory to a Hugging Face model repo in one commit (LFS for weights); `--dry-run` lists it.
    Push(push::PushArgs),
}

/// The clap command tree (what `--help` shows); the flag/recipe-key test walks it.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Parses the command line, resolves the runtime once, and runs the subcommand.
pub fn main() -> anyhow::Result<()> {
    // Before any tensor exists: large CPU tensors (feature batches) on huge pages.
    crate::extract::reader::enable_huge_page_allocations();
    let cli = Cli::parse();
    crate::util::logging::init(cli.verbose);
    // `launch` only starts processes; every other command runs with a resolved runtime.
    let command = match cli.command {
        Command::Launch(a) => return launch::run(a),
        other => other,
    };
    let rt = Runtime::resolve(&cli.runtime)?;
    rt.install();
    match command {
        Command::Launch(a) => launch::run(a),
        Command::Generate(j) => stages::generate(&j, &rt),
        Command::DistSelftest(a) => dist_selftest::run(a, &rt),
        Command::Regenerate(j) => stages::regenerate(&j, &rt),
        Command::Import(a) => import::run(a),
        Command::Vocab(j) => stages::vocab(&j, &rt),
        Command::Extract(j) => stages::extract(&j, &rt),
        Command::Train(j) => stages::train(&j, &rt),
        Command::TrainStep(a) => stages::train_step(&a, &rt),
        Command::Export(j) => stages::export(&j, &rt),
        Command::Run(a) => stages::run(&a, &rt),
        Command::Eval(j) => stages::eval(&j, &rt),
        Command::Push(a) => push::run(a),
    }
}
