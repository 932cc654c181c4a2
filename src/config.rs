//! The service configuration: a TOML file whose every key has a default, read once at start-up.
//! Unknown keys are rejected with their name so a typo never silently falls back to a default.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole configuration (`asterisk-voice-agent serve --config FILE`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`: listen addresses and protocol timeouts.
    pub server: ServerConfig,
    /// `[models]`: where the model files are.
    pub models: ModelsConfig,
    /// `[agent]`: what the agent says and how it replies.
    pub agent: AgentConfig,
    /// `[llm]`: llama.cpp settings.
    pub llm: LlmConfig,
    /// `[tts]`: Piper settings.
    pub tts: TtsConfig,
    /// `[vad]`: voice activity detection, endpointing and barge-in.
    pub vad: VadConfig,
    /// `[log]`: the conversation log.
    pub log: LogConfig,
    /// `[barge_in]`: when caller speech interrupts the agent.
    pub barge_in: BargeInConfig,
    /// `[call]`: prompts, limits and fallbacks of a call.
    pub call: CallConfig,
    /// `[agi]`: the FastAGI server for caller ID and call control.
    pub agi: AgiConfig,
    /// `[actions]`: what the agent may do to the call (transfer destinations, DTMF bindings).
    pub actions: ActionsConfig,
    /// `[test_faults]`: fault injection, for the test suite only.
    pub test_faults: FaultsConfig,
    /// `[turn]`: end-of-turn detection (Smart Turn or the silence timer) and the reply
    /// prepared during the pause (issue 8).
    pub turn: TurnConfig,
    /// `[http]`: the admin's HTTP server (health check, metrics, live page; issue 9).
    pub http: HttpConfig,
    /// `[history]`: the SQLite call history (issue 9).
    pub history: HistoryConfig,
    /// Where this config was read from, set by [`Config::load`] (not a key).
    #[serde(skip)]
    pub source: Option<ConfigSource>,
}

/// How the end of the caller's turn is decided (`[turn] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TurnMode {
    /// The Smart Turn model is asked at each pause; `max_end_silence_ms` is the fallback.
    Smart,
    /// The fixed silence timer `vad.end_silence_ms` alone (the old behaviour).
    Silence,
}

/// `[turn]` section: end-of-turn detection. docs/turns.md has the measurements behind the
/// defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
    /// `"smart"` (the Smart Turn v3.2 model decides at each pause) or `"silence"` (the fixed
    /// `vad.end_silence_ms` timer). Default "silence": with its defaults smart mode cut in on 3
    /// of the real recordings' 15 mid-sentence pauses against the timer's 2 (12 of 20 synthetic
    /// ones against 10) for a decision delay p50 of 500 ms against 820, and at 4 calls on 2
    /// cores it answered later than the timer (docs/turns.md).
    pub mode: TurnMode,
    /// Silence (ms) after speech before the turn model is asked (and asked again after each
    /// further `min_pause_ms` while it says "not finished"); also when the speculative reply
    /// starts. Default 200.
    pub min_pause_ms: u32,
    /// Smart Turn probability (0..1) at or above which the turn is over. Default 0.95: with a
    /// 1200 ms fallback, on the real recordings' 15 mid-sentence pauses it cut in on 1 (0.7: 3;
    /// the 800 ms timer: 2), at a decision delay p50 of 500 ms on all 23 turn ends (0.7: 280
    /// ms; docs/turns.md).
    pub threshold: f32,
    /// In smart mode, silence (ms) that always ends the turn whatever the model says (replaces
    /// `vad.end_silence_ms`). Default 800, the silence timer's: smart mode then answers as the
    /// timer does, and sooner when the model is sure; at 1 call (smart, speculative, 6
    /// utterances) voice-to-voice p50 / p95 600 / 880 ms against 640 / 1260 ms with 1200
    /// (docs/turns.md), at the cost of the timer's cut-ins on pauses of 800 ms and more.
    pub max_end_silence_ms: u32,
    /// Start the reply (LLM and synthesis of its first sentence) from the text so far at the
    /// first pause, playing nothing until the turn is decided; dropped if the caller goes on.
    /// Not started while Vosk is more than 300 ms behind the caller (the final decode that
    /// gives the text so far would put it further behind). Default true: at 1 call (silence
    /// mode, 6 utterances, 2-core machine) end of speech -> reply audio p50 1155 -> 826 ms,
    /// at 4 calls 1215 -> 865 ms (docs/turns.md).
    pub speculative: bool,
    /// While the caller speaks, every this many ms of their audio, and once more 100 ms into
    /// each pause, the text so far (Vosk's partial result) is evaluated into the LLM's KV cache,
    /// so that after the end of the turn only the last words are left to evaluate
    /// (src/prefill.rs); not while Vosk is more than 300 ms behind the caller. 0 = off.
    /// Default 500: at 1 call (smart mode, 6 utterances, 2-core machine) prompt tokens left
    /// after the final transcript p50 39 -> 14, final transcript -> first token p50 412 ->
    /// 175 ms; at 4 calls Vosk runs seconds behind and no prefill is made (docs/turns.md).
    pub prefill_every_ms: u32,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            mode: TurnMode::Silence,
            min_pause_ms: 200,
            threshold: 0.95,
            max_end_silence_ms: 800,
            speculative: true,
            prefill_every_ms: 500,
        }
    }
}

