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
    /// Periodicity, 0..1: the peak normalized autocorrelation over pitch lags (70..400 Hz) of
    /// the last 32 ms. Voiced speech (vowels) scores high; noise, coughs and clicks low.
    pub voicing: f32,
}

/// Pitch analysis runs at 8 kHz (every second 16 kHz sample, pair-averaged).
const PITCH_WINDOW: usize = 256;
const PITCH_MIN_LAG: usize = 20; // 400 Hz at 8 kHz
const PITCH_MAX_LAG: usize = 115; // about 70 Hz

/// Peak normalized autocorrelation of the last `PITCH_WINDOW` samples of `h` over pitch lags.
fn voicing(h: &[f32]) -> f32 {
    let n = h.len();
    if n < PITCH_WINDOW + PITCH_MAX_LAG {
        return 0.0;
    }
    let a = &h[n - PITCH_WINDOW..];
    let ea: f32 = a.iter().map(|x| x * x).sum();
    if ea <= 0.0 {
        return 0.0;
    }
    let mut best = 0.0f32;
    // energy of the lagged window, updated as the lag grows
    let mut b_start = n - PITCH_WINDOW - PITCH_MIN_LAG;
    let mut eb: f32 = h[b_start..b_start + PITCH_WINDOW].iter().map(|x| x * x).sum();
    for _lag in PITCH_MIN_LAG..=PITCH_MAX_LAG {
        let b = &h[b_start..b_start + PITCH_WINDOW];
        let r: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        if eb > 0.0 {
            best = best.max(r / (ea * eb).sqrt());
        }
        if b_start == 0 {
            break;
        }
        b_start -= 1;
        eb += h[b_start] * h[b_start] - h[b_start + PITCH_WINDOW] * h[b_start + PITCH_WINDOW];
        eb = eb.max(0.0);
    }
    best
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
    /// The last `PITCH_WINDOW + PITCH_MAX_LAG` samples at 8 kHz, for [`voicing`].
    pitch: Vec<f32>,
    /// Silero VAD at the input rate, whose probability replaces earshot's score (issue 8).
    silero: Option<crate::silero::SileroStream>,
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
            pitch: Vec::with_capacity(PITCH_WINDOW + PITCH_MAX_LAG + FRAME_SAMPLES),
            silero: None,
        }
    }

    /// A scorer whose `score` is Silero VAD's speech probability (run at the input rate: 8 or
    /// 16 kHz natively) instead of earshot's; level and periodicity are computed as before.
    pub fn with_silero(model: std::sync::Arc<crate::silero::SileroModel>) -> FrameScorer {
        FrameScorer {
            silero: Some(crate::silero::SileroStream::new(model)),
            ..FrameScorer::new()
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
                        self.pitch.clear();
                    }
                    self.resampler = Some((rate_hz, r));
                }
                Err(e) => {
                    tracing::warn!("VAD cannot resample {rate_hz} Hz: {e:#}");
                    return;
                }
            }
        }
        if let Some(s) = self.silero.as_mut() {
            s.push(samples, rate_hz);
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
        let score = match &self.silero {
            Some(s) => s.probability(),
            None => self.detector.predict_i16(frame),
        };
        self.pitch
            .extend(frame.chunks_exact(2).map(|p| (p[0] as f32 + p[1] as f32) * 0.5));
        let keep = PITCH_WINDOW + PITCH_MAX_LAG;
        if self.pitch.len() > keep {
            self.pitch.drain(..self.pitch.len() - keep);
        }
        let voicing = voicing(&self.pitch);
        self.pending.drain(..FRAME_SAMPLES);
        Some(FrameScore { score, dbfs, voicing })
    }

    /// Audio (ms) pushed but not yet scored.
    pub fn pending_ms(&self) -> u32 {
        (self.pending.len() as u64 * 1000 / FRAME_RATE_HZ as u64) as u32
    }
}

/// Non-periodic frames the network calls voice (unvoiced consonants: s, f, p, t, k, h) count as
/// speech only this long after the last periodic (vowel) frame; so steady noise that earshot
/// scores as voice cannot hold an utterance open.
pub const CONSONANT_BRIDGE_MS: u32 = 300;

/// How one 16 ms frame is classed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Silence,
    /// Voice by score and level, not periodic (a consonant, or noise).
    Voiced,
    /// Voice and periodic (a vowel).
    Periodic,
}

