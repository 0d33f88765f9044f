//! Qwen3.5 hybrid target (Gated DeltaNet + gated attention) against transformers on tiny random
//! 8-layer configs, fp32 CPU: every aux id, the post-norm hidden and the logits for lengths 1, 63,
//! 64, 65 and 300 and a right-padded batch; M-RoPE positions; chunked vs recurrent delta rule;
//! cached decoding vs the full forward; greedy generation vs transformers' `generate`; the
//! mixed-dtype VLM checkpoint in bf16. Goldens come from tests/reference/qwen3_5_target.py.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use specforge_rs::config::TargetConfig;
use specforge_rs::generate::{generate, GenerateOptions};
use specforge_rs::target::qwen3_5::{chunk_gated_delta_rule, recurrent_gated_delta_rule, Mixer, Qwen35Model};
use specforge_rs::target::{self, Cache, ForwardInput, LayerCache, TargetModel, TargetOutput};
use specforge_rs::weights::WeightSource;
use tch::{Device, Kind, Tensor};

/// interval: `full_attention_interval` only, untied, GVA; layer_types: explicit irregular types,
/// attention bias, tied, dk ≠ dv, conv width 3; vlm: `model.language_model.*` + `model.visual.*` +
/// `mtp.*`, tied at the top level, mixed F32/BF16 storage.
const CASES: [&str; 3] = ["interval", "layer_types", "vlm"];
const LENGTHS: [i64; 5] = [1, 63, 64, 65, 300];

fn refdir() -> PathBuf {
    reference("qwen3_5_target.py", &[])
}

fn load(case: &str, kind: Kind) -> (Box<dyn TargetModel>, HashMap<String, Tensor>) {
    let dir = refdir().join(case);
    let model = target::load(&dir, kind, Device::Cpu).unwrap();
    (model, load_all(&dir.join("golden.safetensors")))
}

fn run(
    model: &dyn TargetModel,
    ids: &Tensor,
    mask: Option<&Tensor>,
    pos: Option<&Tensor>,
    capture: &[i64],
    cache: Option<&mut Cache>,
) -> TargetOutput {
    tch::no_grad(|| model.forward(&ForwardInput { input_ids: ids, attention_mask: mask, position_ids: pos, capture }, cache)).unwrap()
}

/// Compares every aux id, last_hidden and logits of `out` with goldens `{prefix}{k}`,
/// `{last}`, `{logits}` on the first `n` tokens of row `b`; returns the worst relative error.
#[allow(clippy::too_many_arguments)]
fn check_all(
    what: &str,
    model: &dyn TargetModel,
    out: &TargetOutput,
    g: &HashMap<String, Tensor>,
    h_prefix: &str,
    last: &str,
    logits: &str,
    b: i64,
    n: i64,
    tol: f64,
) -> f64 {
    let l = model.config().num_hidden_layers;
    let mut worst: f64 = 0.0;
    let mut cmp = |name: String, a: &Tensor, e: &Tensor| {
        let r = rel_err(&a.get(b).narrow(0, 0, n), &e.get(b).narrow(0, 0, n));
        assert!(r <= tol, "{what} {name}: relative error {r:.3e} > {tol:.1e}");
        worst = worst.max(r);
    };
    for k in 0..=l {
        cmp(format!("aux {k}"), &out.aux[k as usize], &g[&format!("{h_prefix}{k}")]);
    }
    cmp("last_hidden".into(), &out.last_hidden, &g[last]);
    cmp("logits".into(), &model.logits(&out.last_hidden), &g[logits]);
    worst
}

#[test]
fn matches_transformers_for_every_length() {
    let tol = tol_for(Kind::Float);
    for case in CASES {
        let (model, g) = load(case, Kind::Float);
        let l = model.config().num_hidden_layers;
        assert_eq!(l, 8);
        let capture: Vec<i64> = (0..=l).collect();
        let mut report = Vec::new();
        for n in LENGTHS {
            let ids = &g[&format!("ids_{n}")];
            let out = run(model.as_ref(), ids, None, None, &capture, None);
            let worst = check_all(
                &format!("{case} T={n}"),
                model.as_ref(),
                &out,
                &g,
                &format!("h{n}_"),
                &format!("last_{n}"),
                &format!("logits_{n}"),
                0,
                n,
                tol,
            );
            report.push(format!("T={n}: {worst:.2e}"));
        }
        eprintln!("{case}: max rel err {}", report.join(", "));
    }
}

