//! The STT recognizers kept between calls, and when a worn one is replaced (issue 7). Generic
//! over the recognizer, with no I/O and no threads: `stt.rs` builds, warms and resets
//! recognizers and asks this pool what to do with them.
//!
//! Why keep them: a fresh libvosk recognizer on a lookahead model (`Gr.fst` + `HCLr.fst`, as the
//! small Vosk models and the test tier's Korean one ship) is several times slower on its first
//! utterance (measured in `stt.rs`). Why replace them: the same composition caches
//! never shrink. Heaptrack on the soak bench (`cargo bench --bench soak`, test tier, 2 calls at
//! a time; the heap still allocated after 84 calls, minus that after 25) put nearly all of the
//! growth (29.5 of 29.8 MiB over those 59 calls, for the two recognizers) in OpenFst's
//! `ComposeFstImpl` state table and the arc caches behind Kaldi's `LatticeIncrementalDecoder`,
//! that is inside the recognizers the pool keeps. `vosk_recognizer_reset` keeps them. So a
//! recognizer that has served `max_calls` calls (`server.recognizer_max_calls`) is replaced by
//! a fresh one, warmed in the background, and dropped; it keeps serving calls until its
//! replacement is ready, so no call gets a cold one because of the swap. The dropped
//! recognizer's memory is freed (heaptrack: 2 MiB left at exit after 28 calls replacing every
//! 2); with jemalloc, the binary's allocator, it goes back to the kernel, and RSS stayed level
//! in the 30-minute soak with the default of 50 (with glibc's allocator it stayed in malloc's
//! arenas: README, soak).

/// A recognizer with the calls it has served.
pub struct Pooled<R> {
    /// The recognizer (reset between calls).
    pub rec: R,
    /// Calls it has served (a warm-up is not a call).
    pub calls: u32,
    /// Worn out: a replacement is being built for it.
    replacing: bool,
}

impl<R> Pooled<R> {
    /// A recognizer that has served no call.
    pub fn new(rec: R) -> Pooled<R> {
        Pooled {
            rec,
            calls: 0,
            replacing: false,
        }
    }
}

/// Idle recognizers and the bookkeeping of replacements. Not thread-safe itself: `stt.rs`
/// holds it under a mutex.
pub struct RecognizerPool<R> {
    idle: Vec<Pooled<R>>,
    /// Replacements that arrived while the worn recognizer they replace was in a call: that
    /// many worn recognizers are dropped when their calls end.
    spares: usize,
    /// A recognizer is replaced after serving this many calls; 0 never.
    max_calls: u32,
}

impl<R> Default for RecognizerPool<R> {
    fn default() -> Self {
        RecognizerPool {
            idle: Vec::new(),
            spares: 0,
            max_calls: 0,
        }
    }
}

/// What [`RecognizerPool::give_back`] asks of the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Returned {
    /// Nothing more to do.
    Kept,
    /// The recognizer is worn out: build and warm a fresh one, then
    /// [`RecognizerPool::add_fresh`] it with `replaces` true.
    Replace {
        /// Calls the worn recognizer served.
        calls: u32,
    },
    /// Dropped: a worn recognizer, its replacement being in the pool.
    Retired,
    /// Dropped: the pool is full.
    Dropped,
}

impl<R> RecognizerPool<R> {
    /// Most recognizers kept idle.
    pub const MAX: usize = 32;

    /// Sets the calls after which a recognizer is replaced (`server.recognizer_max_calls`; 0:
    /// never).
    pub fn set_max_calls(&mut self, max_calls: u32) {
        self.max_calls = max_calls;
    }

    /// Idle recognizers.
    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    /// A recognizer for a new call: one not being replaced if there is one (so a worn one stays
    /// idle, ready to be swapped out), else the most recently kept.
    pub fn take(&mut self) -> Option<Pooled<R>> {
        let i = self
            .idle
            .iter()
            .rposition(|p| !p.replacing)
            .or(self.idle.len().checked_sub(1))?;
        Some(self.idle.remove(i))
    }

    /// A recognizer (already reset) back from a call that has ended. The returned value says
    /// what happened to it; when it is not kept it is handed back for the caller to drop
    /// outside the lock.
    pub fn give_back(&mut self, mut p: Pooled<R>) -> (Returned, Option<R>) {
        p.calls += 1;
        let mut returned = Returned::Kept;
        if self.max_calls > 0 && p.calls >= self.max_calls {
            if p.replacing && self.spares > 0 {
                self.spares -= 1;
                return (Returned::Retired, Some(p.rec));
            }
            if !p.replacing {
                p.replacing = true;
                returned = Returned::Replace { calls: p.calls };
            }
        }
        if self.idle.len() >= Self::MAX {
            return (Returned::Dropped, Some(p.rec));
        }
        self.idle.push(p);
        (returned, None)
    }

