//! Turn-taking and call control, end to end with the real models over loopback sockets:
//! barge-in and its stop latency, sounds that must not barge in, the filler, each fallback
//! with its fault injected, DTMF from a real Asterisk capture, and the call limits.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A greeting long enough (about 9 s) to interrupt.
const LONG_GREETING: &str = "[agent]\ngreeting = \"Thank you for calling the dental clinic of doctor Smith. \
Our office is open from nine in the morning to five in the afternoon, Monday through Friday, \
and from ten to two on Saturdays. How can I help you today?\"\n";

fn write_wav(path: &Path, samples: &[i16]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    samples.iter().for_each(|s| w.write_sample(*s).unwrap());
    w.finalize().unwrap();
}

/// Deterministic pseudo-random noise in [-1, 1].
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 20001) as f32 / 10000.0 - 1.0
        })
        .collect()
}

/// 0.3 s of silence, a 300 ms white-noise burst at about -20 dBFS RMS, 0.3 s of silence.
fn noise_burst(dir: &Path) -> PathBuf {
    let mut s = vec![0i16; 2400];
    s.extend(noise(2400, 7).iter().map(|v| (v * 0.17 * 32767.0) as i16));
    s.extend(vec![0i16; 2400]);
    let p = dir.join("noise_burst.wav");
    write_wav(&p, &s);
    p
}

/// A cough-like sound: 250 ms of low-passed noise with a 10 ms attack and a fast decay, peaking
/// near -6 dBFS, between 0.3 s silences.
fn cough(dir: &Path) -> PathBuf {
    let n = 2000;
    let raw = noise(n, 11);
    let mut lp = 0.0f32;
    let mut s = vec![0i16; 2400];
    for (i, v) in raw.iter().enumerate() {
        lp += 0.25 * (v - lp);
        let t = i as f32 / 8000.0;
        let env = if t < 0.01 { t / 0.01 } else { (-(t - 0.01) / 0.06).exp() };
        s.push((lp * env * 1.6 * 32767.0).clamp(-32768.0, 32767.0) as i16);
    }
    s.extend(vec![0i16; 2400]);
    let p = dir.join("cough.wav");
    write_wav(&p, &s);
    p
}

fn entries(server: &Server, call_id: &str) -> Vec<Value> {
    server
        .conversation()
        .into_iter()
        .filter(|e| e["call_id"] == call_id)
        .collect()
}

fn wav(name: &str) -> String {
    audio(name).display().to_string()
}

#[test]
fn barge_in_stops_the_agent_fast_and_cuts_its_words() {
    let _g = serial();
    let server = Server::start(LONG_GREETING);
    let mut stops = Vec::new();
    for after in [1500, 3100] {
        let r = server.simulate(&[
            "--wav",
            &wav("book_appointment.8k.wav"),
            "--barge-in-after-ms",
            &after.to_string(),
        ]);
        println!("barge-in at {after} ms: {r}");
        let id = r["call_id"].as_str().unwrap();
        let stop = r["turns"][0]["barge_in_stop_ms"]
            .as_f64()
            .expect("the agent was talking when the caller started");
        stops.push(stop);
        assert!(
            stop < 150.0,
            "agent kept talking {stop} ms after the caller started: {r}"
        );
        let lines = server.wait_call_line(id, "barge-in: agent stopped", 10);
        assert!(lines.iter().any(|l| l.contains("agent paused")), "{lines:#?}");
        // The caller's utterance is then answered.
        assert!(r["turns"][0]["voice_to_voice_ms"].as_f64().is_some(), "{r}");
    }
    println!("barge-in stop latency: {stops:?} ms");

    // A reply interrupted mid-way is logged (and kept in the history) only as far as played.
    let r = server.simulate(&[
        "--wav",
        &wav("book_appointment.8k.wav"),
        "--wav",
        &wav("opening_hours.8k.wav"),
        "--barge-in-after-ms",
        "400",
    ]);
    let id = r["call_id"].as_str().unwrap().to_string();
    server.wait_call_line(&id, "call ended", 10);
    let agent: Vec<Value> = entries(&server, &id)
        .into_iter()
        .filter(|e| e["speaker"] == "agent")
        .collect();
    if let Some(cut) = agent.iter().find(|e| e["interrupted"] == true) {
        let full = server
            .call_lines(&id)
            .into_iter()
            .find(|l| l.contains("agent turn") && l.contains("interrupted=true"));
        println!("interrupted reply logged as {:?} ({full:?})", cut["text"]);
    }
}

