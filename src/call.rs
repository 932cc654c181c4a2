//! One call, from the id frame to the close: reads the caller's frames, runs VAD and STT on
//! them, starts a reply (LLM -> sentences -> TTS) at each endpoint, and paces the agent's audio
//! out one 20 ms frame at a time, with silence whenever it has nothing to say (Asterisk's
//! `AudioSocket()` hangs up after 2 s without activity). Caller speech during agent audio
//! (barge-in) drops the queued audio and cancels the reply.

use crate::audio::{bytes_to_samples, ulaw_to_linear, Encoding, UlawDetector};
use crate::audiosocket::{AudioRate, ConnectionError, Frame, FrameReader, FrameWriter};
use crate::config::Config;
use crate::conversation::{ConversationLog, Entry, Speaker, TurnTimings};
use crate::engines::Engines;
use crate::llm::{LlmEvent, LlmSession, Message, Role};
use crate::stt::{SttResult, SttStream};
use crate::tts::{SentenceSplitter, TtsEngine};
use crate::vad::{Vad, VadEvent};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tracing::{debug, error, info, warn, Instrument};

/// What every call shares: the engines, the config and the conversation log.
pub struct Shared {
    /// Loaded models.
    pub engines: Engines,
    /// The configuration.
    pub cfg: Config,
    /// The conversation log.
    pub log: ConversationLog,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEnd {
    /// The caller hung up (EOF from Asterisk).
    CallerHangup,
    /// The agent sent a hangup frame (server shutdown).
    AgentHangup,
    /// A protocol or socket error ended this call; the text says what.
    Error(String),
}

/// The pacing period: one AudioSocket frame per 20 ms.
pub const FRAME_MS: u64 = 20;

/// Runs one call on an accepted connection until it ends. Never panics on bad input: a
/// malformed frame ends this call only. Returns how it ended (already logged).
pub async fn run<R, W>(
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> CallEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let id_timeout = Duration::from_millis(shared.cfg.server.id_timeout_ms);
    let call_id = match tokio::time::timeout(id_timeout, reader.read_frame()).await {
        Ok(Ok(Some(Frame::Id(uuid)))) => uuid.to_string(),
        Ok(Ok(Some(other))) => {
            return fail(
                &mut writer,
                format!("first frame was {other}, not an id frame: ending the connection"),
                "-",
            )
            .await
        }
        Ok(Ok(None)) => return fail(&mut writer, "connection closed before an id frame".into(), "-").await,
        Ok(Err(e)) => return fail(&mut writer, format!("bad first frame: {e}"), "-").await,
        Err(_) => {
            return fail(
                &mut writer,
                format!(
                    "no id frame within {} ms: ending the connection",
                    id_timeout.as_millis()
                ),
                "-",
            )
            .await
        }
    };
    let span = tracing::info_span!("call", call_id = %call_id);
    async move {
        info!("call started");
        let end = match Call::new(call_id.clone(), shared) {
            Ok(mut call) => call.run(&mut reader, &mut writer, &mut shutdown).await,
            Err(e) => CallEnd::Error(format!("cannot start the call's engines: {e:#}")),
        };
        close(&mut writer, &end).await;
        end
    }
    .instrument(span)
    .await
}

/// Logs how the call ended and closes the socket: a hangup frame and a FIN when the agent
/// ends the call, a FIN when the caller did (never a reset).
async fn close<W: AsyncWrite + Unpin>(writer: &mut FrameWriter<W>, end: &CallEnd) {
    match end {
        CallEnd::Error(msg) => {
            error!("call ended by error: {msg}");
            let _ = writer.hangup().await;
        }
        CallEnd::AgentHangup => {
            let _ = writer.hangup().await;
            info!("call ended: agent hung up");
        }
        CallEnd::CallerHangup => {
            let _ = writer.shutdown().await;
            info!("call ended: caller hung up");
        }
    }
}

async fn fail<W: AsyncWrite + Unpin>(writer: &mut FrameWriter<W>, msg: String, call_id: &str) -> CallEnd {
    error!(call_id, "{msg}");
    let _ = writer.hangup().await;
    CallEnd::Error(msg)
}

/// A piece of agent audio waiting to be played.
struct Segment {
    turn: u64,
    rate: AudioRate,
    samples: Arc<Vec<i16>>,
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
    /// Sentences whose audio has started playing.
    played: Vec<String>,
    /// The whole reply text, once generation ended.
    full_text: Option<String>,
}

enum ReplyEvent {
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
    },
    Failed {
        turn: u64,
        error: String,
    },
}