/// `[http]` section: the admin's HTTP server (`/health`, `/metrics`, the live page at `/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address. Default `127.0.0.1:8091` (loopback). Any other address needs `token`;
    /// port 0 picks a free port (logged).
    pub listen: SocketAddr,
    /// Bearer token every request must carry (`Authorization: Bearer TOKEN`, or `?token=` for
    /// the page). Required when `listen` is not loopback. Default none.
    pub token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8091".parse().unwrap(),
            token: None,
        }
    }
}

/// `[history]` section: the call history (SQLite), a row per call and per utterance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// The SQLite database file (created with its folder). Default
    /// `/var/lib/asterisk-voice-agent/history.sqlite3`.
    pub path: PathBuf,
    /// Calls older than this many days are deleted (at start-up and hourly); 0 keeps all.
    /// Default 90.
    pub keep_days: u32,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            path: PathBuf::from("/var/lib/asterisk-voice-agent/history.sqlite3"),
            keep_days: 90,
        }
    }
}

/// Where a config came from: shown by `/health` so the admin can tell a reload took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigSource {
    /// The file read.
    pub path: PathBuf,
    /// SHA-256 of its text, hex.
    pub sha256: String,
    /// When it was read, RFC 3339 UTC.
    pub loaded_at: String,
}

/// `[barge_in]` section. Caller speech while the agent speaks first pauses the agent's audio
/// (at VAD onset, within about 100 ms); if the speech lasts `confirm_ms` the reply is cancelled,
/// otherwise (a cough, a click) playback resumes where it paused.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BargeInConfig {
    /// Caller speech may interrupt the agent. Default true.
    pub enabled: bool,
    /// Speech (ms) that turns a pause into a barge-in that cancels the reply. Default 300.
    pub confirm_ms: u32,
    /// No barge-in during the first ms of each agent reply (its own echo at start). Default 200.
    pub guard_after_start_ms: u32,
    /// Speech starting within this many ms after the agent stopped is ignored (echo tail).
    /// Default 150.
    pub guard_after_stop_ms: u32,
}

impl Default for BargeInConfig {
    fn default() -> Self {
        BargeInConfig {
            enabled: true,
            confirm_ms: 300,
            guard_after_start_ms: 200,
            guard_after_stop_ms: 150,
        }
    }
}

