//! The FastAGI server: call control through the dialplan.
//!
//! This module owns the FastAGI side of a call: it listens (default `127.0.0.1:4573`,
//! `[agi] listen`), reads the variable block Asterisk sends when the dialplan runs
//! `AGI(agi://127.0.0.1:4573/<script>,<args>)`, and runs one of two scripts against the shared
//! [`CallDirectory`]:
//!
//! - `call-start`, before `AudioSocket()`: takes the call UUID from argument 1 (or makes a v4
//!   UUID), stores the caller's [`CallerInfo`] under it and always sets the channel variable
//!   `AVA_UUID`, so the dialplan can write `AudioSocket(${AVA_UUID},...)`.
//! - `call-end`, after `AudioSocket()` returns: takes the agent's [`Decision`] for the UUID in
//!   argument 1 and sets `AVA_ACTION` (`hangup` | `transfer` | `continue`) and, for a transfer,
//!   `AVA_TRANSFER` (the dial string) and `AVA_TRANSFER_NAME`.
//!
//! Protocol facts, from Asterisk's `res/res_agi.c` (`launch_netscript`, `setup_env`,
//! `agi_handle_command`, `parse_args`, `run_agi`):
//! - Asterisk connects and writes `name: value` lines (`agi_network: yes`,
//!   `agi_network_script: call-start`, `agi_request`, `agi_channel`, `agi_language`,
//!   `agi_uniqueid`, `agi_callerid`, `agi_calleridname`, `agi_dnid`, ..., then `agi_arg_1`,
//!   `agi_arg_2`, ... for the application's arguments), ended by an empty line.
//! - The server then writes one command per line; Asterisk answers each with `200 result=N`
//!   (`200 result=1 (value)` for data), `510 Invalid or unknown command`, `511 Command Not
//!   Permitted on a dead channel ...`, or a multi-line `520-...` usage text closed by a
//!   `520 End of proper usage.` line. Asterisk splits a command into words on spaces and tabs;
//!   `"` quotes, `\` escapes the next character (`\"`, `\\`). Its command buffer is 2 KiB.
//! - When the channel hangs up during the session Asterisk writes a `HANGUP` line (network AGI
//!   only) and commands may then answer `result=-1` or `511`.
//! - The dialplan continues with the next priority when the server closes the socket.
//!
//! One task per session; a bad session (no blank line within [`HEADER_TIMEOUT`], a line over
//! [`MAX_DISCARD`] bytes, non-UTF-8, garbage) is logged and closed without touching the others.

use crate::directory::{CallDirectory, CallerInfo, Decision};
use crate::logsafe;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, error, info, info_span, warn, Instrument};
use uuid::Uuid;

/// Default FastAGI listen address (port 4573 is FastAGI's default in `res/res_agi.c`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4573";

/// Asterisk sends the whole variable block at once; a session without the blank line that
/// ends it within this time is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest time to wait for Asterisk's answer to one command.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest part of a line kept from Asterisk, in bytes (its command buffer is 2 KiB; the
/// variable block's values have no fixed limit): the rest of a longer line is dropped.
pub const MAX_LINE: usize = 8 * 1024;

/// Longest line read at all, in bytes (the most buffered per session): a session sending a
/// longer one is closed.
pub const MAX_DISCARD: usize = 64 * 1024;

/// Sessions open at once by default (`[agi] max_sessions`).
pub const DEFAULT_MAX_SESSIONS: usize = 64;

/// Caller details (name, number, channel, ...) kept in the call directory are cut to this many
/// characters.
pub const MAX_CALLER_VALUE: usize = 256;

/// Most lines accepted in the variable block (Asterisk sends about 20 plus the arguments).
pub const MAX_HEADER_LINES: usize = 256;

/// Longest command line we send: Asterisk reads commands into a 2 KiB buffer.
const MAX_COMMAND: usize = 2000;

/// How long [`serve`] waits for sessions still under way once shutdown was asked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The channel variable holding the call UUID.
pub const VAR_UUID: &str = "AVA_UUID";
/// The channel variable holding the agent's decision: `hangup`, `transfer` or `continue`.
pub const VAR_ACTION: &str = "AVA_ACTION";
/// The channel variable holding the transfer dial string, e.g. `PJSIP/100`.
pub const VAR_TRANSFER: &str = "AVA_TRANSFER";
/// The channel variable holding the transfer destination's configured name, e.g. `operator`.
pub const VAR_TRANSFER_NAME: &str = "AVA_TRANSFER_NAME";

