//! The AudioSocket frame codec's invariants as property tests (issue 7): arbitrary bytes never
//! panic the parser, never make it consume more than one whole frame, and an incomplete frame
//! consumes nothing; every encodable frame round-trips, however the byte stream is split.

use asterisk_voice_agent::audiosocket::{AudioRate, Frame};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

fn rate() -> impl Strategy<Value = AudioRate> {
    (0x10u8..=0x18).prop_map(|k| match asterisk_voice_agent::audiosocket::Kind::from_byte(k) {
        Some(asterisk_voice_agent::audiosocket::Kind::Audio(r)) => r,
        _ => unreachable!(),
    })
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        Just(Frame::Hangup),
        any::<[u8; 16]>().prop_map(|b| Frame::Id(uuid::Uuid::from_bytes(b))),
        prop::sample::select(b"0123456789*#ABCD".to_vec()).prop_map(|d| Frame::Dtmf(d as char)),
        (rate(), prop::collection::vec(any::<u8>(), 1..2000)).prop_map(|(rate, p)| Frame::Audio {
            rate,
            payload: Bytes::from(p)
        }),
        any::<Option<u8>>().prop_map(Frame::Error),
    ]
}

/// Parses every frame out of `buf`, stopping at the first error.
fn parse_all(buf: &mut BytesMut) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Ok(Some(f)) = Frame::parse(buf) {
        out.push(f);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_consume_at_most_one_frame(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.len();
        match Frame::parse(&mut buf) {
            Ok(None) => prop_assert_eq!(buf.len(), before, "an incomplete frame consumes nothing"),
            Ok(Some(_)) | Err(_) => {
                let consumed = before - buf.len();
                if consumed > 0 {
                    let len = u16::from_be_bytes([bytes[1], bytes[2]]) as usize;
                    prop_assert_eq!(consumed, 3 + len, "exactly one frame is consumed");
                }
            }
        }
    }

    #[test]
    fn frames_round_trip_however_the_stream_is_split(frames in prop::collection::vec(frame(), 1..20), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let wire = wire.freeze();
        // Feed the bytes in pieces, parsing whatever is complete after each piece.
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut at = 0;
        for p in points {
            buf.extend_from_slice(&wire[at..p]);
            at = p;
            got.extend(parse_all(&mut buf));
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn a_truncated_frame_is_never_parsed(f in frame(), keep in any::<prop::sample::Index>()) {
        let mut wire = BytesMut::new();
        f.encode(&mut wire);
        let n = keep.index(wire.len()); // strictly shorter than the frame
        let mut buf = BytesMut::from(&wire[..n]);
        prop_assert_eq!(Frame::parse(&mut buf), Ok(None));
        prop_assert_eq!(buf.len(), n);
    }
}
