//! Benchmark: N simultaneous simulated calls against the real `serve` with the test models.
//! Prints voice-to-voice latency p50/p95, greeting latency, the stage split (Vosk's final
//! decode, LLM first token, first TTS audio, each from the conversation log), agent pacing
//! jitter, start-up time and RSS (idle and peak). Not a test: it asserts nothing about speed.
//!
//! Run: `cargo bench --bench calls` (after `scripts/install-models.sh`). Environment:
//! `BENCH_CALLS=1,4,8` (call counts, a fresh server each), `BENCH_WAVS=a.wav,b.wav` (utterances
//! per call; default book_appointment and opening_hours), `BENCH_SCHEDULERS=batched,per_call`
//! (issue 10: `[llm] scheduler` values compared in the same run), `BENCH_BARGE_IN=6`.
//! `BENCH_HOLD_MS` (`simulate --hold-ms` for every caller: on a slow machine the callers
//! otherwise hang up after the filler, before the reply).
//! `BENCH_OBSERVERS=none,prometheus` (issue 9: each configuration run again with a real
//! Prometheus scraping `/metrics` every second, to see what being watched costs the pacing; needs
//! scripts/deps-admin.sh; default `none`).
//! `BENCH_WARMUP=1` (default): before the measured round, the same number of calls say one
//! utterance each, so the measured calls get warmed recognizers from the pool, as on a server
//! that has taken calls before (src/recognizer_pool.rs); `startup`: no such round, but the
//! measured round waits for the recognizers warmed at start-up (`server.warm_recognizers`);
//! `0`: the measured calls start as soon as the server is ready.
//! `BENCH_TURN=silence,smart,smart+spec` (issue 8: `[turn] mode` values compared in the same
//! run, `+spec` with `turn.speculative = true`, `+noprefill` with `turn.prefill_every_ms = 0`;
//! without `+spec` the speculative reply is off; default the config's defaults, e.g.
//! `silence+spec`).
//! `BENCH_STAGGER_MS=700`: in the measured round call k starts 700 ms x k after the first, so
//! the callers do not all stop talking at the same instant (default 0: they do, the worst case).
//! `BENCH_CONFIG`: TOML added to every server's config (e.g. `[llm]` / `threads = 1`).
//! `BENCH_LOG=debug` (the service log filter, `AVA_LOG`; default `info,ort=warn`) and
//! `BENCH_KEEP_LOGS=DIR` (each server's whole log written to `DIR/calls-N-SCHED-TURN.log`).
//! issue 10 adds: aggregate LLM tokens/s (from the `LLM reply done` log lines), RSS per extra
//! call, and the Vosk recognizers' own share of it (measured in this process). RSS per call is
//! given three ways: from the peak (VmHWM, one sample, so transient peaks such as concurrent
//! syntheses weigh in it), from the RSS sampled while the calls are live and quiet (their
//! `BENCH_HOLD_MS` hold, >= 10 s), and from the RSS before the warm-up round. The server runs
//! with `MALLOC_CONF=dirty_decay_ms:1000,muzzy_decay_ms:0` unless MALLOC_CONF is set, so memory
//! freed by earlier calls is not counted as idle (jemalloc's default keeps it 10 s).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use serde_json::Value;
use std::process::Command;

fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// True when `hold_ms` (BENCH_HOLD_MS) is at least 10 s: the last reply has ended well before
/// the callers hang up, so [`held_rss_kb`] has a quiet window to sample.
fn hold_long_enough(hold_ms: Option<&str>) -> bool {
    hold_ms
        .and_then(|h| h.parse::<u64>().ok())
        .is_some_and(|ms| ms >= 10_000)
}

