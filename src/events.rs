//! Live call events: what each call is doing as it happens (started, listening / thinking /
//! speaking, each utterance, ended), for whoever watches — the admin's live page and metrics,
//! the console's screen. A call publishes and never waits: events go out on a bounded
//! broadcast channel (a viewer that falls behind skips events and is told how many), and a
//! small table of live calls lets a viewer that joins late see every call's current state.
//!
//! Events are rare (a few per utterance, never per audio frame), so publishing costs one
//! short lock and one channel send.

use crate::conversation::Entry;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// What the agent is doing on a call, as a PBX admin would describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallState {
    /// Nothing to say: waiting for (or hearing) the caller.
    Listening,
    /// The caller's turn is over and the reply is being prepared (no agent audio yet).
    Thinking,
    /// Agent audio is playing (a reply, the greeting or a fixed prompt).
    Speaking,
    /// The call is ending: the last prompt plays, then the agent hangs up.
    Ending,
}

/// Who the caller is, from the FastAGI `call-start` step (all `None` without it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CallerInfo {
    /// Caller ID number.
    pub caller_id: Option<String>,
    /// Caller ID name.
    pub caller_name: Option<String>,
    /// The dialled number.
    pub dnid: Option<String>,
    /// The Asterisk channel name, e.g. `PJSIP/100-00000001`.
    pub channel: Option<String>,
}

/// One thing that happened on a call.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum CallEventKind {
    /// The call's id frame arrived and the call started.
    Started {
        /// Who is calling, if the dialplan's `call-start` step told us.
        #[serde(flatten)]
        caller: CallerInfo,
    },
    /// The agent's state changed.
    State {
        /// The new state.
        state: CallState,
    },
    /// An utterance is complete: the caller's final transcript, an agent reply (as much as
    /// was played), or a fixed prompt. The same entry the conversation log gets.
    Utterance {
        /// The log entry (speaker, text, timings, interrupted, prompt).
        entry: Entry,
    },
    /// The agent started playing this sentence of a reply (the live transcript of the agent
    /// side, before the whole reply is logged as an [`CallEventKind::Utterance`]).
    AgentSentence {
        /// The sentence's text.
        text: String,
    },
    /// The call ended.
    Ended {
        /// `caller_hangup`, `agent_hangup`, `error` or `shutdown`: see `CallEnd::label`.
        reason: &'static str,
        /// The human-readable detail (why the agent hung up, which error).
        detail: String,
    },
}

/// An event with the call it belongs to and when it happened.
#[derive(Debug, Clone, Serialize)]
pub struct CallEvent {
    /// The call's AudioSocket UUID (as written in the conversation log).
    pub call_id: String,
    /// RFC 3339 time, ms precision, UTC.
    pub ts: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: CallEventKind,
}

/// A live call as a viewer joining now should see it.
#[derive(Debug, Clone, Serialize)]
pub struct LiveCall {
    /// The call's AudioSocket UUID.
    pub call_id: String,
    /// RFC 3339 start time.
    pub started: String,
    /// Who is calling.
    #[serde(flatten)]
    pub caller: CallerInfo,
    /// What the agent is doing now.
    pub state: CallState,
    /// The call's utterances so far (at most [`LIVE_TRANSCRIPT_MAX`], the newest).
    pub transcript: Vec<Entry>,
}

/// Utterances kept per live call for late viewers; older ones are in the logs.
pub const LIVE_TRANSCRIPT_MAX: usize = 50;

/// Events buffered for slow viewers before they start skipping.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// The publish side, shared by every call (cheap to clone).
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<CallEvent>>,
    live: Arc<Mutex<BTreeMap<String, LiveCall>>>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new()
    }
}

