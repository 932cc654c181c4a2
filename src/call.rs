//! One call, from the id frame to the close: reads the caller's frames, runs VAD and STT on
//! them, starts a reply (LLM -> sentences -> TTS) at each endpoint, and paces the agent's audio
//! out one 20 ms frame at a time, with silence whenever it has nothing to say (Asterisk's
//! `AudioSocket()` hangs up after 2 s without activity). Turn-taking lives here: barge-in
//! (pause at speech onset, cancel once confirmed, resume after a short noise), echo guards,
//! the filler against dead air, the fallbacks when STT, the LLM or TTS fail, DTMF bindings,
//! call limits, and ending the call with a hangup or a transfer decision.

use crate::audio::{bytes_to_samples, ulaw_to_linear, Encoding, UlawDetector};
use crate::audiosocket::{AudioRate, ConnectionError, Frame};
use crate::config::{CallConfig, Config, FaultsConfig};
use crate::conversation::{ConversationLog, Entry, Speaker, TurnTimings};
use crate::deadair::{DeadAir, DeadAirAction, Deadlines};
use crate::directory::{CallDirectory, Decision};
use crate::engines::Engines;
use crate::events::{CallEventKind, CallState, CallerInfo, EventBus};
use crate::llm::{Action, ActionSpec, LlmEvent, LlmSession, Message, Role};
use crate::logsafe;
use crate::stt::{SttResult, SttStream};
use crate::transport::{CallInput, CallOutput};
use crate::tts::{SentenceSplitter, TtsEngine};
use crate::turn::{self, TurnPolicy};
use crate::vad::{Vad, VadEvent};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tracing::{debug, error, info, warn, Instrument};

// End of turn (issue 8): carrying out the turn policy's actions.
#[path = "call_turn.rs"]
mod call_turn;

/// What every call shares: the engines, the config and the conversation log.
#[derive(Clone)]
pub struct Shared {
    /// Loaded models.
    pub engines: Engines,
    /// The configuration.
    pub cfg: Config,
    /// The conversation log.
    pub log: ConversationLog,
    /// Caller info from the FastAGI step before `AudioSocket()`, and each call's decision for
    /// the step after it.
    pub directory: Arc<CallDirectory>,
    /// Live call events for the admin's page and the console.
    pub events: EventBus,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEnd {
    /// The caller hung up (EOF from Asterisk).
    CallerHangup,
    /// The agent sent a hangup frame; the text says why (shutdown, goodbye, transfer, limit).
    AgentHangup(String),
    /// A protocol or socket error ended this call; the text says what.
    Error(String),
}

impl CallEnd {
    /// A short label for metrics and live views: `caller_hangup`, `agent_hangup`, `shutdown`
    /// or `error`.
    pub fn label(&self) -> &'static str {
        match self {
            CallEnd::CallerHangup => "caller_hangup",
            CallEnd::AgentHangup(why) if why == SHUTDOWN => "shutdown",
            CallEnd::AgentHangup(_) => "agent_hangup",
            CallEnd::Error(_) => "error",
        }
    }

    /// The human-readable detail: why the agent hung up, or which error.
    pub fn detail(&self) -> &str {
        match self {
            CallEnd::CallerHangup => "",
            CallEnd::AgentHangup(why) | CallEnd::Error(why) => why,
        }
    }
}

/// The [`CallEnd::AgentHangup`] reason of calls hung up because the server stops.
pub const SHUTDOWN: &str = "server shutting down";

/// The pacing period: one AudioSocket frame per 20 ms.
pub const FRAME_MS: u64 = 20;

/// Runs one call on an accepted connection until it ends: reads the id frame (within
/// `server.id_timeout_ms`), then [`answer`]s. Never panics on bad input: a malformed frame ends
/// this call only. Returns how it ended (already logged).
pub async fn run<R, W>(mut reader: R, mut writer: W, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) -> CallEnd
where
    R: CallInput,
    W: CallOutput,
{
    let id_timeout = Duration::from_millis(shared.cfg.server.id_timeout_ms);
    match crate::admission::read_id(&mut reader, id_timeout).await {
        Ok(uuid) => answer(uuid, uuid.to_string(), reader, writer, shared, shutdown).await,
        Err(msg) => {
            error!("{msg}");
            crate::metrics::protocol_error(&msg);
            let write_timeout = Duration::from_millis(shared.cfg.server.write_timeout_ms);
            crate::admission::close(&mut reader, &mut writer, true, write_timeout, crate::admission::LINGER).await;
            CallEnd::Error(msg)
        }
    }
}

