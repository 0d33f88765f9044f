//! Logging, progress bars and small helpers shared by the stages.

pub mod bytes;
pub mod fs;
pub mod logging;
pub mod plot;
pub mod progress;