/// Accepts FastAGI sessions on `listener` until `shutdown` completes, one task each, all
/// answering from `directory`. On shutdown it stops accepting, gives the sessions under way
/// up to 2 s (each is bounded by [`HEADER_TIMEOUT`] and [`REPLY_TIMEOUT`]) and aborts the rest.
///
/// # Errors
/// Never for a bad session (those are logged and closed); only if the listener's address
/// cannot be read.
pub async fn serve(
    listener: TcpListener,
    directory: Arc<CallDirectory>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    serve_bounded(listener, directory, DEFAULT_MAX_SESSIONS, shutdown).await
}

/// [`serve`] with at most `max_sessions` sessions open at once (`[agi] max_sessions`); a
/// connection beyond that is closed at once with a warning, so idle FastAGI connections cannot
/// take the process's file descriptors.
///
/// # Errors
/// As [`serve`].
pub async fn serve_bounded(
    listener: TcpListener,
    directory: Arc<CallDirectory>,
    max_sessions: usize,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr = listener.local_addr().context("FastAGI listener has no address")?;
    info!(%addr, "FastAGI server ready");
    let mut sessions = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        error!("FastAGI session panicked: {e}");
                    }
                }
            }
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!("FastAGI accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if sessions.len() >= max_sessions {
                    warn!(%peer, max_sessions, "refusing a FastAGI connection: [agi] max_sessions sessions open");
                    continue; // dropping the stream closes it
                }
                let directory = directory.clone();
                sessions.spawn(
                    async move { session(stream, &directory).await }
                        .instrument(info_span!("agi", %peer)),
                );
            }
        }
    }
    drop(listener);
    if !sessions.is_empty() {
        debug!(sessions = sessions.len(), "FastAGI shutdown: waiting for sessions");
        let drain = async { while sessions.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            warn!(
                sessions = sessions.len(),
                "FastAGI shutdown: aborting sessions still open"
            );
            sessions.shutdown().await;
        }
    }
    info!("FastAGI server stopped");
    Ok(())
}

/// The variable block Asterisk sends at the start of a FastAGI session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgiRequest {
    /// Every `agi_*` variable but the arguments, by name without the `agi_` prefix
    /// (`callerid`, `dnid`, `network_script`, ...).
    pub vars: BTreeMap<String, String>,
    /// `agi_arg_1`, `agi_arg_2`, ... in order (a missing number ends the list).
    pub args: Vec<String>,
}

impl AgiRequest {
    /// A variable's value, `None` when absent, empty or `unknown` (Asterisk's placeholder for
    /// an unset caller ID or DNID).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty() && !v.eq_ignore_ascii_case("unknown"))
    }

    /// The script name: `agi_network_script` (the URL path, e.g. `call-start`), else the path
    /// of `agi_request`, without slashes or a `?query`.
    pub fn script(&self) -> Option<String> {
        let raw = match self.get("network_script") {
            Some(s) => s.to_string(),
            None => {
                let req = self.get("request")?;
                let rest = req.split_once("://").map_or(req, |(_, r)| r);
                rest.split_once('/').map(|(_, p)| p.to_string())?
            }
        };
        let path = raw.split(['?', '#']).next().unwrap_or("").trim_matches('/');
        (!path.is_empty()).then(|| path.to_string())
    }

    /// Argument `n` (1-based), `None` when absent or blank.
    pub fn arg(&self, n: usize) -> Option<&str> {
        self.args
            .get(n.checked_sub(1)?)
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
    }

    /// The caller's details for the call directory, each cut to [`MAX_CALLER_VALUE`] characters.
    pub fn caller_info(&self) -> CallerInfo {
        let get = |k: &str| self.get(k).map(|v| v.chars().take(MAX_CALLER_VALUE).collect());
        CallerInfo {
            caller_id: get("callerid"),
            caller_name: get("calleridname"),
            dnid: get("dnid"),
            language: get("language"),
            channel: get("channel"),
            unique_id: get("uniqueid"),
        }
    }
}

