//! The model card (`README.md`) written beside an exported head: what it is for, how to serve it
//! with vLLM and SGLang, the acceptance it measured, and the recipe that produced it. It is a run
//! report, so it lives here, above export, train and eval, whose facts it joins.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::{DraftVariant, Recipe};
use crate::error::Result;
use crate::eval::SpecStats;
use crate::target::registry::KNOWN_TARGETS;
use crate::train::trainer::StepMetrics;
use crate::util::fs::write_atomic;
use crate::util::plot::{line_chart, Series};

/// What a card reports besides the recipe.
#[derive(Debug, Clone, Default)]
pub struct CardFacts {
    /// The head's aux ids (our numbering).
    pub aux_layer_ids: Vec<i64>,
    /// Optimizer steps trained.
    pub steps: u64,
    /// The last step's training metrics.
    pub last: Option<StepMetrics>,
    /// Held-out acceptance of the trained head, when measured.
    pub trained: Option<SpecStats>,
    /// Held-out acceptance of an untrained head with the same initialisation, when measured.
    pub untrained: Option<SpecStats>,
    /// Draft tokens per step (the evaluation's, and the serving commands').
    pub k: usize,
}

fn rates(s: &SpecStats) -> String {
    s.per_position_rate().iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(" / ")
}

/// Training curves (loss; acc_0 and simulated acceptance length) and the evaluation's
/// per-position acceptance, as PNG files in `dir`; returns (file, caption) pairs.
fn plots(dir: &Path, summary: &CardFacts, metrics: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let steps: Vec<StepMetrics> =
        std::fs::read_to_string(metrics).map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()).unwrap_or_default();
    if !steps.is_empty() {
        let xy = |f: &dyn Fn(&StepMetrics) -> f64| steps.iter().map(|m| (m.step as f64, f(m))).collect::<Vec<_>>();
        line_chart(
            &dir.join("training_loss.png"),
            "training loss (sum over TTT steps of 0.8^k KL_k)",
            "optimizer step",
            "loss",
            &[Series { name: "loss".into(), points: xy(&|m| m.loss) }],
        )?;
        out.push(("training_loss.png".into(), "training loss".into()));
        line_chart(
            &dir.join("training_acceptance.png"),
            "training batches: acc_0 and simulated acceptance length",
            "optimizer step",
            "value",
            &[
                Series { name: "acc_0".into(), points: xy(&|m| m.acc.first().copied().unwrap_or(0.0)) },
                Series { name: "sim. accept len".into(), points: xy(&|m| m.sim_accept_len) },
            ],
        )?;
        out.push(("training_acceptance.png".into(), "acceptance on training batches".into()));
    }
    if let (Some(t), Some(u)) = (&summary.trained, &summary.untrained) {
        let pos = |s: &SpecStats| s.per_position_rate().iter().enumerate().map(|(i, r)| (i as f64 + 1.0, *r)).collect::<Vec<_>>();
        line_chart(
            &dir.join("acceptance.png"),
            "held-out acceptance: fraction of steps accepting at least i drafts",
            "draft position i",
            "rate",
            &[Series { name: "trained".into(), points: pos(t) }, Series { name: "untrained".into(), points: pos(u) }],
        )?;
        out.push(("acceptance.png".into(), "per-position acceptance, trained vs untrained".into()));
    }
    Ok(out)
}