/// Runs the call whose id frame (`call_id`) has arrived until it ends, then closes the
/// connection cleanly. `label` names the call in the logs (the UUID, or `UUID#2` for a second
/// live call with the same UUID). Returns how it ended (already logged).
pub async fn answer<R, W>(
    call_id: uuid::Uuid,
    label: String,
    mut reader: R,
    mut writer: W,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> CallEnd
where
    R: CallInput,
    W: CallOutput,
{
    let span = tracing::info_span!("call", call_id = %label);
    async move {
        let info = shared.directory.info(call_id);
        let caller = info
            .as_ref()
            .map(|c| CallerInfo {
                caller_id: c.caller_id.clone(),
                caller_name: c.caller_name.clone(),
                dnid: c.dnid.clone(),
                channel: c.channel.clone(),
            })
            .unwrap_or_default();
        let events = shared.events.clone();
        events.emit(&label, CallEventKind::Started { caller });
        // Emits the call's Ended event when this task finishes, and also if it panics (a bug,
        // never bad input), so the live page and the history never keep the call "live".
        let mut ended = EndedGuard {
            events,
            label: label.clone(),
            end: None,
        };
        match info {
            Some(c) => {
                info!("call started");
                // Caller details are conversation content: DEBUG only, escaped and capped.
                debug!(
                    caller_id = %logsafe::value(c.caller_id.as_deref()),
                    caller_name = %logsafe::value(c.caller_name.as_deref()),
                    dnid = %logsafe::value(c.dnid.as_deref()),
                    language = %logsafe::value(c.language.as_deref()),
                    channel = %logsafe::value(c.channel.as_deref()),
                    "caller details"
                )
            }
            None => info!("call started (no caller info: no AGI call-start step for this UUID)"),
        }
        let directory = shared.directory.clone();
        let write_timeout = Duration::from_millis(shared.cfg.server.write_timeout_ms);
        let mut call = Call::new(label.clone(), shared);
        let end = call.run(&mut reader, &mut writer, &mut shutdown).await;
        // A reply cut short by the caller's hangup or by shutdown is logged with what was played.
        if call.turn.is_some() {
            call.stop_agent(true);
        }
        // What the dialplan's AGI call-end step will read.
        if let Some(decision) = call.decision.take() {
            directory.set_decision(call_id, decision);
        }
        drop(call);
        close(&mut reader, &mut writer, &end, write_timeout).await;
        ended.end = Some((end.label(), end.detail().to_string()));
        drop(ended);
        end
    }
    .instrument(span)
    .await
}

/// Emits the call's `Ended` event when dropped: with `end` (reason label, detail) as set on
/// the normal path, or `reason: "error"` when the task unwinds (a panic) before setting it.
struct EndedGuard {
    events: EventBus,
    label: String,
    end: Option<(&'static str, String)>,
}

impl Drop for EndedGuard {
    fn drop(&mut self) {
        let (reason, detail) = self.end.take().unwrap_or_else(|| {
            error!("call task ended abnormally (panic): recording the call as ended");
            ("error", "the call's task panicked".into())
        });
        self.events.emit(&self.label, CallEventKind::Ended { reason, detail });
    }
}

/// Logs how the call ended and closes the socket: a hangup frame and a FIN when the agent
/// ends the call, a FIN when the caller did, then the read side drained until the peer's FIN
/// (never a reset). Writes are bounded by `write_timeout`.
async fn close<R: CallInput, W: CallOutput>(reader: &mut R, writer: &mut W, end: &CallEnd, write_timeout: Duration) {
    let hangup = match end {
        CallEnd::Error(msg) => {
            error!("call ended by error: {msg}");
            true
        }
        CallEnd::AgentHangup(why) => {
            info!("call ended: agent hung up ({why})");
            true
        }
        CallEnd::CallerHangup => {
            info!("call ended: caller hung up");
            false
        }
    };
    crate::admission::close(reader, writer, hangup, write_timeout, crate::admission::LINGER).await;
}

/// What a piece of agent audio is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegKind {
    /// The greeting.
    Greeting,
    /// A sentence of an LLM reply.
    Reply,
    /// A fixed prompt (filler, "didn't catch that", apology, goodbye).
    Prompt,
}

/// A piece of agent audio waiting to be played.
struct Segment {
    turn: u64,
    kind: SegKind,
    rate: AudioRate,
    samples: Arc<Vec<i16>>,
    /// Samples already played.
    pos: usize,
    text: String,
}

/// A reply in progress.
struct Turn {
    id: u64,
    cancel: Arc<AtomicBool>,
    /// When the caller's final text arrived.
    t_final: Instant,
    timings: TurnTimings,
    /// Sentences of this reply whose audio has been played to the end.
    played: Vec<String>,
    /// The whole reply text, once generation ended.
    full_text: Option<String>,
    /// Audio of this reply has been queued.
    audio_queued: bool,
    /// What the LLM decided to do once this reply has been spoken.
    action: Option<Action>,
    /// A speculative reply (issue 8): the caller's text it answers. Its audio is held, not
    /// played, and nothing of it is logged until it is committed.
    speculative: Option<String>,
    /// Audio of a speculative reply, held until it is committed.
    held: Vec<Segment>,
    /// Since when the caller has heard nothing of this reply: its queued audio ran out while
    /// more was still to come (`timings.reply_stall_ms`).
    stalled_since: Option<Instant>,
}

/// What the turn model and STT answer to the turn policy's questions (issue 8).
enum TurnMsg {
    Verdict {
        pause: u64,
        result: anyhow::Result<crate::smart_turn::Verdict>,
    },
    TextSoFar {
        pause: u64,
        text: String,
    },
    /// STT's partial text for the prefill (src/prefill.rs).
    Partial {
        text: String,
    },
    /// The prefill is in the KV cache, `ms` after it was started.
    Prefilled {
        ms: u64,
    },
}

/// Drops the oldest caller/agent exchanges of `messages` beyond `history_turns`, keeping the
/// system prompt (the first message).
fn trim_messages(messages: &mut Vec<Message>, history_turns: usize) {
    let keep = 1 + 2 * history_turns;
    if messages.len() > keep {
        messages.drain(1..messages.len() - keep + 1);
    }
}

/// The dead-air policy's turn id while the final transcript is awaited (real ids count up
/// from 0).
const AWAITING_STT_TURN: u64 = u64::MAX;

/// How the call ends once the queued audio has played.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    /// Hang up (goodbye, apology, limits).
    Hangup(String),
    /// Hang up and tell the dialplan to transfer to this destination.
    Transfer { name: String, destination: String },
}

enum ReplyEvent {
    /// The LLM chose an action (before the reply's words).
    Action {
        turn: u64,
        action: Action,
    },
    FirstToken {
        turn: u64,
        ms: u64,
    },
    Audio {
        turn: u64,
        text: String,
        samples: Vec<i16>,
        rate: AudioRate,
    },
    Done {
        turn: u64,
        text: String,
        /// Prompt tokens the LLM had to evaluate (not found in its KV cache).
        evaluated_tokens: Option<usize>,
    },
    /// The LLM failed on every attempt and model: apologize and hang up.
    LlmFailed {
        turn: u64,
        error: String,
    },
    /// Synthesis failed with every voice: the caller hears a canned prompt instead.
    TtsFailed {
        turn: u64,
        error: String,
    },
}

/// A paused agent resumes once the caller's sound has been followed by this much silence (ms)
/// without reaching `[barge_in] confirm_ms`.
const RESUME_AFTER_SILENCE_MS: u32 = 120;

/// A barge-in is confirmed only if the caller's last voiced frame is at most this old (ms).
const CONFIRM_MAX_SILENCE_MS: u32 = 60;

/// Unbound DTMF digits kept for one keypad utterance; more are dropped (with a warning).
const MAX_KEYPAD_DIGITS: usize = 32;

/// `[test_faults] stt_final_delay_ms`: hands each final transcript on `delay_ms` after the
/// previous one was handed on or it arrived, whichever is later, in order (an STT that has
/// fallen behind the caller, as the test tier's does at 4 calls on 2 cores). 0: `rx` itself.
fn delay_finals(mut rx: mpsc::UnboundedReceiver<SttResult>, delay_ms: u64) -> mpsc::UnboundedReceiver<SttResult> {
    if delay_ms == 0 {
        return rx;
    }
    let (tx, out) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            if tx.send(r).is_err() {
                break;
            }
        }
    });
    out
}

/// Ended utterances whose final transcript is awaited, at most (their end-of-turn figures are
/// kept for the conversation log; more than this only if STT has stopped answering).
const MAX_PENDING_DECIDED: usize = 16;

/// Milliseconds without another key before unbound DTMF digits go to the conversation.
const DTMF_FLUSH_MS: u64 = 1500;

struct Call {
    id: String,
    shared: Arc<Shared>,
    vad: Vad,
    /// The recognizer, started at the first audio frame (at its rate); detached until then.
    stt: SttStream,
    stt_rx: mpsc::UnboundedReceiver<SttResult>,
    /// The LLM context, started at the first audio frame (or the first keypad utterance).
    llm: Option<Arc<LlmSession>>,
    fallback_llm: Option<Arc<LlmSession>>,
    history: Vec<Message>,
    queue: VecDeque<Segment>,
    turn: Option<Turn>,
    next_turn: u64,
    reply_tx: mpsc::UnboundedSender<ReplyEvent>,
    reply_rx: mpsc::UnboundedReceiver<ReplyEvent>,
    /// LLM requests made so far (for `[test_faults] llm_fail_first`).
    llm_requests: Arc<AtomicU32>,
    /// The rate of the caller's audio, once seen; the agent answers at the same rate.
    in_rate: Option<AudioRate>,
    out_rate: AudioRate,
    ulaw: UlawDetector,
    encoding: Encoding,
    pre_roll: VecDeque<Vec<i16>>,
    pre_roll_samples: usize,
    /// Tentative barge-in: the agent's audio is paused since this caller speech onset.
    paused_since: Option<Instant>,
    /// The current VAD utterance is ignored (echo guard).
    ignoring_utterance: bool,
    /// When the agent's current stretch of audio started, and when its last one ended.
    agent_started: Option<Instant>,
    agent_stopped: Option<Instant>,
    /// The filler plays at this time unless reply audio comes first.
    filler_due: Option<Instant>,
    started: Instant,
    /// Last caller speech (onset or end) or end of agent audio: for `max_silence_ms`.
    last_activity: Instant,
    dtmf: String,
    dtmf_last: Option<Instant>,
    ending: Option<Ending>,
    /// The decision handed to the dialplan once the call has ended.
    decision: Option<Decision>,
    /// What the agent is doing, as last published on the event bus.
    state: CallState,
    /// Deadlines of a reply after the filler (second filler, re-prompt, hand-off).
    dead_air: DeadAir,
    /// End-of-turn policy (issue 8) and the channel its questions are answered on.
    policy: TurnPolicy,
    /// When to prefill the LLM with the caller's words so far (issue 8).
    prefill: crate::prefill::PrefillPolicy,
    turn_tx: mpsc::UnboundedSender<TurnMsg>,
    turn_rx: mpsc::UnboundedReceiver<TurnMsg>,
    /// The caller's current utterance (at the call rate), at most the last 8 s, for the turn
    /// model.
    utterance: VecDeque<i16>,
    /// For each utterance sent to STT whose final transcript has not arrived yet, oldest
    /// first: the silence (ms) after the caller's last voiced frame when its turn was decided.
    /// Finals arrive in utterance order, so each final takes the front one; under load a
    /// caller can end a second utterance before the first one's final (issue 8: a single slot
    /// here lost the figure at 4 calls). At most [`MAX_PENDING_DECIDED`] entries. Beside it,
    /// when the turn was decided: while a final is awaited, the dead-air deadline runs from
    /// the oldest one (issue 7: a late STT final left the caller in silence after the filler).
    decided_silence_ms: VecDeque<(u64, Instant)>,
    /// Speculative replies dropped in this call.
    speculative_dropped: u32,
}

