//! Issue 7: the agent stays bounded under hostile or broken peers, over real sockets against the
//! real binary with the real test models. Each test asserts the bound (threads, RSS, open fds
//! from /proc, time to close) and that a good call placed meanwhile is answered.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// `/proc/PID/status` field in its unit (kB for memory, a count for threads).
fn status(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    threads: u64,
    rss_mib: u64,
    fds: u64,
}

fn usage(pid: u32) -> Usage {
    Usage {
        threads: status(pid, "Threads"),
        rss_mib: status(pid, "VmRSS") / 1024,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64,
    }
}

/// Samples the server's usage every 20 ms while `f` runs; returns f's result and the peak.
fn peak_during<T>(pid: u32, f: impl FnOnce() -> T) -> (T, Usage) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = usage(pid);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let u = usage(pid);
                peak.threads = peak.threads.max(u.threads);
                peak.rss_mib = peak.rss_mib.max(u.rss_mib);
                peak.fds = peak.fds.max(u.fds);
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        let r = f();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (r, sampler.join().unwrap())
    })
}

/// Connections waiting in the kernel's accept queue of the listening TCP socket on
/// 127.0.0.1:`port` (`rx_queue` of its LISTEN row, state 0A, in /proc/net/tcp); 0 when the
/// server has accepted everything that arrived.
fn accept_queue(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let rx = u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?;
            (local_port == port && *f.get(3)? == "0A").then_some(rx)
        })
        .sum()
}

/// Waits until `cond` holds (polling every 50 ms), at most `secs`; returns the time it took.
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(secs), "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

fn id_frame(id: uuid::Uuid) -> Vec<u8> {
    let mut v = vec![0x01, 0x00, 0x10];
    v.extend_from_slice(id.as_bytes());
    v
}

