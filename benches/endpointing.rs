//! Endpointing accuracy (issue 8, docs/turns.md): streams real speech with pauses inside
//! sentences through the real VAD and the turn policy (`turn.rs`), with the real Smart Turn
//! model, 20 ms at a time, and prints for each mode (the fixed 800 ms silence timer, Smart Turn
//! at several thresholds):
//! - cut-ins: the share of pauses inside a turn taken as the end of the turn;
//! - the delay from the true end of the turn (the caller's last voiced 20 ms frame) to the
//!   decision, p50 / p95 (the model's measured inference time is added to each verdict);
//! - Smart Turn inference ms per call of the model.
//!
//! Material: the shared 8 kHz utterances, each cut at its quietest 20 ms frame between 35% and
//! 65% of its speech (mid-sentence) with 300 / 600 / 900 / 1200 ms of silence inserted, then 2 s
//! of silence; and moonshine-voice's real recordings (beckett.wav, two_cities.wav,
//! endgame_nagg_nell.wav, at 8 kHz), each taken as one turn: every pause of >= 250 ms inside it
//! counts as "not the end" (some are sentence ends in a reading, and endgame is a dialogue, so
//! this overstates cut-ins for those files).
//!
//! Run: `cargo bench --bench endpointing`. Environment: `VAD_SPEECH_DIR` (default
//! `~/.cache/asterisk-voice-agent/mirror/speech`), `VAD_AUDIO_DIR` (default `../shared/audio`),
//! `TURN_MODEL` (default `<AVA_HOME>/mirror/turn/smart-turn-v3.2-cpu.onnx`), `ORT_LIB`
//! (default `<AVA_HOME>/lib/libonnxruntime.so.1`), `VAD_ENGINE` (`earshot` | `silero`),
//! `SILERO_MODEL`, `TURN_THRESHOLDS=0.3,0.5,0.7,0.85`, `TURN_MIN_PAUSES=200`
//! (`turn.min_pause_ms` values, each run with every threshold), `TURN_MAX_END_MS=1200`
//! (`turn.max_end_silence_ms`). Not a test: it asserts nothing.

use asterisk_voice_agent::audio::{resample_all, rms_dbfs};
use asterisk_voice_agent::config::{TurnConfig, TurnMode, VadConfig};
use asterisk_voice_agent::smart_turn::SmartTurn;
use asterisk_voice_agent::turn::{Action, Event, TurnPolicy};
use asterisk_voice_agent::vad::{Vad, VadEvent};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const RATE: u32 = 8000;

thread_local! {
    static FEATURES_MS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}
const FRAME: usize = 160; // 20 ms at 8 kHz

struct Clip {
    name: String,
    samples: Vec<i16>,
    /// Pauses inside the turn, [start, end) ms.
    pauses: Vec<(u32, u32)>,
    /// End of the caller's speech (end of the last voiced 20 ms frame), ms.
    speech_end: u32,
}

fn ava_home() -> PathBuf {
    std::env::var_os("AVA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/asterisk-voice-agent"))
}

fn read_8k(path: &Path) -> Vec<i16> {
    let mut r = hound::WavReader::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec = r.spec();
    let ch = spec.channels as usize;
    let s: Vec<i16> = r.samples::<i16>().map(|s| s.unwrap()).collect();
    let mono: Vec<i16> = s.chunks(ch).map(|c| c[0]).collect();
    resample_all(&mono, spec.sample_rate, RATE).unwrap()
}

/// Per 20 ms frame: voiced (RMS within 35 dB of the clip's loud frames and above -55 dBFS).
fn voiced_frames(s: &[i16]) -> Vec<bool> {
    let db: Vec<f32> = s.chunks(FRAME).map(rms_dbfs).collect();
    let mut sorted = db.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let loud = sorted[(sorted.len() * 95 / 100).min(sorted.len() - 1)];
    db.iter().map(|&d| d > (loud - 35.0).max(-55.0)).collect()
}

/// Pauses of at least `min_ms` between voiced frames, and the end of speech (ms).
fn pauses_of(s: &[i16], min_ms: u32) -> (Vec<(u32, u32)>, u32) {
    let v = voiced_frames(s);
    let first = v.iter().position(|&x| x).unwrap_or(0);
    let last = v.iter().rposition(|&x| x).unwrap_or(0);
    let mut out = Vec::new();
    let mut i = first;
    while i <= last {
        if !v[i] {
            let j = (i..=last).find(|&k| v[k]).unwrap();
            let (a, b) = (i as u32 * 20, j as u32 * 20);
            if b - a >= min_ms {
                out.push((a, b));
            }
            i = j;
        }
        i += 1;
    }
    (out, (last as u32 + 1) * 20)
}