/// Runs `n` simulated calls (`simulate` with `args`) at once against `server` (process `pid`),
/// sampling its VmRSS every 100 ms. Returns the calls' reports, when each caller hung up and
/// the samples (both in seconds from the round's start; samples as (seconds, kB)).
/// Call k (from 0) starts `stagger_ms` x k after the first.
fn sampled_round(
    server: &Server,
    args: &[&str],
    n: usize,
    stagger_ms: u64,
    pid: u32,
) -> (Vec<Value>, Vec<f64>, Vec<(f64, u64)>) {
    let start = std::time::Instant::now();
    let sampling = std::sync::atomic::AtomicBool::new(true);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut out = Vec::new();
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                out.push((start.elapsed().as_secs_f64(), status_kb(pid, "VmRSS:")));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            out
        });
        let hs: Vec<_> = (0..n)
            .map(|k| {
                s.spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(stagger_ms * k as u64));
                    let r = server.simulate(args);
                    (r, start.elapsed().as_secs_f64())
                })
            })
            .collect();
        let (reports, finished) = hs.into_iter().map(|h| h.join().unwrap()).unzip();
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        (reports, finished, sampler.join().unwrap())
    })
}

/// Seconds of each caller's hold (before the first caller hangs up) over which
/// [`held_rss_kb`] takes the median.
const HELD_WINDOW_S: f64 = 4.0;

/// issue 10: the server's RSS (kB) with every call still connected and none talking: the median
/// of `samples` ((seconds into the round, VmRSS kB)) over the last [`HELD_WINDOW_S`] s before
/// the first caller hung up (`finished`, seconds into the round). Each caller holds the line
/// `hold_ms` after its last utterance (`simulate --hold-ms`); the window lies in it only when
/// the hold is long enough for the last reply to have ended, so `None` below 10 s.
fn held_rss_kb(samples: &[(f64, u64)], finished: &[f64], hold_ms: Option<&str>) -> Option<u64> {
    if !hold_long_enough(hold_ms) {
        return None;
    }
    let first_hangup = finished.iter().copied().fold(f64::INFINITY, f64::min);
    // The hangup itself and simulate's exit take a moment: stop 0.5 s before it.
    let (from, to) = (first_hangup - 0.5 - HELD_WINDOW_S, first_hangup - 0.5);
    let mut v: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| (from..to).contains(t))
        .map(|&(_, kb)| kb)
        .collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// issue 10: total generated tokens and the time (ms) at least one reply was being generated,
