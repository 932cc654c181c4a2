//! Test harness: starts the real binary's `serve` with the real test models on a free loopback
//! port, runs the real `simulate`, and reads the service and conversation logs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The binary under test: this build's, or `AVA_TEST_BIN` (e.g. an installed package's).
pub fn bin() -> String {
    std::env::var("AVA_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_asterisk-voice-agent").to_string())
}

/// `~/.cache/asterisk-voice-agent` (or `AVA_HOME`): native libs and test models.
pub fn ava_home() -> PathBuf {
    std::env::var_os("AVA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/asterisk-voice-agent"))
}

/// The models dir `model-setup` installed the test tier into (`scripts/install-models.sh`);
/// panics with the command to run when it is missing.
pub fn models_dir() -> PathBuf {
    let m = std::env::var_os("AVA_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| ava_home().join("models"));
    assert!(
        m.join("manifest.json").is_file(),
        "test models missing in {}: run ./scripts/test.sh (or scripts/install-models.sh {})",
        m.display(),
        m.display()
    );
    m
}

/// The test tier's Piper voice loaded in this process with `settings` (the ONNX Runtime and
/// espeak-ng data of the test set-up); panics when it does not load.
pub fn test_voice(settings: asterisk_voice_agent::tts::TtsSettings) -> asterisk_voice_agent::tts::TtsEngine {
    let voice = models_dir().join("en_US-joe-medium/en_US-joe-medium.onnx");
    let espeak = asterisk_voice_agent::engines::find_espeak_data(None).expect("espeak-ng-data");
    let ort = ava_home().join("lib/libonnxruntime.so.1");
    asterisk_voice_agent::tts::TtsEngine::load(&voice, &ort, &espeak, settings).expect("voice loads")
}

/// A test utterance: `../shared/audio/NAME` beside the repo, else the bundled copy.
pub fn audio(name: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = repo.join("../shared/audio").join(name);
    if shared.is_file() {
        shared
    } else {
        repo.join("tests/fixtures").join(name)
    }
}

/// A raw Asterisk capture from `../shared/audiosocket/`.
pub fn capture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/audiosocket")
        .join(name);
    assert!(
        p.is_file(),
        "{} missing: the shared folder must sit beside the repo",
        p.display()
    );
    p
}

/// Tests that run the models take the machine's two cores: one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A free port on 127.0.0.1 whose next port is free too (the AudioSocket and FastAGI ports
/// of a test server).
pub fn free_port() -> u16 {
    loop {
        let p = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

/// Plays Asterisk's side of one FastAGI session (`AGI(agi://ADDR/script,args...)`): sends the
/// `agi_*` block with this caller ID and DNID, answers `200 result=1` to every command and
/// returns the channel variables the server set.
pub fn agi_session(addr: &str, script: &str, args: &[&str], caller_id: &str, dnid: &str) -> BTreeMap<String, String> {
    use std::io::{BufRead, BufReader, Write};
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut header = format!(
        "agi_network: yes\nagi_network_script: {script}\nagi_request: agi://{addr}/{script}\n\
         agi_channel: PJSIP/{caller_id}-00000001\nagi_language: en\nagi_type: PJSIP\n\
         agi_uniqueid: 1700000000.1\nagi_version: 22.10.1\nagi_callerid: {caller_id}\n\
         agi_calleridname: Test Caller\nagi_dnid: {dnid}\nagi_context: voice-agent\n\
         agi_extension: {dnid}\nagi_priority: 2\nagi_enhanced: 0.0\n"
    );
    for (i, a) in args.iter().enumerate() {
        header.push_str(&format!("agi_arg_{}: {a}\n", i + 1));
    }
    header.push('\n');
    w.write_all(header.as_bytes()).unwrap();
    let mut vars = BTreeMap::new();
    for line in BufReader::new(s).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("SET VARIABLE ") {
            let (name, value) = rest.split_once(' ').unwrap();
            vars.insert(name.to_string(), value.trim_matches('"').to_string());
        }
        w.write_all(b"200 result=1\n").unwrap();
    }
    vars
}

/// A real Prometheus (Debian package `prometheus`, scripts/deps-admin.sh) scraping `http`'s
/// `/metrics` every second, keeping its data in `dir`, on a free loopback port. Returns the
/// process and its port; kill it when done.
pub fn prometheus_scraping(http: &str, dir: &Path) -> (Child, u16) {
    let port = free_port();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ava\n    static_configs:\n      - targets: ['{http}']\n"),
    )
    .unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (scripts/deps-admin.sh)");
    (child, port)
}