fn audio_frame(kind: u8, samples: &[i16]) -> Vec<u8> {
    let len = samples.len() * 2;
    let mut v = vec![kind, (len >> 8) as u8, len as u8];
    for s in samples {
        v.extend_from_slice(&s.to_le_bytes());
    }
    v
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// What the agent sent until it closed.
#[derive(Debug, Default)]
struct Received {
    /// Audio frames with any sample above ~-40 dBFS.
    voiced_frames: usize,
    audio_frames: usize,
    /// The last frame was a hangup frame.
    hangup_last: bool,
    /// The close was a FIN (EOF), not a reset or a timeout.
    clean_eof: bool,
}

/// Reads frames until the agent closes (or 20 s).
fn read_until_close(s: &mut TcpStream) -> Received {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut r = Received::default();
    loop {
        match s.read(&mut chunk) {
            Ok(0) => {
                r.clean_eof = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    let mut i = 0;
    while i + 3 <= buf.len() {
        let (kind, len) = (buf[i], u16::from_be_bytes([buf[i + 1], buf[i + 2]]) as usize);
        if i + 3 + len > buf.len() {
            break;
        }
        let payload = &buf[i + 3..i + 3 + len];
        r.hangup_last = kind == 0x00;
        if kind == 0x10 || kind == 0x12 {
            r.audio_frames += 1;
            if payload
                .chunks_exact(2)
                .any(|b| i16::from_le_bytes([b[0], b[1]]).unsigned_abs() > 300)
            {
                r.voiced_frames += 1;
            }
        }
        i += 3 + len;
    }
    r
}

/// A call that stays up (reading and discarding the agent's audio) until dropped.
struct Holder {
    stream: TcpStream,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Holder {
    fn new(addr: &str) -> Holder {
        let mut stream = connect(addr);
        stream.write_all(&id_frame(uuid::Uuid::new_v4())).unwrap();
        stream.write_all(&audio_frame(0x10, &[0; 160])).unwrap();
        let mut r = stream.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while matches!(r.read(&mut b), Ok(n) if n > 0) {}
        });
        Holder {
            stream,
            reader: Some(reader),
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn good_call(server: &Server) -> serde_json::Value {
    let wav = audio("opening_hours.8k.wav");
    let r = server.simulate(&["--wav", wav.to_str().unwrap()]);
    assert!(
        r["greeting_ms"].as_f64().is_some(),
        "no greeting: {r}\n{}",
        server.log()
    );
    assert!(
        r["turns"][0]["voice_to_voice_ms"].as_f64().is_some(),
        "the good call got no answer: {r}\n{}",
        server.log()
    );
    r
}

/// Rows of the table: a rate-switching caller, id-less connections, churn of id-then-close
/// connections, a digit flood, max_calls + 1 (the busy prompt), hostile AGI values and idle
/// FastAGI connections; a good call answered in the middle of it.
#[test]
fn hostile_peers_are_bounded_and_a_good_call_is_answered() {
    let _g = serial();
    let server = Server::start_with_log(
        "[server]\nmax_calls = 2\nmax_pending = 8\nid_timeout_ms = 1000\nwrite_timeout_ms = 2000\n\
         [agi]\nmax_sessions = 16\n",
        "info,ort=warn,asterisk_voice_agent::agi=debug",
    );
    let pid = server.pid();
    let addr = server.addr.clone();
    let base = usage(pid);
    println!("idle: {base:?}");

    // 1. One call alternating kind 0x10 / 0x12 on every frame, 2,000 frames as fast as it can.
    let t = Instant::now();
    let (_, peak) = peak_during(pid, || {
        let mut c = connect(&addr);
        c.write_all(&id_frame(uuid::Uuid::new_v4())).unwrap();
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            for i in 0..2000 {
                let f = if i % 2 == 0 {
                    audio_frame(0x10, &[0; 160])
                } else {
                    audio_frame(0x12, &[0; 320])
                };
                if w.write_all(&f).is_err() {
                    break;
                }
            }
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        let r = read_until_close(&mut c);
        writer.join().unwrap();
        assert!(r.hangup_last, "{r:?}");
    });
    let closed = t.elapsed();
    server.wait_log("caller audio changed rate mid-call", 5);
    println!("rate switching: closed in {closed:?}, peak {peak:?}");
    assert!(closed < Duration::from_secs(5), "{closed:?}");
    assert!(peak.threads <= base.threads + 12, "threads {peak:?} vs idle {base:?}");

    // 2. 200 connections that never send an id frame (5 every 100 ms), while a good call is placed.
    let (report, peak) = peak_during(pid, || {
        std::thread::scope(|s| {
            let flood = s.spawn(|| {
                let mut open = Vec::new();
                for _ in 0..40 {
                    for _ in 0..5 {
                        if let Ok(c) = TcpStream::connect(&addr) {
                            open.push(c);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                // The agent closes them all (evicted, or no id within id_timeout_ms).
                for mut c in open {
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut b = [0u8; 64];
                    while matches!(c.read(&mut b), Ok(n) if n > 0) {}
                }
            });
            std::thread::sleep(Duration::from_millis(300));
            let r = good_call(&server);
            flood.join().unwrap();
            r
        })
    });
    println!("id-less flood: good call {report}, peak {peak:?}");
    assert!(peak.fds <= base.fds + 8 + 40, "fds {peak:?} vs idle {base:?}");
    server.wait_log("no id frame within 1000 ms", 5);

    // 3. Churn: 300 connections that send an id frame and close at once, 8 at a time.
    let before = usage(pid);
    let t = Instant::now();
    let (_, peak) = peak_during(pid, || {
        for _ in 0..300 / 8 + 1 {
            let conns: Vec<TcpStream> = (0..8)
                .map(|_| {
                    let mut c = connect(&addr);
                    c.write_all(&id_frame(uuid::Uuid::new_v4())).unwrap();
                    c
                })
                .collect();
            drop(conns);
        }
    });
    // Settled: the accept queue empty, then threads and fds back near idle. A burst that
    // arrives faster than the agent takes it waits in the kernel's accept queue (threads and
    // fds look idle until it is taken: in one suite run that check alone passed 31 us after a
    // 4 ms burst), then fills the task budget (`max_calls + 4 * max_pending`) with calls and
    // busy prompts whose peers already left; a connection placed before those close is
    // refused, logged "refusing a connection": the bound, by design. The digit flood below
    // comes after that (in two suite runs it came right after a 4 ms burst and was refused).
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let settle = wait_until(
        10,
        "accept queue empty, threads and fds back to idle after churn",
        || {
            let u = usage(pid);
            accept_queue(port) == 0 && u.threads <= before.threads + 2 && u.fds <= before.fds + 2
        },
    );
    let after = usage(pid);
    println!(
        "churn: {:?} + settled in {settle:?}; peak {peak:?}, after {after:?}",
        t.elapsed()
    );
    assert!(peak.threads <= before.threads + 12, "threads {peak:?} vs {before:?}");
    assert!(after.rss_mib <= before.rss_mib + 150, "RSS {after:?} vs {before:?}");

    // 4. 1,000 DTMF digits without '#': one keypad utterance of at most 32 digits.
    let id = uuid::Uuid::new_v4();
    let mut c = connect(&addr);
    c.write_all(&id_frame(id)).unwrap();
    let mut digits = Vec::new();
    for _ in 0..1000 {
        digits.extend_from_slice(&[0x03, 0x00, 0x01, b'7']);
    }
    c.write_all(&digits).unwrap();
    let keypad = || {
        server
            .conversation()
            .into_iter()
            .find(|e| e["call_id"] == id.to_string() && e["speaker"] == "caller")
    };
    // The log line first (its failure message shows the whole service log), then the entry.
    server.wait_call_line(&id.to_string(), "caller utterance", 30);
    wait_until(10, "keypad utterance in the conversation log", || keypad().is_some());
    let text = keypad().unwrap()["text"].as_str().unwrap().to_string();
    println!("digit flood -> {text:?}");
    assert_eq!(text, format!("[keypad] {}", "7".repeat(32)));
    server.wait_log("unbound DTMF digits without '#'", 5);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    read_until_close(&mut c);
    drop(c);
    server.wait_call_line(&id.to_string(), "call ended", 10);

    // 5. max_calls + 1: the extra caller hears the busy prompt, then a hangup frame and a FIN.
    let started = server.log().matches("caller audio rate").count();
    let holders = [Holder::new(&addr), Holder::new(&addr)];
    wait_until(10, "two live calls", || {
        server.log().matches("caller audio rate").count() >= started + 2
    });
    let t = Instant::now();
    let mut extra = connect(&addr);
    extra.write_all(&id_frame(uuid::Uuid::new_v4())).unwrap();
    let r = read_until_close(&mut extra);
    println!("busy: {r:?} in {:?}", t.elapsed());
    assert!(r.voiced_frames >= 25, "the busy prompt was not heard: {r:?}");
    assert!(r.hangup_last && r.clean_eof, "not a clean hangup: {r:?}");
    server.wait_log("playing the busy prompt", 5);
    drop(holders);

    // 6. Hostile FastAGI values (CR, LF, ESC in the caller name) are escaped in the log.
    // (An LF would end the AGI variable line itself: Asterisk's header is line-based.)
    let evil = "Eve\rINFO forged line\u{1b}[2J";
    let uuid = uuid::Uuid::new_v4().to_string();
    let vars = agi_session(&server.agi_addr, "call-start", &[&uuid], evil, "500");
    assert_eq!(vars.get("AVA_UUID"), Some(&uuid), "{vars:?}");
    let log = server.wait_log("FastAGI call-start caller details", 5);
    assert!(!log.contains('\u{1b}'), "a raw ESC reached the log");
    assert!(!log.lines().any(|l| l.starts_with("INFO forged")), "a forged log line");
    assert!(log.contains("Eve\\rINFO forged line\\u{1b}[2J"), "{log}");

    // 7. 100 idle FastAGI connections: at most [agi] max_sessions are kept.
    let before = usage(pid);
    let idle: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(&server.agi_addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = usage(pid);
    println!("100 idle FastAGI connections: {during:?} (before {before:?})");
    assert!(during.fds <= before.fds + 16 + 4, "fds {during:?} vs {before:?}");
    server.wait_log("[agi] max_sessions sessions open", 5);
    drop(idle);

    // And after all this, a good call is answered as usual.
    let r = good_call(&server);
    println!("good call at the end: {r}");
    let end = usage(pid);
    println!("end: {end:?} (idle {base:?})");
}

/// The server's threads whose name starts with `prefix`.
/// The service log's last line holding `needle` (panics if none).
fn last_log_line(server: &Server, needle: &str) -> String {
    let log = server.log();
    let line = log.lines().rfind(|l| l.contains(needle));
    line.unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"))
        .to_string()
}

fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|c| c.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

/// A call that ends with caller audio still queued for its recognizer stops the recognizer
/// after the chunk in hand instead of decoding the backlog for nobody. Here 4 callers each send 4.8 s of speech
/// at once (under stt::MAX_QUEUED_SECONDS) and hang up as soon as their recognizers are built,
/// with nearly all of it still queued. Found in a soak on a CPU-starved machine: ended calls'
/// recognizers kept decoding their backlogs, which starved the live calls' recognizers, whose
/// backlogs grew in turn (16 `stt-` threads for 2 live calls). The next call gets one of the
/// stopped recognizers from the pool (src/recognizer_pool.rs).
#[test]
fn an_ended_call_does_not_decode_its_stt_backlog() {
    let _g = serial();
    // No start-up warm-up: its thread is an `stt-` thread too, and all 4 recognizers fresh.
    let server = Server::start_with_log(
        "[server]\nwarm_recognizers = 0\n",
        "info,ort=warn,asterisk_voice_agent::stt=debug",
    );
    let pid = server.pid();
    let (rate, speech) = read_wav(&audio("book_appointment.8k.wav"));
    assert_eq!(rate, 8000);
    // The voiced frames only (all of them reach the recognizer), repeated to 240 (4.8 s).
    let voiced: Vec<&[i16]> = speech
        .chunks_exact(160)
        .filter(|f| asterisk_voice_agent::audio::rms_dbfs(f) > -35.0)
        .collect();
    let frames: Vec<u8> = voiced
        .iter()
        .cycle()
        .take(240)
        .flat_map(|f| audio_frame(0x10, f))
        .collect();
    let calls: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = connect(&server.addr);
            c.write_all(&id_frame(uuid::Uuid::new_v4())).unwrap();
            c.write_all(&frames).unwrap();
            c
        })
        .collect();
    wait_until(20, "4 recognizers built", || {
        server.log().matches("STT recognizer ready").count() >= 4
    });
    let t = Instant::now();
    for c in &calls {
        c.shutdown(std::net::Shutdown::Write).unwrap();
    }
    for mut c in calls {
        read_until_close(&mut c);
    }
    let closed = t.elapsed();
    let gone = wait_until(60, "recognizer threads gone", || threads_named(pid, "stt-") == 0);
    println!(
        "4 calls with 4.8 s of speech queued each: closed {closed:?} after the hangup, recognizer threads gone after {gone:?}"
    );
    // Each stops after the chunk it is decoding: with a fresh recognizer on this test model one
    // 20 ms chunk can take seconds (src/recognizer_pool.rs); decoding the whole backlog took 17.8 s
    // here before the fix.
    let log = server.log();
    let left: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("STT stopped: the call ended"))
        .filter_map(|l| {
            l.split("queued_samples=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    println!("audio left undecoded (samples): {left:?}");
    // Only a call whose VAD heard speech has audio queued for STT (in one suite run one of the
    // 4 heard none, the burst being all in its first moments): each of those must stop with
    // most of its 4.8 s undecoded. Before the fix none stopped: all decoded to the end.
    assert!(!left.is_empty(), "no recognizer stopped at the hangup:\n{log}");
    assert!(left.iter().all(|&n| n > 8000), "{left:?}");
    // And the server still answers, with a recognizer kept from those calls (reset).
    good_call(&server);
    let last_ready = last_log_line(&server, "STT recognizer ready");
    assert!(last_ready.contains("reused=true"), "{last_ready}");
}

/// A caller that stops reading: its call ends within `write_timeout_ms` (plus the socket
/// buffers), its slot is freed, and a good call is answered.
#[test]
fn a_caller_that_stops_reading_is_hung_up() {
    let _g = serial();
    let server = Server::start("[server]\nmax_calls = 1\nwrite_timeout_ms = 2000\n[call]\nmax_call_ms = 60000\n");
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A small receive buffer, so the window fills within seconds.
    let stream = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(addr).await.unwrap().into_std().unwrap()
    });
    stream.set_nonblocking(false).unwrap();
    let mut w = stream.try_clone().unwrap();
    w.write_all(&id_frame(uuid::Uuid::new_v4())).unwrap();
    let t = Instant::now();
    // Keep sending silence (like Asterisk does) but never read.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let sender = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if w.write_all(&audio_frame(0x10, &[0; 160])).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    server.wait_log("has not read the call's audio", 60);
    let ended = t.elapsed();
    println!("non-reading caller hung up after {ended:?}");
    assert!(ended < Duration::from_secs(30), "{ended:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().unwrap();
    drop(stream);
    // The agent's close (hangup frame, FIN, drain) ends at our close; then the slot is free.
    std::thread::sleep(Duration::from_secs(1));
    // The only slot is free again.
    let r = good_call(&server);
    println!("good call after it: {r}");
}

/// SIGTERM with two live calls (each with its recognizer, and a reply being generated), ten
/// times: exit status 0 every time.
#[test]
fn sigterm_with_live_calls_exits_0_ten_times() {
    let _g = serial();
    for run in 0..10 {
        let mut server = Server::start("");
        let addr = server.addr.clone();
        let mut holders = [Holder::new(&addr), Holder::new(&addr)];
        wait_until(10, "two live calls", || {
            server.log().matches("caller audio rate").count() >= 2
        });
        for h in &mut holders {
            h.stream
                .write_all(&[0x03, 0x00, 0x01, b'4', 0x03, 0x00, 0x01, b'#'])
                .unwrap();
        }
        wait_until(10, "two keypad utterances", || {
            server.log().matches("caller utterance").count() >= 2
        });
        std::thread::sleep(Duration::from_millis(100 * (run % 5)));
        let t = Instant::now();
        unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
        let status = server.wait_exit(25);
        println!(
            "run {run}: exit {status:?} after {:?}; {}",
            t.elapsed(),
            server
                .log()
                .lines()
                .find(|l| l.contains("worker threads"))
                .unwrap_or("-")
        );
        assert_eq!(status.code(), Some(0), "run {run}: {status:?}\n{}", server.log());
        drop(holders);
    }
}

/// The conversation log under a failed write (an injected disk-full half way through a line),
/// duplicate UUIDs, a caller hanging up mid-reply, and the dead-air deadline.
#[test]
fn nothing_is_lost_and_no_dead_air() {
    let _g = serial();
    // The 2nd entry is written half, then fails like a full disk. No filler, so the first
    // agent audio after the caller's question is the reply.
    // (Deadlines far out: on a loaded machine the re-prompt must not be mistaken for the reply.)
    let server = Server::start(
        "[call]\nfiller_after_ms = 60000\nreply_deadline_ms = 120000\nllm_timeout_ms = 60000\n\
         [test_faults]\nlog_fail_at = 2\n",
    );
    let addr = server.addr.clone();

    // Two live calls with the same UUID, each sends a keypad utterance.
    let id = uuid::Uuid::new_v4();
    let mut calls: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = connect(&addr);
            c.write_all(&id_frame(id)).unwrap();
            c
        })
        .collect();
    server.wait_log("duplicate call UUID", 5);
    for c in &mut calls {
        c.write_all(&[0x03, 0x00, 0x01, b'5', 0x03, 0x00, 0x01, b'#']).unwrap();
    }
    wait_until(20, "both keypad entries (one lost to the disk fault)", || {
        server.log().contains("conversation log write failed")
            && server
                .conversation()
                .iter()
                .filter(|e| e["speaker"] == "caller")
                .count()
                >= 1
    });
    // Every line parses (Server::conversation panics on a torn line), entries after the fault
    // are there, and the two calls are told apart.
    wait_until(20, "agent entries of both calls", || {
        let ids: std::collections::BTreeSet<String> = server
            .conversation()
            .iter()
            .map(|e| e["call_id"].as_str().unwrap().to_string())
            .collect();
        ids.contains(&id.to_string()) && ids.contains(&format!("{id}#2"))
    });
    for mut c in calls {
        c.shutdown(std::net::Shutdown::Write).unwrap();
        read_until_close(&mut c);
    }
    let raw = std::fs::read_to_string(server.dir.path().join("conversations.jsonl")).unwrap();
    assert!(
        raw.ends_with('\n')
            && raw
                .lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
    );

    // A caller hangs up while the reply plays: the reply is logged, interrupted, with what was played.
    let hid = uuid::Uuid::new_v4();
    let mut c = connect(&addr);
    c.write_all(&id_frame(hid)).unwrap();
    let mut r = c.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Instant>();
    // Reader: reports each voiced agent frame's arrival.
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 3 {
                let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
                if buf.len() < 3 + len {
                    break;
                }
                let voiced = buf[0] == 0x10
                    && buf[3..3 + len]
                        .chunks_exact(2)
                        .any(|b| i16::from_le_bytes([b[0], b[1]]).unsigned_abs() > 300);
                if voiced && tx.send(Instant::now()).is_err() {
                    return;
                }
                buf.drain(..3 + len);
            }
        }
    });
    // Silence through the greeting (until 1 s without voiced agent audio), then the question,
    // then silence until the reply has played for 400 ms: hang up.
    let frame_silence = audio_frame(0x10, &[0; 160]);
    let pace = |c: &mut TcpStream, f: &[u8]| {
        c.write_all(f).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut last_voiced = Instant::now();
    let t0 = Instant::now();
    while last_voiced.elapsed() < Duration::from_secs(1) || t0.elapsed() < Duration::from_secs(2) {
        while let Ok(t) = rx.try_recv() {
            last_voiced = t;
        }
        pace(&mut c, &frame_silence);
    }
    // The question as keypad digits: no dependence on what Vosk makes of it on a loaded machine.
    c.write_all(&[0x03, 0x00, 0x01, b'5', 0x03, 0x00, 0x01, b'#']).unwrap();
    while rx.try_recv().is_ok() {}
    let mut reply_started = None;
    let t = Instant::now();
    // Generous: on a loaded shared machine Vosk alone can take many seconds.
    while t.elapsed() < Duration::from_secs(90) {
        if let Ok(at) = rx.try_recv() {
            reply_started.get_or_insert(at);
        }
        if reply_started.is_some_and(|at| at.elapsed() >= Duration::from_millis(400)) {
            break;
        }
        pace(&mut c, &frame_silence);
    }
    assert!(reply_started.is_some(), "no reply\n{}", server.log());
    c.shutdown(std::net::Shutdown::Both).unwrap();
    drop(rx);
    let _ = reader.join();
    let cut_logged = || {
        server
            .conversation()
            .iter()
            .any(|e| e["call_id"] == hid.to_string() && e["speaker"] == "agent" && e["interrupted"] == true)
    };
    let t = Instant::now();
    while !cut_logged() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no interrupted reply logged:\n{:#?}\n{}",
            server.conversation(),
            server.call_lines(&hid.to_string()).join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let cut = server
        .conversation()
        .into_iter()
        .find(|e| e["call_id"] == hid.to_string() && e["speaker"] == "agent" && e["interrupted"] == true)
        .unwrap();
    println!("reply cut by the caller's hangup, logged: {cut}");
    drop(server);

    // Dead air: a reply that takes 7 s gets the filler, a second filler, then the re-prompt.
    let server = Server::start("[test_faults]\nllm_delay_ms = 7000\n");
    let did = uuid::Uuid::new_v4();
    let mut c = connect(&server.addr);
    c.write_all(&id_frame(did)).unwrap();
    c.write_all(&[0x03, 0x00, 0x01, b'9', 0x03, 0x00, 0x01, b'#']).unwrap();
    let mut r = c.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while matches!(r.read(&mut b), Ok(n) if n > 0) {}
    });
    let prompts = || -> Vec<String> {
        server
            .conversation()
            .iter()
            .filter(|e| e["call_id"] == did.to_string())
            .filter_map(|e| e["prompt"].as_str().map(String::from))
            .collect()
    };
    wait_until(15, "filler, second filler and re-prompt", || {
        prompts().iter().any(|p| p == "reprompt")
    });
    let p = prompts();
    println!("dead air prompts: {p:?}");
    assert_eq!(p, ["filler", "second_filler", "reprompt"]);
    c.shutdown(std::net::Shutdown::Both).unwrap();
    let _ = drain.join();
}

/// A recognizer kept between calls is replaced once it has served `server.recognizer_max_calls`
/// calls (its lookahead caches only grow: heaptrack put the soak's memory growth there): a
/// fresh one is warmed in the background and takes its place, the worn one is dropped, and the
/// next call is answered by the warmed one. With the limit at 2 here, after 2 calls.
#[test]
fn a_worn_recognizer_is_replaced_by_a_warmed_one() {
    let _g = serial();
    let server = Server::start_with_log(
        "[server]\nrecognizer_max_calls = 2\n",
        "info,ort=warn,asterisk_voice_agent::stt=debug",
    );
    let http = server.http_addr();
    good_call(&server);
    assert!(!server.log().contains("warming a replacement"), "{}", server.log());
    good_call(&server);
    server.wait_log("warming a replacement", 30);
    let warmed = wait_until(120, "the replacement warmed", || {
        scrape_metrics(&http)
            .get("ava_stt_recognizers_replaced_total")
            .copied()
            .unwrap_or(0.0)
            >= 1.0
    });
    let m = scrape_metrics(&http);
    println!(
        "replacement warmed {warmed:?} after the second call ended; metrics: replaced {:?}, idle {:?}",
        m.get("ava_stt_recognizers_replaced_total"),
        m.get("ava_stt_recognizers_idle")
    );
    // The worn one was dropped, not kept beside its replacement.
    assert_eq!(m.get("ava_stt_recognizers_idle").copied(), Some(1.0));
    let log = server.log();
    let warm_line = log.lines().find(|l| l.contains("STT recognizer warmed")).unwrap();
    assert!(warm_line.contains("replaces=true"), "{warm_line}");
    // The third call gets the replacement: kept in the pool, no call served yet.
    good_call(&server);
    let last_ready = last_log_line(&server, "STT recognizer ready");
    assert!(
        last_ready.contains("reused=true") && last_ready.contains("calls=0"),
        "{last_ready}"
    );
}
