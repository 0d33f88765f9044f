//! Timing half of the Qwen3.5 benchmark; `scripts/bench_qwen35.py` builds the model, times
//! transformers on the same inputs and calls this. Not a test.
//!
//! Usage: `qwen35_bench MODEL_DIR FORWARD_T KERNEL_T REPEATS KERNEL_INPUTS.safetensors`
//! Prints one `name seconds` line per measurement (median of REPEATS runs after one warm-up):
//! `forward` (the full model with logits, no cache, capture [3, 7]), `chunk` and `recurrent` (the delta-rule
//! kernels on the inputs in KERNEL_INPUTS: q, k, v `[1, T, H, d]`, g, beta `[1, T, H]`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use specforge_rs::target::qwen3_5::{chunk_gated_delta_rule, recurrent_gated_delta_rule};
use specforge_rs::target::{self, ForwardInput};
use tch::{Device, Kind, Tensor};

fn median_secs(repeats: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: first-call allocations and lazy libtorch initialisation
    let mut v: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        bail!("usage: qwen35_bench MODEL_DIR FORWARD_T KERNEL_T REPEATS KERNEL_INPUTS");
    }
    let dir = PathBuf::from(&args[1]);
    let forward_t: i64 = args[2].parse().context("FORWARD_T")?;
    let kernel_t: i64 = args[3].parse().context("KERNEL_T")?;
    let repeats: usize = args[4].parse().context("REPEATS")?;
    let inputs: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&args[5])?.into_iter().collect();
    let get = |k: &str| inputs.get(k).with_context(|| format!("{k} missing in {}", args[5]));
    eprintln!("libtorch threads: {}", tch::get_num_threads());

    let model = target::load(&dir, Kind::Float, Device::Cpu)?;
    let ids = get("input_ids")?.narrow(1, 0, forward_t);
    let secs = tch::no_grad(|| -> Result<f64> {
        let mut err = None;
        let s = median_secs(repeats, || {
            // Logits too, as transformers' CausalLM forward computes them.
            match model.forward(&ForwardInput { input_ids: &ids, attention_mask: None, position_ids: None, capture: &[3, 7] }, None) {
                Ok(o) => drop(model.logits(&o.last_hidden)),
                Err(e) => err = Some(e),
            }
        });
        match err {
            Some(e) => Err(e.into()),
            None => Ok(s),
        }
    })?;
    println!("forward {secs}");

    let cut = |k: &str| -> Result<Tensor> { Ok(get(k)?.narrow(1, 0, kernel_t)) };
    let (q, k, v, g, beta) = (cut("q")?, cut("k")?, cut("v")?, cut("g")?, cut("beta")?);
    let chunk = tch::no_grad(|| {
        median_secs(repeats, || {
            let _ = chunk_gated_delta_rule(&q, &k, &v, &g, &beta, None, 64);
        })
    });
    println!("chunk {chunk}");
    let recurrent = tch::no_grad(|| {
        median_secs(repeats.min(3), || {
            let _ = recurrent_gated_delta_rule(&q, &k, &v, &g, &beta, None);
        })
    });
    println!("recurrent {recurrent}");
    Ok(())
}
