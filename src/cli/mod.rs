//! The command line: one subcommand per pipeline stage.

mod data_args;
mod extract;
mod generate;
mod import;
mod regenerate;
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
    /// The target writes the assistant turns of a dataset itself (on-policy data); resumable.
    Regenerate(regenerate::RegenerateArgs),
    /// Join answers generated elsewhere (OpenAI-format JSONL, e.g. vLLM) with their prompts.
    Import(import::ImportArgs),
    /// Draft vocabulary (d2t / t2d) from loss-masked token frequencies.
    Vocab(vocab::VocabArgs),
    /// Frozen target forward over a dataset: aux + final hidden states into feature shards.
    Extract(extract::ExtractArgs),
}

/// Parses the command line and runs it.
pub fn main() -> anyhow::Result<()> {
    // Before any tensor exists: large CPU tensors (feature batches) on huge pages.
    crate::extract::reader::enable_huge_page_allocations();
    let cli = Cli::parse();
    crate::util::logging::init(cli.verbose);
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Regenerate(a) => regenerate::run(a),
        Command::Import(a) => import::run(a),
        Command::Vocab(a) => vocab::run(a),
        Command::Extract(a) => extract::run(a),
    }
}