struct Call {
    id: String,
    shared: Arc<Shared>,
    vad: Vad,
    stt: SttStream,
    stt_rx: mpsc::UnboundedReceiver<SttResult>,
    llm: LlmSession,
    history: Vec<Message>,
    queue: VecDeque<Segment>,
    turn: Option<Turn>,
    next_turn: u64,
    reply_tx: mpsc::UnboundedSender<ReplyEvent>,
    reply_rx: mpsc::UnboundedReceiver<ReplyEvent>,
    /// The rate of the caller's audio, once seen; the agent answers at the same rate.
    in_rate: Option<AudioRate>,
    out_rate: AudioRate,
    ulaw: UlawDetector,
    encoding: Encoding,
    pre_roll: VecDeque<Vec<i16>>,
    pre_roll_samples: usize,
}

impl Call {
    fn new(id: String, shared: Arc<Shared>) -> anyhow::Result<Call> {
        let cfg = &shared.cfg;
        // Caller audio is resampled to the STT rate on the STT thread; until the first audio
        // frame we assume the application's 8 kHz.
        let (stt, stt_rx) = shared.engines.stt.start_stream(&id, 8000)?;
        let llm = LlmSession::start(shared.engines.llm.clone(), &id)?;
        let history = vec![
            Message {
                role: Role::System,
                text: cfg.agent.system_prompt.clone(),
            },
            Message {
                role: Role::Assistant,
                text: cfg.agent.greeting.clone(),
            },
        ];
        // Evaluate the system prompt and greeting while the greeting plays.
        llm.warm(history.clone());
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        Ok(Call {
            vad: Vad::new(&cfg.vad),
            stt,
            stt_rx,
            llm,
            history,
            queue: VecDeque::new(),
            turn: None,
            next_turn: 1,
            reply_tx,
            reply_rx,
            in_rate: None,
            out_rate: AudioRate::Slin8,
            ulaw: UlawDetector::default(),
            encoding: Encoding::Unknown,
            pre_roll: VecDeque::new(),
            pre_roll_samples: 0,
            id,
            shared,
        })
    }

    async fn run<R, W>(
        &mut self,
        reader: &mut FrameReader<R>,
        writer: &mut FrameWriter<W>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> CallEnd
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // The greeting was synthesized at start-up: queue it before the first tick.
        match self
            .shared
            .engines
            .tts
            .cached(&self.shared.cfg.agent.greeting, self.out_rate.hz())
            .await
        {
            Ok(samples) => self.queue.push_back(Segment {
                turn: 0,
                rate: self.out_rate,
                samples,
                pos: 0,
                text: self.shared.cfg.agent.greeting.clone(),
            }),
            Err(e) => error!("greeting unavailable: {e:#}"),
        }
        let mut tick = tokio::time::interval(Duration::from_millis(FRAME_MS));
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut frame_buf = Vec::with_capacity(AudioRate::Slin48.samples_per_20ms());
        loop {
            tokio::select! {
                biased;
                _ = tick.tick() => {
                    let rate = self.next_frame(&mut frame_buf);
                    if let Err(e) = writer.write_samples(rate, &frame_buf).await {
                        return CallEnd::Error(format!("cannot write to Asterisk: {e}"));
                    }
                }
                frame = reader.read_frame() => match frame {
                    Ok(Some(frame)) => if let Err(end) = self.on_frame(frame) { return end; },
                    Ok(None) => return CallEnd::CallerHangup,
                    Err(ConnectionError::Truncated(n)) => return CallEnd::Error(format!("truncated frame: the connection closed with {n} bytes of an incomplete frame")),
                    Err(e) => return CallEnd::Error(format!("{e}")),
                },
                Some(result) = self.stt_rx.recv() => self.on_transcript(result),
                Some(ev) = self.reply_rx.recv() => self.on_reply(ev),
                _ = shutdown.changed() => return CallEnd::AgentHangup,
            }
        }
    }

