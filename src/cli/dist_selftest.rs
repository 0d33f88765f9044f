//! `specforge-rs dist-selftest` (hidden): exercises the process group with exact expected values;
//! used by tests/dist.rs under `launch`, under plain torchrun-style variables, and for the
//! all-reduce bandwidth benchmark.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tch::{Device, Kind, Tensor};

use crate::dist::{BackendChoice, GroupOptions, ProcessGroup, ReduceOp};

/// Options of the self-test.
#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// Timeout of the rendezvous and of every collective, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Tensor sizes (elements) to check.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,1048576")]
    sizes: Vec<i64>,
    /// Dtypes to check: f32, bf16, f64, i64.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    dtypes: Vec<String>,
    /// Write `<dir>/rank<r>.pid` once the group is up (tests signal ranks by pid).
    #[arg(long)]
    pid_dir: Option<PathBuf>,
    /// After the checks, keep all-reducing a small tensor for this many seconds.
    #[arg(long, default_value_t = 0.0)]
    loop_secs: f64,
    /// This rank exits with code 3 right after joining (to test the launcher's failure report).
    #[arg(long)]
    fail_rank: Option<usize>,
    /// Measure all-reduce of an f32 tensor of this many MiB instead of the checks.
    #[arg(long)]
    bench_mb: Option<usize>,
    /// Timed iterations of the benchmark.
    #[arg(long, default_value_t = 10)]
    bench_iters: usize,
    /// Run the checks (and the benchmark) on this rank's GPU, i.e. through NCCL (needs the
    /// `nccl` feature and one GPU per local rank).
    #[arg(long)]
    cuda: bool,
}

fn kind_of(s: &str) -> anyhow::Result<Kind> {
    Ok(match s {
        "f32" => Kind::Float,
        "bf16" => Kind::BFloat16,
        "f64" => Kind::Double,
        "i64" => Kind::Int64,
        other => bail!("--dtypes: unknown dtype `{other}` (f32, bf16, f64, i64)"),
    })
}

