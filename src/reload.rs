//! Reload without restart: on SIGHUP (`systemctl reload`) the config file is read again and a
//! new [`Shared`] (engines + config + log + directory + events) replaces the current one for
//! calls that start from then on. Live calls keep the `Arc<Shared>` they took when they
//! started, so they go on untouched. Engines are reused when nothing that shapes them changed
//! (model paths, the manifest's choice, `[llm]`, `[tts]`, fallback models); otherwise the new
//! models load first and the old ones are freed when the last call using them ends. The
//! greeting and fixed prompts are rendered before the swap. An invalid config (or a model that
//! does not load) keeps the running one and logs why, naming the key.

use crate::call::Shared;
use crate::config::Config;
use crate::conversation::ConversationLog;
use crate::engines::{Engines, ModelPaths};
use crate::http::{AdminState, Status};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Marks the service ready and starts its background admin tasks: the metrics feeder (call
/// events -> Prometheus metrics) and, when the config came from a file, the SIGHUP reloader.
/// Returns the receiver the accept loop reads the current [`Shared`] from.
///
/// The returned [`AdminTasks`] hold the current `Shared` (the reloader's sender, the feeder's
/// receiver): [`AdminTasks::stop`] them at shutdown so the engines, and the worker threads
/// that end with them, are dropped before the process exits.
pub fn ready(admin: Arc<AdminState>, shared: Arc<Shared>) -> (watch::Receiver<Arc<Shared>>, AdminTasks) {
    let (tx, rx) = watch::channel(shared.clone());
    let mut sub = shared.events.subscribe();
    let feeder_rx = rx.clone();
    let mut tasks = AdminTasks(Vec::new());
    tasks.0.push(tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        let mut feeder = crate::metrics::Feeder::default();
        loop {
            match sub.recv().await {
                Ok(ev) => feeder.observe(&ev, feeder_rx.borrow().cfg.vad.end_silence_ms),
                Err(RecvError::Lagged(n)) => warn!(skipped = n, "metrics fell behind the call events"),
                Err(RecvError::Closed) => return,
            }
        }
    }));
    if let Some(path) = shared.cfg.source.as_ref().map(|s| s.path.clone()) {
        let admin = admin.clone();
        tasks.0.push(tokio::spawn(on_sighup(path, tx, admin)));
    }
    admin.set_ready();
    (rx, tasks)
}

/// The background tasks [`ready`] started (metrics feeder, SIGHUP reloader).
pub struct AdminTasks(Vec<tokio::task::JoinHandle<()>>);

impl AdminTasks {
    /// Stops the tasks, releasing the `Shared` they hold.
    pub async fn stop(self) {
        for t in self.0 {
            t.abort();
            let _ = t.await;
        }
    }
}

async fn on_sighup(path: PathBuf, tx: watch::Sender<Arc<Shared>>, admin: Arc<AdminState>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            error!("cannot handle SIGHUP, reload disabled: {e}");
            return;
        }
    };
    while hup.recv().await.is_some() {
        info!(config = %path.display(), "SIGHUP received: reloading the config");
        match reload(&path, &tx).await {
            Ok(what) => {
                crate::metrics::METRICS.config_reloads.with_label_values(&["ok"]).inc();
                let current = tx.borrow().clone();
                let cfg = &current.cfg;
                admin.set_status(Status::of(cfg));
                info!(
                    sha256 = %cfg.source.as_ref().map(|s| s.sha256.as_str()).unwrap_or(""),
                    models = what,
                    "config reloaded: new calls use it, live calls go on unchanged"
                );
            }
            Err(e) => {
                crate::metrics::METRICS
                    .config_reloads
                    .with_label_values(&["invalid"])
                    .inc();
                error!("config reload failed, keeping the running config: {e:#}");
            }
        }
    }
}

/// Reads `path`, builds the new [`Shared`] and swaps it in. Returns `"reused"` or `"loaded"`
/// (what happened to the engines).
///
/// # Errors
/// An unreadable or invalid file (the message names the key), a model that does not load, a
/// prompt that cannot be synthesized, a conversation log that cannot be opened. Nothing is
/// swapped then.
pub async fn reload(path: &Path, tx: &watch::Sender<Arc<Shared>>) -> Result<&'static str> {
    let cfg = Config::load(path)?;
    let old = tx.borrow().clone();
    warn_restart_only(&old.cfg, &cfg);
    let (engines, what) = if engines_unchanged(&old.cfg, &cfg) {
        (old.engines.clone(), "reused")
    } else {
        let c = cfg.clone();
        let engines = tokio::task::spawn_blocking(move || Engines::load(&c))
            .await
            .context("model loading panicked")??;
        (engines, "loaded")
    };
    crate::server::render_prompts(&engines, &cfg).await?;
    let log = if cfg.log.conversation_log == old.cfg.log.conversation_log {
        old.log.clone()
    } else {
        ConversationLog::open(&cfg.log.conversation_log)?
    };
    let new = Shared {
        engines,
        cfg,
        log,
        ..(*old).clone()
    };
    tx.send_replace(Arc::new(new));
    Ok(what)
}

/// True when the engines built from `new` would be the same as from `old`: same resolved
/// model files and the same settings that shape them.
pub fn engines_unchanged(old: &Config, new: &Config) -> bool {
    let key = |c: &Config| {
        let paths = ModelPaths::resolve(c, &crate::models::manifest::load(&c.models.dir))
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|e| format!("unresolved: {e:#}"));
        serde_json::json!({
            "paths": paths,
            "models": c.models,
            "llm": c.llm,
            "tts": c.tts,
            "fallback_llm": c.call.fallback_llm,
            "fallback_voice": c.call.fallback_voice,
        })
    };
    key(old) == key(new)
}

fn warn_restart_only(old: &Config, new: &Config) {
    let pairs = [
        (
            "server.audiosocket_listen",
            old.server.audiosocket_listen != new.server.audiosocket_listen,
        ),
        ("server.max_calls", old.server.max_calls != new.server.max_calls),
        ("agi", format!("{:?}", old.agi) != format!("{:?}", new.agi)),
        ("http", format!("{:?}", old.http) != format!("{:?}", new.http)),
        ("history", format!("{:?}", old.history) != format!("{:?}", new.history)),
    ];
    for (key, changed) in pairs {
        if changed {
            warn!(key, "this setting changed but only takes effect after a restart");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_and_turn_changes_keep_the_engines() {
        let old = Config::parse("[models]\nllm = \"/m/a.gguf\"\n").unwrap();
        let new =
            Config::parse("[models]\nllm = \"/m/a.gguf\"\n[agent]\ngreeting = \"Hi.\"\n[vad]\nend_silence_ms = 500\n")
                .unwrap();
        assert!(engines_unchanged(&old, &new));
        let other = Config::parse("[models]\nllm = \"/m/b.gguf\"\n").unwrap();
        assert!(!engines_unchanged(&old, &other));
        let hot = Config::parse("[models]\nllm = \"/m/a.gguf\"\n[llm]\ntemperature = 0.1\n").unwrap();
        assert!(!engines_unchanged(&old, &hot));
    }
}
