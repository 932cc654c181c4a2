//! The parsers under fuzzing, compiled from the main crate's own sources.
#![allow(dead_code, unused_imports)]

#[path = "../../src/agi.rs"]
pub mod agi;
#[path = "../../src/directory.rs"]
pub mod directory;
#[path = "../../src/logsafe.rs"]
pub mod logsafe;

// Declared at the top: a `#[path]` inside an inline module resolves from a folder
// (fuzz/src/audiosocket/) that does not exist.
#[path = "../../src/audiosocket/frame.rs"]
pub mod frame;

pub mod audiosocket {
    pub use super::frame;
    pub use super::frame::{AudioRate, Frame, FrameError, Kind};
}

/// The session counter `agi.rs` bumps; the Prometheus registry is not under fuzzing.
pub mod metrics {
    /// Does nothing here (see `src/metrics.rs` for the real counter).
    pub fn agi_session(_script: Option<&str>, _result: &'static str) {}
}