/// from the server's `LLM reply done` lines (`generated_tokens`, `ms`, `end_unix_ms`).
fn llm_tokens(log: &str) -> (u64, u64) {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    let mut tokens = 0;
    for line in log.lines().filter(|l| l.contains("LLM reply done")) {
        let field = |k: &str| -> Option<u64> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
        };
        if let (Some(g), Some(ms), Some(end)) = (field("generated_tokens"), field("ms"), field("end_unix_ms")) {
            tokens += g;
            spans.push((end.saturating_sub(ms), end));
        }
    }
    spans.sort();
    let (mut busy, mut cur): (u64, Option<(u64, u64)>) = (0, None);
    for (a, b) in spans {
        cur = match cur {
            Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                busy += cb - ca;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    if let Some((a, b)) = cur {
        busy += b - a;
    }
    (tokens, busy)
}

/// issue 10: RSS (kB) one Vosk recognizer adds once it has decoded the bench's utterances,
/// measured in this process with `k` recognizers: the STT model's share of RSS per call.
fn stt_kb_per_call(wavs: &[String], k: usize) -> (f64, f64) {
    use asterisk_voice_agent::models::manifest;
    let man = manifest::load(&models_dir()).expect("installed test models");
    let stt = asterisk_voice_agent::stt::SttEngine::load(
        &man.path_for(asterisk_voice_agent::models::ModelKind::Stt).unwrap(),
    )
    .unwrap();
    let me = std::process::id();
    let before = status_kb(me, "VmRSS:");
    let mut streams: Vec<_> = (0..k)
        .map(|i| stt.start_stream(&format!("bench-{i}"), 8000).unwrap())
        .collect();
    let mut after_first = None;
    for w in wavs {
        let (_, samples) = read_wav(std::path::Path::new(w));
        for (s, _) in &mut streams {
            for chunk in samples.chunks(160) {
                s.audio(chunk.to_vec());
            }
            s.finish();
        }
        for (_, rx) in &mut streams {
            let _ = rx.blocking_recv();
        }
        after_first.get_or_insert_with(|| status_kb(me, "VmRSS:"));
    }
    let after = status_kb(me, "VmRSS:");
    drop(streams);
    (
        after.saturating_sub(before) as f64 / k as f64,
        after.saturating_sub(after_first.unwrap_or(after)) as f64 / k as f64,
    )
}

/// `ava_frames_late_total` and `ava_frames_written_total` (agent frames written more than 10 ms
/// after their tick, and all of them) from a scrape of the server's `/metrics`; 0 when absent.
fn frames_late(m: &std::collections::BTreeMap<String, f64>) -> (u64, u64) {
    let get = |name: &str| m.get(name).copied().unwrap_or(0.0) as u64;
    (get("ava_frames_late_total"), get("ava_frames_written_total"))
}

/// issue 10: `ava_stage_seconds{stage="tts_wait"}`'s sum (s) and count: sentences' waits for
/// a free synthesis worker, from a scrape of the server's `/metrics`; zeros when absent.
fn tts_waits(m: &std::collections::BTreeMap<String, f64>) -> (f64, f64) {
    let get = |name: &str| m.get(name).copied().unwrap_or(0.0);
    (
        get("ava_stage_seconds_sum{stage=\"tts_wait\"}"),
        get("ava_stage_seconds_count{stage=\"tts_wait\"}"),
    )
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    // issue 10: the server (which inherits this environment) has jemalloc hand freed pages back
    // to the kernel after 1 s instead of 10, so its RSS in the quiet end of a round (and 2 s
    // after the warm-up round) is what is still in use, not what the allocator kept of earlier
    // calls. Not 0: at 0 every synthesis faults its tensors in afresh (Piper's real-time factor
    // 0.22 -> 0.30 on a 2-core AMD EPYC), which made the bench's latency worse than serve's.
    // Set MALLOC_CONF to override, e.g. `MALLOC_CONF=dirty_decay_ms:10000` for jemalloc's default.
    if std::env::var_os("MALLOC_CONF").is_none() {
        std::env::set_var("MALLOC_CONF", "dirty_decay_ms:1000,muzzy_decay_ms:0");
    }
    let counts: Vec<usize> = std::env::var("BENCH_CALLS")
        .unwrap_or_else(|_| "1,4,8".into())
        .split(',')
        .map(|s| s.trim().parse().expect("BENCH_CALLS is a list of numbers"))
        .collect();
    let wavs: Vec<String> = std::env::var("BENCH_WAVS")
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_else(|_| {
            ["book_appointment.8k.wav", "opening_hours.8k.wav"]
                .iter()
                .map(|n| audio(n).display().to_string())
                .collect()
        });
    println!("asterisk-voice-agent call benchmark: test tier (Vosk ko, SmolLM2-135M Q4_1, Piper joe medium), {} utterances per call", wavs.len());
    println!(
        "machine: {} cores; the server's MALLOC_CONF: {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::env::var("MALLOC_CONF").unwrap_or_default()
    );
    let schedulers: Vec<String> = std::env::var("BENCH_SCHEDULERS")
        .unwrap_or_else(|_| "batched,per_call".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    // BENCH_STT_SHARE=0 skips the in-process Vosk measurement (it takes a while).
    let (stt_kb, stt_growth_kb) = if std::env::var("BENCH_STT_SHARE").as_deref() == Ok("0") {
        (f64::NAN, f64::NAN)
    } else {
        stt_kb_per_call(&wavs, 4)
    };
    if stt_kb.is_nan() {
        println!("Vosk recognizer RSS per call: not measured (BENCH_STT_SHARE=0)");
    } else {
        println!(
            "Vosk recognizer RSS per call (in-process, 4 recognizers after the utterances): {:.1} MB, of which {:.1} MB \
             grew after the first utterance (a recognizer kept in the pool from a warm-up call grows by that in a \
             measured call, so that much of the figures \"live and quiet\" below is Vosk's)",
            stt_kb / 1024.0,
            stt_growth_kb / 1024.0
        );
    }
    // BENCH_HOLD_MS: each simulated caller stays on the line this long after its last
    // utterance (`simulate --hold-ms`), so a reply slower than the filler is still heard.
    let hold_ms: Option<String> = std::env::var("BENCH_HOLD_MS").ok();
    // BENCH_STAGGER_MS: in the measured round call k starts this much x k after the first, so
    // the callers do not all stop talking at the same instant (default 0: they do).
    let stagger_ms: u64 = std::env::var("BENCH_STAGGER_MS")
        .map(|v| v.parse().expect("BENCH_STAGGER_MS is a number of ms"))
        .unwrap_or(0);
    let warmup_mode = std::env::var("BENCH_WARMUP").unwrap_or_else(|_| "1".into());
    assert!(
        ["0", "1", "startup"].contains(&warmup_mode.as_str()),
        "BENCH_WARMUP: 0, 1 or startup"
    );
    let warmup = warmup_mode == "1";
    let observers: Vec<String> = std::env::var("BENCH_OBSERVERS")
        .unwrap_or_else(|_| "none".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let turns: Vec<String> = std::env::var("BENCH_TURN")
        .map(|s| s.split(',').map(|m| m.trim().to_string()).collect())
        .unwrap_or_else(|_| {
            // The config's defaults, written the way BENCH_TURN takes them.
            let d = asterisk_voice_agent::config::TurnConfig::default();
            let spec = if d.speculative { "+spec" } else { "" };
            let prefill = if d.prefill_every_ms == 0 { "+noprefill" } else { "" };
            vec![format!("{:?}{spec}{prefill}", d.mode).to_lowercase()]
        });
    let mut summary: Vec<String> = Vec::new();
    let mut runs: Vec<(usize, String, String, String)> = Vec::new();
    for &n in &counts {
        for turn in &turns {
            for sched in &schedulers {
                for observer in &observers {
                    runs.push((n, sched.clone(), observer.clone(), turn.clone()));
                }
            }
        }
    }
    for (n, sched, observer, turn) in runs {
        let mut parts = turn.split('+');
        let mode = parts.next().unwrap_or_default();
        let (mut speculative, mut prefill) = (false, String::new());
        for suffix in parts {
            match suffix {
                "spec" => speculative = true,
                "noprefill" => prefill = "prefill_every_ms = 0\n".into(),
                other => panic!("BENCH_TURN: unknown suffix +{other} (+spec, +noprefill)"),
            }
        }
        let server = Server::start_with_log(
            &format!(
                // The start-up STT warm-up at its default (the test harness turns it off).
                "[server]\nmax_calls = {}\nwarm_recognizers = 2\n\n{}",
                n.max(8),
                merge_sections(
                    &format!("\n[llm]\nscheduler = \"{sched}\"\n\n[turn]\nmode = \"{mode}\"\nspeculative = {speculative}\n{prefill}"),
                    &std::env::var("BENCH_CONFIG").unwrap_or_default(),
                )
            ),
            &std::env::var("BENCH_LOG").unwrap_or_else(|_| common::LOG_FILTER.into()),
        );
        let pid = server.pid();
        let prom_dir = tempfile::tempdir().unwrap();
        let mut prometheus = match observer.as_str() {
            "none" => None,
            "prometheus" => {
                let (p, _) = prometheus_scraping(&server.http_addr(), prom_dir.path());
                std::thread::sleep(std::time::Duration::from_secs(3)); // started and scraping
                Some(p)
            }
            other => panic!("BENCH_OBSERVERS: unknown observer {other:?} (none | prometheus)"),
        };
        if warmup_mode == "startup" {
            let want = asterisk_voice_agent::config::ServerConfig::default()
                .warm_recognizers
                .min(n.max(8));
            let t = std::time::Instant::now();
            while server.log().matches("STT recognizer warmed").count() < want {
                assert!(t.elapsed().as_secs() < 120, "recognizers not warmed in 120 s");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        // RSS before any call: with a warm-up round, the calls' freed memory stays with the
        // allocator (jemalloc's decay) and is in `idle_rss` below.
        let cold_rss = status_kb(pid, "VmRSS:");
        if warmup {
            let first = ["--wav", wavs[0].as_str()];
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..n).map(|_| s.spawn(|| server.simulate(&first))).collect();
                hs.into_iter().for_each(|h| drop(h.join().unwrap()));
            });
        }
        let startup = server
            .log()
            .lines()
            .find(|l| l.contains("AudioSocket server ready"))
            .and_then(|l| l.split("startup_ms=").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        // Past the default MALLOC_CONF's 1 s decay, so what the warm-up calls freed is returned.
        std::thread::sleep(std::time::Duration::from_millis(2000));
        let idle_rss = status_kb(pid, "VmRSS:");
        let mut args: Vec<&str> = Vec::new();
        for w in &wavs {
            args.extend(["--wav", w.as_str()]);
        }
        if let Some(h) = hold_ms.as_deref() {
            args.extend(["--hold-ms", h]);
        }
        // With n > 1 calls and a hold long enough to sample, one call alone first: RSS per extra
        // call is the slope between its live RSS and the n calls' (the memory every call
        // shares, e.g. ONNX Runtime's arenas grown to the longest reply, is then not in it).
        let single_held = if n > 1 && hold_long_enough(hold_ms.as_deref()) {
            let (_, finished, samples) = sampled_round(&server, &args, 1, 0, pid);
            held_rss_kb(&samples, &finished, hold_ms.as_deref())
        } else {
            None
        };
        // What the measured round logs starts here.
        let log_from = server.log().len();
        let metrics_before = scrape_metrics(&server.http_addr());
        let (late_before, waits_before) = (frames_late(&metrics_before), tts_waits(&metrics_before));
        let (reports, finished, samples) = sampled_round(&server, &args, n, stagger_ms, pid);
        std::thread::sleep(std::time::Duration::from_millis(500));
        let peak_rss = status_kb(pid, "VmHWM:");
        let held_rss = held_rss_kb(&samples, &finished, hold_ms.as_deref());

        let mut v2v = Vec::new();
        let mut missing = 0;
        let mut greet = Vec::new();
        let mut p99 = Vec::new();
        let mut maxgap = Vec::new();
        for r in &reports {
            if let Some(g) = r["greeting_ms"].as_f64() {
                greet.push(g);
            }
            for t in r["turns"].as_array().unwrap() {
                match t["voice_to_voice_ms"].as_f64() {
                    Some(x) => v2v.push(x),
                    None => missing += 1,
                }
            }
            p99.push(r["pacing"]["p99_gap_ms"].as_f64().unwrap_or(f64::NAN));
            maxgap.push(r["pacing"]["max_gap_ms"].as_f64().unwrap_or(f64::NAN));
        }
        let measured: Vec<&str> = reports.iter().filter_map(|r| r["call_id"].as_str()).collect();
        let conv: Vec<Value> = server
            .conversation()
            .into_iter()
            .filter(|e| e["call_id"].as_str().is_some_and(|id| measured.contains(&id)))
            .collect();
        let agent: Vec<&Value> = conv
            .iter()
            .filter(|e| e["speaker"] == "agent" && !e["interrupted"].as_bool().unwrap_or(false))
            .collect();
        let stage = |k: &str| -> Vec<f64> { agent.iter().filter_map(|e| e[k].as_f64()).collect() };
        let (mut stt, mut llm, mut tts) = (
            stage("stt_final_ms"),
            stage("llm_first_token_ms"),
            stage("tts_first_audio_ms"),
        );

        println!(
            "\n== {n} simultaneous call(s), llm.scheduler = {sched}, turn.mode = {turn}, observer: {observer}, BENCH_WARMUP={warmup_mode}, BENCH_STAGGER_MS={stagger_ms}, {} turns ({missing} without a reply)",
            v2v.len() + missing
        );
        println!(
            "voice-to-voice (end of caller speech -> first agent audio): p50 {:.0} ms, p95 {:.0} ms",
            percentile(&mut v2v, 0.5),
            percentile(&mut v2v, 0.95)
        );
        // issue 8: end of speech -> turn decided (Smart Turn or the timer), the turn model's
        // inference time and the speculative replies, from the logs.
        let mut decided = stage("turn_decided_ms");
        println!(
            "  end of caller speech -> turn decided (turn_decided_ms, [turn] mode {turn}): p50 {:.0} ms, p95 {:.0} ms",
            percentile(&mut decided, 0.5),
            percentile(&mut decided, 0.95)
        );
        let log = server.log()[log_from..].to_string();
        let mut infer: Vec<f64> = log
            .lines()
            .filter(|l| l.contains("turn model verdict"))
            .filter_map(|l| l.split("inference_ms=").nth(1)?.split_whitespace().next()?.parse().ok())
            .collect();
        let spec = |what: &str| log.lines().filter(|l| l.contains(what)).count();
        println!(
            "  Smart Turn: {} inferences, p50 {:.0} ms, p95 {:.0} ms; speculative replies committed {}, dropped {}; replies prepared in the pause {}",
            infer.len(),
            percentile(&mut infer, 0.5),
            percentile(&mut infer, 0.95),
            spec("speculative reply committed"),
            spec("speculative reply dropped"),
            agent.iter().filter(|e| e["speculative"] == true).count()
        );
        // The reply's own audio (a filler is first agent audio but not the answer): the sum of
        // the stages of each agent turn that has all three.
        let mut to_reply: Vec<f64> = agent
            .iter()
            .filter_map(|e| {
                Some(e["turn_decided_ms"].as_f64()? + e["stt_final_ms"].as_f64()? + e["tts_first_audio_ms"].as_f64()?)
            })
            .collect();
        println!(
            "  end of caller speech -> first reply audio queued (turn decided + STT final + first audio; fillers excluded): p50 {:.0} ms, p95 {:.0} ms",
            percentile(&mut to_reply, 0.5),
            percentile(&mut to_reply, 0.95)
        );
        println!(
            "  Vosk final decode after the endpoint (stt_final_ms): p50 {:.0} ms, p95 {:.0} ms",
            percentile(&mut stt, 0.5),
            percentile(&mut stt, 0.95)
        );
        println!(
            "  final transcript -> LLM first token: p50 {:.0} ms, p95 {:.0} ms",
            percentile(&mut llm, 0.5),
            percentile(&mut llm, 0.95)
        );
        let mut evaluated = stage("llm_evaluated_tokens");
        println!(
            "  prompt tokens the reply evaluated (not in the KV cache; fewer with the prefill): p50 {:.0}, p95 {:.0}",
            percentile(&mut evaluated, 0.5),
            percentile(&mut evaluated, 0.95)
        );
        println!(
            "  final transcript -> first agent audio queued: p50 {:.0} ms, p95 {:.0} ms",
            percentile(&mut tts, 0.5),
            percentile(&mut tts, 0.95)
        );
        println!(
            "greeting (id frame -> first agent audio): p50 {:.0} ms, max {:.0} ms",
            percentile(&mut greet, 0.5),
            percentile(&mut greet, 1.0)
        );
        let metrics_after = scrape_metrics(&server.http_addr());
        let (late_after, waits_after) = (frames_late(&metrics_after), tts_waits(&metrics_after));
        let late = format!("{} of {}", late_after.0 - late_before.0, late_after.1 - late_before.1);
        let sentences = waits_after.1 - waits_before.1;
        println!(
            "TTS: {sentences:.0} sentences synthesized, mean wait for a free worker {:.0} ms (ava_stage_seconds{{stage=\"tts_wait\"}})",
            (waits_after.0 - waits_before.0) * 1000.0 / sentences.max(1.0)
        );
        println!(
            "agent pacing gaps (at the simulated caller): worst call p99 {:.2} ms, median call p99 {:.2} ms, worst max {:.2} ms; frames written late (server side, ava_frames_late_total): {late}",
            percentile(&mut p99, 1.0),
            percentile(&mut p99, 0.5),
            percentile(&mut maxgap, 1.0)
        );
        let fillers = conv.iter().filter(|e| e["prompt"] == "filler").count();
        println!(
            "dead air: longest wait for the agent after the caller stopped {:.0} ms; fillers played {fillers} (in {} turns)",
            percentile(&mut v2v, 1.0),
            v2v.len() + missing
        );
        // issue 10: silence inside replies (the next sentence not ready when the one before it
        // had played), from the conversation log; absent means 0.
        let stalls: Vec<f64> = agent
            .iter()
            .map(|e| e["reply_stall_ms"].as_f64().unwrap_or(0.0))
            .collect();
        let stalled = stalls.iter().filter(|&&x| x > 0.0).count();
        let stall_total: f64 = stalls.iter().sum();
        println!(
            "  silence inside replies (reply_stall_ms): {stalled} of {} replies, {stall_total:.0} ms in all, longest {:.0} ms",
            stalls.len(),
            stalls.iter().copied().fold(0.0, f64::max)
        );
        println!(
            "serve: start-up {startup} ms, RSS idle {} MB, peak {} MB",
            idle_rss / 1024,
            peak_rss / 1024
        );
        let per_call = if n > 1 {
            (peak_rss.saturating_sub(idle_rss)) as f64 / 1024.0 / n as f64
        } else {
            (peak_rss.saturating_sub(idle_rss)) as f64 / 1024.0
        };
        // With a warm-up round the measured calls take the recognizers it left in the pool
        // (src/recognizer_pool.rs): those are in the idle figure, not in the per-call one.
        let stt_where = if warmup {
            "kept from the warm-up round, so in the idle figure, not in this one"
        } else {
            "made for these calls, so in this figure, except those warmed at start-up (server.warm_recognizers, in the idle figure)"
        };
        println!(
            "  RSS per call (peak - idle) / calls: {per_call:.1} MB; Vosk recognizers (~{:.1} MB each, measured in this process) {stt_where}",
            stt_kb / 1024.0
        );
        let held_per_call = held_rss.map_or(f64::NAN, |kb| {
            kb.saturating_sub(idle_rss) as f64 / 1024.0 / n.max(1) as f64
        });
        match held_rss {
            Some(kb) => println!(
                "  RSS with the {n} call(s) live and quiet (the last {HELD_WINDOW_S} s of their hold, median): {} MB: \
                 (that - idle) / calls {held_per_call:.1} MB",
                kb / 1024
            ),
            None => println!("  RSS with the calls live and quiet: not measured (needs BENCH_HOLD_MS >= 10000)"),
        }
        let per_extra = match (single_held, held_rss) {
            (Some(one), Some(all)) => {
                let x = all.saturating_sub(one) as f64 / 1024.0 / (n - 1) as f64;
                println!(
                    "  RSS per extra call: one call alone first, live and quiet {} MB; ({} - {}) / {}: {x:.1} MB",
                    one / 1024,
                    all / 1024,
                    one / 1024,
                    n - 1
                );
                x
            }
            _ => f64::NAN,
        };
        if warmup {
            println!(
                "  RSS before the warm-up round {} MB: (peak - that) / calls {:.1} MB, all the calls cost, the \
                 memory the warm-up calls freed and the allocator kept included",
                cold_rss / 1024,
                peak_rss.saturating_sub(cold_rss) as f64 / 1024.0 / n.max(1) as f64
            );
        }
        let (tokens, busy_ms) = llm_tokens(&log);
        let tps = if busy_ms > 0 {
            tokens as f64 * 1000.0 / busy_ms as f64
        } else {
            f64::NAN
        };
        println!("LLM: {tokens} tokens generated in {busy_ms} ms with a reply in flight: aggregate {tps:.0} tokens/s");
        summary.push(format!(
            "{n} call(s) {sched:>9} {turn:>7} {observer:>10}: v2v p50/p95 {:.0}/{:.0} ms, speech end->reply audio p50/p95 {:.0}/{:.0} ms, transcript->first token p50/p95 {:.0}/{:.0} ms, ->first audio p50/p95 {:.0}/{:.0} ms, {tps:.0} tok/s, pacing p99 worst/median {:.2}/{:.2} ms, late frames {late}, RSS idle/peak {}/{} MB, {per_call:.1} MB/call (peak), {held_per_call:.1} MB/call (live, quiet), {per_extra:.1} MB/extra call, fillers {fillers}, stalls {stalled} ({stall_total:.0} ms)",
            percentile(&mut v2v, 0.5),
            percentile(&mut v2v, 0.95),
            percentile(&mut to_reply, 0.5),
            percentile(&mut to_reply, 0.95),
            percentile(&mut llm, 0.5),
            percentile(&mut llm, 0.95),
            percentile(&mut tts, 0.5),
            percentile(&mut tts, 0.95),
            percentile(&mut p99, 1.0),
            percentile(&mut p99, 0.5),
            idle_rss / 1024,
            peak_rss / 1024,
        ));

        // Barge-in: callers who talk over the greeting at different moments, one at a time
        // beside n - 1 ordinary calls, so the figure is taken under the same load.
        let barge: usize = std::env::var("BENCH_BARGE_IN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(6);
        let mut stops = Vec::new();
        let wav0 = wavs[0].clone();
        std::thread::scope(|s| {
            let load: Vec<_> = (1..n).map(|_| s.spawn(|| server.simulate(&args))).collect();
            for k in 0..barge {
                let after = (700 + 150 * k).to_string();
                let r = server.simulate(&["--wav", &wav0, "--barge-in-after-ms", &after]);
                if let Some(x) = r["turns"][0]["barge_in_stop_ms"].as_f64() {
                    stops.push(x);
                }
            }
            load.into_iter().for_each(|h| drop(h.join()));
        });
        println!(
            "barge-in stop latency (caller's first speech frame -> last agent frame), {} of {barge} barge-ins: p50 {:.0} ms, p95 {:.0} ms",
            stops.len(),
            percentile(&mut stops, 0.5),
            percentile(&mut stops, 0.95)
        );
        if let Some(p) = prometheus.as_mut() {
            let _ = Command::new("kill").arg(p.id().to_string()).status();
            let _ = p.wait();
        }
        if let Ok(dir) = std::env::var("BENCH_KEEP_LOGS") {
            let path = std::path::Path::new(&dir).join(format!("calls-{n}-{sched}-{turn}.log"));
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&path, server.log()))
                .unwrap_or_else(|e| panic!("BENCH_KEEP_LOGS: cannot write {}: {e}", path.display()));
            println!("service log kept: {}", path.display());
        }
    }
    println!("\n== summary (shared 2-core machine unless stated otherwise)");
    for l in summary {
        println!("{l}");
    }
}