/// Quotes `value` as one argument of an AGI command the way Asterisk's `parse_args` in
/// `res/res_agi.c` reads it back: inside double quotes, with `"` and `\` escaped by a
/// backslash. Line breaks and other control characters but tab (which would end or corrupt the
/// command line) become spaces.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `SET VARIABLE` command line (without the newline) for `name` = `value`.
pub fn set_variable_command(name: &str, value: &str) -> String {
    format!("SET VARIABLE {name} {}", quote(value))
}

/// One answer from Asterisk to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgiReply {
    /// The status code: 200 success, 510 unknown command, 511 dead channel, 520 usage.
    pub code: u16,
    /// `result=N` of a 200 answer.
    pub result: Option<i64>,
    /// The whole text after the code (all lines of a multi-line answer, joined by `\n`).
    pub text: String,
}

impl AgiReply {
    /// True for `200` with a result other than -1 (-1: the channel hung up or the command
    /// failed).
    pub fn ok(&self) -> bool {
        self.code == 200 && self.result != Some(-1)
    }
}

/// Why a session ended early.
#[derive(Debug)]
enum SessionEnd {
    /// Asterisk closed the socket (the channel went away, or a client gave up).
    Closed,
    /// The channel hung up: `HANGUP` line or `200 result=-1`.
    HungUp,
    /// Anything else: bad input, I/O error, timeout.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for SessionEnd {
    fn from(e: anyhow::Error) -> Self {
        SessionEnd::Failed(e)
    }
}

