//! AudioSocket frame codec: parsing and encoding of whole frames, no I/O.
//!
//! Wire format (Asterisk `include/asterisk/res_audiosocket.h`, `res/res_audiosocket.c`):
//! every message is `kind: u8`, `length: u16` big-endian, then `length` payload bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;
use uuid::Uuid;

/// Size of the frame header in bytes: kind (1) + big-endian payload length (2).
pub const HEADER_LEN: usize = 3;

/// Largest payload the 16-bit length field can describe, in bytes.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// Kind byte of an AudioSocket frame (`enum ast_audiosocket_msg_kind` in
/// `res_audiosocket.h`, Asterisk 22.7+ for the 0x11..0x18 rates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// 0x00: hang up. Only the server sends it; a caller hangup is a plain TCP close.
    Hangup,
    /// 0x01: the call's UUID, 16 raw bytes; always the first frame from Asterisk.
    Id,
    /// 0x03: one DTMF digit as an ASCII byte (Asterisk 20.14 / 21.9 / 22.4 and later).
    Dtmf,
    /// 0x10..=0x18: signed linear 16-bit little-endian mono audio at the given rate.
    Audio(AudioRate),
    /// 0xff: error, with an optional code byte; defined but never sent by current Asterisk.
    Error,
}

/// The sample rates of the slin audio kinds 0x10..=0x18, in Hz.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AudioRate {
    /// 0x10, 8000 Hz (the `AudioSocket()` application always uses this).
    Slin8,
    /// 0x11, 12000 Hz.
    Slin12,
    /// 0x12, 16000 Hz (`Dial(AudioSocket/...c(slin16))`).
    Slin16,
    /// 0x13, 24000 Hz.
    Slin24,
    /// 0x14, 32000 Hz.
    Slin32,
    /// 0x15, 44100 Hz.
    Slin44,
    /// 0x16, 48000 Hz.
    Slin48,
    /// 0x17, 96000 Hz.
    Slin96,
    /// 0x18, 192000 Hz.
    Slin192,
}

impl AudioRate {
    const ALL: [AudioRate; 9] = [
        AudioRate::Slin8,
        AudioRate::Slin12,
        AudioRate::Slin16,
        AudioRate::Slin24,
        AudioRate::Slin32,
        AudioRate::Slin44,
        AudioRate::Slin48,
        AudioRate::Slin96,
        AudioRate::Slin192,
    ];

    /// Sample rate in Hz.
    pub fn hz(self) -> u32 {
        match self {
            AudioRate::Slin8 => 8000,
            AudioRate::Slin12 => 12000,
            AudioRate::Slin16 => 16000,
            AudioRate::Slin24 => 24000,
            AudioRate::Slin32 => 32000,
            AudioRate::Slin44 => 44100,
            AudioRate::Slin48 => 48000,
            AudioRate::Slin96 => 96000,
            AudioRate::Slin192 => 192000,
        }
    }

    /// The audio kind for a sample rate in Hz, if AudioSocket has one.
    pub fn from_hz(hz: u32) -> Option<AudioRate> {
        AudioRate::ALL.into_iter().find(|r| r.hz() == hz)
    }

    /// Samples in one 20 ms frame at this rate (160 at 8 kHz, 320 at 16 kHz).
    pub fn samples_per_20ms(self) -> usize {
        self.hz() as usize / 50
    }
}

impl Kind {
    /// The kind for a wire byte, or `None` for a byte no Asterisk version defines.
    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            0x00 => Kind::Hangup,
            0x01 => Kind::Id,
            0x03 => Kind::Dtmf,
            0x10..=0x18 => Kind::Audio(AudioRate::ALL[(b - 0x10) as usize]),
            0xff => Kind::Error,
            _ => return None,
        })
    }

    /// The wire byte of this kind.
    pub fn byte(self) -> u8 {
        match self {
            Kind::Hangup => 0x00,
            Kind::Id => 0x01,
            Kind::Dtmf => 0x03,
            Kind::Audio(rate) => 0x10 + AudioRate::ALL.iter().position(|r| *r == rate).unwrap() as u8,
            Kind::Error => 0xff,
        }
    }
}

