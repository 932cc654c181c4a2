//! Arbitrary bytes into the AudioSocket frame parser, as a connection feeds it: whatever comes
//! in, parsing never panics, never consumes more than one frame per call, and every frame it
//! returns re-encodes to the bytes it was parsed from.
#![no_main]

use asterisk_voice_agent_fuzz::audiosocket::Frame;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match Frame::parse(&mut buf) {
            Ok(None) => {
                assert_eq!(buf, before, "an incomplete frame consumed bytes");
                break;
            }
            Ok(Some(frame)) => {
                let used = before.len() - buf.len();
                let mut again = BytesMut::new();
                frame.encode(&mut again);
                // An error frame with a payload longer than its code byte re-encodes shorter.
                if !matches!(frame, Frame::Error(_)) {
                    assert_eq!(&again[..], &before[..used], "{frame} does not round-trip");
                }
            }
            Err(_) => {
                // The bad frame is consumed (or, for an unknown kind, reported at its header):
                // the connection ends here.
                break;
            }
        }
    }
});
