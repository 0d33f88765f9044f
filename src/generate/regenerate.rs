//! On-policy data: the target writes the assistant turns of a conversation dataset itself.
//!
//! Turn by turn, as SpecForge's `regenerate_train_data.py` does: every user (or tool) message that
//! is followed by an assistant message, or ends the conversation, gets an answer generated from
//! the history so far — with the *regenerated* earlier answers, so the whole conversation is the
//! target's own. Given assistant turns are replaced.
//!
//! # Resume
//! The output is append-only JSONL keyed by sample id. Conversations are processed in fixed
//! batches (batch k = conversations `[k·B, (k+1)·B)` of the input, after the bad lines are
//! dropped), each batch's lines appended with one write once the batch is done. A rerun reads the
//! output, drops a torn last line, and recomputes only batches with a missing id — with the same
//! composition and the same per-batch seed (`seed + k`), so the answers are the ones an
//! uninterrupted run writes. If a torn batch left the file out of input order, it is rewritten in
//! input order at the end; the final file equals an uninterrupted run's byte for byte.
//!
//! A conversation whose *first* prompt is longer than `--max-len` is a bad line; one whose later
//! prompt outgrows it is cut after the last answer that fit (and written).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value as Json};
use tch::Device;

use super::{generate, GenerateOptions};
use crate::config::{DataConfig, RegenerateConfig, TargetSpec};
use crate::data::{BadKind, Conversation, Message, Role};
use crate::data::{RenderOptions, Report, Tokenizer};
use crate::error::{Error, Result};
use crate::runtime::{side_file, LoadedTarget, Runtime};
use crate::target::TargetModel;

/// `specforge-rs regenerate`: the stage's whole input.
#[derive(clap::Args, Debug, Clone)]
pub struct RegenerateJob {
    /// The target.
    #[command(flatten)]
    pub target: TargetSpec,
    /// Conversations (JSONL); their assistant turns, if any, are replaced.
    #[arg(long)]
    pub data: PathBuf,
    /// Output JSONL (appended to; a rerun skips the ids already there).
    #[arg(long)]
    pub out: PathBuf,
    /// Where the bad-line report goes (JSONL); default `<out>.bad-lines.jsonl`.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// How the dataset is read.
    #[command(flatten)]
    pub dataset: DataConfig,
    /// Decoding.
    #[command(flatten)]
    pub decode: RegenerateConfig,
}

/// Runs `regenerate` with its own target.
pub fn run(job: &RegenerateJob, rt: &Runtime) -> Result<RegenerateStats> {
    run_on(&LoadedTarget::open(&job.target, rt)?, job, rt)
}

/// Runs `regenerate` on an opened target (the model loads only once the data is known good).
pub fn run_on(target: &LoadedTarget, job: &RegenerateJob, rt: &Runtime) -> Result<RegenerateStats> {
    job.decode.validate().map_err(|(f, m)| Error::config("regenerate", f, m))?;
    let (mut convs, mut report) = crate::data::read_jsonl(&job.data, &Default::default())?;
    if let Some(n) = job.dataset.limit {
        convs.truncate(n);
    }
    if same_file(&job.data, &job.out) {
        return Err(Error::config(
            "regenerate",
            "out",
            format!("{} is the input (--data) itself: the answers go to a new file", job.out.display()),
        ));
    }
    let report_path = job.report.clone().unwrap_or_else(|| side_file(&job.out, ".bad-lines.jsonl"));
    let d = &job.decode;
    let opts = RegenerateOptions {
        gen: GenerateOptions { max_new_tokens: d.max_new_tokens, stop_ids: target.stop_ids(), temperature: d.temperature, top_p: d.top_p },
        batch_size: d.batch_size,
        seed: d.seed,
        max_len: job.dataset.max_len,
        multimodal: target.spec.multimodal,
        target_name: target.spec.name.clone(),
        config_hash: target.cfg.config_hash.clone(),
    };
    // Bad lines (parse errors and prompts that cannot be answered) are all known before the
    // weights load, so the threshold stops a bad run before it costs anything.
    let todo = select(&target.tok, &convs, &opts, &mut report);
    report.check(job.dataset.max_bad_fraction, &report_path, rt.prints)?;
    let stats = regenerate(target.model()?, &target.tok, &todo, &job.out, &opts, rt.device)?;
    if stats.written + stats.resumed == 0 {
        return Err(Error::Input(format!("{}: nothing was regenerated (see {})", job.data.display(), report_path.display())));
    }
    Ok(stats)
}

