//! What the console prints for each call event: the agent's state, the live transcript of both
//! sides and each reply's stage timings (or, with `--json`, the event itself as one JSON line).
//! Text only, no I/O: [`Screen::lines`] turns an event into the lines to print.

use crate::conversation::Speaker;
use crate::events::{CallEvent, CallEventKind, CallState};

/// Turns call events into terminal lines.
#[derive(Debug)]
pub struct Screen {
    greeting: String,
    greeting_shown: bool,
}

impl Screen {
    /// A screen for a call whose greeting is `greeting` (the greeting is played, not logged as
    /// an utterance, so the screen shows it when the agent first speaks).
    pub fn new(greeting: &str) -> Screen {
        Screen {
            greeting: greeting.to_string(),
            greeting_shown: false,
        }
    }

    /// The lines to print for `ev` (none for events with nothing new to show).
    pub fn lines(&mut self, ev: &CallEvent) -> Vec<String> {
        match &ev.kind {
            CallEventKind::Started { .. } => vec![format!(
                "call {} started: talk after the greeting; Ctrl-C hangs up (twice: at once)",
                ev.call_id
            )],
            CallEventKind::State { state } => {
                let mut out = vec![format!("  [{}]", state_name(*state))];
                if *state == CallState::Speaking && !self.greeting_shown {
                    self.greeting_shown = true;
                    out.push(format!("agent> {}", self.greeting));
                }
                out
            }
            CallEventKind::AgentSentence { text } => vec![format!("agent> {text}")],
            CallEventKind::Utterance { entry } => match entry.speaker {
                Speaker::Caller if entry.text.is_empty() => vec!["you>   (nothing understood)".into()],
                Speaker::Caller => vec![format!("you>   {}", entry.text)],
                Speaker::Agent => {
                    let mut out = Vec::new();
                    if let Some(p) = entry.prompt {
                        out.push(format!("agent> {} ({p})", entry.text));
                    }
                    if let Some(t) = &entry.timings {
                        let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
                        out.push(format!(
                            "       timings: stt final {} ms, llm first token {}, tts first audio {}{}",
                            t.stt_final_ms,
                            ms(t.llm_first_token_ms),
                            ms(t.tts_first_audio_ms),
                            if entry.interrupted {
                                format!("; interrupted, heard: {:?}", entry.text)
                            } else {
                                String::new()
                            }
                        ));
                    }
                    out
                }
            },
            CallEventKind::Ended { reason, detail } => {
                let what = match *reason {
                    "caller_hangup" => "you hung up".to_string(),
                    "agent_hangup" => format!("the agent hung up ({detail})"),
                    "shutdown" => "hung up at once".to_string(),
                    _ => format!("error: {detail}"),
                };
                vec![format!("call ended: {what}")]
            }
        }
    }
}

fn state_name(s: CallState) -> &'static str {
    match s {
        CallState::Listening => "listening",
        CallState::Thinking => "thinking",
        CallState::Speaking => "speaking",
        CallState::Ending => "ending",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::{Entry, TurnTimings};

    fn ev(kind: CallEventKind) -> CallEvent {
        CallEvent {
            call_id: "c1".into(),
            ts: "2026-11-21T20:00:00.000Z".into(),
            kind,
        }
    }

    #[test]
    fn a_turn_on_screen() {
        let mut s = Screen::new("Hello there.");
        let speaking = ev(CallEventKind::State {
            state: CallState::Speaking,
        });
        assert_eq!(s.lines(&speaking), ["  [speaking]", "agent> Hello there."]);
        // The greeting is shown once only.
        assert_eq!(s.lines(&speaking), ["  [speaking]"]);
        let caller = Entry::now("c1", Speaker::Caller, "what time is it".into());
        assert_eq!(
            s.lines(&ev(CallEventKind::Utterance { entry: caller })),
            ["you>   what time is it"]
        );
        assert_eq!(
            s.lines(&ev(CallEventKind::AgentSentence {
                text: "It is noon.".into()
            })),
            ["agent> It is noon."]
        );
        let mut reply = Entry::now("c1", Speaker::Agent, "It is noon.".into());
        reply.timings = Some(TurnTimings {
            stt_final_ms: 30,
            llm_first_token_ms: Some(150),
            tts_first_audio_ms: None,
            ..Default::default()
        });
        assert_eq!(
            s.lines(&ev(CallEventKind::Utterance { entry: reply })),
            ["       timings: stt final 30 ms, llm first token 150 ms, tts first audio -"]
        );
        let mut bye = Entry::now("c1", Speaker::Agent, "Goodbye.".into());
        bye.prompt = Some("goodbye");
        assert_eq!(
            s.lines(&ev(CallEventKind::Utterance { entry: bye })),
            ["agent> Goodbye. (goodbye)"]
        );
        let end = ev(CallEventKind::Ended {
            reason: "error",
            detail: "audio device: gone".into(),
        });
        assert_eq!(s.lines(&end), ["call ended: error: audio device: gone"]);
    }
}