impl Call {
    /// A call with no engine resources yet: the recognizer and the LLM context are started at
    /// the first audio frame (`set_in_rate`), so a connection that sends an id and
    /// nothing else costs no thread.
    fn new(id: String, shared: Arc<Shared>) -> Call {
        let cfg = &shared.cfg;
        let (stt, stt_rx) = SttStream::detached();
        let history = crate::llm::prologue(&cfg.agent);
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        let (turn_tx, turn_rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let mut vad_cfg = cfg.vad.clone();
        if cfg.turn.mode == crate::config::TurnMode::Smart {
            // The turn model decides; the VAD's own timer is only the fallback.
            vad_cfg.end_silence_ms = cfg.turn.max_end_silence_ms;
        }
        Call {
            vad: match &shared.engines.vad {
                Some(m) => Vad::with_silero(&vad_cfg, m.clone()),
                None => Vad::new(&vad_cfg),
            },
            policy: TurnPolicy::new(&cfg.turn),
            prefill: crate::prefill::PrefillPolicy::new(cfg.turn.prefill_every_ms),
            turn_tx,
            turn_rx,
            utterance: VecDeque::new(),
            decided_silence_ms: VecDeque::new(),
            speculative_dropped: 0,
            stt,
            stt_rx,
            llm: None,
            fallback_llm: None,
            history,
            queue: VecDeque::new(),
            turn: None,
            next_turn: 1,
            reply_tx,
            reply_rx,
            llm_requests: Arc::new(AtomicU32::new(0)),
            in_rate: None,
            out_rate: AudioRate::Slin8,
            ulaw: UlawDetector::default(),
            encoding: Encoding::Unknown,
            pre_roll: VecDeque::new(),
            pre_roll_samples: 0,
            paused_since: None,
            ignoring_utterance: false,
            agent_started: None,
            agent_stopped: None,
            filler_due: None,
            started: now,
            last_activity: now,
            dtmf: String::new(),
            dtmf_last: None,
            ending: None,
            decision: None,
            state: CallState::Listening,
            dead_air: DeadAir::default(),
            id,
            shared,
        }
    }

    /// The call's LLM context, started on first use; the system prompt and greeting are
    /// evaluated into its KV cache at once (while the greeting plays).
    fn llm_session(&mut self) -> Option<Arc<LlmSession>> {
        if self.llm.is_none() {
            let cfg = &self.shared.cfg;
            let actions = cfg
                .actions
                .llm_actions
                .then(|| Arc::new(ActionSpec::new(cfg.actions.transfer.keys().cloned())));
            match LlmSession::start_with_actions(self.shared.engines.llm.clone(), &self.id, actions) {
                Ok(s) => {
                    s.warm(self.history[..2.min(self.history.len())].to_vec());
                    self.llm = Some(Arc::new(s));
                }
                Err(e) => error!("cannot start the call's LLM context: {e:#}"),
            }
        }
        self.llm.clone()
    }

    async fn run<R, W>(&mut self, reader: &mut R, writer: &mut W, shutdown: &mut watch::Receiver<bool>) -> CallEnd
    where
        R: CallInput,
        W: CallOutput,
    {
        // The greeting was synthesized at start-up: queue it before the first tick.
        let greeting = self.shared.cfg.agent.greeting.clone();
        match self.shared.engines.tts.cached(&greeting, self.out_rate.hz()).await {
            Ok(samples) => self.queue.push_back(Segment {
                turn: 0,
                kind: SegKind::Greeting,
                rate: self.out_rate,
                samples,
                pos: 0,
                text: greeting,
            }),
            Err(e) => error!("greeting unavailable: {e:#}"),
        }
        let mut tick = tokio::time::interval(Duration::from_millis(FRAME_MS));
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut frame_buf = Vec::with_capacity(AudioRate::Slin48.samples_per_20ms());
        let write_timeout = Duration::from_millis(self.shared.cfg.server.write_timeout_ms);
        loop {
            tokio::select! {
                biased;
                due = tick.tick() => {
                    self.on_tick();
                    let rate = self.next_frame(&mut frame_buf);
                    match tokio::time::timeout(write_timeout, writer.write_samples(rate, &frame_buf)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return CallEnd::Error(format!("cannot write to Asterisk: {e}")),
                        Err(_) => return CallEnd::Error(format!(
                            "Asterisk has not read the call's audio for {} ms (server.write_timeout_ms): ending the call",
                            write_timeout.as_millis()
                        )),
                    }
                    crate::metrics::frame_written(due.elapsed().as_millis() as u64);
                    self.publish_state();
                    if let Some(end) = self.ended() {
                        return end;
                    }
                }
                frame = reader.read_frame() => match frame {
                    Ok(Some(frame)) => if let Err(end) = self.on_frame(frame) { return end; },
                    Ok(None) => return CallEnd::CallerHangup,
                    Err(ConnectionError::Truncated(n)) => return CallEnd::Error(format!(
                        "truncated frame: the connection closed with {n} bytes of an incomplete frame"
                    )),
                    Err(e) => return CallEnd::Error(format!("{e}")),
                },
                Some(result) = self.stt_rx.recv() => self.on_transcript(result),
                Some(ev) = self.reply_rx.recv() => self.on_reply(ev),
                Some(msg) = self.turn_rx.recv() => self.on_turn_msg(msg),
                _ = shutdown.changed() => return CallEnd::AgentHangup(SHUTDOWN.into()),
            }
        }
    }

    /// Publishes the agent's state on the event bus when it changed.
    fn publish_state(&mut self) {
        let state = if self.ending.is_some() {
            CallState::Ending
        } else if !self.queue.is_empty() && self.paused_since.is_none() {
            CallState::Speaking
        } else if self.turn.is_some() {
            CallState::Thinking
        } else {
            CallState::Listening
        };
        if state != self.state {
            self.state = state;
            self.shared.events.emit(&self.id, CallEventKind::State { state });
        }
    }

    /// Writes an utterance to the conversation log and publishes it on the event bus.
    fn record(&self, entry: Entry) {
        self.shared
            .events
            .emit(&self.id, CallEventKind::Utterance { entry: entry.clone() });
        self.shared.log.write(entry);
    }

    /// The call is over once a decided ending's audio has played out.
    fn ended(&mut self) -> Option<CallEnd> {
        if !self.queue.is_empty() {
            return None;
        }
        match self.ending.take()? {
            Ending::Hangup(why) => {
                info!("decision: hangup");
                self.decision = Some(Decision::Hangup);
                Some(CallEnd::AgentHangup(why))
            }
            Ending::Transfer { name, destination } => {
                info!(transfer = %name, destination = %destination, "decision: transfer");
                let why = format!("transfer to {name}");
                self.decision = Some(Decision::Transfer { name, destination });
                Some(CallEnd::AgentHangup(why))
            }
        }
    }

    /// Fills `buf` with the next 20 ms of agent audio (or silence) and returns its rate.
    fn next_frame(&mut self, buf: &mut Vec<i16>) -> AudioRate {
        buf.clear();
        let front = if self.paused_since.is_some() {
            None
        } else {
            self.queue.front_mut()
        };
        let Some(seg) = front else {
            buf.resize(self.out_rate.samples_per_20ms(), 0);
            return self.out_rate;
        };
        if self.agent_started.is_none() {
            self.agent_started = Some(Instant::now());
        }
        if seg.pos == 0 && seg.kind == SegKind::Reply {
            let text = seg.text.clone();
            // Disjoint fields: `seg` borrows the queue only.
            self.shared.events.emit(&self.id, CallEventKind::AgentSentence { text });
        }
        let rate = seg.rate;
        let n = rate.samples_per_20ms();
        let end = (seg.pos + n).min(seg.samples.len());
        buf.extend_from_slice(&seg.samples[seg.pos..end]);
        buf.resize(n, 0);
        seg.pos = end;
        if seg.pos >= seg.samples.len() {
            let seg = self.queue.pop_front().unwrap();
            if seg.kind == SegKind::Reply {
                let more_queued = self.reply_queued(seg.turn);
                if let Some(turn) = self.turn.as_mut().filter(|t| t.id == seg.turn) {
                    turn.played.push(seg.text);
                    // The reply's audio ran out and the reply is not done: the caller hears
                    // silence until its next sentence is queued.
                    if !more_queued && turn.full_text.is_none() && turn.speculative.is_none() {
                        turn.stalled_since = Some(Instant::now());
                    }
                }
            }
            if self.queue.is_empty() {
                self.agent_started = None;
                self.agent_stopped = Some(Instant::now());
                self.last_activity = Instant::now();
            }
            self.maybe_finish_turn();
        }
        rate
    }

    /// Timers, checked every 20 ms: the filler, unbound DTMF digits, the call limits, and the
    /// barge-in confirmation.
    fn on_tick(&mut self) {
        let now = Instant::now();
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        if self.filler_due.is_some_and(|due| now >= due) && self.queue.is_empty() {
            self.filler_due = None;
            info!(after_ms = cfg.call.filler_after_ms, "dead air: playing the filler");
            let filler = cfg.call.filler.clone();
            self.play_prompt(&filler, "filler");
        }
        if self.ending.is_none() {
            let mut deadlines = Deadlines::from_config(&cfg.call);
            let waiting = match &self.turn {
                Some(t) => (!t.audio_queued).then_some((t.id, t.t_final)),
                // No reply yet because STT has not given the final text (a recognizer behind
                // the caller): the same second filler, counted from the end of the turn, so the
                // caller does not sit in silence after the first filler. Not given up here: the
                // final is coming, and its reply gets the usual deadline from then.
                None => self.decided_silence_ms.front().map(|&(_, at)| {
                    deadlines.give_up = Duration::MAX;
                    (AWAITING_STT_TURN, at)
                }),
            };
            match self.dead_air.tick(now, waiting, self.queue.is_empty(), &deadlines) {
                DeadAirAction::Wait => {}
                DeadAirAction::SecondFiller => {
                    info!("dead air: playing the second filler");
                    self.play_prompt(&cfg.call.second_filler, "second_filler");
                }
                DeadAirAction::Reprompt => {
                    warn!(
                        reply_deadline_ms = cfg.call.reply_deadline_ms,
                        "no reply in time: giving it up and asking again"
                    );
                    self.stop_agent(false);
                    self.filler_due = None;
                    self.play_prompt(&cfg.call.reprompt, "reprompt");
                }
                DeadAirAction::HandOff => self.hand_off(),
            }
        }
        if self
            .dtmf_last
            .is_some_and(|t| now - t >= Duration::from_millis(DTMF_FLUSH_MS))
        {
            self.flush_dtmf();
        }
        if self.ending.is_none() {
            let call_ms = (now - self.started).as_millis() as u64;
            let quiet = self.queue.is_empty() && self.turn.is_none() && !self.vad.in_speech();
            if call_ms >= cfg.call.max_call_ms {
                info!(max_call_ms = cfg.call.max_call_ms, "call limit reached: saying goodbye");
                self.say_goodbye("maximum call duration");
            } else if quiet && (now - self.last_activity).as_millis() as u64 >= cfg.call.max_silence_ms {
                info!(
                    max_silence_ms = cfg.call.max_silence_ms,
                    "caller silent too long: saying goodbye"
                );
                self.say_goodbye("caller silent");
            }
        }
        self.confirm_barge_in();
    }

    /// Replies kept timing out: transfer to `call.handoff_transfer` if it names a configured
    /// destination, else the apology and a hangup.
    fn hand_off(&mut self) {
        let shared = self.shared.clone();
        let name = shared.cfg.call.handoff_transfer.as_deref();
        match name.and_then(|n| shared.cfg.actions.transfer.get(n).map(|d| (n, d))) {
            Some((name, dest)) => {
                warn!(transfer = name, "replies keep timing out: handing the call off");
                self.stop_agent(false);
                self.ending = Some(Ending::Transfer {
                    name: name.into(),
                    destination: dest.clone(),
                });
            }
            None => {
                warn!("replies keep timing out: apologizing and hanging up");
                self.apologize_and_hang_up("replies keep timing out");
            }
        }
    }

    fn say_goodbye(&mut self, why: &str) {
        self.stop_agent(true);
        let goodbye = self.shared.cfg.call.goodbye.clone();
        self.play_prompt(&goodbye, "goodbye");
        self.ending = Some(Ending::Hangup(why.into()));
    }

    /// Queues a fixed prompt (pre-rendered at start-up) and logs it as an agent utterance.
    fn play_prompt(&mut self, text: &str, what: &'static str) {
        let tts = &self.shared.engines.tts;
        let found = tts
            .get_cached(text, self.out_rate.hz())
            .map(|s| (self.out_rate, s))
            .or_else(|| {
                // A rate it was not rendered at: Asterisk accepts 8 kHz audio on any call.
                tts.get_cached(text, 8000).map(|s| (AudioRate::Slin8, s))
            });
        match found {
            Some((rate, samples)) => self.queue.push_back(Segment {
                turn: 0,
                kind: SegKind::Prompt,
                rate,
                samples,
                pos: 0,
                text: text.into(),
            }),
            None => error!(prompt = what, "prompt {text:?} was not rendered at start-up"),
        }
        let mut entry = Entry::now(&self.id, Speaker::Agent, text.to_string());
        entry.prompt = Some(what);
        self.record(entry);
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), CallEnd> {
        match frame {
            Frame::Audio { rate, payload } => {
                let mut samples = Vec::with_capacity(payload.len());
                if rate == AudioRate::Slin8 && self.encoding == Encoding::Unknown {
                    self.encoding = self.ulaw.push(payload.len());
                    if self.encoding == Encoding::Ulaw {
                        warn!(
                            "caller audio under kind 0x10 is G.711 mu-law (160-byte frames), not slin: decoding it. \
                             Use Dial(AudioSocket/host:port/uuid/c(slin)) or c(slin16) in the dialplan"
                        );
                    }
                }
                if self.encoding == Encoding::Ulaw && rate == AudioRate::Slin8 {
                    samples.extend(payload.iter().map(|&b| ulaw_to_linear(b)));
                } else {
                    bytes_to_samples(&payload, &mut samples);
                }
                if self.in_rate != Some(rate) {
                    self.set_in_rate(rate)?;
                }
                self.on_audio(samples, rate.hz());
            }
            Frame::Dtmf(d) => self.on_dtmf(d),
            Frame::Hangup => return Err(CallEnd::CallerHangup),
            Frame::Error(code) => return Err(CallEnd::Error(format!("Asterisk sent an error frame (code {code:?})"))),
            Frame::Id(u) => warn!("ignoring a second id frame ({u})"),
        }
        Ok(())
    }

    /// The first audio frame fixes the call's rate and starts its recognizer and LLM context
    /// (once per call). A later frame at another rate ends the call: Asterisk never changes a
    /// call's audio format mid-call, so that is a broken or hostile peer, and a new recognizer
    /// per change would let it multiply threads.
    fn set_in_rate(&mut self, rate: AudioRate) -> Result<(), CallEnd> {
        if let Some(old) = self.in_rate {
            return Err(CallEnd::Error(format!(
                "caller audio changed rate mid-call ({} Hz -> {} Hz): ending the call",
                old.hz(),
                rate.hz()
            )));
        }
        info!(rate_hz = rate.hz(), "caller audio rate");
        match self.shared.engines.stt.start_stream(&self.id, rate.hz()) {
            Ok((stt, rx)) => {
                self.stt = stt;
                self.stt_rx = delay_finals(rx, self.shared.cfg.test_faults.stt_final_delay_ms);
            }
            Err(e) => return Err(CallEnd::Error(format!("cannot start STT at {} Hz: {e:#}", rate.hz()))),
        }
        if self.llm_session().is_none() {
            return Err(CallEnd::Error("cannot start the call's LLM context".into()));
        }
        self.in_rate = Some(rate);
        self.out_rate = rate;
        self.pre_roll.clear();
        self.pre_roll_samples = 0;
        Ok(())
    }

    fn on_audio(&mut self, samples: Vec<i16>, rate_hz: u32) {
        let event = self.vad.push(&samples, rate_hz);
        match event {
            VadEvent::None if !self.vad.in_speech() => {
                // Keep a little audio from before the onset for STT.
                let max = (self.shared.cfg.vad.pre_roll_ms * rate_hz / 1000) as usize;
                self.pre_roll_samples += samples.len();
                self.pre_roll.push_back(samples);
                while self.pre_roll_samples > max {
                    match self.pre_roll.pop_front() {
                        Some(f) => self.pre_roll_samples -= f.len(),
                        None => break,
                    }
                }
            }
            VadEvent::None => {
                if !self.ignoring_utterance {
                    self.keep_utterance(&samples, rate_hz);
                    let audio_ms = (samples.len() as u64 * 1000 / rate_hz.max(1) as u64) as u32;
                    self.stt.audio(samples);
                    self.maybe_prefill(audio_ms);
                    if self.paused_since.is_none() {
                        let ms = self.vad.trailing_silence_ms();
                        self.turn_event(turn::Event::Silence { ms });
                    }
                }
            }
            VadEvent::SpeechStart { onset_ms } => self.on_speech_start(samples, onset_ms),
            VadEvent::SpeechEnd(reason) => {
                let decided_ms = self.vad_end_silence_ms();
                self.on_speech_end(samples, reason, decided_ms)
            }
        }
    }

    fn on_speech_start(&mut self, samples: Vec<i16>, onset_ms: u32) {
        let now = Instant::now();
        let shared = self.shared.clone();
        let b = &shared.cfg.barge_in;
        self.last_activity = now;
        self.filler_due = None;
        let speaking = !self.queue.is_empty();
        let ms_since = |t: Instant| (now - t).as_millis() as u32;
        let agent = if speaking {
            // Queued but not yet written (the tick comes within 20 ms): it starts now.
            crate::echo_guard::AgentAudio::Playing {
                since_start_ms: self.agent_started.map_or(0, ms_since),
            }
        } else {
            crate::echo_guard::AgentAudio::Silent {
                since_stop_ms: self.agent_stopped.map(ms_since),
            }
        };
        if let Some(why) = crate::echo_guard::classify(onset_ms, agent, b) {
            debug!(onset_ms, ?why, "speech onset treated as echo");
            self.ignoring_utterance = true;
            return;
        }
        self.ignoring_utterance = false;
        debug!(onset_ms, "speech started");
        self.utterance.clear();
        let rate_hz = self.in_rate.map_or(8000, |r| r.hz());
        for f in std::mem::take(&mut self.pre_roll) {
            self.keep_utterance(&f, rate_hz);
            self.stt.audio(f);
        }
        self.pre_roll_samples = 0;
        self.keep_utterance(&samples, rate_hz);
        self.stt.audio(samples);
        self.prefill.utterance_start();
        self.turn_event(turn::Event::SpeechStart);
        if speaking && b.enabled && self.paused_since.is_none() {
            self.paused_since = Some(now);
            info!(onset_ms, "caller speech during agent audio: agent paused");
        }
    }

    /// The caller's utterance ended, `decided_ms` of silence after its last voiced frame (the
    /// VAD's timer or the turn model's verdict).
    fn on_speech_end(&mut self, samples: Vec<i16>, reason: crate::vad::EndReason, decided_ms: u32) {
        self.last_activity = Instant::now();
        if std::mem::take(&mut self.ignoring_utterance) {
            self.stt.discard();
            self.turn_event(turn::Event::Discarded);
            return;
        }
        if reason == crate::vad::EndReason::TooShort {
            // Too little voiced sound to be an utterance: noise, not something to answer.
            debug!("too short to be speech: discarded");
            self.stt.discard();
            self.paused_since = None;
            self.turn_event(turn::Event::Discarded);
            return;
        }
        if let Some(since) = self.paused_since.take() {
            // The sound ended before it was confirmed as a barge-in: a cough, a click.
            info!(
                ms = since.elapsed().as_millis() as u64,
                "short sound during agent audio: resuming"
            );
            crate::metrics::barge_in(false);
            self.stt.discard();
            self.turn_event(turn::Event::Discarded);
            return;
        }
        debug!(?reason, "speech ended");
        if self.decided_silence_ms.len() >= MAX_PENDING_DECIDED {
            // Only if STT never answers (no recognizer): keep the newest.
            self.decided_silence_ms.pop_front();
        }
        self.decided_silence_ms.push_back((decided_ms as u64, Instant::now()));
        self.turn_event(turn::Event::VadEnd);
        self.utterance.clear();
        self.stt.audio(samples);
        self.stt.finish();
        // The filler counts from where the silence timer would have put the endpoint: a turn
        // the model ended sooner gives the reply that much more time instead of bringing the
        // filler forward (issue 8, at 1 call: with the filler counted from the model's
        // endpoint, 5 of 6 replies came behind "One moment.", against 1 of 6 with the timer).
        let head_start = self.shared.cfg.vad.end_silence_ms.saturating_sub(decided_ms) as u64;
        self.filler_due =
            Some(Instant::now() + Duration::from_millis(self.shared.cfg.call.filler_after_ms + head_start));
    }

    /// A paused agent whose caller has kept talking for `confirm_ms` is interrupted for good;
    /// one whose caller fell silent again before that (a cough, a click) resumes at once.
    fn confirm_barge_in(&mut self) {
        let Some(since) = self.paused_since else { return };
        let silent_ms = self.vad.trailing_silence_ms();
        if !self.vad.in_speech() || silent_ms >= RESUME_AFTER_SILENCE_MS {
            info!(
                ms = since.elapsed().as_millis() as u64,
                "short sound during agent audio: resuming"
            );
            crate::metrics::barge_in(false);
            self.paused_since = None;
            // The rest of this utterance is noise, not something to answer.
            self.ignoring_utterance = true;
            return;
        }
        // Confirmed only while the caller is still making sound (not in a trailing pause).
        if since.elapsed() < Duration::from_millis(self.shared.cfg.barge_in.confirm_ms as u64)
            || silent_ms > CONFIRM_MAX_SILENCE_MS
        {
            return;
        }
        self.paused_since = None;
        let dropped_ms: usize = self
            .queue
            .iter()
            .map(|s| (s.samples.len() - s.pos) * 1000 / s.rate.hz() as usize)
            .sum();
        info!(dropped_ms, "barge-in: agent stopped");
        crate::metrics::barge_in(true);
        // An LLM-decided ending is dropped: the caller wants to go on. Limits still apply.
        if matches!(self.ending, Some(Ending::Transfer { .. })) || self.turn.is_some() {
            self.ending = None;
        }
        self.stop_agent(true);
    }

    /// Drops all queued agent audio and ends the current reply, keeping in the history what
    /// the caller heard (to the word, estimated from the samples played).
    fn stop_agent(&mut self, interrupted: bool) {
        let partial = self
            .queue
            .front()
            .filter(|s| s.kind == SegKind::Reply && s.pos > 0)
            .map(|s| {
                let words: Vec<&str> = s.text.split_whitespace().collect();
                let n = (words.len() * s.pos).div_ceil(s.samples.len().max(1));
                (s.turn, words[..n.min(words.len())].join(" "))
            });
        self.queue.clear();
        self.paused_since = None;
        if self.agent_started.take().is_some() {
            self.agent_stopped = Some(Instant::now());
        }
        if let Some(mut turn) = self.turn.take() {
            turn.cancel.store(true, Ordering::Relaxed);
            if turn.speculative.is_some() {
                // Never heard, never recorded.
                self.speculative_dropped += 1;
                return;
            }
            if let Some((_, words)) = partial.filter(|(id, _)| *id == turn.id) {
                turn.played.push(words);
            }
            self.finish_turn(turn, interrupted);
        }
    }

    fn on_dtmf(&mut self, digit: char) {
        info!("DTMF digit");
        assert!(
            !self.shared.cfg.test_faults.panic_on_dtmf,
            "[test_faults] panic_on_dtmf"
        );
        debug!(digit = %digit, "DTMF digit value");
        self.last_activity = Instant::now();
        let shared = self.shared.clone();
        let binding = shared.cfg.actions.dtmf.get(&digit.to_string()).cloned();
        match binding.as_deref().map(|b| b.split_once(':').unwrap_or((b, ""))) {
            Some(("hangup", _)) => {
                info!("DTMF bound to hangup");
                self.say_goodbye("caller pressed a hangup key");
            }
            Some(("transfer", name)) => match shared.cfg.actions.transfer.get(name) {
                Some(dest) => {
                    info!(transfer = name, "DTMF bound to a transfer");
                    self.stop_agent(true);
                    self.ending = Some(Ending::Transfer {
                        name: name.into(),
                        destination: dest.clone(),
                    });
                }
                None => {
                    error!(digit = %digit, "DTMF binding names transfer destination {name:?}, which [actions] transfer lacks")
                }
            },
            Some((other, _)) => error!(digit = %digit, "unknown DTMF binding {other:?} (use hangup or transfer:NAME)"),
            None => {
                if self.dtmf.len() >= MAX_KEYPAD_DIGITS {
                    if self.dtmf.len() == MAX_KEYPAD_DIGITS {
                        warn!("more than {MAX_KEYPAD_DIGITS} unbound DTMF digits without '#': dropping the rest");
                        // One marker byte past the cap: warn once per keypad utterance.
                        self.dtmf.push('…');
                    }
                    self.dtmf_last = Some(Instant::now());
                    if digit == '#' {
                        self.flush_dtmf();
                    }
                    return;
                }
                self.dtmf.push(digit);
                self.dtmf_last = Some(Instant::now());
                if digit == '#' {
                    self.flush_dtmf();
                }
            }
        }
    }

    /// Unbound digits reach the conversation as text, like an utterance.
    fn flush_dtmf(&mut self) {
        self.dtmf_last = None;
        let mut digits = std::mem::take(&mut self.dtmf);
        digits.retain(|c| c != '…');
        if !digits.is_empty() {
            self.on_transcript(SttResult {
                text: format!("[keypad] {digits}"),
                finish_ms: 0,
            });
        }
    }

    fn on_transcript(&mut self, result: SttResult) {
        let faults = &self.shared.cfg.test_faults;
        let text = if faults.stt_empty && !result.text.starts_with("[keypad]") {
            String::new()
        } else {
            result.text.trim().to_string()
        };
        info!(
            stt_final_ms = result.finish_ms,
            chars = text.chars().count(),
            "caller utterance"
        );
        debug!(text = %logsafe::clean(&text, 1000), "caller said");
        self.record(Entry::now(&self.id, Speaker::Caller, text.clone()));
        let actions = if text.starts_with("[keypad]") {
            vec![turn::Action::StartReply { text: text.clone() }]
        } else {
            self.policy.on(turn::Event::Final { text: text.clone() })
        };
        // A keypad utterance has no end of turn; every other final answers the oldest ended
        // utterance.
        let decided = if text.starts_with("[keypad]") {
            None
        } else {
            self.decided_silence_ms.pop_front().map(|(ms, _)| ms)
        };
        for action in actions {
            match action {
                turn::Action::StartReply { text } => self.start_reply(text, result.finish_ms, decided),
                turn::Action::CommitSpeculative => {
                    if !self.commit_speculative(&text, result.finish_ms, decided) {
                        self.start_reply(text.clone(), result.finish_ms, decided);
                    }
                }
                other => self.apply_turn(other),
            }
        }
    }

    /// Starts the reply to the caller's final text (or asks again when it is empty).
    /// `turn_decided_ms`: silence (ms) after the utterance's last voiced frame when its turn
    /// was decided (None for keypad input).
    fn start_reply(&mut self, text: String, stt_final_ms: u64, turn_decided_ms: Option<u64>) {
        if text.is_empty() {
            // Nothing usable: ask again, and listen again.
            self.filler_due = None;
            let again = self.shared.cfg.call.not_understood.clone();
            self.play_prompt(&again, "not_understood");
            return;
        }
        // A keypad utterance has no endpoint: the filler timer starts at its final text.
        if self.filler_due.is_none() && text.starts_with("[keypad]") {
            self.filler_due = Some(Instant::now() + Duration::from_millis(self.shared.cfg.call.filler_after_ms));
        }
        // A reply still being generated for an earlier utterance is superseded.
        if self.turn.is_some() {
            self.stop_agent(true);
        }
        self.commit_user_turn(text);
        let messages = self.history.clone();
        let timings = TurnTimings {
            stt_final_ms,
            turn_decided_ms,
            ..Default::default()
        };
        self.spawn_reply(messages, timings, None);
    }

    /// Starts a reply job for `messages`; `speculative` holds its audio until committed.
    fn spawn_reply(&mut self, messages: Vec<Message>, timings: TurnTimings, speculative: Option<String>) {
        let turn_id = self.next_turn;
        self.next_turn += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        let t_final = Instant::now();
        let Some(main) = self.llm_session() else {
            self.apologize_and_hang_up("LLM unavailable");
            return;
        };
        let mut sessions = vec![(main, "main")];
        if let Some(fb) = self.fallback_session() {
            sessions.push((fb, "fallback"));
        }
        let job = ReplyJob {
            tts: self.shared.engines.tts.clone(),
            fallback_tts: self.shared.engines.fallback_tts.clone(),
            sessions,
            messages,
            max_tokens: self.shared.cfg.agent.max_reply_tokens,
            rate: self.out_rate,
            turn: turn_id,
            t_final,
            tx: self.reply_tx.clone(),
            cancel: cancel.clone(),
            call: self.shared.cfg.call.clone(),
            faults: self.shared.cfg.test_faults.clone(),
            llm_requests: self.llm_requests.clone(),
            spoken: AtomicU32::new(0),
            handed_over: std::sync::Mutex::new(None),
        };
        tokio::spawn(job.run().in_current_span());
        self.turn = Some(Turn {
            id: turn_id,
            cancel,
            t_final,
            timings,
            played: Vec::new(),
            full_text: None,
            audio_queued: false,
            stalled_since: None,
            action: None,
            speculative,
            held: Vec::new(),
        });
    }

    /// The per-call context of the fallback model, started on first use.
    fn fallback_session(&mut self) -> Option<Arc<LlmSession>> {
        if self.fallback_llm.is_none() {
            let engine = self.shared.engines.fallback_llm.clone()?;
            match LlmSession::start(engine, &self.id) {
                Ok(s) => self.fallback_llm = Some(Arc::new(s)),
                Err(e) => error!("cannot start the fallback LLM: {e:#}"),
            }
        }
        self.fallback_llm.clone()
    }

    fn on_reply(&mut self, ev: ReplyEvent) {
        let current = self.turn.as_ref().map(|t| t.id);
        match ev {
            ReplyEvent::Action { turn, action } if Some(turn) == current => {
                info!(?action, "the LLM chose an action");
                self.turn.as_mut().unwrap().action = Some(action);
            }
            ReplyEvent::FirstToken { turn, ms } if Some(turn) == current => {
                self.turn.as_mut().unwrap().timings.llm_first_token_ms = Some(ms);
            }
            ReplyEvent::Audio {
                turn,
                text,
                samples,
                rate,
            } if Some(turn) == current => {
                let seg = Segment {
                    turn,
                    kind: SegKind::Reply,
                    rate,
                    samples: Arc::new(samples),
                    pos: 0,
                    text,
                };
                let t = self.turn.as_mut().unwrap();
                if t.speculative.is_some() {
                    // Prepared during the pause: plays only once the turn is decided.
                    t.held.push(seg);
                    return;
                }
                if !t.audio_queued {
                    t.audio_queued = true;
                    t.timings.tts_first_audio_ms = Some(t.t_final.elapsed().as_millis() as u64);
                    self.filler_due = None;
                    self.dead_air.replied();
                }
                if let Some(since) = t.stalled_since.take() {
                    t.timings.reply_stall_ms += since.elapsed().as_millis() as u64;
                }
                self.queue.push_back(seg);
            }
            ReplyEvent::Done {
                turn,
                text,
                evaluated_tokens,
            } if Some(turn) == current => {
                let t = self.turn.as_mut().unwrap();
                t.full_text = Some(text);
                t.timings.llm_evaluated_tokens = evaluated_tokens;
                self.maybe_finish_turn();
            }
            ReplyEvent::LlmFailed { turn, .. } | ReplyEvent::TtsFailed { turn, .. }
                if Some(turn) == current && self.is_speculative() =>
            {
                // The reply to the final text will try again (and fail loudly if it must).
                warn!("the speculative reply failed: dropping it");
                self.drop_speculative();
            }
            ReplyEvent::LlmFailed { turn, error } if Some(turn) == current => {
                error!("no reply from any model: {error}; apologizing and hanging up");
                crate::metrics::fallback("llm_failed");
                self.apologize_and_hang_up("LLM failure");
            }
            ReplyEvent::TtsFailed { turn, error } if Some(turn) == current => {
                crate::metrics::fallback("tts_failed");
                error!("speech synthesis failed with every voice: {error}; playing the canned apology and hanging up");
                self.apologize_and_hang_up("TTS failure");
            }
            _ => {} // an event of a cancelled turn
        }
    }

    /// The canned apology (rendered at start-up, so it plays even when synthesis is broken),
    /// then a clean hangup.
    fn apologize_and_hang_up(&mut self, why: &str) {
        self.stop_agent(false);
        let apology = self.shared.cfg.call.apology.clone();
        self.play_prompt(&apology, "apology");
        self.ending = Some(Ending::Hangup(why.into()));
    }

    /// Audio of reply `turn` waits in the playout queue.
    fn reply_queued(&self, turn: u64) -> bool {
        self.queue.iter().any(|s| s.turn == turn && s.kind == SegKind::Reply)
    }

    fn maybe_finish_turn(&mut self) {
        let Some(turn) = &self.turn else { return };
        if turn.speculative.is_none() && turn.full_text.is_some() && !self.reply_queued(turn.id) {
            let turn = self.turn.take().unwrap();
            self.finish_turn(turn, false);
        }
    }

    /// Logs an agent turn and adds it to the history: the whole reply, or when `interrupted`,
    /// what the caller heard.
    fn finish_turn(&mut self, turn: Turn, interrupted: bool) {
        let text = if interrupted {
            turn.played.join(" ")
        } else {
            turn.full_text.clone().unwrap_or_default()
        };
        let t = &turn.timings;
        info!(
            stt_final_ms = t.stt_final_ms,
            llm_first_token_ms = t.llm_first_token_ms,
            tts_first_audio_ms = t.tts_first_audio_ms,
            reply_stall_ms = t.reply_stall_ms,
            interrupted,
            chars = text.chars().count(),
            "agent turn"
        );
        debug!(text = %logsafe::clean(&text, 1000), "agent said");
        if !text.is_empty() {
            self.history.push(Message {
                role: Role::Assistant,
                text: text.clone(),
            });
        }
        let mut entry = Entry::now(&self.id, Speaker::Agent, text);
        entry.timings = Some(turn.timings);
        entry.interrupted = interrupted;
        self.record(entry);
        // The reply has been heard in full: carry out what the LLM decided. (A reply the caller
        // interrupted loses its action: the caller wants to go on.)
        match turn.action.filter(|_| !interrupted) {
            Some(Action::Hangup) if self.ending.is_none() => {
                self.ending = Some(Ending::Hangup("the agent said goodbye".into()));
            }
            Some(Action::Transfer { name }) if self.ending.is_none() => {
                match self.shared.cfg.actions.transfer.get(&name) {
                    Some(dest) => {
                        self.ending = Some(Ending::Transfer {
                            name,
                            destination: dest.clone(),
                        })
                    }
                    None => warn!(transfer = %name, "ignoring a transfer to a destination not in [actions] transfer"),
                }
            }
            _ => {}
        }
    }
}

/// One reply: asks the LLM (retrying, then the fallback model), cuts the streamed tokens into
/// sentences and synthesizes each as soon as it is complete (falling back to the second
/// voice), sending the audio to the call task.
struct ReplyJob {
    tts: Arc<TtsEngine>,
    fallback_tts: Option<Arc<TtsEngine>>,
    sessions: Vec<(Arc<LlmSession>, &'static str)>,
    messages: Vec<Message>,
    max_tokens: u32,
    rate: AudioRate,
    turn: u64,
    t_final: Instant,
    tx: mpsc::UnboundedSender<ReplyEvent>,
    cancel: Arc<AtomicBool>,
    call: CallConfig,
    faults: FaultsConfig,
    llm_requests: Arc<AtomicU32>,
    /// Sentences synthesized so far (for `[test_faults] tts_later_sentence_delay_ms`).
    spoken: AtomicU32,
    /// When this reply's first audio was handed to the call, and how much audio (at the
    /// call's rate) it has handed over since: the instant its audio runs out if nothing more
    /// comes, which is the deadline of its next sentence (`tts.order = "deadline"`). For a
    /// reply prepared in the pause, whose audio is held until it is committed, this is
    /// earlier than the truth: its later sentences are treated as more urgent, not less.
    handed_over: std::sync::Mutex<Option<(Instant, Duration)>>,
}

/// How one LLM attempt went.
enum Attempt {
    /// The reply was generated (possibly cut short by an error after some words).
    Spoken,
    /// Nothing was said: try again.
    Failed(String),
    /// Synthesis failed with every voice.
    TtsFailed(String),
}

impl ReplyJob {
    async fn run(self) {
        let mut last_error = String::from("no model");
        for (session, model) in &self.sessions {
            if *model == "fallback" {
                crate::metrics::fallback("llm_fallback_model");
            }
            for attempt in 0..=self.call.llm_retries {
                if self.cancel.load(Ordering::Relaxed) {
                    return;
                }
                match self.attempt(session).await {
                    Attempt::Spoken => return,
                    Attempt::TtsFailed(e) => {
                        let _ = self.tx.send(ReplyEvent::TtsFailed {
                            turn: self.turn,
                            error: e,
                        });
                        return;
                    }
                    Attempt::Failed(e) => {
                        warn!(model, attempt = attempt + 1, "LLM attempt failed: {e}");
                        crate::metrics::fallback("llm_retry");
                        last_error = e;
                    }
                }
            }
        }
        let _ = self.tx.send(ReplyEvent::LlmFailed {
            turn: self.turn,
            error: last_error,
        });
    }

