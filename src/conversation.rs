//! The conversation log: one JSON object per line per utterance, written by one thread for all
//! calls and flushed line by line so nothing a caller said is lost if the service stops.

use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;

/// Who spoke.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    /// The caller (from STT).
    Caller,
    /// The agent (what it said, or as much as was played before a barge-in).
    Agent,
}

/// Stage timings of one agent turn, in ms.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TurnTimings {
    /// From the endpoint (end of caller speech + `end_silence_ms`) to Vosk's final text.
    pub stt_final_ms: u64,
    /// From the final text to the LLM's first token.
    pub llm_first_token_ms: Option<u64>,
    /// From the final text to the first synthesized reply audio being queued for playout.
    pub tts_first_audio_ms: Option<u64>,
    /// From the caller's last voiced frame to the end of the turn being decided (the silence
    /// the turn model or the silence timer waited), ms (issue 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn_decided_ms: Option<u64>,
    /// The reply was prepared during the pause (speculative) and committed: its LLM and TTS
    /// figures count from its commit, 0 when it was already ready (issue 8).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub speculative: bool,
}

/// One line of the log.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// RFC 3339 time the utterance was complete.
    pub ts: String,
    /// The call's AudioSocket UUID.
    pub call_id: String,
    /// Who spoke.
    pub speaker: Speaker,
    /// What was said.
    pub text: String,
    /// Agent turns: stage timings.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub timings: Option<TurnTimings>,
    /// Agent turns cut short by the caller (barge-in): `text` is what was played.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// Fixed prompts: which one (`filler`, `not_understood`, `apology`, `goodbye`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<&'static str>,
}

impl Entry {
    /// An entry stamped now.
    pub fn now(call_id: &str, speaker: Speaker, text: String) -> Entry {
        Entry {
            ts: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            call_id: call_id.to_string(),
            speaker,
            text,
            timings: None,
            interrupted: false,
            prompt: None,
        }
    }
}

/// Handle to the log writer thread; cheap to clone.
#[derive(Clone)]
pub struct ConversationLog {
    tx: mpsc::Sender<Entry>,
}

impl ConversationLog {
    /// Opens (appends to) the log file, creating its folder, and starts the writer thread.
    pub fn open(path: &Path) -> Result<ConversationLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open conversation log {}", path.display()))?;
        let (tx, rx) = mpsc::channel::<Entry>();
        std::thread::Builder::new()
            .name("conversation-log".into())
            .spawn(move || {
                for entry in rx {
                    let mut line = serde_json::to_string(&entry).expect("entries serialize");
                    line.push('\n');
                    if let Err(e) = file.write_all(line.as_bytes()).and_then(|_| file.flush()) {
                        tracing::error!("conversation log write failed: {e}; entry was {line}");
                    }
                }
            })?;
        Ok(ConversationLog { tx })
    }

    /// Queues an entry for writing (never blocks).
    pub fn write(&self, entry: Entry) {
        let _ = self.tx.send(entry);
    }
}