#[test]
fn right_padded_batch_matches_transformers() {
    let tol = tol_for(Kind::Float);
    for case in CASES {
        let (model, g) = load(case, Kind::Float);
        let l = model.config().num_hidden_layers;
        let capture: Vec<i64> = (0..=l).collect();
        let (ids, mask) = (&g["batch_ids"], &g["batch_mask"]);
        let out = run(model.as_ref(), ids, Some(mask), None, &capture, None);
        let lengths: Vec<i64> = Vec::try_from(mask.sum_dim_intlist(1, false, Kind::Int64)).unwrap();
        // Real tokens only: padded positions are undefined in both implementations.
        let mut worst: f64 = 0.0;
        for (b, &n) in lengths.iter().enumerate() {
            worst = worst.max(check_all(
                &format!("{case} batch row {b}"),
                model.as_ref(),
                &out,
                &g,
                "batch_h_",
                "batch_last",
                "batch_logits",
                b as i64,
                n,
                tol,
            ));
        }
        eprintln!("{case}: right-padded batch {lengths:?}: max rel err {worst:.2e}");
    }
}

/// The extraction pipeline captures chandra's [3, 15, 27] (the inputs of full-attention layers)
/// of 32 layers; at depth 8 with full attention at 3 and 7 that is [3, 7], plus id L and id 0.
#[test]
fn extraction_capture_ids_equal_transformers_hidden_states() {
    let (model, g) = load("interval", Kind::Float);
    let ids = &g["ids_300"];
    let capture = [3i64, 7];
    let out = run(model.as_ref(), ids, None, None, &capture, None);
    assert_eq!(out.aux.len(), 2);
    for (a, k) in out.aux.iter().zip(capture) {
        assert_close(&format!("aux {k}"), a, &g[&format!("h300_{k}")], Kind::Float);
    }
    // Request order and duplicates are kept; id L is the pre-norm output of the last layer.
    let capture = [8i64, 3, 0, 3];
    let out = run(model.as_ref(), ids, None, None, &capture, None);
    for (a, k) in out.aux.iter().zip(capture) {
        assert_close(&format!("aux {k}"), a, &g[&format!("h300_{k}")], Kind::Float);
    }
    let e = model
        .forward(&ForwardInput { input_ids: ids, attention_mask: None, position_ids: None, capture: &[9] }, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("aux layer id 9") && e.contains("0..=8"), "{e}");
}

#[test]
fn mrope_positions_match_transformers() {
    let (model, g) = load("layer_types", Kind::Float);
    let (ids, pos) = (&g["mrope_ids"], &g["mrope_pos"]);
    let l = model.config().num_hidden_layers;
    let capture: Vec<i64> = (0..=l).collect();
    let out = run(model.as_ref(), ids, None, Some(pos), &capture, None);
    let t = ids.size()[1];
    let worst = check_all("mrope", model.as_ref(), &out, &g, "mrope_h_", "mrope_last", "mrope_logits", 0, t, tol_for(Kind::Float));
    eprintln!("mrope [3, 1, {t}] positions: max rel err {worst:.2e}");
    // [4, B, T]: a text row first (ignored by the rotary), as transformers accepts it.
    let pos4 = Tensor::cat(&[&pos.get(0).unsqueeze(0), pos], 0);
    let out4 = run(model.as_ref(), ids, None, Some(&pos4), &[], None);
    assert!(out4.last_hidden.equal(&out.last_hidden));
    // Equal streams are plain RoPE.
    let flat = Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, 1, t]).repeat([3, 1, 1]);
    let a = run(model.as_ref(), ids, None, Some(&flat), &[], None);
    let b = run(model.as_ref(), ids, None, None, &[], None);
    assert_close("equal streams", &a.last_hidden, &b.last_hidden, Kind::Float);
    let bad = Tensor::zeros([3, 2, t], (Kind::Int64, Device::Cpu));
    let e = model
        .forward(&ForwardInput { input_ids: ids, attention_mask: None, position_ids: Some(&bad), capture: &[] }, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("position_ids"), "{e}");
}

