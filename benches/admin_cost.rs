//! Benchmark: what the admin's view costs `serve`. The same calls run twice against a fresh
//! server: once with nobody watching, once with the live page open in headless Chromium (SSE)
//! and a real Prometheus scraping `/metrics` every second. Prints the server's CPU time and RSS
//! (mean and peak, sampled every 100 ms) and the agent's pacing p99 for each. Not a test: it
//! asserts nothing about speed.
//!
//! Run: `cargo bench --bench admin_cost` (needs scripts/deps-admin.sh: Debian `prometheus` and
//! `chromium`). Environment: `BENCH_ROUNDS` (rounds of 2 simultaneous calls, default 3).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th, stime 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn watchers(http: &str, dir: &std::path::Path) -> Vec<Child> {
    let (prom, _) = prometheus_scraping(http, dir);
    let browser = Command::new("chromium")
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
        ])
        .arg(format!("--user-data-dir={}", dir.join("chromium").display()))
        .arg(format!("http://{http}/"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium (scripts/deps-admin.sh)");
    vec![prom, browser]
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let wavs = [audio("book_appointment.8k.wav"), audio("opening_hours.8k.wav")];
    println!("admin cost: {rounds} rounds of 2 simultaneous calls (test tier), shared machine");
    for watched in [false, true] {
        let server = Server::start("");
        let pid = server.pid();
        let http = server.http_addr();
        let dir = tempfile::tempdir().unwrap();
        let mut kids = if watched {
            watchers(&http, dir.path())
        } else {
            Vec::new()
        };
        std::thread::sleep(Duration::from_secs(3)); // the page loaded, Prometheus scraping
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    samples.push(rss_kb(pid));
                    std::thread::sleep(Duration::from_millis(100));
                }
                samples
            })
        };
        let cpu0 = cpu_ticks(pid);
        let t = Instant::now();
        let mut p99s = Vec::new();
        for _ in 0..rounds {
            let reports: Vec<serde_json::Value> = std::thread::scope(|s| {
                let hs: Vec<_> = wavs
                    .iter()
                    .map(|w| {
                        let server = &server;
                        s.spawn(move || server.simulate(&["--wav", w.to_str().unwrap()]))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for r in reports {
                p99s.push(r["pacing"]["p99_gap_ms"].as_f64().unwrap_or(f64::NAN));
            }
        }
        let wall = t.elapsed().as_secs_f64();
        let cpu = (cpu_ticks(pid) - cpu0) as f64 / 100.0; // USER_HZ = 100 on Linux
        stop.store(true, Ordering::Relaxed);
        let rss = sampler.join().unwrap();
        let mean = rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64 / 1024.0;
        let peak = *rss.iter().max().unwrap_or(&0) as f64 / 1024.0;
        p99s.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{:<34} wall {wall:6.1} s  serve CPU {cpu:6.2} s ({:4.1} %)  RSS mean {mean:6.1} MiB peak {peak:6.1} MiB  pacing p99 per call: worst {:.1} ms, median {:.1} ms",
            if watched { "page open + Prometheus every 1 s:" } else { "nobody watching:" },
            100.0 * cpu / wall,
            p99s.last().copied().unwrap_or(f64::NAN),
            p99s.get(p99s.len() / 2).copied().unwrap_or(f64::NAN),
        );
        for k in &mut kids {
            let _ = Command::new("kill").arg(k.id().to_string()).status();
            let _ = k.wait();
        }
    }
}
