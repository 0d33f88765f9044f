//! One default per value: every flag of every stage command is the recipe key of the same name
//! with the same default, or an input/output of that one invocation (named here, so a new flag
//! must be one or the other). Generated from the shared types: clap's command tree on one side,
//! the recipe sections' serialised defaults on the other, so it cannot go stale.

use std::collections::BTreeMap;

use serde_json::Value;
use specforge_rs::config::recipe::clap_defaults;
use specforge_rs::config::{DataConfig, DraftConfig, EvalConfig, ExportConfig, ExtractConfig, RegenerateConfig, TargetSpec, TrainConfig};

fn sections() -> BTreeMap<&'static str, Value> {
    let j = |v: Result<Value, serde_json::Error>| v.unwrap();
    BTreeMap::from([
        ("target", j(serde_json::to_value(TargetSpec::default()))),
        ("data", j(serde_json::to_value(DataConfig::default()))),
        ("regenerate", j(serde_json::to_value(RegenerateConfig::default()))),
        ("extract", j(serde_json::to_value(ExtractConfig::default()))),
        ("draft", j(serde_json::to_value(DraftConfig::default()))),
        ("train", j(serde_json::to_value(TrainConfig::default()))),
        ("export", j(serde_json::to_value(ExportConfig::default()))),
        ("eval", j(serde_json::to_value(EvalConfig::default()))),
    ])
}

/// Per stage command: the recipe sections its flags come from, and its per-invocation flags
/// (inputs and outputs that no recipe section holds).
fn stages() -> Vec<(&'static str, Vec<&'static str>, Vec<&'static str>)> {
    vec![
        ("regenerate", vec!["target", "data", "regenerate"], vec!["data", "out", "report"]),
        ("vocab", vec!["target", "data", "draft"], vec!["data", "shards", "out", "report"]),
        ("extract", vec!["target", "data", "draft", "extract"], vec!["data", "out", "chunk", "report"]),
        ("train", vec![], vec!["recipe", "overrides", "features", "out", "init", "draft_config"]),
        ("export", vec!["export"], vec!["checkpoint", "out"]),
        ("eval", vec!["target", "eval"], vec!["draft", "data", "json"]),
        ("generate", vec!["target", "regenerate", "data", "eval"], vec!["prompt", "prompts", "draft"]),
        ("run", vec![], vec!["recipe", "out", "overrides"]),
    ]
}

/// The flag's default as clap has it, equal to the recipe key's serialised default?
fn same_default(clap_default: Option<String>, recipe: &Value) -> bool {
    match (clap_default, recipe) {
        (None, Value::Null) => true,
        // A switch (`--multimodal`) is off unless given.
        (None, Value::Bool(b)) => !b,
        (None, Value::Array(a)) => a.is_empty(),
        (Some(d), Value::Bool(b)) => d == b.to_string(),
        (Some(d), Value::String(s)) => &d == s,
        (Some(d), Value::Number(n)) => d.parse::<f64>().ok() == n.as_f64(),
        _ => false,
    }
}

#[test]
fn every_stage_flag_is_a_recipe_key_with_the_same_default() {
    let sections = sections();
    let cli = specforge_rs::cli::command();
    let globals = ["help", "version", "verbose", "device", "threads"];
    for (stage, from, own) in stages() {
        let cmd = cli.find_subcommand(stage).unwrap_or_else(|| panic!("no `{stage}` subcommand"));
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if globals.contains(&id) || own.contains(&id) {
                continue;
            }
            let long = arg.get_long().unwrap_or_else(|| panic!("{stage}: argument {id} has no --flag"));
            // The flag spells the key (one documented exception: `--target` sets `target.name`).
            assert!(long == id.replace('_', "-") || (id, long) == ("name", "target"), "{stage} --{long}: its recipe key would be `{id}`");
            // The first listed section holding the key is the flag's (`generate --max-new-tokens`
            // is `regenerate.max_new_tokens`, its `--k` is `eval.k`).
            let hits: Vec<(&str, &Value)> = from.iter().filter_map(|s| sections[s].get(id).map(|v| (*s, v))).take(1).collect();
            assert!(
                !hits.is_empty(),
                "`{stage} --{long}` is neither a key of the recipe sections {from:?} nor one of the command's own inputs {own:?}"
            );
            let default = arg.get_default_values().first().map(|d| d.to_string_lossy().into_owned());
            for (section, value) in &hits {
                assert!(
                    same_default(default.clone(), value),
                    "`{stage} --{long}` defaults to {default:?} but the recipe key `{section}.{id}` defaults to {value}"
                );
                // Every spelling clap accepts, serde accepts as the same key.
                for pv in arg.get_possible_values() {
                    if value.is_boolean() {
                        continue;
                    }
                    let v = Value::String(pv.get_name().to_string());
                    let mut table = sections[section].clone();
                    table[id] = v;
                    let ok = match *section {
                        "target" => serde_json::from_value::<TargetSpec>(table).is_ok(),
                        "data" => serde_json::from_value::<DataConfig>(table).is_ok(),
                        "extract" => serde_json::from_value::<ExtractConfig>(table).is_ok(),
                        "export" => serde_json::from_value::<ExportConfig>(table).is_ok(),
                        "regenerate" | "eval" | "draft" | "train" => true,
                        other => panic!("unknown section {other}"),
                    };
                    assert!(ok, "`{stage} --{long} {}` is not accepted as `{section}.{id}`", pv.get_name());
                }
            }
            checked += 1;
        }
        assert!(checked > 0 || from.is_empty(), "{stage}: no flag was checked");
    }
}

#[test]
fn an_empty_recipe_section_is_the_empty_command_line() {
    fn same<T: Default + PartialEq + std::fmt::Debug + serde::de::DeserializeOwned + clap::Args + clap::FromArgMatches>() {
        assert_eq!(toml::from_str::<T>("").unwrap(), clap_defaults::<T>());
        assert_eq!(T::default(), clap_defaults::<T>());
    }
    same::<TargetSpec>();
    same::<DataConfig>();
    same::<RegenerateConfig>();
    same::<ExtractConfig>();
    same::<EvalConfig>();
    same::<ExportConfig>();
}

/// Numbers a flag accepts but a stage cannot honour end in an error naming the flag, never a
/// panic (exit code 101) or an allocation of the asked size.
#[test]
fn absurd_decoding_numbers_are_refused_by_name() {
    let cases: [(&[&str], &str); 5] = [
        (&["generate", "--prompt", "hi", "--max-new-tokens", "18446744073709551615"], "max_new_tokens"),
        (&["generate", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (&["generate", "--prompt", "hi", "--top-p", "0"], "top_p"),
        (&["generate", "--prompt", "hi", "--top-p", "1.5"], "top_p"),
        (&["generate", "--prompt", "hi", "--temperature=-1"], "temperature"),
    ];
    for (args, field) in cases {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_specforge-rs")).args(args).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.code() == Some(1) && e.contains(field), "{args:?}: {:?} {e}", o.status.code());
    }
}

/// An endless input ends in an error, not an unbounded read: `vocab --data /dev/zero`.
#[test]
fn a_dataset_of_zero_bytes_ends_in_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("v.safetensors");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_specforge-rs"))
        .args(["vocab", "--data", "/dev/zero", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && e.contains("NUL"), "{:?} {e}", o.status.code());
    assert!(!out.exists());
}