#[test]
fn noise_and_cough_do_not_barge_in() {
    let _g = serial();
    let server = Server::start(LONG_GREETING);
    let dir = tempfile::tempdir().unwrap();
    for sound in [noise_burst(dir.path()), cough(dir.path())] {
        let r = server.simulate(&[
            "--wav",
            sound.to_str().unwrap(),
            "--barge-in-after-ms",
            "1500",
            "--hold-ms",
            "500",
        ]);
        println!("{}: {r}", sound.display());
        let id = r["call_id"].as_str().unwrap();
        let lines = server.wait_call_line(id, "call ended", 15);
        assert!(
            !lines.iter().any(|l| l.contains("barge-in: agent stopped")),
            "{} barged in: {lines:#?}",
            sound.display()
        );
        // The greeting played on to its end: about 9 s of agent audio, not cut at 1.5 s.
        let rec_ms = r["agent_frames"].as_u64().unwrap() * 20;
        assert!(rec_ms > 8000, "{rec_ms}");
        // Nothing reached the conversation as caller speech.
        assert!(
            entries(&server, id).iter().all(|e| e["speaker"] != "caller"),
            "{:?}",
            entries(&server, id)
        );
    }
}

#[test]
fn filler_covers_a_slow_reply() {
    let _g = serial();
    let server = Server::start("[test_faults]\nllm_delay_ms = 2500\n");
    // A caller waits through "One moment." for the reply.
    let r = server.simulate(&["--wav", &wav("book_appointment.8k.wav"), "--reply-end-ms", "4000"]);
    println!("{r}");
    let id = r["call_id"].as_str().unwrap();
    server.wait_call_line(id, "call ended", 10);
    let e = entries(&server, id);
    let filler = e.iter().position(|e| e["prompt"] == "filler").expect("filler played");
    let reply = e
        .iter()
        .position(|e| e["speaker"] == "agent" && e["prompt"].is_null())
        .expect("reply came");
    assert!(filler < reply, "{e:?}");
    // The caller heard something within endpointing + filler_after_ms (+ a little for Vosk's
    // final decode and the next frame), not after the 2.5 s the reply took.
    let d = asterisk_voice_agent::config::Config::default();
    let bound = (d.vad.end_silence_ms as u64 + d.call.filler_after_ms) as f64 + 400.0;
    let v2v = r["turns"][0]["voice_to_voice_ms"].as_f64().unwrap();
    assert!(v2v < bound, "dead air of {v2v} ms (bound {bound} ms)");
}

#[test]
fn stt_with_nothing_usable_asks_again() {
    let _g = serial();
    let server = Server::start("[test_faults]\nstt_empty = true\n");
    let r = server.simulate(&[
        "--wav",
        &wav("book_appointment.8k.wav"),
        "--wav",
        &wav("opening_hours.8k.wav"),
        "--reply-end-ms",
        "2500",
    ]);
    println!("{r}");
    let id = r["call_id"].as_str().unwrap();
    server.wait_call_line(id, "call ended", 10);
    let e = entries(&server, id);
    assert_eq!(e.iter().filter(|e| e["prompt"] == "not_understood").count(), 2, "{e:?}");
    for t in r["turns"].as_array().unwrap() {
        assert!(
            t["voice_to_voice_ms"].as_f64().is_some(),
            "the caller heard nothing: {r}"
        );
    }
    assert_eq!(r["ended_by"], "caller", "the call goes on");
}

#[test]
fn llm_failures_retry_then_fallback_model_then_apology() {
    let _g = serial();
    // Two failures: the third attempt (second retry) answers.
    let server = Server::start("[test_faults]\nllm_fail_first = 2\n");
    let r = server.simulate(&["--wav", &wav("book_appointment.8k.wav")]);
    let id = r["call_id"].as_str().unwrap();
    let lines = server.wait_call_line(id, "call ended", 10);
    assert_eq!(
        lines.iter().filter(|l| l.contains("LLM attempt failed")).count(),
        2,
        "{lines:#?}"
    );
    assert!(r["turns"][0]["voice_to_voice_ms"].as_f64().is_some(), "{r}");
    drop(server);

    // The main model fails all three attempts: the fallback model answers.
    let gguf = models_dir().join("smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf");
    let server = Server::start(&format!(
        "[call]\nfallback_llm = \"{}\"\n[test_faults]\nllm_fail_first = 3\n",
        gguf.display()
    ));
    let r = server.simulate(&["--wav", &wav("book_appointment.8k.wav")]);
    let id = r["call_id"].as_str().unwrap();
    let lines = server.wait_call_line(id, "call ended", 10);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("LLM attempt failed") && l.contains("main"))
            .count(),
        3
    );
    assert!(
        r["turns"][0]["voice_to_voice_ms"].as_f64().is_some(),
        "fallback model did not answer: {r}"
    );
    assert!(entries(&server, id)
        .iter()
        .any(|e| e["speaker"] == "agent" && e["prompt"].is_null()));
    drop(server);

    // Everything fails: an apology, then a clean hangup (never silence and a dropped call).
    let server = Server::start("[test_faults]\nllm_fail_first = 100\n");
    let r = server.simulate(&["--wav", &wav("book_appointment.8k.wav")]);
    println!("{r}");
    assert_eq!(r["ended_by"], "agent_hangup", "{r}");
    assert!(
        r["turns"][0]["voice_to_voice_ms"].as_f64().is_some(),
        "no apology heard: {r}"
    );
    let id = r["call_id"].as_str().unwrap();
    server.wait_call_line(id, "agent hung up (LLM failure)", 10);
    assert!(entries(&server, id).iter().any(|e| e["prompt"] == "apology"));
}