/// Whether two paths name one existing file (through links and relative spellings).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// How to regenerate.
#[derive(Debug, Clone)]
pub struct RegenerateOptions {
    /// Decoding: max new tokens per answer, stop ids, temperature, top-p.
    pub gen: GenerateOptions,
    /// Conversations per batch.
    pub batch_size: usize,
    /// Sampling seed (batch k uses `seed + k`).
    pub seed: i64,
    /// Longest prompt in tokens.
    pub max_len: usize,
    /// Whether the target takes images.
    pub multimodal: bool,
    /// Who generated (recorded in every line's `meta`).
    pub target_name: String,
    /// The target's config hash (recorded and checked on resume).
    pub config_hash: String,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RegenerateStats {
    /// Conversations written in this run.
    pub written: usize,
    /// Conversations a previous run had already written.
    pub resumed: usize,
    /// New tokens generated in this run.
    pub new_tokens: usize,
    /// Seconds.
    pub secs: f64,
}

/// The `meta` object of a line; a resume must find the same one.
fn meta(opts: &RegenerateOptions) -> Json {
    json!({
        "generator": "specforge-rs regenerate",
        "target": opts.target_name,
        "config_hash": opts.config_hash,
        "temperature": opts.gen.temperature,
        "top_p": opts.gen.top_p,
        "max_new_tokens": opts.gen.max_new_tokens,
        "seed": opts.seed,
        "batch_size": opts.batch_size,
    })
}

/// Message indices after which an answer is generated: user / tool messages followed by an
/// assistant message or ending the conversation.
fn answer_points(c: &Conversation) -> Vec<usize> {
    let m = &c.messages;
    (0..m.len())
        .filter(|&i| matches!(m[i].role, Role::User | Role::Tool) && m.get(i + 1).is_none_or(|n| n.role == Role::Assistant))
        .collect()
}

/// The conversation without its assistant turns, up to and including message `upto`.
fn history(c: &Conversation, upto: usize) -> Vec<Message> {
    c.messages[..=upto].iter().filter(|m| m.role != Role::Assistant).cloned().collect()
}

fn render_prompt(tok: &Tokenizer, msgs: &[Message], tools: Option<&Json>) -> Result<Vec<i64>> {
    let json = Json::Array(msgs.iter().map(Message::to_template_json).collect());
    let text =
        tok.apply_chat_template_with(&json, RenderOptions { add_generation_prompt: true, tools: tools.cloned(), ..Default::default() })?;
    tok.encode(&text, false)
}

/// Reads an existing output: the ids done and their line text. A torn last line (a kill
/// mid-write) is cut off the file.
fn read_done(out: &Path, want_meta: &Json) -> Result<Vec<(String, String)>> {
    let mut f = match std::fs::OpenOptions::new().read(true).write(true).open(out) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(out, e)),
    };
    let mut reader = std::io::BufReader::new(&mut f);
    let mut done = Vec::new();
    let mut good_len = 0u64;
    let mut line = Vec::new();
    let mut n = 0usize;
    loop {
        line.clear();
        let k = reader.read_until(b'\n', &mut line).map_err(|e| Error::io(out, e))?;
        if k == 0 {
            break;
        }
        n += 1;
        if line.last() != Some(&b'\n') {
            // Only a line we were writing when killed may be cut: it starts as every line we
            // write does. Anything else is someone's file.
            if !line.starts_with(b"{\"id\"") {
                return Err(Error::Dataset {
                    path: out.to_path_buf(),
                    line: n,
                    message: "the last line has no newline and is not a line `regenerate` writes: this file is not its output; refusing to modify it (choose another --out)".into(),
                });
            }
            tracing::warn!(file = %out.display(), line = n, "dropping a torn last line (interrupted write)");
            break;
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let v: Json = serde_json::from_str(&text).map_err(|e| Error::Dataset {
            path: out.to_path_buf(),
            line: n,
            message: format!("not a regenerate output line: {e}"),
        })?;
        let id = v.get("id").and_then(Json::as_str).ok_or_else(|| Error::Dataset {
            path: out.to_path_buf(),
            line: n,
            message: "no string `id`".into(),
        })?;
        let Some(have) = v.get("meta") else {
            return Err(Error::Dataset {
                path: out.to_path_buf(),
                line: n,
                message: "has no `meta`: this file is not the output of `regenerate`; refusing to append to it (choose another --out)"
                    .into(),
            });
        };
        if let Some(want) = want_meta.as_object() {
            for (k, w) in want {
                if have.get(k) != Some(w) {
                    return Err(Error::config(
                        out,
                        format!("meta.{k}"),
                        format!(
                            "is {} in the existing output (line {n}) but {w} in this run: write to a new --out or use the same settings",
                            have.get(k).map_or("absent".into(), Json::to_string)
                        ),
                    ));
                }
            }
        }
        done.push((id.to_string(), text));
        good_len += k as u64;
    }
    drop(reader);
    if f.metadata().map_err(|e| Error::io(out, e))?.len() != good_len {
        f.set_len(good_len).map_err(|e| Error::io(out, e))?;
    }
    Ok(done)
}