/// `[call]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallConfig {
    /// Played when a reply is not ready `filler_after_ms` after the endpoint. Default "One moment.".
    pub filler: String,
    /// Dead-air limit before the filler (ms after the endpoint). Default 1200. When the turn
    /// model ends a turn sooner than `vad.end_silence_ms` of silence, the filler still counts
    /// from where that timer would have ended it: the reply gets the time saved.
    pub filler_after_ms: u64,
    /// Played when STT heard nothing usable. Default "Sorry, I didn't catch that. Could you say it again?".
    pub not_understood: String,
    /// Played before hanging up when the LLM keeps failing. Default an apology.
    pub apology: String,
    /// Played before hanging up at the call limits. Default "Thank you for calling. Goodbye.".
    pub goodbye: String,
    /// Longest call (ms); then the goodbye and a hangup. Default 600000 (10 min).
    pub max_call_ms: u64,
    /// Longest time (ms) without caller speech; then the goodbye and a hangup. Default 30000.
    pub max_silence_ms: u64,
    /// A reply attempt is retried when the LLM sends nothing (its first token, or the next one)
    /// for this many ms. Default 5000.
    pub llm_timeout_ms: u64,
    /// Retries of a failed or timed-out reply before the fallback model (or the apology). Default 2.
    pub llm_retries: u32,
    /// A second GGUF used when the main one keeps failing. Default none.
    pub fallback_llm: Option<std::path::PathBuf>,
    /// A second Piper voice (`.onnx`) used when synthesis fails. Default none: canned prompts.
    pub fallback_voice: Option<std::path::PathBuf>,
    /// Played (at 8 kHz, rendered at start-up) to a caller who connects while `server.max_calls`
    /// calls are live, before a clean hangup so the dialplan goes on. Default "All our lines
    /// are busy. Please call again later.".
    pub busy: String,
    /// Played when a reply is still not ready `filler_after_ms + second_filler_after_ms` after
    /// the endpoint (the first filler has played). Default "Still working on it.".
    pub second_filler: String,
    /// Ms after the first filler became due before the second one plays. Default 2500.
    pub second_filler_after_ms: u64,
    /// Played when a reply is still not ready `reply_deadline_ms` after the endpoint: the
    /// reply is dropped and the caller asked again. Default "Sorry, that took too long. Could
    /// you say that again?".
    pub reprompt: String,
    /// Ms after the endpoint after which a reply that has not started is given up. Default 6000.
    pub reply_deadline_ms: u64,
    /// After this many given-up replies in a row the call is handed off: a transfer to
    /// `handoff_transfer` if set, else the apology and a hangup. Default 2.
    pub max_reprompts: u32,
    /// The `[actions.transfer]` name the call is transferred to when replies keep timing out.
    /// Default none (apology and hangup).
    pub handoff_transfer: Option<String>,
}

impl Default for CallConfig {
    fn default() -> Self {
        CallConfig {
            filler: "One moment.".into(),
            filler_after_ms: 1200,
            not_understood: "Sorry, I didn't catch that. Could you say it again?".into(),
            apology: "I'm sorry, I'm having trouble right now. Please call again later. Goodbye.".into(),
            goodbye: "Thank you for calling. Goodbye.".into(),
            max_call_ms: 600_000,
            max_silence_ms: 30_000,
            llm_timeout_ms: 5000,
            llm_retries: 2,
            fallback_llm: None,
            fallback_voice: None,
            busy: "All our lines are busy. Please call again later.".into(),
            second_filler: "Still working on it.".into(),
            second_filler_after_ms: 2500,
            reprompt: "Sorry, that took too long. Could you say that again?".into(),
            reply_deadline_ms: 6000,
            max_reprompts: 2,
            handoff_transfer: None,
        }
    }
}

/// `[agi]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgiConfig {
    /// Run the FastAGI server. Default true.
    pub enabled: bool,
    /// FastAGI listen address (`AGI(agi://127.0.0.1:4573/...)`). Default `127.0.0.1:4573`
    /// (loopback: Asterisk runs on the same host).
    pub listen: SocketAddr,
    /// FastAGI sessions open at once; further connections are closed at once with a log line
    /// (each session is also bounded by its 5 s header and 10 s reply timeouts). Default 64.
    pub max_sessions: usize,
}

impl Default for AgiConfig {
    fn default() -> Self {
        AgiConfig {
            enabled: true,
            listen: "127.0.0.1:4573".parse().unwrap(),
            max_sessions: crate::agi::DEFAULT_MAX_SESSIONS,
        }
    }
}

/// `[actions]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActionsConfig {
    /// Transfer destinations the agent may choose, by name: `operator = "PJSIP/100"`. The value
    /// is handed to the dialplan in `AVA_TRANSFER`; the LLM only ever picks a name. Default none.
    pub transfer: std::collections::BTreeMap<String, String>,
    /// DTMF digit bindings: `"0" = "transfer:operator"`, `"#" = "hangup"`. Digits with no binding
    /// reach the conversation as text. Default none.
    pub dtmf: std::collections::BTreeMap<String, String>,
    /// The LLM may end the call (`hangup`, after its goodbye) or transfer it to one of the
    /// `transfer` names, through grammar-constrained output. Default false: small models
    /// choose poorly (the test tier's 135M model sometimes hangs up on ordinary questions; see
    /// docs/actions.md), so turn it on with a model that decides well.
    pub llm_actions: bool,
}