/// The config for the installed test models (read from the manifest); `models_extra` goes
/// into `[models]`, `extra` at the end (TOML).
pub fn test_config_with(port: u16, dir: &Path, models_extra: &str, extra: &str) -> String {
    format!(
        r#"[server]
audiosocket_listen = "127.0.0.1:{port}"
{warm}
[agi]
listen = "127.0.0.1:{agi_port}"

[models]
dir = "{models}"
onnxruntime = "{ort}"
{models_extra}

[log]
conversation_log = "{log}"
{admin}{extra}"#,
        models = models_dir().display(),
        ort = ava_home().join("lib/libonnxruntime.so.1").display(),
        log = dir.join("conversations.jsonl").display(),
        agi_port = port + 1,
        admin = admin_sections(dir, extra),
        // The start-up STT warm-up (`server.warm_recognizers`) is off unless a test asks for it:
        // on the 2-core CI machine its background decoding would slow every test's first call.
        warm = if extra.contains("warm_recognizers") {
            ""
        } else {
            "warm_recognizers = 0\n"
        },
    )
}

/// Appends the TOML `extra` to `base`, moving the keys of a `[section]` that `base` already has
/// (e.g. `[server]`, `[agi]`) under that section's header, since TOML forbids opening it twice.
pub fn merge_sections(base: &str, extra: &str) -> String {
    let mut out = base.to_string();
    let mut rest = String::new();
    let mut target: Option<String> = None;
    for line in extra.lines() {
        let t = line.trim();
        if t.starts_with('[') && !t.starts_with("[[") {
            target = Some(t.to_string()).filter(|h| out.lines().any(|l| l.trim() == h));
            if target.is_none() {
                rest.push_str(line);
                rest.push('\n');
            }
            continue;
        }
        match &target {
            Some(h) => {
                let at = out.find(&format!("{h}\n")).unwrap() + h.len() + 1;
                out.insert_str(at, &format!("{line}\n"));
            }
            None => {
                rest.push_str(line);
                rest.push('\n');
            }
        }
    }
    out.push('\n');
    out.push_str(&rest);
    out
}

/// `[http]` on a free port and `[history]` in `dir`, unless `extra` sets them (issue 9).
fn admin_sections(dir: &Path, extra: &str) -> String {
    let mut s = String::new();
    if !extra.contains("[http]") {
        s.push_str("\n[http]\nlisten = \"127.0.0.1:0\"\n");
    }
    if !extra.contains("[history]") {
        s.push_str(&format!(
            "\n[history]\npath = \"{}\"\n",
            dir.join("history.sqlite3").display()
        ));
    }
    s
}

/// [`test_config_with`] with nothing extra under `[models]`.
pub fn test_config(port: u16, dir: &Path, extra: &str) -> String {
    test_config_with(port, dir, "", extra)
}

/// The service log filter (`AVA_LOG`) the tests and benches run `serve` with.
pub const LOG_FILTER: &str = "info,ort=warn";

/// A running `serve`. Dropping it sends SIGTERM and waits.
pub struct Server {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The FastAGI address, `127.0.0.1:PORT+1`.
    pub agi_addr: String,
    /// Temp folder with the config, the service log and the conversation log.
    pub dir: tempfile::TempDir,
}

impl Server {
    /// Starts `serve` with the test models and waits until it is ready.
    pub fn start(extra_config: &str) -> Server {
        Server::start_with_log(extra_config, LOG_FILTER)
    }

    /// [`Server::start`] with `server_extra` (TOML keys) added under `[server]`.
    pub fn start_with(server_extra: &str, extra_config: &str) -> Server {
        Server::start(&format!("[server]\n{server_extra}\n\n{extra_config}"))
    }

