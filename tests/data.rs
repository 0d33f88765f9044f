//! Datasets: loss masks against an independent transformers construction, the bad-input corpus,
//! the truncation policy, `import`, and kill -9 during `regenerate`.

mod common;
mod data_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use data_support::*;
use serde_json::{json, Value};
use specforge_rs::data::{read_jsonl, tokenize, BadKind, ReadOptions, TokenizeOptions, Tokenizer, Truncation};

fn smol_tokenizer() -> (Tokenizer, Vec<i64>) {
    let dir = smollm2();
    let cfg = specforge_rs::config::TargetConfig::from_path(&dir).unwrap();
    (Tokenizer::from_dir(&dir).unwrap(), cfg.eos_token_ids)
}

#[test]
fn loss_masks_match_transformers_per_turn_and_generation_tags() {
    let cases = common::root().join("data/loss-mask-cases.jsonl");
    let text = std::fs::read(&cases).unwrap();
    let hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&text));
    let smol = smollm2();
    let refdir = common::reference("loss_mask_reference.py", &[smol.to_str().unwrap(), cases.to_str().unwrap(), &hash]);
    let want: BTreeMap<String, Value> = serde_json::from_str(&std::fs::read_to_string(refdir.join("masks.json")).unwrap()).unwrap();
    let (tok, eos) = smol_tokenizer();
    let (convs, mut report) = read_jsonl(&cases, &ReadOptions::default()).unwrap();
    let samples = tokenize(&convs, &tok, &eos, &TokenizeOptions::default(), &mut report);
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    assert_eq!(samples.len(), want.len());
    for s in &samples {
        let w = &want[&s.id];
        let ids: Vec<i64> = serde_json::from_value(w["input_ids"].clone()).unwrap();
        let mask: Vec<u8> = serde_json::from_value(w["loss_mask"].clone()).unwrap();
        assert_eq!(s.input_ids, ids, "{}: token ids", s.id);
        assert_eq!(s.loss_mask, mask, "{}: loss mask\n text: {:?}", s.id, tok.decode(&s.input_ids, false).unwrap());
    }
    // Spot checks of the policy itself on the multi-turn case: three assistant turns, each
    // supervised from its first content token through <|im_end|>, nothing else.
    let s = samples.iter().find(|s| s.id == "multi-turn").unwrap();
    let spans: Vec<String> = s.loss_mask.split(|&m| m == 0).filter(|r| !r.is_empty()).map(|_| String::new()).collect();
    assert_eq!(spans.len(), 3);
    let masked: Vec<i64> = s.input_ids.iter().zip(&s.loss_mask).filter(|(_, &m)| m == 1).map(|(&t, _)| t).collect();
    let text = tok.decode(&masked, false).unwrap();
    assert_eq!(text, "2 + 2 = 4.<|im_end|>4 × 3 = 12.<|im_end|>You're welcome!<|im_end|>");
}

#[test]
fn sharegpt_and_openai_forms_give_the_same_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.jsonl");
    std::fs::write(
        &p,
        concat!(
            r#"{"id": "a", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}"#,
            "\n",
            r#"{"id": "b", "system": "S", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let (tok, eos) = smol_tokenizer();
    let (convs, mut report) = read_jsonl(&p, &ReadOptions::default()).unwrap();
    let s = tokenize(&convs, &tok, &eos, &TokenizeOptions::default(), &mut report);
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].input_ids, s[1].input_ids);
    assert_eq!(s[0].loss_mask, s[1].loss_mask);
}

#[test]
fn bad_input_corpus_reports_every_line_without_panicking() {
    let corpus = common::root().join("data/bad-corpus/corpus.jsonl");
    let expected: Vec<Value> = std::fs::read_to_string(common::root().join("data/bad-corpus/expected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: std::collections::BTreeSet<&str> = expected.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.len() >= 10, "the corpus covers {} kinds", kinds.len());
    let (tok, eos) = smol_tokenizer();
    let (convs, mut report) = read_jsonl(&corpus, &ReadOptions::default()).unwrap();
    let opts = TokenizeOptions { max_len: 64, ..Default::default() };
    let samples = tokenize(&convs, &tok, &eos, &opts, &mut report);
    let ids: Vec<&str> = samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["good-1", "good-2"]);
    assert_eq!(samples.iter().map(|s| s.line).collect::<Vec<_>>(), [1, 21]);
    assert_eq!(report.total, 21, "the blank line is not counted");
    let got: Vec<(usize, String, String)> = report.bad.iter().map(|b| (b.line, b.kind.name(), b.reason.clone())).collect();
    assert_eq!(got.len(), expected.len(), "{got:#?}");
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g.0 as u64, e["line"].as_u64().unwrap(), "{g:?}");
        assert_eq!(g.1, e["kind"].as_str().unwrap(), "line {}: {}", g.0, g.2);
        let frag = e["reason_contains"].as_str().unwrap();
        assert!(g.2.contains(frag), "line {}: `{}` lacks `{frag}`", g.0, g.2);
    }

    // Through the CLI (`vocab` reads and tokenises without loading weights): the run stops
    // because the bad fraction passes the threshold, says so, and writes the report.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vocab.safetensors");
    let report_path = tmp.path().join("bad.jsonl");
    let args = |frac: &'static str| {
        vec![
            "vocab".to_string(),
            "--data".into(),
            corpus.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--draft-vocab".into(),
            "64".into(),
            "--max-len".into(),
            "64".into(),
            "--report".into(),
            report_path.display().to_string(),
            "--max-bad-fraction".into(),
            frac.into(),
        ]
    };
    let a = args("0.5");
    let o = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("19 of 21 lines are bad") && stderr.contains("--max-bad-fraction 0.5") && stderr.contains("bad.jsonl"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing is written when the run stops");
    let lines: Vec<Value> = std::fs::read_to_string(&report_path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 19);
    for (l, e) in lines.iter().zip(&expected) {
        assert_eq!(l["line"], e["line"]);
        assert_eq!(l["kind"], e["kind"]);
        assert!(l["file"].as_str().unwrap().ends_with("corpus.jsonl"));
    }
    // Below the threshold the run goes on with the good lines.
    let a = args("0.95");
    let stdout = run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stdout.contains("Vd 64"), "{stdout}");
}