/// The detector; one per call.
#[derive(Debug)]
pub struct Vad {
    scorer: FrameScorer,
    threshold: f32,
    floor_dbfs: f32,
    voicing_threshold: f32,
    min_speech_ms: u32,
    end_silence_ms: u32,
    min_utterance_ms: u32,
    max_utterance_ms: u32,
    in_speech: bool,
    /// Voiced ms in the run before onset, its periodic ms, its length including a tolerated
    /// one-frame gap, and whether the last frame was that gap.
    run_ms: u32,
    run_periodic_ms: u32,
    run_span_ms: u32,
    run_gap: bool,
    /// Since the last periodic frame.
    since_periodic_ms: u32,
    /// Since the utterance's first voiced frame (in speech).
    utterance_ms: u32,
    /// Periodic (vowel) ms in the current utterance.
    periodic_ms: u32,
    /// Non-speech ms since the last speech frame (in speech).
    silence_ms: u32,
}

impl Vad {
    /// A detector with the config's thresholds (earshot scores the frames).
    pub fn new(cfg: &VadConfig) -> Vad {
        Vad::with_scorer(cfg, FrameScorer::new(), cfg.speech_threshold)
    }

    /// A detector whose frames Silero VAD scores (`vad.engine = "silero"`), with
    /// `vad.silero_threshold` and the same gates and timers.
    pub fn with_silero(cfg: &VadConfig, model: std::sync::Arc<crate::silero::SileroModel>) -> Vad {
        Vad::with_scorer(cfg, FrameScorer::with_silero(model), cfg.silero_threshold)
    }

    fn with_scorer(cfg: &VadConfig, scorer: FrameScorer, threshold: f32) -> Vad {
        Vad {
            scorer,
            threshold,
            floor_dbfs: cfg.energy_floor_dbfs,
            voicing_threshold: cfg.voicing_threshold,
            min_speech_ms: cfg.min_speech_ms,
            end_silence_ms: cfg.end_silence_ms,
            min_utterance_ms: cfg.min_utterance_ms,
            max_utterance_ms: cfg.max_utterance_ms,
            in_speech: false,
            run_ms: 0,
            run_periodic_ms: 0,
            run_span_ms: 0,
            run_gap: false,
            since_periodic_ms: u32::MAX / 2,
            utterance_ms: 0,
            periodic_ms: 0,
            silence_ms: 0,
        }
    }

    /// True between a `SpeechStart` and the next `SpeechEnd`.
    pub fn in_speech(&self) -> bool {
        self.in_speech
    }

    /// Ends the current utterance now, as if its end-of-silence timer had run out: the turn
    /// model decided the caller's turn is over (issue 8). Returns false when no utterance was
    /// open.
    pub fn end_now(&mut self) -> bool {
        if !self.in_speech {
            return false;
        }
        self.in_speech = false;
        self.silence_ms = 0;
        true
    }

    /// Milliseconds of non-speech since the last voiced frame of the current utterance.
    pub fn trailing_silence_ms(&self) -> u32 {
        self.silence_ms
    }

    fn class(&self, f: FrameScore) -> Class {
        if f.score < self.threshold || f.dbfs < self.floor_dbfs {
            Class::Silence
        } else if f.voicing >= self.voicing_threshold {
            Class::Periodic
        } else {
            Class::Voiced
        }
    }

    /// Classes a scored frame as speech or not the way endpointing does (voice by score and
    /// level, and periodic or within [`CONSONANT_BRIDGE_MS`] of a periodic frame), updating the
    /// bridge state; frames must come in order. For the tuning bench.
    pub fn frame_is_speech(&mut self, f: FrameScore) -> bool {
        let c = self.class(f);
        self.bridge(c)
    }

    fn bridge(&mut self, c: Class) -> bool {
        match c {
            Class::Periodic => {
                self.since_periodic_ms = 0;
                true
            }
            Class::Voiced => {
                self.since_periodic_ms = self.since_periodic_ms.saturating_add(FRAME_MS);
                self.since_periodic_ms <= CONSONANT_BRIDGE_MS
            }
            Class::Silence => {
                self.since_periodic_ms = self.since_periodic_ms.saturating_add(FRAME_MS);
                false
            }
        }
    }

