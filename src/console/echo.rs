//! The console's echo gate: on speakers without a headset the agent's own voice comes back
//! through the microphone, and the call's VAD would take it for the caller barging in. While
//! the agent's audio plays (and for a tail after it, the echo path and the room), a microphone
//! frame passes only if it is louder than the loudest agent audio of that moment plus a margin;
//! quieter frames reach the call as silence. No I/O here: levels in dBFS, times passed in.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Agent frames quieter than this (dBFS) are silence and make no echo worth gating.
pub const REFERENCE_FLOOR_DBFS: f32 = -55.0;

/// How long after an agent frame played its echo may still be heard: the output and input
/// device latencies plus room reverberation, in ms.
pub const ECHO_TAIL_MS: u64 = 300;

/// The default margin (dB): the microphone must be at most this far below the agent's own
/// playback level to pass. -6 dB stops echo coupled 6 dB or more below the played level.
pub const DEFAULT_MARGIN_DB: f32 = -6.0;

/// Device latencies above this (ms) are taken as a driver's nonsense and capped.
pub const MAX_DEVICE_LATENCY_MS: u64 = 2000;

/// Levels of the agent audio sent to the speaker, by the time each frame leaves our playback
/// buffer for the device, and the devices' own latencies as the sound driver reports them.
#[derive(Debug, Default)]
pub struct EchoReference {
    levels: Mutex<VecDeque<(Instant, f32)>>,
    /// Output: from the device callback to the moment its first sample is heard (µs).
    output_latency_us: AtomicU64,
    /// Input: from the moment a sample was captured to the callback that delivers it (µs).
    input_latency_us: AtomicU64,
}

impl EchoReference {
    /// Records the speaker's latency (cpal's `playback - callback`), capped at
    /// [`MAX_DEVICE_LATENCY_MS`].
    pub fn set_output_latency(&self, d: Duration) {
        self.output_latency_us.store(cap_us(d), Ordering::Relaxed);
    }

    /// Records the microphone's latency (cpal's `callback - capture`), capped at
    /// [`MAX_DEVICE_LATENCY_MS`].
    pub fn set_input_latency(&self, d: Duration) {
        self.input_latency_us.store(cap_us(d), Ordering::Relaxed);
    }

    /// How far back from "now" a microphone frame's echo may come from: the acoustic tail
    /// ([`ECHO_TAIL_MS`]) plus the speaker's and the microphone's latencies, since an agent
    /// frame is heard that long after it leaves our buffer and the microphone hands its echo
    /// over that long after capturing it. Under a loaded sound server (PulseAudio on a busy
    /// 2-core machine) these latencies alone exceeded the 300 ms tail and the echo got through.
    pub fn window(&self) -> Duration {
        Duration::from_millis(ECHO_TAIL_MS)
            + Duration::from_micros(self.output_latency_us.load(Ordering::Relaxed))
            + Duration::from_micros(self.input_latency_us.load(Ordering::Relaxed))
    }

    /// Records that a frame of `level_dbfs` plays at `due`. Silence is not recorded; entries
    /// more than 2 s older than `due` are dropped (the queue stays bounded).
    pub fn push(&self, due: Instant, level_dbfs: f32) {
        let mut q = self.levels.lock().unwrap_or_else(|e| e.into_inner());
        while q
            .front()
            .is_some_and(|(t, _)| due.saturating_duration_since(*t) > Duration::from_secs(2))
        {
            q.pop_front();
        }
        if level_dbfs > REFERENCE_FLOOR_DBFS {
            q.push_back((due, level_dbfs));
        }
    }

    /// The loudest agent frame due between `now - tail` and `now` (plus one frame of slack),
    /// or `None` if the agent was silent then.
    pub fn loudest(&self, now: Instant, tail: Duration) -> Option<f32> {
        let q = self.levels.lock().unwrap_or_else(|e| e.into_inner());
        let from = now.checked_sub(tail).unwrap_or(now);
        let to = now + Duration::from_millis(20);
        q.iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, l)| *l)
            .fold(None, |m: Option<f32>, l| Some(m.map_or(l, |m| m.max(l))))
    }
}

fn cap_us(d: Duration) -> u64 {
    (d.as_micros() as u64).min(MAX_DEVICE_LATENCY_MS * 1000)
}

/// The gate's decision rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EchoGate {
    /// `None`: no gate (a headset: no echo). `Some(m)`: during agent audio a microphone frame
    /// passes only at `reference + m` dBFS or louder.
    pub margin_db: Option<f32>,
}

impl EchoGate {
    /// Whether a microphone frame of `mic_dbfs` reaches the call, given the loudest agent
    /// audio `reference_dbfs` of the same moment ([`EchoReference::loudest`]).
    pub fn pass(&self, mic_dbfs: f32, reference_dbfs: Option<f32>) -> bool {
        match (self.margin_db, reference_dbfs) {
            (Some(margin), Some(reference)) => mic_dbfs >= reference + margin,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_covers_the_tail_and_forgets_silence() {
        let r = EchoReference::default();
        let t0 = Instant::now();
        r.push(t0, -20.0);
        r.push(t0 + Duration::from_millis(20), -30.0);
        r.push(t0 + Duration::from_millis(40), -90.0); // silence: not recorded
        let tail = Duration::from_millis(ECHO_TAIL_MS);
        assert_eq!(r.loudest(t0, tail), Some(-20.0));
        assert_eq!(r.loudest(t0 + Duration::from_millis(250), tail), Some(-20.0));
        assert_eq!(r.loudest(t0 + Duration::from_millis(310), tail), Some(-30.0));
        assert_eq!(r.loudest(t0 + Duration::from_millis(400), tail), None);
        // Not yet playing (due later than the next frame): no echo yet.
        assert_eq!(r.loudest(t0 - Duration::from_millis(100), tail), None);
    }

    #[test]
    fn device_latencies_widen_the_window() {
        let r = EchoReference::default();
        let t0 = Instant::now();
        r.push(t0, -20.0);
        let later = t0 + Duration::from_millis(500);
        assert_eq!(r.loudest(later, r.window()), None, "beyond the 300 ms tail");
        r.set_output_latency(Duration::from_millis(150));
        r.set_input_latency(Duration::from_millis(100));
        assert_eq!(r.window(), Duration::from_millis(550));
        assert_eq!(r.loudest(later, r.window()), Some(-20.0), "heard late: still gated");
        r.set_output_latency(Duration::from_secs(3600));
        assert!(r.window() <= Duration::from_millis(ECHO_TAIL_MS + 2 * MAX_DEVICE_LATENCY_MS));
    }

    #[test]
    fn reference_queue_is_bounded() {
        let r = EchoReference::default();
        let t0 = Instant::now();
        for i in 0..1000 {
            r.push(t0 + Duration::from_millis(20 * i), -20.0);
        }
        assert!(r.levels.lock().unwrap().len() <= 101);
    }

    #[test]
    fn gate_passes_louder_speech_and_stops_echo() {
        let g = EchoGate { margin_db: Some(-6.0) };
        assert!(g.pass(-40.0, None), "nothing playing: everything passes");
        assert!(!g.pass(-32.0, Some(-20.0)), "echo 12 dB down is stopped");
        assert!(g.pass(-24.0, Some(-20.0)), "speech 4 dB below the playback passes");
        assert!(g.pass(-15.0, Some(-20.0)));
        let headset = EchoGate { margin_db: None };
        assert!(headset.pass(-60.0, Some(-10.0)));
    }
}
