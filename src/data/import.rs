//! `import`: answers generated elsewhere (an OpenAI-compatible server such as vLLM) joined with
//! their prompts into a conversation dataset.
//!
//! A response line may be:
//! - an OpenAI Batch API output line (what `vllm run-batch` writes):
//!   `{"custom_id", "response": {"status_code", "body": <chat.completion>}, "error"}`;
//! - a bare `chat.completion` object (`{"id", "choices": [{"message"}]}`);
//! - either of those with the prompt inline: `messages`, `request.messages` or
//!   `request.body.messages`.
//!
//! Prompts not inline come from `--requests`, joined on `custom_id` (or `id`): OpenAI batch input
//! lines `{"custom_id", "body": {"messages"}}` or dataset lines `{"id", "messages"}`. A trailing
//! assistant message of the prompt is replaced by the answer. Failed requests (`error` set, a
//! status other than 200, no `choices[0].message`) are bad lines of kind `failed_response`.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

use serde_json::{json, Value as Json};

use super::{parse_line, BadKind, Conversation, Report};
use crate::error::{Error, Result};

/// An imported conversation and the server's `finish_reason` for its answer.
pub type Imported = (Conversation, Option<String>);

fn messages_of(v: &Json) -> Option<&Json> {
    v.get("messages")
        .or_else(|| v.get("body").and_then(|b| b.get("messages")))
        .or_else(|| v.get("request").and_then(|r| r.get("messages")))
        .or_else(|| v.get("request").and_then(|r| r.get("body")).and_then(|b| b.get("messages")))
        .filter(|m| m.is_array())
}

fn key_of(v: &Json) -> Option<String> {
    match v.get("custom_id").or_else(|| v.get("id")) {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads a requests file into `key -> messages`.
pub fn read_requests(path: &Path) -> Result<HashMap<String, Json>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = HashMap::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Json = serde_json::from_str(&line).map_err(|e| Error::Dataset {
            path: path.to_path_buf(),
            line: n + 1,
            message: format!("invalid JSON: {e}"),
        })?;
        let (Some(k), Some(m)) = (key_of(&v), messages_of(&v)) else {
            return Err(Error::Dataset {
                path: path.to_path_buf(),
                line: n + 1,
                message: "a request needs `custom_id` (or `id`) and `body.messages` (or `messages`)".into(),
            });
        };
        out.insert(k, m.clone());
    }
    Ok(out)
}

/// One response line to a dataset line `{"id", "messages"}`, or the reason it is bad.
fn convert(v: &Json, line: usize, requests: &HashMap<String, Json>) -> std::result::Result<(Json, Option<String>), (BadKind, String)> {
    if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
        return Err((BadKind::FailedResponse, format!("the request failed: {e}")));
    }
    let resp = v.get("response").filter(|r| !r.is_null());
    if let Some(code) = resp.and_then(|r| r.get("status_code")).and_then(Json::as_i64) {
        if code != 200 {
            return Err((BadKind::FailedResponse, format!("status_code {code}")));
        }
    }
    let completion = resp.map(|r| r.get("body").unwrap_or(r)).unwrap_or(v);
    let choice = completion
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| (BadKind::FailedResponse, "no `choices[0]` in the response".to_string()))?;
    let answer = match choice.get("message").and_then(|m| m.get("content")) {
        Some(Json::String(s)) => s.clone(),
        other => {
            return Err((
                BadKind::FailedResponse,
                format!("`choices[0].message.content` is not a string (saw {})", other.map_or("nothing".into(), Json::to_string)),
            ))
        }
    };
    let finish = choice.get("finish_reason").and_then(Json::as_str).map(str::to_string);
    let key = key_of(v);
    let prompt = messages_of(v).cloned().or_else(|| key.as_ref().and_then(|k| requests.get(k)).cloned()).ok_or_else(|| {
        (
            BadKind::NoConversation,
            format!(
                "no prompt: the line has no `messages` and {} (give --requests with the batch input, joined on custom_id)",
                key.as_ref().map_or("no custom_id".to_string(), |k| format!("custom_id `{k}` is not in --requests"))
            ),
        )
    })?;
    let mut msgs = prompt.as_array().cloned().unwrap_or_default();
    while msgs
        .last()
        .and_then(|m| m.get("role").or_else(|| m.get("from")))
        .and_then(Json::as_str)
        .is_some_and(|r| r == "assistant" || r == "gpt")
    {
        msgs.pop();
    }
    msgs.push(json!({"role": "assistant", "content": answer}));
    let id = key.unwrap_or_else(|| format!("line-{line}"));
    Ok((json!({"id": id, "messages": msgs}), finish))
}

/// Imports `responses` (joined with `requests` when given). Returns the conversations in
/// response order, each with the server's `finish_reason`, and the report of bad lines.
pub fn import(responses: &Path, requests: Option<&Path>) -> Result<(Vec<Imported>, Report)> {
    let reqs = match requests {
        Some(p) => read_requests(p)?,
        None => HashMap::new(),
    };
    let base = responses.parent().map(Path::to_path_buf).unwrap_or_else(|| ".".into());
    let f = std::fs::File::open(responses).map_err(|e| Error::io(responses, e))?;
    let mut report = Report { path: responses.to_path_buf(), ..Default::default() };
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut reader = std::io::BufReader::new(f);
    let mut raw = Vec::new();
    let mut n = 0usize;
    loop {
        raw.clear();
        if reader.read_until(b'\n', &mut raw).map_err(|e| Error::io(responses, e))? == 0 {
            break;
        }
        n += 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        report.total += 1;
        let Ok(text) = std::str::from_utf8(&raw) else {
            report.push(n, BadKind::InvalidUtf8, "not UTF-8");
            continue;
        };
        let v: Json = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                report.push(n, BadKind::InvalidJson, format!("invalid JSON: {e}"));
                continue;
            }
        };
        let (line_json, finish) = match convert(&v, n, &reqs) {
            Ok(x) => x,
            Err((k, r)) => {
                report.push(n, k, r);
                continue;
            }
        };
        match parse_line(&line_json.to_string(), n, &base) {
            Ok(c) => {
                if seen.insert(c.id.clone()) {
                    out.push((c, finish));
                } else {
                    report.push(n, BadKind::DuplicateId, format!("id `{}` already imported from an earlier line", c.id));
                }
            }
            Err((k, r)) => report.push(n, k, r),
        }
    }
    report.sort();
    Ok((out, report))
}