/// The up-front checks: which conversations get regenerated at all. Conversations without a
/// user turn, with images on a text-only target, or whose first prompt does not fit `max_len` go
/// to `report`. Deciding this before any generation keeps the batch composition (and with it
/// every answer) the same on every rerun, and lets the caller apply the bad-line threshold
/// before spending any compute.
pub fn select<'a>(tok: &Tokenizer, convs: &'a [Conversation], opts: &RegenerateOptions, report: &mut Report) -> Vec<&'a Conversation> {
    let mut todo: Vec<&Conversation> = Vec::with_capacity(convs.len());
    for c in convs {
        let points = answer_points(c);
        let Some(&first) = points.first() else {
            report.push(c.line, BadKind::NoAssistant, "no user turn to answer");
            continue;
        };
        if c.has_images() && !opts.multimodal {
            report.push(c.line, BadKind::ImagesUnsupported, "the conversation has images but the target is text-only");
            continue;
        }
        match render_prompt(tok, &history(c, first), c.tools.as_ref()) {
            Ok(ids) if ids.len() >= opts.max_len => {
                report.push(c.line, BadKind::OverLong, format!("the prompt is {} tokens, --max-len is {}", ids.len(), opts.max_len))
            }
            Ok(_) => todo.push(c),
            Err(e) => report.push(c.line, BadKind::Template, e.to_string()),
        }
    }
    report.sort();
    todo
}

