//! Voice activity detection on the caller's audio: the earshot neural detector (a small
//! pure-Rust network over 16 ms frames at 16 kHz) plus an energy floor, turned by a little state
//! machine into utterance starts (onset, also used for barge-in) and ends (endpointing).
//! Thresholds come from `[vad]` in the config; docs/vad.md has the measurements behind them.
//!
//! Any input rate and frame length is accepted: audio is resampled to 16 kHz (8 kHz telephone
//! audio is upsampled, keeping state across pushes) and cut into earshot's 256-sample frames;
//! samples left over wait for the next push.

use crate::audio::{rms_dbfs, StreamResampler};
use crate::config::VadConfig;
use earshot::Detector;

/// earshot's frame: 256 samples at 16 kHz.
pub const FRAME_SAMPLES: usize = 256;
/// earshot's sample rate.
pub const FRAME_RATE_HZ: u32 = 16_000;
/// earshot's frame length in ms.
pub const FRAME_MS: u32 = 16;

/// What one frame changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VadEvent {
    /// Nothing changed.
    None,
    /// Speech has lasted `min_speech_ms`: an utterance started `onset_ms` ago.
    SpeechStart {
        /// How long ago (ms) the first voiced frame of this utterance arrived.
        onset_ms: u32,
    },
    /// The utterance ended.
    SpeechEnd(EndReason),
}

/// Why an utterance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// `end_silence_ms` of non-speech followed it (endpointing).
    Endpoint,
    /// It reached `max_utterance_ms`.
    MaxLength,
    /// `end_silence_ms` of non-speech followed it, but it had less than `min_utterance_ms` of
    /// voiced time in all: a cough, a click or a burst of noise, not speech. Its audio should be
    /// dropped, not recognized.
    TooShort,
}

/// The score of one 16 ms frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameScore {
    /// earshot's voice score, 0..1.
    pub score: f32,
    /// RMS level of the frame (at 16 kHz), dBFS.
    pub dbfs: f32,
}

/// Resamples any input to 16 kHz and scores it with earshot, one 16 ms frame at a time. The
/// building block of [`Vad`]; public for the tuning bench.
pub struct FrameScorer {
    detector: Box<Detector>,
    /// Input rate and its resampler to 16 kHz (`None` before the first push).
    resampler: Option<(u32, StreamResampler)>,
    /// 16 kHz samples not yet scored.
    pending: Vec<i16>,
    scratch: Vec<i16>,
}

impl std::fmt::Debug for FrameScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameScorer")
            .field("rate_hz", &self.resampler.as_ref().map(|r| r.0))
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Default for FrameScorer {
    fn default() -> Self {
        FrameScorer::new()
    }
}

impl FrameScorer {
    /// A scorer with earshot's default network.
    pub fn new() -> FrameScorer {
        FrameScorer {
            detector: Detector::default_boxed(),
            resampler: None,
            pending: Vec::with_capacity(4 * FRAME_SAMPLES),
            scratch: Vec::with_capacity(4 * FRAME_SAMPLES),
        }
    }

    /// Adds `samples` at `rate_hz`. A change of rate starts over (new resampler, fresh detector).
    pub fn push(&mut self, samples: &[i16], rate_hz: u32) {
        if rate_hz == 0 {
            return;
        }
        if self.resampler.as_ref().is_none_or(|(r, _)| *r != rate_hz) {
            // 10 ms resampler chunks: little added delay for 20 ms input frames.
            match StreamResampler::new(rate_hz, FRAME_RATE_HZ, 10) {
                Ok(r) => {
                    if self.resampler.is_some() {
                        self.detector.reset();
                        self.pending.clear();
                    }
                    self.resampler = Some((rate_hz, r));
                }
                Err(e) => {
                    tracing::warn!("VAD cannot resample {rate_hz} Hz: {e:#}");
                    return;
                }
            }
        }
        let (_, r) = self.resampler.as_mut().expect("set above");
        self.scratch.clear();
        r.push(samples, &mut self.scratch);
        self.pending.extend_from_slice(&self.scratch);
    }

