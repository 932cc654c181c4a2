//! `console` under a virtual sound device: a private PulseAudio server (Debian's pulseaudio,
//! installed by scripts/deps-console.sh) with two null sinks. The microphone is the monitor of
//! `ava_mic` (test utterances are played into it with `paplay`), the speaker is `ava_spk`
//! (recorded from its monitor with `parecord`); the console reaches them through ALSA's pulse
//! plugin, as a desktop would. A loopback from the speaker into the microphone stands for
//! speakers without a headset. Real binary, real test models.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LONG_GREETING: &str = "[agent]\ngreeting = \"Thank you for calling the dental clinic of doctor Smith. \
Our office is open from nine in the morning to five in the afternoon, Monday through Friday, \
and from ten to two on Saturdays. How can I help you today?\"\n";

/// A private PulseAudio server in a temp folder, with the ALSA config that routes the default
/// devices to it.
struct VirtualSound {
    daemon: Child,
    dir: tempfile::TempDir,
}

impl VirtualSound {
    /// Starts the server; `echo` (a linear gain) loops the speaker back into the microphone.
    fn start(echo: Option<f32>) -> VirtualSound {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        for sub in ["home", "run"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(
            d.join("home/.asoundrc"),
            "pcm.!default { type pulse }\nctl.!default { type pulse }\n",
        )
        .unwrap();
        let mut script = format!(
            "load-module module-native-protocol-unix auth-anonymous=1 socket={}\n\
             load-module module-null-sink sink_name=ava_mic rate=44100 channels=1\n\
             load-module module-null-sink sink_name=ava_spk rate=48000 channels=2\n\
             set-default-source ava_mic.monitor\n\
             set-default-sink ava_spk\n",
            d.join("native").display()
        );
        if echo.is_some() {
            script.push_str("load-module module-loopback source=ava_spk.monitor sink=ava_mic latency_msec=40\n");
        }
        std::fs::write(d.join("pa.pa"), script).unwrap();
        let which = Command::new("sh")
            .args(["-c", "command -v pulseaudio"])
            .output()
            .unwrap();
        assert!(
            which.status.success(),
            "pulseaudio is not installed: run scripts/deps-console.sh (or scripts/setup.sh)"
        );
        let log = std::fs::File::create(d.join("pulseaudio.log")).unwrap();
        let daemon = Command::new("pulseaudio")
            .args([
                "-n",
                "--daemonize=no",
                "--exit-idle-time=-1",
                "--disable-shm=yes",
                "--log-target=stderr",
                "-F",
            ])
            .arg(d.join("pa.pa"))
            .env("HOME", d.join("home"))
            .env("XDG_RUNTIME_DIR", d.join("run"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let s = VirtualSound { daemon, dir };
        let t = Instant::now();
        while !s.pactl(&["info"]).status.success() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "pulseaudio did not start: {}",
                std::fs::read_to_string(d.join("pulseaudio.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(gain) = echo {
            // The loopback's stream into ava_mic: scale it to the echo level.
            let out = String::from_utf8(s.pactl(&["list", "short", "sink-inputs"]).stdout).unwrap();
            let idx = out.split_whitespace().next().expect("the loopback's sink input");
            assert!(s
                .pactl(&["set-sink-input-volume", idx, &gain.to_string()])
                .status
                .success());
        }
        s
    }

    /// Points a command at this server.
    fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let d = self.dir.path();
        cmd.env("HOME", d.join("home"))
            .env("XDG_RUNTIME_DIR", d.join("run"))
            .env("PULSE_SERVER", format!("unix:{}", d.join("native").display()))
    }

    fn pactl(&self, args: &[&str]) -> std::process::Output {
        self.env(&mut Command::new("pactl")).args(args).output().unwrap()
    }

    /// Records the speaker (16 kHz mono WAV) until the returned child is stopped.
    fn record_speaker(&self, path: &Path) -> Child {
        self.env(&mut Command::new("parecord"))
            .args([
                "-d",
                "ava_spk.monitor",
                "--rate=16000",
                "--channels=1",
                "--format=s16le",
                "--file-format=wav",
            ])
            .arg(path)
            .spawn()
            .unwrap()
    }

    /// Plays a WAV into the microphone, in real time; returns when it has played.
    fn say(&self, wav: &Path) {
        let st = self
            .env(&mut Command::new("paplay"))
            .args(["-d", "ava_mic"])
            .arg(wav)
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Pulls the plug: the sound server goes away under the running console.
    fn unplug(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

impl Drop for VirtualSound {
    fn drop(&mut self) {
        self.unplug();
    }
}

/// A running `console --json`: its events as they come, its stderr in a file.
struct Console {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
    dir: tempfile::TempDir,
}

impl Console {
    fn start(sound: &VirtualSound, extra_config: &str, args: &[&str]) -> Console {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, test_config(free_port(), dir.path(), extra_config)).unwrap();
        let stderr = std::fs::File::create(dir.path().join("console.log")).unwrap();
        let mut child = sound
            .env(&mut Command::new(bin()))
            .args(["console", "--json", "--config"])
            .arg(&cfg)
            .args(args)
            .env("AVA_LOG", common::LOG_FILTER)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let ev = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                ev.lock().unwrap().push(v);
            }
        });
        Console { child, events, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Waits for an event matching `pred` (panics after `secs`, or if the console exits).
    fn wait_event(&mut self, what: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                    return e;
                }
                panic!(
                    "console exited ({st}) before {what}:\n{:#?}\n{}",
                    self.events(),
                    self.log()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "no {what} after {secs} s:\n{:#?}\n{}",
                self.events(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_log(&self, needle: &str, secs: u64) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn interrupt(&self) {
        assert!(Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success());
    }

    fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "console still running after {secs} s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_state(e: &Value, s: &str) -> bool {
    e["event"] == "state" && e["state"] == s
}

/// Stretches of sound in a recording, in ms (`[start, end)`): 20 ms windows above -45 dBFS,
/// joined across gaps shorter than 400 ms.
fn sound_stretches(path: &Path) -> Vec<(usize, usize)> {
    let (rate, samples) = read_wav(path);
    let n = rate as usize / 50;
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, c) in samples.chunks(n).enumerate() {
        if asterisk_voice_agent::audio::rms_dbfs(c) > -45.0 {
            let (s, e) = (i * 20, i * 20 + 20);
            match out.last_mut() {
                Some(last) if s - last.1 < 400 => last.1 = e,
                _ => out.push((s, e)),
            }
        }
    }
    out
}

fn stop(mut rec: Child) {
    let _ = Command::new("kill").args(["-INT", &rec.id().to_string()]).status();
    let _ = rec.wait();
}

#[test]
fn console_call_greets_answers_and_says_goodbye_on_ctrl_c() {
    let _g = serial();
    let sound = VirtualSound::start(None);
    let rec_path: PathBuf = sound.dir.path().join("speaker.wav");
    let rec = sound.record_speaker(&rec_path);
    let mut c = Console::start(&sound, "", &[]);
    c.wait_event("the greeting", 120, |e| is_state(e, "speaking"));
    c.wait_event("the end of the greeting", 30, |e| is_state(e, "listening"));
    sound.say(&audio("book_appointment.8k.wav"));
    let heard = c.wait_event("the caller's utterance", 30, |e| {
        e["event"] == "utterance" && e["entry"]["speaker"] == "caller"
    });
    println!("heard: {heard}");
    let reply = c.wait_event("a reply with timings", 90, |e| {
        e["event"] == "utterance" && e["entry"]["speaker"] == "agent" && e["entry"]["stt_final_ms"].is_u64()
    });
    println!("reply: {reply}");
    assert!(!reply["entry"]["text"].as_str().unwrap().is_empty(), "{reply}");
    assert!(
        c.events().iter().any(|e| e["event"] == "agent_sentence"),
        "no live agent sentence"
    );
    c.interrupt();
    c.wait_event("the goodbye", 15, |e| {
        e["event"] == "utterance" && e["entry"]["prompt"] == "goodbye"
    });
    let ended = c.wait_event("the end", 15, |e| e["event"] == "ended");
    assert_eq!(ended["reason"], "agent_hangup", "{ended}");
    let st = c.wait_exit(15);
    assert!(st.success(), "{st}\n{}", c.log());
    std::thread::sleep(Duration::from_millis(300));
    stop(rec);

    // The conversation log has the same call.
    let log = std::fs::read_to_string(c.dir.path().join("conversations.jsonl")).unwrap();
    assert!(
        log.contains("\"speaker\":\"caller\"") && log.contains("\"stt_final_ms\""),
        "{log}"
    );

    // What came out of the speaker: the greeting, then (after the caller's question) the reply,
    // then the goodbye.
    let stretches = sound_stretches(&rec_path);
    println!("speaker sound stretches (ms): {stretches:?}");
    // The goodbye may follow a short reply within 400 ms and join its stretch (Ctrl-C comes as
    // soon as the reply is logged): seen in a suite run with a one-line reply.
    assert!(
        stretches.len() >= 2,
        "expected the greeting, then the reply and the goodbye: {stretches:?}"
    );
    // (Not the greeting's length alone: on a starved machine the sound server may stall it.)
    let total: usize = stretches.iter().map(|(s, e)| e - s).sum();
    assert!(total >= 3000, "greeting, reply and goodbye too short: {stretches:?}");
    assert!(!c.log().contains("panicked"), "{}", c.log());
}

#[test]
fn on_speakers_the_echo_does_not_interrupt_but_the_caller_does_and_unplugging_ends_the_call() {
    let _g = serial();
    // The speaker comes back into the microphone 12 dB down, 40 ms late.
    let mut sound = VirtualSound::start(Some(0.25));
    let mut c = Console::start(&sound, LONG_GREETING, &[]);
    c.wait_event("the greeting", 120, |e| is_state(e, "speaking"));
    std::thread::sleep(Duration::from_millis(3000));
    assert!(
        !c.log().contains("agent paused"),
        "the agent's own echo paused it:\n{}",
        c.log()
    );
    // The caller talks over the greeting (full level, with the echo under it).
    sound.say(&audio("book_appointment.8k.wav"));
    assert!(
        c.wait_log("barge-in: agent stopped", 10),
        "the caller did not stop the agent:\n{}",
        c.log()
    );
    c.wait_event("the caller's utterance", 30, |e| {
        e["event"] == "utterance" && e["entry"]["speaker"] == "caller"
    });

    // Unplugged mid-call: the call ends with a message, nothing panics.
    sound.unplug();
    let st = c.wait_exit(15);
    let log = c.log();
    println!("{log}");
    assert!(!st.success(), "{st}");
    assert!(!log.contains("panicked"), "{log}");
    let last = log
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(last.contains("microphone") || last.contains("speaker"), "{last}");
}

#[test]
fn without_the_echo_gate_the_agent_interrupts_itself_on_speakers() {
    // The measurement behind the echo gate: the call's own echo guards (200 ms after the agent
    // starts, 150 ms after it stops) do not stop a speaker's echo 12 dB down.
    let _g = serial();
    let sound = VirtualSound::start(Some(0.25));
    let mut c = Console::start(&sound, LONG_GREETING, &["--headset"]);
    c.wait_event("the greeting", 120, |e| is_state(e, "speaking"));
    let paused = c.wait_log("agent paused", 12);
    let log = c.log();
    for l in log
        .lines()
        .filter(|l| l.contains("call started") || l.contains("agent paused") || l.contains("barge-in"))
    {
        println!("without the gate: {l}");
    }
    assert!(
        paused,
        "no self-interruption without the gate (then the gate is not needed):\n{log}"
    );
}

#[test]
fn missing_devices_are_clear_errors() {
    let sound = VirtualSound::start(None);
    let out = sound
        .env(&mut Command::new(bin()))
        .args(["console", "--input", "no-such-mic"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no input (microphone) device named \"no-such-mic\""),
        "{err}"
    );
    assert!(err.contains("there are:"), "{err}");

    // No sound server at all behind the default device.
    let out = sound
        .env(&mut Command::new(bin()))
        .args(["console"])
        .env("PULSE_SERVER", "unix:/nonexistent/socket")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{err}");
    assert!(!out.status.success());
    assert!(
        err.contains("error:") && err.contains("input (microphone) device"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let out = sound
        .env(&mut Command::new(bin()))
        .args(["console", "--list-devices"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && list.contains("input (microphone) devices"),
        "{list}"
    );
}