    /// [`Server::start`] with the service log filter `AVA_LOG` (e.g. to see DEBUG lines).
    pub fn start_with_log(extra_config: &str, filter: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = dir.path().join("config.toml");
        let mut base = test_config(port, dir.path(), "");
        if extra_config.contains("warm_recognizers") {
            base = base.replace("warm_recognizers = 0\n", "");
        }
        std::fs::write(&cfg, merge_sections(&base, extra_config)).unwrap();
        let stderr = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("AVA_LOG", filter)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut s = Server {
            child,
            addr: format!("127.0.0.1:{port}"),
            agi_addr: format!("127.0.0.1:{}", port + 1),
            dir,
        };
        let t = Instant::now();
        while !s.log().contains("AudioSocket server ready") {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("serve exited with {status} during start-up:\n{}", s.log());
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "serve not ready in 120 s:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    /// Waits (at most `secs`) for the process to exit on its own; returns its status.
    pub fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "serve still running {secs} s later:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin HTTP address (`127.0.0.1:PORT`), from the service log.
    pub fn http_addr(&self) -> String {
        let log = self.wait_log("admin HTTP server listening", 60);
        let line = log.lines().find(|l| l.contains("admin HTTP server listening")).unwrap();
        let at = line.find("addr=").expect("addr= in the listening line") + 5;
        line[at..].split_whitespace().next().unwrap().to_string()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The service log so far (stderr, tracing at INFO).
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("serve.log")) {
            f.read_to_string(&mut s).unwrap();
        }
        s
    }

    /// Waits until the service log contains `needle` (panics after `secs`).
    pub fn wait_log(&self, needle: &str, secs: u64) -> String {
        let t = Instant::now();
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "no {needle:?} in the service log after {secs} s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The conversation log's entries.
    pub fn conversation(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("conversations.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Runs `simulate --json` against this server with `args` and returns its report.
    pub fn simulate(&self, args: &[&str]) -> serde_json::Value {
        simulate(&self.addr, args)
    }

    /// Waits until a service-log line of call `call_id` contains `needle`; returns the call's lines.
    pub fn wait_call_line(&self, call_id: &str, needle: &str, secs: u64) -> Vec<String> {
        let t = Instant::now();
        loop {
            let lines = self.call_lines(call_id);
            if lines.iter().any(|l| l.contains(needle)) {
                return lines;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "no {needle:?} for call {call_id} after {secs} s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Service-log lines that mention `call_id`.
    pub fn call_lines(&self, call_id: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(call_id))
            .map(String::from)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `simulate --json --server addr args...` and parses the report.
pub fn simulate(addr: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin())
        .args(["simulate", "--json", "--server", addr])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad report ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Reads a mono 16-bit WAV.
pub fn read_wav(path: &Path) -> (u32, Vec<i16>) {
    let mut r = hound::WavReader::open(path).unwrap();
    let rate = r.spec().sample_rate;
    (rate, r.samples::<i16>().map(|s| s.unwrap()).collect())
}

/// Prometheus text -> `name{sorted labels}` -> value.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        let key = match series.split_once('{') {
            Some((name, labels)) => {
                let mut ls: Vec<&str> = labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .collect();
                ls.sort();
                format!("{name}{{{}}}", ls.join(","))
            }
            None => series.to_string(),
        };
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        m.insert(key, v);
    }
    m
}

/// `/metrics` of the server whose HTTP side is at `http`, parsed ([`parse_metrics`]); empty
/// when it cannot be fetched.
pub fn scrape_metrics(http: &str) -> BTreeMap<String, f64> {
    reqwest::blocking::get(format!("http://{http}/metrics"))
        .and_then(|r| r.text())
        .map(|t| parse_metrics(&t))
        .unwrap_or_default()
}

/// The `p` quantile (0..1, nearest rank) of `v`, which it sorts; NaN when empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[(((v.len() as f64) * p).ceil() as usize)
        .saturating_sub(1)
        .min(v.len() - 1)]
}

/// Least-squares slope of y over x; NaN with fewer than 2 points or a single x.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let num: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    if den == 0.0 {
        f64::NAN
    } else {
        num / den
    }
}

/// The test tier's GGUF (SmolLM2-135M-Instruct Q4_1) under [`models_dir`].
pub fn test_gguf() -> PathBuf {
    models_dir().join("smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf")
}
