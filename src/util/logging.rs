//! The tracing subscriber: `RUST_LOG`-style filtering (default `info`), to stderr. Colours only
//! when stderr is a terminal and `NO_COLOR` is unset (a log redirected to a file stays plain text).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Whether log lines may carry ANSI colours: stderr is a terminal and `NO_COLOR` is unset or
/// empty (no-color.org).
pub fn colour(stderr_is_terminal: bool, no_color: Option<&str>) -> bool {
    stderr_is_terminal && no_color.is_none_or(str::is_empty)
}

/// Installs the global subscriber once; later calls are no-ops.
pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = colour(std::io::stderr().is_terminal(), std::env::var("NO_COLOR").ok().as_deref());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).with_target(false).try_init();
}

#[cfg(test)]
mod tests {
    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(super::colour(true, None));
        assert!(super::colour(true, Some("")));
        assert!(!super::colour(true, Some("1")));
        assert!(!super::colour(false, None));
    }
}
