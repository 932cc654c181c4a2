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
// issue 9: what the admin sees
pub mod history;
pub mod http;
pub mod metrics;
pub mod reload;