#[test]
fn tts_failure_uses_the_fallback_voice_or_canned_prompts() {
    let _g = serial();
    let voice = models_dir().join("en_US-joe-medium/en_US-joe-medium.onnx");
    let server = Server::start(&format!(
        "[call]\nfallback_voice = \"{}\"\n[test_faults]\ntts_fail = true\n",
        voice.display()
    ));
    let r = server.simulate(&["--wav", &wav("book_appointment.8k.wav"), "--reply-end-ms", "4000"]);
    let id = r["call_id"].as_str().unwrap();
    let lines = server.wait_call_line(id, "call ended", 10);
    assert!(
        lines.iter().any(|l| l.contains("using the fallback voice")),
        "{lines:#?}"
    );
    assert!(r["turns"][0]["reply_audio_ms"].as_f64().unwrap_or(0.0) > 300.0, "{r}");
    assert_eq!(r["ended_by"], "caller");
    drop(server);

    let server = Server::start("[test_faults]\ntts_fail = true\n");
    let r = server.simulate(&["--wav", &wav("book_appointment.8k.wav")]);
    println!("{r}");
    assert_eq!(r["ended_by"], "agent_hangup", "{r}");
    assert!(
        r["turns"][0]["voice_to_voice_ms"].as_f64().is_some(),
        "the caller heard nothing: {r}"
    );
    let id = r["call_id"].as_str().unwrap();
    server.wait_call_line(id, "agent hung up (TTS failure)", 10);
    assert!(entries(&server, id).iter().any(|e| e["prompt"] == "apology"));
}

#[test]
fn dtmf_from_the_real_capture_is_text_or_an_action() {
    let _g = serial();
    let cap = capture("asterisk-22.10.1-call.bin");
    // No bindings: the digits 1 2 3 # reach the conversation as text and get a reply.
    let server = Server::start("");
    let r = server.simulate(&["--replay", cap.to_str().unwrap()]);
    let id = r["call_id"].as_str().unwrap();
    server.wait_call_line(id, "call ended", 15);
    let e = entries(&server, id);
    assert!(
        e.iter()
            .any(|e| e["speaker"] == "caller" && e["text"] == "[keypad] 123#"),
        "{e:?}"
    );
    drop(server);

    // "#" bound to hangup: a goodbye, then the agent hangs up (before the capture ends at 12 s).
    let server = Server::start("[actions.dtmf]\n\"#\" = \"hangup\"\n");
    let r = server.simulate(&["--replay", cap.to_str().unwrap()]);
    println!("{r}");
    assert_eq!(r["ended_by"], "agent_hangup", "{r}");
    let id = r["call_id"].as_str().unwrap();
    server.wait_call_line(id, "agent hung up (caller pressed a hangup key)", 10);
    assert!(entries(&server, id).iter().any(|e| e["prompt"] == "goodbye"));
    drop(server);

    // "1" bound to a transfer: the agent ends the call at once with a transfer decision.
    let server =
        Server::start("[actions.transfer]\noperator = \"PJSIP/100\"\n[actions.dtmf]\n\"1\" = \"transfer:operator\"\n");
    let r = server.simulate(&["--replay", cap.to_str().unwrap()]);
    assert_eq!(r["ended_by"], "agent_hangup", "{r}");
    let id = r["call_id"].as_str().unwrap();
    let lines = server.wait_call_line(id, "agent hung up (transfer to operator)", 10);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("decision: transfer") && l.contains("PJSIP/100")),
        "{lines:#?}"
    );
}

#[test]
fn call_limits_end_politely() {
    let _g = serial();
    let server = Server::start("[call]\nmax_silence_ms = 2500\n");
    let r = server.simulate(&["--hold-ms", "8000"]);
    println!("{r}");
    assert_eq!(r["ended_by"], "agent_hangup", "{r}");
    let id = r["call_id"].as_str().unwrap();
    server.wait_call_line(id, "agent hung up (caller silent)", 10);
    assert!(entries(&server, id).iter().any(|e| e["prompt"] == "goodbye"));
    drop(server);

    let server = Server::start("[call]\nmax_call_ms = 6000\n");
    let r = server.simulate(&["--wav", &wav("book_appointment.8k.wav"), "--hold-ms", "8000"]);
    println!("{r}");
    assert_eq!(r["ended_by"], "agent_hangup", "{r}");
    let id = r["call_id"].as_str().unwrap();
    server.wait_call_line(id, "agent hung up (maximum call duration)", 10);
}

