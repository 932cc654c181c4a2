//! Actions the LLM can take (hang up, transfer to a configured destination), with the real test
//! model SmolLM2-135M-Instruct (Q4_1), greedy decoding. See docs/actions.md.

mod common;

use asterisk_voice_agent::config::AgentConfig;
use asterisk_voice_agent::llm::{
    Action, ActionSpec, LlmEngine, LlmEvent, LlmSession, LlmSettings, Message, Role, TurnStats,
};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

fn model_path() -> PathBuf {
    common::test_gguf()
}

fn engine() -> Arc<LlmEngine> {
    static E: OnceLock<Arc<LlmEngine>> = OnceLock::new();
    E.get_or_init(|| {
        let settings = LlmSettings {
            threads: 2,
            context: 2048,
            temperature: 0.0,
            seed: 42,
            // issue 10: the default, batched scheduler (one context, a sequence per session).
            ..Default::default()
        };
        Arc::new(LlmEngine::load(&model_path(), settings).expect("test LLM (scripts/install-models.sh)"))
    })
    .clone()
}

fn spec() -> Arc<ActionSpec> {
    Arc::new(ActionSpec::new(["operator", "sales"]))
}

/// What one turn produced.
#[derive(Debug, Default)]
struct Reply {
    actions: Vec<Action>,
    tokens: Vec<String>,
    /// Index in `tokens` before which each action arrived.
    action_at: Vec<usize>,
    stats: Option<TurnStats>,
}

impl Reply {
    fn text(&self) -> String {
        self.tokens.concat()
    }
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

fn turn(session: &LlmSession, messages: Vec<Message>) -> Reply {
    let mut rx = session.generate(messages, 40, Arc::new(AtomicBool::new(false)));
    let mut r = Reply::default();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            LlmEvent::Action(a) => {
                r.action_at.push(r.tokens.len());
                r.actions.push(a);
            }
            LlmEvent::Token(t) => r.tokens.push(t),
            LlmEvent::Done(s) => {
                r.stats = Some(s);
                break;
            }
            LlmEvent::Error(e) => panic!("LLM error: {e}"),
        }
    }
    r
}

fn ask(caller: &str) -> Reply {
    let session = LlmSession::start_with_actions(engine(), "test-actions", Some(spec())).unwrap();
    let r = turn(&session, history(caller));
    eprintln!("caller: {caller:?}\n  -> actions {:?}, text {:?}", r.actions, r.text());
    assert_no_tag_in_tokens(&r);
    assert!(r.actions.len() <= 1, "{r:?}");
    assert!(r.action_at.iter().all(|&i| i == 0), "action after speech: {r:?}");
    r
}

fn assert_no_tag_in_tokens(r: &Reply) {
    let text = r.text();
    for bad in ["[", "]", "say]", "hangup]", "transfer:"] {
        assert!(!text.contains(bad), "tag text {bad:?} was sent as speech: {text:?}");
    }
    assert!(!text.starts_with(' '), "{text:?}");
}

// ---- without the model ----

#[test]
fn tags_parse_only_configured_names() {
    let s = spec();
    assert_eq!(s.parse_tag("[say]"), Ok(None));
    assert_eq!(s.parse_tag("[hangup]"), Ok(Some(Action::Hangup)));
    assert_eq!(
        s.parse_tag("[transfer:sales]"),
        Ok(Some(Action::Transfer { name: "sales".into() }))
    );
    assert!(s.parse_tag("[transfer:555-1234]").is_err());
    assert!(s.parse_tag("[transfer:Operator]").is_err());
    assert!(s.parse_tag("[transfer:]").is_err());
    assert!(s.parse_tag("[dial:9999]").is_err());
    assert!(s.parse_tag("[hangup").is_err());
}

#[test]
fn grammar_lists_only_the_configured_names() {
    let g = spec().grammar();
    assert!(g.contains(r#"dest ::= "operator" | "sales""#), "{g}");
    assert!(
        g.contains(r#"tag ::= "[say]" | "[hangup]" | "[transfer:" dest "]""#),
        "{g}"
    );
    // No destinations: no transfer tag at all.
    let g = ActionSpec::default().grammar();
    assert!(!g.contains("transfer"), "{g}");
    // A name that cannot be a tag is left out.
    let g = ActionSpec::new(["ok", "bad]name", "x\"y"]).grammar();
    assert!(g.contains(r#"dest ::= "ok""#), "{g}");
    assert!(
        !g.contains("bad") && !g.contains("x\\\"y") && !g.contains("x\"y"),
        "{g}"
    );
}

// ---- with the real model ----

#[test]
fn the_llm_decides_a_transfer() {
    let r = ask("I want to talk to a real person, please transfer me to the operator.");
    assert_eq!(
        r.actions,
        vec![Action::Transfer {
            name: "operator".into()
        }],
        "{r:?}"
    );
    assert!(!r.text().trim().is_empty(), "{r:?}");
}

#[test]
fn the_llm_decides_a_hangup() {
    let r = ask("That's all, thank you, goodbye.");
    assert_eq!(r.actions, vec![Action::Hangup], "{r:?}");
    assert!(!r.text().trim().is_empty(), "{r:?}");
}

#[test]
fn an_ordinary_question_takes_no_action() {
    let r = ask("What time do you open on Saturday?");
    assert!(r.actions.is_empty(), "{r:?}");
    assert!(!r.text().trim().is_empty(), "{r:?}");
}

#[test]
fn a_dictated_destination_is_never_a_transfer_target() {
    let names = spec().transfer_names.clone();
    for caller in [
        "Transfer me to 555-1234.",
        "Put me through to extension 9999 right now.",
        "Connect me to the billing department.",
        "Transfer me to John Smith please.",
        "Dial 0044 20 7946 0000 for me.",
    ] {
        let r = ask(caller);
        for a in &r.actions {
            if let Action::Transfer { name } = a {
                assert!(names.contains(name), "{caller:?} -> transfer to {name:?}");
            }
        }
    }
}

#[test]
fn actions_keep_the_kv_cache_across_turns() {
    let session = LlmSession::start_with_actions(engine(), "test-cache", Some(spec())).unwrap();
    let mut h = history("What time do you open on Saturday?");
    // Like a call: warm with the system prompt and greeting first.
    session.warm(h[..2].to_vec());
    let r1 = turn(&session, h.clone());
    let s1 = r1.stats.clone().unwrap();
    // Only the caller's words (and the assistant header) were evaluated: the system prompt with
    // the action instructions came from warm().
    assert!(s1.evaluated_tokens < 40, "{s1:?}");
    h.push(Message {
        role: Role::Assistant,
        text: r1.text().trim().to_string(),
    });
    h.push(Message {
        role: Role::User,
        text: "And on Sunday?".into(),
    });
    let r2 = turn(&session, h);
    let s2 = r2.stats.clone().unwrap();
    eprintln!("turn 1 {s1:?} {:?}\nturn 2 {s2:?} {:?}", r1.text(), r2.text());
    assert!(s2.evaluated_tokens < s2.prompt_tokens / 2, "{s2:?}");
    assert_no_tag_in_tokens(&r2);
}

/// Prints what the model does for a set of callers (not an assertion; `--ignored`).
#[test]
#[ignore]
fn survey() {
    for caller in [
        "I want to talk to a real person, please transfer me to the operator.",
        "Can I speak to someone in sales?",
        "That's all, thank you, goodbye.",
        "Okay thanks, bye.",
        "What time do you open on Saturday?",
        "Do you have parking?",
        "Transfer me to 555-1234.",
        "Put me through to extension 9999 right now.",
    ] {
        ask(caller);
    }
}
