//! The admin's HTTP server (axum): `GET /health` for monitoring and systemd, `GET /metrics`
//! for Prometheus, the live calls page at `/` with its Server-Sent Events stream and the
//! call-history API. It binds `[http] listen` (loopback by default) before the models load, so
//! `/health` answers 503 until the service is ready. A listen address other than loopback
//! needs `[http] token`: every request must then carry `Authorization: Bearer TOKEN` (or
//! `?token=TOKEN`, for the page's EventSource, which cannot set headers); the comparison is
//! constant-time. It reads shared state only: it never touches a call.

use crate::config::{Config, ConfigSource};
use crate::events::{CallEvent, EventBus};
use crate::history::{self, Search};
use anyhow::{Context, Result};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{error, info};

/// Live-page viewers (SSE streams) served at once; more get 503.
pub const MAX_VIEWERS: usize = 32;

/// What `/health` reports besides the live figures; replaced on each reload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// The installed model tier (`test`, `small`, ...) from the manifest, if any.
    pub tier: Option<String>,
    /// Model id per kind (`stt`, `llm`, `tts`): the registry id from the manifest, or the file
    /// name of an explicit `[models]` path.
    pub models: BTreeMap<String, String>,
    /// The config in force: file, SHA-256 of its text, load time.
    pub config: Option<ConfigSource>,
}

impl Status {
    /// The status for `cfg` (reads the model manifest).
    pub fn of(cfg: &Config) -> Status {
        use crate::models::ModelKind;
        let manifest = crate::models::manifest::load(&cfg.models.dir).ok();
        let mut models = BTreeMap::new();
        for (kind, key, explicit) in [
            (ModelKind::Stt, "stt", &cfg.models.stt),
            (ModelKind::Llm, "llm", &cfg.models.llm),
            (ModelKind::Tts, "tts", &cfg.models.tts),
        ] {
            let id = match explicit {
                Some(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
                None => manifest
                    .as_ref()
                    .and_then(|m| m.models.get(&kind))
                    .map(|m| m.id.clone()),
            };
            if let Some(id) = id {
                models.insert(key.to_string(), id);
            }
        }
        Status {
            tier: manifest.as_ref().map(|m| m.tier().to_string()),
            models,
            config: cfg.source.clone(),
        }
    }
}

/// Shared by the handlers.
pub struct AdminState {
    started: Instant,
    ready: AtomicBool,
    token: Option<String>,
    events: EventBus,
    history: history::Reader,
    status: RwLock<Status>,
    viewers: Arc<Semaphore>,
}

impl AdminState {
    /// Marks the service ready (engines loaded, listeners bound): `/health` turns 200.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Replaces what `/health` says about the models and the config (after a reload).
    pub fn set_status(&self, status: Status) {
        *self.status.write().unwrap_or_else(|e| e.into_inner()) = status;
    }
}

/// The `/health` body.
#[derive(Debug, Serialize)]
pub struct Health {
    /// Engines loaded and listeners bound.
    pub ready: bool,
    /// Calls live now (id frame received, not yet ended).
    pub active_calls: usize,
    /// Seconds since `serve` started.
    pub uptime_s: f64,
    /// This binary's version.
    pub version: &'static str,
    /// Models and config.
    #[serde(flatten)]
    pub status: Status,
}

/// Binds `[http] listen` and serves the admin endpoints on the runtime; `/health` answers 503
/// until [`AdminState::set_ready`].
///
/// # Errors
/// If the address cannot be bound (the message names `[http] listen`).
pub async fn start(cfg: &Config, events: &EventBus) -> Result<Arc<AdminState>> {
    let listen = cfg.http.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} ([http] listen)"))?;
    let addr: SocketAddr = listener.local_addr()?;
    let state = Arc::new(AdminState {
        started: Instant::now(),
        ready: AtomicBool::new(false),
        token: cfg.http.token.clone().filter(|t| !t.is_empty()),
        events: events.clone(),
        history: history::Reader::new(&cfg.history.path),
        status: RwLock::new(Status::of(cfg)),
        viewers: Arc::new(Semaphore::new(MAX_VIEWERS)),
    });
    let app = router(state.clone());
    info!(%addr, auth = state.token.is_some(), "admin HTTP server listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!("admin HTTP server stopped: {e}");
        }
    });
    Ok(state)
}

