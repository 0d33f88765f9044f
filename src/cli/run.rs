//! `specforge-rs run RECIPE`: regenerate → vocab → (extract → train → delete) per chunk → export → eval.

use std::path::PathBuf;

use clap::Args;

use crate::config::recipe::Recipe;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The recipe (TOML; unknown keys are errors).
    recipe: PathBuf,
    /// Run directory (resumed when it exists); default runs/<recipe name>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a recipe field: `--set train.lr=2e-4` (repeatable).
    #[arg(long = "set")]
    overrides: Vec<String>,
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let recipe = Recipe::load(&a.recipe, &a.overrides)?;
    let name = a.recipe.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let out = a.out.unwrap_or_else(|| PathBuf::from("runs").join(name));
    let s = crate::pipeline::run(&recipe, &out)?;
    println!("run: {} optimizer steps; head exported to {}", s.steps, s.export_dir.display());
    if let (Some(t), Some(u)) = (&s.trained, &s.untrained) {
        println!(
            "run: mean acceptance length at k = {} on held-out prompts: trained {:.3}, untrained {:.3} (per-position {:?} vs {:?})",
            s.k,
            t.mean_acceptance_length(),
            u.mean_acceptance_length(),
            t.per_position_rate().iter().map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
            u.per_position_rate().iter().map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>()
        );
    }
    println!("run: report {}, model card {}", out.join("summary.json").display(), s.export_dir.join("README.md").display());
    Ok(())
}
