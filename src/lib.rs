//! asterisk-voice-agent: a local, offline voice agent for Asterisk over AudioSocket.
//!
//! Data flows one way through a call: [`audiosocket`] frames -> [`audio`] (decode, resample)
//! -> [`vad`] (endpointing, barge-in) -> [`stt`] (Vosk) -> [`conversation`] history -> [`llm`]
//! (llama.cpp, streamed tokens) -> sentences -> [`tts`] (Piper) -> [`audio`] resample -> 20 ms
//! frames paced by [`call`] back onto the socket. [`server`] accepts connections and runs one
//! call task each; [`simulate`] is a black-box caller for tests and benchmarks.

pub mod agi;
pub mod audio;
pub mod audiosocket;
pub mod call;
pub mod cli;
pub mod config;
pub mod console;
pub mod conversation;
pub mod directory;
pub mod engines;
pub mod events;
pub mod llm;
pub mod models;
pub mod onnx;
pub mod recognizer_pool;
pub mod server;
pub mod silero;
pub mod simulate;
pub mod smart_turn;
pub mod stt;
pub mod synth_order;
pub mod transport;
pub mod tts;
pub mod turn;
// issue 8: the LLM prefilled while the caller speaks
pub mod prefill;
pub mod vad;
// issue 7: bounded under bad input, load and faults
pub mod admission;
pub mod deadair;
pub mod echo_guard;
pub mod logsafe;

/// jemalloc's options compiled into the `asterisk-voice-agent` binary (`main.rs` exports them
/// as jemalloc's `malloc_conf` symbol, which is read before the `MALLOC_CONF` environment
/// variable, whose options win), NUL-terminated as jemalloc reads them. `oversize_threshold:0`
/// turns off jemalloc's dedicated arena for requests of 8 MiB and more, which hands such memory
/// back to the kernel as soon as it is freed: Piper's tensors for a long sentence are that large,
/// so with ONNX Runtime's arena off (`tts.memory_arena = false`, issue 7) every synthesis faulted
/// them in afresh. Measured (`TTS_SENTENCES=50 cargo bench --bench tts_memory`, 2-core AMD EPYC
/// without AVX-512): real-time factor 0.22 -> 0.13-0.14, RSS after 50 sentences 123 -> 182-233
/// MiB (the freed pages are kept for `dirty_decay_ms`, 10 s, then returned); with ONNX Runtime's
/// arena on instead RSS reached 364 MiB and kept growing. Benches that measure the engines in their
/// own process pass the same options through `MALLOC_CONF`.
pub const JEMALLOC_CONF: &[u8; 21] = b"oversize_threshold:0\0";

/// [`JEMALLOC_CONF`] as `MALLOC_CONF` text (without the NUL).
pub fn jemalloc_conf_str() -> &'static str {
    std::str::from_utf8(&JEMALLOC_CONF[..JEMALLOC_CONF.len() - 1]).expect("ASCII")
}

// issue 9: what the admin sees
pub mod history;
pub mod http;
pub mod metrics;
pub mod reload;
