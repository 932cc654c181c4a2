//! The per-turn deadline against dead air (no I/O): once the caller's final text is in and no
//! reply audio has come, the call plays the first filler (`call.filler_after_ms`, handled by
//! the call itself), then a second filler (`call.second_filler_after_ms` later), then at
//! `call.reply_deadline_ms` gives the reply up with an apology and a re-prompt; after
//! `call.max_reprompts` given-up replies in a row it hands the call off (a transfer to
//! `call.handoff_transfer`, else the apology and a hangup). So no path leaves the caller in
//! silence for much more than the gap between two of these steps (about 1.5 s by default).
//! Before the final text is in (STT behind the caller) the call feeds the same clock from the
//! end of the turn with no give-up, so the second filler still comes.

use crate::config::CallConfig;
use std::time::{Duration, Instant};

/// What the call should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadAirAction {
    /// Nothing.
    Wait,
    /// Play `call.second_filler`.
    SecondFiller,
    /// Give the reply up: play `call.reprompt` and listen again.
    Reprompt,
    /// Give the reply up and hand the call off.
    HandOff,
}

/// The deadlines of one call's turns.
#[derive(Debug, Default, Clone)]
pub struct DeadAir {
    /// The turn being watched and whether its second filler was played.
    turn: Option<(u64, bool)>,
    /// Replies given up in a row.
    given_up: u32,
}

/// The times that matter, from `[call]`.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// Final text -> second filler.
    pub second_filler: Duration,
    /// Final text -> reply given up.
    pub give_up: Duration,
    /// Given-up replies in a row before the hand-off.
    pub max_reprompts: u32,
}

impl Deadlines {
    /// From the `[call]` section.
    pub fn from_config(c: &CallConfig) -> Deadlines {
        Deadlines {
            second_filler: Duration::from_millis(c.filler_after_ms + c.second_filler_after_ms),
            give_up: Duration::from_millis(c.reply_deadline_ms),
            max_reprompts: c.max_reprompts.max(1),
        }
    }
}

impl DeadAir {
    /// Checked every 20 ms. `waiting` is the turn awaiting its first reply audio (id, and when
    /// the caller's final text arrived), `None` when no reply is awaited; `agent_quiet` is true
    /// when no agent audio is queued (a filler still playing delays the second filler).
    pub fn tick(
        &mut self,
        now: Instant,
        waiting: Option<(u64, Instant)>,
        agent_quiet: bool,
        d: &Deadlines,
    ) -> DeadAirAction {
        let Some((id, since)) = waiting else {
            self.turn = None;
            return DeadAirAction::Wait;
        };
        let second_played = match self.turn {
            Some((t, played)) if t == id => played,
            _ => {
                self.turn = Some((id, false));
                false
            }
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= d.give_up {
            self.turn = None;
            self.given_up += 1;
            return if self.given_up >= d.max_reprompts {
                self.given_up = 0;
                DeadAirAction::HandOff
            } else {
                DeadAirAction::Reprompt
            };
        }
        if !second_played && agent_quiet && elapsed >= d.second_filler {
            self.turn = Some((id, true));
            return DeadAirAction::SecondFiller;
        }
        DeadAirAction::Wait
    }

    /// A reply's audio arrived: the count of given-up replies starts again.
    pub fn replied(&mut self) {
        self.turn = None;
        self.given_up = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Deadlines {
        Deadlines::from_config(&CallConfig::default())
    }

    /// Runs a scripted turn: ticks every 20 ms from the final text for `ms`, returning the
    /// actions (with their time) that were not `Wait`.
    fn script(da: &mut DeadAir, id: u64, ms: u64, quiet: impl Fn(u64) -> bool) -> Vec<(u64, DeadAirAction)> {
        let t0 = Instant::now();
        let mut out = Vec::new();
        for t in (0..=ms).step_by(20) {
            let a = da.tick(t0 + Duration::from_millis(t), Some((id, t0)), quiet(t), &d());
            if a != DeadAirAction::Wait {
                out.push((t, a));
            }
            if matches!(a, DeadAirAction::Reprompt | DeadAirAction::HandOff) {
                break; // the call drops the turn: nothing is awaited any more
            }
        }
        out
    }

    #[test]
    fn second_filler_then_reprompt_then_handoff() {
        let mut da = DeadAir::default();
        // Defaults: filler at 1.2 s (the call's), second at 3.7 s, give up at 6 s.
        let a = script(&mut da, 1, 7000, |_| true);
        assert_eq!(
            a,
            vec![(3700, DeadAirAction::SecondFiller), (6000, DeadAirAction::Reprompt)]
        );
        // The next slow turn is the second give-up in a row: hand-off.
        let a = script(&mut da, 2, 7000, |_| true);
        assert_eq!(
            a,
            vec![(3700, DeadAirAction::SecondFiller), (6000, DeadAirAction::HandOff)]
        );
    }

    #[test]
    fn a_reply_resets_the_count_and_audio_delays_the_second_filler() {
        let mut da = DeadAir::default();
        let a = script(&mut da, 1, 6000, |_| true);
        assert_eq!(a.last(), Some(&(6000, DeadAirAction::Reprompt)));
        da.replied();
        // Agent audio (the first filler) still queued until 4 s: the second filler waits.
        let a = script(&mut da, 2, 7000, |t| t >= 4000);
        assert_eq!(
            a,
            vec![(4000, DeadAirAction::SecondFiller), (6000, DeadAirAction::Reprompt)]
        );
    }

    #[test]
    fn nothing_when_no_reply_is_awaited() {
        let mut da = DeadAir::default();
        let now = Instant::now();
        assert_eq!(da.tick(now, None, true, &d()), DeadAirAction::Wait);
        let early = now - Duration::from_millis(100);
        assert_eq!(da.tick(now, Some((5, early)), true, &d()), DeadAirAction::Wait);
    }
}
