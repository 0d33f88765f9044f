//! The target's tokenizer (`tokenizer.json` through the tokenizers crate) and its chat template.
//!
//! The template is read from `tokenizer_config.json` (`chat_template`, a string or a list of
//! named templates) or, as transformers 5 writes it, from `chat_template.jinja`.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::template::{ChatTemplate, RenderOptions};
use crate::error::{read_json, read_to_string, Error, Result};

/// Each token's byte range `(start, end)` in the encoded text.
pub type Offsets = Vec<(usize, usize)>;

/// A tokenizer with the special tokens and chat template of its model directory.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    template: Option<ChatTemplate>,
    /// `(bos_token, "<s>")`-style pairs passed to the template.
    special_tokens: Vec<(String, String)>,
    /// eos_token from tokenizer_config.json, if any.
    pub eos_token: Option<String>,
    /// xxh3-64 of tokenizer.json, tokenizer_config.json and chat_template.jinja as read: what
    /// decides how a conversation becomes tokens (a resumed extraction must tokenise the same).
    pub fingerprint: String,
}

fn token_string(v: Option<&Json>) -> Option<String> {
    match v {
        Some(Json::String(s)) => Some(s.clone()),
        // Older configs spell special tokens as AddedToken dicts.
        Some(Json::Object(m)) => m.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, `dir/tokenizer_config.json` and the chat template.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer { path: path.clone(), message: e.to_string() })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = if cfg_path.is_file() { read_json(&cfg_path)? } else { Json::Null };
        let mut special_tokens = Vec::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(s) = token_string(cfg.get(key)) {
                special_tokens.push((key.to_string(), s));
            }
        }
        let eos_token = token_string(cfg.get("eos_token"));
        let template = match cfg.get("chat_template") {
            Some(Json::String(s)) => Some(ChatTemplate::new(s.clone(), &cfg_path)?),
            Some(Json::Array(list)) => {
                let default = list.iter().find(|t| t.get("name").and_then(Json::as_str) == Some("default"));
                match default.and_then(|t| t.get("template")).and_then(Json::as_str) {
                    Some(s) => Some(ChatTemplate::new(s.to_string(), &cfg_path)?),
                    None => return Err(Error::config(&cfg_path, "chat_template", "is a list without a `default` entry")),
                }
            }
            _ => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.is_file() {
                    Some(ChatTemplate::new(read_to_string(&jinja)?, &jinja)?)
                } else {
                    None
                }
            }
        };
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
            let p = dir.join(name);
            if p.is_file() {
                h.update(name.as_bytes());
                h.update(&std::fs::read(&p).map_err(|e| Error::io(&p, e))?);
            }
        }
        let fingerprint = format!("{:016x}", h.digest());
        Ok(Tokenizer { inner, path, template, special_tokens, eos_token, fingerprint })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS ...).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Token ids of `text` (no special tokens added) with each token's byte range in `text`.
    ///
    /// The loss mask is derived from these ranges: a token belongs to an assistant turn when its
    /// bytes overlap the turn's span in the rendered conversation.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<i64>, Offsets)> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        let ids = enc.get_ids().iter().map(|&i| i as i64).collect();
        Ok((ids, enc.get_offsets().to_vec()))
    }

    /// The string of token `id`, if it exists.
    pub fn id_to_token(&self, id: i64) -> Option<String> {
        u32::try_from(id).ok().and_then(|i| self.inner.id_to_token(i))
    }

    /// Added tokens flagged `special` (`<|im_start|>`, `<|im_end|>`, ...), sorted by id.
    pub fn special_added_tokens(&self) -> Vec<(i64, String)> {
        let mut v: Vec<(i64, String)> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (i64::from(id), t.content))
            .collect();
        v.sort();
        v
    }

    /// The tokenizer.json this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, skip_special_tokens).map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })
    }

    /// The id of a token string (special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether a chat template was found.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders a conversation with the model's chat template.
    ///
    /// # Errors
    /// [`Error::Template`] when the model has no template or rendering fails.
    pub fn apply_chat_template(&self, messages: &Json, add_generation_prompt: bool) -> Result<String> {
        self.apply_chat_template_with(messages, RenderOptions { add_generation_prompt, ..Default::default() })
    }

    /// Renders with full control over the template variables; special tokens are filled in.
    pub fn apply_chat_template_with(&self, messages: &Json, mut opts: RenderOptions) -> Result<String> {
        let t = self.template.as_ref().ok_or_else(|| Error::Template {
            path: self.path.with_file_name("tokenizer_config.json"),
            message: "no chat template (neither tokenizer_config.json `chat_template` nor chat_template.jinja)".into(),
        })?;
        let mut special = self.special_tokens.clone();
        special.retain(|(k, _)| !opts.special_tokens.iter().any(|(o, _)| o == k));
        opts.special_tokens.extend(special);
        t.render(messages, &opts)
    }
}
