//! The end-of-turn policy: decides when the caller's turn is over and what happens to a reply
//! prepared during the pause. No I/O, no models, no clock: the call feeds it events (VAD onset,
//! trailing silence, the turn model's verdict, the text so far, the final transcript) and
//! carries out the actions it returns. Unit tests drive it with scripted event tables.
//!
//! Two modes (`[turn] mode`):
//! - `silence`: the turn ends after `vad.end_silence_ms` of silence (the VAD's own endpoint).
//! - `smart`: at `min_pause_ms` of silence the turn model (Smart Turn) is asked; a probability
//!   >= `threshold` ends the turn at once, a lower one keeps listening and asks again after
//!   another `min_pause_ms`; `max_end_silence_ms` of silence always ends it (the VAD's
//!   endpoint, which the call sets to that value in this mode).
//!
//! Speculative reply (`[turn] speculative`): at the first pause that may be the end the
//! policy asks for the text so far and starts a reply from it that plays nothing. When the
//! final transcript equals that text the reply is committed (its audio plays, the caller's text
//! enters the history); when it differs, or the caller goes on talking, it is dropped.

use crate::config::{TurnConfig, TurnMode};

/// What the call tells the policy.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The VAD saw the caller's speech start (an utterance opened).
    SpeechStart,
    /// Caller audio was pushed while the utterance is open; `ms` is the VAD's trailing
    /// silence (0 while the caller speaks).
    Silence {
        /// Milliseconds of non-speech since the last voiced frame.
        ms: u32,
    },
    /// The turn model's answer to [`Action::AskTurnModel`] with the same `pause`.
    Verdict {
        /// The pause it was asked for.
        pause: u64,
        /// Probability (0..1) that the turn is complete.
        probability: f32,
    },
    /// The text recognized so far, answering [`Action::AskTextSoFar`].
    TextSoFar {
        /// The pause it was asked for.
        pause: u64,
        /// What STT heard up to the pause (trimmed; may be empty).
        text: String,
    },
    /// The VAD closed the utterance itself (its end-of-silence timer, or the length limit).
    VadEnd,
    /// The utterance was dropped as noise (too short, an echo, a cough during agent audio).
    Discarded,
    /// The final transcript of the turn arrived.
    Final {
        /// What STT heard (trimmed; may be empty).
        text: String,
    },
}

/// Why the turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndWhy {
    /// The turn model said the turn is complete.
    Model,
    /// The VAD's silence timer (the only reason in `silence` mode; the fallback in `smart`).
    Silence,
}

/// What the policy asks the call to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Run the turn model on the caller's audio so far; answer with [`Event::Verdict`].
    AskTurnModel {
        /// Pause id to answer with.
        pause: u64,
    },
    /// Get the text recognized so far without ending the utterance; answer with
    /// [`Event::TextSoFar`].
    AskTextSoFar {
        /// Pause id to answer with.
        pause: u64,
    },
    /// The caller's turn is over: finish recognition (the final transcript follows).
    EndTurn(EndWhy),
    /// Start a reply to `text` that plays nothing until committed.
    StartSpeculative {
        /// The caller's text so far.
        text: String,
    },
    /// Drop the speculative reply: cancel it; nothing of it reaches the log or the history.
    DropSpeculative,
    /// The final transcript equals the speculative reply's text: play it, record it.
    CommitSpeculative,
    /// Start the reply to the final transcript (the usual path).
    StartReply {
        /// The final transcript.
        text: String,
    },
}

/// The policy's state for one call.
#[derive(Debug)]
pub struct TurnPolicy {
    mode: TurnMode,
    min_pause_ms: u32,
    threshold: f32,
    speculative: bool,
    /// An utterance is open (between onset and end of turn).
    open: bool,
    /// Id of the current pause (bumped whenever speech resumes after silence).
    pause: u64,
    /// The trailing silence of the last `Silence` event.
    last_silence_ms: u32,
    /// Silence (ms) at which the model was last asked in this pause.
    asked_at_ms: Option<u32>,
    /// A verdict is awaited for this pause.
    awaiting: Option<u64>,
    /// The text so far was asked for in this pause.
    text_asked: Option<u64>,
    /// The speculative reply in flight: the text it answers.
    spec: Option<String>,
    /// Turn ended; waiting for the final transcript.
    ended: bool,
}

impl TurnPolicy {
    /// A policy with the config's settings.
    pub fn new(cfg: &TurnConfig) -> TurnPolicy {
        TurnPolicy {
            mode: cfg.mode,
            min_pause_ms: cfg.min_pause_ms.max(20),
            threshold: cfg.threshold,
            speculative: cfg.speculative,
            open: false,
            pause: 0,
            last_silence_ms: 0,
            asked_at_ms: None,
            awaiting: None,
            text_asked: None,
            spec: None,
            ended: false,
        }
    }

