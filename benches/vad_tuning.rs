//! VAD tuning measurements (docs/vad.md): runs the real earshot-based detector over real human
//! English speech (moonshine-voice's beckett.wav and two_cities.wav, resampled to 8 kHz as a
//! phone line would carry them) and the shared 8 kHz test utterances, and prints
//! - the distribution of pauses inside continuous speech (runs of non-speech 16 ms frames
//!   between voiced frames), per threshold: what `end_silence_ms` must stay above;
//! - how many utterances each file splits into for a range of `end_silence_ms`;
//! - onset and end detection delays on the test utterances;
//! - speech levels (for the energy floor) and the per-frame CPU cost.
//!
//! Run: `cargo bench --bench vad_tuning`. Environment: `VAD_SPEECH_DIR` (default
//! `~/.cache/asterisk-voice-agent/mirror/speech`), `VAD_AUDIO_DIR` (default `../shared/audio`),
//! `VAD_ENGINE` (`earshot` | `silero`: issue 8, Silero VAD's probability scores the frames, with
//! `vad.silero_threshold` in place of `vad.speech_threshold` and the same gates), `SILERO_MODEL`
//! (default `<AVA_HOME>/mirror/turn/silero_vad.onnx`), `ORT_LIB` (default
//! `<AVA_HOME>/lib/libonnxruntime.so.1`). Not a test: it asserts nothing.

use asterisk_voice_agent::audio::{resample_all, rms_dbfs};
use asterisk_voice_agent::config::VadConfig;
use asterisk_voice_agent::silero::SileroModel;
use asterisk_voice_agent::vad::{EndReason, FrameScore, FrameScorer, Vad, VadEvent, FRAME_MS};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Silero VAD when `VAD_ENGINE=silero`, loaded once.
static SILERO: OnceLock<Option<Arc<SileroModel>>> = OnceLock::new();

fn silero() -> Option<&'static Arc<SileroModel>> {
    SILERO
        .get_or_init(|| {
            (std::env::var("VAD_ENGINE").as_deref() == Ok("silero")).then(|| {
                let home = Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cache/asterisk-voice-agent");
                let p = std::env::var_os("SILERO_MODEL")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join("mirror/turn/silero_vad.onnx"));
                let ort = std::env::var_os("ORT_LIB")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join("lib/libonnxruntime.so.1"));
                Arc::new(SileroModel::load(&p, &ort).unwrap_or_else(|e| panic!("{}: {e:#}", p.display())))
            })
        })
        .as_ref()
}

/// The detector under test: earshot's, or Silero's with `VAD_ENGINE=silero`.
fn new_vad(cfg: &VadConfig) -> Vad {
    match silero() {
        Some(m) => Vad::with_silero(cfg, m.clone()),
        None => Vad::new(cfg),
    }
}

/// The score threshold the detector under test uses.
fn threshold(cfg: &VadConfig) -> f32 {
    if silero().is_some() {
        cfg.silero_threshold
    } else {
        cfg.speech_threshold
    }
}

struct Clip {
    name: String,
    rate: u32,
    samples: Vec<i16>,
    /// Real human speech (else espeak-ng).
    human: bool,
}

