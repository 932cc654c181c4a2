//! The conversation log: one JSON object per line per utterance, written by one thread for all
//! calls and flushed line by line so nothing a caller said is lost if the service stops.
//!
//! Never a torn line: each line goes out in one `write_all`; if that fails part-way (disk
//! full), the file is cut back to its length before the line (`set_len`), so the file holds
//! only whole lines and the next entry starts on a fresh line once space is back. If even the
//! cut fails, the next write starts with a newline so the torn bytes stay on a line of their own.

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
    /// Prompt tokens the LLM evaluated for this reply: the caller's words and the chat
    /// template around them that were not already in its KV cache (fewer when the prefill
    /// evaluated them while the caller spoke, issue 8). None when the LLM failed midway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_evaluated_tokens: Option<usize>,
    /// Silence inside the reply, ms (issue 10): the time the agent's audio ran out between two
    /// of its sentences while the rest was still being generated or synthesized, summed over
    /// the reply. 0 when each sentence was ready before the one before it had played.
    #[serde(skip_serializing_if = "is_zero")]
    pub reply_stall_ms: u64,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
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
        ConversationLog::open_with_fault(path, 0)
    }

    /// [`ConversationLog::open`] with an injected fault for the tests (`[test_faults]
    /// log_fail_at`): the `fail_at`-th entry (1-based; 0 = never) is written only half, then
    /// fails like a full disk would.
    pub fn open_with_fault(path: &Path, fail_at: u64) -> Result<ConversationLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open conversation log {}", path.display()))?;
        let (tx, rx) = mpsc::channel::<Entry>();
        let live = crate::engines::WorkerThread::enter();
        std::thread::Builder::new()
            .name("conversation-log".into())
            .spawn(move || {
                let _live = live;
                let mut torn = false;
                for (n, entry) in (1u64..).zip(rx) {
                    let mut line = serde_json::to_string(&entry).expect("entries serialize");
                    line.push('\n');
                    let inject = n == fail_at;
                    if let Err(e) = write_line(&mut file, line.as_bytes(), &mut torn, inject) {
                        tracing::error!(
                            call_id = %crate::logsafe::clean(&entry.call_id, 64),
                            "conversation log write failed ({e}): entry lost"
                        );
                        tracing::debug!(entry = %crate::logsafe::clean(&line, 4096), "the lost entry");
                    }
                }
            })?;
        Ok(ConversationLog { tx })
    }

    /// Queues an entry for writing (never blocks). The writer thread ends once every handle is
    /// dropped and the queue is written.
    pub fn write(&self, entry: Entry) {
        let _ = self.tx.send(entry);
    }
}

/// Appends one whole line, or nothing: on failure the file is cut back to its length before the
/// line; if that fails too, `torn` makes the next line start with a newline.
fn write_line(file: &mut std::fs::File, line: &[u8], torn: &mut bool, inject: bool) -> std::io::Result<()> {
    let before = file.metadata()?.len();
    let result = (|| {
        if *torn {
            file.write_all(b"\n")?;
        }
        if inject {
            file.write_all(&line[..line.len() / 2])?;
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "injected fault: no space left on device",
            ));
        }
        file.write_all(line)?;
        file.flush()
    })();
    match &result {
        Ok(()) => *torn = false,
        Err(_) => *torn = file.set_len(before).is_err(),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_only_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut torn = false;
        write_line(&mut file, b"{\"a\":1}\n", &mut torn, false).unwrap();
        assert!(write_line(&mut file, b"{\"b\":2}\n", &mut torn, true).is_err());
        assert!(!torn, "the torn half was cut off");
        write_line(&mut file, b"{\"c\":3}\n", &mut torn, false).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"a\":1}\n{\"c\":3}\n");
    }
}
