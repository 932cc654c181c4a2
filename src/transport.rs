//! The two halves of a call's audio transport, so one call runs the same over an AudioSocket
//! connection (`serve`) or the machine's microphone and speakers (`console`): a
//! [`CallInput`] the call reads AudioSocket [`Frame`]s from (the id first, then audio, DTMF,
//! hangup) and a [`CallOutput`] it writes the agent's 20 ms frames to.
//!
//! Two halves rather than one object because the call reads and writes at the same time (one
//! `select!` polls the read while the pacing tick writes).

use crate::audiosocket::{AudioRate, ConnectionError, Frame, FrameReader, FrameWriter};
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite};

/// Where a call's frames come from.
pub trait CallInput: Send {
    /// The next frame: first the call's [`Frame::Id`], then audio (slin at the frame's rate),
    /// DTMF and hangup frames. `Ok(None)` means the caller hung up. Must be cancel-safe: the
    /// call drops this future whenever another event comes first, and nothing may be lost.
    ///
    /// # Errors
    /// Bad bytes or a failed socket or audio device; each ends the call.
    fn read_frame(&mut self) -> impl Future<Output = Result<Option<Frame>, ConnectionError>> + Send;

    /// After the call: reads and discards what the peer still sends until its end of stream
    /// or `within`, so closing a socket never sends a reset (closing with unread bytes would).
    /// True if the peer's end arrived. A transport with no peer (the console) returns at once.
    fn drain(&mut self, within: std::time::Duration) -> impl Future<Output = bool> + Send {
        let _ = within;
        std::future::ready(true)
    }
}

/// Where a call's audio goes.
pub trait CallOutput: Send {
    /// Plays (sends) one 20 ms frame of agent audio, `samples` of slin at `rate`.
    fn write_samples(&mut self, rate: AudioRate, samples: &[i16]) -> impl Future<Output = std::io::Result<()>> + Send;

    /// The agent ends the call: for AudioSocket the hangup frame and a FIN; for the console,
    /// the last words play out.
    fn hangup(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;

    /// The caller ended the call: close without a hangup frame (a FIN on a socket).
    fn close(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl<R: AsyncRead + Unpin + Send> CallInput for FrameReader<R> {
    async fn read_frame(&mut self) -> Result<Option<Frame>, ConnectionError> {
        FrameReader::read_frame(self).await
    }

    async fn drain(&mut self, within: std::time::Duration) -> bool {
        FrameReader::drain(self, within).await
    }
}

impl<W: AsyncWrite + Unpin + Send> CallOutput for FrameWriter<W> {
    async fn write_samples(&mut self, rate: AudioRate, samples: &[i16]) -> std::io::Result<()> {
        FrameWriter::write_samples(self, rate, samples).await
    }

    async fn hangup(&mut self) -> std::io::Result<()> {
        FrameWriter::hangup(self).await
    }

    async fn close(&mut self) -> std::io::Result<()> {
        FrameWriter::shutdown(self).await
    }
}
