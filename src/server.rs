//! The AudioSocket server: loads the engines once, listens, runs one task per connection and
//! shuts down cleanly on SIGINT/SIGTERM (each live call gets a hangup frame and a FIN).

use crate::admission::{self, LiveCalls, Pending, PendingSet};
use crate::audiosocket::{connection, FrameReader, FrameWriter};
use crate::call::{self, Shared};
use crate::config::Config;
use crate::conversation::ConversationLog;
use crate::directory::{CallDirectory, DEFAULT_TTL};
use crate::engines::Engines;
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn, Instrument};

/// Loads everything, binds the listener and serves until a shutdown signal.
///
/// # Errors
/// If a model cannot be loaded, the conversation log cannot be opened or the address cannot
/// be bound; each message names the file or address.
pub async fn run(mut cfg: Config) -> Result<()> {
    let started = Instant::now();
    crate::engines::apply_tier_max_calls(&mut cfg);
    // The admin's HTTP server first: /health says 503 while the models load (issue 9).
    let events = crate::events::EventBus::new();
    let admin = crate::http::start(&cfg, &events).await?;
    // Reserve the ports now, so a busy port fails at once, but listen only once the models and
    // prompts are ready: until then a connection is refused and the dialplan can route around.
    let reserved = reserve(cfg.server.audiosocket_listen, Some(SEND_BUFFER)).with_context(|| {
        format!(
            "cannot listen on {} (server.audiosocket_listen)",
            cfg.server.audiosocket_listen
        )
    })?;
    let agi_reserved = match cfg.agi.enabled {
        true => Some(
            reserve(cfg.agi.listen, None)
                .with_context(|| format!("cannot listen on {} ([agi] listen)", cfg.agi.listen))?,
        ),
        false => None,
    };
    crate::admission::warn_if_exposed(cfg.server.audiosocket_listen, "server.audiosocket_listen (AudioSocket)");
    if cfg.agi.enabled {
        crate::admission::warn_if_exposed(cfg.agi.listen, "[agi] listen (FastAGI)");
    }
    let log = ConversationLog::open_with_fault(&cfg.log.conversation_log, cfg.test_faults.log_fail_at)?;
    if cfg.test_faults.startup_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(cfg.test_faults.startup_delay_ms)).await;
    }
    let engines = tokio::task::block_in_place(|| Engines::load(&cfg))?;
    render_prompts(&engines, &cfg).await?;
    warm_recognizers(&engines, &cfg);
    let directory = Arc::new(CallDirectory::new(DEFAULT_TTL));
    let (stop_tx, stop_rx) = watch::channel(false);
    let agi = match agi_reserved {
        Some(socket) => {
            let l = socket
                .listen(1024)
                .with_context(|| format!("cannot listen on {} ([agi] listen)", cfg.agi.listen))?;
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(crate::agi::serve_bounded(
                l,
                directory.clone(),
                cfg.agi.max_sessions,
                async move {
                    let _ = stop.changed().await;
                },
            )))
        }
        None => None,
    };
    let listener = reserved.listen(1024).with_context(|| {
        format!(
            "cannot listen on {} (server.audiosocket_listen)",
            cfg.server.audiosocket_listen
        )
    })?;
    let history = crate::history::start(&cfg.history.path, cfg.history.keep_days, &events, directory.clone())?;
    let shared = Arc::new(Shared {
        engines,
        cfg,
        log,
        directory,
        events,
    });
    // issue 10: stop and join the LLM scheduler thread before the process exits.
    let llm = shared.engines.llm.clone();
    // Ready: /health turns 200; SIGHUP swaps in a new `Shared` for the calls that follow.
    let (current, admin_tasks) = crate::reload::ready(admin, shared);
    info!(
        addr = %listener.local_addr()?,
        startup_ms = started.elapsed().as_millis() as u64,
        "AudioSocket server ready"
    );
    serve(listener, current, async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    })
    .await?;
    // The calls' last events (their ends) reach the call history before the process exits.
    history.flush(Duration::from_secs(2)).await;
    admin_tasks.stop().await;
    if let Some(agi) = agi {
        let _ = tokio::time::timeout(Duration::from_secs(3), agi).await;
    }
    tokio::task::block_in_place(|| llm.shutdown());
    drop(llm);
    // The inference threads end once the calls and engines that feed them are gone; the process
    // must not exit under them (llama.cpp segfaults when torn down while its threads run).
    wait_for_workers().await;
    Ok(())
}

