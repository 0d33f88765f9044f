//! `specforge-rs import`: answers generated elsewhere (OpenAI-compatible JSONL, e.g. from a vLLM
//! server or `vllm run-batch`) joined with their prompts into a dataset.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::data::import::import;

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Responses: OpenAI batch output lines, chat.completion objects, or either with the prompt.
    #[arg(long)]
    responses: PathBuf,
    /// Requests (OpenAI batch input or dataset lines with `id`), joined on custom_id.
    #[arg(long)]
    requests: Option<PathBuf>,
    /// Output dataset (JSONL, `{"id", "messages"}`), written atomically.
    #[arg(long)]
    out: PathBuf,
    /// Stop when more than this fraction of responses is bad.
    #[arg(long, default_value_t = 0.05)]
    max_bad_fraction: f64,
    /// Where the bad-line report goes (default: OUT.bad-lines.jsonl).
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn run(a: ImportArgs) -> anyhow::Result<()> {
    let (convs, report) = import(&a.responses, a.requests.as_deref())?;
    let report_path = a.report.clone().unwrap_or_else(|| {
        let mut p = a.out.clone().into_os_string();
        p.push(".bad-lines.jsonl");
        p.into()
    });
    report.check(a.max_bad_fraction, &report_path, true)?;
    let mut text = String::new();
    let mut truncated = 0;
    for (c, finish) in &convs {
        let mut v = c.to_openai_json();
        if let Some(o) = v.as_object_mut() {
            o.insert("meta".into(), json!({"generator": "import", "finish_reason": finish}));
        }
        truncated += usize::from(finish.as_deref() == Some("length"));
        text.push_str(&v.to_string());
        text.push('\n');
    }
    crate::util::fs::write_atomic(&a.out, text.as_bytes())?;
    println!(
        "import: {} conversations -> {} ({} bad lines, {} answers cut by the server's max_tokens)",
        convs.len(),
        a.out.display(),
        report.bad.len(),
        truncated
    );
    Ok(())
}