    /// True while a speculative reply is in flight (started, not yet committed or dropped).
    pub fn has_speculative(&self) -> bool {
        self.spec.is_some()
    }

    /// Feeds one event; returns the actions to carry out, in order.
    pub fn on(&mut self, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match ev {
            Event::SpeechStart => {
                if self.ended {
                    // A new utterance before the last one's final transcript: that transcript
                    // gets the usual reply, this one is a new turn.
                    self.ended = false;
                }
                self.open = true;
                self.new_pause(&mut out);
            }
            Event::Silence { ms } => {
                if !self.open || self.ended {
                    return out;
                }
                if ms < self.last_silence_ms || (ms == 0 && self.last_silence_ms > 0) {
                    // The caller went on: a new pause will come.
                    self.new_pause(&mut out);
                }
                self.last_silence_ms = ms;
                if self.mode == TurnMode::Smart && ms >= self.min_pause_ms && self.awaiting.is_none() {
                    let due = match self.asked_at_ms {
                        None => true,
                        Some(at) => ms >= at + self.min_pause_ms,
                    };
                    if due {
                        self.asked_at_ms = Some(ms);
                        self.awaiting = Some(self.pause);
                        out.push(Action::AskTurnModel { pause: self.pause });
                    }
                }
                if self.speculative
                    && ms >= self.min_pause_ms
                    && self.spec.is_none()
                    && self.text_asked != Some(self.pause)
                {
                    self.text_asked = Some(self.pause);
                    out.push(Action::AskTextSoFar { pause: self.pause });
                }
            }
            Event::Verdict { pause, probability } => {
                if self.awaiting == Some(pause) {
                    self.awaiting = None;
                }
                if pause == self.pause && self.open && !self.ended && probability >= self.threshold {
                    self.end(EndWhy::Model, &mut out);
                }
            }
            Event::TextSoFar { pause, text } => {
                let live = pause == self.pause && self.open && self.last_silence_ms > 0;
                if live && self.spec.is_none() && !text.is_empty() {
                    self.spec = Some(text.clone());
                    out.push(Action::StartSpeculative { text });
                }
            }
            Event::VadEnd => {
                if self.open && !self.ended {
                    self.end(EndWhy::Silence, &mut out);
                }
            }
            Event::Discarded => {
                self.open = false;
                self.new_pause(&mut out);
            }
            Event::Final { text } => {
                self.ended = false;
                match self.spec.take() {
                    Some(spec) if spec == text => out.push(Action::CommitSpeculative),
                    Some(_) => {
                        out.push(Action::DropSpeculative);
                        out.push(Action::StartReply { text });
                    }
                    None => out.push(Action::StartReply { text }),
                }
            }
        }
        out
    }

    fn new_pause(&mut self, out: &mut Vec<Action>) {
        self.pause += 1;
        self.last_silence_ms = 0;
        self.asked_at_ms = None;
        self.awaiting = None;
        if self.spec.take().is_some() {
            out.push(Action::DropSpeculative);
        }
    }