/// Reads one line, without its `\n` / `\r\n`, keeping at most [`MAX_LINE`] bytes of it: the
/// rest of a longer line (a caller name set by a SIP peer can be any length; Asterisk's
/// `setup_env` formats values into a growing `ast_str`) is dropped, with a warning; a line is
/// read up to [`MAX_DISCARD`] bytes (so at most that much is buffered per session). A line cut
/// inside a UTF-8 character keeps the valid prefix. `Ok(None)` at a clean EOF before any byte.
///
/// # Errors
/// A line over [`MAX_DISCARD`] bytes, an EOF inside a line, a read error, or a line (within its
/// first [`MAX_LINE`] bytes) that is not UTF-8.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Option<String>> {
    let mut buf = Vec::new();
    let n = (&mut *reader)
        .take(MAX_DISCARD as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await
        .context("read failed")?;
    if n == 0 {
        return Ok(None);
    }
    if buf.pop() != Some(b'\n') {
        if n > MAX_DISCARD {
            bail!("line longer than {MAX_DISCARD} bytes");
        }
        bail!("connection closed in the middle of a line");
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    let cut = buf.len() > MAX_LINE;
    if cut {
        warn!(
            bytes = buf.len(),
            "AGI line longer than {MAX_LINE} bytes: the rest is dropped"
        );
        buf.truncate(MAX_LINE);
    }
    match String::from_utf8(buf) {
        Ok(s) => Ok(Some(s)),
        Err(e) if cut && e.utf8_error().error_len().is_none() => {
            // Cut inside a multi-byte character: keep what comes before it.
            let valid = e.utf8_error().valid_up_to();
            let mut bytes = e.into_bytes();
            bytes.truncate(valid);
            Ok(Some(String::from_utf8(bytes).expect("a valid prefix")))
        }
        Err(e) => Err(anyhow!("line is not UTF-8 (byte {})", e.utf8_error().valid_up_to())),
    }
}

/// Parses a whole FastAGI variable block from `bytes`, exactly as a session reads it from its
/// socket (the same line, size and count limits). For the fuzz target and tests.
///
/// # Errors
/// What the session would log before closing: a bad line, too many lines, an early end.
pub fn parse_request(bytes: &[u8]) -> Result<AgiRequest> {
    let mut reader = bytes;
    // Reads from a slice never wait: the future completes on its first poll.
    match futures_util::FutureExt::now_or_never(read_request(&mut reader)) {
        Some(Ok(req)) => Ok(req),
        Some(Err(SessionEnd::Failed(e))) => Err(e),
        Some(Err(SessionEnd::Closed | SessionEnd::HungUp)) => Err(anyhow!("no AGI variable block")),
        None => Err(anyhow!("reading from a slice did not complete")),
    }
}

/// Reads the variable block up to its blank line.
async fn read_request<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<AgiRequest, SessionEnd> {
    let mut req = AgiRequest::default();
    let mut numbered: BTreeMap<usize, String> = BTreeMap::new();
    let mut lines = 0usize;
    loop {
        let Some(line) = read_line(reader).await? else {
            return Err(if lines == 0 {
                SessionEnd::Closed
            } else {
                SessionEnd::Failed(anyhow!("connection closed before the end of the AGI variables"))
            });
        };
        if line.is_empty() {
            break;
        }
        lines += 1;
        if lines > MAX_HEADER_LINES {
            return Err(anyhow!("more than {MAX_HEADER_LINES} AGI variable lines").into());
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(anyhow!("not an AGI variable line: {:?}", truncate(&line)).into());
        };
        let name = name.trim();
        let Some(name) = name.strip_prefix("agi_") else {
            return Err(anyhow!("not an AGI variable line: {:?}", truncate(&line)).into());
        };
        let value = value.strip_prefix(' ').unwrap_or(value).to_string();
        match name.strip_prefix("arg_").map(str::parse::<usize>) {
            Some(Ok(n)) if n >= 1 => {
                numbered.insert(n, value);
            }
            _ => {
                req.vars.insert(name.to_string(), value);
            }
        }
    }
    // agi_arg_1, agi_arg_2, ... with no gaps.
    for (i, (n, v)) in numbered.into_iter().enumerate() {
        if n != i + 1 {
            break;
        }
        req.args.push(v);
    }
    Ok(req)
}

fn truncate(s: &str) -> String {
    logsafe::clean(s, logsafe::MAX_VALUE_CHARS)
}

/// A session's command channel: writes commands, reads their answers.
struct Commander<R, W> {
    reader: R,
    writer: W,
    hung_up: bool,
}

impl<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin> Commander<R, W> {
    /// Sends `command` and reads Asterisk's answer (skipping a `HANGUP` notice).
    async fn command(&mut self, command: &str) -> Result<AgiReply, SessionEnd> {
        if command.len() > MAX_COMMAND {
            return Err(anyhow!("AGI command too long ({} bytes): {}", command.len(), truncate(command)).into());
        }
        debug!(command, "AGI >");
        let line = format!("{command}\n");
        match self.writer.write_all(line.as_bytes()).await {
            Ok(()) => {}
            Err(e) if is_closed(&e) => return Err(SessionEnd::Closed),
            Err(e) => return Err(anyhow!(e).context("write failed").into()),
        }
        match tokio::time::timeout(REPLY_TIMEOUT, self.reply()).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("no answer to {:?} within {REPLY_TIMEOUT:?}", command).into()),
        }
    }

    async fn reply(&mut self) -> Result<AgiReply, SessionEnd> {
        loop {
            let Some(line) = read_line(&mut self.reader).await? else {
                return Err(SessionEnd::Closed);
            };
            debug!(line, "AGI <");
            if line.trim() == "HANGUP" {
                self.hung_up = true;
                continue;
            }
            let reply = parse_reply_start(&line)?;
            let (code, multi, mut text) = reply;
            if multi {
                // `520-...` continues until a line starting with `520 `.
                let end = format!("{code} ");
                loop {
                    let Some(more) = read_line(&mut self.reader).await? else {
                        return Err(SessionEnd::Closed);
                    };
                    text.push('\n');
                    if let Some(last) = more.strip_prefix(&end) {
                        text.push_str(last);
                        break;
                    }
                    text.push_str(&more);
                }
            }
            let result = (code == 200).then(|| parse_result(&text)).flatten();
            return Ok(AgiReply { code, result, text });
        }
    }
}

fn is_closed(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
    )
}

/// `200 result=1 (x)` -> (200, false, "result=1 (x)"); `520-Invalid ...` -> (520, true, ...).
fn parse_reply_start(line: &str) -> Result<(u16, bool, String)> {
    let bytes = line.as_bytes();
    if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
        bail!("not an AGI answer: {:?}", truncate(line));
    }
    let code: u16 = line[..3].parse()?;
    match bytes.get(3) {
        None => Ok((code, false, String::new())),
        Some(b' ') => Ok((code, false, line[4..].to_string())),
        Some(b'-') => Ok((code, true, line[4..].to_string())),
        Some(_) => bail!("not an AGI answer: {:?}", truncate(line)),
    }
}