    async fn attempt(&self, session: &LlmSession) -> Attempt {
        let n = self.llm_requests.fetch_add(1, Ordering::Relaxed);
        if n < self.faults.llm_fail_first {
            return Attempt::Failed(format!(
                "injected fault (request {} of {})",
                n + 1,
                self.faults.llm_fail_first
            ));
        }
        if self.faults.llm_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.faults.llm_delay_ms)).await;
        }
        // Each attempt has its own cancel flag, so a timed-out one stops generating.
        let stop = Arc::new(AtomicBool::new(false));
        let mut rx = session.generate(self.messages.clone(), self.max_tokens, stop.clone());
        let timeout = Duration::from_millis(self.call.llm_timeout_ms);
        let mut splitter = SentenceSplitter::default();
        let mut full = String::new();
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                stop.store(true, Ordering::Relaxed);
                return Attempt::Spoken;
            }
            let ev = match tokio::time::timeout(timeout, rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => LlmEvent::Error("LLM stream ended without a result".into()),
                Err(_) => {
                    stop.store(true, Ordering::Relaxed);
                    LlmEvent::Error(format!("no token within {} ms", timeout.as_millis()))
                }
            };
            match ev {
                LlmEvent::Action(action) => {
                    let _ = self.tx.send(ReplyEvent::Action {
                        turn: self.turn,
                        action,
                    });
                }
                LlmEvent::Token(t) => {
                    if full.is_empty() {
                        let ms = self.t_final.elapsed().as_millis() as u64;
                        let _ = self.tx.send(ReplyEvent::FirstToken { turn: self.turn, ms });
                    }
                    full.push_str(&t);
                    for sentence in splitter.push(&t) {
                        if let Err(e) = self.speak(sentence).await {
                            stop.store(true, Ordering::Relaxed);
                            return Attempt::TtsFailed(e);
                        }
                    }
                }
                LlmEvent::Done(stats) => {
                    if let Some(rest) = splitter.finish() {
                        if let Err(e) = self.speak(rest).await {
                            return Attempt::TtsFailed(e);
                        }
                    }
                    debug!(?stats, "LLM turn done");
                    let _ = self.tx.send(ReplyEvent::Done {
                        turn: self.turn,
                        text: full.trim().to_string(),
                        evaluated_tokens: Some(stats.evaluated_tokens),
                    });
                    return Attempt::Spoken;
                }
                LlmEvent::Error(e) if full.trim().is_empty() => return Attempt::Failed(e),
                LlmEvent::Error(e) => {
                    // Words were already spoken: finish with what there is rather than repeat.
                    warn!("LLM failed mid-reply: {e}");
                    if let Some(rest) = splitter.finish() {
                        let _ = self.speak(rest).await;
                    }
                    let _ = self.tx.send(ReplyEvent::Done {
                        turn: self.turn,
                        text: full.trim().to_string(),
                        evaluated_tokens: None,
                    });
                    return Attempt::Spoken;
                }
            }
        }
    }

    /// Synthesizes one sentence with the main voice, else the fallback voice.
    async fn speak(&self, sentence: String) -> Result<(), String> {
        if self.cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        if self.faults.tts_later_sentence_delay_ms > 0 && self.spoken.fetch_add(1, Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(self.faults.tts_later_sentence_delay_ms)).await;
        }
        // A first sentence is due now (the caller is waiting); a later one when the audio
        // handed over before it has played.
        let deadline = match *self.handed_over.lock().unwrap_or_else(|e| e.into_inner()) {
            None => Instant::now(),
            Some((first, audio)) => first + audio,
        };
        let main = if self.faults.tts_fail {
            Err(anyhow::anyhow!("injected fault"))
        } else {
            self.tts.synthesize_by(&sentence, self.rate.hz(), deadline).await
        };
        let speech = match (main, &self.fallback_tts) {
            (Ok(s), _) => s,
            (Err(e), Some(fb)) => {
                warn!("TTS failed ({e:#}); using the fallback voice");
                crate::metrics::fallback("tts_fallback_voice");
                fb.synthesize(&sentence, self.rate.hz())
                    .await
                    .map_err(|e2| format!("{e:#}; fallback voice: {e2:#}"))?
            }
            (Err(e), None) => return Err(format!("{e:#}")),
        };
        let audio = Duration::from_millis(speech.samples.len() as u64 * 1000 / u64::from(self.rate.hz().max(1)));
        {
            let mut handed = self.handed_over.lock().unwrap_or_else(|e| e.into_inner());
            match handed.as_mut() {
                None => *handed = Some((Instant::now(), audio)),
                Some((_, total)) => *total += audio,
            }
        }
        let _ = self.tx.send(ReplyEvent::Audio {
            turn: self.turn,
            text: sentence,
            samples: speech.samples,
            rate: self.rate,
        });
        Ok(())
    }
}