/// Random kernel inputs `[B, T, H, d]`; g ≤ 0 and β in (0, 1) as the model produces them.
fn kernel_inputs(b: i64, t: i64, h: i64, dk: i64, dv: i64) -> [Tensor; 6] {
    let o = (Kind::Float, Device::Cpu);
    [
        Tensor::randn([b, t, h, dk], o),
        Tensor::randn([b, t, h, dk], o),
        Tensor::randn([b, t, h, dv], o),
        -Tensor::randn([b, t, h], o).softplus() * 0.5,
        Tensor::randn([b, t, h], o).sigmoid(),
        Tensor::randn([b, h, dk, dv], o) * 0.1,
    ]
}

#[test]
fn chunked_delta_rule_equals_recurrent() {
    tch::manual_seed(5);
    let tol = tol_for(Kind::Float);
    // Lengths around the chunk boundary, with and without an initial state.
    for (t, with_state) in [(1, false), (63, true), (64, false), (65, true), (200, true)] {
        let [q, k, v, g, beta, s0] = kernel_inputs(2, t, 3, 16, 8);
        let init = with_state.then_some(&s0);
        let (co, cs) = chunk_gated_delta_rule(&q, &k, &v, &g, &beta, init, 64);
        let (ro, rs) = recurrent_gated_delta_rule(&q, &k, &v, &g, &beta, init);
        assert_eq!(co.size(), [2, t, 3, 8]);
        assert_eq!(cs.size(), [2, 3, 16, 8]);
        assert_close(&format!("T={t} output"), &co, &ro, Kind::Float);
        assert_close(&format!("T={t} state"), &cs, &rs, Kind::Float);
        eprintln!("T={t}: chunked vs recurrent output {:.2e}, state {:.2e}", rel_err(&co, &ro), rel_err(&cs, &rs));
        // Splitting the sequence and carrying the state is the same computation.
        if t > 100 {
            let (a, sa) = chunk_gated_delta_rule(
                &q.narrow(1, 0, 70),
                &k.narrow(1, 0, 70),
                &v.narrow(1, 0, 70),
                &g.narrow(1, 0, 70),
                &beta.narrow(1, 0, 70),
                init,
                64,
            );
            let rest = |x: &Tensor| x.narrow(1, 70, t - 70);
            let (b, sb) = chunk_gated_delta_rule(&rest(&q), &rest(&k), &rest(&v), &rest(&g), &rest(&beta), Some(&sa), 64);
            assert_close("split output", &Tensor::cat(&[a, b], 1), &ro, Kind::Float);
            assert!(rel_err(&sb, &rs) <= tol);
        }
    }
    // And both against transformers' own kernels.
    let kg = load_all(&refdir().join("kernel.safetensors"));
    let (q, k, v, g, beta, s0) = (&kg["q"], &kg["k"], &kg["v"], &kg["g"], &kg["beta"], &kg["initial_state"]);
    let (co, cs) = chunk_gated_delta_rule(q, k, v, g, beta, Some(s0), 64);
    let (ro, rs) = recurrent_gated_delta_rule(q, k, v, g, beta, Some(s0));
    assert_close("chunk vs transformers", &co, &kg["chunk_out"], Kind::Float);
    assert_close("chunk state vs transformers", &cs, &kg["chunk_state"], Kind::Float);
    assert_close("recurrent vs transformers", &ro, &kg["recurrent_out"], Kind::Float);
    assert_close("recurrent state vs transformers", &rs, &kg["recurrent_state"], Kind::Float);
}

