//! Chat templates rendered with minijinja under transformers' semantics.
//!
//! transformers compiles templates with `trim_blocks=True, lstrip_blocks=True`, the loop-controls
//! extension, and adds `raise_exception`, `strftime_now` and a `tojson` filter that is Python's
//! `json.dumps(..., ensure_ascii=False)` (separators `", "` and `": "`). We do the same, with
//! minijinja's Python-compatibility methods (`.strip()`, `.startswith()`, `.items()` ...).

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde_json::Value as Json;

use crate::error::{Error, Result};

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: PathBuf,
}

/// Everything a template sees besides `messages`.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Append the assistant header so the model answers next.
    pub add_generation_prompt: bool,
    /// Special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`) as strings.
    pub special_tokens: Vec<(String, String)>,
    /// Tool definitions, passed as `tools` when present.
    pub tools: Option<Json>,
    /// Extra variables (e.g. `enable_thinking`).
    pub extra: serde_json::Map<String, Json>,
}

/// Python's `json.dumps(v, ensure_ascii=False, indent=indent)`.
pub fn python_json(v: &Json, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_py_json(v, indent, 0, &mut out);
    out
}

fn write_py_json(v: &Json, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => {
            // Python prints floats with a decimal point (1.0), serde_json keeps what it parsed.
            if n.is_f64() {
                let f = n.as_f64().unwrap_or(0.0);
                if f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else {
                    out.push_str(&n.to_string());
                }
            } else {
                out.push_str(&n.to_string());
            }
        }
        Json::String(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
        Json::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(m) => {
            if m.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                write_py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json: Json = serde_json::to_value(&value).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(python_json(&json, indent)))
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> String {
    // Templates use it for "today's date" in system prompts. A fixed clock keeps renders
    // reproducible; we render the current UTC date with the few directives templates use.
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    fmt.replace("%Y", &format!("{y:04}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", MONTHS[(m - 1) as usize])
        .replace("%b", &MONTHS[(m - 1) as usize][..3])
}

/// Howard Hinnant's days-to-civil conversion.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Template instructions one rendering may run (a long multi-turn conversation with tools takes
/// well under a million).
pub const TEMPLATE_FUEL: u64 = 20_000_000;
/// Bytes one rendering may produce.
pub const TEMPLATE_MAX_OUTPUT: usize = 64 << 20;

/// A writer that refuses to grow past `limit` bytes.
struct Bounded {
    buf: Vec<u8>,
    limit: usize,
    overflow: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.limit {
            self.overflow = true;
            return Err(std::io::Error::other(format!("the rendered prompt passes {} bytes", self.limit)));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    /// Compiles `source_text`; `source` names where it came from in errors.
    pub fn new(source_text: String, source: &Path) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        // A template is code from a model repository: bound its work, so one that loops forever
        // ends in an error naming it (see also the output bound in `render`).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source_text)
            .map_err(|e| Error::Template { path: source.to_path_buf(), message: format!("{e:#}") })?;
        Ok(ChatTemplate { env, source: source.to_path_buf() })
    }

    /// Renders `messages` (OpenAI form: `[{"role": ..., "content": ...}, ...]`).
    pub fn render(&self, messages: &Json, opts: &RenderOptions) -> Result<String> {
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), Json::Bool(opts.add_generation_prompt));
        for (k, v) in &opts.special_tokens {
            ctx.insert(k.clone(), Json::String(v.clone()));
        }
        if let Some(tools) = &opts.tools {
            ctx.insert("tools".into(), tools.clone());
        }
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), v.clone());
        }
        let tmpl = self.env.get_template("chat").map_err(|e| Error::Template { path: self.source.clone(), message: e.to_string() })?;
        let mut out = Bounded { buf: Vec::new(), limit: TEMPLATE_MAX_OUTPUT, overflow: false };
        let rendered = tmpl.render_captured_to(Value::from_serialize(Json::Object(ctx)), &mut out);
        if let Err(e) = rendered {
            let message = if out.overflow { format!("the rendered prompt passes {TEMPLATE_MAX_OUTPUT} bytes") } else { format!("{e:#}") };
            return Err(Error::Template { path: self.source.clone(), message });
        }
        String::from_utf8(out.buf)
            .map_err(|e| Error::Template { path: self.source.clone(), message: format!("rendered text is not UTF-8: {e}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_json_separators() {
        let v = json!({"b": [1, 2.0, "x\u{e9}"], "a": null});
        // Keys keep their insertion order, as Python dicts do.
        assert_eq!(python_json(&v, None), r#"{"b": [1, 2.0, "xé"], "a": null}"#);
        assert_eq!(python_json(&json!([1]), Some(2)), "[\n  1\n]");
    }

    #[test]
    fn renders_with_trim_blocks_and_raise() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n{{ m['role'] }}: {{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
                .into(),
            Path::new("inline"),
        )
        .unwrap();
        let s = t
            .render(&json!([{"role": "user", "content": " hi "}]), &RenderOptions { add_generation_prompt: true, ..Default::default() })
            .unwrap();
        assert_eq!(s, "user: hi\nA:");
        let t = ChatTemplate::new("{{ raise_exception('bad role') }}".into(), Path::new("inline")).unwrap();
        let e = t.render(&json!([]), &RenderOptions::default()).unwrap_err().to_string();
        assert!(e.contains("bad role"), "{e}");
    }

    #[test]
    fn runaway_templates_end_in_an_error() {
        let endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let e = ChatTemplate::new(endless.into(), Path::new("endless.jinja")).unwrap().render(&json!([]), &RenderOptions::default());
        let e = e.unwrap_err().to_string();
        assert!(e.contains("endless.jinja") && e.contains("fuel"), "{e}");
        let huge = "{% for i in range(100000) %}{{ messages[0]['content'] }}{% endfor %}";
        let long = json!([{"role": "user", "content": "x".repeat(1000)}]);
        let e = ChatTemplate::new(huge.into(), Path::new("huge.jinja")).unwrap().render(&long, &RenderOptions::default());
        let e = e.unwrap_err().to_string();
        assert!(e.contains("huge.jinja") && e.contains("bytes"), "{e}");
    }
}
