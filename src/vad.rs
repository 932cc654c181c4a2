//! Voice activity detection on the caller's audio: an energy detector over frames that turns
//! a stream of levels into utterance starts (onset, also used for barge-in) and ends
//! (endpointing). Thresholds come from `[vad]` in the config.

use crate::audio::rms_dbfs;
use crate::config::VadConfig;

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
}

/// The detector; one per call.
#[derive(Debug)]
pub struct Vad {
    threshold_dbfs: f32,
    min_speech_ms: u32,
    end_silence_ms: u32,
    max_utterance_ms: u32,
    in_speech: bool,
    /// Consecutive voiced ms (before onset) or ms since utterance start (in speech).
    voiced_ms: u32,
    silence_ms: u32,
    utterance_ms: u32,
}

impl Vad {
    /// A detector with the config's thresholds.
    pub fn new(cfg: &VadConfig) -> Vad {
        Vad {
            threshold_dbfs: cfg.speech_threshold_dbfs,
            min_speech_ms: cfg.min_speech_ms,
            end_silence_ms: cfg.end_silence_ms,
            max_utterance_ms: cfg.max_utterance_ms,
            in_speech: false,
            voiced_ms: 0,
            silence_ms: 0,
            utterance_ms: 0,
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

    /// Feeds one frame of `samples` at `rate_hz` (any length; normally 20 ms).
    pub fn push(&mut self, samples: &[i16], rate_hz: u32) -> VadEvent {
        let ms = (samples.len() as u64 * 1000 / rate_hz as u64) as u32;
        if ms == 0 {
            return VadEvent::None;
        }
        let voiced = rms_dbfs(samples) > self.threshold_dbfs;
        if !self.in_speech {
            if voiced {
                self.voiced_ms += ms;
                if self.voiced_ms >= self.min_speech_ms {
                    self.in_speech = true;
                    self.utterance_ms = self.voiced_ms;
                    self.silence_ms = 0;
                    return VadEvent::SpeechStart {
                        onset_ms: self.voiced_ms,
                    };
                }
            } else {
                self.voiced_ms = 0;
            }
            return VadEvent::None;
        }
        self.utterance_ms += ms;
        if voiced {
            self.silence_ms = 0;
        } else {
            self.silence_ms += ms;
        }
        let reason = if self.silence_ms >= self.end_silence_ms {
            EndReason::Endpoint
        } else if self.utterance_ms >= self.max_utterance_ms {
            EndReason::MaxLength
        } else {
            return VadEvent::None;
        };
        self.in_speech = false;
        self.voiced_ms = 0;
        VadEvent::SpeechEnd(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(level: i16) -> Vec<i16> {
        (0..160).map(|i| if i % 2 == 0 { level } else { -level }).collect()
    }

    #[test]
    fn onset_endpoint_and_noise() {
        let cfg = VadConfig {
            min_speech_ms: 60,
            end_silence_ms: 200,
            ..Default::default()
        };
        let mut v = Vad::new(&cfg);
        let loud = frame(8000);
        let quiet = frame(10);
        // a 40 ms click is not speech
        assert_eq!(v.push(&loud, 8000), VadEvent::None);
        assert_eq!(v.push(&loud, 8000), VadEvent::None);
        assert_eq!(v.push(&quiet, 8000), VadEvent::None);
        assert!(!v.in_speech());
        // 60 ms of speech starts an utterance
        v.push(&loud, 8000);
        v.push(&loud, 8000);
        assert_eq!(v.push(&loud, 8000), VadEvent::SpeechStart { onset_ms: 60 });
        // a pause shorter than end_silence_ms does not end it
        for _ in 0..9 {
            assert_eq!(v.push(&quiet, 8000), VadEvent::None);
        }
        v.push(&loud, 8000);
        for _ in 0..9 {
            assert_eq!(v.push(&quiet, 8000), VadEvent::None);
        }
        assert_eq!(v.push(&quiet, 8000), VadEvent::SpeechEnd(EndReason::Endpoint));
    }

    #[test]
    fn max_length_cuts() {
        let cfg = VadConfig {
            min_speech_ms: 20,
            max_utterance_ms: 1000,
            ..Default::default()
        };
        let mut v = Vad::new(&cfg);
        let loud = frame(8000);
        let events: Vec<_> = (0..60).map(|_| v.push(&loud, 8000)).collect();
        assert_eq!(
            events
                .iter()
                .filter(|e| **e == VadEvent::SpeechEnd(EndReason::MaxLength))
                .count(),
            1
        );
        assert_eq!(
            events.iter().position(|e| matches!(e, VadEvent::SpeechEnd(_))),
            Some(49)
        );
    }
}