/// Runs the self-test on the group from the environment.
pub fn run(a: SelftestArgs, rt: &crate::runtime::Runtime) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(a.timeout_ms);
    let t0 = Instant::now();
    let mut opts = GroupOptions::with_timeout(timeout);
    if a.cuda {
        opts.backend = BackendChoice::RequireNccl;
    }
    let pg = ProcessGroup::new(rt.env.clone(), &opts)?;
    let (rank, world) = (pg.rank(), pg.world_size());
    tracing::debug!(rank, world, "joined in {:.2} s", t0.elapsed().as_secs_f64());
    if let Some(dir) = &a.pid_dir {
        let tmp = dir.join(format!(".rank{rank}.pid.tmp"));
        let path = dir.join(format!("rank{rank}.pid"));
        std::fs::write(&tmp, std::process::id().to_string())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if a.fail_rank == Some(rank) {
        eprintln!("dist-selftest: rank {rank} failing on purpose (--fail-rank)");
        std::process::exit(3);
    }
    let device = if a.cuda {
        match pg.cuda_device() {
            Some(d) => d,
            None if world == 1 && rt.device.is_cuda() => rt.device,
            None => bail!(
                "rank {rank}: --cuda, but the group has no NCCL backend (built without the \
                 `nccl` feature, or no GPU visible: this rank's device is {})",
                rt.device_name()
            ),
        }
    } else {
        Device::Cpu
    };
    if let Some(mb) = a.bench_mb {
        return bench(&pg, mb, a.bench_iters, timeout, device);
    }
    let mut checks = 0usize;
    for d in &a.dtypes {
        let kind = kind_of(d)?;
        for &n in &a.sizes {
            checks += check_all(&pg, kind, n, timeout, device).with_context(|| format!("rank {rank}: dtype {d}, {n} elements"))?;
        }
    }
    pg.barrier(timeout)?;
    checks += 1;
    if a.loop_secs > 0.0 {
        let until = Instant::now() + Duration::from_secs_f64(a.loop_secs);
        let mut t = Tensor::ones([1000], (Kind::Float, device));
        let mut rounds = 0u64;
        while Instant::now() < until {
            pg.all_reduce(&mut t, ReduceOp::Max, timeout)?;
            rounds += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::debug!(rank, rounds, "loop done");
        pg.barrier(timeout)?;
    }
    println!("dist-selftest: rank {rank}/{world} ok ({checks} checks)");
    let _ = std::io::stdout().flush();
    Ok(())
}

/// Rank `r`'s input for the reductions: (r+1) * (i mod 7 + 1), exact in bf16 for small worlds.
fn pattern(r: usize, n: i64, kind: Kind) -> Tensor {
    let i = Tensor::arange(n, (Kind::Int64, tch::Device::Cpu));
    ((i.remainder(7) + 1) * (r as i64 + 1)).to_kind(kind)
}

/// Rank `r`'s input for all_gather and broadcast: 16 r + i mod 8 (exact in bf16).
fn tag(r: usize, n: i64, kind: Kind) -> Tensor {
    let i = Tensor::arange(n, (Kind::Int64, tch::Device::Cpu));
    (i.remainder(8) + 16 * r as i64).to_kind(kind)
}

fn same(what: &str, got: &Tensor, want: &Tensor) -> anyhow::Result<()> {
    let got = &got.to_device(Device::Cpu);
    if got.size() != want.size() || got.kind() != want.kind() {
        bail!("{what}: got shape {:?} {:?}, want {:?} {:?}", got.size(), got.kind(), want.size(), want.kind());
    }
    let diff = got.to_kind(Kind::Double) - want.to_kind(Kind::Double);
    let bad = diff.ne(0.0).nonzero();
    if bad.size()[0] > 0 {
        let idx = bad.int64_value(&[0, 0]);
        bail!(
            "{what}: {} of {} elements differ; first at {idx}: got {}, want {}",
            bad.size()[0],
            got.numel(),
            got.to_kind(Kind::Double).double_value(&[idx]),
            want.to_kind(Kind::Double).double_value(&[idx])
        );
    }
    Ok(())
}

/// all_reduce (sum, max, avg for floats), broadcast and all_gather on one dtype and size.
fn check_all(pg: &ProcessGroup, kind: Kind, n: i64, timeout: Duration, device: Device) -> anyhow::Result<usize> {
    let (rank, world) = (pg.rank(), pg.world_size());
    // Inputs are built on the CPU and moved; results are compared on the CPU.
    let on = |t: Tensor| t.to_device(device);
    let all = |f: &dyn Fn(usize) -> Tensor| -> Vec<Tensor> { (0..world).map(|r| f(r).to_kind(Kind::Double)).collect() };
    let mut checks = 0;

    let mut t = on(pattern(rank, n, kind));
    pg.all_reduce(&mut t, ReduceOp::Sum, timeout)?;
    let want = all(&|r| pattern(r, n, kind)).into_iter().reduce(|a, b| a + b).context("empty world")?;
    same("all_reduce sum", &t, &want.to_kind(kind))?;
    checks += 1;

    // Max over ranks of a pattern whose per-element winner varies with the rank.
    let shuffled = |r: usize| (pattern(r, n, kind).to_kind(Kind::Int64) * 3).remainder(11).to_kind(kind);
    let mut t = on(shuffled(rank));
    pg.all_reduce(&mut t, ReduceOp::Max, timeout)?;
    let want = all(&|r| shuffled(r)).into_iter().reduce(|a, b| a.maximum(&b)).context("empty world")?;
    same("all_reduce max", &t, &want.to_kind(kind))?;
    checks += 1;

    if matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Double) {
        let mut t = on(pattern(rank, n, kind));
        pg.all_reduce(&mut t, ReduceOp::Avg, timeout)?;
        let want = all(&|r| pattern(r, n, kind)).into_iter().reduce(|a, b| a + b).context("empty world")? / world as f64;
        same("all_reduce avg", &t, &want.to_kind(kind))?;
        checks += 1;
    }

    let root = world - 1;
    let mut t = on(tag(rank, n, kind));
    pg.broadcast(&mut t, root, timeout)?;
    same("broadcast", &t, &tag(root, n, kind))?;
    checks += 1;

    let got = pg.all_gather(&on(tag(rank, n, kind)), timeout)?;
    if got.len() != world {
        bail!("all_gather returned {} tensors for {world} ranks", got.len());
    }
    for (r, g) in got.iter().enumerate() {
        same(&format!("all_gather from rank {r}"), g, &tag(r, n, kind))?;
    }
    checks += 1;
    Ok(checks)
}

/// All-reduce bandwidth: prints one machine-readable line on rank 0.
fn bench(pg: &ProcessGroup, mb: usize, iters: usize, timeout: Duration, device: Device) -> anyhow::Result<()> {
    let n = (mb * (1 << 20) / 4) as i64;
    let mut t = Tensor::ones([n], (Kind::Float, device));
    for _ in 0..2 {
        pg.all_reduce(&mut t, ReduceOp::Sum, timeout)?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        pg.barrier(timeout)?;
        let s = Instant::now();
        pg.all_reduce(&mut t, ReduceOp::Sum, timeout)?;
        if let Device::Cuda(i) = device {
            // The clock must include the GPU work, not only its launch.
            tch::Cuda::synchronize(i as i64);
        }
        times.push(s.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let bytes = (n * 4) as f64;
    let world = pg.world_size() as f64;
    let algbw = bytes / median / 1e9;
    // Bus bandwidth as in nccl-tests: what each link carries in a ring all-reduce.
    let busbw = algbw * 2.0 * (world - 1.0) / world;
    if pg.is_main() {
        println!(
            "BENCH dist_all_reduce backend={} world={} dtype=f32 bytes={} iters={} median_ms={:.2} min_ms={:.2} max_ms={:.2} algbw_GBps={:.3} busbw_GBps={:.3}",
            if device.is_cuda() { "nccl" } else { "gloo" },
            pg.world_size(),
            bytes as u64,
            times.len(),
            median * 1e3,
            times[0] * 1e3,
            times[times.len() - 1] * 1e3,
            algbw,
            busbw
        );
    }
    pg.barrier(timeout)?;
    Ok(())
}