/// Decoding with the cache (prefill, a multi-token chunk on top of the cache, single tokens; and
/// a prefill shorter than the conv window) against transformers' own cached decoding of the
/// same steps, and against the full forward.
///
/// Against transformers the tolerance is the usual fp32 one. Against the full forward it is
/// 1e-4: the chunked delta rule is exact in math, but moving the chunk boundaries (a continuation
/// chunk starts at the cache position, not at a multiple of 64) changes its fp32 rounding, and
/// its UT solve amplifies that; transformers' own cached-vs-full gap on these models and steps
/// is up to ~6e-5 (printed below), and we reproduce it.
#[test]
fn cached_decoding_equals_transformers_and_full_forward() {
    let capture = [3i64, 7];
    let schedules: [&[(i64, i64)]; 2] =
        [&[(0, 70), (70, 67), (137, 1), (138, 1), (139, 1), (140, 1), (141, 9)], &[(0, 2), (2, 1), (3, 1), (4, 66), (70, 1), (71, 79)]];
    for case in CASES {
        let (model, g) = load(case, Kind::Float);
        let ids = g["ids_300"].narrow(1, 0, 150);
        let full = run(model.as_ref(), &ids, None, None, &capture, None);
        for (s, schedule) in schedules.iter().enumerate() {
            let mut cache = Cache::new(model.config().num_hidden_layers);
            let (mut last, mut aux3, mut aux7) = (Vec::new(), Vec::new(), Vec::new());
            for &(start, len) in schedule.iter() {
                let o = run(model.as_ref(), &ids.narrow(1, start, len), None, None, &capture, Some(&mut cache));
                last.push(o.last_hidden);
                let mut a = o.aux.into_iter();
                aux3.push(a.next().unwrap());
                aux7.push(a.next().unwrap());
            }
            assert_eq!(cache.seq_len, 150);
            let (last, aux3, aux7) = (Tensor::cat(&last, 1), Tensor::cat(&aux3, 1), Tensor::cat(&aux7, 1));
            let what = format!("{case} schedule {s}");
            let mut worst_hf: f64 = 0.0;
            for (name, ours, want) in [
                ("last_hidden", &last, &g[&format!("cached{s}_last")]),
                ("aux 3", &aux3, &g[&format!("cached{s}_h_3")]),
                ("aux 7", &aux7, &g[&format!("cached{s}_h_7")]),
            ] {
                let r = rel_err(ours, want);
                assert!(r <= tol_for(Kind::Float), "{what} {name} vs transformers' cached decoding: {r:.3e}");
                worst_hf = worst_hf.max(r);
            }
            let mut worst_full: f64 = 0.0;
            for (name, ours, want) in
                [("last_hidden", &last, &full.last_hidden), ("aux 3", &aux3, &full.aux[0]), ("aux 7", &aux7, &full.aux[1])]
            {
                let r = rel_err(ours, want);
                assert!(r <= 1e-4, "{what} {name} vs the full forward: {r:.3e}");
                worst_full = worst_full.max(r);
            }
            let hf_gap = rel_err(&g[&format!("cached{s}_last")], &full.last_hidden);
            eprintln!(
                "{what}: cached vs transformers cached {worst_hf:.2e}; cached vs full {worst_full:.2e} (transformers' own gap {hf_gap:.2e})"
            );
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for case in CASES {
        let (model, g) = load(case, Kind::Float);
        let prompts: Vec<Vec<i64>> = (0..3).map(|i| Vec::try_from(g[&format!("gen_prompt_{i}")].get(0)).unwrap()).collect();
        let want: Vec<Vec<i64>> = (0..3).map(|i| Vec::try_from(g[&format!("gen_out_{i}")].get(0)).unwrap()).collect();
        let opts = GenerateOptions { max_new_tokens: 20, ..GenerateOptions::default() };
        // Batched: unequal prompts are left-padded, which the DeltaNet layers must not see.
        let got = generate(model.as_ref(), &prompts, &opts, Device::Cpu).unwrap();
        assert_eq!(got, want, "{case}: batched greedy generation");
        let alone = generate(model.as_ref(), &prompts[..1], &opts, Device::Cpu).unwrap();
        assert_eq!(alone[0], want[0], "{case}: greedy generation, batch 1");
    }
}

/// The VLM checkpoint stores A_log and the gated norm as F32 and the rest as BF16, like the
/// published Qwen3.5 files; transformers casts all of it to the load dtype, and so do we.
#[test]
fn mixed_dtype_vlm_checkpoint_in_bf16() {
    let dir = refdir().join("vlm");
    let cfg = TargetConfig::from_path(&dir).unwrap();
    assert!(cfg.tie_word_embeddings);
    let src = WeightSource::open(&dir).unwrap();
    assert!(src.contains("mtp.fc.weight") && src.contains("model.visual.pos_embed.weight"));
    let model = Qwen35Model::load(cfg, &src, Kind::BFloat16, Device::Cpu).unwrap();
    match &model.layers[0].mixer {
        Mixer::LinearAttn(la) => {
            assert_eq!(la.a_log.kind(), Kind::BFloat16);
            assert_eq!(la.norm.kind(), Kind::BFloat16);
        }
        Mixer::SelfAttn(_) => panic!("layer 0 is a linear-attention layer"),
    }
    let g = load_all(&dir.join("golden.safetensors"));
    let ids = &g["bf16_ids"];
    let capture: Vec<i64> = (0..=8).collect();
    let out = run(&model, ids, None, None, &capture, None);
    let worst = check_all("vlm bf16", &model, &out, &g, "bf16_h_", "bf16_last", "bf16_logits", 0, ids.size()[1], tol_for(Kind::BFloat16));
    eprintln!("vlm bf16 (T=65): max rel err {worst:.2e}");
}

/// Edits a checkpoint's (name, tensor) list.
type Edit<'a> = dyn Fn(&mut Vec<(String, Tensor)>) + 'a;

#[test]
fn bad_checkpoints_give_clear_errors() {
    let src_dir = refdir().join("vlm");
    let tensors = load_all(&src_dir.join("model.safetensors"));
    let rewrite = |edit: &Edit<'_>| {
        let d = tempfile::tempdir().unwrap();
        std::fs::copy(src_dir.join("config.json"), d.path().join("config.json")).unwrap();
        let mut v: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        edit(&mut v);
        specforge_rs::weights::save_safetensors(&d.path().join("model.safetensors"), &v, None).unwrap();
        d
    };
    let err = |dir: &std::path::Path| match target::load(dir, Kind::Float, Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    };
    let a_log = "model.language_model.layers.0.linear_attn.A_log";
    let d = rewrite(&|v| v.retain(|(k, _)| k != a_log));
    let e = err(d.path());
    assert!(e.contains("missing") && e.contains(a_log), "{e}");
    let conv = "model.language_model.layers.1.linear_attn.conv1d.weight";
    let d = rewrite(&|v| {
        for (k, t) in v.iter_mut() {
            if k == conv {
                *t = t.narrow(2, 0, 3);
            }
        }
    });
    let e = err(d.path());
    assert!(e.contains(conv) && e.contains("[96, 1, 3]"), "{e}");
    let d =
        rewrite(&|v| v.push(("model.language_model.layers.3.linear_attn.A_log".into(), Tensor::zeros([4], (Kind::Float, Device::Cpu)))));
    let e = err(d.path());
    assert!(e.contains("unexpected") && e.contains("layers.3.linear_attn.A_log"), "{e}");
}

#[test]
fn invalid_inputs_give_errors() {
    let (model, g) = load("interval", Kind::Float);
    let err = |ids: &Tensor, cache: Option<&mut Cache>| match tch::no_grad(|| {
        model.forward(&ForwardInput { input_ids: ids, attention_mask: None, position_ids: None, capture: &[] }, cache)
    }) {
        Ok(_) => panic!("forward should fail"),
        Err(e) => e.to_string(),
    };
    let empty = Tensor::zeros([1, 0], (Kind::Int64, Device::Cpu));
    let e = err(&empty, None);
    assert!(e.contains("empty"), "{e}");
    let bad = Tensor::from_slice(&[3i64, 128]).view([1, 2]);
    let e = err(&bad, None);
    assert!(e.contains("out of range"), "{e}");
    // A cache whose layer 0 (linear attention) holds attention keys/values.
    let ids = g["ids_63"].narrow(1, 0, 4);
    let mut cache = Cache::new(8);
    cache.layers[0] = Some(LayerCache::Kv {
        k: Tensor::zeros([1, 2, 3, 32], (Kind::Float, Device::Cpu)),
        v: Tensor::zeros([1, 2, 3, 32], (Kind::Float, Device::Cpu)),
    });
    let e = err(&ids, Some(&mut cache));
    assert!(e.contains("linear-attention layer"), "{e}");
    let mut short = Cache::new(4);
    let e = err(&ids, Some(&mut short));
    assert!(e.contains("cache has 4 layers"), "{e}");
}