/// Writes `dir/README.md` (and `dir/training_metrics.jsonl`, a copy of the training log).
pub fn write(dir: &Path, recipe: &Recipe, summary: &CardFacts, metrics: &Path) -> Result<()> {
    let repo = KNOWN_TARGETS.iter().find(|k| k.name == recipe.target.name).map_or(recipe.target.name.as_str(), |k| k.repo);
    let variant = if recipe.draft.variant == DraftVariant::Eagle31 { "EAGLE-3.1" } else { "EAGLE-3" };
    let mut s = String::new();
    let _ = writeln!(s, "---\nbase_model: {repo}\ntags:\n- speculative-decoding\n- eagle3\n- specforge-rs\n---\n");
    let _ = writeln!(s, "# {variant} draft head for {repo}\n");
    let _ = writeln!(
        s,
        "A speculative-decoding draft head trained with specforge-rs on the target's own answers \
         (TTT-{} forward KL, loss weight {}^k). The target verifies every drafted token, so outputs are unchanged.\n",
        recipe.train.ttt_steps, recipe.train.step_decay
    );
    let _ = writeln!(s, "## Usage\n\nvLLM:\n\n```bash\nvllm serve {repo} --speculative-config '{{\"method\": \"eagle3\", \"model\": \"<this repo>\", \"num_speculative_tokens\": {}}}'\n```\n", summary.k);
    let _ = writeln!(
        s,
        "SGLang:\n\n```bash\npython -m sglang.launch_server --model-path {repo} --speculative-algorithm EAGLE3 \\\n    --speculative-draft-model-path <this repo> --speculative-num-steps {} --speculative-eagle-topk 1 --speculative-num-draft-tokens {}\n```\n",
        summary.k,
        summary.k + 1
    );
    let _ = writeln!(
        s,
        "Aux hidden states: ids {:?} in vLLM's numbering (the residual stream entering target layer k; `eagle_aux_hidden_state_layer_ids`), \
         {:?} in SGLang's (`eagle_config`). Draft vocabulary: {} tokens (`d2t` maps them to target ids).\n",
        summary.aux_layer_ids,
        summary.aux_layer_ids.iter().map(|k| k - 1).collect::<Vec<_>>(),
        recipe.draft.draft_vocab_size,
    );
    let _ = writeln!(s, "## Acceptance (held-out prompts, greedy, chain of {} drafts)\n", summary.k);
    match (&summary.trained, &summary.untrained) {
        (Some(t), Some(u)) => {
            let _ = writeln!(s, "| head | mean acceptance length | per-position acceptance | draft acceptance rate | drafts |");
            let _ = writeln!(s, "|---|---|---|---|---|");
            for (name, st) in [("trained", t), ("untrained (same init)", u)] {
                let _ = writeln!(
                    s,
                    "| {name} | {:.3} | {} | {:.3} | {} |",
                    st.mean_acceptance_length(),
                    rates(st),
                    st.draft_acceptance_rate(),
                    st.num_drafts
                );
            }
            let _ = writeln!(s, "\nMean acceptance length = 1 + accepted / drafts (vLLM's definition, the bonus token included).\n");
        }
        _ => {
            let _ = writeln!(s, "Not measured yet: `specforge-rs eval --draft <this directory>` measures it, and `run` does when the recipe has `data.eval_path`.\n");
        }
    }
    if let Some(m) = &summary.last {
        let acc: Vec<String> = m.acc.iter().map(|a| format!("{a:.3}")).collect();
        let _ = writeln!(
            s,
            "## Training\n\n{} optimizer steps; last step: loss {:.4}, acc_k {}, simulated acceptance length {:.3}. \
             The full log is `training_metrics.jsonl`.\n",
            summary.steps,
            m.loss,
            acc.join(" / "),
            m.sim_accept_len
        );
    }
    let plots = plots(dir, summary, metrics)?;
    if !plots.is_empty() {
        let _ = writeln!(s, "## Curves\n");
        for (file, caption) in &plots {
            let _ = writeln!(s, "![{caption}]({file})\n");
        }
    }
    let _ = writeln!(s, "## Recipe\n\n```toml\n{}```", recipe.to_toml());
    write_atomic(&dir.join("README.md"), s.as_bytes())?;
    let mut written: Vec<String> = plots.iter().map(|(f, _)| f.clone()).collect();
    written.push("README.md".into());
    if metrics.exists() {
        write_atomic(&dir.join("training_metrics.jsonl"), &crate::error::read_bytes(metrics)?)?;
        written.push("training_metrics.jsonl".into());
    }
    crate::export::record_files(dir, &written.iter().map(String::as_str).collect::<Vec<_>>(), false)
}