    /// Feeds one frame of `samples` at `rate_hz` (any length; normally 20 ms). Returns at most
    /// one event; if one happens, audio after it stays buffered for the next push.
    pub fn push(&mut self, samples: &[i16], rate_hz: u32) -> VadEvent {
        self.scorer.push(samples, rate_hz);
        while let Some(f) = self.scorer.next_frame() {
            let event = self.step(self.class(f));
            if event != VadEvent::None {
                return event;
            }
        }
        VadEvent::None
    }

    /// Advances the state machine by one 16 ms frame.
    fn step(&mut self, c: Class) -> VadEvent {
        let speech = self.bridge(c);
        if !self.in_speech {
            // Onset: min_speech_ms of voice (one 16 ms dropout tolerated) with a periodic frame
            // in it, so noise bursts and coughs do not start an utterance.
            if c == Class::Silence {
                if self.run_ms > 0 && !self.run_gap {
                    self.run_gap = true;
                    self.run_span_ms += FRAME_MS;
                } else {
                    self.run_ms = 0;
                    self.run_periodic_ms = 0;
                    self.run_span_ms = 0;
                    self.run_gap = false;
                }
                return VadEvent::None;
            }
            self.run_gap = false;
            self.run_ms += FRAME_MS;
            self.run_span_ms += FRAME_MS;
            if c == Class::Periodic {
                self.run_periodic_ms += FRAME_MS;
            }
            if self.run_ms < self.min_speech_ms || self.run_periodic_ms == 0 {
                return VadEvent::None;
            }
            self.in_speech = true;
            self.utterance_ms = self.run_span_ms;
            self.periodic_ms = self.run_periodic_ms;
            self.silence_ms = 0;
            self.run_ms = 0;
            self.run_periodic_ms = 0;
            self.run_span_ms = 0;
            return VadEvent::SpeechStart {
                onset_ms: self.utterance_ms + self.scorer.pending_ms(),
            };
        }
        self.utterance_ms += FRAME_MS;
        if c == Class::Periodic {
            self.periodic_ms += FRAME_MS;
        }
        if speech {
            self.silence_ms = 0;
        } else {
            self.silence_ms += FRAME_MS;
        }
        let reason = if self.silence_ms >= self.end_silence_ms {
            if self.periodic_ms < self.min_utterance_ms {
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
        let c = if voiced { Class::Periodic } else { Class::Silence };
        (0..frames)
            .map(|_| v.step(c))
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
        assert!(run(&mut v, false, 2).is_empty());
        assert!(!v.in_speech());
        // the fourth consecutive voiced frame (64 ms) is
        assert!(run(&mut v, true, 3).is_empty());
        assert_eq!(v.step(Class::Periodic), VadEvent::SpeechStart { onset_ms: 64 });
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
        // one dropout inside the onset run is tolerated and counted in onset_ms
        assert!(run(&mut v, true, 2).is_empty());
        assert!(run(&mut v, false, 1).is_empty());
        assert!(run(&mut v, true, 1).is_empty());
        assert_eq!(v.step(Class::Periodic), VadEvent::SpeechStart { onset_ms: 80 });
    }

    #[test]
    fn noise_needs_a_vowel() {
        let mut v = Vad::new(&VadConfig::default());
        // voice-like but aperiodic frames never start an utterance
        for _ in 0..100 {
            assert_eq!(v.step(Class::Voiced), VadEvent::None);
        }
        // a vowel does; then aperiodic frames hold it open only for CONSONANT_BRIDGE_MS
        assert_eq!(v.step(Class::Periodic), VadEvent::SpeechStart { onset_ms: 1616 });
        let cfg = VadConfig::default();
        let n = (CONSONANT_BRIDGE_MS + cfg.end_silence_ms).div_ceil(FRAME_MS) as usize;
        let ev: Vec<_> = (0..n)
            .map(|_| v.step(Class::Voiced))
            .filter(|e| *e != VadEvent::None)
            .collect();
        // one periodic frame is too short an utterance
        assert_eq!(ev, vec![VadEvent::SpeechEnd(EndReason::TooShort)]);
    }

    #[test]
    fn max_length_cuts() {
        let cfg = VadConfig {
            min_speech_ms: 16,
            max_utterance_ms: 1600,
            ..Default::default()
        };
        let mut v = Vad::new(&cfg);
        let events: Vec<_> = (0..150).map(|_| v.step(Class::Periodic)).collect();
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