impl EventBus {
    /// An empty bus holding [`EVENT_CHANNEL_CAPACITY`] events for slow viewers.
    pub fn new() -> EventBus {
        let (tx, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        EventBus {
            tx,
            live: Arc::default(),
        }
    }

    /// Publishes an event of call `call_id`, updating the live-call table. Never blocks on
    /// viewers.
    pub fn emit(&self, call_id: &str, kind: CallEventKind) {
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            match &kind {
                CallEventKind::Started { caller } => {
                    live.insert(
                        call_id.to_string(),
                        LiveCall {
                            call_id: call_id.to_string(),
                            started: ts.clone(),
                            caller: caller.clone(),
                            state: CallState::Listening,
                            transcript: Vec::new(),
                        },
                    );
                }
                CallEventKind::State { state } => {
                    if let Some(c) = live.get_mut(call_id) {
                        c.state = *state;
                    }
                }
                CallEventKind::Utterance { entry } => {
                    if let Some(c) = live.get_mut(call_id) {
                        if c.transcript.len() >= LIVE_TRANSCRIPT_MAX {
                            c.transcript.remove(0);
                        }
                        c.transcript.push(entry.clone());
                    }
                }
                CallEventKind::AgentSentence { .. } => {}
                CallEventKind::Ended { .. } => {
                    live.remove(call_id);
                }
            }
        }
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(CallEvent {
                call_id: call_id.to_string(),
                ts,
                kind,
            }));
        }
    }

    /// A receiver of every event published from now on. A receiver that falls more than
    /// [`EVENT_CHANNEL_CAPACITY`] events behind gets `RecvError::Lagged(n)` and goes on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<CallEvent>> {
        self.tx.subscribe()
    }

    /// The calls live now, oldest first (by start time).
    pub fn live_calls(&self) -> Vec<LiveCall> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut calls: Vec<LiveCall> = live.values().cloned().collect();
        calls.sort_by(|a, b| a.started.cmp(&b.started));
        calls
    }

    /// How many calls are live now.
    pub fn active_calls(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::Speaker;

    #[test]
    fn live_table_follows_the_events_and_viewers_get_them_in_order() {
        let bus = EventBus::new();
        let mut rx = bus.subscribe();
        bus.emit(
            "a",
            CallEventKind::Started {
                caller: CallerInfo {
                    caller_id: Some("100".into()),
                    ..Default::default()
                },
            },
        );
        bus.emit(
            "a",
            CallEventKind::State {
                state: CallState::Thinking,
            },
        );
        bus.emit(
            "a",
            CallEventKind::Utterance {
                entry: Entry::now("a", Speaker::Caller, "hello".into()),
            },
        );
        let live = bus.live_calls();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].state, CallState::Thinking);
        assert_eq!(live[0].caller.caller_id.as_deref(), Some("100"));
        assert_eq!(live[0].transcript[0].text, "hello");
        bus.emit(
            "a",
            CallEventKind::Ended {
                reason: "caller_hangup",
                detail: String::new(),
            },
        );
        assert_eq!(bus.active_calls(), 0);
        let kinds: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| {
                serde_json::to_value(&*e).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(kinds, ["started", "state", "utterance", "ended"]);
    }

    #[test]
    fn transcript_of_a_live_call_is_capped() {
        let bus = EventBus::new();
        bus.emit(
            "b",
            CallEventKind::Started {
                caller: CallerInfo::default(),
            },
        );
        for i in 0..LIVE_TRANSCRIPT_MAX + 5 {
            bus.emit(
                "b",
                CallEventKind::Utterance {
                    entry: Entry::now("b", Speaker::Caller, i.to_string()),
                },
            );
        }
        let t = &bus.live_calls()[0].transcript;
        assert_eq!(t.len(), LIVE_TRANSCRIPT_MAX);
        assert_eq!(t[0].text, "5");
    }

    #[test]
    fn events_of_unknown_calls_do_not_create_rows() {
        let bus = EventBus::new();
        bus.emit(
            "x",
            CallEventKind::State {
                state: CallState::Speaking,
            },
        );
        assert!(bus.live_calls().is_empty());
    }
}
