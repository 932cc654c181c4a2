//! The call history in SQLite: one row per call (who called, when, how it ended, what the
//! agent decided) and one per utterance (speaker, text, stage timings, interrupted). Calls
//! never wait on it: a task copies call events from the [`EventBus`] into a bounded queue
//! and one writer thread applies them; a full queue, a full disk or a locked database logs an
//! error, counts `ava_history_dropped_total` and the call goes on. The JSONL conversation log
//! stays the primary record. Readers (the admin page) open their own connections (WAL mode:
//! they never block the writer).

use crate::conversation::Speaker;
use crate::directory::{CallDirectory, Decision};
use crate::events::{CallEvent, CallEventKind, EventBus};
use anyhow::{Context, Result};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tracing::{error, info, warn};

/// Writes queued for the writer thread before new ones are dropped.
pub const QUEUE_CAPACITY: usize = 4096;

/// How long a write waits for a lock held by another connection before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_millis(250);

/// Rows a history search returns at most.
pub const SEARCH_LIMIT: u32 = 200;

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL,
    caller_id TEXT,
    caller_name TEXT,
    dnid TEXT,
    channel TEXT,
    started TEXT NOT NULL,
    ended TEXT,
    end_reason TEXT,
    end_detail TEXT,
    decision TEXT,
    transfer_target TEXT
);
CREATE INDEX IF NOT EXISTS calls_started ON calls(started);
CREATE INDEX IF NOT EXISTS calls_caller ON calls(caller_id);
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY,
    call INTEGER NOT NULL REFERENCES calls(id) ON DELETE CASCADE,
    ts TEXT NOT NULL,
    speaker TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt TEXT,
    stt_final_ms INTEGER,
    llm_first_token_ms INTEGER,
    tts_first_audio_ms INTEGER,
    interrupted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS turns_call ON turns(call);
";

/// What the writer thread applies.
enum Op {
    Event(Arc<CallEvent>, Option<Decision>),
    Prune,
    /// Acknowledge once everything queued before is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The running history: lets shutdown wait until the last events are written.
#[derive(Debug)]
pub struct History {
    flush: tokio::sync::mpsc::Sender<std::sync::mpsc::Sender<()>>,
}

impl History {
    /// Waits (at most `timeout`) until every call event published so far is written.
    pub async fn flush(&self, timeout: Duration) {
        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        if self.flush.send(ack_tx).await.is_err() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || ack_rx.recv_timeout(timeout)).await;
    }
}

/// Opens the database at `path` (creating it and its folder), prunes calls older than
/// `keep_days` (0 = keep forever), and starts the writer thread and the task that feeds it
/// from `events`. Must run inside the tokio runtime. The returned handle flushes at shutdown.
///
/// # Errors
/// If the folder cannot be created or the file cannot be opened as SQLite (the message names
/// the path and `[history] path`).
pub fn start(path: &Path, keep_days: u32, events: &EventBus, directory: Arc<CallDirectory>) -> Result<History> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {} ([history] path)", dir.display()))?;
    }
    let conn = Connection::open(path)
        .with_context(|| format!("cannot open call history {} ([history] path)", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch(SCHEMA)
        .with_context(|| format!("cannot set up call history {} ([history] path)", path.display()))?;
    conn.execute_batch("PRAGMA foreign_keys = ON;")?;
    let (tx, rx) = sync_channel::<Op>(QUEUE_CAPACITY);
    let mut writer = Writer {
        conn,
        keep_days,
        rows: HashMap::new(),
    };
    writer.prune();
    std::thread::Builder::new()
        .name("call-history".into())
        .spawn(move || writer.run(rx))?;
    let mut sub = events.subscribe();
    let prune_tx = tx.clone();
    let (flush_tx, mut flush_rx) = tokio::sync::mpsc::channel::<std::sync::mpsc::Sender<()>>(4);
    tokio::spawn(async move {
        loop {
            // Events first: a flush request is passed on only once no event is waiting.
            let got = tokio::select! {
                biased;
                got = sub.recv() => got,
                Some(ack) = flush_rx.recv() => {
                    send(&tx, Op::Flush(ack));
                    continue;
                }
            };
            let ev = match got {
                Ok(ev) => ev,
                Err(RecvError::Lagged(n)) => {
                    error!(
                        skipped = n,
                        "call history fell behind the call events; rows are missing"
                    );
                    crate::metrics::METRICS.history_dropped.inc_by(n);
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            let decision = match &ev.kind {
                CallEventKind::Ended { .. } => uuid::Uuid::parse_str(&ev.call_id)
                    .ok()
                    .and_then(|u| directory.peek_decision(u)),
                _ => None,
            };
            send(&tx, Op::Event(ev, decision));
        }
    });
    if keep_days > 0 {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            every.tick().await;
            loop {
                every.tick().await;
                send(&prune_tx, Op::Prune);
            }
        });
    }
    info!(path = %path.display(), keep_days, "call history open");
    Ok(History { flush: flush_tx })
}

fn send(tx: &SyncSender<Op>, op: Op) {
    match tx.try_send(op) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            crate::metrics::METRICS.history_dropped.inc();
            error!("call history queue full (the database is slow or locked): dropping a write");
        }
        Err(TrySendError::Disconnected(_)) => {
            crate::metrics::METRICS.history_dropped.inc();
        }
    }
}

