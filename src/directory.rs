//! The call directory: what the dialplan's FastAGI steps and the AudioSocket calls tell each
//! other about one call, keyed by the AudioSocket call UUID.
//!
//! AudioSocket carries audio only (no caller ID, no way to say "transfer me"), so the dialplan
//! runs an AGI step before `AudioSocket()` (`call-start`: caller ID, DNID, language, channel go
//! in with [`CallDirectory::set_info`]) and one after it (`call-end`: the agent's
//! [`Decision`] comes out with [`CallDirectory::take_decision`]). The call reads the caller's
//! details with [`CallDirectory::info`] when it starts and records its decision with
//! [`CallDirectory::set_decision`] when it ends.
//!
//! One [`CallDirectory`] is shared through an `Arc` by the AGI server ([`crate::agi`]) and every
//! call. It is a plain `Mutex<HashMap>`: every critical section is a map operation, never held
//! across an `.await`. Entries expire `ttl` after their last write (checked lazily on every
//! write, and on read), and the map never holds more than [`MAX_ENTRIES`], so a dialplan that
//! runs `call-start` without ever connecting the call cannot make it grow without bound.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long an entry lives after its last write when the caller has no better figure: far
/// longer than the seconds between `call-start` and the call reading its info, or between the
/// call's end and `call-end`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// The most entries kept; past this the oldest are dropped (with a warning) on insert.
pub const MAX_ENTRIES: usize = 10_000;

/// What Asterisk told the `call-start` AGI step about the caller (the `agi_*` variables of
/// Asterisk's `res/res_agi.c`). Fields Asterisk sent as empty or `unknown` are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallerInfo {
    /// Caller number (`agi_callerid`), e.g. `100`.
    pub caller_id: Option<String>,
    /// Caller name (`agi_calleridname`), e.g. `Alice`.
    pub caller_name: Option<String>,
    /// The number the caller dialled (`agi_dnid`), e.g. `500`.
    pub dnid: Option<String>,
    /// The channel's language (`agi_language`), e.g. `en`.
    pub language: Option<String>,
    /// The channel name (`agi_channel`), e.g. `PJSIP/100-00000001`.
    pub channel: Option<String>,
    /// Asterisk's unique ID of the channel (`agi_uniqueid`), e.g. `1700000000.1`.
    pub unique_id: Option<String>,
}

/// What the agent decided to do with the call when it ended; the `call-end` AGI step hands it
/// to the dialplan as `AVA_ACTION`. No decision at all means `continue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Hang up the caller (`AVA_ACTION=hangup`).
    Hangup,
    /// Transfer the caller (`AVA_ACTION=transfer`) to `destination`, the dial string of the
    /// `[actions] transfer` entry called `name` (`AVA_TRANSFER`, `AVA_TRANSFER_NAME`).
    Transfer {
        /// The configured name, e.g. `operator`.
        name: String,
        /// The configured dial string, e.g. `PJSIP/100`.
        destination: String,
    },
    /// The agent was at `server.max_calls` and played the busy prompt (`AVA_ACTION=busy`): the
    /// dialplan may try another agent host.
    Busy,
}

impl Decision {
    /// The `AVA_ACTION` value: `hangup`, `transfer` or `busy`.
    pub fn action(&self) -> &'static str {
        match self {
            Decision::Hangup => "hangup",
            Decision::Transfer { .. } => "transfer",
            Decision::Busy => "busy",
        }
    }
}

#[derive(Debug)]
struct Entry {
    info: Option<CallerInfo>,
    decision: Option<Decision>,
    written: Instant,
}

/// Per-call [`CallerInfo`] and [`Decision`], keyed by the AudioSocket call UUID. `Send + Sync`;
/// share it with `Arc`.
#[derive(Debug)]
pub struct CallDirectory {
    ttl: Duration,
    entries: Mutex<HashMap<Uuid, Entry>>,
}