impl Default for ActionsConfig {
    fn default() -> Self {
        ActionsConfig {
            transfer: Default::default(),
            dtmf: Default::default(),
            llm_actions: false,
        }
    }
}

/// `[test_faults]` section: inject faults to test the fallbacks. Never set in production.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsConfig {
    /// STT returns nothing for every utterance.
    pub stt_empty: bool,
    /// Each final transcript reaches the call this long (ms) after it was ready, in order, as
    /// from an STT that has fallen behind the caller. Default 0.
    pub stt_final_delay_ms: u64,
    /// The first N LLM requests of each call fail.
    pub llm_fail_first: u32,
    /// Every LLM request waits this long (ms) before starting.
    pub llm_delay_ms: u64,
    /// Each sentence of a reply after its first waits this long (ms) before synthesis, as from
    /// a TTS that cannot keep up (tests of `reply_stall_ms`). Default 0.
    pub tts_later_sentence_delay_ms: u64,
    /// Every reply synthesis with the main voice fails.
    pub tts_fail: bool,
    /// The N-th conversation log entry (1-based) is written only half, then fails like a full
    /// disk. Default 0 (never).
    pub log_fail_at: u64,
    /// `serve` waits this long (ms) before loading the models (tests of `/health` before
    /// ready). Default 0.
    pub startup_delay_ms: u64,
    /// The call's task panics at the caller's first DTMF digit (tests that a call dying of a
    /// bug still ends in the live table, the history and the metrics). Default false.
    pub panic_on_dtmf: bool,
}

/// `[server]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// AudioSocket listen address. Default `127.0.0.1:8090` (loopback: Asterisk runs on the
    /// same host). Use `[::1]:8090` for IPv6.
    pub audiosocket_listen: SocketAddr,
    /// A connection that sends no id frame within this many ms is closed. Default 2000
    /// (Asterisk sends the id frame right after connecting).
    pub id_timeout_ms: u64,
    /// Upper bound on simultaneous calls; further connections are refused with a log line.
    /// Also the number of KV sequences of the batched LLM scheduler. Default: the installed
    /// tier's measured capacity (`llm.max_calls` in its manifest, issue 10), else 8.
    pub max_calls: usize,
    /// Connections accepted but not yet calls (waiting for their id frame, or hearing the busy
    /// prompt because `max_calls` calls are live); further connections are closed at once with
    /// a log line. Default 16.
    pub max_pending: usize,
    /// A write to Asterisk that has not completed in this many ms (the peer stopped reading)
    /// ends the call. Default 3000.
    pub write_timeout_ms: u64,
    /// STT recognizers warmed at start-up, in the background at low priority, by decoding the
    /// rendered prompts, for the first calls after a start (a fresh Vosk recognizer on a
    /// lookahead model is several times slower on its first utterance: `crate::recognizer_pool`).
    /// At most `max_calls`. Default 2; 0 turns it off.
    pub warm_recognizers: usize,
    /// A Vosk recognizer kept between calls is replaced after serving this many calls: its
    /// lookahead composition caches grow with the speech it has decoded and never shrink
    /// (issue 7: heaptrack put the soak's memory growth there). The replacement is warmed in
    /// the background on the rendered prompts and takes over once ready. Read at start-up.
    /// Default 50: with jemalloc as the allocator (the binary's own, `main.rs`) it held RSS
    /// flat over a 30-minute soak (README). 0: never. With glibc's allocator replacing cost
    /// more RSS than it saved: the worn recognizer's memory was freed but stayed in malloc's
    /// arenas.
    pub recognizer_max_calls: u32,
    /// issue 10: whether `max_calls` was given in the file (else the tier's value applies).
    #[serde(skip)]
    pub max_calls_set: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            audiosocket_listen: "127.0.0.1:8090".parse().unwrap(),
            id_timeout_ms: 2000,
            max_calls: 8,
            max_pending: 16,
            write_timeout_ms: 3000,
            warm_recognizers: 2,
            recognizer_max_calls: 50,
            max_calls_set: false,
        }
    }
}

