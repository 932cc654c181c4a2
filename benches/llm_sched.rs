//! Benchmark (issue 10): the LLM schedulers alone, without STT or TTS. N sessions (as N
//! calls) with the real test model and the agent's real system prompt and greeting (warmed
//! into the KV cache as a call does), then every caller's question arrives at the same instant
//! (the worst case: callers who stop speaking together), twice per session. Prints, for
//! `batched` (one context, a KV sequence per call) and `per_call` (a context per call) at each
//! N: request -> first token p50/p95 (ms), reply time p50/p95 (ms), aggregate generated tokens/s
//! over the wall time, and RSS (idle after load, and per extra session: (peak - idle) / N, MiB).
//!
//! In `benches/calls.rs` the same stages share the cores with N Vosk recognizers; here the
//! LLM has the machine, so what the scheduler itself does is what is measured. Not a test.
//!
//! Run: `cargo bench --bench llm_sched` (after `scripts/install-models.sh`).
//! `BENCH_CALLS=1,4,8`, `BENCH_SCHEDULERS=batched,per_call`, `BENCH_ROUNDS=2` (questions per
//! session), `BENCH_LLM_THREADS` (llama.cpp threads per context generating tokens; default as
//! `serve`: the physical cores for the shared context, 2 for a per-call one),
//! `BENCH_LLM_BATCH_THREADS` (threads evaluating prompts; default: as generating).
//!
//! `BENCH_CHURN=200` instead runs that many sessions (2 at a time, each: open, warm, one reply,
//! drop) per scheduler and prints RSS every 20 sessions and the slope per session after the
//! first 20 (issue 7: what the LLM alone adds to the soak's RSS growth per call).

#[path = "../tests/common/mod.rs"]
mod common;

use asterisk_voice_agent::config::{AgentConfig, LlmScheduler};
use asterisk_voice_agent::llm::{prologue, LlmEngine, LlmEvent, LlmSession, LlmSettings, Message, Role};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const QUESTIONS: [&str; 8] = [
    "What time do you open on Saturday?",
    "Do you have parking near the shop?",
    "Can I book an appointment for next Tuesday?",
    "How much does a haircut cost?",
    "Is the manager in today?",
    "Can you tell me your address please?",
    "Do you take card payments?",
    "I would like to cancel my booking for tomorrow.",
];

fn model_path() -> PathBuf {
    common::test_gguf()
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resets VmHWM to the current RSS (Linux `clear_refs`, value 5).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// `BENCH_LLM_THREADS`: llama.cpp threads per context, instead of what `serve` would use.
fn threads_override() -> Option<i32> {
    std::env::var("BENCH_LLM_THREADS").ok()?.parse().ok()
}

/// The settings `serve` would use for `scheduler` (threads: the cores for the shared context,
/// the tier's 2 for a per-call one; `BENCH_LLM_THREADS` overrides), with `sequences` KV sequences.
fn settings(scheduler: LlmScheduler, sequences: u32) -> LlmSettings {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    LlmSettings {
        threads: threads_override().unwrap_or(if scheduler == LlmScheduler::Batched {
            cores as i32
        } else {
            2
        }),
        batch_threads: std::env::var("BENCH_LLM_BATCH_THREADS")
            .ok()
            .and_then(|t| t.parse().ok()),
        context: 2048,
        temperature: 0.0,
        seed: 42,
        scheduler,
        sequences,
        ..Default::default()
    }
}

/// `batched` or `per_call`.
fn parse_scheduler(name: &str) -> LlmScheduler {
    match name {
        "batched" => LlmScheduler::Batched,
        "per_call" => LlmScheduler::PerCall,
        other => panic!("BENCH_SCHEDULERS: unknown scheduler {other:?}"),
    }
}

/// The agent's system prompt and greeting: what a call warms before the caller speaks.
fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect()
}

/// One reply: (first token ms from the request, reply ms, generated tokens).
fn reply(session: &LlmSession, messages: Vec<Message>, max_tokens: u32) -> (f64, f64, usize, String) {
    let t = Instant::now();
    let mut rx = session.generate(messages, max_tokens, Arc::new(AtomicBool::new(false)));
    let mut first = None;
    let mut text = String::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            LlmEvent::Token(tok) => {
                first.get_or_insert(t.elapsed());
                text.push_str(&tok);
            }
            LlmEvent::Done(s) => {
                let first = first.unwrap_or_else(|| t.elapsed()).as_secs_f64() * 1000.0;
                return (first, t.elapsed().as_secs_f64() * 1000.0, s.generated_tokens, text);
            }
            LlmEvent::Error(e) => panic!("LLM error: {e}"),
            LlmEvent::Action(_) => {}
        }
    }
    panic!("the reply ended without Done");
}

