//! The AudioSocket server: loads the engines once, listens, runs one task per connection and
//! shuts down cleanly on SIGINT/SIGTERM (each live call gets a hangup frame and a FIN).

use crate::audiosocket::connection;
use crate::call::{self, Shared};
use crate::config::Config;
use crate::conversation::ConversationLog;
use crate::directory::{CallDirectory, DEFAULT_TTL};
use crate::engines::Engines;
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// Loads everything, binds the listener and serves until a shutdown signal.
///
/// # Errors
/// If a model cannot be loaded, the conversation log cannot be opened or the address cannot
/// be bound; each message names the file or address.
pub async fn run(cfg: Config) -> Result<()> {
    let started = Instant::now();
    // The admin's HTTP server first: /health says 503 while the models load (issue 9).
    let events = crate::events::EventBus::new();
    let admin = crate::http::start(&cfg, &events).await?;
    let listener = TcpListener::bind(cfg.server.audiosocket_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (server.audiosocket_listen)",
                cfg.server.audiosocket_listen
            )
        })?;
    let log = ConversationLog::open(&cfg.log.conversation_log)?;
    if cfg.test_faults.startup_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(cfg.test_faults.startup_delay_ms)).await;
    }
    let engines = tokio::task::block_in_place(|| Engines::load(&cfg))?;
    render_prompts(&engines, &cfg).await?;
    let directory = Arc::new(CallDirectory::new(DEFAULT_TTL));
    let (stop_tx, stop_rx) = watch::channel(false);
    let agi = if cfg.agi.enabled {
        let l = TcpListener::bind(cfg.agi.listen)
            .await
            .with_context(|| format!("cannot listen on {} ([agi] listen)", cfg.agi.listen))?;
        let mut stop = stop_rx.clone();
        Some(tokio::spawn(crate::agi::serve(l, directory.clone(), async move {
            let _ = stop.changed().await;
        })))
    } else {
        None
    };
    let history = crate::history::start(&cfg.history.path, cfg.history.keep_days, &events, directory.clone())?;
    let shared = Arc::new(Shared {
        engines,
        cfg,
        log,
        directory,
        events,
    });
    // Ready: /health turns 200; SIGHUP swaps in a new `Shared` for the calls that follow.
    let current = crate::reload::ready(admin, shared);
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
    if let Some(agi) = agi {
        let _ = tokio::time::timeout(Duration::from_secs(3), agi).await;
    }
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

/// Accepts connections on `listener` until `shutdown` completes, then hangs up every call and
/// waits (at most 5 s) for them to close. Each call takes the [`Shared`] current when it is
/// accepted (`current`: a config reload swaps it; calls already running keep theirs).
pub async fn serve(
    listener: TcpListener,
    current: watch::Receiver<Arc<Shared>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = current.borrow().clone();
    let limit = Arc::new(Semaphore::new(shared.cfg.server.max_calls));
    let mut calls = JoinSet::new();
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
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    warn!(%peer, max_calls = shared.cfg.server.max_calls, "refusing a call: server.max_calls reached");
                    continue; // dropping the stream closes it
                };
                let (reader, writer) = connection::split(stream);
                let shared = shared.clone();
                let stop = stop_rx.clone();
                calls.spawn(async move {
                    let end = call::run(reader, writer, shared, stop).await;
                    drop(permit);
                    end
                });
            }
            Some(done) = calls.join_next(), if !calls.is_empty() => {
                if let Err(e) = done {
                    error!("a call task panicked: {e}");
                }
            }
        }
    }
    info!(calls = calls.len(), "shutting down: hanging up live calls");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while calls.join_next().await.is_some() {}
    })
    .await;
    info!(active_calls = shared.events.active_calls(), "all calls ended");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}