/// `[models]` section. Explicit paths win; otherwise the manifest written by `model-setup` in
/// `dir` says which files to use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// Folder `model-setup` installs into (holds `manifest.json`). Default
    /// `/var/lib/asterisk-voice-agent/models`.
    pub dir: PathBuf,
    /// Vosk model folder (holds `am/`, `conf/`, `graph/`). Default: from the manifest.
    pub stt: Option<PathBuf>,
    /// GGUF file for llama.cpp. Default: from the manifest.
    pub llm: Option<PathBuf>,
    /// Piper voice `.onnx` file; its `.onnx.json` must sit beside it. Default: from the manifest.
    pub tts: Option<PathBuf>,
    /// ONNX Runtime shared library (`libonnxruntime.so.1`). Default: `ORT_DYLIB_PATH`, then
    /// beside the binary, `/usr/lib/asterisk-voice-agent/`, `~/.cache/asterisk-voice-agent/lib/`.
    pub onnxruntime: Option<PathBuf>,
    /// Folder that contains `espeak-ng-data/`. Default: `PIPER_ESPEAKNG_DATA_DIRECTORY`, then
    /// `/usr/lib/x86_64-linux-gnu` (Debian's `espeak-ng-data` package).
    pub espeak_data: Option<PathBuf>,
    /// Silero VAD `.onnx` (used when `vad.engine = "silero"`). Default: from the manifest.
    pub vad: Option<PathBuf>,
    /// Smart Turn `.onnx` (used when `turn.mode = "smart"`). Default: from the manifest.
    pub turn: Option<PathBuf>,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            dir: PathBuf::from("/var/lib/asterisk-voice-agent/models"),
            stt: None,
            llm: None,
            tts: None,
            onnxruntime: None,
            espeak_data: None,
            vad: None,
            turn: None,
        }
    }
}

/// `[agent]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The LLM's system prompt.
    pub system_prompt: String,
    /// Spoken as soon as the call connects; synthesized once at start-up.
    pub greeting: String,
    /// Most tokens in one reply. Default 60 (a phone reply is one or two sentences).
    pub max_reply_tokens: u32,
    /// Caller/agent exchanges kept in the prompt; older ones are dropped. Default 8.
    pub history_turns: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            system_prompt: "You are a friendly phone receptionist for a small business. \
                Answer in one or two short sentences, in plain spoken English, with no lists or symbols."
                .into(),
            greeting: "Hello, thank you for calling. How can I help you today?".into(),
            max_reply_tokens: 60,
            history_turns: 8,
        }
    }
}