/// `result=1 (value)` -> 1.
fn parse_result(text: &str) -> Option<i64> {
    let rest = text.trim_start().strip_prefix("result=")?;
    let end = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
        .map_or(rest.len(), |(i, _)| i);
    rest[..end].parse().ok()
}

/// One FastAGI session, from the variable block to the close.
async fn session(stream: TcpStream, directory: &CallDirectory) {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let req = match tokio::time::timeout(HEADER_TIMEOUT, read_request(&mut reader)).await {
        Err(_) => {
            warn!("FastAGI session closed: no complete AGI variable block within {HEADER_TIMEOUT:?}");
            crate::metrics::agi_session(None, "bad_request");
            return;
        }
        Ok(Err(SessionEnd::Closed)) => {
            debug!("FastAGI connection closed before sending anything");
            return;
        }
        Ok(Err(SessionEnd::HungUp)) => return,
        Ok(Err(SessionEnd::Failed(e))) => {
            warn!("FastAGI session closed: bad AGI variable block: {e:#}");
            crate::metrics::agi_session(None, "bad_request");
            return;
        }
        Ok(Ok(req)) => req,
    };
    let mut cmd = Commander {
        reader,
        writer: write,
        hung_up: false,
    };
    let script = req.script();
    let outcome = match script.as_deref() {
        Some("call-start") => call_start(&req, &mut cmd, directory).await,
        Some("call-end") => call_end(&req, &mut cmd, directory).await,
        other => unknown_script(other, &req, &mut cmd).await,
    };
    crate::metrics::agi_session(
        script.as_deref(),
        match &outcome {
            Ok(()) | Err(SessionEnd::Closed) => "ok",
            Err(SessionEnd::HungUp) => "hung_up",
            Err(SessionEnd::Failed(_)) => "failed",
        },
    );
    match outcome {
        Ok(()) | Err(SessionEnd::Closed) => {}
        Err(SessionEnd::HungUp) => {
            info!(
                script = script.as_deref().unwrap_or(""),
                "FastAGI: the channel hung up during the session"
            )
        }
        Err(SessionEnd::Failed(e)) => {
            warn!(
                script = script.as_deref().unwrap_or(""),
                "FastAGI session failed: {e:#}"
            )
        }
    }
    if cmd.hung_up {
        debug!("FastAGI: Asterisk reported HANGUP");
    }
    // Closing the socket lets the dialplan continue.
    let _ = cmd.writer.shutdown().await;
}

/// Sets a channel variable; a refusal (5xx) is logged and the session goes on, a hangup ends it.
async fn set_var<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin>(
    cmd: &mut Commander<R, W>,
    name: &str,
    value: &str,
) -> Result<(), SessionEnd> {
    let reply = cmd.command(&set_variable_command(name, value)).await?;
    if reply.ok() {
        return Ok(());
    }
    if reply.code == 200 {
        return Err(SessionEnd::HungUp);
    }
    warn!(
        variable = name,
        code = reply.code,
        answer = %reply.text.lines().next().unwrap_or(""),
        "Asterisk refused SET VARIABLE"
    );
    Ok(())
}

async fn call_start<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin>(
    req: &AgiRequest,
    cmd: &mut Commander<R, W>,
    directory: &CallDirectory,
) -> Result<(), SessionEnd> {
    let uuid = match req.arg(1) {
        None => Uuid::new_v4(),
        Some(a) => match Uuid::parse_str(a) {
            Ok(u) => u,
            Err(_) => {
                let u = Uuid::new_v4();
                warn!(
                    arg = %truncate(a),
                    generated = %u,
                    "call-start: argument 1 is not a UUID; using a new one: pass ${{AVA_UUID}} to AudioSocket()"
                );
                u
            }
        },
    };
    let info = req.caller_info();
    info!(script = "call-start", %uuid, "FastAGI call-start");
    // Caller details are conversation content: DEBUG only, escaped and capped.
    debug!(
        script = "call-start",
        %uuid,
        caller_id = %logsafe::value(info.caller_id.as_deref()),
        caller_name = %logsafe::value(info.caller_name.as_deref()),
        dnid = %logsafe::value(info.dnid.as_deref()),
        channel = %logsafe::value(info.channel.as_deref()),
        "FastAGI call-start caller details"
    );
    directory.set_info(uuid, info);
    set_var(cmd, VAR_UUID, &uuid.to_string()).await
}

