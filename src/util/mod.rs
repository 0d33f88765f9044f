//! Logging, progress bars and small helpers shared by the stages.

pub mod logging;
pub mod progress;