/// The routes, behind the bearer-token check when a token is set.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/events", get(events))
        .route("/api/live", get(live))
        .route("/api/calls", get(calls))
        .route("/api/calls/{id}", get(call))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// True when `given` equals `expected`, in time independent of where they differ.
pub fn token_matches(given: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

async fn auth(State(s): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    let Some(expected) = &s.token else {
        return next.run(req).await;
    };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    if bearer.or(query).is_some_and(|t| token_matches(t, expected)) {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong bearer token ([http] token)\n",
        )
            .into_response()
    }
}

async fn health(State(s): State<Arc<AdminState>>) -> Response {
    let ready = s.ready.load(Ordering::SeqCst);
    let body = Health {
        ready,
        active_calls: s.events.active_calls(),
        uptime_s: (s.started.elapsed().as_millis() as f64 / 1000.0),
        version: env!("CARGO_PKG_VERSION"),
        status: s.status.read().unwrap_or_else(|e| e.into_inner()).clone(),
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Rendered on a blocking thread: encoding every metric takes locks and allocates, and the
/// runtime's workers pace the calls' audio.
async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    let active = s.events.active_calls();
    let text = match tokio::task::spawn_blocking(move || crate::metrics::render(active)).await {
        Ok(text) => text,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

async fn page() -> Html<&'static str> {
    Html(include_str!("admin_page.html"))
}

async fn live(State(s): State<Arc<AdminState>>) -> Response {
    Json(s.events.live_calls()).into_response()
}

async fn calls(State(s): State<Arc<AdminState>>, Query(q): Query<Search>) -> Response {
    let reader = s.history.clone();
    match tokio::task::spawn_blocking(move || reader.search(&q)).await {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => history_error(e),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Serialize)]
struct CallDetail {
    call: history::CallRow,
    turns: Vec<history::TurnRow>,
}

async fn call(State(s): State<Arc<AdminState>>, Path(id): Path<i64>) -> Response {
    let reader = s.history.clone();
    match tokio::task::spawn_blocking(move || reader.call(id)).await {
        Ok(Ok(Some((call, turns)))) => Json(CallDetail { call, turns }).into_response(),
        Ok(Ok(None)) => (StatusCode::NOT_FOUND, "no such call\n").into_response(),
        Ok(Err(e)) => history_error(e),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn history_error(e: rusqlite::Error) -> Response {
    error!("call history read failed: {e}");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("call history unavailable: {e}\n"),
    )
        .into_response()
}

struct Viewer {
    rx: tokio::sync::broadcast::Receiver<Arc<CallEvent>>,
    events: EventBus,
    pending: Option<Event>,
    _permit: OwnedSemaphorePermit,
}

fn snapshot(events: &EventBus) -> Event {
    Event::default()
        .event("snapshot")
        .json_data(events.live_calls())
        .unwrap_or_default()
}

/// The live stream: a `snapshot` event (every live call with its state and transcript so
/// far), then one unnamed event per call event (JSON, see [`CallEvent`]); a viewer that
/// fell behind gets a fresh snapshot.
async fn events(State(s): State<Arc<AdminState>>) -> Response {
    let Ok(permit) = s.viewers.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many live viewers\n").into_response();
    };
    let rx = s.events.subscribe();
    let v = Viewer {
        rx,
        pending: Some(snapshot(&s.events)),
        events: s.events.clone(),
        _permit: permit,
    };
    let stream = futures_util::stream::unfold(v, |mut v| async move {
        if let Some(ev) = v.pending.take() {
            return Some((Ok::<_, Infallible>(ev), v));
        }
        let ev = match v.rx.recv().await {
            Ok(ev) => Event::default().json_data(&*ev).unwrap_or_default(),
            Err(RecvError::Lagged(_)) => snapshot(&v.events),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(ev), v))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cre", "s3cret"));
        assert!(!token_matches("s3cret!", "s3cret"));
        assert!(!token_matches("", "s3cret"));
        assert!(!token_matches("S3cret", "s3cret"));
    }
}
