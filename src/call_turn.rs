//! The call's side of the end-of-turn policy (issue 8): `turn.rs` decides, these carry out its
//! actions with the engines (the Smart Turn model, STT's text so far, the reply job) and keep
//! the speculative reply out of the log and the history until it is committed. A child module
//! of `call`, so it reaches the call's state.

use super::{Call, TurnMsg};
use crate::conversation::TurnTimings;
use crate::llm::{Message, Role};
use crate::turn;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::{debug, info, warn, Instrument};

impl Call {
    /// Keeps the caller's current utterance (at most the last 8 s) for the turn model.
    pub(super) fn keep_utterance(&mut self, samples: &[i16], rate_hz: u32) {
        if self.shared.engines.turn.is_none() {
            return;
        }
        self.utterance.extend(samples.iter().copied());
        let max = rate_hz as usize * crate::smart_turn::WINDOW_S;
        if self.utterance.len() > max {
            let extra = self.utterance.len() - max;
            self.utterance.drain(..extra);
        }
    }

    /// The VAD's end-of-silence timer in this call's mode (ms).
    pub(super) fn vad_end_silence_ms(&self) -> u32 {
        match self.shared.cfg.turn.mode {
            crate::config::TurnMode::Smart => self.shared.cfg.turn.max_end_silence_ms,
            crate::config::TurnMode::Silence => self.shared.cfg.vad.end_silence_ms,
        }
    }

    /// The LLM may take a prefill now: a session with a local KV cache exists (not the OpenAI
    /// backend, where a prefill would do nothing and asking Vosk for partials would be waste),
    /// no reply is in flight or playing, and Vosk keeps up with the caller
    /// ([`crate::prefill::MAX_STT_BACKLOG_MS`]).
    fn prefill_idle(&self) -> bool {
        self.llm.as_ref().is_some_and(|l| l.has_kv_cache())
            && self.turn.is_none()
            && self.queue.is_empty()
            && self.ending.is_none()
            && self.stt_keeps_up()
    }

    /// Vosk is at most [`crate::prefill::MAX_STT_BACKLOG_MS`] behind the caller: work at a
    /// pause (a prefill, the speculative reply's final decode) would not starve it.
    fn stt_keeps_up(&self) -> bool {
        self.stt.backlog_ms() <= crate::prefill::MAX_STT_BACKLOG_MS
    }

    /// Counts `audio_ms` of the open utterance toward the next prefill, and asks STT for the
    /// text so far when one is due (src/prefill.rs).
    pub(super) fn maybe_prefill(&mut self, audio_ms: u32) {
        let idle = self.prefill_idle();
        let silence_ms = self.vad.trailing_silence_ms();
        if !self.prefill.audio(audio_ms, silence_ms, idle) {
            return;
        }
        let rx = self.stt.partial_text();
        let tx = self.turn_tx.clone();
        tokio::spawn(async move {
            // A dropped request (the call's STT ended) leaves the policy asking: no more
            // prefills in this call, which is over anyway.
            if let Ok(text) = rx.await {
                let _ = tx.send(TurnMsg::Partial { text });
            }
        });
    }

    /// The reply's prompt if the caller's turn were `text`: the history, then `text`, trimmed
    /// to `agent.history_turns` as `start_reply` does.
    pub(super) fn prompt_with(&self, text: &str) -> Vec<Message> {
        let mut messages = self.history.clone();
        messages.push(Message {
            role: Role::User,
            text: text.to_string(),
        });
        super::trim_messages(&mut messages, self.shared.cfg.agent.history_turns);
        messages
    }

    /// The caller's turn `text` enters the history, trimmed to `agent.history_turns`: what
    /// [`Self::prompt_with`] computes without keeping it.
    pub(super) fn commit_user_turn(&mut self, text: String) {
        self.history.push(Message { role: Role::User, text });
        super::trim_messages(&mut self.history, self.shared.cfg.agent.history_turns);
    }

    pub(super) fn is_speculative(&self) -> bool {
        self.turn.as_ref().is_some_and(|t| t.speculative.is_some())
    }

    /// Feeds the policy one event and carries out what it asks.
    pub(super) fn turn_event(&mut self, ev: turn::Event) {
        for action in self.policy.on(ev) {
            self.apply_turn(action);
        }
    }

    pub(super) fn on_turn_msg(&mut self, msg: TurnMsg) {
        match msg {
            TurnMsg::Verdict { pause, result } => match result {
                Ok(v) => {
                    info!(
                        probability = v.probability,
                        inference_ms = v.ms,
                        silence_ms = self.vad.trailing_silence_ms(),
                        "turn model verdict"
                    );
                    self.turn_event(turn::Event::Verdict {
                        pause,
                        probability: v.probability,
                    });
                }
                // The silence timer still ends the turn.
                Err(e) => warn!("the turn model failed: {e:#}"),
            },
            TurnMsg::Partial { text } => {
                let idle = self.prefill_idle();
                let Some(text) = self.prefill.partial(&text, idle) else {
                    return;
                };
                let Some(llm) = self.llm.clone() else {
                    self.prefill.prefilled();
                    return;
                };
                let rx = llm.prefill(self.prompt_with(&text));
                let tx = self.turn_tx.clone();
                let started = Instant::now();
                tokio::spawn(async move {
                    let _ = rx.await;
                    let _ = tx.send(TurnMsg::Prefilled {
                        ms: started.elapsed().as_millis() as u64,
                    });
                });
            }
            TurnMsg::Prefilled { ms } => {
                debug!(ms, "LLM prefilled with the caller's words so far");
                self.prefill.prefilled();
            }
            TurnMsg::TextSoFar { pause, text } => {
                debug!(
                    pause,
                    chars = text.trim().chars().count(),
                    silence_ms = self.vad.trailing_silence_ms(),
                    "text so far"
                );
                self.turn_event(turn::Event::TextSoFar {
                    pause,
                    text: text.trim().to_string(),
                })
            }
        }
    }

