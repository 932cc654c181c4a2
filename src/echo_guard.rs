//! The echo guards of barge-in (no I/O, no clock): whether a caller's speech onset is taken for
//! the agent's own audio coming back (line or handset echo) and ignored, or heard. The call
//! passes the times; unit tests drive the rule with scripted timings.
//!
//! Echo of the agent's audio can only begin after that audio started, so an utterance whose
//! first voiced frame came before the agent's first frame is the caller's own speech, however
//! close the two are. That case is real: the filler (`call.filler_after_ms`) or a reply can start
//! just as the caller starts a new sentence, and taking it for echo lost the sentence (seen in
//! the test suite, issue 8).

use crate::config::BargeInConfig;

/// Why an onset was taken for echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// The speech began within `barge_in.guard_after_start_ms` after the agent's audio started.
    AfterStart,
    /// The onset came within `barge_in.guard_after_stop_ms` after the agent's audio stopped
    /// (the echo's tail).
    AfterStop,
}

/// The agent's audio at the moment of a speech onset, in ms (whole milliseconds of wall clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentAudio {
    /// Playing, started this many ms ago (its first 20 ms frame was written then).
    Playing { since_start_ms: u32 },
    /// Silent, stopped this many ms ago (`None`: it has not played in this call).
    Silent { since_stop_ms: Option<u32> },
}

/// Decides whether the onset the VAD just confirmed is echo. `onset_ms`: how long the utterance
/// had lasted when the VAD confirmed it (its first voiced frame came that many ms ago; the
/// VAD's `SpeechStart { onset_ms }`). `None`: it is the caller's speech.
pub fn classify(onset_ms: u32, agent: AgentAudio, cfg: &BargeInConfig) -> Option<Echo> {
    match agent {
        // Speech that began after the agent's audio did, and soon after: echo. Speech that
        // began first cannot be its echo.
        AgentAudio::Playing { since_start_ms } => {
            (since_start_ms < cfg.guard_after_start_ms && onset_ms < since_start_ms).then_some(Echo::AfterStart)
        }
        AgentAudio::Silent { since_stop_ms } => since_stop_ms
            .is_some_and(|ms| ms < cfg.guard_after_stop_ms)
            .then_some(Echo::AfterStop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BargeInConfig {
        BargeInConfig {
            guard_after_start_ms: 200,
            guard_after_stop_ms: 150,
            ..Default::default()
        }
    }

    #[test]
    fn onset_right_after_the_agent_starts_is_echo() {
        // The agent started 120 ms ago; the speech began 64 ms ago: after the agent's audio.
        let agent = AgentAudio::Playing { since_start_ms: 120 };
        assert_eq!(classify(64, agent, &cfg()), Some(Echo::AfterStart));
    }

    #[test]
    fn speech_that_began_before_the_agent_started_is_heard() {
        // The filler started 40 ms ago, the caller's speech 64 ms ago: before it.
        let agent = AgentAudio::Playing { since_start_ms: 40 };
        assert_eq!(classify(64, agent, &cfg()), None);
        // Equal times: the speech's first frame and the agent's first frame together.
        assert_eq!(classify(40, AgentAudio::Playing { since_start_ms: 40 }, &cfg()), None);
    }

    #[test]
    fn onset_after_the_guard_is_a_barge_in() {
        let agent = AgentAudio::Playing { since_start_ms: 200 };
        assert_eq!(classify(64, agent, &cfg()), None);
        let agent = AgentAudio::Playing { since_start_ms: 5000 };
        assert_eq!(classify(64, agent, &cfg()), None);
    }

    #[test]
    fn onset_in_the_echo_tail_is_echo() {
        let tail = AgentAudio::Silent {
            since_stop_ms: Some(100),
        };
        assert_eq!(classify(64, tail, &cfg()), Some(Echo::AfterStop));
        let later = AgentAudio::Silent {
            since_stop_ms: Some(150),
        };
        assert_eq!(classify(64, later, &cfg()), None);
        let never = AgentAudio::Silent { since_stop_ms: None };
        assert_eq!(classify(64, never, &cfg()), None);
    }

    #[test]
    fn guards_of_zero_hear_everything() {
        let off = BargeInConfig {
            guard_after_start_ms: 0,
            guard_after_stop_ms: 0,
            ..Default::default()
        };
        assert_eq!(classify(20, AgentAudio::Playing { since_start_ms: 60 }, &off), None);
        assert_eq!(classify(20, AgentAudio::Silent { since_stop_ms: Some(0) }, &off), None);
    }
}
