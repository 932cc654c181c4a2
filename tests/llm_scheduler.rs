//! issue 10: the batched LLM scheduler (one llama.cpp context, a KV sequence per session)
//! with the real test model SmolLM2-135M-Instruct (Q4_1), greedy decoding.

mod common;

use asterisk_voice_agent::config::{AgentConfig, LlmScheduler};
use asterisk_voice_agent::llm::{LlmEngine, LlmEvent, LlmSession, LlmSettings, Message, Role, TurnStats};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn model_path() -> PathBuf {
    common::test_gguf()
}

fn load(sequences: u32, scheduler: LlmScheduler) -> Arc<LlmEngine> {
    let settings = LlmSettings {
        threads: 2,
        context: 1024,
        temperature: 0.0,
        seed: 42,
        scheduler,
        sequences,
        ..Default::default()
    };
    Arc::new(LlmEngine::load(&model_path(), settings).expect("test LLM (scripts/install-models.sh)"))
}

fn engine() -> Arc<LlmEngine> {
    static E: OnceLock<Arc<LlmEngine>> = OnceLock::new();
    E.get_or_init(|| load(8, LlmScheduler::Batched)).clone()
}

fn history(caller: &str) -> Vec<Message> {
    let agent = AgentConfig::default();
    vec![
        Message {
            role: Role::System,
            text: agent.system_prompt,
        },
        Message {
            role: Role::Assistant,
            text: agent.greeting,
        },
        Message {
            role: Role::User,
            text: caller.into(),
        },
    ]
}

/// Runs one reply to the end: its text and figures.
fn reply(session: &LlmSession, messages: Vec<Message>, max_tokens: u32) -> (String, TurnStats) {
    let mut rx = session.generate(messages, max_tokens, Arc::new(AtomicBool::new(false)));
    let mut text = String::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            LlmEvent::Token(t) => text.push_str(&t),
            LlmEvent::Done(s) => return (text, s),
            LlmEvent::Error(e) => panic!("LLM error: {e}"),
            LlmEvent::Action(a) => panic!("no actions in this session: {a:?}"),
        }
    }
    panic!("the reply ended without Done");
}

const CALLERS: [&str; 3] = [
    "What time do you open on Saturday?",
    "Do you have parking near the shop?",
    "Can I book an appointment for next Tuesday?",
];