    pub(super) fn apply_turn(&mut self, action: turn::Action) {
        match action {
            turn::Action::AskTurnModel { pause } => {
                let Some(model) = self.shared.engines.turn.clone() else {
                    return;
                };
                let samples: Vec<i16> = self.utterance.iter().copied().collect();
                let rate_hz = self.in_rate.map_or(8000, |r| r.hz());
                let tx = self.turn_tx.clone();
                tokio::spawn(
                    async move {
                        let result = crate::smart_turn::predict_async(model, samples, rate_hz).await;
                        let _ = tx.send(TurnMsg::Verdict { pause, result });
                    }
                    .in_current_span(),
                );
            }
            turn::Action::AskTextSoFar { pause } => {
                if !self.stt_keeps_up() {
                    // Vosk's final decode at the pause would put it further behind the caller
                    // (at 4 calls on 2 cores it starved the recognizers), and its text would
                    // come after the turn is decided anyway: no speculative reply this pause.
                    let backlog_ms = self.stt.backlog_ms();
                    debug!(pause, backlog_ms, "STT is behind the caller: no speculative reply");
                    return;
                }
                debug!(
                    pause,
                    silence_ms = self.vad.trailing_silence_ms(),
                    "asking STT for the text so far"
                );
                let rx = self.stt.text_so_far();
                let tx = self.turn_tx.clone();
                tokio::spawn(async move {
                    if let Ok(text) = rx.await {
                        let _ = tx.send(TurnMsg::TextSoFar { pause, text });
                    }
                });
            }
            turn::Action::EndTurn(turn::EndWhy::Model) => {
                let silence_ms = self.vad.trailing_silence_ms();
                if self.vad.end_now() {
                    info!(silence_ms, "end of turn: the turn model says the caller has finished");
                    self.on_speech_end(Vec::new(), crate::vad::EndReason::Endpoint, silence_ms);
                }
            }
            // The VAD's own endpoint: `on_speech_end` is already handling it.
            turn::Action::EndTurn(turn::EndWhy::Silence) => {}
            turn::Action::StartSpeculative { text } => self.start_speculative(text),
            turn::Action::DropSpeculative => self.drop_speculative(),
            // Only come with the final transcript (`on_transcript`).
            turn::Action::CommitSpeculative | turn::Action::StartReply { .. } => {}
        }
    }

    /// Starts a reply to the caller's text so far that plays nothing until committed. Not
    /// while the agent is still busy with an earlier reply or the call is ending.
    pub(super) fn start_speculative(&mut self, text: String) {
        if self.turn.is_some() || !self.queue.is_empty() || self.ending.is_some() {
            return;
        }
        debug!(text = %text, "speculative reply started");
        let messages = self.prompt_with(&text);
        self.spawn_reply(messages, TurnTimings::default(), Some(text));
    }

    /// Cancels the speculative reply: nothing of it is logged or enters the history, and the
    /// next generation from the committed history drops its tokens from the KV cache (llm.rs
    /// keeps only the longest common prefix).
    pub(super) fn drop_speculative(&mut self) {
        if !self.is_speculative() {
            return;
        }
        let turn = self.turn.take().expect("checked");
        turn.cancel.store(true, Ordering::Relaxed);
        self.speculative_dropped += 1;
        info!(
            dropped = self.speculative_dropped,
            text = %turn.speculative.unwrap_or_default(),
            "speculative reply dropped"
        );
    }

    /// Plays the speculative reply if it answers exactly `text`; false when there is none.
    /// `decided`: as for `start_reply`.
    pub(super) fn commit_speculative(&mut self, text: &str, stt_final_ms: u64, decided: Option<u64>) -> bool {
        let Some(t) = self.turn.as_mut().filter(|t| t.speculative.as_deref() == Some(text)) else {
            self.drop_speculative();
            return false;
        };
        t.speculative = None;
        t.timings.stt_final_ms = stt_final_ms;
        t.timings.turn_decided_ms = decided;
        t.timings.speculative = true;
        // LLM and TTS figures count from the commit: 0 for what was ready already.
        t.t_final = Instant::now();
        if t.timings.llm_first_token_ms.is_some() {
            t.timings.llm_first_token_ms = Some(0);
        }
        let held = std::mem::take(&mut t.held);
        if !held.is_empty() {
            t.audio_queued = true;
            t.timings.tts_first_audio_ms = Some(0);
            self.filler_due = None;
            self.dead_air.replied();
        }
        info!(ready_sentences = held.len(), "speculative reply committed");
        self.queue.extend(held);
        self.commit_user_turn(text.to_string());
        self.maybe_finish_turn();
        true
    }
}