/// `[llm]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// llama.cpp threads per call. Default: the installed tier's value (manifest), else 2.
    pub threads: Option<i32>,
    /// llama.cpp threads evaluating prompts (the caller's new words), per context. Default:
    /// with per-call contexts and `threads` unset, the installed tier's (test and tiny tiers:
    /// 2, generating on 1); else `threads`. `threads = 2` alone restores the former 2 / 2.
    pub batch_threads: Option<i32>,
    /// Context size in tokens per call. Default: the installed tier's value, else 2048.
    pub context: Option<u32>,
    /// Sampling temperature; 0 = greedy. Default 0.6.
    pub temperature: f32,
    /// Sampler seed. Default 42.
    pub seed: u32,
    /// issue 10: where replies are generated: `"local"` (llama.cpp in this process, with the
    /// GGUF from `[models]`) or `"openai"` (an OpenAI-compatible chat-completions server at
    /// `base_url`: llama-server, vLLM, Ollama). Default "local".
    pub backend: LlmBackendKind,
    /// issue 10: with the local backend, `"batched"` runs one llama.cpp context for all calls
    /// (a KV sequence per call, `server.max_calls` of them, one decode advancing every call;
    /// `threads` defaults to the physical cores) or `"per_call"` one context and thread pool
    /// per call (`threads` each). Default "per_call" until benches/calls.rs has measured the
    /// batched scheduler on a quiet machine (at the merge, one batched console call got no
    /// token within 5 s; its own tests pass).
    pub scheduler: LlmScheduler,
    /// Element type of the local backend's KV cache (the keys and values of every token in a
    /// call's context): `"f16"` (llama.cpp's default) or `"q8_0"` (8-bit blocks; llama.cpp
    /// needs flash attention for a quantized V cache, which it enables by itself on the CPU).
    /// `"q8_0"` halves the cache: a 2048-token context of the test tier's SmolLM2-135M takes
    /// 34 MB of RSS instead of 55 MB, at the same prompt and token speed (README, "Many calls
    /// on one box"). Default "f16".
    pub kv_cache: KvCache,
    /// issue 10: the OpenAI-compatible server's API root, e.g. `http://10.0.0.5:8080/v1`
    /// (`/chat/completions` and `/models` are appended). Plain HTTP is allowed. Required with
    /// `backend = "openai"`. Default none.
    pub base_url: Option<String>,
    /// issue 10: the `model` field sent to the server (Ollama: `llama3.2:3b`; llama-server
    /// ignores it). Default "default".
    pub model: String,
    /// issue 10: a file whose content (trimmed) is sent as `Authorization: Bearer ...`.
    /// Default none (no header).
    pub api_key_file: Option<PathBuf>,
    /// issue 10: TCP connect timeout to the server, in ms (also bounds the start-up check).
    /// Default 2000.
    pub connect_timeout_ms: u64,
    /// issue 10: longest wait for the response headers or between two streamed chunks, in ms;
    /// then the attempt fails and `[call]` retries/fallback/apology take over. Default 5000.
    pub read_timeout_ms: u64,
}

/// issue 10: `[llm] backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmBackendKind {
    /// llama.cpp in this process.
    #[default]
    Local,
    /// An OpenAI-compatible chat-completions server (`base_url`).
    Openai,
}

/// `[llm] kv_cache`: the KV cache's element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum KvCache {
    /// 16-bit floats, llama.cpp's default.
    #[default]
    #[serde(rename = "f16")]
    F16,
    /// llama.cpp's Q8_0: blocks of 32 8-bit values with one f16 scale (8.5 bits per value).
    #[serde(rename = "q8_0")]
    Q8_0,
}

/// issue 10: `[llm] scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmScheduler {
    /// One context for all calls, continuous batching.
    #[default]
    Batched,
    /// One context per call.
    PerCall,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            threads: None,
            batch_threads: None,
            context: None,
            temperature: 0.6,
            seed: 42,
            backend: LlmBackendKind::Local,
            scheduler: LlmScheduler::PerCall,
            kv_cache: KvCache::F16,
            base_url: None,
            model: "default".into(),
            api_key_file: None,
            connect_timeout_ms: 2000,
            read_timeout_ms: 5000,
        }
    }
}

/// `[tts]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TtsConfig {
    /// Speaking rate: Piper's length scale (1.0 = the voice's own pace, < 1 faster).
    /// Default: the voice's own value.
    pub length_scale: Option<f32>,
    /// Output gain applied to the synthesized audio. Default 1.0.
    pub gain: f32,
    /// ONNX Runtime's CPU memory arena (and memory patterns) for the voice. Default false:
    /// with it, each sentence length's buffers stayed in the arena and the process grew
    /// (400 varied sentences: RSS 228 -> 524 MiB; without: 185-256 MiB, back to ~190 between
    /// sentences) for ~8 % faster synthesis (real-time factor 0.135 vs 0.146 on 2 cores).
    pub memory_arena: bool,
    /// issue 10: synthesis workers, each a thread with its own copy of the voice (ONNX Runtime
    /// runs one synthesis at a time per session; the 63 MB medium voices take about 80 MB of
    /// RSS each), so as many sentences of different calls are synthesized at once. espeak-ng's
    /// phonemization (a fraction of a millisecond per sentence) stays one at a time.
    /// Default: the physical cores, at most 4.
    pub workers: Option<usize>,
    /// issue 10: which waiting sentence a free worker takes: `"deadline"` (the one whose call
    /// runs out of audio first; a reply's first sentence is due at once) or `"fifo"` (arrival
    /// order, as before). Default "deadline". src/synth_order.rs.
    pub order: TtsOrder,
    /// issue 10: the synthesis workers' nice value (0..19, higher yields the CPU). Default 10,
    /// as the LLM and STT threads; 5 puts synthesis above them (below the threads that pace
    /// audio, 0), which showed no gain beyond the run-to-run spread at 4 calls on 2 cores
    /// (README, "Many calls on one box").
    pub nice: i32,
}