#[test]
fn truncation_policy() {
    let (tok, eos) = smol_tokenizer();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.jsonl");
    let long_answer = "many words here ".repeat(30);
    std::fs::write(
        &p,
        format!(
            "{}\n{}\n",
            json!({"id": "long-answer", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": long_answer}]}),
            json!({"id": "long-prompt", "messages": [{"role": "user", "content": "x ".repeat(200)}, {"role": "assistant", "content": "A"}]}),
        ),
    )
    .unwrap();
    let (convs, _) = read_jsonl(&p, &ReadOptions::default()).unwrap();
    let full = {
        let mut r = Default::default();
        tokenize(&convs, &tok, &eos, &TokenizeOptions { max_len: 100_000, ..Default::default() }, &mut r)
    };
    // Truncate: the long answer keeps its first 48 tokens; the long prompt has no assistant
    // token left and is reported.
    let mut r = specforge_rs::data::Report::default();
    let t = tokenize(&convs, &tok, &eos, &TokenizeOptions { max_len: 48, truncation: Truncation::Truncate, ..Default::default() }, &mut r);
    assert_eq!(t.len(), 1);
    assert!(t[0].truncated && t[0].input_ids.len() == 48);
    assert_eq!(t[0].input_ids, full[0].input_ids[..48]);
    assert_eq!(t[0].loss_mask, full[0].loss_mask[..48]);
    assert_eq!(r.truncated, vec![1]);
    assert_eq!(r.bad.len(), 1);
    assert_eq!((r.bad[0].line, r.bad[0].kind), (2, BadKind::OverLong));
    assert!(r.bad[0].reason.contains("no assistant token would survive"), "{}", r.bad[0].reason);
    // Drop: both are reported.
    let mut r = specforge_rs::data::Report::default();
    let t = tokenize(&convs, &tok, &eos, &TokenizeOptions { max_len: 48, truncation: Truncation::Drop, ..Default::default() }, &mut r);
    assert!(t.is_empty());
    assert_eq!(r.bad.iter().map(|b| b.kind).collect::<Vec<_>>(), [BadKind::OverLong, BadKind::OverLong]);
    assert!(r.bad[0].reason.contains("--truncation drop"));
}

#[test]
fn import_joins_server_answers_with_their_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let requests = tmp.path().join("requests.jsonl");
    let responses = tmp.path().join("responses.jsonl");
    let req = |id: &str, q: &str| {
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": q}]}})
    };
    let ok = |id: &str, a: &str, finish: &str| {
        json!({"id": "batch_x", "custom_id": id, "error": null,
               "response": {"status_code": 200, "request_id": "r", "body": {"id": "c", "object": "chat.completion",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": a}, "finish_reason": finish}]}}})
    };
    std::fs::write(
        &requests,
        [req("q1", "One?"), req("q2", "Two?"), req("q3", "Three?"), req("q4", "Four?")]
            .iter()
            .map(|v| format!("{v}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let lines = [
        ok("q2", "Two.", "stop"),
        json!({"id": "batch_y", "custom_id": "q3", "response": null, "error": {"code": "timeout", "message": "took too long"}}),
        ok("q1", "One.", "length"),
        json!({"custom_id": "q4", "response": {"status_code": 500, "body": {"error": "boom"}}}),
        ok("q9", "Nine.", "stop"),
        // A self-contained chat.completion with its prompt inline (no custom_id).
        json!({"messages": [{"role": "user", "content": "Inline?"}], "choices": [{"message": {"role": "assistant", "content": "Inline."}, "finish_reason": "stop"}]}),
    ];
    std::fs::write(&responses, lines.iter().map(|v| format!("{v}\n")).collect::<String>() + "{not json\n").unwrap();
    let out = tmp.path().join("imported.jsonl");
    let stdout = run_ok(&[
        "import",
        "--responses",
        responses.to_str().unwrap(),
        "--requests",
        requests.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-bad-fraction",
        "0.6",
    ]);
    assert!(stdout.contains("3 conversations") && stdout.contains("1 answers cut"), "{stdout}");
    let got: Vec<Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0]["id"], "q2");
    assert_eq!(
        got[0]["messages"],
        json!([{"role": "system", "content": "S"}, {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Two."}])
    );
    assert_eq!(got[1]["id"], "q1");
    assert_eq!(got[1]["meta"]["finish_reason"], "length");
    assert_eq!(got[2]["id"], "line-6");
    let mut report = out.clone().into_os_string();
    report.push(".bad-lines.jsonl");
    let bad: Vec<Value> = std::fs::read_to_string(Path::new(&report)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<(u64, &str)> = bad.iter().map(|b| (b["line"].as_u64().unwrap(), b["kind"].as_str().unwrap())).collect();
    assert_eq!(kinds, [(2, "failed_response"), (4, "failed_response"), (5, "no_conversation"), (7, "invalid_json")]);
    assert!(bad[0]["reason"].as_str().unwrap().contains("took too long"));
    assert!(bad[1]["reason"].as_str().unwrap().contains("status_code 500"));
    assert!(bad[2]["reason"].as_str().unwrap().contains("custom_id `q9` is not in --requests"));
    // The imported file is a dataset the rest of the pipeline reads.
    let (convs, r) = read_jsonl(&out, &ReadOptions::default()).unwrap();
    assert_eq!((convs.len(), r.bad.len()), (3, 0));
}

#[test]
fn kill_9_during_regenerate_then_rerun_equals_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    // Six bundled prompts: single-turn, a system prompt and two multi-turn conversations (whose
    // given assistant turns are regenerated too).
    let lines: Vec<String> =
        std::fs::read_to_string(common::root().join("data/prompts.jsonl")).unwrap().lines().map(str::to_string).collect();
    let prompts = tmp.path().join("prompts.jsonl");
    let pick = [0usize, 1, 40, 44, 45, 2];
    std::fs::write(&prompts, pick.iter().map(|&i| format!("{}\n", lines[i])).collect::<String>()).unwrap();
    let p = prompts.to_str().unwrap();
    let args = |out: &str, max_new: &'static str| {
        vec![
            "regenerate".to_string(),
            "--data".into(),
            p.to_string(),
            "--out".into(),
            out.to_string(),
            "--max-new-tokens".into(),
            max_new.into(),
            "--batch-size".into(),
            "2".into(),
            "--max-len".into(),
            "512".into(),
        ]
    };
    let a = tmp.path().join("a.jsonl");
    let argv = args(a.to_str().unwrap(), "10");
    let stdout = run_ok(&argv.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stdout.contains("6 conversations written"), "{stdout}");
    let b = tmp.path().join("b.jsonl");
    let argv = args(b.to_str().unwrap(), "10");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let killed = kill_when(cmd(&argv), Duration::from_secs(300), || count_lines(&b) >= 2);
    assert!(killed, "regenerate finished before it could be killed");
    let done = count_lines(&b);
    assert!(done < 6, "killed mid-run ({done} lines)");
    // Simulate a write torn by the kill: half a line at the end.
    let mut bytes = std::fs::read(&b).unwrap();
    bytes.extend_from_slice(br#"{"id": "line-4", "messages": [{"role": "us"#);
    std::fs::write(&b, &bytes).unwrap();
    let stdout = run_ok(&argv);
    assert!(stdout.contains(&format!("{done} already done")), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(&a).unwrap(),
        std::fs::read_to_string(&b).unwrap(),
        "the resumed output differs from the uninterrupted one"
    );
    let out: Vec<Value> = std::fs::read_to_string(&b).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: Vec<&str> = out.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["line-1", "line-2", "line-3", "line-4", "line-5", "line-6"], "no sample lost or duplicated");
    // Multi-turn: every assistant turn is the target's own (two per two-user-turn conversation).
    let multi = &out[4]["messages"];
    let roles: Vec<&str> = multi.as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_ne!(multi[1]["content"], "That sounds exciting! When are you going?");
    // A rerun with other settings is refused.
    let argv = args(b.to_str().unwrap(), "11");
    let o = run(&argv.iter().map(String::as_str).collect::<Vec<_>>());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("meta.max_new_tokens"), "{e}");
    // What regenerate did not write is never truncated, appended to or taken as done: a file with
    // no newline, lines without its `meta`, and the input itself.
    let notes = tmp.path().join("notes.txt");
    let foreign = tmp.path().join("foreign.jsonl");
    std::fs::write(&notes, "my notes, no newline").unwrap();
    std::fs::write(&foreign, "{\"id\":\"line-1\",\"messages\":[]}\n").unwrap();
    for (out, what) in [(&notes, "no newline"), (&foreign, "no `meta`"), (&prompts, "is the input")] {
        let before = std::fs::read(out).unwrap();
        let argv = args(out.to_str().unwrap(), "10");
        let o = run(&argv.iter().map(String::as_str).collect::<Vec<_>>());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(what), "{}: {e}", out.display());
        assert!(std::fs::read(out).unwrap() == before, "{} was modified", out.display());
    }
}
