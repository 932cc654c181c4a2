//! What happens to an AudioSocket connection before it becomes a call, and how every
//! connection is closed: the id frame within `server.id_timeout_ms`, the cap on connections
//! that are not calls yet (`server.max_pending`, oldest evicted first), the busy prompt when
//! `server.max_calls` calls are live, the registry of live call UUIDs (a duplicate gets a
//! warning and its own log label), and the clean close: a hangup frame, a FIN, then the read
//! side drained until the peer's FIN so the kernel never answers with a reset.
//!
//! Protocol facts (Asterisk's `res/res_audiosocket.c`, `apps/app_audiosocket.c`): the id frame
//! (kind 0x01, 16-byte UUID) is the first frame Asterisk sends; a hangup frame (kind 0x00)
//! followed by a close makes `AudioSocket()` return 0, so the dialplan goes on; 8 kHz slin
//! (kind 0x10) is accepted on every call.

use crate::audiosocket::{AudioRate, Frame, FrameReader, FrameWriter};
use crate::transport::{CallInput, CallOutput};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use uuid::Uuid;

/// How long a closing connection waits for the peer's FIN after our hangup frame and FIN
/// (Asterisk closes at once; a peer that does not is cut off after this).
pub const LINGER: Duration = Duration::from_secs(2);

/// The linger for a connection closed because of overload (evicted or over the cap): short,
/// so a flood cannot pile up closing connections.
pub const SHORT_LINGER: Duration = Duration::from_millis(200);

/// Reads the first frame, which must be the id frame, within `timeout`.
///
/// # Errors
/// A message saying what came instead (another frame, EOF, a bad frame, nothing in time); the
/// caller logs it and closes the connection.
pub async fn read_id<R: CallInput>(reader: &mut R, timeout: Duration) -> Result<Uuid, String> {
    match tokio::time::timeout(timeout, reader.read_frame()).await {
        Ok(Ok(Some(Frame::Id(uuid)))) => Ok(uuid),
        Ok(Ok(Some(other))) => Err(format!(
            "first frame was {other}, not an id frame: ending the connection"
        )),
        Ok(Ok(None)) => Err("connection closed before an id frame".into()),
        Ok(Err(e)) => Err(format!("bad first frame: {e}")),
        Err(_) => Err(format!(
            "no id frame within {} ms: ending the connection",
            timeout.as_millis()
        )),
    }
}

/// Ends a connection cleanly: with `hangup`, a hangup frame first (bounded by
/// `write_timeout`), then a FIN, then reads and discards whatever the peer still sends until
/// its FIN or `linger` (closing with unread bytes would send a reset). Returns true if the
/// peer's FIN arrived.
pub async fn close<R: CallInput, W: CallOutput>(
    reader: &mut R,
    writer: &mut W,
    hangup: bool,
    write_timeout: Duration,
    linger: Duration,
) -> bool {
    let write = async {
        // A hangup frame then a FIN, or (the caller hung up) the FIN alone.
        let _ = if hangup {
            writer.hangup().await
        } else {
            writer.close().await
        };
    };
    let _ = tokio::time::timeout(write_timeout, write).await;
    reader.drain(linger).await
}

/// Plays `samples` (8 kHz slin, rendered at start-up) paced one 20 ms frame at a time, then
/// closes cleanly (hangup frame, FIN, drain). Stops early if the peer closes, stops reading
/// for `write_timeout`, or `stop` is notified (eviction, shutdown).
pub async fn play_busy<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    samples: &[i16],
    write_timeout: Duration,
    stop: &Notify,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let n = AudioRate::Slin8.samples_per_20ms();
    let mut tick = tokio::time::interval(Duration::from_millis(crate::call::FRAME_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut frame = Vec::with_capacity(n);
    let mut chunks = samples.chunks(n);
    let mut linger = LINGER;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(chunk) = chunks.next() else { break };
                frame.clear();
                frame.extend_from_slice(chunk);
                frame.resize(n, 0);
                match tokio::time::timeout(write_timeout, writer.write_samples(AudioRate::Slin8, &frame)).await {
                    Ok(Ok(())) => {}
                    _ => { linger = SHORT_LINGER; break; }
                }
            }
            // Caller audio is read and dropped; EOF or an error ends the prompt.
            r = reader.read_frame() => match r {
                Ok(Some(_)) => {}
                _ => break,
            },
            _ = stop.notified() => { linger = SHORT_LINGER; break; }
        }
    }
    close(reader, writer, true, write_timeout, linger).await;
}

/// Connections accepted but not yet calls, oldest first, at most `max` of them: admitting one
/// more evicts the oldest (which is told through its [`Pending::evicted`]). A real Asterisk
/// sends its id frame within milliseconds of connecting, so under a flood of silent or slow
/// connections the evicted ones are the flood's own, and a real call still gets in.
#[derive(Debug)]
pub struct PendingSet {
    max: usize,
    inner: Mutex<PendingInner>,
}