    /// Scores the next whole 16 ms frame, if one is buffered.
    pub fn next_frame(&mut self) -> Option<FrameScore> {
        if self.pending.len() < FRAME_SAMPLES {
            return None;
        }
        let frame = &self.pending[..FRAME_SAMPLES];
        let dbfs = rms_dbfs(frame);
        let score = self.detector.predict_i16(frame);
        self.pending.drain(..FRAME_SAMPLES);
        Some(FrameScore { score, dbfs })
    }

    /// Audio (ms) pushed but not yet scored.
    pub fn pending_ms(&self) -> u32 {
        (self.pending.len() as u64 * 1000 / FRAME_RATE_HZ as u64) as u32
    }
}

/// The detector; one per call.
#[derive(Debug)]
pub struct Vad {
    scorer: FrameScorer,
    threshold: f32,
    floor_dbfs: f32,
    min_speech_ms: u32,
    end_silence_ms: u32,
    min_utterance_ms: u32,
    max_utterance_ms: u32,
    in_speech: bool,
    /// Consecutive voiced ms before onset.
    run_ms: u32,
    /// Since the utterance's first voiced frame (in speech).
    utterance_ms: u32,
    /// Voiced ms in the current utterance.
    voiced_ms: u32,
    /// Non-speech ms since the last voiced frame (in speech).
    silence_ms: u32,
}

impl Vad {
    /// A detector with the config's thresholds.
    pub fn new(cfg: &VadConfig) -> Vad {
        Vad {
            scorer: FrameScorer::new(),
            threshold: cfg.speech_threshold,
            floor_dbfs: cfg.energy_floor_dbfs,
            min_speech_ms: cfg.min_speech_ms,
            end_silence_ms: cfg.end_silence_ms,
            min_utterance_ms: cfg.min_utterance_ms,
            max_utterance_ms: cfg.max_utterance_ms,
            in_speech: false,
            run_ms: 0,
            utterance_ms: 0,
            voiced_ms: 0,
            silence_ms: 0,
        }
    }

    /// True between a `SpeechStart` and the next `SpeechEnd`.
    pub fn in_speech(&self) -> bool {
        self.in_speech
    }

    /// Milliseconds of non-speech since the last voiced frame of the current utterance.
    pub fn trailing_silence_ms(&self) -> u32 {
        self.silence_ms
    }

    /// Whether a scored frame counts as speech.
    pub fn is_voiced(&self, f: FrameScore) -> bool {
        f.score >= self.threshold && f.dbfs >= self.floor_dbfs
    }

    /// Feeds one frame of `samples` at `rate_hz` (any length; normally 20 ms). Returns at most
    /// one event; if one happens, audio after it stays buffered for the next push.
    pub fn push(&mut self, samples: &[i16], rate_hz: u32) -> VadEvent {
        self.scorer.push(samples, rate_hz);
        while let Some(f) = self.scorer.next_frame() {
            let event = self.step(self.is_voiced(f));
            if event != VadEvent::None {
                return event;
            }
        }
        VadEvent::None
    }