/// One decoded AudioSocket frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Hangup (0x00), no payload.
    Hangup,
    /// The call's UUID (0x01).
    Id(Uuid),
    /// One DTMF digit (0x03): `0-9`, `*`, `#`, `A-D`.
    Dtmf(char),
    /// Audio (0x10..=0x18): the raw payload bytes, normally slin (s16le); may be any length,
    /// including odd ones (Asterisk 22 sends 72..448-byte frames at the end of a playback).
    Audio { rate: AudioRate, payload: Bytes },
    /// Error (0xff) with its optional code byte.
    Error(Option<u8>),
}

/// Why bytes could not be decoded into a frame. Each of these ends the call it came on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A kind byte that no Asterisk version defines.
    #[error("unknown AudioSocket frame kind 0x{0:02x} (length {1})")]
    UnknownKind(u8, usize),
    /// An id frame whose payload is not 16 bytes.
    #[error("id frame with {0}-byte payload (a UUID is 16 bytes)")]
    BadId(usize),
    /// A DTMF frame that is not exactly one valid digit.
    #[error("DTMF frame with invalid payload {0:?}")]
    BadDtmf(Vec<u8>),
    /// A hangup frame with a payload.
    #[error("hangup frame with {0}-byte payload (must be empty)")]
    BadHangup(usize),
    /// An audio frame with no payload (Asterisk treats this as fatal too).
    #[error("audio frame with zero-length payload")]
    EmptyAudio,
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Hangup => write!(f, "hangup"),
            Frame::Id(u) => write!(f, "id {u}"),
            Frame::Dtmf(d) => write!(f, "dtmf {d}"),
            Frame::Audio { rate, payload } => write!(f, "audio {} Hz {} bytes", rate.hz(), payload.len()),
            Frame::Error(c) => write!(f, "error {c:?}"),
        }
    }
}

impl Frame {
    /// Decodes one frame from the front of `buf`, consuming its bytes.
    ///
    /// Returns `Ok(None)` (consuming nothing) while `buf` holds less than a whole frame: the
    /// caller reads more bytes and tries again. Errors consume the bad frame.
    pub fn parse(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind_byte = buf[0];
        let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
        if buf.len() < HEADER_LEN + len {
            // An unknown kind is reported as soon as its header is seen: waiting for a payload
            // of a frame we would reject anyway only delays the error.
            if Kind::from_byte(kind_byte).is_none() {
                return Err(FrameError::UnknownKind(kind_byte, len));
            }
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(len);
        let kind = Kind::from_byte(kind_byte).ok_or(FrameError::UnknownKind(kind_byte, len))?;
        let frame = match kind {
            Kind::Hangup if len == 0 => Frame::Hangup,
            Kind::Hangup => return Err(FrameError::BadHangup(len)),
            Kind::Id => {
                let bytes: [u8; 16] = payload[..].try_into().map_err(|_| FrameError::BadId(len))?;
                Frame::Id(Uuid::from_bytes(bytes))
            }
            Kind::Dtmf => match payload[..] {
                [d] if matches!(d, b'0'..=b'9' | b'*' | b'#' | b'A'..=b'D') => Frame::Dtmf(d as char),
                _ => return Err(FrameError::BadDtmf(payload.to_vec())),
            },
            Kind::Audio(_) if len == 0 => return Err(FrameError::EmptyAudio),
            // A slice of the read buffer: no copy per 20 ms frame.
            Kind::Audio(rate) => Frame::Audio {
                rate,
                payload: payload.freeze(),
            },
            Kind::Error => Frame::Error(payload.first().copied()),
        };
        Ok(Some(frame))
    }

    /// The kind of this frame.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Hangup => Kind::Hangup,
            Frame::Id(_) => Kind::Id,
            Frame::Dtmf(_) => Kind::Dtmf,
            Frame::Audio { rate, .. } => Kind::Audio(*rate),
            Frame::Error(_) => Kind::Error,
        }
    }

    /// Appends the wire bytes of this frame to `out`.
    ///
    /// # Panics
    /// If an audio payload is longer than [`MAX_PAYLOAD`] bytes.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Frame::Hangup => put_header(out, Kind::Hangup, 0),
            Frame::Id(u) => {
                put_header(out, Kind::Id, 16);
                out.put_slice(u.as_bytes());
            }
            Frame::Dtmf(d) => {
                put_header(out, Kind::Dtmf, 1);
                out.put_u8(*d as u8);
            }
            Frame::Audio { rate, payload } => encode_audio(out, *rate, payload),
            Frame::Error(code) => {
                put_header(out, Kind::Error, code.is_some() as usize);
                if let Some(c) = code {
                    out.put_u8(*c);
                }
            }
        }
    }
}