/// Renders the greeting and the fixed prompts of `cfg` into the TTS cache, at the two usual
/// call rates (8 and 16 kHz), so calls start speaking at once and the prompts play even if
/// synthesis later fails.
///
/// # Errors
/// If a prompt cannot be synthesized (the message quotes it).
pub async fn render_prompts(engines: &Engines, cfg: &Config) -> Result<()> {
    let c = &cfg.call;
    for text in [
        &cfg.agent.greeting,
        &c.filler,
        &c.not_understood,
        &c.apology,
        &c.goodbye,
        &c.busy,
        &c.second_filler,
        &c.reprompt,
    ] {
        for rate in [8000, 16000] {
            engines
                .tts
                .cached(text, rate)
                .await
                .with_context(|| format!("cannot synthesize the prompt {text:?}"))?;
        }
    }
    Ok(())
}

/// Starts warming `server.warm_recognizers` (at most `max_calls`) STT recognizers in the
/// background on the rendered prompts at 16 kHz (the greeting, then the others, at most 10 s
/// of speech), kept to warm the replacements of worn recognizers
/// (`server.recognizer_max_calls`). A failure only loses the warm-up (logged).
fn warm_recognizers(engines: &Engines, cfg: &Config) {
    let count = cfg.server.warm_recognizers.min(cfg.server.max_calls);
    let c = &cfg.call;
    let mut speech: Vec<i16> = Vec::new();
    for text in [
        &cfg.agent.greeting,
        &c.not_understood,
        &c.reprompt,
        &c.second_filler,
        &c.apology,
    ] {
        if let Some(audio) = engines.tts.get_cached(text, 16000) {
            speech.extend_from_slice(&audio);
        }
    }
    speech.truncate(16000 * 10);
    if let Err(e) = engines
        .stt
        .warm_up(speech, 16000, count, cfg.server.recognizer_max_calls)
    {
        warn!("could not warm the STT recognizers: {e:#}");
    }
}

/// Drops nothing itself: waits (at most [`WORKER_DEADLINE`]) for the STT, LLM and TTS threads
/// and the conversation log writer, which end when the last [`Shared`] is dropped.
async fn wait_for_workers() {
    let t = Instant::now();
    if crate::engines::wait_for_worker_threads(WORKER_DEADLINE).await {
        info!(ms = t.elapsed().as_millis() as u64, "all worker threads finished");
    } else {
        // Exiting normally now would tear llama.cpp down under a running thread: skip the
        // process teardown (the conversation log is written line by line, nothing is lost).
        error!(
            threads = crate::engines::worker_threads(),
            "worker threads still running {} s after shutdown: exiting without teardown",
            WORKER_DEADLINE.as_secs()
        );
        // SAFETY: _exit ends the process at once; no Rust state is used afterwards.
        unsafe { libc::_exit(0) };
    }
}

/// How long shutdown waits for the worker threads after the calls ended (a reply being
/// generated stops at its next token; Vosk finishes its queued audio, at most a few seconds).
const WORKER_DEADLINE: Duration = Duration::from_secs(10);

/// The kernel send buffer of each AudioSocket connection, in bytes (Linux doubles it): a paced
/// 20 ms stream needs only a few frames of it, and a fixed size (no autotuning up to MiBs)
/// makes a peer that stops reading block our writes within seconds, so the write deadline
/// (`server.write_timeout_ms`) ends its call, and bounds the kernel memory per call.
const SEND_BUFFER: u32 = 32 * 1024;

/// Binds a socket to `addr` without listening: the port is taken (a second server fails at
/// once) but connections are refused until [`tokio::net::TcpSocket::listen`]. Accepted
/// connections inherit `send_buffer` (bytes) when given.
fn reserve(addr: std::net::SocketAddr, send_buffer: Option<u32>) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if let Some(size) = send_buffer {
        socket.set_send_buffer_size(size)?;
    }
    socket.bind(addr)?;
    Ok(socket)
}

