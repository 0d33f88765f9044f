//! Progress bars: one style, drawn on rank 0 only (hidden elsewhere and when stderr is no TTY
//! unless forced), with a throughput message the caller updates.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether this process draws bars: rank 0 (from `RANK`, default 0).
pub fn is_rank0() -> bool {
    std::env::var("RANK").ok().and_then(|r| r.parse::<u64>().ok()).unwrap_or(0) == 0
}

/// A bar over `len` units named `what`.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), if is_rank0() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
    let style = ProgressStyle::with_template("{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_prefix(what.to_string());
    pb
}
