//! issue 10: `[llm] backend = "openai"` against a real OpenAI-compatible server: PyPI's
//! `llama-cpp-python[server]` (installed by scripts/deps-openai.sh) serving the test GGUF.
//! A call answered through it; the server killed mid-reply (then retries, the fallback model
//! or the apology, never dead air); an unreachable `base_url` at start-up.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn gguf() -> PathBuf {
    models_dir().join("smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// `python -m llama_cpp.server` on a free loopback port; killed on drop.
struct LlamaServer {
    child: Arc<Mutex<Child>>,
    port: u16,
}

impl LlamaServer {
    fn start() -> LlamaServer {
        let python = ava_home().join("openai-venv/bin/python");
        assert!(
            python.is_file(),
            "{} is missing: run scripts/deps-openai.sh (scripts/install-deps.sh runs it)",
            python.display()
        );
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(&python)
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(gguf())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--n_ctx", "2048", "--n_threads", "2", "--verbose", "false"])
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let s = LlamaServer {
            child: Arc::new(Mutex::new(child)),
            port,
        };
        let t = Instant::now();
        loop {
            if let Ok(r) = reqwest::blocking::get(format!("http://127.0.0.1:{port}/v1/models")) {
                if r.status().is_success() {
                    break;
                }
            }
            if let Ok(Some(st)) = s.child.lock().unwrap().try_wait() {
                let mut out = String::new();
                log.reopen().unwrap().read_to_string(&mut out).unwrap();
                panic!("llama_cpp.server exited with {st}:\n{out}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "llama_cpp.server not ready in 90 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        s
    }

    fn kill(&self) {
        let mut c = self.child.lock().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy in front of the server that kills the server (SIGKILL) as soon as the first
/// streamed reply has sent its first `data:` chunk with text, then cuts that connection.
/// Returns the proxy's port.
fn killing_proxy(server: &LlamaServer) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = server.port;
    let child = server.child.clone();
    std::thread::spawn(move || {
        let killed = Arc::new(Mutex::new(false));
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue; // the server is dead: the client sees the connection close
            };
            let (mut c2, mut u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut u2);
            });
            let child = child.clone();
            let killed = killed.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut acc = String::new();
                loop {
                    let n = match up.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    acc.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if has_text_chunk(&acc) {
                        let mut k = killed.lock().unwrap();
                        if !*k {
                            *k = true;
                            let mut c = child.lock().unwrap();
                            let _ = c.kill();
                            let _ = c.wait();
                            break;
                        }
                    }
                }
                let _ = client.shutdown(Shutdown::Both);
            });
        }
    });
    port
}

/// Whether the stream so far holds a `data:` chunk with non-empty `delta.content`.
fn has_text_chunk(stream: &str) -> bool {
    stream.lines().filter_map(|l| l.trim().strip_prefix("data:")).any(|d| {
        serde_json::from_str::<Value>(d.trim())
            .ok()
            .and_then(|v| v["choices"][0]["delta"]["content"].as_str().map(|c| !c.is_empty()))
            .unwrap_or(false)
    })
}

fn openai_config(port: u16, extra: &str) -> String {
    format!("[llm]\nbackend = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nread_timeout_ms = 4000\n{extra}")
}

fn agent_entries(server: &Server, id: &str) -> Vec<Value> {
    server
        .conversation()
        .into_iter()
        .filter(|e| e["call_id"] == id && e["speaker"] == "agent")
        .collect()
}

#[test]
fn a_call_is_answered_through_an_openai_compatible_server() {
    let _g = serial();
    let llama = LlamaServer::start();
    // No local GGUF is needed with this backend: a path that does not exist is not looked at.
    // DEBUG for the call: a prefill would log "LLM prefilled" (there is none to make here).
    let server = Server::start_with_log(
        &openai_config(llama.port, "[models]\nllm = \"/nonexistent/no-local-model.gguf\"\n"),
        "info,ort=warn,asterisk_voice_agent::call=debug",
    );
    // Held on the line: on a loaded machine the filler may come first and end the reply wait.
    let r = server.simulate(&[
        "--wav",
        &audio("book_appointment.8k.wav").display().to_string(),
        "--hold-ms",
        "15000",
    ]);
    let id = r["call_id"].as_str().unwrap();
    server.wait_call_line(id, "call ended", 10);
    println!("{r}");
    assert!(r["turns"][0]["voice_to_voice_ms"].as_f64().is_some(), "{r}");
    let replies: Vec<Value> = agent_entries(&server, id)
        .into_iter()
        .filter(|e| e["prompt"].is_null())
        .collect();
    assert!(!replies.is_empty(), "no generated reply in the conversation log");
    assert!(replies
        .iter()
        .all(|e| !e["text"].as_str().unwrap_or("").trim().is_empty()));
    let log = server.log();
    assert!(log.contains("LLM reply done"), "{log}");
    assert!(!log.contains("LLM attempt failed"), "{log}");
    // The server keeps its own prompt cache: no prefill is asked of this backend, whose
    // prefill does nothing (and no Vosk partials are fetched for it).
    assert!(!log.contains("LLM prefilled"), "{log}");
}