    /// Fills `buf` with the next 20 ms of agent audio (or silence) and returns its rate.
    fn next_frame(&mut self, buf: &mut Vec<i16>) -> AudioRate {
        buf.clear();
        let Some(seg) = self.queue.front_mut() else {
            buf.resize(self.out_rate.samples_per_20ms(), 0);
            return self.out_rate;
        };
        let rate = seg.rate;
        let n = rate.samples_per_20ms();
        if seg.pos == 0 {
            if let Some(turn) = self.turn.as_mut().filter(|t| t.id == seg.turn) {
                turn.played.push(seg.text.clone());
            }
        }
        let end = (seg.pos + n).min(seg.samples.len());
        buf.extend_from_slice(&seg.samples[seg.pos..end]);
        buf.resize(n, 0);
        seg.pos = end;
        if seg.pos >= seg.samples.len() {
            self.queue.pop_front();
            self.maybe_finish_turn();
        }
        rate
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
                    self.set_in_rate(rate);
                }
                self.on_audio(samples, rate.hz());
            }
            Frame::Dtmf(d) => info!(digit = %d, "DTMF digit"),
            Frame::Hangup => return Err(CallEnd::CallerHangup),
            Frame::Error(code) => return Err(CallEnd::Error(format!("Asterisk sent an error frame (code {code:?})"))),
            Frame::Id(u) => warn!("ignoring a second id frame ({u})"),
        }
        Ok(())
    }

    fn set_in_rate(&mut self, rate: AudioRate) {
        info!(rate_hz = rate.hz(), "caller audio rate");
        if self.in_rate.is_some() || rate.hz() != 8000 {
            // Recreate the recognizer for the new input rate.
            match self.shared.engines.stt.start_stream(&self.id, rate.hz()) {
                Ok((stt, rx)) => {
                    self.stt = stt;
                    self.stt_rx = rx;
                }
                Err(e) => error!("cannot restart STT at {} Hz: {e:#}", rate.hz()),
            }
        }
        self.in_rate = Some(rate);
        self.out_rate = rate;
        self.pre_roll.clear();
        self.pre_roll_samples = 0;
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
            VadEvent::None => self.stt.audio(samples),
            VadEvent::SpeechStart { onset_ms } => {
                debug!(onset_ms, "speech started");
                for f in self.pre_roll.drain(..) {
                    self.stt.audio(f);
                }
                self.pre_roll_samples = 0;
                self.stt.audio(samples);
                if self.shared.cfg.barge_in.enabled {
                    self.barge_in();
                }
            }
            VadEvent::SpeechEnd(reason) => {
                debug!(?reason, "speech ended");
                self.stt.audio(samples);
                self.stt.finish();
            }
        }
    }

    /// Caller speech while the agent talks or thinks: drop queued audio, cancel the reply and
    /// keep in the history only what the caller heard.
    fn barge_in(&mut self) {
        let greeting_playing = self.queue.iter().any(|s| s.turn == 0);
        if self.turn.is_none() && !greeting_playing {
            return;
        }
        let dropped_ms: usize = self
            .queue
            .iter()
            .map(|s| (s.samples.len() - s.pos) * 1000 / s.rate.hz() as usize)
            .sum();
        self.queue.clear();
        if let Some(turn) = self.turn.take() {
            turn.cancel.store(true, Ordering::Relaxed);
            info!(dropped_ms, "barge-in: agent stopped");
            self.finish_turn(turn, true);
        } else {
            info!(dropped_ms, "barge-in during the greeting");
        }
    }

    fn on_transcript(&mut self, result: SttResult) {
        let text = result.text.trim().to_string();
        info!(stt_final_ms = result.finish_ms, text = %text, "caller utterance");
        if text.is_empty() {
            return;
        }
        self.shared
            .log
            .write(Entry::now(&self.id, Speaker::Caller, text.clone()));
        // A reply still being generated for an earlier utterance is superseded.
        if let Some(turn) = self.turn.take() {
            turn.cancel.store(true, Ordering::Relaxed);
            self.queue.retain(|s| s.turn != turn.id);
            self.finish_turn(turn, true);
        }
        self.history.push(Message { role: Role::User, text });
        let turn_id = self.next_turn;
        self.next_turn += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        let keep = 1 + 2 * self.shared.cfg.agent.history_turns;
        if self.history.len() > keep {
            self.history.drain(1..self.history.len() - keep + 1);
        }
        let llm_rx = self.llm.generate(
            self.history.clone(),
            self.shared.cfg.agent.max_reply_tokens,
            cancel.clone(),
        );
        let t_final = Instant::now();
        tokio::spawn(reply(
            self.shared.engines.tts.clone(),
            llm_rx,
            self.out_rate,
            turn_id,
            t_final,
            self.reply_tx.clone(),
            cancel.clone(),
        ));
        self.turn = Some(Turn {
            id: turn_id,
            cancel,
            t_final,
            timings: TurnTimings {
                stt_final_ms: result.finish_ms,
                ..Default::default()
            },
            played: Vec::new(),
            full_text: None,
        });
    }

    fn on_reply(&mut self, ev: ReplyEvent) {
        let current = self.turn.as_ref().map(|t| t.id);
        match ev {
            ReplyEvent::FirstToken { turn, ms } if Some(turn) == current => {
                self.turn.as_mut().unwrap().timings.llm_first_token_ms = Some(ms);
            }
            ReplyEvent::Audio {
                turn,
                text,
                samples,
                rate,
            } if Some(turn) == current => {
                let t = self.turn.as_mut().unwrap();
                if t.timings.tts_first_audio_ms.is_none() {
                    t.timings.tts_first_audio_ms = Some(t.t_final.elapsed().as_millis() as u64);
                }
                self.queue.push_back(Segment {
                    turn,
                    rate,
                    samples: Arc::new(samples),
                    pos: 0,
                    text,
                });
            }
            ReplyEvent::Done { turn, text } if Some(turn) == current => {
                self.turn.as_mut().unwrap().full_text = Some(text);
                self.maybe_finish_turn();
            }
            ReplyEvent::Failed { turn, error } if Some(turn) == current => {
                error!("reply failed: {error}");
                let t = self.turn.as_mut().unwrap();
                t.full_text = Some(t.played.join(" "));
                self.maybe_finish_turn();
            }
            _ => {} // an event of a cancelled turn
        }
    }

    fn maybe_finish_turn(&mut self) {
        let Some(turn) = &self.turn else { return };
        if turn.full_text.is_some() && !self.queue.iter().any(|s| s.turn == turn.id) {
            let turn = self.turn.take().unwrap();
            self.finish_turn(turn, false);
        }
    }

    /// Logs an agent turn and adds it to the history: the whole reply, or when `interrupted`,
    /// the sentences the caller heard.
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
            interrupted,
            text = %text,
            "agent turn"
        );
        if !text.is_empty() {
            self.history.push(Message {
                role: Role::Assistant,
                text: text.clone(),
            });
        }
        let mut entry = Entry::now(&self.id, Speaker::Agent, text);
        entry.timings = Some(turn.timings);
        entry.interrupted = interrupted;
        self.shared.log.write(entry);
    }
}

