//! When to evaluate the caller's words into the LLM's KV cache while they are still speaking
//! (issue 8, `[turn] prefill_every_ms`). No I/O, no clock: the call reports the caller audio it
//! pushes and the answers it gets; this says when to ask STT for the text so far (Vosk's
//! partial result) and which text to prefill: every `prefill_every_ms` of the utterance, and
//! once more at each pause ([`PAUSE_MS`] of silence), when Vosk has the words up to it, so the
//! final text is most often the text last prefilled. At most one request is out at a time (a
//! partial asked for, or a prefill running), so a slow machine gets fewer prefills, never a
//! queue.
//!
//! Why: the reply's prompt is the history plus the caller's final text. Evaluating it after the
//! end of the turn cost 520-630 ms at 1 call on this project's 2-core machine (36-54 new
//! tokens, docs/turns.md); prefilled, the final text differs from the last partial by a word or
//! two, and only those tokens (and the assistant header) are left to evaluate (the KV cache
//! keeps the longest common token prefix, llm.rs `eval_prompt`).

/// Silence (ms) after speech at which the words so far are prefilled once more: before the
/// turn model is asked (`turn.min_pause_ms`, 200 ms) and well before the silence timer.
pub const PAUSE_MS: u32 = 100;

/// No prefill while Vosk is further behind the caller than this (ms of queued audio): its
/// partial text would be stale, and the LLM's work would take the CPU the recognizers need. At
/// 4 calls on the 2-core test machine, where Vosk runs seconds behind, prefilling anyway took
/// the final transcript from 3.7 to 10.1 s after the end of speech (p50, docs/turns.md).
pub const MAX_STT_BACKLOG_MS: u64 = 300;

/// The prefill policy's state for one call.
#[derive(Debug, Default)]
pub struct PrefillPolicy {
    /// Caller audio (ms) between two asks; 0 = off.
    every_ms: u32,
    /// Audio (ms) of the open utterance since the last ask.
    since_ask_ms: u32,
    /// A partial text was asked for and has not come back.
    asking: bool,
    /// A prefill is running.
    running: bool,
    /// The text last prefilled in this utterance.
    last: String,
    /// The current pause has had its ask.
    pause_asked: bool,
}

impl PrefillPolicy {
    /// A policy asking every `every_ms` of caller audio (0: never).
    pub fn new(every_ms: u32) -> PrefillPolicy {
        PrefillPolicy {
            every_ms,
            ..Default::default()
        }
    }

    /// A new utterance opened: count from its start, forget the last text.
    pub fn utterance_start(&mut self) {
        self.since_ask_ms = 0;
        self.last.clear();
        self.pause_asked = false;
    }

    /// `audio_ms` of caller audio was pushed while the utterance is open, `silence_ms` after
    /// the caller's last voiced frame (0 while they speak). `idle`: the LLM may be used now (no
    /// reply in flight or playing). True: ask STT for the text so far now.
    pub fn audio(&mut self, audio_ms: u32, silence_ms: u32, idle: bool) -> bool {
        if self.every_ms == 0 || !idle {
            return false;
        }
        self.since_ask_ms = self.since_ask_ms.saturating_add(audio_ms);
        if silence_ms == 0 {
            self.pause_asked = false;
        }
        let pause_due = silence_ms >= PAUSE_MS && !self.pause_asked;
        if self.asking || self.running || (self.since_ask_ms < self.every_ms && !pause_due) {
            return false;
        }
        if silence_ms >= PAUSE_MS {
            self.pause_asked = true;
        }
        self.since_ask_ms = 0;
        self.asking = true;
        true
    }

    /// The text so far arrived; `idle` as for [`Self::audio`]. Some: prefill the prompt ending
    /// with this text now (then call [`Self::prefilled`] when it is in). None: nothing new.
    pub fn partial(&mut self, text: &str, idle: bool) -> Option<String> {
        self.asking = false;
        let text = text.trim();
        if !idle || text.is_empty() || text == self.last {
            return None;
        }
        self.last = text.to_string();
        self.running = true;
        Some(self.last.clone())
    }

