//! Dense targets (Llama, Qwen2, Qwen3) against transformers on tiny random configs, fp32 CPU:
//! every aux id, the post-norm hidden and the logits, on a right-padded batch of unequal lengths;
//! KV-cache decoding against the full forward; clear errors for bad checkpoints.

mod common;

use common::*;
use specforge_rs::target::{self, Cache, ForwardInput};
use tch::{Device, Kind, Tensor};

const ARCHS: [&str; 3] = ["llama", "qwen2", "qwen3"];

#[test]
fn dense_targets_match_transformers() {
    let refdir = reference("dense_targets.py", &[]);
    for arch in ARCHS {
        let dir = refdir.join(arch);
        let model = target::load(&dir, Kind::Float, Device::Cpu).unwrap();
        let g = load_all(&dir.join("golden.safetensors"));
        let l = model.config().num_hidden_layers;
        let ids = &g["input_ids"];
        let mask = &g["attention_mask"];
        let capture: Vec<i64> = (0..=l).collect();
        let out = tch::no_grad(|| {
            model.forward(&ForwardInput { input_ids: ids, attention_mask: Some(mask), position_ids: None, capture: &capture }, None)
        })
        .unwrap();
        let lengths: Vec<i64> = Vec::try_from(mask.sum_dim_intlist(1, false, Kind::Int64)).unwrap();
        // Compare real tokens only: padded positions are undefined in both implementations.
        for (b, &n) in lengths.iter().enumerate() {
            let b = b as i64;
            for k in 0..=l {
                let want = g[&format!("hidden_{k}")].get(b).narrow(0, 0, n);
                assert_close(&format!("{arch} aux {k} row {b}"), &out.aux[k as usize].get(b).narrow(0, 0, n), &want, Kind::Float);
            }
            let want = g["last_hidden"].get(b).narrow(0, 0, n);
            assert_close(&format!("{arch} last_hidden row {b}"), &out.last_hidden.get(b).narrow(0, 0, n), &want, Kind::Float);
            let logits = model.logits(&out.last_hidden);
            assert_close(
                &format!("{arch} logits row {b}"),
                &logits.get(b).narrow(0, 0, n),
                &g["logits"].get(b).narrow(0, 0, n),
                Kind::Float,
            );
        }
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let refdir = reference("dense_targets.py", &[]);
    for arch in ARCHS {
        let dir = refdir.join(arch);
        let model = target::load(&dir, Kind::Float, Device::Cpu).unwrap();
        let g = load_all(&dir.join("golden.safetensors"));
        let ids = g["input_ids"].narrow(0, 0, 1).narrow(1, 0, 13); // row 0 has 13 real tokens
        let full = tch::no_grad(|| {
            model.forward(&ForwardInput { input_ids: &ids, attention_mask: None, position_ids: None, capture: &[2] }, None)
        })
        .unwrap();
        // Prefill 5, then a 3-token chunk, then one token at a time.
        let mut cache = Cache::new(model.config().num_hidden_layers);
        let mut pieces = Vec::new();
        let mut aux = Vec::new();
        for (start, len) in [(0, 5), (5, 3), (8, 1), (9, 1), (10, 1), (11, 1), (12, 1)] {
            let step = ids.narrow(1, start, len);
            let o = tch::no_grad(|| {
                model.forward(&ForwardInput { input_ids: &step, attention_mask: None, position_ids: None, capture: &[2] }, Some(&mut cache))
            })
            .unwrap();
            pieces.push(o.last_hidden);
            aux.push(o.aux.into_iter().next().unwrap());
        }
        assert_eq!(cache.seq_len, 13);
        assert_close(&format!("{arch} cached last_hidden"), &Tensor::cat(&pieces, 1), &full.last_hidden, Kind::Float);
        assert_close(&format!("{arch} cached aux 2"), &Tensor::cat(&aux, 1), &full.aux[0], Kind::Float);
    }
}

#[test]
fn aux_id_out_of_range_is_an_error() {
    let dir = reference("dense_targets.py", &[]).join("llama");
    let model = target::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[3i64, 4, 5]).view([1, 3]);
    let e = model
        .forward(&ForwardInput { input_ids: &ids, attention_mask: None, position_ids: None, capture: &[5] }, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("aux layer id 5") && e.contains("0..=4"), "{e}");
    let bad = Tensor::from_slice(&[3i64, 96]).view([1, 2]);
    let e = model
        .forward(&ForwardInput { input_ids: &bad, attention_mask: None, position_ids: None, capture: &[] }, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
}

/// Copies a reference model directory so a test can damage it.
fn scratch_copy(src: &std::path::Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    let src = reference("dense_targets.py", &[]).join("qwen2");
    let err = |dir: &std::path::Path| match target::load(dir, Kind::Float, Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    };

    // A pickle checkpoint instead of safetensors.
    let d = scratch_copy(&src);
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    std::fs::write(d.path().join("pytorch_model.bin"), b"PK\x03\x04not really").unwrap();
    let e = err(d.path());
    assert!(e.contains("pytorch_model.bin") && e.contains("pickle"), "{e}");

    // A truncated safetensors file.
    let d = scratch_copy(&src);
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("invalid safetensors"), "{e}");

    // A tensor of the wrong shape, and a missing tensor: rewrite the checkpoint.
    let tensors = load_all(&src.join("model.safetensors"));
    let rewrite = |edit: &dyn Fn(&mut Vec<(String, Tensor)>)| {
        let d = scratch_copy(&src);
        let mut v: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        edit(&mut v);
        specforge_rs::weights::save_safetensors(&d.path().join("model.safetensors"), &v, None).unwrap();
        d
    };
    let d = rewrite(&|v| {
        for (k, t) in v.iter_mut() {
            if k == "model.layers.1.mlp.up_proj.weight" {
                *t = t.narrow(0, 0, 100);
            }
        }
    });
    let e = err(d.path());
    assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("[100, 64]") && e.contains("[112, 64]"), "{e}");
    let d = rewrite(&|v| v.retain(|(k, _)| k != "model.layers.2.self_attn.k_proj.bias"));
    let e = err(d.path());
    assert!(e.contains("missing") && e.contains("model.layers.2.self_attn.k_proj.bias"), "{e}");

    // An unknown model_type.
    let d = scratch_copy(&src);
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap().replace("\"qwen2\"", "\"gpt_neox\"");
    std::fs::write(d.path().join("config.json"), cfg).unwrap();
    let e = err(d.path());
    assert!(e.contains("config.json") && e.contains("gpt_neox") && e.contains("supported: llama"), "{e}");
}