fn clips() -> Vec<Clip> {
    let audio = std::env::var_os("VAD_AUDIO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/audio"));
    let speech = std::env::var_os("VAD_SPEECH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ava_home().join("mirror/speech"));
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&audio)
        .unwrap_or_else(|e| panic!("{}: {e}", audio.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wav"))
        .collect();
    names.sort();
    for p in names {
        let s = read_8k(&p);
        let v = voiced_frames(&s);
        let first = v.iter().position(|&x| x).unwrap();
        let last = v.iter().rposition(|&x| x).unwrap();
        let (lo, hi) = (first + (last - first) * 35 / 100, first + (last - first) * 65 / 100);
        let db: Vec<f32> = s.chunks(FRAME).map(rms_dbfs).collect();
        let cut = (lo..hi).min_by(|&a, &b| db[a].partial_cmp(&db[b]).unwrap()).unwrap();
        for gap in [300u32, 600, 900, 1200] {
            let mut x = s[..cut * FRAME].to_vec();
            x.extend(std::iter::repeat_n(0i16, (gap * RATE / 1000) as usize));
            x.extend_from_slice(&s[cut * FRAME..(last + 1) * FRAME]);
            x.extend(std::iter::repeat_n(0i16, 2 * RATE as usize));
            let pause_start = cut as u32 * 20;
            out.push(Clip {
                name: format!("{} +{gap}ms", p.file_name().unwrap().to_string_lossy()),
                samples: x,
                pauses: vec![(pause_start, pause_start + gap)],
                speech_end: (last as u32 + 1) * 20 + gap,
            });
        }
    }
    for name in ["beckett.wav", "two_cities.wav", "endgame_nagg_nell.wav"] {
        let p = speech.join(name);
        if !p.is_file() {
            eprintln!("skipping {} (run scripts/install-deps.sh)", p.display());
            continue;
        }
        let mut s = read_8k(&p);
        let (pauses, speech_end) = pauses_of(&s, 250);
        s.truncate((speech_end * RATE / 1000) as usize);
        s.extend(std::iter::repeat_n(0i16, 2 * RATE as usize));
        out.push(Clip {
            name: name.into(),
            samples: s,
            pauses,
            speech_end,
        });
    }
    out
}

struct Outcome {
    pauses: usize,
    cut_ins: usize,
    delay_ms: Option<u32>,
}

/// Streams a clip through VAD + policy; returns cut-ins and the end-of-turn delay.
fn run(
    clip: &Clip,
    turn: &TurnConfig,
    vad_cfg: &VadConfig,
    model: Option<&SmartTurn>,
    infer: &mut Vec<f32>,
    silero: Option<&Arc<asterisk_voice_agent::silero::SileroModel>>,
) -> Outcome {
    let mut vcfg = vad_cfg.clone();
    if turn.mode == TurnMode::Smart {
        vcfg.end_silence_ms = turn.max_end_silence_ms;
    }
    let mut vad = match silero {
        Some(m) => Vad::with_silero(&vcfg, m.clone()),
        None => Vad::new(&vcfg),
    };
    let mut policy = TurnPolicy::new(turn);
    let mut utter: Vec<i16> = Vec::new();
    // Verdicts due at an audio time (ms): (due, pause, probability).
    let mut due: Vec<(u32, u64, f32)> = Vec::new();
    let mut decisions: Vec<u32> = Vec::new();
    for (i, f) in clip.samples.chunks(FRAME).enumerate() {
        let now = (i as u32 + 1) * 20;
        let mut actions = Vec::new();
        match vad.push(f, RATE) {
            VadEvent::SpeechStart { .. } => {
                utter.clear();
                utter.extend_from_slice(f);
                actions.extend(policy.on(Event::SpeechStart));
            }
            VadEvent::SpeechEnd(_) => {
                actions.extend(policy.on(Event::VadEnd));
            }
            VadEvent::None if vad.in_speech() => {
                utter.extend_from_slice(f);
                actions.extend(policy.on(Event::Silence {
                    ms: vad.trailing_silence_ms(),
                }));
            }
            VadEvent::None => {}
        }
        let ready: Vec<_> = due.iter().filter(|d| d.0 <= now).cloned().collect();
        due.retain(|d| d.0 > now);
        for (_, pause, p) in ready {
            actions.extend(policy.on(Event::Verdict { pause, probability: p }));
        }
        for a in actions {
            match a {
                Action::AskTurnModel { pause } => {
                    let v = model.expect("smart mode has a model").predict(&utter, RATE).unwrap();
                    infer.push(v.ms);
                    FEATURES_MS.with(|f| f.borrow_mut().push(v.features_ms));
                    due.push((now + v.ms.round() as u32, pause, v.probability));
                }
                Action::EndTurn(_) => {
                    decisions.push(now);
                    vad.end_now();
                    utter.clear();
                    due.clear();
                    policy.on(Event::Final { text: String::new() });
                }
                _ => {}
            }
        }
    }
    let cut_ins = clip
        .pauses
        .iter()
        .filter(|(a, b)| decisions.iter().any(|&d| d > *a && d <= *b + 20))
        .count();
    let delay_ms = decisions
        .iter()
        .find(|&&d| d >= clip.speech_end)
        .map(|&d| d - clip.speech_end);
    Outcome {
        pauses: clip.pauses.len(),
        cut_ins,
        delay_ms,
    }
}

fn pct(v: &[u32], p: f64) -> u32 {
    if v.is_empty() {
        return 0;
    }
    let mut v = v.to_vec();
    v.sort_unstable();
    v[(((v.len() as f64) * p).ceil() as usize)
        .saturating_sub(1)
        .min(v.len() - 1)]
}

fn main() {
    let home = ava_home();
    let model_path = std::env::var_os("TURN_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join("mirror/turn/smart-turn-v3.2-cpu.onnx"));
    let ort = std::env::var_os("ORT_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join("lib/libonnxruntime.so.1"));
    let model = SmartTurn::load(&model_path, &ort).expect("Smart Turn loads");
    let silero = match std::env::var("VAD_ENGINE").as_deref() {
        Ok("silero") => {
            let p = std::env::var_os("SILERO_MODEL")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join("mirror/turn/silero_vad.onnx"));
            Some(Arc::new(
                asterisk_voice_agent::silero::SileroModel::load(&p, &ort).unwrap(),
            ))
        }
        _ => None,
    };
    let clips = clips();
    let vad_cfg = VadConfig::default();
    println!(
        "endpointing on {} clips (VAD: {}; machine shared with other builds)",
        clips.len(),
        if silero.is_some() { "silero" } else { "earshot" }
    );
    let mut modes: Vec<(String, TurnConfig)> = vec![(
        "silence 800 ms".into(),
        TurnConfig {
            mode: TurnMode::Silence,
            speculative: false,
            ..Default::default()
        },
    )];
    let thresholds: Vec<f32> = std::env::var("TURN_THRESHOLDS")
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().parse().unwrap()).collect())
        .unwrap_or(vec![0.3, 0.5, 0.7, 0.85]);
    let min_pauses: Vec<u32> = std::env::var("TURN_MIN_PAUSES")
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().parse().unwrap()).collect())
        .unwrap_or(vec![TurnConfig::default().min_pause_ms]);
    let max_end = std::env::var("TURN_MAX_END_MS")
        .ok()
        .map(|s| s.trim().parse().unwrap())
        .unwrap_or(TurnConfig::default().max_end_silence_ms);
    for &pause in &min_pauses {
        for &th in &thresholds {
            let name = if min_pauses.len() > 1 {
                format!("smart p>={th} {pause}ms")
            } else {
                format!("smart p>={th}")
            };
            modes.push((
                name,
                TurnConfig {
                    mode: TurnMode::Smart,
                    threshold: th,
                    min_pause_ms: pause,
                    max_end_silence_ms: max_end,
                    speculative: false,
                    ..Default::default()
                },
            ));
        }
    }
    println!(
        "{:<22} {:>22} {:>22} {:>10} {:>10} {:>10}",
        "mode", "cut-ins (joined)", "cut-ins (recordings)", "delay p50", "delay p95", "no end"
    );
    for (name, tc) in &modes {
        let mut infer = Vec::new();
        let (mut pj, mut cj, mut pr, mut cr) = (0, 0, 0, 0);
        let mut delays = Vec::new();
        let mut missed = 0;
        for c in &clips {
            let o = run(
                c,
                tc,
                &vad_cfg,
                (tc.mode == TurnMode::Smart).then_some(&model),
                &mut infer,
                silero.as_ref(),
            );
            if c.name.contains("+") {
                pj += o.pauses;
                cj += o.cut_ins;
            } else {
                pr += o.pauses;
                cr += o.cut_ins;
            }
            match o.delay_ms {
                Some(d) => delays.push(d),
                None => missed += 1,
            }
            if std::env::var_os("VERBOSE").is_some() {
                println!(
                    "   {name} {}: {} of {} pauses cut, delay {:?}",
                    c.name, o.cut_ins, o.pauses, o.delay_ms
                );
            }
        }
        println!(
            "{:<22} {:>22} {:>22} {:>8} ms {:>7} ms {:>10}",
            name,
            format!("{cj}/{pj} ({:.1}%)", 100.0 * cj as f64 / pj.max(1) as f64),
            format!("{cr}/{pr} ({:.1}%)", 100.0 * cr as f64 / pr.max(1) as f64),
            pct(&delays, 0.5),
            pct(&delays, 0.95),
            missed
        );
        if !infer.is_empty() {
            let mut v: Vec<u32> = infer.iter().map(|x| x.round() as u32).collect();
            v.sort_unstable();
            let f: Vec<u32> = FEATURES_MS.with(|f| f.borrow_mut().drain(..).map(|x| x.round() as u32).collect());
            println!(
                "{:<22}   Smart Turn: {} inferences, p50 {} ms, p95 {} ms, max {} ms (of which log-mel features p50 {} ms)",
                "",
                v.len(),
                pct(&v, 0.5),
                pct(&v, 0.95),
                v[v.len() - 1],
                pct(&f, 0.5)
            );
        }
    }
}
