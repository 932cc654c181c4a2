//! The parsers under fuzzing, compiled from the main crate's own sources.
#![allow(dead_code, unused_imports)]

#[path = "../../src/agi.rs"]
pub mod agi;
#[path = "../../src/directory.rs"]
pub mod directory;
#[path = "../../src/logsafe.rs"]
pub mod logsafe;

pub mod audiosocket {
    #[path = "../../../src/audiosocket/frame.rs"]
    pub mod frame;
    pub use frame::{AudioRate, Frame, FrameError, Kind};
}
