//! issue 10: `[llm] backend = "openai"`: replies from an OpenAI-compatible chat-completions
//! server (llama.cpp's `llama-server`, vLLM, Ollama, `llama-cpp-python[server]`), streamed
//! as server-sent events (`stream: true`; each `data:` line holds a JSON chunk whose
//! `choices[0].delta.content` is the next piece of text; `data: [DONE]` ends it, per the
//! OpenAI API reference "Create chat completion", streaming) into the same [`LlmEvent`]
//! stream as the local model, so the call's sentence splitter, retries, fallback model and
//! apology work unchanged. No KV cache lives here: the server keeps its own (llama-server
//! reuses a slot's prompt prefix), so `warm` does nothing.

use super::{render_messages, ActionSpec, LlmBackend, LlmEvent, Message, ReplyStream, TurnStats};
use crate::config::LlmConfig;
use anyhow::{anyhow, bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Most bytes of one SSE line (a chunk is a few hundred bytes); a longer one is an error.
const MAX_LINE: usize = 64 * 1024;

/// The server's address and the HTTP client, shared by all calls.
pub struct Client {
    base_url: String,
    model: String,
    api_key: Option<String>,
    temperature: f32,
    read_timeout: Duration,
    http: reqwest::Client,
}

impl Client {
    /// Reads `[llm]`, builds the client and checks that `GET {base_url}/models` answers.
    ///
    /// # Errors
    /// A missing or malformed `base_url`, an unreadable `api_key_file`, or a server that is
    /// unreachable or answers with an error status; each message names the `[llm]` key.
    pub fn connect(cfg: &LlmConfig) -> Result<Client> {
        let base = cfg
            .base_url
            .as_deref()
            .ok_or_else(|| anyhow!("llm.base_url is required with llm.backend = \"openai\""))?;
        let base_url = base.trim_end_matches('/').to_string();
        let url = reqwest::Url::parse(&base_url)
            .with_context(|| format!("llm.base_url {base_url:?} is not a URL (e.g. http://10.0.0.5:8080/v1)"))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("llm.base_url {base_url:?} must be an http:// or https:// URL");
        }
        let api_key = match &cfg.api_key_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read llm.api_key_file {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let read_timeout = Duration::from_millis(cfg.read_timeout_ms);
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .build()
            .context("cannot build the HTTP client for llm.base_url")?;
        let client = Client {
            base_url,
            model: cfg.model.clone(),
            api_key,
            temperature: cfg.temperature,
            read_timeout,
            http,
        };
        client.check(connect_timeout + read_timeout)?;
        Ok(client)
    }

    /// The API root, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `GET {base_url}/models` on a thread of its own (start-up may run inside the runtime).
    fn check(&self, timeout: Duration) -> Result<()> {
        let url = format!("{}/models", self.base_url);
        let key = self.api_key.clone();
        let base = self.base_url.clone();
        std::thread::spawn(move || -> Result<()> {
            let http = reqwest::blocking::Client::builder()
                .timeout(timeout)
                .build()
                .context("cannot build the HTTP client for llm.base_url")?;
            let mut req = http.get(&url);
            if let Some(k) = &key {
                req = req.bearer_auth(k);
            }
            let resp = req.send().map_err(|e| {
                anyhow!("llm.base_url {base} is unreachable ({e}): start the inference server or fix [llm] base_url")
            })?;
            if !resp.status().is_success() {
                bail!(
                    "llm.base_url {base}: GET /models answered {} (check [llm] base_url and api_key_file)",
                    resp.status()
                );
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow!("the llm.base_url check panicked"))?
    }
}

/// One call's requests to the server.
pub struct Session {
    client: Arc<Client>,
    actions: Option<Arc<ActionSpec>>,
}

impl Session {
    /// A session; with `actions` the instructions go into the system prompt and the reply's
    /// leading tag is parsed (no grammar: servers differ in how they take one).
    pub fn new(client: Arc<Client>, actions: Option<Arc<ActionSpec>>) -> Session {
        Session { client, actions }
    }
}

impl LlmBackend for Session {
    fn warm(&self, _messages: Vec<Message>, _done: super::WarmDone) {}

    fn generate(
        &self,
        messages: Vec<Message>,
        max_tokens: u32,
        cancel: Arc<AtomicBool>,
        out: mpsc::UnboundedSender<LlmEvent>,
    ) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            let _ = out.send(LlmEvent::Error("the OpenAI backend needs a tokio runtime".into()));
            return;
        };
        let client = self.client.clone();
        let actions = self.actions.clone();
        rt.spawn(async move {
            let started = Instant::now();
            let body = request_body(&client, &messages, max_tokens, actions.as_deref());
            let mut stream = ReplyStream::new(actions, out);
            let mut stats = TurnStats::default();
            let result = tokio::select! {
                r = stream_reply(&client, body, &mut stream, &mut stats, started) => r,
                _ = cancelled(&cancel) => Ok(()),
            };
            // Dropping the request (cancel, error, receiver gone) closes the connection, which
            // makes the server stop generating.
            let result = match result {
                Ok(()) if stats.generated_tokens == 0 && !cancel.load(Ordering::Relaxed) => {
                    Err("the server sent no text".to_string())
                }
                Ok(()) => Ok(stats),
                Err(e) => Err(format!("{e:#}")),
            };
            stream.finish(result);
        });
    }
}

/// Resolves once `cancel` is set.
async fn cancelled(cancel: &AtomicBool) {
    while !cancel.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The JSON body of a streamed chat completion.
fn request_body(client: &Client, messages: &[Message], max_tokens: u32, actions: Option<&ActionSpec>) -> String {
    let msgs: Vec<serde_json::Value> = render_messages(messages, actions)
        .into_iter()
        .map(|(role, content)| serde_json::json!({ "role": role, "content": content }))
        .collect();
    serde_json::json!({
        "model": client.model,
        "messages": msgs,
        "max_tokens": max_tokens,
        "temperature": client.temperature,
        "stream": true,
    })
    .to_string()
}

/// Posts the request and feeds the streamed text to `stream` until `[DONE]`, the end of the
/// body, or the receiver going away.
async fn stream_reply(
    client: &Client,
    body: String,
    stream: &mut ReplyStream,
    stats: &mut TurnStats,
    started: Instant,
) -> Result<()> {
    let url = format!("{}/chat/completions", client.base_url);
    let mut req = client
        .http
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .body(body);
    if let Some(k) = &client.api_key {
        req = req.bearer_auth(k);
    }
    let mut resp = tokio::time::timeout(client.read_timeout, req.send())
        .await
        .map_err(|_| anyhow!("no response from {url} within {} ms", client.read_timeout.as_millis()))?
        .with_context(|| format!("POST {url} failed"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        bail!(
            "{url} answered {status}: {}",
            text.chars().take(200).collect::<String>()
        );
    }
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::time::timeout(client.read_timeout, resp.chunk())
            .await
            .map_err(|_| anyhow!("the server sent nothing for {} ms", client.read_timeout.as_millis()))?
            .context("reading the streamed reply failed")?;
        let Some(chunk) = chunk else {
            // The body ended without `[DONE]`: a server that stopped mid-reply.
            bail!("the stream ended without [DONE]");
        };
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            match parse_line(&line)? {
                SseLine::Done => return Ok(()),
                SseLine::Text(t) => {
                    if t.is_empty() {
                        continue;
                    }
                    stats.generated_tokens += 1;
                    if stats.first_token_ms.is_none() {
                        stats.first_token_ms = Some(started.elapsed().as_millis() as u64);
                    }
                    if !stream.push(t.as_bytes()) {
                        return Ok(());
                    }
                }
                SseLine::Other => {}
            }
        }
        if buf.len() > MAX_LINE {
            bail!("an event line of the stream is longer than {MAX_LINE} bytes");
        }
    }
}

/// One line of the event stream.
#[derive(Debug, PartialEq)]
enum SseLine {
    /// `data: [DONE]`.
    Done,
    /// A chunk's `choices[0].delta.content` (empty when it has none).
    Text(String),
    /// A comment, an empty line or another field.
    Other,
}

fn parse_line(line: &[u8]) -> Result<SseLine> {
    let line = std::str::from_utf8(line).context("the stream is not UTF-8")?.trim();
    let Some(data) = line.strip_prefix("data:") else {
        return Ok(SseLine::Other);
    };
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(SseLine::Done);
    }
    let v: serde_json::Value =
        serde_json::from_str(data).with_context(|| format!("bad JSON in the stream: {data:.120}"))?;
    if let Some(err) = v.get("error") {
        bail!("the server reported an error: {err}");
    }
    Ok(SseLine::Text(
        v["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_event_lines() {
        let l = br#"data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}"#;
        assert_eq!(parse_line(l).unwrap(), SseLine::Text("Hello".into()));
        let l = br#"data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#;
        assert_eq!(parse_line(l).unwrap(), SseLine::Text(String::new()));
        assert_eq!(parse_line(b"data: [DONE]\n").unwrap(), SseLine::Done);
        assert_eq!(parse_line(b": ping\n").unwrap(), SseLine::Other);
        assert_eq!(parse_line(b"\r\n").unwrap(), SseLine::Other);
        assert!(parse_line(b"data: {not json").is_err());
        assert!(parse_line(br#"data: {"error":{"message":"boom"}}"#).is_err());
    }

    #[test]
    fn unreachable_base_url_names_the_key() {
        // A port on loopback that nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = LlmConfig {
            backend: crate::config::LlmBackendKind::Openai,
            base_url: Some(format!("http://127.0.0.1:{port}/v1")),
            ..Default::default()
        };
        let e = format!("{:#}", Client::connect(&cfg).err().expect("must fail"));
        assert!(e.contains("llm.base_url") && e.contains("unreachable"), "{e}");
        let cfg = LlmConfig {
            base_url: Some("not a url".into()),
            ..Default::default()
        };
        let e = format!("{:#}", Client::connect(&cfg).err().expect("must fail"));
        assert!(e.contains("llm.base_url"), "{e}");
    }
}