#[test]
fn agi_hands_caller_info_in_and_the_decision_out() {
    let _g = serial();
    // Caller details are logged at DEBUG only (issue 7).
    let server = Server::start_with_log(
        "[actions.transfer]\noperator = \"PJSIP/100\"\n[actions.dtmf]\n\"1\" = \"transfer:operator\"\n",
        "info,ort=warn,asterisk_voice_agent=debug",
    );
    // Before AudioSocket(): the dialplan's call-start step, keyed by the UUID the capture uses.
    let uuid = "e140b8a6-4847-44f0-a0d1-6e4a8f3df010";
    let vars = agi_session(&server.agi_addr, "call-start", &[uuid], "5551234", "500");
    assert_eq!(vars.get("AVA_UUID").map(String::as_str), Some(uuid), "{vars:?}");
    // The call: the caller presses 1, bound to a transfer to the operator.
    let cap = capture("asterisk-22.10.1-call.bin");
    let r = server.simulate(&["--replay", cap.to_str().unwrap()]);
    assert_eq!(r["call_id"], uuid);
    assert_eq!(r["ended_by"], "agent_hangup", "{r}");
    let lines = server.wait_call_line(uuid, "decision: transfer", 10);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("caller details") && l.contains("caller_id=5551234") && l.contains("dnid=500")),
        "{lines:#?}"
    );
    // After AudioSocket() returns: the call-end step reads the decision.
    server.wait_call_line(uuid, "call ended: agent hung up", 10);
    let vars = agi_session(&server.agi_addr, "call-end", &[uuid], "5551234", "500");
    assert_eq!(vars.get("AVA_ACTION").map(String::as_str), Some("transfer"), "{vars:?}");
    assert_eq!(vars.get("AVA_TRANSFER").map(String::as_str), Some("PJSIP/100"));
    assert_eq!(vars.get("AVA_TRANSFER_NAME").map(String::as_str), Some("operator"));
    // Without a UUID argument, call-start makes one up for the dialplan to pass on.
    let vars = agi_session(&server.agi_addr, "call-start", &[], "5551234", "500");
    assert!(
        vars.get("AVA_UUID")
            .and_then(|u| u.parse::<uuid::Uuid>().ok())
            .is_some(),
        "{vars:?}"
    );
    // A call that just ended by caller hangup leaves the dialplan to continue.
    let vars = agi_session(
        &server.agi_addr,
        "call-end",
        &[&uuid::Uuid::new_v4().to_string()],
        "1",
        "2",
    );
    assert_eq!(vars.get("AVA_ACTION").map(String::as_str), Some("continue"));
}

#[test]
fn hangup_decided_by_the_llm_is_carried_out() {
    let _g = serial();
    // Greedy decoding: the model's choice for this prompt and input is deterministic.
    let server = Server::start(
        "[llm]\ntemperature = 0.0\n[agent]\nsystem_prompt = \"You are a phone receptionist. \
         When the caller uses the keypad, say goodbye and end the call.\"\n\
         [actions]\nllm_actions = true\n[actions.transfer]\noperator = \"PJSIP/100\"\n\
         [call]\nllm_timeout_ms = 20000\nreply_deadline_ms = 30000\n",
    );
    let cap = capture("asterisk-22.10.1-call.bin");
    // The caller stays on the line after the capture's keypad input until the agent hangs up
    // (a slow machine takes seconds to answer; the timeouts above are not what is tested).
    let r = server.simulate(&["--replay", cap.to_str().unwrap(), "--hold-ms", "30000"]);
    println!("{r}");
    let uuid = r["call_id"].as_str().unwrap();
    let lines = server.wait_call_line(uuid, "call ended", 15);
    println!("{lines:#?}");
    // The keypad input reached the LLM, which chose to hang up after speaking its goodbye.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("the LLM chose an action action=Hangup")),
        "{lines:#?}"
    );
    assert_eq!(r["ended_by"], "agent_hangup", "{r}");
    assert!(lines
        .iter()
        .any(|l| l.contains("agent hung up (the agent said goodbye)")));
    let said: Vec<Value> = entries(&server, uuid)
        .into_iter()
        .filter(|e| e["speaker"] == "agent")
        .collect();
    assert!(
        said.iter()
            .any(|e| e["interrupted"].is_null() && e["text"].as_str().is_some_and(|t| !t.is_empty())),
        "{said:?}"
    );
    // The dialplan's call-end step learns the decision.
    let vars = agi_session(&server.agi_addr, "call-end", &[uuid], "100", "500");
    assert_eq!(vars.get("AVA_ACTION").map(String::as_str), Some("hangup"), "{vars:?}");
}
