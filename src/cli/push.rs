//! `specforge-rs push`: an export directory → a Hugging Face model repo, in one commit.

use std::path::PathBuf;

use clap::Args;

use crate::push::{self, Hub, PushOptions, RepoId};
use crate::util::bytes::human;

#[derive(Args, Debug)]
pub struct PushArgs {
    /// The export directory (`export --out`, or `runs/NAME/export` from `run`).
    dir: PathBuf,
    /// The target repo, `ORG/NAME` (a user or an organization); created if missing.
    #[arg(long)]
    repo: String,
    /// The branch to commit to (it must exist; `main` does in any repo).
    #[arg(long, default_value = "main")]
    revision: String,
    /// Create the repo private (an existing repo keeps its visibility).
    #[arg(long)]
    private: bool,
    /// The commit message.
    #[arg(long)]
    message: Option<String>,
    /// List what would be uploaded (regular or LFS by a local rule) and where; send nothing,
    /// need no token.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(a: PushArgs) -> anyhow::Result<()> {
    let repo: RepoId = a.repo.parse()?;
    push::check_revision(&a.revision)?;
    push::check_export(&a.dir)?;
    let endpoint = push::endpoint_from_env();
    let target = format!("{endpoint}/{repo} (revision {})", a.revision);
    let message = a.message.unwrap_or_else(|| "Upload EAGLE-3 draft head (specforge-rs)".to_string());
    if a.dry_run {
        let listing = push::collect(&a.dir)?;
        let total: u64 = listing.files.iter().map(|f| f.size).sum();
        println!("dry run: would push {} files ({}) from {} to {target}", listing.files.len(), human(total), a.dir.display());
        println!("  the repo would be created {} if missing; commit message: {message:?}", if a.private { "private" } else { "public" });
        for f in &listing.files {
            println!("  {:<8} {:>10}  {}", push::local_mode(f)?.to_string(), human(f.size), f.path);
        }
        for s in &listing.skipped {
            println!("  skipped  {s} (hidden or a symlink)");
        }
        if !listing.left_out.is_empty() {
            println!("  files the last export did not write (stale, or added by hand) are left out:");
        }
        for s in &listing.left_out {
            println!("  left out {s}");
        }
        println!("nothing was sent (regular / lfs is the local rule; the Hub decides on a real push)");
        return Ok(());
    }
    let (token, source) = push::find_token()?;
    tracing::info!("token from {source}");
    let hub = Hub::new(&endpoint, token)?;
    tracing::info!("pushing {} to {target}", a.dir.display());
    println!(
        "push: to {target}; if the repo does not exist it is created {}",
        if a.private { "PRIVATE" } else { "PUBLIC (use --private to keep it private)" }
    );
    let opts = PushOptions { repo, revision: a.revision, private: a.private, message };
    let done = push::push(&a.dir, &opts, &hub)?;
    for (f, mode) in &done.files {
        println!("  {:<8} {:>10}  {}", mode.to_string(), human(f.size), f.path);
    }
    for p in &done.ignored {
        println!("  ignored  {p} (the repo's .gitignore)");
    }
    println!(
        "pushed {} files to {target}{}: {} LFS sent, {} LFS object(s) already there",
        done.files.len(),
        if done.created { ", new repo" } else { "" },
        human(done.lfs_bytes_sent),
        done.lfs_already_present
    );
    println!("commit: {}", done.commit_url);
    Ok(())
}
