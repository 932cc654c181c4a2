//! A connection that reads and writes whole AudioSocket frames, split into a reading half and
//! a writing half so one task can read the caller while another paces the agent's audio.

use super::frame::{self, AudioRate, Frame, FrameError};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Why reading a frame failed. Every variant ends the call.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The bytes were not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer closed the socket in the middle of a frame.
    #[error("truncated frame: connection closed with {0} bytes of an incomplete frame buffered")]
    Truncated(usize),
    /// A socket error (for example a reset).
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The console's audio device failed (unplugged, sound server gone): the text says which.
    #[error("audio device: {0}")]
    Device(String),
}

/// Reads whole frames from the read half of an AudioSocket connection.
#[derive(Debug)]
pub struct FrameReader<R> {
    stream: R,
    buffer: BytesMut,
}

/// Writes whole frames to the write half of an AudioSocket connection. Each call writes a
/// complete frame in one `write_all` (Asterisk before 20.19 / 22.9 mishandled partial headers).
#[derive(Debug)]
pub struct FrameWriter<W> {
    stream: W,
    buffer: BytesMut,
}

/// Splits a TCP stream into a frame reader and a frame writer, with `TCP_NODELAY` set so a
/// 20 ms frame leaves at once.
pub fn split(stream: TcpStream) -> (FrameReader<OwnedReadHalf>, FrameWriter<OwnedWriteHalf>) {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    (FrameReader::new(r), FrameWriter::new(w))
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a byte stream.
    pub fn new(stream: R) -> Self {
        FrameReader {
            stream,
            buffer: BytesMut::with_capacity(4096),
        }
    }

    /// Reads the next whole frame. `Ok(None)` is a clean end of stream (the caller hung up:
    /// Asterisk closes the socket without a hangup frame). Cancel-safe: bytes read before a
    /// cancellation stay buffered.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ConnectionError> {
        loop {
            if let Some(frame) = Frame::parse(&mut self.buffer)? {
                return Ok(Some(frame));
            }
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnectionError::Truncated(self.buffer.len()))
                };
            }
        }
    }

    /// Reads and discards everything until the peer's FIN (EOF) or `within`, whichever comes
    /// first; returns true on EOF. Used when closing: a socket closed with unread bytes in its
    /// receive buffer sends a reset instead of a FIN. Memory stays at the reader's buffer.
    pub async fn drain(&mut self, within: std::time::Duration) -> bool {
        let drain = async {
            loop {
                self.buffer.clear();
                match self.stream.read_buf(&mut self.buffer).await {
                    Ok(0) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        };
        let eof = tokio::time::timeout(within, drain).await.unwrap_or(false);
        self.buffer.clear();
        eof
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a byte sink.
    pub fn new(stream: W) -> Self {
        FrameWriter {
            stream,
            buffer: BytesMut::with_capacity(2048),
        }
    }

    /// Writes one frame.
    pub async fn write_frame(&mut self, frame: &Frame) -> std::io::Result<()> {
        self.buffer.clear();
        frame.encode(&mut self.buffer);
        self.stream.write_all(&self.buffer).await
    }

    /// Writes one audio frame of samples (s16le) without building a [`Frame`]; reuses the
    /// writer's buffer so the 20 ms pacing loop does not allocate.
    pub async fn write_samples(&mut self, rate: AudioRate, samples: &[i16]) -> std::io::Result<()> {
        self.buffer.clear();
        frame::encode_samples(&mut self.buffer, rate, samples);
        self.stream.write_all(&self.buffer).await
    }

    /// Sends the hangup frame (0x00) and shuts the write side down with a FIN (never a reset:
    /// Asterisk fails the call with an ERROR on a reset).
    pub async fn hangup(&mut self) -> std::io::Result<()> {
        self.write_frame(&Frame::Hangup).await?;
        self.stream.shutdown().await
    }

    /// Shuts the write side down (FIN) without a hangup frame.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.stream.shutdown().await
    }
}
