//! An exported head, loaded by an independent Python implementation of what vLLM / SGLang compute
//! (tests/reference/serving_draft.py, written from the serving contract), reproduces our draft's
//! logits: at every context position and for a chain of draft steps, EAGLE-3 and EAGLE-3.1.

mod common;

use common::*;
use specforge_rs::draft::{Eagle3Config, Eagle3Draft};
use specforge_rs::export::{export, validate_dir, Format};
use specforge_rs::target::head::TargetHead;
use specforge_rs::weights::{save_safetensors, SafetensorsFile};
use tch::{Device, Kind, Tensor};

/// Our logits for the same inputs: a context pass over T positions, then k chained steps.
fn our_logits(draft: &Eagle3Draft, embed: &Tensor, aux: &Tensor, next_ids: &Tensor, steps: &[i64]) -> (Tensor, Tensor, Tensor) {
    tch::no_grad(|| {
        let t = aux.size()[0];
        let hidden = draft.project_hidden_states(&aux.unsqueeze(0)).unwrap();
        let emb = embed.index_select(0, next_ids).unsqueeze(0);
        let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let (cos, sin) = draft.rope(&pos, Kind::Float);
        let (out, mut keys, mut values) = draft.step_cached(&emb, &hidden, &cos, &sin, None);
        let scatter = |post: &Tensor| {
            let l = draft.compute_logits(post); // [n, Vd]
            let full = Tensor::full([l.size()[0], draft.cfg.vocab_size], f64::NEG_INFINITY, (Kind::Float, Device::Cpu));
            full.index_copy(1, &draft.draft_token_ids(), &l)
        };
        let context = scatter(&out.post.squeeze_dim(0));
        let mut prev = out.next_hidden(draft.cfg.norm_output).narrow(1, t - 1, 1);
        let mut step_logits = Vec::new();
        for (j, &tok) in steps.iter().enumerate() {
            let emb = embed.index_select(0, &Tensor::from_slice(&[tok])).unsqueeze(0);
            let pos = Tensor::from_slice(&[t - 1 + j as i64 + 1]).view([1, 1]);
            let (cos, sin) = draft.rope(&pos, Kind::Float);
            let (o, k, v) = draft.step_cached(&emb, &prev, &cos, &sin, Some((&keys, &values)));
            keys = Tensor::cat(&[keys, k], 2);
            values = Tensor::cat(&[values, v], 2);
            step_logits.push(scatter(&o.post.squeeze_dim(0)));
            prev = o.next_hidden(draft.cfg.norm_output).shallow_clone();
        }
        (context, Tensor::cat(&step_logits, 0), out.post.squeeze_dim(0))
    })
}

fn compare(a: &Tensor, e: &Tensor, what: &str) {
    let finite = e.isfinite();
    assert!(a.isfinite().equal(&finite), "{what}: the -inf pattern (draft vocabulary) differs");
    let (a, e) = (a.masked_select(&finite), e.masked_select(&finite));
    // Both sides run fp32 on the same bf16 weights; only summation order differs.
    assert_close(what, &a, &e, Kind::Float);
}

#[test]
fn export_matches_the_serving_side_forward() {
    let target_dir = reference("dense_targets.py", &[]).join("llama");
    let head = TargetHead::load(&target_dir, Kind::Float, Device::Cpu).unwrap();
    for eagle31 in [false, true] {
        tch::manual_seed(11);
        let cfg = Eagle3Config::for_target(&head.cfg, vec![1, 2, 4], 40, eagle31);
        let mut t2d = Tensor::zeros([cfg.vocab_size], (Kind::Bool, Device::Cpu));
        let _ = t2d.index_fill_(0, &Tensor::randperm(cfg.vocab_size, (Kind::Int64, Device::Cpu)).narrow(0, 0, 40), 1);
        let draft = Eagle3Draft::new(cfg, &t2d, Device::Cpu).unwrap();
        // Randomise every tensor, norms included, so no term hides behind a one.
        tch::no_grad(|| {
            for (name, mut p) in draft.named_parameters() {
                let noise = Tensor::randn(p.size(), (Kind::Float, Device::Cpu));
                let v = if name.ends_with("norm.weight") || name.contains("fc_norm") || name.contains("layernorm") {
                    noise * 0.2 + 1.0
                } else {
                    noise * 0.1
                };
                p.copy_(&v);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        export(&draft, dir.path(), Format::Vllm, None).unwrap();
        validate_dir(dir.path()).unwrap();
        let exported = Eagle3Draft::load(dir.path(), Device::Cpu).unwrap(); // bf16 weights, fp32 compute

        let t = 12;
        let aux = Tensor::randn([t, 3 * 64], (Kind::Float, Device::Cpu));
        let next_ids = Tensor::randint(96, [t], (Kind::Int64, Device::Cpu));
        let steps = [5i64, 17, 60];
        let inputs = dir.path().join("inputs.safetensors");
        save_safetensors(
            &inputs,
            &[
                ("aux".into(), aux.shallow_clone()),
                ("input_ids".into(), next_ids.shallow_clone()),
                ("draft_tokens".into(), Tensor::from_slice(&steps)),
            ],
            None,
        )
        .unwrap();
        let embed = dir.path().join("embed.safetensors");
        save_safetensors(&embed, &[("embed_tokens.weight".into(), head.embed_tokens.shallow_clone())], None).unwrap();
        let out = dir.path().join("serving.safetensors");
        let status = std::process::Command::new(python())
            .arg(root().join("tests/reference/serving_draft.py"))
            .arg("--head")
            .arg(dir.path())
            .arg("--embed")
            .arg(&embed)
            .arg("--inputs")
            .arg(&inputs)
            .arg("--out")
            .arg(&out)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "serving_draft.py failed");
        let r = SafetensorsFile::open(&out).unwrap();
        let (context, step, post) = our_logits(&exported, &head.embed_tokens, &aux, &next_ids, &steps);
        compare(&context, &r.tensor("context_logits").unwrap(), &format!("context logits (eagle3.1 = {eagle31})"));
        compare(&step, &r.tensor("step_logits").unwrap(), &format!("step logits (eagle3.1 = {eagle31})"));
        assert_close("context hidden", &post, &r.tensor("context_hidden_post").unwrap(), Kind::Float);
        // And the trained (fp32) head agrees with its bf16 export within bf16 tolerance.
        let (full, _, _) = our_logits(&draft, &head.embed_tokens, &aux, &next_ids, &steps);
        let finite = full.isfinite();
        assert_close("fp32 head vs its bf16 export", &context.masked_select(&finite), &full.masked_select(&finite), Kind::BFloat16);
    }
}
