//! The AudioSocket protocol: the frame codec ([`frame`], no I/O) and a connection that reads
//! and writes whole frames over TCP ([`connection`]). See `docs/audiosocket.md` in the shared
//! folder and Asterisk's `res/res_audiosocket.c` for the protocol facts used here.

pub mod connection;
pub mod frame;

pub use connection::{ConnectionError, FrameReader, FrameWriter};
pub use frame::{AudioRate, Frame, FrameError, Kind};
