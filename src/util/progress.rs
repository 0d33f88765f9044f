//! Progress bars: one style, drawn only by the process that prints (rank 0, as
//! `Runtime::install` sets it), with a throughput message the caller updates. On a terminal they
//! redraw in place; when stderr is a file or a pipe (a log of a multi-hour run) they write a
//! plain line every few seconds instead, so the log shows where the run is without control codes.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

static VISIBLE: AtomicBool = AtomicBool::new(true);

/// Seconds between plain progress lines when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// Whether bars draw in this process (set once from the runtime).
pub fn set_visible(visible: bool) {
    VISIBLE.store(visible, Ordering::Relaxed);
}

/// A bar over `len` units named `what`.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let terminal = std::io::stderr().is_terminal();
    let target = match (VISIBLE.load(Ordering::Relaxed), terminal) {
        (false, _) => ProgressDrawTarget::hidden(),
        (true, true) => ProgressDrawTarget::stderr(),
        (true, false) => ProgressDrawTarget::term_like_with_hz(Box::new(PlainLines::new(PLAIN_EVERY)), 1),
    };
    let pb = ProgressBar::with_draw_target(Some(len), target);
    let template = if terminal {
        "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}"
    } else {
        "{prefix}: {pos}/{len} ({percent}%), {elapsed_precise} elapsed, eta {eta} {msg}"
    };
    pb.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb.set_prefix(what.to_string());
    pb
}

/// A "terminal" that ignores cursor movement and prints the bar's text as a plain stderr line at
/// most once per `every`.
#[derive(Debug)]
struct PlainLines {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl PlainLines {
    fn new(every: Duration) -> Self {
        PlainLines { every, last: Mutex::new(None) }
    }

    fn emit(&self, s: &str) -> std::io::Result<()> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(());
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < self.every) {
            return Ok(());
        }
        *last = Some(Instant::now());
        writeln!(std::io::stderr(), "{s}")
    }
}

impl TermLike for PlainLines {
    fn width(&self) -> u16 {
        200
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.emit(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.emit(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