#[test]
fn concurrent_sessions_get_their_own_replies() {
    // Its own engine: the other tests' sessions must not share the "alone" decodes.
    let e = load(4, LlmScheduler::Batched);
    // Each question alone first: the reference replies.
    let alone: Vec<String> = CALLERS
        .iter()
        .map(|c| {
            let s = LlmSession::start(e.clone(), "alone").unwrap();
            reply(&s, history(c), 30).0
        })
        .collect();
    let before = e.scheduler_stats().unwrap();
    // Then all three at once, each in its own session (sequence).
    let together: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = CALLERS
            .iter()
            .map(|c| {
                let e = e.clone();
                sc.spawn(move || {
                    let s = LlmSession::start(e, "together").unwrap();
                    reply(&s, history(c), 30).0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let after = e.scheduler_stats().unwrap();
    eprintln!("alone {alone:?}\ntogether {together:?}\nstats {before:?} -> {after:?}");
    // Batched decoding is not bit-identical to decoding alone (the float sums run in another
    // order when other sequences share the KV buffer, depending on where their cells sit), so
    // even a greedy reply's first token can differ from the alone run: each call must get a
    // reply of its own, generated in shared decodes.
    for (a, t) in alone.iter().zip(&together) {
        assert!(!a.trim().is_empty() && !t.trim().is_empty(), "{a:?} {t:?}");
    }
    assert_ne!(together[0], together[1]);
    assert_ne!(together[1], together[2]);
    assert_ne!(together[0], together[2]);
    // The replies were generated in shared decodes, not one after the other.
    assert!(
        after.shared_decodes > before.shared_decodes + 10,
        "{before:?} -> {after:?}"
    );
}

#[test]
fn kv_prefix_is_reused_across_turns() {
    let e = engine();
    let s = LlmSession::start(e, "prefix").unwrap();
    let mut h = history("What time do you open on Saturday?");
    s.warm(h[..2].to_vec());
    let (r1, s1) = reply(&s, h.clone(), 30);
    // The system prompt and the greeting came from warm(): only the caller's turn is new.
    assert!(s1.evaluated_tokens < 25, "{s1:?}");
    assert!(s1.prompt_tokens > 40, "{s1:?}");
    h.push(Message {
        role: Role::Assistant,
        text: r1.trim().to_string(),
    });
    h.push(Message {
        role: Role::User,
        text: "And on Sunday?".into(),
    });
    let (_, s2) = reply(&s, h.clone(), 30);
    assert!(s2.evaluated_tokens < s2.prompt_tokens / 3, "{s2:?}");
    // The same prompt again: only its last token is evaluated again.
    let (_, s3) = reply(&s, h, 30);
    assert_eq!(s3.evaluated_tokens, 1, "{s3:?}");
}

/// `[llm] kv_cache = "q8_0"`: with the 8-bit KV cache both schedulers' contexts are created
/// (llama.cpp needs flash attention for a quantized V cache), answer, and keep reusing the
/// cached prompt (a quantized cell is still a cached cell). The f16 reply is printed beside it.
#[test]
fn q8_0_kv_cache_answers_and_reuses_its_prefix() {
    use asterisk_voice_agent::config::KvCache;
    for scheduler in [LlmScheduler::PerCall, LlmScheduler::Batched] {
        let mut replies = Vec::new();
        for kv_cache in [KvCache::Q8_0, KvCache::F16] {
            let settings = LlmSettings {
                threads: 2,
                context: 1024,
                scheduler,
                sequences: 2,
                kv_cache,
                ..Default::default()
            };
            let e = Arc::new(LlmEngine::load(&model_path(), settings).expect("test LLM"));
            let s = LlmSession::start(e, "q8").unwrap();
            let h = history("What time do you open on Saturday?");
            s.warm(h[..2].to_vec());
            let (text, first) = reply(&s, h.clone(), 30);
            let (_, again) = reply(&s, h, 30);
            eprintln!("{scheduler:?} {kv_cache:?}: {text:?} {first:?}");
            assert!(!text.trim().is_empty(), "{scheduler:?} {kv_cache:?}: empty reply");
            assert!(first.evaluated_tokens < 25, "{scheduler:?} {kv_cache:?}: {first:?}");
            assert_eq!(again.evaluated_tokens, 1, "{scheduler:?} {kv_cache:?}: {again:?}");
            replies.push(text);
        }
        eprintln!(
            "{scheduler:?}: q8_0 and f16 replies equal: {}",
            replies[0] == replies[1]
        );
    }
}

#[test]
fn cancelling_stops_at_once_and_leaves_other_sessions_alone() {
    let e = engine();
    let a = LlmSession::start(e.clone(), "cancel-a").unwrap();
    let b = LlmSession::start(e, "cancel-b").unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let long = history("Tell me a long story about the history of the shop, with every detail.");
    let mut ra = a.generate(long.clone(), 300, cancel.clone());
    let rb = std::thread::spawn(move || reply(&b, history("Do you have parking near the shop?"), 30));
    let mut tokens = 0;
    let mut cancelled_at = None;
    let stats = loop {
        match ra.blocking_recv().expect("a Done") {
            LlmEvent::Token(_) => {
                tokens += 1;
                if tokens == 3 {
                    cancel.store(true, Ordering::Relaxed);
                    cancelled_at = Some(Instant::now());
                }
            }
            LlmEvent::Done(s) => break s,
            other => panic!("{other:?}"),
        }
    };
    let waited = cancelled_at.expect("3 tokens before the end").elapsed();
    assert!(stats.generated_tokens <= 6, "{stats:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    let (text_b, _) = rb.join().unwrap();
    assert!(!text_b.trim().is_empty());
    // The cancelled session answers its next request normally, from its cached prompt.
    let (_, again) = reply(&a, long, 20);
    assert_eq!(again.evaluated_tokens, 1, "{again:?}");
}

#[test]
fn dropping_a_session_frees_its_sequence() {
    let e = load(2, LlmScheduler::Batched);
    let s1 = LlmSession::start(e.clone(), "one").unwrap();
    let s2 = LlmSession::start(e.clone(), "two").unwrap();
    let err = LlmSession::start(e.clone(), "three").err().expect("only two sequences");
    assert!(format!("{err:#}").contains("sequences are in use"), "{err:#}");
    assert_eq!(e.scheduler_stats().unwrap().sequences_in_use, 2);
    reply(&s1, history("Hello?"), 10);
    drop(s1);
    let s3 = LlmSession::start(e.clone(), "three").unwrap();
    let (t3, st3) = reply(&s3, history("What time do you open on Saturday?"), 20);
    assert!(!t3.trim().is_empty());
    // A fresh sequence: nothing of the dropped session's cache is reused.
    assert_eq!(st3.evaluated_tokens, st3.prompt_tokens, "{st3:?}");
    drop((s2, s3));
    // Shutdown joins the thread; later requests fail at once with an error.
    e.shutdown();
    assert!(LlmSession::start(e.clone(), "late").is_err());
}

#[test]
fn per_call_contexts_still_work() {
    let e = load(1, LlmScheduler::PerCall);
    assert!(e.scheduler_stats().is_none());
    let s = LlmSession::start(e, "per-call").unwrap();
    s.warm(history("x")[..2].to_vec());
    let (t, st) = reply(&s, history("What time do you open on Saturday?"), 20);
    assert!(!t.trim().is_empty());
    assert!(st.evaluated_tokens < 25, "{st:?}");
}