struct Writer {
    conn: Connection,
    keep_days: u32,
    /// Row id of each live call, by call UUID.
    rows: HashMap<String, i64>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Op>) {
        for op in rx {
            let r = match op {
                Op::Event(ev, decision) => self.apply(&ev, decision),
                Op::Prune => {
                    self.prune();
                    Ok(())
                }
                Op::Flush(ack) => {
                    let _ = ack.send(());
                    Ok(())
                }
            };
            if let Err(e) = r {
                crate::metrics::METRICS.history_dropped.inc();
                error!("call history write failed (the call goes on): {e}");
            }
        }
    }

    fn prune(&mut self) {
        if self.keep_days == 0 {
            return;
        }
        let cutoff = (chrono::Utc::now() - chrono::Duration::days(self.keep_days as i64))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        match self
            .conn
            .execute("DELETE FROM calls WHERE started < ?1", params![cutoff])
        {
            Ok(n) if n > 0 => info!(calls = n, keep_days = self.keep_days, "call history pruned"),
            Ok(_) => {}
            Err(e) => warn!("call history prune failed: {e}"),
        }
    }

    fn apply(&mut self, ev: &CallEvent, decision: Option<Decision>) -> rusqlite::Result<()> {
        match &ev.kind {
            CallEventKind::Started { caller } => {
                self.conn.execute(
                    "INSERT INTO calls (call_id, caller_id, caller_name, dnid, channel, started) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![ev.call_id, caller.caller_id, caller.caller_name, caller.dnid, caller.channel, ev.ts],
                )?;
                self.rows.insert(ev.call_id.clone(), self.conn.last_insert_rowid());
            }
            CallEventKind::Utterance { entry } => {
                let Some(&row) = self.rows.get(&ev.call_id) else {
                    return Ok(());
                };
                let t = entry.timings.as_ref();
                self.conn.execute(
                    "INSERT INTO turns (call, ts, speaker, text, prompt, stt_final_ms, llm_first_token_ms, tts_first_audio_ms, interrupted) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        row,
                        entry.ts,
                        match entry.speaker {
                            Speaker::Caller => "caller",
                            Speaker::Agent => "agent",
                        },
                        entry.text,
                        entry.prompt,
                        t.map(|t| t.stt_final_ms as i64),
                        t.and_then(|t| t.llm_first_token_ms.map(|v| v as i64)),
                        t.and_then(|t| t.tts_first_audio_ms.map(|v| v as i64)),
                        entry.interrupted,
                    ],
                )?;
            }
            CallEventKind::Ended { reason, detail } => {
                let Some(row) = self.rows.remove(&ev.call_id) else {
                    return Ok(());
                };
                let (decision, target) = match decision {
                    Some(Decision::Hangup) => (Some("hangup"), None),
                    Some(Decision::Busy) => (Some("busy"), None),
                    Some(Decision::Transfer { name, destination }) => {
                        (Some("transfer"), Some(format!("{name} ({destination})")))
                    }
                    None => (None, None),
                };
                self.conn.execute(
                    "UPDATE calls SET ended = ?1, end_reason = ?2, end_detail = ?3, decision = ?4, transfer_target = ?5 WHERE id = ?6",
                    params![ev.ts, reason, detail, decision, target, row],
                )?;
            }
            CallEventKind::State { .. } | CallEventKind::AgentSentence { .. } => {}
        }
        Ok(())
    }
}

/// A call as the history page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct CallRow {
    /// Row id (the page links to `/api/calls/{id}`).
    pub id: i64,
    /// AudioSocket UUID.
    pub call_id: String,
    /// Caller ID number.
    pub caller_id: Option<String>,
    /// Caller ID name.
    pub caller_name: Option<String>,
    /// Dialled number.
    pub dnid: Option<String>,
    /// Asterisk channel name.
    pub channel: Option<String>,
    /// RFC 3339 UTC start.
    pub started: String,
    /// RFC 3339 UTC end; `None` while live (or if the service stopped mid-call).
    pub ended: Option<String>,
    /// `caller_hangup`, `agent_hangup`, `error`, `shutdown`.
    pub end_reason: Option<String>,
    /// Why the agent hung up, or which error.
    pub end_detail: Option<String>,
    /// `hangup` or `transfer` (what the dialplan's call-end step got); none = continue.
    pub decision: Option<String>,
    /// `name (dial string)` of a transfer.
    pub transfer_target: Option<String>,
    /// Utterances recorded.
    pub turns: i64,
}

