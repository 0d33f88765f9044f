//! The dependency rules of docs/architecture.md, checked on the source: model definitions (`nn`,
//! `target`, `draft`) and the serving format (`export`) import only the layers below them, never
//! the CLI, the pipeline, training, evaluation, the runtime, progress bars or distributed code.

use std::collections::BTreeSet;
use std::path::Path;

/// Module → the crate modules it may import.
const RULES: &[(&str, &[&str])] = &[
    ("nn", &["config", "error"]),
    ("target", &["config", "error", "nn", "weights"]),
    ("draft", &["config", "error", "nn", "weights", "util::fs"]),
    ("export", &["config", "error", "draft", "weights", "util::fs"]),
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every `crate::a` or `crate::a::b` path in `text` (`b` kept only for `util`), test modules
/// included: a test of a model definition has no business reaching up either.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + 7..];
        let seg = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
        if let Some(group) = rest.strip_prefix('{') {
            for item in group.split('}').next().unwrap_or("").split(',') {
                out.extend(imports(&format!("crate::{}", item.trim())));
            }
            continue;
        }
        let first = seg(rest);
        if first == "util" {
            out.insert(format!("util::{}", seg(rest.get(6..).unwrap_or(""))));
        } else if !first.is_empty() {
            out.insert(first);
        }
    }
    out
}

#[test]
fn model_definitions_and_export_import_only_what_they_may() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    for (module, allowed) in RULES {
        let mut files = Vec::new();
        let dir = src.join(module);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        }
        let single = src.join(format!("{module}.rs"));
        if single.is_file() {
            files.push(single);
        }
        assert!(!files.is_empty(), "no source for module {module}");
        for f in files {
            for import in imports(&std::fs::read_to_string(&f).unwrap()) {
                if import != *module && !allowed.contains(&import.as_str()) {
                    broken.push(format!("{} imports crate::{import} (allowed: {allowed:?})", f.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "dependency rules broken:\n{}", broken.join("\n"));
}

#[test]
fn the_checker_sees_imports() {
    let found = imports("use crate::pipeline::RunSummary;\nlet x = crate::util::progress::bar(1, \"x\");\nuse crate::{a, b};");
    assert!(found.contains("pipeline") && found.contains("util::progress") && found.contains("a") && found.contains("b"), "{found:?}");
}
