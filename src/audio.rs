//! Audio helpers for the call path: sample conversion, level measurement, G.711 mu-law
//! decoding and detection, and a streaming resampler over rubato.

use anyhow::Result;
use rubato::{FftFixedInOut, Resampler as _};

/// Converts s16le bytes to samples. An odd trailing byte is dropped (Asterisk does the same:
/// a 321-byte frame is 160 samples).
pub fn bytes_to_samples(bytes: &[u8], out: &mut Vec<i16>) {
    out.extend(bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])));
}

/// Level (dBFS) at or below which a 20 ms frame of synthesized speech counts as silence for
/// [`trim_leading_silence`]; `simulate` counts agent frames the same way.
pub const LEADING_SILENCE_DBFS: f32 = -50.0;

/// Drops the 20 ms frames (`rate_hz / 50` samples) at the start of `samples` whose RMS
/// level is at or below [`LEADING_SILENCE_DBFS`]. Piper starts every sentence with ~40 ms of
/// such padding (measured on the test voice, 2026-11-23), which the caller would otherwise
/// wait through before the first word. Nothing after the first louder frame is touched, and
/// all-silent input comes back empty.
pub fn trim_leading_silence(samples: &mut Vec<i16>, rate_hz: u32) {
    let frame = (rate_hz as usize / 50).max(1);
    let cut: usize = samples
        .chunks(frame)
        .take_while(|f| rms_dbfs(f) <= LEADING_SILENCE_DBFS)
        .map(<[i16]>::len)
        .sum();
    samples.drain(..cut);
}

/// RMS level of `samples` in dBFS (0 dBFS = full-scale square wave); -120 for silence.
pub fn rms_dbfs(samples: &[i16]) -> f32 {
    if samples.is_empty() {
        return -120.0;
    }
    let sum: f64 = samples.iter().map(|&s| (s as f64) * (s as f64)).sum();
    let rms = (sum / samples.len() as f64).sqrt() / 32768.0;
    if rms <= 1e-6 {
        -120.0
    } else {
        (20.0 * rms.log10()) as f32
    }
}

/// Converts f32 samples in [-1, 1] to i16 with `gain`, clamping.
pub fn f32_to_i16(samples: &[f32], gain: f32) -> Vec<i16> {
    samples
        .iter()
        .map(|&s| (s * gain * 32767.0).clamp(-32768.0, 32767.0) as i16)
        .collect()
}

/// Decodes one G.711 mu-law byte to a linear 16-bit sample (ITU-T G.711).
pub fn ulaw_to_linear(byte: u8) -> i16 {
    let u = !byte;
    let t = ((((u & 0x0f) as i32) << 3) + 0x84) << ((u & 0x70) >> 4);
    (if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
}

/// Decides whether kind-0x10 payloads are G.711 mu-law rather than slin.
///
/// The channel driver with `c(ulaw)` (or no `c()` and a SIP caller) labels mu-law as 0x10
/// (Asterisk 22.10.1, observed): 160-byte payloads for 20 ms instead of 320. slin frames from
/// Asterisk are 320 bytes except a short one at the end of each playback, so a run of
/// `frames` 160-byte payloads at the start of the call means mu-law.
#[derive(Debug, Default)]
pub struct UlawDetector {
    seen: usize,
    ulaw_sized: usize,
}

/// What [`UlawDetector`] has concluded so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Not enough frames yet.
    Unknown,
    /// Signed linear 16-bit little-endian.
    Slin,
    /// G.711 mu-law, one byte per sample.
    Ulaw,
}

impl UlawDetector {
    /// Frames looked at before deciding.
    pub const FRAMES: usize = 5;

    /// Feeds one 0x10 payload length (bytes); returns the verdict once [`Self::FRAMES`] were seen.
    pub fn push(&mut self, payload_len: usize) -> Encoding {
        self.seen += 1;
        if payload_len == 160 {
            self.ulaw_sized += 1;
        }
        if self.seen < Self::FRAMES {
            Encoding::Unknown
        } else if self.ulaw_sized == self.seen {
            Encoding::Ulaw
        } else {
            Encoding::Slin
        }
    }
}

/// A streaming mono resampler: push any number of samples, get back every output sample that
/// is ready. Wraps rubato's `FftFixedInOut` with an input buffer so callers need not care about
/// its fixed chunk size. Passes audio through untouched when the rates are equal.
pub struct StreamResampler {
    inner: Option<FftFixedInOut<f32>>,
    pending: Vec<f32>,
    out_buf: Vec<Vec<f32>>,
    /// Output samples still to drop to cancel the resampler's delay.
    skip: usize,
}

impl StreamResampler {
    /// A resampler from `from_hz` to `to_hz`, working in chunks of about `chunk_ms` of input.
    pub fn new(from_hz: u32, to_hz: u32, chunk_ms: u32) -> Result<Self> {
        if from_hz == to_hz {
            return Ok(StreamResampler {
                inner: None,
                pending: Vec::new(),
                out_buf: Vec::new(),
                skip: 0,
            });
        }
        let chunk = (from_hz * chunk_ms / 1000).max(1) as usize;
        let inner = FftFixedInOut::<f32>::new(from_hz as usize, to_hz as usize, chunk, 1)?;
        let out_buf = inner.output_buffer_allocate(true);
        let skip = inner.output_delay();
        Ok(StreamResampler {
            inner: Some(inner),
            pending: Vec::new(),
            out_buf,
            skip,
        })
    }

