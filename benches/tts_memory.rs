//! Piper's memory through ONNX Runtime (issue 7: RSS flat after warm-up): synthesizes the same
//! N varied sentences (2-25 words, a fixed pseudo-random sequence) with the voice's session
//! loaded twice, ONNX Runtime's CPU memory arena off (`tts.memory_arena = false`, the default)
//! and on, and prints every 50 sentences the process's RSS, the allocator's (jemalloc's) bytes
//! allocated and its resident pages, and the synthesis real-time factor so far. Each variant
//! runs in its own child process, so the first does not leave memory behind for the second.
//! Not a test: it asserts nothing.
//!
//! Run: `cargo bench --bench tts_memory` (after `scripts/install-models.sh`); `TTS_SENTENCES`
//! (default 400).

#[path = "../tests/common/mod.rs"]
mod common;

use asterisk_voice_agent::tts::TtsSettings;

const WORDS: [&str; 23] = [
    "sure",
    "appointment",
    "tomorrow",
    "morning",
    "the",
    "office",
    "opens",
    "at",
    "nine",
    "o'clock",
    "and",
    "closes",
    "late",
    "on",
    "Fridays",
    "please",
    "hold",
    "while",
    "I",
    "check",
    "your",
    "booking",
    "number",
];

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The `i`-th sentence of the fixed sequence: 2-25 words.
fn sentences(n: usize) -> Vec<String> {
    let mut seed = 12345u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    (0..n)
        .map(|_| {
            let len = 2 + next() % 24;
            let words: Vec<&str> = (0..len).map(|_| WORDS[next() % WORDS.len()]).collect();
            format!("{}.", words.join(" "))
        })
        .collect()
}

fn run(arena: bool, n: usize) {
    let tts = common::test_voice(TtsSettings {
        length_scale: None,
        gain: 1.0,
        threads: 1,
        memory_arena: arena,
        workers: 1,
        order: asterisk_voice_agent::config::TtsOrder::Deadline,
        nice: 10,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("tts.memory_arena = {arena}: {n} sentences");
    println!(
        "{:>6} {:>9} {:>12} {:>12} {:>7}",
        "sent", "RSS_MiB", "alloc_MiB", "resident_MiB", "RTF"
    );
    let (mut synth_ms, mut audio_s) = (0u64, 0f64);
    for (i, s) in sentences(n).iter().enumerate() {
        let speech = rt.block_on(tts.synthesize(s, 8000)).expect("synthesis");
        synth_ms += speech.synth_ms;
        audio_s += speech.samples.len() as f64 / 8000.0;
        if i % 50 == 0 || i + 1 == n {
            let (allocated, resident) =
                asterisk_voice_agent::metrics::malloc_stats().map_or((0, 0), |m| (m.allocated, m.resident));
            println!(
                "{:>6} {:>9.1} {:>12.1} {:>12.1} {:>7.3}",
                i + 1,
                rss_kib() as f64 / 1024.0,
                allocated as f64 / 1048576.0,
                resident as f64 / 1048576.0,
                synth_ms as f64 / 1000.0 / audio_s
            );
        }
    }
}

fn main() {
    let n: usize = std::env::var("TTS_SENTENCES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    if let Ok(which) = std::env::var("TTS_MEMORY_CHILD") {
        run(which == "on", n);
        return;
    }
    for which in ["off", "on"] {
        // The children's jemalloc runs with the binary's compiled-in options, as `serve` does,
        // unless MALLOC_CONF is set.
        let conf = std::env::var("MALLOC_CONF").unwrap_or_else(|_| asterisk_voice_agent::jemalloc_conf_str().into());
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .env("TTS_MEMORY_CHILD", which)
            .env("MALLOC_CONF", conf)
            .status()
            .expect("child bench");
        assert!(status.success(), "the {which} run failed");
    }
}
