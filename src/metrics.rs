//! The Prometheus metrics the admin scrapes at `GET /metrics`: their definitions (one global
//! registry, no per-call labels), the feeder that turns call events from the
//! [`EventBus`](crate::events::EventBus) into observations, and a few one-line recorders for
//! what only the call or the FastAGI server sees (barge-ins, fallbacks, late frames, protocol
//! errors, AGI sessions). Names follow the Prometheus conventions: `_total` for counters,
//! `_seconds` for durations.

use crate::conversation::Speaker;
use crate::events::{CallEvent, CallEventKind, CallState};
use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::LazyLock;

/// Histogram buckets (seconds) for latencies of a spoken exchange: 50 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0,
];

/// Every metric of the service, registered in [`Metrics::registry`].
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// `ava_calls_started_total`: calls whose id frame arrived.
    pub calls_started: IntCounter,
    /// `ava_calls_ended_total{reason}`: `caller_hangup`, `agent_hangup`, `error`, `shutdown`.
    pub calls_ended: IntCounterVec,
    /// `ava_active_calls`: calls live now (set at each scrape from the live-call table).
    pub active_calls: IntGauge,
    /// `ava_malloc_bytes{kind}`: jemalloc, the process's allocator, at scrape time (issue 7):
    /// `allocated` (bytes the program holds), `active` (pages holding them), `resident` (the
    /// allocator's pages in RAM: active + freed pages not yet returned + metadata), `retained`
    /// (address space kept but returned to the kernel). With RSS, tells growth from
    /// fragmentation.
    pub malloc_bytes: IntGaugeVec,
    /// `ava_stt_recognizers_idle`: Vosk recognizers kept for the next calls (reset, warmed by
    /// earlier calls or at start-up; `crate::recognizer_pool`), set when one is taken or kept.
    pub stt_recognizers_idle: IntGauge,
    /// `ava_stt_recognizers_replaced_total`: worn Vosk recognizers (`server.recognizer_max_calls`
    /// calls served) dropped for a fresh one warmed in the background (`crate::recognizer_pool`).
    pub stt_recognizers_replaced: IntCounter,
    /// `ava_voice_to_voice_seconds`: agent-side voice-to-voice latency of each reply: end of
    /// caller speech -> first reply audio queued for playout (= endpoint wait + STT final +
    /// final text -> first audio); the playout adds at most one 20 ms frame.
    pub voice_to_voice: Histogram,
    /// `ava_stage_seconds{stage}`: `endpoint` (end of speech -> endpoint decision), `stt_final`
    /// (endpoint -> Vosk final text), `llm_first_token` (final text -> first token),
    /// `first_audio` (final text -> first synthesized reply audio queued).
    pub stage: HistogramVec,
    /// `ava_greeting_seconds`: call start (id frame) -> first greeting frame written.
    pub greeting: Histogram,
    /// `ava_turns_total{speaker}`: utterances logged (`caller`, `agent`).
    pub turns: IntCounterVec,
    /// `ava_barge_ins_total{result}`: `confirmed` (the reply was cancelled) or `resumed` (a
    /// short noise paused the agent, which then went on).
    pub barge_ins: IntCounterVec,
    /// `ava_fillers_total`: fillers played against dead air.
    pub fillers: IntCounter,
    /// `ava_fallbacks_total{kind}`: `not_understood` (STT heard nothing usable), `llm_retry`,
    /// `llm_fallback_model`, `llm_failed` (apology and hangup), `tts_fallback_voice`,
    /// `tts_failed` (a canned prompt instead of the reply).
    pub fallbacks: IntCounterVec,
    /// `ava_agi_sessions_total{script,result}`: FastAGI sessions; script `call-start`,
    /// `call-end` or `unknown`; result `ok`, `hung_up`, `failed`, `bad_request`.
    pub agi_sessions: IntCounterVec,
    /// `ava_frames_written_total`: agent 20 ms frames written to Asterisk.
    pub frames_written: IntCounter,
    /// `ava_frames_late_total`: agent frames written more than [`LATE_FRAME_MS`] after their
    /// 20 ms tick was due (pacing lateness).
    pub frames_late: IntCounter,
    /// `ava_protocol_errors_total{kind}`: connections or calls ended by a protocol or socket
    /// error: `no_id_frame`, `bad_first_frame`, `truncated_frame`, `bad_frame`,
    /// `write_failed`, `engine_start`.
    pub protocol_errors: IntCounterVec,
    /// `ava_config_reloads_total{result}`: SIGHUP reloads, `ok` or `invalid`.
    pub config_reloads: IntCounterVec,
    /// `ava_history_dropped_total`: call-history writes dropped (queue full or SQLite error).
    pub history_dropped: IntCounter,
    /// Wall time (s) the engines spent computing, by `engine` (`stt`: Vosk decoding, `llm`:
    /// prompt evaluation and generation, `tts`: Piper synthesis and resampling).
    pub compute_seconds: CounterVec,
    /// Audio (s) the engines consumed (`stt`: caller audio decoded) or produced (`tts`).
    /// Real-time factor = `rate(ava_compute_seconds_total{engine})` /
    /// `rate(ava_audio_seconds_total{engine})`.
    pub audio_seconds: CounterVec,
    /// LLM tokens, by `kind` (`evaluated`: prompt tokens not found in the KV cache,
    /// `generated`). Tokens per second = `rate(ava_llm_tokens_total{kind="generated"})` /
    /// `rate(ava_compute_seconds_total{engine="llm"})`.
    pub llm_tokens: IntCounterVec,
}