impl CallDirectory {
    /// An empty directory whose entries expire `ttl` after their last write.
    pub fn new(ttl: Duration) -> Self {
        CallDirectory {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Records the caller's details for `uuid` (replacing earlier ones; a decision already set
    /// is kept).
    pub fn set_info(&self, uuid: Uuid, info: CallerInfo) {
        self.set_info_at(uuid, info, Instant::now());
    }

    /// The caller's details for `uuid`, if `call-start` stored them and they have not expired.
    /// Leaves them in place.
    pub fn info(&self, uuid: Uuid) -> Option<CallerInfo> {
        self.info_at(uuid, Instant::now())
    }

    /// Records the agent's decision for `uuid` (replacing an earlier one).
    pub fn set_decision(&self, uuid: Uuid, decision: Decision) {
        self.set_decision_at(uuid, decision, Instant::now());
    }

    /// Removes and returns the decision for `uuid`; `None` (= continue) if there is none or it
    /// expired. The caller's details stay until they expire, so a dialplan that loops back to
    /// `AudioSocket()` with the same UUID still finds them.
    pub fn take_decision(&self, uuid: Uuid) -> Option<Decision> {
        self.take_decision_at(uuid, Instant::now())
    }

    /// The decision for `uuid`, left in place (the call history records it; the dialplan's
    /// call-end step still takes it).
    pub fn peek_decision(&self, uuid: Uuid) -> Option<Decision> {
        self.lock().get(&uuid).and_then(|e| e.decision.clone())
    }

    /// Number of entries held (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Entry>> {
        // A panic while holding the lock cannot leave a map operation half done: go on.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn expired(&self, entry: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(entry.written) > self.ttl
    }

    /// Drops expired entries, then the oldest ones while the map is over [`MAX_ENTRIES`] - 1
    /// (room for the entry about to be written).
    fn sweep(&self, map: &mut HashMap<Uuid, Entry>, now: Instant) {
        map.retain(|_, e| !self.expired(e, now));
        if map.len() >= MAX_ENTRIES {
            let mut by_age: Vec<(Instant, Uuid)> = map.iter().map(|(k, e)| (e.written, *k)).collect();
            by_age.sort_unstable();
            let excess = map.len() + 1 - MAX_ENTRIES;
            for (_, k) in by_age.into_iter().take(excess) {
                map.remove(&k);
            }
            tracing::warn!(
                dropped = excess,
                max = MAX_ENTRIES,
                "call directory full: dropped the oldest entries"
            );
        }
    }

    fn upsert(&self, uuid: Uuid, now: Instant, f: impl FnOnce(&mut Entry)) {
        let mut map = self.lock();
        if !map.contains_key(&uuid) {
            self.sweep(&mut map, now);
        } else if map.get(&uuid).is_some_and(|e| self.expired(e, now)) {
            map.remove(&uuid);
        }
        let entry = map.entry(uuid).or_insert(Entry {
            info: None,
            decision: None,
            written: now,
        });
        entry.written = now;
        f(entry);
    }

    fn set_info_at(&self, uuid: Uuid, info: CallerInfo, now: Instant) {
        self.upsert(uuid, now, |e| e.info = Some(info));
    }

    fn set_decision_at(&self, uuid: Uuid, decision: Decision, now: Instant) {
        self.upsert(uuid, now, |e| e.decision = Some(decision));
    }

    fn info_at(&self, uuid: Uuid, now: Instant) -> Option<CallerInfo> {
        let map = self.lock();
        let entry = map.get(&uuid)?;
        if self.expired(entry, now) {
            return None;
        }
        entry.info.clone()
    }

    fn take_decision_at(&self, uuid: Uuid, now: Instant) -> Option<Decision> {
        let mut map = self.lock();
        let entry = map.get_mut(&uuid)?;
        if self.expired(entry, now) {
            map.remove(&uuid);
            return None;
        }
        let decision = entry.decision.take();
        if entry.info.is_none() {
            map.remove(&uuid);
        }
        decision
    }
}

impl Default for CallDirectory {
    /// A directory with [`DEFAULT_TTL`].
    fn default() -> Self {
        CallDirectory::new(DEFAULT_TTL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(n: &str) -> CallerInfo {
        CallerInfo {
            caller_id: Some(n.into()),
            ..CallerInfo::default()
        }
    }

    fn transfer() -> Decision {
        Decision::Transfer {
            name: "operator".into(),
            destination: "PJSIP/100".into(),
        }
    }

    #[test]
    fn directory_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<CallDirectory>();
        check::<std::sync::Arc<CallDirectory>>();
    }

    #[test]
    fn directory_info_is_cloned_not_removed() {
        let d = CallDirectory::new(DEFAULT_TTL);
        let u = Uuid::new_v4();
        assert_eq!(d.info(u), None);
        d.set_info(u, info("100"));
        assert_eq!(d.info(u), Some(info("100")));
        assert_eq!(d.info(u), Some(info("100")), "info() must not remove");
        d.set_info(u, info("200"));
        assert_eq!(d.info(u).unwrap().caller_id.as_deref(), Some("200"));
        assert_eq!(d.info(Uuid::new_v4()), None);
    }

    #[test]
    fn directory_take_decision_removes_it_once() {
        let d = CallDirectory::new(DEFAULT_TTL);
        let u = Uuid::new_v4();
        assert_eq!(d.take_decision(u), None);
        d.set_decision(u, Decision::Hangup);
        d.set_decision(u, transfer()); // the last one wins
        assert_eq!(d.take_decision(u), Some(transfer()));
        assert_eq!(d.take_decision(u), None, "taken once only");
        // A decision alone leaves nothing behind.
        assert!(d.is_empty());
    }

    #[test]
    fn directory_decision_and_info_live_side_by_side() {
        let d = CallDirectory::new(DEFAULT_TTL);
        let u = Uuid::new_v4();
        d.set_info(u, info("100"));
        d.set_decision(u, Decision::Hangup);
        assert_eq!(d.info(u), Some(info("100")));
        assert_eq!(d.take_decision(u), Some(Decision::Hangup));
        assert_eq!(d.info(u), Some(info("100")), "info stays until it expires");
        assert_eq!(d.len(), 1);
        // set_info keeps a decision already set.
        d.set_decision(u, Decision::Hangup);
        d.set_info(u, info("300"));
        assert_eq!(d.take_decision(u), Some(Decision::Hangup));
    }

    #[test]
    fn directory_entries_expire_after_ttl() {
        let ttl = Duration::from_secs(60);
        let d = CallDirectory::new(ttl);
        let t0 = Instant::now();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        d.set_info_at(a, info("100"), t0);
        d.set_decision_at(a, Decision::Hangup, t0);
        assert_eq!(d.info_at(a, t0 + ttl), Some(info("100")), "still alive at exactly ttl");
        assert_eq!(d.info_at(a, t0 + ttl + Duration::from_millis(1)), None);
        assert_eq!(d.take_decision_at(a, t0 + ttl + Duration::from_millis(1)), None);
        // An insert sweeps expired entries lazily.
        d.set_info_at(b, info("200"), t0);
        let later = t0 + ttl * 2;
        d.set_info_at(Uuid::new_v4(), info("300"), later);
        assert_eq!(d.len(), 1, "a and b were swept");
        assert_eq!(d.info_at(b, later), None);
    }

    #[test]
    fn directory_write_refreshes_the_ttl() {
        let ttl = Duration::from_secs(60);
        let d = CallDirectory::new(ttl);
        let t0 = Instant::now();
        let u = Uuid::new_v4();
        d.set_info_at(u, info("100"), t0);
        d.set_decision_at(u, Decision::Hangup, t0 + Duration::from_secs(50));
        let t = t0 + Duration::from_secs(100);
        assert_eq!(d.info_at(u, t), Some(info("100")));
        assert_eq!(d.take_decision_at(u, t), Some(Decision::Hangup));
    }

    #[test]
    fn directory_expired_entry_is_replaced_not_revived() {
        let ttl = Duration::from_secs(60);
        let d = CallDirectory::new(ttl);
        let t0 = Instant::now();
        let u = Uuid::new_v4();
        d.set_info_at(u, info("100"), t0);
        // A decision written after the info expired must not bring the old info back.
        let t = t0 + ttl * 2;
        d.set_decision_at(u, Decision::Hangup, t);
        assert_eq!(d.info_at(u, t), None);
        assert_eq!(d.take_decision_at(u, t), Some(Decision::Hangup));
    }

    #[test]
    fn directory_is_bounded() {
        let d = CallDirectory::new(DEFAULT_TTL);
        let t0 = Instant::now();
        let first = Uuid::new_v4();
        d.set_info_at(first, info("first"), t0);
        for i in 1..MAX_ENTRIES + 5 {
            d.set_info_at(Uuid::new_v4(), info("x"), t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(d.len(), MAX_ENTRIES);
        assert_eq!(
            d.info_at(first, t0 + Duration::from_secs(1)),
            None,
            "the oldest went first"
        );
    }

    #[test]
    fn decision_action_names() {
        assert_eq!(Decision::Hangup.action(), "hangup");
        assert_eq!(transfer().action(), "transfer");
    }
}