/// Regenerates the assistant turns of `todo` (from [`select`]) into `out` (JSONL, one
/// `{"id", "messages", "meta"}` per conversation, in input order).
pub fn regenerate(
    model: &dyn TargetModel,
    tok: &Tokenizer,
    todo: &[&Conversation],
    out: &Path,
    opts: &RegenerateOptions,
    device: Device,
) -> Result<RegenerateStats> {
    let start = Instant::now();
    let want_meta = meta(opts);
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let existing = read_done(out, &want_meta)?;
    let done: HashSet<String> = existing.iter().map(|(id, _)| id.clone()).collect();
    let known: HashSet<&str> = todo.iter().map(|c| c.id.as_str()).collect();
    let strangers = existing.iter().filter(|(id, _)| !known.contains(id.as_str())).count();
    if strangers > 0 {
        tracing::warn!(file = %out.display(), "{strangers} lines of the existing output have ids not in this dataset; kept");
    }
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(out).map_err(|e| Error::io(out, e))?;
    let mut stats = RegenerateStats { resumed: todo.iter().filter(|c| done.contains(&c.id)).count(), ..Default::default() };
    let pb = crate::util::progress::bar(todo.len() as u64, "regenerate");
    pb.inc(stats.resumed as u64);
    let bs = opts.batch_size.max(1);
    for (k, batch) in todo.chunks(bs).enumerate() {
        if batch.iter().all(|c| done.contains(&c.id)) {
            continue;
        }
        tch::manual_seed(opts.seed.wrapping_add(k as i64));
        let points: Vec<Vec<usize>> = batch.iter().map(|c| answer_points(c)).collect();
        // The regenerated conversation so far, and where it stopped (None: still going).
        let mut convo: Vec<Vec<Message>> = vec![Vec::new(); batch.len()];
        let mut finish: Vec<Vec<&'static str>> = vec![Vec::new(); batch.len()];
        let mut new_tokens: Vec<Vec<usize>> = vec![Vec::new(); batch.len()];
        let mut alive: Vec<bool> = vec![true; batch.len()];
        let rounds = points.iter().map(Vec::len).max().unwrap_or(0);
        for r in 0..rounds {
            let mut rows = Vec::new();
            let mut prompts = Vec::new();
            for (i, c) in batch.iter().enumerate() {
                if !alive[i] || r >= points[i].len() {
                    continue;
                }
                // New non-assistant messages since the previous answer point.
                let from = if r == 0 { 0 } else { points[i][r - 1] + 1 };
                let upto = points[i][r];
                convo[i].extend(c.messages[from..=upto].iter().filter(|m| m.role != Role::Assistant).cloned());
                let ids = render_prompt(tok, &convo[i], c.tools.as_ref())?;
                if ids.len() >= opts.max_len {
                    // Keep what fit: drop the messages that outgrew --max-len.
                    let keep = convo[i].iter().rposition(|m| m.role == Role::Assistant).map_or(0, |p| p + 1);
                    convo[i].truncate(keep);
                    alive[i] = false;
                    tracing::debug!(id = %c.id, round = r, "prompt outgrew --max-len; conversation cut");
                    continue;
                }
                rows.push(i);
                prompts.push(ids);
            }
            if prompts.is_empty() {
                continue;
            }
            let answers = generate(model, &prompts, &opts.gen, device)?;
            for (&i, ans) in rows.iter().zip(&answers) {
                let stopped = ans.last().is_some_and(|t| opts.gen.stop_ids.contains(t));
                let body = if stopped { &ans[..ans.len() - 1] } else { &ans[..] };
                let text = tok.decode(body, true)?;
                // Kept verbatim (no trimming): the text is what the target said, as a server returns it.
                convo[i].push(Message::text(Role::Assistant, text));
                finish[i].push(if stopped { "stop" } else { "length" });
                new_tokens[i].push(ans.len());
                stats.new_tokens += ans.len();
            }
        }
        let mut buf = String::new();
        for (i, c) in batch.iter().enumerate() {
            if done.contains(&c.id) {
                continue;
            }
            let conv = Conversation { line: c.line, id: c.id.clone(), messages: convo[i].clone(), tools: c.tools.clone() };
            let mut v = conv.to_openai_json();
            if let Some(o) = v.as_object_mut() {
                let mut m = want_meta.clone();
                if let Some(mo) = m.as_object_mut() {
                    mo.insert("finish".into(), json!(finish[i]));
                    mo.insert("new_tokens".into(), json!(new_tokens[i]));
                }
                o.insert("meta".into(), m);
            }
            buf.push_str(&v.to_string());
            buf.push('\n');
            stats.written += 1;
        }
        // One write per batch, then fsync: a kill leaves whole batches (or a torn last line,
        // which the rerun drops).
        file.write_all(buf.as_bytes()).map_err(|e| Error::io(out, e))?;
        file.sync_data().map_err(|e| Error::io(out, e))?;
        pb.inc(batch.iter().filter(|c| !done.contains(&c.id)).count() as u64);
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        pb.set_message(format!("{:.1} tok/s", stats.new_tokens as f64 / secs));
    }
    pb.finish_and_clear();
    drop(file);
    canonical_order(out, todo)?;
    stats.secs = start.elapsed().as_secs_f64();
    Ok(stats)
}

/// Rewrites `out` in input order if a resumed torn batch left it out of order.
fn canonical_order(out: &Path, todo: &[&Conversation]) -> Result<()> {
    let f = std::fs::File::open(out).map_err(|e| Error::io(out, e))?;
    let mut lines: Vec<(String, String)> = Vec::new();
    for (n, l) in std::io::BufReader::new(f).lines().enumerate() {
        let l = l.map_err(|e| Error::io(out, e))?;
        let id = serde_json::from_str::<Json>(&l)
            .ok()
            .and_then(|v| v.get("id").and_then(Json::as_str).map(str::to_string))
            .ok_or_else(|| Error::Dataset { path: out.to_path_buf(), line: n + 1, message: "no string `id`".into() })?;
        lines.push((id, l));
    }
    let rank: HashMap<&str, usize> = todo.iter().enumerate().map(|(i, c)| (c.id.as_str(), i)).collect();
    let key = |id: &str| rank.get(id).copied().unwrap_or(usize::MAX);
    if lines.windows(2).all(|w| key(&w[0].0) <= key(&w[1].0)) {
        return Ok(());
    }
    tracing::info!(file = %out.display(), "restoring input order after a resumed batch");
    // Stable: lines of unknown ids keep their relative order at the end.
    lines.sort_by_key(|(id, _)| key(id));
    let mut text = String::new();
    for (_, l) in &lines {
        text.push_str(l);
        text.push('\n');
    }
    crate::util::fs::write_atomic(out, text.as_bytes())
}
