//! Target forward throughput: `cargo run --release --example bench_target -- DIR BATCH SEQ ITERS`.
//! Prints one machine-readable line: `bench_target impl=specforge-rs ... tokens_per_s=X`.
//! scripts/bench.sh runs it beside tests/reference/bench_target.py on the same inputs.

use std::time::Instant;

use specforge_rs::target::{self, ForwardInput};
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).map_or(".cache/smollm2-135m-instruct", String::as_str));
    let b: i64 = args.get(2).map_or(Ok(4), |s| s.parse())?;
    let t: i64 = args.get(3).map_or(Ok(256), |s| s.parse())?;
    let iters: usize = args.get(4).map_or(Ok(5), |s| s.parse())?;
    let model = target::load(&dir, Kind::Float, Device::Cpu)?;
    let l = model.config().num_hidden_layers;
    // The same pseudo-random ids as the Python side: (i * 7919 + 13) % V.
    let v = model.config().vocab_size;
    let ids: Vec<i64> = (0..b * t).map(|i| (i * 7919 + 13) % v).collect();
    let ids = Tensor::from_slice(&ids).view([b, t]);
    let capture = [2, l / 2, l - 3];
    let run = || {
        tch::no_grad(|| model.forward(&ForwardInput { input_ids: &ids, attention_mask: None, position_ids: None, capture: &capture }, None))
    };
    run()?;
    let start = Instant::now();
    for _ in 0..iters {
        let o = run()?;
        let _ = o.last_hidden.sum(Kind::Float).double_value(&[]);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "bench_target impl=specforge-rs batch={b} seq={t} iters={iters} threads={} tokens_per_s={:.1}",
        tch::get_num_threads(),
        (b * t * iters as i64) as f64 / secs
    );
    Ok(())
}
