//! The frame codec against raw captures of a real Asterisk 22.10.1 (`../shared/audiosocket/`):
//! every frame's kind and length must match the capture's `.json`, whole or fed in pieces,
//! and through the connection reader over a real loopback socket.

mod common;

use asterisk_voice_agent::audiosocket::{AudioRate, Frame, FrameReader};
use bytes::BytesMut;
use serde_json::Value;

const CAPTURES: [&str; 3] = [
    "asterisk-22.10.1-call.bin",
    "asterisk-22.10.1-call-chan-slin16.bin",
    "asterisk-22.10.1-call-chan-ulaw.bin",
];

fn load(name: &str) -> (Vec<u8>, Value) {
    let bin = common::capture(name);
    let json: Value = serde_json::from_str(&std::fs::read_to_string(bin.with_extension("json")).unwrap()).unwrap();
    (std::fs::read(&bin).unwrap(), json)
}

/// (kind byte, payload length) of a frame, as the capture's `.json` lists them.
fn shape(f: &Frame) -> (u64, u64) {
    let len = match f {
        Frame::Hangup => 0,
        Frame::Id(_) => 16,
        Frame::Dtmf(_) => 1,
        Frame::Audio { payload, .. } => payload.len(),
        Frame::Error(c) => c.is_some() as usize,
    };
    (f.kind().byte() as u64, len as u64)
}

fn parse_all(bytes: &[u8], piece: usize) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in bytes.chunks(piece) {
        buf.extend_from_slice(chunk);
        while let Some(f) = Frame::parse(&mut buf).unwrap() {
            out.push(f);
        }
    }
    assert!(buf.is_empty(), "bytes left over");
    out
}

#[test]
fn frames_match_the_capture_listings() {
    for name in CAPTURES {
        let (bytes, json) = load(name);
        let frames = parse_all(&bytes, bytes.len());
        assert_eq!(frames.len() as u64, json["frames_total"].as_u64().unwrap(), "{name}");
        let want: Vec<(u64, u64)> = json["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f[1].as_u64().unwrap(), f[2].as_u64().unwrap()))
            .collect();
        let got: Vec<(u64, u64)> = frames.iter().map(shape).collect();
        assert_eq!(got, want, "{name}");
        // Counts by kind and length.
        for ft in json["frame_types"].as_array().unwrap() {
            let kind = u64::from_str_radix(ft["kind"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
            let len = ft["payload_len"].as_u64().unwrap();
            let n = got.iter().filter(|s| **s == (kind, len)).count() as u64;
            assert_eq!(n, ft["count"].as_u64().unwrap(), "{name} kind {kind:#x} len {len}");
        }
        // The UUID and the DTMF digits.
        assert_eq!(
            frames[0],
            Frame::Id(json["uuid"].as_str().unwrap().parse().unwrap()),
            "{name}"
        );
        let digits: String = frames
            .iter()
            .filter_map(|f| if let Frame::Dtmf(d) = f { Some(*d) } else { None })
            .collect();
        let want_digits: String = json["dtmf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["digit"].as_str().unwrap())
            .collect();
        assert_eq!(digits, want_digits, "{name}");
        // The rates: 0x12 is 16 kHz (not 12 kHz), 0x10 is 8 kHz.
        let rate = frames.iter().find_map(|f| {
            if let Frame::Audio { rate, .. } = f {
                Some(*rate)
            } else {
                None
            }
        });
        let expect = if name.contains("slin16") {
            AudioRate::Slin16
        } else {
            AudioRate::Slin8
        };
        assert_eq!(rate, Some(expect), "{name}");
        // Re-encoding gives back the exact bytes.
        let mut re = BytesMut::new();
        frames.iter().for_each(|f| f.encode(&mut re));
        assert_eq!(&re[..], &bytes[..], "{name}");
    }
}

#[test]
fn frames_split_anywhere_parse_the_same() {
    for name in CAPTURES {
        let (bytes, _) = load(name);
        let whole = parse_all(&bytes, bytes.len());
        for piece in [1, 2, 3, 7, 319, 321, 1000] {
            assert_eq!(parse_all(&bytes, piece), whole, "{name} in {piece}-byte pieces");
        }
    }
}

#[test]
fn reader_over_loopback_socket_reads_every_frame() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for name in CAPTURES {
            let (bytes, json) = load(name);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let writer = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                // Odd-sized writes, like a real stack splitting segments.
                for chunk in bytes.chunks(777) {
                    s.write_all(chunk).await.unwrap();
                }
            });
            let (sock, _) = listener.accept().await.unwrap();
            let mut reader = FrameReader::new(sock);
            let mut n = 0;
            while let Some(_f) = reader.read_frame().await.unwrap() {
                n += 1;
            }
            writer.await.unwrap();
            assert_eq!(n, json["frames_total"].as_u64().unwrap(), "{name}");
        }
    });
}