/// Appends an audio frame of s16le bytes to `out` without building a [`Frame`].
///
/// # Panics
/// If `payload` is longer than [`MAX_PAYLOAD`] bytes.
pub fn encode_audio(out: &mut BytesMut, rate: AudioRate, payload: &[u8]) {
    put_header(out, Kind::Audio(rate), payload.len());
    out.put_slice(payload);
}

/// Appends an audio frame built from samples (written as s16le) to `out`.
pub fn encode_samples(out: &mut BytesMut, rate: AudioRate, samples: &[i16]) {
    put_header(out, Kind::Audio(rate), samples.len() * 2);
    for s in samples {
        out.put_i16_le(*s);
    }
}

fn put_header(out: &mut BytesMut, kind: Kind, len: usize) {
    assert!(
        len <= MAX_PAYLOAD,
        "AudioSocket payload of {len} bytes exceeds {MAX_PAYLOAD}"
    );
    out.reserve(HEADER_LEN + len);
    out.put_u8(kind.byte());
    out.put_u16(len as u16);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        assert_eq!(Frame::parse(&mut b).unwrap(), Some(f));
        assert!(b.is_empty());
    }

    #[test]
    fn kinds_roundtrip() {
        for b in [
            0x00u8, 0x01, 0x03, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0xff,
        ] {
            assert_eq!(Kind::from_byte(b).unwrap().byte(), b);
        }
        for b in [0x02u8, 0x04, 0x0f, 0x19, 0x42, 0xfe] {
            assert_eq!(Kind::from_byte(b), None, "0x{b:02x}");
        }
        assert_eq!(Kind::from_byte(0x11), Some(Kind::Audio(AudioRate::Slin12)));
        assert_eq!(Kind::from_byte(0x12), Some(Kind::Audio(AudioRate::Slin16)));
    }

    #[test]
    fn frames_roundtrip() {
        roundtrip(Frame::Hangup);
        roundtrip(Frame::Id(Uuid::new_v4()));
        roundtrip(Frame::Dtmf('#'));
        roundtrip(Frame::Audio {
            rate: AudioRate::Slin16,
            payload: vec![1; 640].into(),
        });
        roundtrip(Frame::Audio {
            rate: AudioRate::Slin8,
            payload: vec![7; 321].into(),
        });
        roundtrip(Frame::Error(Some(2)));
        roundtrip(Frame::Error(None));
    }

    #[test]
    fn partial_input_waits() {
        let mut whole = BytesMut::new();
        Frame::Audio {
            rate: AudioRate::Slin8,
            payload: vec![3; 320].into(),
        }
        .encode(&mut whole);
        for cut in [0, 1, 2, 3, 100, 322] {
            let mut b = BytesMut::from(&whole[..cut]);
            assert_eq!(Frame::parse(&mut b).unwrap(), None);
            assert_eq!(b.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        let cases: [(&[u8], FrameError); 5] = [
            (&[0x42, 0, 4, 1, 2, 3, 4], FrameError::UnknownKind(0x42, 4)),
            (&[0x10, 0, 0], FrameError::EmptyAudio),
            (&[0x01, 0, 2, 1, 2], FrameError::BadId(2)),
            (&[0x03, 0, 1, b'x'], FrameError::BadDtmf(vec![b'x'])),
            (&[0x00, 0, 1, 9], FrameError::BadHangup(1)),
        ];
        for (bytes, want) in cases {
            assert_eq!(Frame::parse(&mut BytesMut::from(bytes)), Err(want));
        }
        // An unknown kind is reported from its header alone.
        assert!(matches!(
            Frame::parse(&mut BytesMut::from(&[0x42u8, 1, 0][..])),
            Err(FrameError::UnknownKind(0x42, 256))
        ));
    }
}