/// One utterance of a call.
#[derive(Debug, Clone, Serialize)]
pub struct TurnRow {
    /// RFC 3339 UTC time the utterance was complete.
    pub ts: String,
    /// `caller` or `agent`.
    pub speaker: String,
    /// What was said (for an interrupted agent turn, what was played).
    pub text: String,
    /// Fixed prompt name (`filler`, `not_understood`, ...), if one.
    pub prompt: Option<String>,
    /// Endpoint -> STT final text, ms.
    pub stt_final_ms: Option<i64>,
    /// Final text -> first LLM token, ms.
    pub llm_first_token_ms: Option<i64>,
    /// Final text -> first reply audio queued, ms.
    pub tts_first_audio_ms: Option<i64>,
    /// Cut short by a barge-in.
    pub interrupted: bool,
}

/// Read access for the page; each call opens its own read-only connection (blocking: call
/// it from `spawn_blocking`).
#[derive(Debug, Clone)]
pub struct Reader {
    path: PathBuf,
}

/// A history search: caller ID substring and/or a UTC date (`YYYY-MM-DD`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Search {
    /// Part of the caller ID number or name.
    pub caller: Option<String>,
    /// A UTC day, `YYYY-MM-DD`.
    pub date: Option<String>,
}

impl Reader {
    /// A reader of the database at `path`.
    pub fn new(path: &Path) -> Reader {
        Reader {
            path: path.to_path_buf(),
        }
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let c = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        c.busy_timeout(BUSY_TIMEOUT)?;
        Ok(c)
    }