/// A frame written this many ms after its tick was due counts as late.
pub const LATE_FRAME_MS: u64 = 10;

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn float_counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> CounterVec {
    let c = CounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str) -> Histogram {
    let h =
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let active_calls = IntGauge::new("ava_active_calls", "Calls live now.").expect("valid metric");
        r.register(Box::new(active_calls.clone())).expect("unique metric");
        let malloc_bytes = IntGaugeVec::new(
            Opts::new(
                "ava_malloc_bytes",
                "jemalloc at scrape time: allocated (held by the program), active (pages holding it), resident (the allocator's pages in RAM), retained (returned to the kernel, address space kept).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        r.register(Box::new(malloc_bytes.clone())).expect("unique metric");
        let stt_recognizers_idle = IntGauge::new(
            "ava_stt_recognizers_idle",
            "Vosk recognizers kept warm for the next calls.",
        )
        .expect("valid metric");
        r.register(Box::new(stt_recognizers_idle.clone()))
            .expect("unique metric");
        let stt_recognizers_replaced = IntCounter::new(
            "ava_stt_recognizers_replaced_total",
            "Worn Vosk recognizers replaced by a fresh one warmed in the background.",
        )
        .expect("valid metric");
        r.register(Box::new(stt_recognizers_replaced.clone()))
            .expect("unique metric");
        let stage = HistogramVec::new(
            HistogramOpts::new(
                "ava_stage_seconds",
                "Duration of each stage of a reply: endpoint, stt_final, llm_first_token, first_audio; reply_stall: silence inside the reply (its next sentence not ready); tts_wait: a sentence's wait for a free synthesis worker.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["stage"],
        )
        .expect("valid metric");
        r.register(Box::new(stage.clone())).expect("unique metric");
        let m = Metrics {
            calls_started: counter(&r, "ava_calls_started_total", "Calls started (id frame received)."),
            calls_ended: counter_vec(&r, "ava_calls_ended_total", "Calls ended, by end reason.", &["reason"]),
            active_calls,
            malloc_bytes,
            stt_recognizers_idle,
            stt_recognizers_replaced,
            voice_to_voice: histogram(
                &r,
                "ava_voice_to_voice_seconds",
                "End of caller speech to the first reply audio queued for playout.",
            ),
            stage,
            greeting: histogram(
                &r,
                "ava_greeting_seconds",
                "Call start to the first greeting frame written.",
            ),
            turns: counter_vec(&r, "ava_turns_total", "Utterances logged, by speaker.", &["speaker"]),
            barge_ins: counter_vec(
                &r,
                "ava_barge_ins_total",
                "Caller speech over the agent: confirmed (reply cancelled) or resumed.",
                &["result"],
            ),
            fillers: counter(&r, "ava_fillers_total", "Fillers played against dead air."),
            fallbacks: counter_vec(&r, "ava_fallbacks_total", "Fallbacks taken, by kind.", &["kind"]),
            agi_sessions: counter_vec(
                &r,
                "ava_agi_sessions_total",
                "FastAGI sessions, by script and result.",
                &["script", "result"],
            ),
            frames_written: counter(&r, "ava_frames_written_total", "Agent 20 ms frames written."),
            frames_late: counter(
                &r,
                "ava_frames_late_total",
                "Agent frames written more than 10 ms after their tick was due.",
            ),
            protocol_errors: counter_vec(
                &r,
                "ava_protocol_errors_total",
                "Connections or calls ended by a protocol or socket error, by kind.",
                &["kind"],
            ),
            config_reloads: counter_vec(
                &r,
                "ava_config_reloads_total",
                "Config reloads (SIGHUP), by result.",
                &["result"],
            ),
            history_dropped: counter(&r, "ava_history_dropped_total", "Call-history writes dropped."),
            compute_seconds: float_counter_vec(
                &r,
                "ava_compute_seconds_total",
                "Wall time the engines spent computing, by engine (stt, llm, tts).",
                &["engine"],
            ),
            audio_seconds: float_counter_vec(
                &r,
                "ava_audio_seconds_total",
                "Audio decoded (stt) or synthesized (tts), in seconds.",
                &["engine"],
            ),
            llm_tokens: counter_vec(
                &r,
                "ava_llm_tokens_total",
                "LLM tokens evaluated (prompt, not cached) and generated.",
                &["kind"],
            ),
            registry: r,
        };
        // Series that exist from the start, so dashboards and rate() see zeros, not gaps.
        for reason in ["caller_hangup", "agent_hangup", "error", "shutdown"] {
            m.calls_ended.with_label_values(&[reason]);
        }
        for s in ["endpoint", "stt_final", "llm_first_token", "first_audio", "tts_wait"] {
            m.stage.with_label_values(&[s]);
        }
        for r in ["confirmed", "resumed"] {
            m.barge_ins.with_label_values(&[r]);
        }
        for e in ["stt", "llm", "tts"] {
            m.compute_seconds.with_label_values(&[e]);
        }
        for e in ["stt", "tts"] {
            m.audio_seconds.with_label_values(&[e]);
        }
        for k in ["evaluated", "generated"] {
            m.llm_tokens.with_label_values(&[k]);
        }
        m
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Renders every metric in the Prometheus text exposition format (version 0.0.4).
pub fn render(active_calls: usize) -> String {
    METRICS.active_calls.set(active_calls as i64);
    if let Some(st) = malloc_stats() {
        let m = &METRICS.malloc_bytes;
        m.with_label_values(&["allocated"]).set(st.allocated as i64);
        m.with_label_values(&["active"]).set(st.active as i64);
        m.with_label_values(&["resident"]).set(st.resident as i64);
        m.with_label_values(&["retained"]).set(st.retained as i64);
    }
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&METRICS.registry.gather(), &mut out)
        .expect("text encoding never fails");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// jemalloc's totals, bytes (its `stats.*` mallctls, refreshed by advancing `epoch`).
#[derive(Debug, Clone, Copy)]
pub struct MallocStats {
    /// Allocated by the program and not freed (`stats.allocated`).
    pub allocated: usize,
    /// In the pages that hold allocations (`stats.active`, a multiple of the page size).
    pub active: usize,
    /// The allocator's pages resident in RAM (`stats.resident`): active pages, freed pages not
    /// yet returned to the kernel (jemalloc's `dirty_decay_ms`, 10 s by default) and metadata.
    pub resident: usize,
    /// Address space kept after its pages were returned to the kernel (`stats.retained`): not
    /// in RSS.
    pub retained: usize,
}

/// jemalloc's statistics (`tikv_jemalloc_ctl::stats`). jemalloc is the process's `malloc` (the
/// binary links it with its symbols unprefixed, see `main.rs`), so these cover the C and C++
/// engines' allocations too. Cheap (a few mallctl reads); `None` if a read fails.
pub fn malloc_stats() -> Option<MallocStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().ok()?;
    Some(MallocStats {
        allocated: stats::allocated::read().ok()?,
        active: stats::active::read().ok()?,
        resident: stats::resident::read().ok()?,
        retained: stats::retained::read().ok()?,
    })
}

/// A caller speech onset paused the agent: `confirmed` true when it became a barge-in that
/// cancelled the reply, false when playback resumed.
pub fn barge_in(confirmed: bool) {
    let result = if confirmed { "confirmed" } else { "resumed" };
    METRICS.barge_ins.with_label_values(&[result]).inc();
}

/// One audio engine's cost counters (`"stt"` or `"tts"`), looked up once so that recording
/// on the audio path (every 20 ms frame for STT) is two atomic adds, not a label lookup.
#[derive(Clone)]
pub struct AudioCost {
    compute: prometheus::Counter,
    audio: prometheus::Counter,
}

impl AudioCost {
    /// The counters of `engine` in [`Metrics::compute_seconds`] and [`Metrics::audio_seconds`].
    pub fn new(engine: &'static str) -> AudioCost {
        AudioCost {
            compute: METRICS.compute_seconds.with_label_values(&[engine]),
            audio: METRICS.audio_seconds.with_label_values(&[engine]),
        }
    }

    /// The engine spent `compute` on `audio_s` seconds of audio.
    pub fn record(&self, compute: std::time::Duration, audio_s: f64) {
        self.compute.inc_by(compute.as_secs_f64());
        self.audio.inc_by(audio_s.max(0.0));
    }
}

/// A sentence waited `wait` for a free synthesis worker (`ava_stage_seconds{stage="tts_wait"}`,
/// issue 10).
pub fn tts_wait(wait: std::time::Duration) {
    METRICS
        .stage
        .with_label_values(&["tts_wait"])
        .observe(wait.as_secs_f64());
}

/// One LLM reply: `evaluated` prompt tokens (not cached) and `generated` tokens in `compute`.
pub fn llm_reply(evaluated: usize, generated: usize, compute: std::time::Duration) {
    METRICS
        .compute_seconds
        .with_label_values(&["llm"])
        .inc_by(compute.as_secs_f64());
    METRICS
        .llm_tokens
        .with_label_values(&["evaluated"])
        .inc_by(evaluated as u64);
    METRICS
        .llm_tokens
        .with_label_values(&["generated"])
        .inc_by(generated as u64);
}

/// A fallback was taken (see [`Metrics::fallbacks`] for the kinds).
pub fn fallback(kind: &'static str) {
    METRICS.fallbacks.with_label_values(&[kind]).inc();
}

/// One agent frame was written `late_ms` after its 20 ms tick was due.
pub fn frame_written(late_ms: u64) {
    METRICS.frames_written.inc();
    if late_ms > LATE_FRAME_MS {
        METRICS.frames_late.inc();
    }
}

/// A FastAGI session ended. `script` is bounded to the known names (others count as
/// `unknown`).
pub fn agi_session(script: Option<&str>, result: &'static str) {
    let script = match script {
        Some(s @ ("call-start" | "call-end")) => s,
        _ => "unknown",
    };
    METRICS.agi_sessions.with_label_values(&[script, result]).inc();
}

/// A connection or call ended by the error `detail` (the text of `CallEnd::Error`); counted
/// by kind.
pub fn protocol_error(detail: &str) {
    METRICS.protocol_errors.with_label_values(&[error_kind(detail)]).inc();
}

/// The bounded kind label of an error text (see [`Metrics::protocol_errors`]).
pub fn error_kind(detail: &str) -> &'static str {
    if detail.contains("not an id frame") || detail.starts_with("bad first frame") {
        "bad_first_frame"
    } else if detail.contains("id frame") {
        "no_id_frame"
    } else if detail.contains("truncated") {
        "truncated_frame"
    } else if detail.contains("cannot write") {
        "write_failed"
    } else if detail.contains("engines") {
        "engine_start"
    } else {
        "bad_frame"
    }
}

/// Turns call events into observations. Keeps each live call's start time (for the
/// greeting latency); one per process, fed by one task.
#[derive(Default)]
pub struct Feeder {
    started: HashMap<String, chrono::DateTime<chrono::FixedOffset>>,
}

impl Feeder {
    /// Records one event. `end_silence_ms` is `[vad] end_silence_ms` of the config in force
    /// (ms): the endpoint wait, the first stage of voice-to-voice.
    pub fn observe(&mut self, ev: &CallEvent, end_silence_ms: u32) {
        let m = &*METRICS;
        let ts = chrono::DateTime::parse_from_rfc3339(&ev.ts).ok();
        match &ev.kind {
            CallEventKind::Started { .. } => {
                m.calls_started.inc();
                if let Some(ts) = ts {
                    self.started.insert(ev.call_id.clone(), ts);
                }
            }
            CallEventKind::State { state } => {
                // The first Speaking of a call is its greeting.
                if *state == CallState::Speaking {
                    if let (Some(start), Some(now)) = (self.started.remove(&ev.call_id), ts) {
                        let ms = (now - start).num_milliseconds().max(0);
                        m.greeting.observe(ms as f64 / 1000.0);
                    }
                }
            }
            CallEventKind::Utterance { entry } => {
                let speaker = match entry.speaker {
                    Speaker::Caller => "caller",
                    Speaker::Agent => "agent",
                };
                m.turns.with_label_values(&[speaker]).inc();
                match entry.prompt {
                    Some("filler") => m.fillers.inc(),
                    Some("not_understood") => fallback("not_understood"),
                    _ => {}
                }
                if let Some(t) = &entry.timings {
                    let s = |ms: u64| ms as f64 / 1000.0;
                    m.stage
                        .with_label_values(&["endpoint"])
                        .observe(s(end_silence_ms as u64));
                    m.stage.with_label_values(&["stt_final"]).observe(s(t.stt_final_ms));
                    if let Some(ms) = t.llm_first_token_ms {
                        m.stage.with_label_values(&["llm_first_token"]).observe(s(ms));
                    }
                    if let Some(ms) = t.tts_first_audio_ms {
                        m.stage.with_label_values(&["first_audio"]).observe(s(ms));
                        m.voice_to_voice.observe(s(end_silence_ms as u64 + t.stt_final_ms + ms));
                        m.stage.with_label_values(&["reply_stall"]).observe(s(t.reply_stall_ms));
                    }
                }
            }
            CallEventKind::AgentSentence { .. } => {}
            CallEventKind::Ended { reason, detail } => {
                self.started.remove(&ev.call_id);
                m.calls_ended.with_label_values(&[reason]).inc();
                if *reason == "error" {
                    protocol_error(detail);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_are_bounded() {
        assert_eq!(
            error_kind("no id frame within 2000 ms: ending the connection"),
            "no_id_frame"
        );
        assert_eq!(
            error_kind("first frame was audio, not an id frame: ending"),
            "bad_first_frame"
        );
        assert_eq!(
            error_kind("truncated frame: the connection closed with 3 bytes"),
            "truncated_frame"
        );
        assert_eq!(error_kind("cannot write to Asterisk: broken pipe"), "write_failed");
        assert_eq!(error_kind("unknown frame kind 0x99"), "bad_frame");
    }

    #[test]
    fn the_feeder_turns_call_events_into_observations() {
        use crate::conversation::{Entry, TurnTimings};
        let ev = |ts: &str, kind| CallEvent {
            call_id: "feeder-test".into(),
            ts: ts.into(),
            kind,
        };
        let m = &*METRICS;
        let started = m.calls_started.get();
        let (greet_n, greet_sum) = (m.greeting.get_sample_count(), m.greeting.get_sample_sum());
        let (v2v_n, v2v_sum) = (m.voice_to_voice.get_sample_count(), m.voice_to_voice.get_sample_sum());
        let truncated = m.protocol_errors.with_label_values(&["truncated_frame"]).get();
        let mut f = Feeder::default();
        f.observe(
            &ev(
                "2026-01-01T00:00:00.000Z",
                CallEventKind::Started {
                    caller: Default::default(),
                },
            ),
            800,
        );
        let speaking = || CallEventKind::State {
            state: CallState::Speaking,
        };
        f.observe(&ev("2026-01-01T00:00:00.250Z", speaking()), 800);
        // Only the first Speaking of a call is its greeting.
        f.observe(&ev("2026-01-01T00:00:09.000Z", speaking()), 800);
        let mut reply = Entry::now("feeder-test", Speaker::Agent, "Sure.".into());
        reply.timings = Some(TurnTimings {
            stt_final_ms: 100,
            llm_first_token_ms: Some(300),
            tts_first_audio_ms: Some(500),
            ..Default::default()
        });
        f.observe(
            &ev("2026-01-01T00:00:10.000Z", CallEventKind::Utterance { entry: reply }),
            800,
        );
        f.observe(
            &ev(
                "2026-01-01T00:00:11.000Z",
                CallEventKind::Ended {
                    reason: "error",
                    detail: "truncated frame: the connection closed with 3 bytes".into(),
                },
            ),
            800,
        );
        assert_eq!(m.calls_started.get(), started + 1);
        assert_eq!(m.greeting.get_sample_count(), greet_n + 1);
        assert!((m.greeting.get_sample_sum() - greet_sum - 0.25).abs() < 1e-9);
        assert_eq!(m.voice_to_voice.get_sample_count(), v2v_n + 1);
        assert!((m.voice_to_voice.get_sample_sum() - v2v_sum - 1.4).abs() < 1e-9);
        assert_eq!(
            m.protocol_errors.with_label_values(&["truncated_frame"]).get(),
            truncated + 1
        );
        assert!(f.started.is_empty());
    }

    #[test]
    fn rendered_text_has_the_conventional_names() {
        agi_session(Some("call-start"), "ok");
        agi_session(Some("../../etc"), "failed");
        let text = render(0);
        for name in [
            "ava_calls_started_total",
            "ava_calls_ended_total{reason=\"shutdown\"}",
            "ava_voice_to_voice_seconds_bucket",
            "ava_stage_seconds_bucket{stage=\"llm_first_token\"",
            "ava_agi_sessions_total{result=\"failed\",script=\"unknown\"}",
            "ava_active_calls 0",
            "ava_malloc_bytes{kind=\"allocated\"}",
            "ava_malloc_bytes{kind=\"resident\"}",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }

    #[test]
    fn malloc_stats_see_a_block_being_held() {
        // Through C's malloc, as the engines allocate: jemalloc serves it (unprefixed symbols),
        // so its stats count it. Other tests run alongside and may free memory meanwhile: slack.
        let before = malloc_stats().expect("jemalloc stats").allocated;
        // SAFETY: a plain allocation, written, then freed below.
        // black_box: LLVM may otherwise drop a malloc/free pair whose memory nobody reads.
        let block = std::hint::black_box(unsafe { libc::malloc(64 << 20) as *mut u8 });
        assert!(!block.is_null());
        unsafe { std::ptr::write_bytes(block, 1, 64 << 20) };
        let st = malloc_stats().unwrap();
        assert!(st.resident >= st.active && st.active >= st.allocated, "{st:?}");
        assert!(
            st.allocated >= before + (48 << 20),
            "allocated {before} -> {} with a 64 MiB block alive",
            st.allocated
        );
        unsafe { libc::free(block as *mut libc::c_void) };
    }
}