    /// Advances the state machine by one 16 ms frame.
    fn step(&mut self, voiced: bool) -> VadEvent {
        if !self.in_speech {
            if !voiced {
                self.run_ms = 0;
                return VadEvent::None;
            }
            self.run_ms += FRAME_MS;
            if self.run_ms < self.min_speech_ms {
                return VadEvent::None;
            }
            self.in_speech = true;
            self.utterance_ms = self.run_ms;
            self.voiced_ms = self.run_ms;
            self.silence_ms = 0;
            self.run_ms = 0;
            return VadEvent::SpeechStart {
                onset_ms: self.utterance_ms + self.scorer.pending_ms(),
            };
        }
        self.utterance_ms += FRAME_MS;
        if voiced {
            self.voiced_ms += FRAME_MS;
            self.silence_ms = 0;
        } else {
            self.silence_ms += FRAME_MS;
        }
        let reason = if self.silence_ms >= self.end_silence_ms {
            if self.voiced_ms < self.min_utterance_ms {
                EndReason::TooShort
            } else {
                EndReason::Endpoint
            }
        } else if self.utterance_ms >= self.max_utterance_ms {
            EndReason::MaxLength
        } else {
            return VadEvent::None;
        };
        self.in_speech = false;
        self.silence_ms = 0;
        VadEvent::SpeechEnd(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the state machine directly with voiced/unvoiced frames.
    fn run(v: &mut Vad, voiced: bool, frames: usize) -> Vec<VadEvent> {
        (0..frames)
            .map(|_| v.step(voiced))
            .filter(|e| *e != VadEvent::None)
            .collect()
    }

    #[test]
    fn onset_endpoint_and_short_bursts() {
        let cfg = VadConfig {
            min_speech_ms: 60,
            end_silence_ms: 200,
            min_utterance_ms: 200,
            ..Default::default()
        };
        let mut v = Vad::new(&cfg);
        // 48 ms of voice is not an onset
        assert!(run(&mut v, true, 3).is_empty());
        assert!(run(&mut v, false, 1).is_empty());
        assert!(!v.in_speech());
        // the fourth consecutive voiced frame (64 ms) is
        assert!(run(&mut v, true, 3).is_empty());
        assert_eq!(v.step(true), VadEvent::SpeechStart { onset_ms: 64 });
        assert!(v.in_speech());
        // a pause shorter than end_silence_ms does not end it
        assert!(run(&mut v, false, 12).is_empty());
        assert_eq!(v.trailing_silence_ms(), 192);
        assert!(run(&mut v, true, 10).is_empty());
        assert_eq!(v.trailing_silence_ms(), 0);
        assert_eq!(run(&mut v, false, 13), vec![VadEvent::SpeechEnd(EndReason::Endpoint)]);
        assert!(!v.in_speech());
        // 112 ms of voice, then silence: too short
        assert_eq!(run(&mut v, true, 7), vec![VadEvent::SpeechStart { onset_ms: 64 }]);
        assert_eq!(run(&mut v, false, 13), vec![VadEvent::SpeechEnd(EndReason::TooShort)]);
    }

    #[test]
    fn max_length_cuts() {
        let cfg = VadConfig {
            min_speech_ms: 16,
            max_utterance_ms: 1600,
            ..Default::default()
        };
        let mut v = Vad::new(&cfg);
        let events: Vec<_> = (0..150).map(|_| v.step(true)).collect();
        let ends: Vec<_> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, VadEvent::SpeechEnd(_)))
            .collect();
        assert_eq!(ends, vec![(99, &VadEvent::SpeechEnd(EndReason::MaxLength))]);
        // speech going on starts a new utterance at once
        assert_eq!(events[100], VadEvent::SpeechStart { onset_ms: 16 });
    }

    #[test]
    fn silence_and_faint_noise_are_not_speech() {
        let mut v = Vad::new(&VadConfig::default());
        let zero = vec![0i16; 160];
        let mut seed = 1u32;
        let faint: Vec<i16> = (0..160)
            .map(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                ((seed >> 16) as i16 % 20) - 10
            })
            .collect();
        for _ in 0..100 {
            assert_eq!(v.push(&zero, 8000), VadEvent::None);
            assert_eq!(v.push(&faint, 8000), VadEvent::None);
        }
        assert!(!v.in_speech());
    }

    #[test]
    fn scorer_buffers_any_length_and_rate() {
        let mut s = FrameScorer::new();
        // 8 kHz: 1 s in odd pieces yields 62 frames (16 kHz: 16000 / 256 = 62.5) give or take
        // the resampler's buffered chunk
        let mut n = 0;
        for len in [36usize, 160, 224, 160, 97].iter().cycle().take(60) {
            s.push(&vec![0i16; *len], 8000);
            while s.next_frame().is_some() {
                n += 1;
            }
        }
        let total_ms = [36usize, 160, 224, 160, 97].iter().sum::<usize>() * 12 / 8;
        let expect = total_ms / 16;
        assert!(n + 2 >= expect && n <= expect, "{n} frames, expected about {expect}");
        // a rate change starts over
        s.push(&vec![0i16; 320], 16000);
        assert_eq!(s.pending_ms(), 20);
    }
}