#[test]
fn server_killed_mid_reply_falls_back_without_dead_air() {
    let _g = serial();
    let wavs = [
        audio("book_appointment.8k.wav").display().to_string(),
        audio("opening_hours.8k.wav").display().to_string(),
    ];
    // With the local fallback model: every turn is answered.
    let llama = LlamaServer::start();
    let proxy = killing_proxy(&llama);
    let server = Server::start(&openai_config(
        proxy,
        &format!("[call]\nllm_retries = 1\nfallback_llm = \"{}\"\n", gguf().display()),
    ));
    let r = server.simulate(&["--wav", &wavs[0], "--wav", &wavs[1], "--hold-ms", "15000"]);
    let id = r["call_id"].as_str().unwrap();
    let lines = server.wait_call_line(id, "call ended", 10);
    println!("{r}\n{lines:#?}");
    assert!(
        llama.child.lock().unwrap().try_wait().unwrap().is_some(),
        "the server was not killed"
    );
    for t in r["turns"].as_array().unwrap() {
        assert!(t["voice_to_voice_ms"].as_f64().is_some(), "a turn got no answer: {r}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("LLM failed mid-reply") || l.contains("LLM attempt failed")),
        "{lines:#?}"
    );
    assert_ne!(r["ended_by"], "agent_hangup", "{r}");
    drop((server, llama));

    // Without a fallback model: the apology, then a clean hangup.
    let llama = LlamaServer::start();
    let proxy = killing_proxy(&llama);
    let server = Server::start(&openai_config(proxy, "[call]\nllm_retries = 1\n"));
    let r = server.simulate(&["--wav", &wavs[0], "--wav", &wavs[1], "--hold-ms", "15000"]);
    let id = r["call_id"].as_str().unwrap();
    server.wait_call_line(id, "agent hung up (LLM failure)", 10);
    println!("{r}");
    assert_eq!(r["ended_by"], "agent_hangup", "{r}");
    assert!(agent_entries(&server, id).iter().any(|e| e["prompt"] == "apology"));
    for t in r["turns"].as_array().unwrap() {
        assert!(t["voice_to_voice_ms"].as_f64().is_some(), "dead air: {r}");
    }
}

#[test]
fn unreachable_base_url_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let dead = free_port();
    let cfg = test_config(free_port(), dir.path(), &openai_config(dead, ""));
    let path = dir.path().join("c.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("llm.base_url") && err.contains(&format!("127.0.0.1:{dead}")) && err.contains("unreachable"),
        "{err}"
    );
}

/// The session API straight against the server (no call, no STT): tokens stream in, then
/// `Done`; after the server is killed mid-reply the reply ends with an `Error` (the call turns
/// that into retries, the fallback model or the apology, see above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_stream_from_the_server_and_fail_cleanly_when_it_dies() {
    use asterisk_voice_agent::config::{LlmBackendKind, LlmConfig};
    use asterisk_voice_agent::llm::{LlmEngine, LlmEvent, LlmSession, Message, Role};
    use std::sync::atomic::AtomicBool;
    let llama = tokio::task::spawn_blocking(LlamaServer::start).await.unwrap();
    let proxy = killing_proxy(&llama);
    let cfg = LlmConfig {
        backend: LlmBackendKind::Openai,
        base_url: Some(format!("http://127.0.0.1:{}/v1", llama.port)),
        temperature: 0.0,
        // Generous: the shared 2-core test machine can be very loaded.
        read_timeout_ms: 30_000,
        ..Default::default()
    };
    let direct = Arc::new(LlmEngine::openai(&cfg).unwrap());
    let history = |caller: &str| {
        vec![
            Message {
                role: Role::System,
                text: "You are a friendly phone receptionist. Answer in one short sentence.".into(),
            },
            Message {
                role: Role::User,
                text: caller.into(),
            },
        ]
    };
    let session = LlmSession::start(direct, "openai-direct").unwrap();
    let mut rx = session.generate(history("What time do you open?"), 30, Arc::new(AtomicBool::new(false)));
    let (mut text, mut done) = (String::new(), None);
    while let Some(ev) = rx.recv().await {
        match ev {
            LlmEvent::Token(t) => text.push_str(&t),
            LlmEvent::Done(s) => done = Some(s),
            other => panic!("{other:?} after {text:?}"),
        }
    }
    let stats = done.expect("a Done");
    assert!(
        !text.trim().is_empty() && stats.generated_tokens > 0,
        "{text:?} {stats:?}"
    );
    assert!(stats.first_token_ms.is_some());

    // Through the proxy that kills the server at the first streamed text.
    let cfg = LlmConfig {
        base_url: Some(format!("http://127.0.0.1:{proxy}/v1")),
        ..cfg
    };
    let session = LlmSession::start(Arc::new(LlmEngine::openai(&cfg).unwrap()), "openai-killed").unwrap();
    let mut rx = session.generate(
        history("Tell me about your shop."),
        60,
        Arc::new(AtomicBool::new(false)),
    );
    let mut events = Vec::new();
    while let Some(ev) = rx.recv().await {
        events.push(ev);
    }
    assert!(
        matches!(events.last(), Some(LlmEvent::Error(_))),
        "the reply must end with an error: {events:?}"
    );
    // The next request fails at once (connection refused), it does not hang.
    let t = Instant::now();
    let mut rx = session.generate(history("Hello?"), 10, Arc::new(AtomicBool::new(false)));
    let mut last = None;
    while let Some(ev) = rx.recv().await {
        last = Some(ev);
    }
    assert!(matches!(last, Some(LlmEvent::Error(_))), "{last:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}
