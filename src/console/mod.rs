//! `asterisk-voice-agent console`: one call through the machine's microphone and speakers, run
//! by the same call code as `serve` (VAD, turn-taking, barge-in, fallbacks, conversation log):
//! only the transport differs ([`device`] instead of an AudioSocket connection). The screen
//! follows the call's events on the event bus ([`screen`]); [`echo`] keeps the agent's own
//! voice, coming back through the microphone, from interrupting it.

pub mod device;
pub mod echo;
pub mod screen;

use crate::call::{self, CallEnd, Shared};
use crate::config::Config;
use crate::conversation::ConversationLog;
use crate::directory::{CallDirectory, DEFAULT_TTL};
use crate::engines::Engines;
use crate::events::{CallEventKind, EventBus};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// `console` arguments.
#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// TOML configuration file (as for `serve`; the `[server]` and `[agi]` parts are unused).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Capture device name (see --list-devices). Default: the system's default input.
    #[arg(long)]
    pub input: Option<String>,
    /// Playback device name (see --list-devices). Default: the system's default output.
    #[arg(long)]
    pub output: Option<String>,
    /// List the capture and playback devices with the formats they offer, and exit.
    #[arg(long)]
    pub list_devices: bool,
    /// Print one JSON line per call event instead of the transcript.
    #[arg(long)]
    pub json: bool,
    /// You wear a headset: the agent's voice cannot reach the microphone, so no echo gate.
    #[arg(long)]
    pub headset: bool,
    /// Echo gate margin in dB: while the agent talks, the microphone must be at least this
    /// loud relative to the agent's playback level to be heard (-6: up to 6 dB quieter).
    /// Raise it (e.g. 0 or 6) if the agent interrupts itself on loud speakers.
    #[arg(long, default_value_t = echo::DEFAULT_MARGIN_DB, allow_negative_numbers = true)]
    pub echo_margin_db: f32,
}

/// DTMF keys tried, in order, for the hangup binding Ctrl-C presses (one not bound already).
const HANGUP_KEYS: [char; 4] = ['D', 'C', 'B', 'A'];

/// Runs the console command. Exit status 0 when the call ended normally, 1 on an error (no
/// device, a device that failed mid-call, a model that does not load).
///
/// # Errors
/// The config, a device or a model cannot be opened; each message says which and what to do.
pub fn main(args: ConsoleArgs) -> Result<ExitCode> {
    if args.list_devices {
        print!("{}", device::list_devices()?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    // Ctrl-C presses a hangup key: the call says its goodbye and hangs up, as for a caller's
    // DTMF hangup binding. Use the config's binding, else bind a free key.
    let hangup_key = match cfg.actions.dtmf.iter().find(|(_, v)| v.as_str() == "hangup") {
        Some((k, _)) => k.chars().next().unwrap_or('D'),
        None => {
            let key = HANGUP_KEYS
                .into_iter()
                .find(|k| !cfg.actions.dtmf.contains_key(&k.to_string()))
                .context("DTMF keys A-D are all bound: bind one to \"hangup\" for Ctrl-C")?;
            cfg.actions.dtmf.insert(key.to_string(), "hangup".into());
            key
        }
    };

    // Devices first: a missing microphone is reported before the models load.
    let reference = Arc::new(echo::EchoReference::default());
    let gate = echo::EchoGate {
        margin_db: (!args.headset).then_some(args.echo_margin_db),
    };
    let hangup = Arc::new(AtomicBool::new(false));
    // The streams stay on this thread (cpal streams are not `Send`); the call's sides of them
    // move into the call.
    let (capture, input) = device::open_input(
        args.input.as_deref(),
        gate,
        reference.clone(),
        hangup.clone(),
        hangup_key,
    )?;
    let (playback, output) = device::open_output(args.output.as_deref(), reference)?;
    let gated = input.gated_frames();
    eprintln!("microphone: {}", capture.description);
    eprintln!("speaker:    {}", playback.description);
    if args.headset {
        eprintln!("echo gate:  off (--headset)");
    } else {
        eprintln!(
            "echo gate:  on, margin {} dB (with a headset, pass --headset)",
            args.echo_margin_db
        );
    }

    let log = open_log(&cfg)?;
    let greeting = cfg.agent.greeting.clone();
    let json = args.json;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let end = rt.block_on(async move {
        eprintln!("loading the models...");
        let engines = tokio::task::block_in_place(|| Engines::load(&cfg))?;
        crate::server::render_prompts(&engines, &cfg).await?;
        let shared = Arc::new(Shared {
            engines,
            cfg,
            log,
            directory: Arc::new(CallDirectory::new(DEFAULT_TTL)),
            events: EventBus::new(),
        });
        let events = shared.events.subscribe();
        let screen = tokio::spawn(show(events, greeting, json));
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nhanging up (Ctrl-C again to stop at once)...");
                hangup.store(true, Ordering::Relaxed);
                if tokio::signal::ctrl_c().await.is_ok() {
                    let _ = stop_tx.send(true);
                }
            }
        });
        let end = call::run(input, output, shared, stop_rx).await;
        // The screen ends with the call's Ended event.
        let _ = tokio::time::timeout(Duration::from_secs(2), screen).await;
        anyhow::Ok(end)
    })?;
    drop(capture);
    drop(playback);
    eprintln!(
        "echo gate muted {} microphone frames with sound (20 ms each)",
        gated.load(Ordering::Relaxed)
    );
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(match end {
        CallEnd::Error(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    })
}

/// The configured conversation log, or (if it cannot be written, e.g. the service's log
/// folder as a normal user) one in the temp folder, with a warning.
fn open_log(cfg: &Config) -> Result<ConversationLog> {
    let path = &cfg.log.conversation_log;
    match ConversationLog::open(path) {
        Ok(log) => {
            eprintln!("conversation log: {}", path.display());
            Ok(log)
        }
        Err(e) => {
            let alt = std::env::temp_dir().join("asterisk-voice-agent-console.jsonl");
            eprintln!(
                "warning: {e:#}; writing the conversation log to {} instead",
                alt.display()
            );
            ConversationLog::open(&alt)
        }
    }
}

/// Prints the call's events until it ends: the transcript ([`screen::Screen`]) or JSON lines.
async fn show(mut events: broadcast::Receiver<Arc<crate::events::CallEvent>>, greeting: String, json: bool) {
    let mut screen = screen::Screen::new(&greeting);
    loop {
        let ev = match events.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                eprintln!("({n} events skipped)");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let mut out = std::io::stdout().lock();
        if json {
            let _ = writeln!(out, "{}", serde_json::to_string(&*ev).unwrap_or_default());
        } else {
            for line in screen.lines(&ev) {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = out.flush();
        if matches!(ev.kind, CallEventKind::Ended { .. }) {
            return;
        }
    }
}
