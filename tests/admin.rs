//! What the PBX admin sees (issue 9), with the real binary and the real test models: `/health`
//! before and after ready, the bearer token, `/metrics` moving by the right amounts after
//! calls ended every way, a real Prometheus scraping it, the SQLite call history, SIGHUP
//! reloads, and the live page in a real headless Chromium.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn get(url: &str) -> (u16, String) {
    get_with(url, None)
}

fn get_with(url: &str, token: Option<&str>) -> (u16, String) {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap();
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let code = r.status().as_u16();
    (code, r.text().unwrap())
}

fn health(http: &str) -> serde_json::Value {
    let (code, body) = get(&format!("http://{http}/health"));
    assert!(code == 200 || code == 503, "{code} {body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until `/health` says `active_calls == n`.
fn wait_active(http: &str, n: u64, secs: u64) {
    let t = Instant::now();
    loop {
        let h = health(http);
        if h["active_calls"] == n {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(secs), "active_calls never {n}: {h}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn scrape(http: &str) -> BTreeMap<String, f64> {
    let (code, body) = get(&format!("http://{http}/metrics"));
    assert_eq!(code, 200, "{body}");
    parse_metrics(&body)
}

fn delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, key: &str) -> f64 {
    let after = *b
        .get(key)
        .unwrap_or_else(|| panic!("{key} missing from /metrics: {b:#?}"));
    after - a.get(key).copied().unwrap_or(0.0)
}

/// An AudioSocket frame: kind, 16-bit big-endian length, payload.
fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Opens a call like Asterisk: connects and sends the id frame.
fn open_call(addr: &str) -> (TcpStream, uuid::Uuid) {
    let id = uuid::Uuid::new_v4();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&frame(0x01, id.as_bytes())).unwrap();
    (s, id)
}

/// Reads until the server closes the connection (at most `secs`).
fn drain(mut s: TcpStream, secs: u64) {
    s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

fn history_db(server: &Server) -> rusqlite::Connection {
    rusqlite::Connection::open(server.dir.path().join("history.sqlite3")).unwrap()
}

#[test]
fn health_is_503_until_ready_and_the_token_is_enforced() {
    let _g = serial();
    // A non-loopback listen without a token is refused at start, naming the key.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        test_config(free_port(), dir.path(), "[http]\nlisten = \"0.0.0.0:0\"\n"),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http.token"), "{err}");

    // With a token: 401 without it; 503 while the models load, then 200.
    let port = free_port();
    std::fs::write(
        &cfg,
        test_config(
            port,
            dir.path(),
            "[http]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret-token\"\n[test_faults]\nstartup_delay_ms = 3000\n",
        ),
    )
    .unwrap();
    let log = dir.path().join("serve.log");
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(&mut child);
    let t = Instant::now();
    let http = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("admin HTTP server listening")) {
            let at = line.find("addr=").unwrap() + 5;
            break line[at..].split_whitespace().next().unwrap().to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no HTTP listener: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let url = format!("http://{http}/health");
    let (code, body) = get(&url);
    assert_eq!(code, 401, "{body}");
    let (code, _) = get_with(&url, Some("s3cret-tokeN"));
    assert_eq!(code, 401);
    let (code, body) = get_with(&url, Some("s3cret-token"));
    assert_eq!(code, 503, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["ready"], false, "{h}");
    // Ready: 200, with version, tier, models and the config's hash.
    let t = Instant::now();
    let h = loop {
        let (code, body) = get_with(&url, Some("s3cret-token"));
        if code == 200 {
            break serde_json::from_str::<serde_json::Value>(&body).unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(120), "never ready: {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("health: {h}");
    assert_eq!(h["ready"], true);
    assert_eq!(h["active_calls"], 0);
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert!(h["uptime_s"].as_f64().unwrap() >= 3.0, "{h}");
    assert!(h["tier"].as_str().is_some_and(|t| !t.is_empty()), "{h}");
    for kind in ["stt", "llm", "tts"] {
        assert!(h["models"][kind].as_str().is_some(), "{kind}: {h}");
    }
    use sha2::Digest;
    let sha = format!("{:x}", sha2::Sha256::digest(std::fs::read(&cfg).unwrap()));
    assert_eq!(h["config"]["sha256"], sha.as_str(), "{h}");
    // The metrics and the page need the token too; with it they answer.
    assert_eq!(get(&format!("http://{http}/metrics")).0, 401);
    assert_eq!(get(&format!("http://{http}/metrics?token=s3cret-token")).0, 200);
    assert_eq!(get_with(&format!("http://{http}/"), Some("s3cret-token")).0, 200);
}

struct KillOnDrop<'a>(&'a mut Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// The Debian `prometheus` binary (scripts/deps-admin.sh installs it).
fn prometheus_bin() -> PathBuf {
    let p = PathBuf::from(std::env::var("AVA_PROMETHEUS").unwrap_or_else(|_| "/usr/bin/prometheus".into()));
    assert!(
        p.is_file(),
        "{} missing: run scripts/deps-admin.sh (Debian package prometheus)",
        p.display()
    );
    p
}

/// Starts Prometheus scraping `target` every second, with a temp config and storage.
fn start_prometheus(target: &str, dir: &Path) -> (Child, String) {
    let port = free_port();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ava\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let child = Command::new(prometheus_bin())
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    (child, format!("127.0.0.1:{port}"))
}

#[test]
fn calls_are_counted_recorded_and_scraped_however_they_end() {
    let _g = serial();
    let server =
        Server::start("[actions.transfer]\noperator = \"PJSIP/100\"\n[actions.dtmf]\n\"1\" = \"transfer:operator\"\n");
    let http = server.http_addr();
    let before = scrape(&http);

    // 1. A simulated call the caller hangs up.
    let wav = audio("book_appointment.8k.wav");
    // A slow machine may play the filler first: wait for the reply after it.
    let r = server.simulate(&["--wav", wav.to_str().unwrap(), "--reply-end-ms", "6000"]);
    let sim_id = r["call_id"].as_str().unwrap().to_string();
    assert!(r["turns"][0]["voice_to_voice_ms"].as_f64().is_some(), "no reply: {r}");
    server.wait_call_line(&sim_id, "call ended", 10);
    // 2. A call the agent ends: caller info from the AGI call-start step, then the caller
    //    presses 1, bound to a transfer (the capture's UUID is fixed).
    let uuid = "e140b8a6-4847-44f0-a0d1-6e4a8f3df010";
    agi_session(&server.agi_addr, "call-start", &[uuid], "5551234", "500");
    let cap = capture("asterisk-22.10.1-call.bin");
    let r = server.simulate(&["--replay", cap.to_str().unwrap()]);
    assert_eq!(r["ended_by"], "agent_hangup", "{r}");
    server.wait_call_line(uuid, "call ended", 10);
    // 3. A call ended by a protocol error: an unknown frame kind after the id frame.
    let (mut s, bad_id) = open_call(&server.addr);
    s.write_all(&frame(0x42, b"??")).unwrap();
    drain(s, 10);
    server.wait_call_line(&bad_id.to_string(), "call ended by error", 10);
    wait_active(&http, 0, 10);

    // The metrics moved by exactly what the conversation log says happened.
    let after = scrape(&http);
    let conv = server.conversation();
    let agent_replies: Vec<&serde_json::Value> = conv
        .iter()
        .filter(|e| e["speaker"] == "agent" && e["tts_first_audio_ms"].is_u64())
        .collect();
    let n_caller = conv.iter().filter(|e| e["speaker"] == "caller").count() as f64;
    let n_agent = conv.iter().filter(|e| e["speaker"] == "agent").count() as f64;
    assert!(!agent_replies.is_empty());
    assert_eq!(delta(&before, &after, "ava_calls_started_total"), 3.0);
    assert_eq!(
        delta(&before, &after, "ava_calls_ended_total{reason=\"caller_hangup\"}"),
        1.0
    );
    assert_eq!(
        delta(&before, &after, "ava_calls_ended_total{reason=\"agent_hangup\"}"),
        1.0
    );
    assert_eq!(delta(&before, &after, "ava_calls_ended_total{reason=\"error\"}"), 1.0);
    assert_eq!(
        delta(&before, &after, "ava_protocol_errors_total{kind=\"bad_frame\"}"),
        1.0
    );
    assert_eq!(after["ava_active_calls"], 0.0);
    assert_eq!(
        delta(&before, &after, "ava_voice_to_voice_seconds_count"),
        agent_replies.len() as f64
    );
    let v2v_sum: f64 = agent_replies
        .iter()
        .map(|e| {
            (800 + e["stt_final_ms"].as_u64().unwrap() + e["tts_first_audio_ms"].as_u64().unwrap()) as f64 / 1000.0
        })
        .sum();
    assert!((delta(&before, &after, "ava_voice_to_voice_seconds_sum") - v2v_sum).abs() < 1e-6);
    assert_eq!(
        delta(&before, &after, "ava_stage_seconds_count{stage=\"llm_first_token\"}"),
        agent_replies.len() as f64
    );
    assert_eq!(delta(&before, &after, "ava_turns_total{speaker=\"caller\"}"), n_caller);
    assert_eq!(delta(&before, &after, "ava_turns_total{speaker=\"agent\"}"), n_agent);
    let greetings = delta(&before, &after, "ava_greeting_seconds_count");
    assert!((2.0..=3.0).contains(&greetings), "{greetings}");
    assert_eq!(
        delta(
            &before,
            &after,
            "ava_agi_sessions_total{result=\"ok\",script=\"call-start\"}"
        ),
        1.0
    );
    assert!(delta(&before, &after, "ava_frames_written_total") > 100.0);
    // The engines' cost: real-time factors and tokens per second can be computed.
    for engine in ["stt", "tts"] {
        let compute = delta(
            &before,
            &after,
            &format!("ava_compute_seconds_total{{engine=\"{engine}\"}}"),
        );
        let audio = delta(
            &before,
            &after,
            &format!("ava_audio_seconds_total{{engine=\"{engine}\"}}"),
        );
        // More than half a second of audio each way: the callers' utterances, and the
        // replies (short ones; since Piper's leading padding is trimmed, one run's came to
        // 0.99 s of synthesized audio).
        assert!(
            compute > 0.0 && audio > 0.5,
            "{engine}: {compute} s on {audio} s of audio"
        );
        println!("{engine} real-time factor: {:.2}", compute / audio);
    }
    let generated = delta(&before, &after, "ava_llm_tokens_total{kind=\"generated\"}");
    let llm_s = delta(&before, &after, "ava_compute_seconds_total{engine=\"llm\"}");
    assert!(
        generated >= agent_replies.len() as f64 && llm_s > 0.0,
        "{generated} tokens in {llm_s} s"
    );
    println!("LLM: {:.1} generated tokens/s", generated / llm_s);

    // The history holds each call with its turns, timings and decision.
    let (code, body) = get(&format!("http://{http}/api/calls"));
    assert_eq!(code, 200, "{body}");
    let calls: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let row = |id: &str| {
        calls
            .iter()
            .find(|c| c["call_id"] == id)
            .unwrap_or_else(|| panic!("{id} not in {body}"))
    };
    let sim = row(&sim_id);
    assert_eq!(sim["end_reason"], "caller_hangup");
    let (_, body) = get(&format!("http://{http}/api/calls/{}", sim["id"]));
    let detail: serde_json::Value = serde_json::from_str(&body).unwrap();
    let logged: Vec<&serde_json::Value> = conv.iter().filter(|e| e["call_id"] == sim_id.as_str()).collect();
    let turns = detail["turns"].as_array().unwrap();
    assert_eq!(turns.len(), logged.len(), "{detail}");
    for (t, e) in turns.iter().zip(&logged) {
        assert_eq!(t["speaker"], e["speaker"]);
        assert_eq!(t["text"], e["text"]);
        assert_eq!(
            t["llm_first_token_ms"],
            e["llm_first_token_ms"]
                .as_u64()
                .map_or(serde_json::Value::Null, Into::into)
        );
    }
    let transfer = row(uuid);
    assert_eq!(transfer["caller_id"], "5551234");
    assert_eq!(transfer["dnid"], "500");
    assert_eq!(transfer["end_reason"], "agent_hangup");
    assert_eq!(transfer["decision"], "transfer");
    assert_eq!(transfer["transfer_target"], "operator (PJSIP/100)");
    assert_eq!(row(&bad_id.to_string())["end_reason"], "error");
    // Search by caller ID and by date.
    let (_, body) = get(&format!("http://{http}/api/calls?caller=5551234"));
    let found: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(found.len(), 1, "{body}");
    let today = &sim["started"].as_str().unwrap()[..10];
    let (_, body) = get(&format!("http://{http}/api/calls?date={today}"));
    assert_eq!(
        serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap().len(),
        3,
        "{body}"
    );
    let (_, body) = get(&format!("http://{http}/api/calls?date=2001-01-01"));
    assert_eq!(body.trim(), "[]");

    // A real Prometheus scrapes /metrics; its HTTP API returns the voice-to-voice histogram.
    let pdir = tempfile::tempdir().unwrap();
    let (prom, prom_addr) = start_prometheus(&http, pdir.path());
    let mut prom = prom;
    let t = Instant::now();
    let q = "http://{a}/api/v1/query?query=sum(ava_voice_to_voice_seconds_count)".replace("{a}", &prom_addr);
    let value = loop {
        if let Ok(r) = reqwest::blocking::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(&q)
            .send()
        {
            let v: serde_json::Value = r.json().unwrap_or_default();
            if let Some(x) = v["data"]["result"][0]["value"][1].as_str() {
                break x.parse::<f64>().unwrap();
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "Prometheus never scraped the histogram: {}",
            std::fs::read_to_string(pdir.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(value, after["ava_voice_to_voice_seconds_count"]);
    let q = format!(
        "http://{prom_addr}/api/v1/query?query=histogram_quantile(0.5,sum(ava_voice_to_voice_seconds_bucket)by(le))"
    );
    let v: serde_json::Value = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(&q)
        .send()
        .unwrap()
        .json()
        .unwrap();
    println!("prometheus p50 voice-to-voice: {v}");
    let p50: f64 = v["data"]["result"][0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(p50 > 0.5 && p50 < 10.0, "{v}");
    let _ = Command::new("kill").arg(prom.id().to_string()).status();
    let _ = prom.wait();

    // 4. A call still live at shutdown ends there too, and is recorded so.
    let (s, live_id) = open_call(&server.addr);
    wait_active(&http, 1, 10);
    let (_, body) = get(&format!("http://{http}/api/live"));
    assert!(body.contains(&live_id.to_string()), "{body}");
    let _ = Command::new("kill").arg(server.pid().to_string()).status();
    let log = server.wait_log("all calls ended", 15);
    assert!(log.contains("all calls ended active_calls=0"), "{log}");
    drain(s, 10);
    let db = history_db(&server);
    let t = Instant::now();
    loop {
        let reason: Option<String> = db
            .query_row(
                "SELECT end_reason FROM calls WHERE call_id = ?1",
                [live_id.to_string()],
                |r| r.get(0),
            )
            .unwrap();
        if reason.as_deref() == Some("shutdown") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "end reason {reason:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn voiced_ms(path: &Path) -> usize {
    let (rate, samples) = read_wav(path);
    let n = rate as usize / 50;
    samples
        .chunks(n)
        .filter(|c| asterisk_voice_agent::audio::rms_dbfs(c) > -40.0)
        .count()
        * 20
}

#[test]
fn sighup_applies_a_new_greeting_to_the_next_call_and_ignores_an_invalid_config() {
    let _g = serial();
    let server = Server::start("");
    let http = server.http_addr();
    let cfg_path = server.dir.path().join("config.toml");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    let sha0 = health(&http)["config"]["sha256"].as_str().unwrap().to_string();

    // A call in progress (greeting, one exchange, then on hold) while the config changes.
    let wav = audio("book_appointment.8k.wav");
    let first = server.dir.path().join("first.wav");
    let in_progress = {
        let addr = server.addr.clone();
        let (wav, first) = (wav.clone(), first.clone());
        std::thread::spawn(move || {
            simulate(
                &addr,
                &[
                    "--wav",
                    wav.to_str().unwrap(),
                    "--hold-ms",
                    "3000",
                    "--record",
                    first.to_str().unwrap(),
                ],
            )
        })
    };
    wait_active(&http, 1, 10);
    std::fs::write(&cfg_path, format!("{original}\n[agent]\ngreeting = \"Hi.\"\n")).unwrap();
    let _ = Command::new("kill").args(["-HUP", &server.pid().to_string()]).status();
    server.wait_log("config reloaded", 30);
    let h = health(&http);
    assert_ne!(h["config"]["sha256"], sha0.as_str(), "{h}");
    // The call in progress went on to its end, unharmed.
    let r = in_progress.join().unwrap();
    assert_eq!(r["ended_by"], "caller", "{r}");
    assert!(r["turns"][0]["voice_to_voice_ms"].as_f64().is_some(), "{r}");
    let long = voiced_ms(&first);

    // The next call hears the new, short greeting.
    let next = server.dir.path().join("next.wav");
    let r = server.simulate(&["--record", next.to_str().unwrap()]);
    assert!(r["greeting_ms"].as_f64().is_some(), "{r}");
    let short = voiced_ms(&next);
    println!("voiced ms: first call {long}, after reload {short}");
    assert!(short > 0 && short < 1500, "{short}");
    assert!(long > short + 1500, "{long} vs {short}");

    // An invalid config on SIGHUP changes nothing, and the log names the bad key.
    let sha1 = health(&http)["config"]["sha256"].as_str().unwrap().to_string();
    std::fs::write(
        &cfg_path,
        format!("{original}\n[agent]\ngreeting = \"Changed.\"\n[vad]\nend_silense_ms = 500\n"),
    )
    .unwrap();
    let _ = Command::new("kill").args(["-HUP", &server.pid().to_string()]).status();
    let log = server.wait_log("config reload failed", 30);
    assert!(log.contains("end_silense_ms"), "{log}");
    assert_eq!(health(&http)["config"]["sha256"], sha1.as_str());
    let again = server.dir.path().join("again.wav");
    server.simulate(&["--record", again.to_str().unwrap()]);
    let still = voiced_ms(&again);
    assert!((still as i64 - short as i64).abs() <= 100, "{still} vs {short}");
    let m = scrape(&http);
    assert_eq!(m["ava_config_reloads_total{result=\"ok\"}"], 1.0);
    assert_eq!(m["ava_config_reloads_total{result=\"invalid\"}"], 1.0);
}

/// A minimal Chrome DevTools Protocol client over the page target's WebSocket.
struct Cdp {
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next: u64,
}

impl Cdp {
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next += 1;
        let id = self.next;
        let msg = serde_json::json!({"id": id, "method": method, "params": params});
        self.ws.send(tungstenite::Message::text(msg.to_string())).unwrap();
        loop {
            let m = self.ws.read().unwrap();
            if let tungstenite::Message::Text(t) = m {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"] == id {
                    assert!(v["error"].is_null(), "{method}: {v}");
                    return v["result"].clone();
                }
            }
        }
    }

    fn eval(&mut self, js: &str) -> serde_json::Value {
        self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        )["result"]["value"]
            .clone()
    }

    /// Evaluates `js` every 100 ms until it returns true.
    fn wait_for(&mut self, js: &str, secs: u64) {
        let t = Instant::now();
        while self.eval(js) != serde_json::Value::Bool(true) {
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "page never satisfied {js}:\n{}",
                self.eval("document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&mut self, path: &Path) {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", serde_json::json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).unwrap();
    }
}

/// Headless Chromium (Debian package `chromium`) on `url`, driven over CDP.
fn chromium(url: &str, profile: &Path) -> (Child, Cdp) {
    let bin = std::env::var("AVA_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&bin).is_file(),
        "{bin} missing: run scripts/deps-admin.sh (Debian package chromium)"
    );
    let child = Command::new(&bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
            "--window-size=1200,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(profile.with_extension("log")).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let port = loop {
        if let Ok(s) = std::fs::read_to_string(profile.join("DevToolsActivePort")) {
            if let Some(p) = s.lines().next().and_then(|l| l.trim().parse::<u16>().ok()) {
                break p;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "Chromium did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    let ws_url = loop {
        let (_, body) = get(&format!("http://127.0.0.1:{port}/json/list"));
        let targets: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        if let Some(u) = targets
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        {
            break u.to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no page target: {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (ws, _) = tungstenite::connect(ws_url.as_str()).unwrap();
    (child, Cdp { ws, next: 0 })
}

#[test]
fn the_live_page_shows_a_call_as_it_happens_then_in_the_history() {
    let _g = serial();
    let server = Server::start("");
    let http = server.http_addr();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("admin-page");
    std::fs::create_dir_all(&shots).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let (mut browser, mut cdp) = chromium(&format!("http://{http}/"), &profile.path().join("p"));
    // Killed however the test ends (a failed assertion must not leave Chromium running).
    let browser = KillOnDrop(&mut browser);
    cdp.wait_for(
        "document.readyState === 'complete' && document.getElementById('no-calls') !== null",
        30,
    );

    // A simulated call while the page is open: its card, state and transcript appear live.
    let wav = audio("book_appointment.8k.wav");
    let call = {
        let addr = server.addr.clone();
        std::thread::spawn(move || {
            simulate(
                &addr,
                &[
                    "--wav",
                    wav.to_str().unwrap(),
                    "--hold-ms",
                    "2500",
                    "--reply-end-ms",
                    "6000",
                ],
            )
        })
    };
    cdp.wait_for("document.querySelectorAll('#live .call').length === 1", 20);
    cdp.wait_for(
        "document.querySelector('#live .u.caller') !== null && document.querySelector('#live .u.agent') !== null",
        60,
    );
    let text = cdp
        .eval("document.getElementById('live').innerText")
        .as_str()
        .unwrap()
        .to_string();
    println!("live card: {text}");
    let shot = shots.join("live-call.png");
    cdp.screenshot(&shot);
    println!("screenshot: {}", shot.display());
    let r = call.join().unwrap();
    let id = r["call_id"].as_str().unwrap().to_string();
    server.wait_call_line(&id, "call ended", 10);
    // The agent's live words match what the conversation log recorded.
    let conv = server.conversation();
    let reply = conv
        .iter()
        .find(|e| e["call_id"] == id.as_str() && e["speaker"] == "agent")
        .expect("an agent reply");
    let first_words: String = reply["text"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(text.contains(&first_words), "{first_words:?} not in {text:?}");

    // Afterwards the call is ended on the page and listed in the history, with its turns.
    cdp.wait_for("document.querySelector('#live .call.ended') !== null", 10);
    cdp.wait_for(&format!("document.querySelector('#history tr.row') !== null && document.getElementById('history').innerText.includes('caller hangup')"), 10);
    cdp.eval("document.querySelector('#history tr.row').click()");
    cdp.wait_for("document.querySelectorAll('#detail tr.turn').length >= 2", 10);
    let detail = cdp.eval("document.getElementById('detail').innerText");
    println!("history detail: {detail}");
    assert!(detail.as_str().unwrap().contains(&id), "{detail}");
    let shot = shots.join("history.png");
    cdp.screenshot(&shot);
    println!("screenshot: {}", shot.display());
    drop(browser);
}

/// A call whose task dies of a bug (a panic injected at the first DTMF digit) still ends
/// everywhere the admin looks: not live any more, in the history as an error, counted in the
/// metrics; its call slot is freed and the next call is answered.
#[test]
fn a_call_that_panics_is_still_recorded_as_ended() {
    let _g = serial();
    let server = Server::start("[server]\nmax_calls = 1\n[test_faults]\npanic_on_dtmf = true\n");
    let http = server.http_addr();
    let before = scrape(&http);
    let (mut s, id) = open_call(&server.addr);
    s.write_all(&frame(0x10, &[0u8; 320])).unwrap();
    s.write_all(&frame(0x03, b"5")).unwrap();
    server.wait_log("call task ended abnormally", 10);
    drain(s, 10);
    wait_active(&http, 0, 10);
    let after = scrape(&http);
    assert_eq!(delta(&before, &after, "ava_calls_ended_total{reason=\"error\"}"), 1.0);
    let t = Instant::now();
    let row = loop {
        let (_, body) = get(&format!("http://{http}/api/calls"));
        let calls: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        if let Some(c) = calls.into_iter().find(|c| c["call_id"] == id.to_string()) {
            if !c["end_reason"].is_null() {
                break c;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{id} never ended in the history");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(row["end_reason"], "error", "{row}");
    // The only call slot is free again: a normal call gets its greeting.
    let r = server.simulate(&[]);
    assert!(r["greeting_ms"].as_f64().is_some(), "{r}");
}