/// issue 7: `churn` sessions, two at a time, on one engine; RSS every 20 and the slope.
fn churn(sched: &str, scheduler: LlmScheduler, churn: usize) {
    let agent = AgentConfig::default();
    let engine =
        Arc::new(LlmEngine::load(&model_path(), settings(scheduler, 4)).expect("test LLM (scripts/install-models.sh)"));
    println!("\n== churn, {sched}: sessions, RSS MiB (threads)");
    let base = prologue(&agent);
    let mut points = Vec::new();
    for i in (0..churn).step_by(2) {
        std::thread::scope(|sc| {
            for k in 0..2 {
                let (engine, base, agent) = (&engine, &base, &agent);
                sc.spawn(move || {
                    let s = LlmSession::start(engine.clone(), &format!("churn-{i:05}-{k}")).unwrap();
                    s.warm(base.clone());
                    let mut messages = base.clone();
                    messages.push(Message {
                        role: Role::User,
                        text: QUESTIONS[(i + k) % QUESTIONS.len()].into(),
                    });
                    reply(&s, messages, agent.max_reply_tokens);
                });
            }
        });
        let done = i + 2;
        if done % 20 == 0 {
            // Per-call context threads end after their session is dropped: let them go.
            std::thread::sleep(Duration::from_millis(200));
            let rss = status_kib("VmRSS:");
            println!("{done:>6} {:>8} ({})", rss / 1024, status_kib("Threads:"));
            if done > 20 {
                points.push((done as f64, rss as f64));
            }
        }
    }
    println!(
        "churn {sched}: RSS slope after 20 sessions {:+.0} KiB per session",
        common::slope(&points)
    );
    engine.shutdown();
}

/// As `serve` does (src/main.rs): llama.cpp's OpenMP threads wait passively, which libgomp
/// only reads at load time, so the bench re-executes itself once with the variable set.
fn passive_openmp() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("own executable");
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .exec();
    panic!("could not re-execute with OMP_WAIT_POLICY=PASSIVE: {err}");
}

fn main() {
    passive_openmp();
    if let Some(n) = std::env::var("BENCH_CHURN").ok().and_then(|n| n.parse().ok()) {
        for sched in list("BENCH_SCHEDULERS", "batched,per_call") {
            churn(&sched, parse_scheduler(&sched), n);
        }
        return;
    }
    let counts: Vec<usize> = list("BENCH_CALLS", "1,4,8")
        .iter()
        .map(|s| s.parse().expect("BENCH_CALLS is a list of numbers"))
        .collect();
    let schedulers = list("BENCH_SCHEDULERS", "batched,per_call");
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    let agent = AgentConfig::default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("LLM scheduler benchmark: SmolLM2-135M-Instruct Q4_1, context 2048 per call, max {} tokens per reply, {rounds} questions per session, all sessions asking at once; machine: {cores} cores", agent.max_reply_tokens);
    let mut summary = Vec::new();
    for &n in &counts {
        for sched in &schedulers {
            let scheduler = parse_scheduler(sched);
            let before = status_kib("VmRSS:");
            let engine = Arc::new(
                LlmEngine::load(&model_path(), settings(scheduler, n.max(8) as u32))
                    .expect("test LLM (scripts/install-models.sh)"),
            );
            std::thread::sleep(Duration::from_millis(300));
            let idle = status_kib("VmRSS:");
            reset_peak();
            let sessions: Vec<LlmSession> = (0..n)
                .map(|i| LlmSession::start(engine.clone(), &format!("bench-{i:04}")).unwrap())
                .collect();
            let base = prologue(&agent);
            for s in &sessions {
                s.warm(base.clone());
            }
            // The warm-ups are queued before the first question on each session, so they are
            // done before it; the greeting plays for a few seconds in a real call.
            std::thread::sleep(Duration::from_secs(3));
            let mut first = Vec::new();
            let mut total = Vec::new();
            let mut tokens = 0usize;
            let mut wall = 0.0;
            for round in 0..rounds {
                let barrier = Barrier::new(n);
                let t = Instant::now();
                let results: Vec<(f64, f64, usize, String)> = std::thread::scope(|sc| {
                    let hs: Vec<_> = sessions
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let mut messages = base.clone();
                            messages.push(Message {
                                role: Role::User,
                                text: QUESTIONS[(i + round * 3) % QUESTIONS.len()].into(),
                            });
                            let barrier = &barrier;
                            let max = agent.max_reply_tokens;
                            sc.spawn(move || {
                                barrier.wait();
                                reply(s, messages, max)
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                wall += t.elapsed().as_secs_f64();
                for (f, r, k, _) in results {
                    first.push(f);
                    total.push(r);
                    tokens += k;
                }
            }
            let peak = status_kib("VmHWM:");
            let per_session = peak.saturating_sub(idle) as f64 / 1024.0 / n as f64;
            let tps = tokens as f64 / wall;
            let line = format!(
                "{n} session(s) {sched:>9}: first token p50/p95 {:.0}/{:.0} ms, reply p50/p95 {:.0}/{:.0} ms, {tokens} tokens, aggregate {tps:.0} tokens/s, RSS engine {} MiB, idle {} MiB, per session {per_session:.1} MiB",
                common::percentile(&mut first, 0.5),
                common::percentile(&mut first, 0.95),
                common::percentile(&mut total, 0.5),
                common::percentile(&mut total, 0.95),
                idle.saturating_sub(before) / 1024,
                idle / 1024,
            );
            println!("{line}");
            summary.push(line);
            drop(sessions);
            engine.shutdown();
            drop(engine);
            // Per-call context threads end when their session is dropped (not joined).
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    println!("\n== summary");
    for l in summary {
        println!("{l}");
    }
}