/// Accepts connections on `listener` until `shutdown` completes, then hangs up every call and
/// waits (at most 5 s) for them to close. Each call takes the [`Shared`] current when it is
/// accepted (`current`: a config reload swaps it; calls already running keep theirs).
///
/// A connection holds no call slot until its id frame arrived (within `server.id_timeout_ms`);
/// until then it is one of at most `server.max_pending` pending connections (the oldest is
/// closed when one more arrives). With `server.max_calls` calls live, a connection that sends
/// its id hears the busy prompt (`call.busy`) and a clean hangup.
pub async fn serve(
    listener: TcpListener,
    current: watch::Receiver<Arc<Shared>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let first = current.borrow().clone();
    let server = &first.cfg.server;
    // Limits are read once: `server.*` changes need a restart (a reload says so).
    let slots = Arc::new(Semaphore::new(server.max_calls));
    let pending = PendingSet::new(server.max_pending);
    let live = LiveCalls::new();
    // Connections evicted from the pending set may still be closing (at most SHORT_LINGER):
    // past this many tasks in all, new connections are closed without a task.
    let max_tasks = server.max_calls + 4 * server.max_pending;
    let mut calls = JoinSet::new();
    let (mut evictions, mut last_evict_log) = (0u64, None);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let shared = current.borrow().clone();
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if calls.len() >= max_tasks {
                    warn!(%peer, tasks = calls.len(), "refusing a connection: too many connections being handled");
                    continue; // dropping the stream closes it
                }
                let (ticket, evicted) = pending.admit();
                if evicted {
                    evictions += 1;
                    // One line per second at most: a flood must not flood the log too.
                    if last_evict_log.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(1)) {
                        warn!(max_pending = server.max_pending, evictions, "server.max_pending connections without an id frame: closing the oldest");
                        last_evict_log = Some(Instant::now());
                    }
                }
                let (reader, writer) = connection::split(stream);
                let task = Connection {
                    shared: shared.clone(),
                    slots: slots.clone(),
                    live: live.clone(),
                    stop: stop_rx.clone(),
                };
                calls.spawn(task.run(reader, writer, ticket).instrument(tracing::info_span!("conn", %peer)));
            }
            Some(done) = calls.join_next(), if !calls.is_empty() => {
                if let Err(e) = done {
                    error!("a call task panicked: {e}");
                }
            }
        }
    }
    info!(calls = live.len(), "shutting down: hanging up live calls");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while calls.join_next().await.is_some() {}
    })
    .await;
    if !calls.is_empty() {
        warn!(
            tasks = calls.len(),
            "shutdown: aborting connections still open after 5 s"
        );
        calls.shutdown().await;
    }
    info!(active_calls = first.events.active_calls(), "all calls ended");
    drop(first);
    Ok(())
}

/// One accepted connection, from the id frame to the close.
struct Connection {
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    live: Arc<LiveCalls>,
    stop: watch::Receiver<bool>,
}

impl Connection {
    async fn run(
        mut self,
        mut reader: FrameReader<OwnedReadHalf>,
        mut writer: FrameWriter<OwnedWriteHalf>,
        ticket: Pending,
    ) -> Option<call::CallEnd> {
        let server = &self.shared.cfg.server;
        let write_timeout = Duration::from_millis(server.write_timeout_ms);
        let id_timeout = Duration::from_millis(server.id_timeout_ms);
        let id = tokio::select! {
            id = admission::read_id(&mut reader, id_timeout) => id,
            _ = ticket.evicted.notified() => Err("closed: newer connections arrived while this one sent no id frame".into()),
            _ = self.stop.changed() => Err("closed: server shutting down".into()),
        };
        let uuid = match id {
            Ok(uuid) => uuid,
            Err(msg) => {
                if msg.starts_with("closed: newer") {
                    tracing::debug!("{msg}");
                } else {
                    warn!("{msg}");
                }
                drop(ticket);
                admission::close(&mut reader, &mut writer, true, write_timeout, admission::SHORT_LINGER).await;
                return None;
            }
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            warn!(call_id = %uuid, max_calls = server.max_calls, "server.max_calls calls live: playing the busy prompt and hanging up");
            // The dialplan's call-end step reads AVA_ACTION=busy and may try another host.
            self.shared
                .directory
                .set_decision(uuid, crate::directory::Decision::Busy);
            let busy = self.shared.engines.tts.get_cached(&self.shared.cfg.call.busy, 8000);
            let stop = ticket.evicted.clone();
            let mut shutdown = self.stop.clone();
            let busy_call = async {
                match busy {
                    Some(samples) => {
                        admission::play_busy(&mut reader, &mut writer, &samples, write_timeout, &stop).await
                    }
                    None => {
                        admission::close(&mut reader, &mut writer, true, write_timeout, admission::LINGER).await;
                    }
                }
            };
            let interrupted = tokio::select! {
                _ = busy_call => false,
                _ = shutdown.changed() => true,
            };
            if interrupted {
                admission::close(&mut reader, &mut writer, true, write_timeout, admission::SHORT_LINGER).await;
            }
            drop(ticket);
            return None;
        };
        drop(ticket);
        let call = self.live.register(uuid);
        let end = call::answer(
            uuid,
            call.label.clone(),
            reader,
            writer,
            self.shared.clone(),
            self.stop.clone(),
        )
        .await;
        drop(call);
        drop(slot);
        Some(end)
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}