    /// The prefill asked by [`Self::partial`] is in the KV cache (or was dropped).
    pub fn prefilled(&mut self) {
        self.running = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `frames` 20 ms frames of speech; returns at which frames (1-based) an ask came.
    fn asks(p: &mut PrefillPolicy, frames: u32, idle: bool) -> Vec<u32> {
        (1..=frames).filter(|_| p.audio(20, 0, idle)).collect()
    }

    /// Feeds `frames` 20 ms frames of silence after speech; returns at which frames an ask came.
    fn silent_asks(p: &mut PrefillPolicy, frames: u32) -> Vec<u32> {
        (1..=frames).filter(|&i| p.audio(20, 20 * i, true)).collect()
    }

    #[test]
    fn each_pause_gets_one_ask() {
        let mut p = PrefillPolicy::new(1000);
        p.utterance_start();
        assert!(asks(&mut p, 10, true).is_empty());
        // 100 ms into the pause, before the interval is up: one ask, none after it.
        assert_eq!(silent_asks(&mut p, 20), vec![5]);
        assert_eq!(p.partial("one two", true), Some("one two".into()));
        p.prefilled();
        assert!(!p.audio(20, 420, true), "this pause had its ask");
        // The caller goes on, then pauses again.
        assert!(!p.audio(20, 0, true));
        assert!(p.audio(20, 100, true), "a new pause");
        assert_eq!(p.partial("one two three", true), Some("one two three".into()));
        assert!(!p.audio(20, 120, true), "a prefill is running");
        p.prefilled();
        assert!(!p.audio(20, 140, true), "this pause had its ask");
    }

    #[test]
    fn a_pause_reached_while_a_request_is_out_asks_once_it_is_done() {
        let mut p = PrefillPolicy::new(100);
        p.utterance_start();
        assert_eq!(asks(&mut p, 5, true), vec![5]);
        assert!(!p.audio(20, 100, true), "the interval's partial is still out");
        assert_eq!(p.partial("a", true), Some("a".into()));
        assert!(!p.audio(20, 120, true), "its prefill is running");
        p.prefilled();
        assert!(p.audio(20, 140, true), "the pause's own ask");
    }

    #[test]
    fn off_never_asks() {
        let mut p = PrefillPolicy::new(0);
        p.utterance_start();
        assert!(asks(&mut p, 500, true).is_empty());
    }

    #[test]
    fn asks_every_interval_with_one_request_out() {
        let mut p = PrefillPolicy::new(400);
        p.utterance_start();
        // First ask after 400 ms; none while it is out.
        assert_eq!(asks(&mut p, 40, true), vec![20]);
        assert_eq!(p.partial("hello", true), Some("hello".into()));
        // The prefill runs: still no ask, however long.
        assert!(asks(&mut p, 40, true).is_empty());
        p.prefilled();
        // The interval counted on meanwhile: the next ask comes at once.
        assert_eq!(asks(&mut p, 1, true), vec![1]);
        // Same text as last time: nothing to prefill, and no prefill running.
        assert_eq!(p.partial("hello", true), None);
        assert_eq!(asks(&mut p, 20, true), vec![20]);
        assert_eq!(p.partial("hello there", true), Some("hello there".into()));
    }

    #[test]
    fn nothing_while_the_agent_is_busy_or_for_empty_text() {
        let mut p = PrefillPolicy::new(200);
        p.utterance_start();
        assert!(asks(&mut p, 50, false).is_empty());
        assert_eq!(asks(&mut p, 10, true), vec![10]);
        // A reply started while the partial was on its way: no prefill.
        assert_eq!(p.partial("hello", false), None);
        assert_eq!(asks(&mut p, 10, true), vec![10]);
        assert_eq!(p.partial("  ", true), None);
        assert_eq!(asks(&mut p, 10, true), vec![10]);
        assert_eq!(p.partial("hello", true), Some("hello".into()));
    }

    #[test]
    fn a_new_utterance_forgets_the_last_text() {
        let mut p = PrefillPolicy::new(100);
        p.utterance_start();
        assert_eq!(asks(&mut p, 5, true), vec![5]);
        assert_eq!(p.partial("yes", true), Some("yes".into()));
        p.prefilled();
        p.utterance_start();
        assert_eq!(asks(&mut p, 5, true), vec![5]);
        assert_eq!(p.partial("yes", true), Some("yes".into()));
    }
}
