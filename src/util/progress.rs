//! Progress bars: one style, drawn only by the process that prints (rank 0, as
//! `Runtime::install` sets it) and hidden elsewhere, with a throughput message the caller updates.

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static VISIBLE: AtomicBool = AtomicBool::new(true);

/// Whether bars draw in this process (set once from the runtime).
pub fn set_visible(visible: bool) {
    VISIBLE.store(visible, Ordering::Relaxed);
}

/// A bar over `len` units named `what`.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let target = if VISIBLE.load(Ordering::Relaxed) { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    let pb = ProgressBar::with_draw_target(Some(len), target);
    let style = ProgressStyle::with_template("{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_prefix(what.to_string());
    pb
}