    /// A fresh, warmed recognizer: a start-up warm-up (`replaces` false) joins the pool; a
    /// replacement takes the place of an idle worn recognizer, which is handed back to be
    /// dropped ([`Returned::Retired`]), or, if the worn one is in a call, joins the pool and
    /// the worn one is dropped when that call ends. With the pool full, `rec` itself is handed
    /// back ([`Returned::Dropped`]).
    pub fn add_fresh(&mut self, rec: R, replaces: bool) -> (Returned, Option<R>) {
        if replaces {
            if let Some(i) = self.idle.iter().position(|p| p.replacing) {
                let worn = std::mem::replace(&mut self.idle[i], Pooled::new(rec));
                return (Returned::Retired, Some(worn.rec));
            }
        }
        if self.idle.len() >= Self::MAX {
            return (Returned::Dropped, Some(rec));
        }
        if replaces {
            self.spares += 1;
        }
        self.idle.push(Pooled::new(rec));
        (Returned::Kept, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of named recognizers replaced after `max` calls.
    fn pool(max: u32) -> RecognizerPool<&'static str> {
        let mut p = RecognizerPool::default();
        p.set_max_calls(max);
        p
    }

    /// One call on whatever recognizer `take` gives (a new one, `fresh`, if none is idle).
    fn call(p: &mut RecognizerPool<&'static str>, fresh: &'static str) -> (&'static str, Returned) {
        let r = p.take().unwrap_or_else(|| Pooled::new(fresh));
        let name = r.rec;
        (name, p.give_back(r).0)
    }

    #[test]
    fn a_recognizer_is_kept_until_it_has_served_max_calls() {
        let mut p = pool(3);
        assert_eq!(call(&mut p, "a"), ("a", Returned::Kept));
        assert_eq!(call(&mut p, "b"), ("a", Returned::Kept));
        assert_eq!(call(&mut p, "b"), ("a", Returned::Replace { calls: 3 }));
        // Still used until the replacement comes, and asked for only once.
        assert_eq!(call(&mut p, "b"), ("a", Returned::Kept));
        assert_eq!(p.add_fresh("c", true), (Returned::Retired, Some("a")));
        assert_eq!(p.idle(), 1);
        assert_eq!(call(&mut p, "b"), ("c", Returned::Kept));
    }

    #[test]
    fn zero_max_calls_never_replaces() {
        let mut p = pool(0);
        for _ in 0..1000 {
            assert_eq!(call(&mut p, "a"), ("a", Returned::Kept));
        }
    }

    #[test]
    fn a_replacement_that_comes_while_the_worn_one_is_in_a_call_drops_it_when_the_call_ends() {
        let mut p = pool(1);
        let a = p.take().unwrap_or_else(|| Pooled::new("a"));
        assert_eq!(p.give_back(a).0, Returned::Replace { calls: 1 });
        // The worn recognizer serves another call; its replacement arrives meanwhile.
        let a = p.take().unwrap();
        assert_eq!(a.rec, "a");
        assert_eq!(p.add_fresh("b", true), (Returned::Kept, None));
        assert_eq!(p.idle(), 1);
        assert_eq!(p.give_back(a), (Returned::Retired, Some("a")));
        assert_eq!(p.idle(), 1);
        assert_eq!(p.take().unwrap().rec, "b");
    }

    #[test]
    fn a_new_call_takes_a_recognizer_that_is_not_being_replaced() {
        let mut p = pool(2);
        p.add_fresh("a", false);
        p.add_fresh("b", false);
        // Two calls at once wear out "b" first (taken last in, first out).
        let b = p.take().unwrap();
        let a = p.take().unwrap();
        assert_eq!((a.rec, b.rec), ("a", "b"));
        let mut b = b;
        b.calls = 1;
        assert_eq!(p.give_back(b).0, Returned::Replace { calls: 2 });
        assert_eq!(p.give_back(a).0, Returned::Kept);
        // "a" is last in, and "b" is being replaced: "a" either way; then "b" when it is alone.
        let a = p.take().unwrap();
        assert_eq!(a.rec, "a");
        assert_eq!(p.take().unwrap().rec, "b");
    }

    #[test]
    fn the_pool_never_holds_more_than_max() {
        let mut p = pool(0);
        for _ in 0..RecognizerPool::<&str>::MAX + 5 {
            p.add_fresh("w", false);
        }
        assert_eq!(p.idle(), RecognizerPool::<&str>::MAX);
        assert_eq!(p.give_back(Pooled::new("x")), (Returned::Dropped, Some("x")));
    }
}