async fn call_end<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin>(
    req: &AgiRequest,
    cmd: &mut Commander<R, W>,
    directory: &CallDirectory,
) -> Result<(), SessionEnd> {
    let caller_id = req.get("callerid").unwrap_or("");
    let decision = match req.arg(1) {
        None => {
            warn!(
                script = "call-end",
                "call-end without a UUID argument: AVA_ACTION=continue"
            );
            None
        }
        Some(a) => match Uuid::parse_str(a) {
            Ok(uuid) => {
                let d = directory.take_decision(uuid);
                info!(
                    script = "call-end",
                    %uuid,
                    caller_id = %logsafe::value(Some(caller_id)),
                    action = d.as_ref().map_or("continue", Decision::action),
                    "FastAGI call-end"
                );
                d
            }
            Err(_) => {
                warn!(script = "call-end", arg = %truncate(a), "call-end: argument 1 is not a UUID: AVA_ACTION=continue");
                None
            }
        },
    };
    match decision {
        None => set_var(cmd, VAR_ACTION, "continue").await,
        Some(Decision::Hangup) => set_var(cmd, VAR_ACTION, "hangup").await,
        Some(Decision::Busy) => set_var(cmd, VAR_ACTION, "busy").await,
        Some(Decision::Transfer { name, destination }) => {
            set_var(cmd, VAR_TRANSFER, &destination).await?;
            set_var(cmd, VAR_TRANSFER_NAME, &name).await?;
            set_var(cmd, VAR_ACTION, "transfer").await
        }
    }
}

async fn unknown_script<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin>(
    script: Option<&str>,
    req: &AgiRequest,
    cmd: &mut Commander<R, W>,
) -> Result<(), SessionEnd> {
    let name = script.unwrap_or("");
    warn!(
        script = %truncate(name),
        request = req.get("request").unwrap_or(""),
        "unknown FastAGI script (known: call-start, call-end)"
    );
    let msg = format!("asterisk-voice-agent: unknown AGI script {}", truncate(name));
    cmd.command(&format!("VERBOSE {} 1", quote(&msg))).await.map(|_| ())
}