    fn end(&mut self, why: EndWhy, out: &mut Vec<Action>) {
        self.open = false;
        self.ended = true;
        self.awaiting = None;
        out.push(Action::EndTurn(why));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;
    use Event::*;

    fn cfg(mode: TurnMode, speculative: bool) -> TurnConfig {
        TurnConfig {
            mode,
            min_pause_ms: 200,
            threshold: 0.5,
            max_end_silence_ms: 1200,
            speculative,
            ..Default::default()
        }
    }

    /// Runs a table of (event, expected actions) rows.
    fn run(p: &mut TurnPolicy, rows: Vec<(Event, Vec<Action>)>) {
        for (i, (ev, want)) in rows.into_iter().enumerate() {
            let got = p.on(ev.clone());
            assert_eq!(got, want, "row {i}: {ev:?}");
        }
    }

    fn silence(ms: u32) -> Event {
        Silence { ms }
    }

    #[test]
    fn smart_ends_the_turn_when_the_model_says_so() {
        let mut p = TurnPolicy::new(&cfg(TurnMode::Smart, false));
        run(
            &mut p,
            vec![
                (SpeechStart, vec![]),
                (silence(0), vec![]),
                (silence(100), vec![]),
                (silence(200), vec![AskTurnModel { pause: 1 }]),
                // no second question while one is out
                (silence(220), vec![]),
                (
                    Verdict {
                        pause: 1,
                        probability: 0.9,
                    },
                    vec![EndTurn(EndWhy::Model)],
                ),
                // later silence and the VAD's own end change nothing
                (silence(400), vec![]),
                (VadEnd, vec![]),
                (
                    Final { text: "hello".into() },
                    vec![StartReply { text: "hello".into() }],
                ),
            ],
        );
    }

    #[test]
    fn smart_keeps_listening_on_a_low_verdict_and_asks_again() {
        let mut p = TurnPolicy::new(&cfg(TurnMode::Smart, false));
        run(
            &mut p,
            vec![
                (SpeechStart, vec![]),
                (silence(200), vec![AskTurnModel { pause: 1 }]),
                (
                    Verdict {
                        pause: 1,
                        probability: 0.2,
                    },
                    vec![],
                ),
                (silence(300), vec![]),
                (silence(400), vec![AskTurnModel { pause: 1 }]),
                // the caller goes on: the late verdict of the old pause is ignored
                (silence(0), vec![]),
                (
                    Verdict {
                        pause: 1,
                        probability: 0.99,
                    },
                    vec![],
                ),
                (silence(200), vec![AskTurnModel { pause: 2 }]),
                (
                    Verdict {
                        pause: 2,
                        probability: 0.1,
                    },
                    vec![],
                ),
                // the fallback timer always ends it
                (VadEnd, vec![EndTurn(EndWhy::Silence)]),
            ],
        );
    }

    #[test]
    fn silence_mode_never_asks_the_model() {
        let mut p = TurnPolicy::new(&cfg(TurnMode::Silence, false));
        let mut rows: Vec<(Event, Vec<Action>)> = vec![(SpeechStart, vec![])];
        rows.extend((0..40).map(|i| (silence(i * 20), vec![])));
        rows.push((VadEnd, vec![EndTurn(EndWhy::Silence)]));
        rows.push((Final { text: "x".into() }, vec![StartReply { text: "x".into() }]));
        run(&mut p, rows);
    }

    #[test]
    fn speculative_reply_committed_when_the_text_holds() {
        let mut p = TurnPolicy::new(&cfg(TurnMode::Smart, true));
        run(
            &mut p,
            vec![
                (SpeechStart, vec![]),
                (silence(200), vec![AskTurnModel { pause: 1 }, AskTextSoFar { pause: 1 }]),
                (
                    TextSoFar {
                        pause: 1,
                        text: "what time do you open".into(),
                    },
                    vec![StartSpeculative {
                        text: "what time do you open".into(),
                    }],
                ),
                (
                    Verdict {
                        pause: 1,
                        probability: 0.8,
                    },
                    vec![EndTurn(EndWhy::Model)],
                ),
                (
                    Final {
                        text: "what time do you open".into(),
                    },
                    vec![CommitSpeculative],
                ),
            ],
        );
        assert!(!p.has_speculative());
    }

    #[test]
    fn speculative_reply_dropped_when_the_caller_goes_on() {
        let mut p = TurnPolicy::new(&cfg(TurnMode::Smart, true));
        run(
            &mut p,
            vec![
                (SpeechStart, vec![]),
                (silence(200), vec![AskTurnModel { pause: 1 }, AskTextSoFar { pause: 1 }]),
                (
                    TextSoFar {
                        pause: 1,
                        text: "I would like".into(),
                    },
                    vec![StartSpeculative {
                        text: "I would like".into(),
                    }],
                ),
                (
                    Verdict {
                        pause: 1,
                        probability: 0.1,
                    },
                    vec![],
                ),
                // speech again: drop it
                (silence(0), vec![DropSpeculative]),
                (silence(40), vec![]),
                (silence(200), vec![AskTurnModel { pause: 2 }, AskTextSoFar { pause: 2 }]),
                // the old pause's text comes too late to start anything
                (
                    TextSoFar {
                        pause: 1,
                        text: "I would like".into(),
                    },
                    vec![],
                ),
                (
                    TextSoFar {
                        pause: 2,
                        text: "I would like a table".into(),
                    },
                    vec![StartSpeculative {
                        text: "I would like a table".into(),
                    }],
                ),
                (
                    Verdict {
                        pause: 2,
                        probability: 0.7,
                    },
                    vec![EndTurn(EndWhy::Model)],
                ),
                // the final differs: drop and start again from it
                (
                    Final {
                        text: "I would like a table for two".into(),
                    },
                    vec![
                        DropSpeculative,
                        StartReply {
                            text: "I would like a table for two".into(),
                        },
                    ],
                ),
            ],
        );
    }

    #[test]
    fn empty_text_so_far_starts_nothing_and_a_new_onset_drops() {
        let mut p = TurnPolicy::new(&cfg(TurnMode::Silence, true));
        run(
            &mut p,
            vec![
                (SpeechStart, vec![]),
                (silence(200), vec![AskTextSoFar { pause: 1 }]),
                (
                    TextSoFar {
                        pause: 1,
                        text: String::new(),
                    },
                    vec![],
                ),
                (silence(0), vec![]),
                (silence(200), vec![AskTextSoFar { pause: 2 }]),
                (
                    TextSoFar {
                        pause: 2,
                        text: "yes".into(),
                    },
                    vec![StartSpeculative { text: "yes".into() }],
                ),
                (silence(220), vec![]),
                (SpeechStart, vec![DropSpeculative]),
            ],
        );
    }
}