fn read_wav(path: &Path) -> (u32, Vec<i16>) {
    let mut r = hound::WavReader::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec = r.spec();
    assert_eq!(spec.channels, 1, "{} must be mono", path.display());
    (spec.sample_rate, r.samples::<i16>().map(|s| s.unwrap()).collect())
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

/// Frame scores of a clip fed in 20 ms frames.
fn scores(clip: &Clip) -> Vec<FrameScore> {
    let mut s = match silero() {
        Some(m) => FrameScorer::with_silero(m.clone()),
        None => FrameScorer::new(),
    };
    let mut out = Vec::new();
    for f in clip.samples.chunks((clip.rate / 50) as usize) {
        s.push(f, clip.rate);
        while let Some(x) = s.next_frame() {
            out.push(x);
        }
    }
    out
}

/// Pauses (ms) between voiced frames, with the time (s) each starts at.
fn pauses(voiced: &[bool]) -> Vec<(f32, u32)> {
    let mut out = Vec::new();
    let first = voiced.iter().position(|&v| v);
    let last = voiced.iter().rposition(|&v| v);
    let (Some(first), Some(last)) = (first, last) else {
        return out;
    };
    let mut run = 0;
    for (i, &v) in voiced[first..=last].iter().enumerate() {
        if v {
            if run > 0 {
                out.push((
                    ((first + i - run) as u32 * FRAME_MS) as f32 / 1000.0,
                    run as u32 * FRAME_MS,
                ));
            }
            run = 0;
        } else {
            run += 1;
        }
    }
    out
}

/// Runs the full detector over a clip in 20 ms frames; events with their time (ms, end of the
/// frame that produced them).
fn events(clip: &Clip, cfg: &VadConfig) -> Vec<(u32, VadEvent)> {
    let mut v = new_vad(cfg);
    let n = (clip.rate / 50) as usize;
    let mut out = Vec::new();
    let mut t = 0u64;
    for f in clip.samples.chunks(n) {
        t += f.len() as u64;
        let e = v.push(f, clip.rate);
        if e != VadEvent::None {
            out.push(((t * 1000 / clip.rate as u64) as u32, e));
        }
    }
    // trailing silence so the last utterance can end
    for _ in 0..150 {
        t += n as u64;
        let e = v.push(&vec![0; n], clip.rate);
        if e != VadEvent::None {
            out.push(((t * 1000 / clip.rate as u64) as u32, e));
        }
    }
    out
}

/// First and last ms whose 5 ms RMS is above -50 dBFS: the true speech span of a padded clip.
fn speech_span(clip: &Clip) -> (u32, u32) {
    let w = (clip.rate / 200) as usize;
    let loud: Vec<bool> = clip.samples.chunks(w).map(|c| rms_dbfs(c) > -50.0).collect();
    let a = loud.iter().position(|&l| l).unwrap_or(0) as u32 * 5;
    let b = (loud.iter().rposition(|&l| l).unwrap_or(0) as u32 + 1) * 5;
    (a, b)
}

fn main() {
    let home = std::env::var("HOME").unwrap_or_default();
    let speech_dir = std::env::var("VAD_SPEECH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(&home).join(".cache/asterisk-voice-agent/mirror/speech"));
    let audio_dir = std::env::var("VAD_AUDIO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/audio"));

    let mut clips = Vec::new();
    for name in ["beckett.wav", "two_cities.wav"] {
        let p = speech_dir.join(name);
        if !p.is_file() {
            println!("(skipping {}: missing)", p.display());
            continue;
        }
        let (rate, s) = read_wav(&p);
        clips.push(Clip {
            name: format!("{name} ({} Hz -> 8k)", rate),
            rate: 8000,
            samples: resample_all(&s, rate, 8000).unwrap(),
            human: true,
        });
    }
    let mut shared: Vec<PathBuf> = std::fs::read_dir(&audio_dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    shared.retain(|p| p.extension().is_some_and(|e| e == "wav"));
    shared.sort();
    for p in &shared {
        let (rate, samples) = read_wav(p);
        clips.push(Clip {
            name: p.file_name().unwrap().to_string_lossy().into_owned(),
            rate,
            samples,
            human: false,
        });
    }
    let cfg = VadConfig::default();
    println!(
        "VAD tuning: {} scores {} ms frames, defaults {cfg:?}",
        if silero().is_some() { "Silero VAD" } else { "earshot" },
        FRAME_MS
    );
    println!();

    // 1. Pauses inside speech, per threshold and energy floor.
    //
    // Human pauses are classed with the known texts: beckett.wav is six short sentences ("Ever
    // tried. Ever failed. No matter. Try again. Fail again. Fail better."), so every pause of
    // 150 ms or more in it is a sentence end; two_cities.wav is the 19 comma-separated phrases of
    // the novel's first sentence, ending at about 41.7 s, then the start of the next. Pauses under
    // 150 ms are gaps between words inside a phrase.
    let all_scores: Vec<Vec<FrameScore>> = clips.iter().map(scores).collect();
    println!("== pauses inside speech (ms): word gaps (< 150 ms), phrase pauses (commas, inside a sentence), sentence ends ==");
    println!("   also: tail = last voiced frame after the true end of the espeak clips (ms, mean), the delay endpointing adds to end_silence_ms");
    for floor in [-70.0f32, -60.0] {
        for thr in [0.3f32, 0.4, 0.5, 0.6] {
            let c = VadConfig {
                speech_threshold: thr,
                silero_threshold: thr,
                energy_floor_dbfs: floor,
                ..cfg.clone()
            };
            let (mut words, mut phrases, mut ends, mut espeak, mut tails) = (vec![], vec![], vec![], vec![], vec![]);
            for (clip, sc) in clips.iter().zip(&all_scores) {
                let mut v = new_vad(&c);
                let voiced: Vec<bool> = sc.iter().map(|f| v.frame_is_speech(*f)).collect();
                if !clip.human {
                    espeak.extend(pauses(&voiced).into_iter().map(|p| p.1));
                    let (_, b) = speech_span(clip);
                    if let Some(last) = voiced.iter().rposition(|&v| v) {
                        tails.push(((last as u32 + 1) * FRAME_MS).saturating_sub(b));
                    }
                    continue;
                }
                for (t, ms) in pauses(&voiced) {
                    if ms < 150 {
                        words.push(ms);
                    } else if clip.name.starts_with("beckett") || (41.0..43.0).contains(&t) {
                        ends.push(ms);
                    } else {
                        phrases.push(ms);
                    }
                }
            }
            phrases.sort_unstable();
            println!(
                "floor {floor:>3} thr {thr:.1}: words n={:>3} p99={:>3} | phrases n={:>2} p50={:>4} p90={:>4} p95={:>4} max={:>4} | sentence ends n={} min={:>4} | espeak max={:>3} tail={:>3}",
                words.len(),
                pct(&words, 0.99),
                phrases.len(),
                pct(&phrases, 0.5),
                pct(&phrases, 0.9),
                pct(&phrases, 0.95),
                phrases.last().copied().unwrap_or(0),
                ends.len(),
                ends.iter().min().copied().unwrap_or(0),
                espeak.iter().max().copied().unwrap_or(0),
                tails.iter().sum::<u32>() / tails.len().max(1) as u32,
            );
        }
    }
    println!();
    println!("== every pause >= 100 ms at the defaults (start s:ms) ==");
    for (clip, sc) in clips.iter().zip(&all_scores) {
        let mut v = new_vad(&cfg);
        let voiced: Vec<bool> = sc.iter().map(|f| v.frame_is_speech(*f)).collect();
        let p: Vec<String> = pauses(&voiced)
            .into_iter()
            .filter(|p| p.1 >= 100)
            .map(|(t, ms)| format!("{t:.2}:{ms}"))
            .collect();
        let voiced_ms = voiced.iter().filter(|&&v| v).count() as u32 * FRAME_MS;
        println!(
            "{:<36} voiced {:>5} ms of {:>5}; {}",
            clip.name,
            voiced_ms,
            sc.len() as u32 * FRAME_MS,
            p.join(" ")
        );
    }
    println!();

    // Noise: what earshot and the periodicity gate make of white noise at a speech level.
    {
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<i16> = (0..8000 * 3)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * 3000.0) as i16
            })
            .collect();
        let sc = scores(&Clip {
            name: String::new(),
            rate: 8000,
            samples: noise,
            human: false,
        });
        let mut s: Vec<f32> = sc.iter().map(|f| f.score).collect();
        let mut p: Vec<f32> = sc.iter().map(|f| f.voicing).collect();
        s.sort_by(f32::total_cmp);
        p.sort_by(f32::total_cmp);
        let mut sp: Vec<f32> = all_scores
            .iter()
            .flatten()
            .filter(|f| f.score >= threshold(&cfg) && f.dbfs >= cfg.energy_floor_dbfs)
            .map(|f| f.voicing)
            .collect();
        sp.sort_by(f32::total_cmp);
        println!(
            "white noise at -24 dBFS: speech score p50={:.2} max={:.2}; periodicity p50={:.2} max={:.2}; periodicity of voice frames in speech p25={:.2} p50={:.2}",
            s[s.len() / 2],
            s[s.len() - 1],
            p[p.len() / 2],
            p[p.len() - 1],
            sp[sp.len() / 4],
            sp[sp.len() / 2]
        );
        println!();
    }

    // 2. Utterances per file over end_silence_ms.
    println!("== utterances per end_silence_ms (Endpoint+TooShort, no max length; beckett has 6 sentences, two_cities 1 + the start of the next) ==");
    let ends = [200u32, 300, 400, 500, 600, 700, 800, 1000, 1200];
    print!("{:<36}", "end_silence_ms");
    for e in ends {
        print!("{e:>7}");
    }
    println!();
    for clip in &clips {
        print!("{:<36}", clip.name);
        for e in ends {
            let c = VadConfig {
                end_silence_ms: e,
                max_utterance_ms: u32::MAX,
                ..cfg.clone()
            };
            let ev = events(clip, &c);
            let n = ev
                .iter()
                .filter(|(_, e)| matches!(e, VadEvent::SpeechEnd(EndReason::Endpoint)))
                .count();
            let short = ev
                .iter()
                .filter(|(_, e)| matches!(e, VadEvent::SpeechEnd(EndReason::TooShort)))
                .count();
            print!("{:>7}", format!("{n}+{short}"));
        }
        println!();
    }
    if std::env::var("VAD_DEBUG").is_ok() {
        for clip in clips.iter().filter(|c| c.human) {
            for e in [600u32, 1200] {
                let c = VadConfig {
                    end_silence_ms: e,
                    max_utterance_ms: u32::MAX,
                    ..cfg.clone()
                };
                println!("{} {e}: {:?}", clip.name, events(clip, &c));
            }
        }
    }
    println!();

    // 3. Onset and end delays on the padded test utterances with the defaults.
    println!(
        "== espeak utterances with the defaults: onset detected (ms after the true start), end detected (ms after the true end) =="
    );
    for clip in clips.iter().filter(|c| !c.human) {
        let (a, b) = speech_span(clip);
        let ev = events(clip, &cfg);
        let desc: Vec<String> = ev
            .iter()
            .map(|(t, e)| match e {
                VadEvent::SpeechStart { onset_ms } => {
                    format!("start@{t} (+{}; onset_ms {onset_ms})", *t as i64 - a as i64)
                }
                VadEvent::SpeechEnd(r) => format!("{r:?}@{t} (+{})", *t as i64 - b as i64),
                VadEvent::None => String::new(),
            })
            .collect();
        println!("{:<36} speech {a}..{b} ms: {}", clip.name, desc.join(", "));
    }
    println!();

    // 4. Levels.
    println!("== levels of voiced frames (dBFS, 16 ms at 16 kHz) ==");
    for (clip, sc) in clips.iter().zip(&all_scores) {
        let mut db: Vec<i32> = sc
            .iter()
            .filter(|f| f.score >= threshold(&cfg))
            .map(|f| f.dbfs.round() as i32)
            .collect();
        db.sort_unstable();
        let q = |p: f64| {
            db.get(((db.len() as f64 * p) as usize).min(db.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        println!(
            "{:<36} p1={} p5={} p50={} max={}",
            clip.name,
            q(0.01),
            q(0.05),
            q(0.5),
            q(1.0)
        );
    }
    println!();

    // 5. CPU cost per 20 ms frame.
    println!("== CPU per 20 ms frame (one core) ==");
    for rate in [8000u32, 16000] {
        let clip = clips.iter().find(|c| c.human).or(clips.first()).expect("some audio");
        let audio = resample_all(&clip.samples, clip.rate, rate).unwrap();
        let n = (rate / 50) as usize;
        let mut v = new_vad(&cfg);
        let mut frames = 0u64;
        let t0 = Instant::now();
        for _ in 0..3 {
            for f in audio.chunks_exact(n) {
                std::hint::black_box(v.push(f, rate));
                frames += 1;
            }
        }
        let us = t0.elapsed().as_secs_f64() * 1e6 / frames as f64;
        println!(
            "{rate} Hz input: {us:.1} us per 20 ms frame over {frames} frames ({:.2}% of real time)",
            us / 200.0
        );
    }
}