/// Splits an AGI command line into words the way Asterisk does (`parse_args` in
/// `res/res_agi.c`): words split on space/tab, `"` quotes, `\` escapes. Lets tests (and a
/// scripted client) check that [`quote`] round-trips.
pub fn asterisk_parse_args(s: &str) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let (mut quoted, mut escaped, mut whitespace) = (false, false, true);
    for c in s.chars() {
        let literal = match c {
            '"' if !escaped => {
                quoted = !quoted;
                if quoted && whitespace {
                    args.push(String::new());
                    whitespace = false;
                }
                None
            }
            ' ' | '\t' if !quoted && !escaped => {
                whitespace = true;
                None
            }
            '\\' if !escaped => {
                escaped = true;
                None
            }
            c => Some(c),
        };
        if let Some(c) = literal {
            if whitespace {
                args.push(String::new());
                whitespace = false;
            }
            args.last_mut().unwrap().push(c);
            escaped = false;
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agi_quote_round_trips_through_asterisk_parse_args() {
        for v in [
            "",
            "plain",
            "with space",
            "with \"quotes\" inside",
            "back\\slash",
            "tab\there",
            "trailing\\",
            "PJSIP/100",
            "e140b8a6-5b4b-4f3e-9a53-2f0b8b0b8b0b",
        ] {
            let cmd = set_variable_command("NAME", v);
            assert_eq!(asterisk_parse_args(&cmd), vec!["SET", "VARIABLE", "NAME", v], "{cmd}");
        }
        assert_eq!(quote("a\r\nb"), "\"a  b\"");
        assert_eq!(
            set_variable_command("X", "say \"hi\""),
            r#"SET VARIABLE X "say \"hi\"""#
        );
    }

    #[test]
    fn agi_parses_replies() {
        assert_eq!(
            parse_reply_start("200 result=1").unwrap(),
            (200, false, "result=1".into())
        );
        assert_eq!(parse_result("result=1 (hello world)"), Some(1));
        assert_eq!(parse_result("result=-1"), Some(-1));
        assert_eq!(parse_result("result=0"), Some(0));
        assert_eq!(parse_result("nothing"), None);
        assert_eq!(
            parse_reply_start("520-Invalid command syntax.  Proper usage follows:").unwrap(),
            (520, true, "Invalid command syntax.  Proper usage follows:".into())
        );
        assert!(parse_reply_start("hello").is_err());
        assert!(parse_reply_start("2000").is_err());
    }

    #[test]
    fn agi_script_names() {
        let mut r = AgiRequest::default();
        assert_eq!(r.script(), None);
        r.vars
            .insert("request".into(), "agi://127.0.0.1:4573/call-end?x=1".into());
        assert_eq!(r.script().as_deref(), Some("call-end"));
        r.vars.insert("network_script".into(), "call-start".into());
        assert_eq!(r.script().as_deref(), Some("call-start"));
        r.vars.insert("network_script".into(), "/call-start/".into());
        assert_eq!(r.script().as_deref(), Some("call-start"));
    }

    #[tokio::test]
    async fn agi_reads_the_variable_block() {
        let block = b"agi_network: yes\nagi_network_script: call-start\nagi_callerid: 100\n\
            agi_calleridname: Alice Smith\nagi_dnid: unknown\nagi_arg_2: two\nagi_arg_1: one\nagi_arg_4: gap\n\n";
        let mut r = BufReader::new(&block[..]);
        let req = read_request(&mut r).await.unwrap();
        assert_eq!(req.args, vec!["one", "two"]);
        assert_eq!(req.get("calleridname"), Some("Alice Smith"));
        assert_eq!(req.get("dnid"), None);
        let info = req.caller_info();
        assert_eq!(info.caller_id.as_deref(), Some("100"));

        // A caller name over MAX_LINE: the line is cut, the session goes on, the name is capped.
        let mut long = b"agi_calleridname: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 10 * 1024));
        long.extend_from_slice(b"\nagi_callerid: 100\n\n");
        let mut r = BufReader::new(&long[..]);
        let req = read_request(&mut r).await.unwrap();
        assert_eq!(
            req.get("calleridname").map(str::len),
            Some(MAX_LINE - "agi_calleridname: ".len())
        );
        let info = req.caller_info();
        assert_eq!(
            info.caller_name.as_deref().map(|n| n.chars().count()),
            Some(MAX_CALLER_VALUE)
        );
        assert_eq!(info.caller_id.as_deref(), Some("100"));

        // Cut inside a two-byte character: the valid prefix is kept.
        let mut long = b"agi_calleridname: x".to_vec();
        long.extend("\u{e9}".repeat(6 * 1024).as_bytes());
        long.extend_from_slice(b"\n\n");
        let mut r = BufReader::new(&long[..]);
        let req = read_request(&mut r).await.unwrap();
        let name = req.get("calleridname").unwrap();
        assert!(name.starts_with("x\u{e9}") && name.len() == MAX_LINE - "agi_calleridname: ".len() - 1);

        // Over MAX_DISCARD: the session is closed.
        let mut long = vec![b'a'; MAX_DISCARD + 10];
        long.extend_from_slice(b"\n\n");
        let mut r = BufReader::new(&long[..]);
        assert!(matches!(read_request(&mut r).await, Err(SessionEnd::Failed(_))));

        let mut r = BufReader::new(&b"agi_callerid: \xff\xfe\n\n"[..]);
        assert!(matches!(read_request(&mut r).await, Err(SessionEnd::Failed(_))));

        let mut r = BufReader::new(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(matches!(read_request(&mut r).await, Err(SessionEnd::Failed(_))));

        let mut r = BufReader::new(&b"agi_network: yes\nagi_chan"[..]);
        assert!(matches!(read_request(&mut r).await, Err(SessionEnd::Failed(_))));

        let mut r = BufReader::new(&b""[..]);
        assert!(matches!(read_request(&mut r).await, Err(SessionEnd::Closed)));
    }
}
