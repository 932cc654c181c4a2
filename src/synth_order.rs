//! The order in which sentences wait for a Piper synthesis worker (issue 10). No I/O and no
//! clock: the TTS engine pushes each sentence with its deadline and its workers pop the next
//! one; unit tests drive it with scripted instants.
//!
//! `[tts] order`:
//! - `deadline` (earliest deadline first): a sentence's deadline is the instant its call's
//!   audio runs out without it. A reply's first sentence is due when it is asked for (the
//!   caller is already waiting in silence); a later sentence is due when the audio queued
//!   before it has played, so it waits while other callers' first sentences go ahead, and no
//!   longer than its own call can spare. Equal deadlines go in arrival order.
//! - `fifo`: arrival order (the behaviour before issue 10's measurements), for comparison.
//!
//! Bound: each reply asks for one sentence at a time and waits for it, so the queue holds at
//! most one sentence per live reply plus the fixed prompts being rendered.

use crate::config::TtsOrder;
use std::time::Instant;

/// Sentences waiting for synthesis, in the configured order.
#[derive(Debug)]
pub struct SynthQueue<T> {
    order: TtsOrder,
    /// (deadline, arrival number, item), in arrival order.
    waiting: Vec<(Instant, u64, T)>,
    arrivals: u64,
}

impl<T> SynthQueue<T> {
    /// An empty queue ordered by `order`.
    pub fn new(order: TtsOrder) -> SynthQueue<T> {
        SynthQueue {
            order,
            waiting: Vec::new(),
            arrivals: 0,
        }
    }

    /// Adds `item`, due at `deadline` (ignored by `fifo`).
    pub fn push(&mut self, item: T, deadline: Instant) {
        self.waiting.push((deadline, self.arrivals, item));
        self.arrivals += 1;
    }

    /// Takes the next item to synthesize: the earliest deadline (the earliest arrival among
    /// equal ones), or the earliest arrival with `fifo`. None when the queue is empty.
    pub fn pop(&mut self) -> Option<T> {
        let next = match self.order {
            // `waiting` is in arrival order.
            TtsOrder::Fifo => 0,
            TtsOrder::Deadline => {
                self.waiting
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, (deadline, arrival, _))| (*deadline, *arrival))?
                    .0
            }
        };
        (next < self.waiting.len()).then(|| self.waiting.remove(next).2)
    }

    /// Sentences waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn drain(q: &mut SynthQueue<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    /// Four callers stop together while call A's reply is playing: A's second sentence is due
    /// when A's 2.4 s of queued audio has played, the three first sentences at once.
    #[test]
    fn first_sentences_go_ahead_of_a_later_sentence_with_audio_queued() {
        let t = Instant::now();
        let mut q = SynthQueue::new(TtsOrder::Deadline);
        q.push("A: second sentence", ms(t, 2400));
        q.push("B: first", ms(t, 10));
        q.push("C: first", ms(t, 20));
        q.push("D: first", ms(t, 30));
        assert_eq!(
            drain(&mut q),
            ["B: first", "C: first", "D: first", "A: second sentence"]
        );
    }

    #[test]
    fn fifo_keeps_arrival_order() {
        let t = Instant::now();
        let mut q = SynthQueue::new(TtsOrder::Fifo);
        q.push("A: second sentence", ms(t, 2400));
        q.push("B: first", ms(t, 10));
        q.push("C: first", ms(t, 20));
        assert_eq!(drain(&mut q), ["A: second sentence", "B: first", "C: first"]);
    }

    /// A later sentence whose call's audio has already run out (deadline past) goes before a
    /// first sentence asked for after that instant: both callers hear silence, the one who has
    /// waited longer is served first.
    #[test]
    fn a_call_already_silent_goes_before_a_newer_first_sentence() {
        let t = Instant::now();
        let mut q = SynthQueue::new(TtsOrder::Deadline);
        q.push("B: first", ms(t, 500));
        q.push("A: third sentence, audio ran out", ms(t, 300));
        assert_eq!(drain(&mut q), ["A: third sentence, audio ran out", "B: first"]);
    }

    #[test]
    fn equal_deadlines_go_in_arrival_order_and_pushes_between_pops_count() {
        let t = Instant::now();
        let mut q = SynthQueue::new(TtsOrder::Deadline);
        q.push("1", ms(t, 100));
        q.push("2", ms(t, 100));
        assert_eq!(q.pop(), Some("1"));
        q.push("3", ms(t, 50));
        assert_eq!(q.len(), 2);
        assert_eq!(drain(&mut q), ["3", "2"]);
        assert!(q.is_empty());
        assert_eq!(q.pop(), None);
    }
}
