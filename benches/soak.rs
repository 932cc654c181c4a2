//! Soak benchmark (issue 7): simulated calls two at a time against the real `serve` with the
//! test models for `SOAK_MINUTES` (default 30), printing the server's RSS, threads and open
//! fds every minute (RSS also as the minute's floor and peak, sampled every 250 ms), and at the
//! end the slope per call after warm-up (the first minute), and over the second half of the
//! minutes alone. RSS should stay flat: a slope near 0 KiB per call. Also the allocator's
//! (jemalloc's) bytes allocated (floor of the minute, scraped from `/metrics` every second)
//! and its resident pages (last scrape of the minute), which tell growth from fragmentation,
//! the most Vosk recognizers alive in the minute (kept in the pool + live calls), whose number
//! steps the allocated bytes up, and the worn recognizers replaced so far. Not a test: it
//! asserts nothing.
//!
//! Run: `cargo bench --bench soak` (after `scripts/install-models.sh`); `SOAK_MINUTES=10` for a
//! shorter run; `SOAK_CONFIG` adds TOML to the server's config (e.g. `[llm]` /
//! `scheduler = "batched"`, to tell what grows). On a shared machine wrap it in
//! `flock /tmp/ava-bench.lock`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// issue 7: jemalloc's `(allocated, resident)` bytes from the server's `/metrics`
/// (`ava_malloc_bytes`), to tell memory still allocated from memory freed but kept resident,
/// and the Vosk recognizers alive (`ava_stt_recognizers_idle` + `ava_active_calls`: each live
/// call holds one once its audio started), and the worn recognizers replaced so far
/// (`ava_stt_recognizers_replaced_total`, `server.recognizer_max_calls`).
fn malloc_bytes(http: &str) -> Option<(f64, f64, f64, f64)> {
    let m = scrape_metrics(http);
    let get = |kind: &str| m.get(&format!("ava_malloc_bytes{{kind=\"{kind}\"}}")).copied();
    let recognizers =
        m.get("ava_stt_recognizers_idle").copied().unwrap_or(0.0) + m.get("ava_active_calls").copied().unwrap_or(0.0);
    let replaced = m.get("ava_stt_recognizers_replaced_total").copied().unwrap_or(0.0);
    Some((get("allocated")?, get("resident")?, recognizers, replaced))
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

fn main() {
    let minutes: u64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(30);
    let wavs = ["book_appointment.8k.wav", "opening_hours.8k.wav", "confirm_yes.8k.wav"]
        .map(|n| audio(n).display().to_string());
    println!("soak: {minutes} min of calls 2 at a time (test tier), one row per minute");
    let extra = std::env::var("SOAK_CONFIG").unwrap_or_default();
    if !extra.is_empty() {
        println!("config added: {extra:?}");
    }
    let server = Server::start(&extra);
    let pid = server.pid();
    let http = server.http_addr();
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "idle: RSS {} MiB, threads {}, fds {}",
        status(pid, "VmRSS:") / 1024,
        status(pid, "Threads:"),
        fds(pid)
    );
    println!(
        "{:>4} {:>6} {:>9} {:>9} {:>9} {:>8} {:>5} {:>8} {:>11} {:>10} {:>11} {:>8}",
        "min",
        "calls",
        "RSS_MiB",
        "floor_MiB",
        "peak_MiB",
        "threads",
        "fds",
        "no_reply",
        "heap_floor",
        "resident",
        "recognizers",
        "replaced"
    );
    let calls = AtomicUsize::new(0);
    let missing = AtomicUsize::new(0);
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    let mut rows: Vec<(f64, f64, f64, f64, f64)> = Vec::new(); // calls, rss KiB, threads, fds, RSS floor KiB
    let mut heap_rows: Vec<(f64, f64)> = Vec::new(); // calls, allocated floor KiB
    std::thread::scope(|s| {
        for lane in 0..2 {
            let (server, calls, missing, wavs) = (&server, &calls, &missing, &wavs);
            s.spawn(move || {
                let mut i = lane;
                while Instant::now() < end {
                    let w = &wavs[i % wavs.len()];
                    i += 1;
                    let r = server.simulate(&["--wav", w]);
                    if r["turns"][0]["voice_to_voice_ms"].is_null() {
                        missing.fetch_add(1, Ordering::Relaxed);
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for m in 1..=minutes {
            let wake = end - Duration::from_secs((minutes - m) * 60);
            // RSS every 250 ms through the minute: its floor (the moments between calls' big
            // buffers) shows a leak far better than one sample taken wherever the calls are.
            let mut floor = u64::MAX;
            let mut peak = 0;
            // the allocator's bytes allocated every second: its floor too.
            let (mut heap_floor, mut held, mut recognizers) = (f64::INFINITY, f64::NAN, 0.0f64);
            let mut replaced = 0.0f64;
            let mut tick = 0u32;
            while Instant::now() < wake {
                let kb = status(pid, "VmRSS:");
                floor = floor.min(kb);
                peak = peak.max(kb);
                if tick % 4 == 0 {
                    if let Some((allocated, resident, r, worn)) = malloc_bytes(&http) {
                        heap_floor = heap_floor.min(allocated / 1024.0);
                        held = resident / 1024.0;
                        recognizers = recognizers.max(r);
                        replaced = worn;
                    }
                }
                tick += 1;
                std::thread::sleep(Duration::from_millis(250).min(wake.saturating_duration_since(Instant::now())));
            }
            let row = (
                calls.load(Ordering::Relaxed) as f64,
                status(pid, "VmRSS:") as f64,
                status(pid, "Threads:") as f64,
                fds(pid) as f64,
                floor as f64,
            );
            println!(
                "{m:>4} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>5} {:>8} {:>11.1} {:>10.1} {:>11} {:>8}",
                row.0,
                row.1 / 1024.0,
                row.4 / 1024.0,
                peak as f64 / 1024.0,
                row.2,
                row.3,
                missing.load(Ordering::Relaxed),
                heap_floor / 1024.0,
                held / 1024.0,
                recognizers,
                replaced
            );
            rows.push(row);
            heap_rows.push((row.0, heap_floor));
        }
    });
    // After warm-up: the first minute's row is the baseline.
    let warm: Vec<_> = rows.iter().skip(1).collect();
    let per = |f: fn(&(f64, f64, f64, f64, f64)) -> f64| slope(&warm.iter().map(|r| (r.0, f(r))).collect::<Vec<_>>());
    println!(
        "slope per call after warm-up: RSS {:+.2} KiB (the minute's floor {:+.2} KiB), threads {:+.4}, fds {:+.4} ({} calls, {} without a reply)",
        per(|r| r.1),
        per(|r| r.4),
        per(|r| r.2),
        per(|r| r.3),
        calls.load(Ordering::Relaxed),
        missing.load(Ordering::Relaxed)
    );
    println!(
        "slope per call after warm-up of the allocated floor (ava_malloc_bytes, bytes still allocated): {:+.2} KiB",
        slope(&heap_rows.iter().skip(1).copied().collect::<Vec<_>>())
    );
    // Whether the growth levels off: the same slopes over the second half of the minutes only
    // (a pool of recognizers filling and their caches warming happen early).
    let half = rows.len() / 2;
    if rows.len() >= 4 {
        let late = |f: fn(&(f64, f64, f64, f64, f64)) -> f64| {
            slope(&rows[half..].iter().map(|r| (r.0, f(r))).collect::<Vec<_>>())
        };
        println!(
            "slope per call over the second half (minutes {}-{}): RSS {:+.2} KiB (floor {:+.2} KiB), allocated floor {:+.2} KiB",
            half + 1,
            rows.len(),
            late(|r| r.1),
            late(|r| r.4),
            slope(&heap_rows[half..])
        );
    }
    println!(
        "peak RSS (VmHWM): {} MiB; figures from a shared 2-core machine when run there",
        status(pid, "VmHWM:") / 1024
    );
}