#[derive(Debug, Default)]
struct PendingInner {
    next: u64,
    queue: VecDeque<(u64, Arc<Notify>)>,
}

/// One admitted connection's place in the [`PendingSet`]; dropping it frees the place.
#[derive(Debug)]
pub struct Pending {
    id: u64,
    set: Arc<PendingSet>,
    /// Notified when a newer connection evicted this one (or at shutdown): close at once.
    pub evicted: Arc<Notify>,
}

impl PendingSet {
    /// A set of at most `max` (>= 1) connections.
    pub fn new(max: usize) -> Arc<PendingSet> {
        Arc::new(PendingSet {
            max: max.max(1),
            inner: Mutex::new(PendingInner::default()),
        })
    }

    /// Admits a connection; when the set is full the oldest is evicted and returned as `true`.
    pub fn admit(self: &Arc<Self>) -> (Pending, bool) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = false;
        while inner.queue.len() >= self.max {
            if let Some((_, n)) = inner.queue.pop_front() {
                n.notify_one();
                evicted = true;
            }
        }
        let id = inner.next;
        inner.next += 1;
        let notify = Arc::new(Notify::new());
        inner.queue.push_back((id, notify.clone()));
        (
            Pending {
                id,
                set: self.clone(),
                evicted: notify,
            },
            evicted,
        )
    }

    /// Connections in the set now.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).queue.len()
    }

    /// True when no connection is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut inner = self.set.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.queue.retain(|(id, _)| *id != self.id);
    }
}

/// The UUIDs of live calls. Asterisk gives every call its own UUID; two live calls with one
/// UUID mean a dialplan bug (a fixed UUID, or `${AVA_UUID}` reused), so the second gets a
/// warning and a label of its own (`UUID#2`) in the service and conversation logs.
#[derive(Debug, Default)]
pub struct LiveCalls {
    calls: Mutex<HashMap<Uuid, u32>>,
}

/// A registered live call; dropping it unregisters it.
#[derive(Debug)]
pub struct LiveCall {
    uuid: Uuid,
    registry: Arc<LiveCalls>,
    /// The call's name in the logs: the UUID, with `#N` for the N-th live call with that UUID.
    pub label: String,
}

impl LiveCalls {
    /// An empty registry.
    pub fn new() -> Arc<LiveCalls> {
        Arc::new(LiveCalls::default())
    }

    /// Registers a call; the label says whether another live call has the same UUID.
    pub fn register(self: &Arc<Self>, uuid: Uuid) -> LiveCall {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let n = calls.entry(uuid).or_insert(0);
        *n += 1;
        let label = if *n == 1 {
            uuid.to_string()
        } else {
            tracing::warn!(
                call_id = %uuid,
                live = *n,
                "duplicate call UUID: another live call has this id (check the dialplan); logged as {uuid}#{n}"
            );
            format!("{uuid}#{n}")
        };
        LiveCall {
            uuid,
            registry: self.clone(),
            label,
        }
    }

    /// Live calls registered now.
    pub fn len(&self) -> usize {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|n| *n as usize)
            .sum()
    }

    /// True when no call is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for LiveCall {
    fn drop(&mut self) {
        let mut calls = self.registry.calls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = calls.get_mut(&self.uuid) {
            *n -= 1;
            if *n == 0 {
                calls.remove(&self.uuid);
            }
        }
    }
}

/// Logs a warning when `addr` is not a loopback address: AudioSocket and FastAGI have no
/// authentication, so anyone who can reach the port can place calls (or read caller details).
pub fn warn_if_exposed(addr: SocketAddr, key: &str) {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "{key} listens on a non-loopback address: the protocol has no authentication; \
             firewall the port so only the Asterisk host can reach it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_set_evicts_the_oldest_and_frees_on_drop() {
        let set = PendingSet::new(2);
        let (a, ea) = set.admit();
        let (b, eb) = set.admit();
        assert!(!ea && !eb);
        assert_eq!(set.len(), 2);
        let (c, ec) = set.admit();
        assert!(ec, "the third admission evicts");
        assert_eq!(set.len(), 2);
        // `a` was told (a stored permit: notified() completes at once).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(100), a.evicted.notified())
                .await
                .expect("oldest evicted");
            assert!(tokio::time::timeout(Duration::from_millis(20), b.evicted.notified())
                .await
                .is_err());
        });
        drop(a); // already out of the queue: no effect
        assert_eq!(set.len(), 2);
        drop(b);
        drop(c);
        assert!(set.is_empty());
    }

    #[test]
    fn duplicate_uuids_get_their_own_label() {
        let live = LiveCalls::new();
        let u = Uuid::new_v4();
        let first = live.register(u);
        let second = live.register(u);
        assert_eq!(first.label, u.to_string());
        assert_eq!(second.label, format!("{u}#2"));
        assert_eq!(live.len(), 2);
        drop(second);
        let third = live.register(u);
        assert_eq!(third.label, format!("{u}#2"));
        drop(first);
        drop(third);
        assert!(live.is_empty());
    }
}