    /// The newest calls (at most [`SEARCH_LIMIT`]) matching `q`, newest first.
    pub fn search(&self, q: &Search) -> rusqlite::Result<Vec<CallRow>> {
        let c = self.open()?;
        let caller = q
            .caller
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| format!("%{s}%"));
        let date = q
            .date
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| format!("{s}%"));
        let mut st = c.prepare(
            "SELECT c.id, c.call_id, c.caller_id, c.caller_name, c.dnid, c.channel, c.started, c.ended, \
                    c.end_reason, c.end_detail, c.decision, c.transfer_target, \
                    (SELECT COUNT(*) FROM turns t WHERE t.call = c.id) \
             FROM calls c \
             WHERE (?1 IS NULL OR c.caller_id LIKE ?1 OR c.caller_name LIKE ?1) AND (?2 IS NULL OR c.started LIKE ?2) \
             ORDER BY c.id DESC LIMIT ?3",
        )?;
        let rows = st.query_map(params![caller, date, SEARCH_LIMIT], call_row)?;
        rows.collect()
    }

    /// One call and its utterances, oldest first; `None` if there is no such row.
    pub fn call(&self, id: i64) -> rusqlite::Result<Option<(CallRow, Vec<TurnRow>)>> {
        let c = self.open()?;
        let call = c
            .query_row(
                "SELECT c.id, c.call_id, c.caller_id, c.caller_name, c.dnid, c.channel, c.started, c.ended, \
                        c.end_reason, c.end_detail, c.decision, c.transfer_target, \
                        (SELECT COUNT(*) FROM turns t WHERE t.call = c.id) \
                 FROM calls c WHERE c.id = ?1",
                params![id],
                call_row,
            )
            .optional()?;
        let Some(call) = call else { return Ok(None) };
        let mut st = c.prepare(
            "SELECT ts, speaker, text, prompt, stt_final_ms, llm_first_token_ms, tts_first_audio_ms, interrupted \
             FROM turns WHERE call = ?1 ORDER BY id",
        )?;
        let turns = st
            .query_map(params![id], |r| {
                Ok(TurnRow {
                    ts: r.get(0)?,
                    speaker: r.get(1)?,
                    text: r.get(2)?,
                    prompt: r.get(3)?,
                    stt_final_ms: r.get(4)?,
                    llm_first_token_ms: r.get(5)?,
                    tts_first_audio_ms: r.get(6)?,
                    interrupted: r.get(7)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Some((call, turns)))
    }
}

fn call_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CallRow> {
    Ok(CallRow {
        id: r.get(0)?,
        call_id: r.get(1)?,
        caller_id: r.get(2)?,
        caller_name: r.get(3)?,
        dnid: r.get(4)?,
        channel: r.get(5)?,
        started: r.get(6)?,
        ended: r.get(7)?,
        end_reason: r.get(8)?,
        end_detail: r.get(9)?,
        decision: r.get(10)?,
        transfer_target: r.get(11)?,
        turns: r.get(12)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::{Entry, TurnTimings};
    use crate::events::CallerInfo;

    fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
        for _ in 0..200 {
            if let Some(v) = f() {
                return v;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_and_its_turns_are_stored_and_searchable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h/history.sqlite3");
        let bus = EventBus::new();
        let directory = Arc::new(CallDirectory::new(Duration::from_secs(60)));
        let history = start(&path, 30, &bus, directory.clone()).unwrap();
        let uuid = uuid::Uuid::new_v4();
        let id = uuid.to_string();
        bus.emit(
            &id,
            CallEventKind::Started {
                caller: CallerInfo {
                    caller_id: Some("5551234".into()),
                    caller_name: Some("Ann".into()),
                    ..Default::default()
                },
            },
        );
        bus.emit(
            &id,
            CallEventKind::Utterance {
                entry: Entry::now(&id, Speaker::Caller, "hello".into()),
            },
        );
        let mut reply = Entry::now(&id, Speaker::Agent, "Hi there.".into());
        reply.timings = Some(TurnTimings {
            stt_final_ms: 120,
            llm_first_token_ms: Some(300),
            tts_first_audio_ms: Some(450),
            ..Default::default()
        });
        bus.emit(&id, CallEventKind::Utterance { entry: reply });
        directory.set_decision(
            uuid,
            Decision::Transfer {
                name: "operator".into(),
                destination: "PJSIP/100".into(),
            },
        );
        bus.emit(
            &id,
            CallEventKind::Ended {
                reason: "agent_hangup",
                detail: "transfer to operator".into(),
            },
        );
        history.flush(Duration::from_secs(5)).await;
        let reader = Reader::new(&path);
        let calls = wait_for(|| {
            let c = reader
                .search(&Search {
                    caller: Some("555".into()),
                    date: None,
                })
                .ok()?;
            let done = c.first().is_some_and(|c| c.ended.is_some());
            done.then_some(c)
        });
        assert_eq!(calls.len(), 1);
        let c = &calls[0];
        assert_eq!(c.call_id, id);
        assert_eq!(c.end_reason.as_deref(), Some("agent_hangup"));
        assert_eq!(c.decision.as_deref(), Some("transfer"));
        assert_eq!(c.transfer_target.as_deref(), Some("operator (PJSIP/100)"));
        assert_eq!(c.turns, 2);
        let (_, turns) = reader.call(c.id).unwrap().unwrap();
        assert_eq!(turns[0].speaker, "caller");
        assert_eq!(turns[1].llm_first_token_ms, Some(300));
        let today = &c.started[..10];
        assert_eq!(
            reader
                .search(&Search {
                    caller: None,
                    date: Some(today.into())
                })
                .unwrap()
                .len(),
            1
        );
        assert!(reader
            .search(&Search {
                caller: Some("999".into()),
                date: None
            })
            .unwrap()
            .is_empty());
        assert!(reader
            .search(&Search {
                caller: None,
                date: Some("1999-01-01".into())
            })
            .unwrap()
            .is_empty());
        // The decision was only peeked: the dialplan's call-end step still gets it.
        assert!(directory.take_decision(uuid).is_some());
    }

    #[test]
    fn retention_drops_old_calls_and_their_turns() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("h.sqlite3")).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch("PRAGMA foreign_keys = ON;").unwrap();
        conn.execute(
            "INSERT INTO calls (call_id, started) VALUES ('old', '2001-01-01T00:00:00.000Z')",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO turns (call, ts, speaker, text) VALUES (1, 'x', 'caller', 'hi')",
            [],
        )
        .unwrap();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        conn.execute("INSERT INTO calls (call_id, started) VALUES ('new', ?1)", params![now])
            .unwrap();
        let mut w = Writer {
            conn,
            keep_days: 30,
            rows: HashMap::new(),
        };
        w.prune();
        let n: i64 = w
            .conn
            .query_row("SELECT COUNT(*) FROM calls", [], |r| r.get(0))
            .unwrap();
        let t: i64 = w
            .conn
            .query_row("SELECT COUNT(*) FROM turns", [], |r| r.get(0))
            .unwrap();
        assert_eq!((n, t), (1, 0));
    }

    #[test]
    fn a_read_only_or_missing_database_is_a_clear_error() {
        let e = start(
            Path::new("/proc/nope/history.sqlite3"),
            0,
            &EventBus::new(),
            Arc::new(CallDirectory::new(Duration::from_secs(1))),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("[history] path"), "{e:#}");
    }
}