    /// Pushes samples and appends every ready output sample to `out`.
    pub fn push(&mut self, input: &[i16], out: &mut Vec<i16>) {
        let Some(inner) = self.inner.as_mut() else {
            out.extend_from_slice(input);
            return;
        };
        self.pending.extend(input.iter().map(|&s| s as f32 / 32768.0));
        let mut used = 0;
        loop {
            let need = inner.input_frames_next();
            if self.pending.len() - used < need {
                break;
            }
            let chunk = [&self.pending[used..used + need]];
            let (_, produced) = inner
                .process_into_buffer(&chunk, &mut self.out_buf, None)
                .expect("buffer sizes are rubato's own");
            used += need;
            let mut o = &self.out_buf[0][..produced];
            let drop = self.skip.min(o.len());
            self.skip -= drop;
            o = &o[drop..];
            out.extend(o.iter().map(|&s| (s * 32768.0).clamp(-32768.0, 32767.0) as i16));
        }
        self.pending.drain(..used);
    }

    /// Pushes the buffered tail (padded with silence) through so nothing is held back; for the
    /// end of a sentence. The output has about `input * to / from` samples in all.
    pub fn flush(&mut self, out: &mut Vec<i16>) {
        let Some(inner) = self.inner.as_ref() else { return };
        let pad = inner.input_frames_next() * 2 + self.skip;
        self.push(&vec![0i16; pad], out);
        self.pending.clear();
    }
}

/// Resamples a whole buffer (a synthesized sentence) from `from_hz` to `to_hz`, returning about
/// `len * to_hz / from_hz` samples with the resampler's delay removed.
pub fn resample_all(samples: &[i16], from_hz: u32, to_hz: u32) -> Result<Vec<i16>> {
    if from_hz == to_hz {
        return Ok(samples.to_vec());
    }
    let want = (samples.len() as u64 * to_hz as u64 / from_hz as u64) as usize;
    let mut r = StreamResampler::new(from_hz, to_hz, 50)?;
    let mut out = Vec::with_capacity(want + 1024);
    r.push(samples, &mut out);
    r.flush(&mut out);
    out.truncate(want);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_silence_is_trimmed_by_whole_frames_and_nothing_after_it() {
        // 8 kHz: 160-sample frames. Digital silence, a faint frame (-60 dBFS), then speech
        // with a quiet gap inside it that must stay.
        let faint = vec![33i16; 160]; // ~ -60 dBFS
        let mut s = vec![0i16; 160];
        s.extend(&faint);
        let speech = sine(300.0, 8000, 320);
        s.extend(&speech);
        s.extend(vec![0i16; 160]);
        s.extend(&speech);
        let mut t = s.clone();
        trim_leading_silence(&mut t, 8000);
        assert_eq!(t.len(), s.len() - 320);
        assert_eq!(&t[..320], &speech[..]);
        // A loud first frame: nothing is cut.
        let mut u = speech.clone();
        trim_leading_silence(&mut u, 8000);
        assert_eq!(u, speech);
        // All silent, with a partial last frame: nothing is left.
        let mut z = vec![0i16; 250];
        trim_leading_silence(&mut z, 8000);
        assert!(z.is_empty());
        // 16 kHz: 320-sample frames.
        let mut w = vec![0i16; 320];
        w.extend(sine(300.0, 16000, 640));
        trim_leading_silence(&mut w, 16000);
        assert_eq!(w.len(), 640);
    }

    fn sine(hz: f32, rate: u32, n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| ((i as f32 * hz * std::f32::consts::TAU / rate as f32).sin() * 16000.0) as i16)
            .collect()
    }

    #[test]
    fn ulaw_table_points() {
        // G.711: 0xff and 0x7f are the two zeros; 0x00 / 0x80 the extremes.
        assert_eq!(ulaw_to_linear(0xff), 0);
        assert_eq!(ulaw_to_linear(0x7f), 0);
        assert_eq!(ulaw_to_linear(0x00), -32124);
        assert_eq!(ulaw_to_linear(0x80), 32124);
    }

    #[test]
    fn levels() {
        assert_eq!(rms_dbfs(&[0; 160]), -120.0);
        let s = sine(440.0, 8000, 1600);
        let db = rms_dbfs(&s);
        assert!((db - (-9.2)).abs() < 0.5, "{db}"); // 16000/32768 peak sine = -6.2 dB peak, -9.2 dB RMS
    }

    #[test]
    fn resample_keeps_length_and_tone() {
        let s = sine(440.0, 22050, 22050);
        let out = resample_all(&s, 22050, 8000).unwrap();
        assert_eq!(out.len(), 8000);
        // same level, and zero crossings of a 440 Hz tone over one second: ~880
        assert!((rms_dbfs(&out[400..7600]) - rms_dbfs(&s)).abs() < 0.5);
        let zc = out[400..7600].windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
        assert!((780..=800).contains(&zc), "{zc}");
    }

    #[test]
    fn streaming_in_odd_pieces_matches_rate() {
        let s = sine(300.0, 8000, 8000);
        let mut r = StreamResampler::new(8000, 16000, 20).unwrap();
        let mut out = Vec::new();
        for piece in s.chunks(36) {
            r.push(piece, &mut out);
        }
        assert!(out.len() > 15600 && out.len() <= 16000, "{}", out.len());
    }

    #[test]
    fn ulaw_detection() {
        let mut d = UlawDetector::default();
        let v: Vec<_> = (0..5).map(|_| d.push(160)).collect();
        assert_eq!(v.last(), Some(&Encoding::Ulaw));
        let mut d = UlawDetector::default();
        let v: Vec<_> = [320, 320, 160, 320, 320].iter().map(|&n| d.push(n)).collect();
        assert_eq!(v.last(), Some(&Encoding::Slin));
    }
}