/// One reply: reads the LLM's tokens, cuts them into sentences and synthesizes each as soon
/// as it is complete, sending the audio to the call task.
async fn reply(
    tts: Arc<TtsEngine>,
    mut llm_rx: mpsc::UnboundedReceiver<LlmEvent>,
    rate: AudioRate,
    turn: u64,
    t_final: Instant,
    tx: mpsc::UnboundedSender<ReplyEvent>,
    cancel: Arc<AtomicBool>,
) {
    let mut splitter = SentenceSplitter::default();
    let mut full = String::new();
    let mut first = true;
    let speak = |sentence: String| {
        let tts = tts.clone();
        let tx = tx.clone();
        let cancel = cancel.clone();
        async move {
            if cancel.load(Ordering::Relaxed) {
                return;
            }
            match tts.synthesize(&sentence, rate.hz()).await {
                Ok(speech) => {
                    let _ = tx.send(ReplyEvent::Audio {
                        turn,
                        text: sentence,
                        samples: speech.samples,
                        rate,
                    });
                }
                Err(e) => error!("TTS failed for {sentence:?}: {e:#}"),
            }
        }
    };
    while let Some(ev) = llm_rx.recv().await {
        match ev {
            LlmEvent::Token(t) => {
                if first {
                    first = false;
                    let _ = tx.send(ReplyEvent::FirstToken {
                        turn,
                        ms: t_final.elapsed().as_millis() as u64,
                    });
                }
                full.push_str(&t);
                for sentence in splitter.push(&t) {
                    speak(sentence).await;
                }
            }
            LlmEvent::Done(stats) => {
                if let Some(rest) = splitter.finish() {
                    speak(rest).await;
                }
                debug!(?stats, "LLM turn done");
                let _ = tx.send(ReplyEvent::Done {
                    turn,
                    text: full.trim().to_string(),
                });
                return;
            }
            LlmEvent::Error(e) => {
                let _ = tx.send(ReplyEvent::Failed { turn, error: e });
                return;
            }
        }
    }
    let _ = tx.send(ReplyEvent::Failed {
        turn,
        error: "LLM stream ended without a result".into(),
    });
}