/// issue 10: `[tts] order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TtsOrder {
    /// Earliest deadline first.
    #[default]
    Deadline,
    /// Arrival order.
    Fifo,
}

impl Default for TtsConfig {
    fn default() -> Self {
        TtsConfig {
            length_scale: None,
            gain: 1.0,
            memory_arena: false,
            workers: None,
            order: TtsOrder::Deadline,
            nice: 10,
        }
    }
}

/// `[vad]` section: voice activity detection on the caller's audio with the earshot neural
/// detector (16 ms frames at 16 kHz; 8 kHz audio is upsampled) plus an energy floor. It finds
/// utterance onsets (also the barge-in trigger) and ends (endpointing). docs/vad.md has the
/// measurements behind the defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VadConfig {
    /// A 16 ms frame whose earshot score (0..1) is at least this counts as voice. Default 0.4.
    pub speech_threshold: f32,
    /// Frames quieter than this (RMS, dBFS) never count as speech, whatever their score
    /// (earshot normalizes the level away, so it scores near-digital silence as voice). Default -70.
    pub energy_floor_dbfs: f32,
    /// A voice frame whose periodicity (peak normalized autocorrelation at pitch lags, 0..1) is
    /// at least this is a vowel. An utterance starts only with a vowel in its first
    /// `min_speech_ms`, and unvoiced sounds count as speech only within 300 ms of one: noise
    /// bursts and coughs are not speech. Default 0.5.
    pub voicing_threshold: f32,
    /// Voice must last this long (ms; one 16 ms dropout tolerated) before an utterance starts
    /// (and before it barges in). Counted in whole 16 ms frames: the default 60 takes four
    /// (64 ms). Default 60.
    pub min_speech_ms: u32,
    /// Endpointing: the utterance ends after this much non-speech (ms); it adds directly to
    /// voice-to-voice latency. Default 800 (above the p90 of pauses inside spoken sentences:
    /// docs/vad.md).
    pub end_silence_ms: u32,
    /// An utterance with less periodic (vowel) time than this (ms, in total) ends as too short
    /// (a cough, a click, a burst of noise) and its audio should be dropped. Default 100.
    pub min_utterance_ms: u32,
    /// Audio kept from before speech onset and fed to STT (ms). Default 300.
    pub pre_roll_ms: u32,
    /// An utterance is cut and recognized after this long (ms). Default 15000.
    pub max_utterance_ms: u32,
    /// What scores each frame as voice: `"earshot"` (the pure-Rust network) or `"silero"`
    /// (Silero VAD through ONNX Runtime, native at 8 and 16 kHz; needs the `vad` model). The
    /// energy floor, periodicity gate and timers apply to both. Default "earshot"
    /// (docs/turns.md has the comparison).
    pub engine: VadEngine,
    /// With `engine = "silero"`: a frame whose Silero speech probability (0..1) is at least
    /// this counts as voice. Default 0.5.
    pub silero_threshold: f32,
}

/// Which network scores the VAD's frames (`vad.engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VadEngine {
    /// earshot (pure Rust, 16 kHz).
    Earshot,
    /// Silero VAD (ONNX, 8 and 16 kHz).
    Silero,
}

impl Default for VadConfig {
    fn default() -> Self {
        VadConfig {
            speech_threshold: 0.4,
            energy_floor_dbfs: -70.0,
            voicing_threshold: 0.5,
            min_speech_ms: 60,
            end_silence_ms: 800,
            min_utterance_ms: 100,
            pre_roll_ms: 300,
            max_utterance_ms: 15000,
            engine: VadEngine::Earshot,
            silero_threshold: 0.5,
        }
    }
}

/// `[log]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Conversation log, one JSON object per line per utterance. Default
    /// `/var/log/asterisk-voice-agent/conversations.jsonl`.
    pub conversation_log: PathBuf,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            conversation_log: PathBuf::from("/var/log/asterisk-voice-agent/conversations.jsonl"),
        }
    }
}

impl Config {
    /// Reads and validates a TOML file. Errors name the file and, for an unknown key, the key.
    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut cfg = Config::parse(&text).with_context(|| format!("invalid config file {}", path.display()))?;
        use sha2::Digest;
        cfg.source = Some(ConfigSource {
            path: path.to_path_buf(),
            sha256: format!("{:x}", sha2::Sha256::digest(text.as_bytes())),
            loaded_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        Ok(cfg)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config> {
        let mut cfg: Config = toml::from_str(text)?;
        // issue 10: an explicit server.max_calls wins over the tier's default.
        cfg.server.max_calls_set = toml::from_str::<toml::Table>(text)?
            .get("server")
            .and_then(|s| s.get("max_calls"))
            .is_some();
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.llm.threads.is_none_or(|t| t >= 1),
            "llm.threads must be at least 1"
        );
        anyhow::ensure!(
            self.llm.batch_threads.is_none_or(|t| t >= 1),
            "llm.batch_threads must be at least 1"
        );
        anyhow::ensure!(
            self.llm.context.is_none_or(|c| c >= 256),
            "llm.context must be at least 256 tokens"
        );
        anyhow::ensure!(
            self.vad.end_silence_ms >= 100,
            "vad.end_silence_ms must be at least 100"
        );
        anyhow::ensure!(self.server.max_calls >= 1, "server.max_calls must be at least 1");
        anyhow::ensure!(self.server.max_pending >= 1, "server.max_pending must be at least 1");
        anyhow::ensure!(self.agi.max_sessions >= 1, "agi.max_sessions must be at least 1");
        anyhow::ensure!(
            self.server.write_timeout_ms >= 100,
            "server.write_timeout_ms must be at least 100"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.turn.threshold),
            "turn.threshold must be between 0 and 1"
        );
        anyhow::ensure!(
            self.turn.max_end_silence_ms >= 100 && self.turn.min_pause_ms >= 20,
            "turn.max_end_silence_ms must be at least 100 and turn.min_pause_ms at least 20"
        );
        anyhow::ensure!(
            self.llm.backend != LlmBackendKind::Openai || self.llm.base_url.is_some(),
            "llm.base_url is required with llm.backend = \"openai\""
        );
        anyhow::ensure!(
            !self.agent.greeting.trim().is_empty(),
            "agent.greeting must not be empty"
        );
        anyhow::ensure!(
            self.http.listen.ip().is_loopback() || self.http.token.as_deref().is_some_and(|t| !t.trim().is_empty()),
            "http.token must be set: [http] listen {} is not a loopback address",
            self.http.listen
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.audiosocket_listen.to_string(), "127.0.0.1:8090");
        let c = Config::parse("[vad]\nend_silence_ms = 700\n").unwrap();
        assert_eq!(c.vad.end_silence_ms, 700);
        assert_eq!(c.vad.min_speech_ms, 60);
    }

    #[test]
    fn shipped_example_config_is_valid_and_complete() {
        let c = Config::parse(include_str!("../systemd/config.toml")).unwrap();
        let d = Config::default();
        assert_eq!(c.vad.end_silence_ms, d.vad.end_silence_ms);
        assert_eq!(c.call.filler_after_ms, d.call.filler_after_ms);
        assert_eq!(c.barge_in.confirm_ms, d.barge_in.confirm_ms);
    }

    #[test]
    fn kv_cache_type_is_parsed_and_checked() {
        assert_eq!(Config::parse("").unwrap().llm.kv_cache, KvCache::F16);
        let c = Config::parse("[llm]\nkv_cache = \"q8_0\"\n").unwrap();
        assert_eq!(c.llm.kv_cache, KvCache::Q8_0);
        let e = format!("{:#}", Config::parse("[llm]\nkv_cache = \"q4\"\n").unwrap_err());
        assert!(e.contains("q4") && e.contains("q8_0"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = format!("{:#}", Config::parse("[vad]\nend_silense_ms = 700\n").unwrap_err());
        assert!(e.contains("end_silense_ms"), "{e}");
        let e = format!("{:#}", Config::parse("[nope]\n").unwrap_err());
        assert!(e.contains("nope"), "{e}");
    }
}
