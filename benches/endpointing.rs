//! Endpointing accuracy (issue 8, docs/turns.md): streams real speech with pauses inside
//! sentences through the real VAD and the turn policy (`turn.rs`), with the real Smart Turn
//! model, 20 ms at a time, and prints for each mode (the fixed 800 ms silence timer, Smart Turn
//! at several thresholds):
//! - cut-ins: the share of mid-sentence pauses taken as the end of the turn, each judged as if
//!   no earlier pause had been taken (the utterance, and the model's context, carry on from the
//!   turn's start); and "cascading", where a pause taken ends the utterance as it does in a call,
//!   so the next pause is judged on the words since (one mistake makes the next more likely);
//! - ends decided before the end of the turn at no labelled pause ("other early": in a pause
//!   shorter than the labels' 250 ms, or in quiet speech the VAD takes for silence);
//! - the delay from the true end of the turn (the caller's last voiced 20 ms frame) to the
//!   decision, p50 / p95 (the model's measured inference time is added to each verdict), over
//!   all turns and over the real ones (readings and conversation) alone;
//! - Smart Turn inference ms per call of the model.
//!
//! Material: the shared 8 kHz utterances, each cut at its quietest 20 ms frame between 35% and
//! 65% of its speech (mid-sentence) with 300 / 600 / 900 / 1200 ms of silence inserted, then 2 s
//! of silence; and moonshine-voice's real recordings (beckett.wav, two_cities.wav,
//! endgame_nagg_nell.wav, at 8 kHz), each taken as one turn ending at its last word, with its
//! pauses of >= 250 ms labelled from their text ([`LABELS`]): mid-sentence (all 15 in
//! two_cities, Dickens' one long sentence read with a pause at each comma) or after a complete
//! sentence (beckett's short sentences, endgame's dialogue lines). Cut-ins are counted on the
//! mid-sentence pauses; an end decided at a sentence end inside a reading is reported apart
//! (column "sentence ends"): a listener could take the turn there. And the turns of
//! pyannote.audio's sample telephone conversation (two speakers, each turn ending where the
//! other takes over; [`conversation_clips`]): real turn ends in conversational speech. The
//! model hears the utterance from its onset with `vad.pre_roll_ms` of audio before it, as in a
//! call.
//!
//! Run: `cargo bench --bench endpointing`. Environment: `VAD_SPEECH_DIR` (default
//! `~/.cache/asterisk-voice-agent/mirror/speech`), `VAD_AUDIO_DIR` (default `../shared/audio`),
//! `TURN_MODEL` (default `<AVA_HOME>/mirror/turn/smart-turn-v3.2-cpu.onnx`), `ORT_LIB`
//! (default `<AVA_HOME>/lib/libonnxruntime.so.1`), `VAD_ENGINE` (`earshot` | `silero`),
//! `SILERO_MODEL`, `TURN_THRESHOLDS=0.5,0.7,0.85,0.95`, `TURN_MIN_PAUSES=200`
//! (`turn.min_pause_ms` values, each run with every threshold), `TURN_MAX_END_MS` (default the
//! config's `turn.max_end_silence_ms`), `VERBOSE=1` (per clip), `TURN_PRINT_PAUSES=1` (the
//! recordings' pauses as labelled), `TURN_PRINT_VERDICTS=1` (every verdict of the model, with
//! its time from the end of the turn). Not a test: it asserts nothing.

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

/// Where a clip comes from: its figures are reported per kind.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// A shared espeak-ng utterance cut mid-sentence with digital silence inserted.
    Joined,
    /// A moonshine-voice reading, taken as one turn.
    Reading,
    /// One speaker's turn in pyannote.audio's telephone conversation, ending where the other
    /// speaker takes over.
    Conversation,
}

struct Clip {
    name: String,
    kind: Kind,
    samples: Vec<i16>,
    /// Pauses in the middle of a sentence, [start, end) ms.
    pauses: Vec<(u32, u32)>,
    /// Pauses after a complete sentence inside the recording (the speaker goes on), [start, end) ms.
    sentence_pauses: Vec<(u32, u32)>,
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
                kind: Kind::Joined,
                samples: x,
                pauses: vec![(pause_start, pause_start + gap)],
                sentence_pauses: Vec::new(),
                speech_end: (last as u32 + 1) * 20 + gap,
            });
        }
    }
    for l in LABELS {
        let p = speech.join(l.name);
        if !p.is_file() {
            eprintln!("skipping {} (run scripts/install-deps.sh)", p.display());
            continue;
        }
        let s = read_8k(&p);
        let (found, _) = pauses_of(&s, 250);
        let (from, to) = l.speech_ms;
        let inside: Vec<(u32, u32)> = found.into_iter().filter(|&(a, b)| a > from && b < to).collect();
        assert_eq!(
            inside.len(),
            l.pauses,
            "{}: {} pauses found inside the turn ({inside:?}), {} labelled: the labels are out of date",
            l.name,
            inside.len(),
            l.pauses
        );
        for at in l.sentence_ends {
            assert!(
                inside.iter().any(|&(a, _)| a == *at),
                "{}: no pause starts at {at} ms (found {inside:?}): the labels are out of date",
                l.name
            );
        }
        let shift = |(a, b): (u32, u32)| (a - from, b - from);
        let (sentence, mid): (Vec<_>, Vec<_>) = inside.iter().partition(|(a, _)| l.sentence_ends.contains(a));
        let ms = |t: u32| ((t * RATE / 1000) as usize).min(s.len());
        let mut x = s[ms(from)..ms(to)].to_vec();
        x.extend(std::iter::repeat_n(0i16, 2 * RATE as usize));
        out.push(Clip {
            name: l.name.into(),
            kind: Kind::Reading,
            samples: x,
            pauses: mid.into_iter().map(shift).collect(),
            sentence_pauses: sentence.into_iter().map(shift).collect(),
            speech_end: to - from,
        });
    }
    out.extend(conversation_clips(&speech));
    out
}

/// The turns of pyannote.audio's sample conversation (`pyannote_sample.wav`, 30 s of two
/// speakers on one telephone channel at 16 kHz, and its STM transcript `pyannote_sample.stm`:
/// `sample 1 SPEAKER START_S END_S WORDS...` per line; both from the pyannote.audio 4.0.7 wheel,
/// MIT, put in the speech folder by scripts/deps-turns.sh). A turn is a run of consecutive STM
/// segments of one speaker; it ends where the transcript's segment ends, and the other speaker
/// takes over (after 20-470 ms, or talking over its last words). Each turn becomes a caller's
/// turn: 500 ms of silence, the turn's audio (10 ms fade-out at the cut), then 2 s of silence.
/// The last turn is left out: the file cuts it 13 ms after its segment, so whether it ends there
/// is unknown. Pauses of >= 250 ms inside a turn that hold a segment boundary are sentence ends;
/// any other is mid-sentence. The STM's times are a transcriber's (within ~100 ms of the audio's
/// own end of speech where a silence follows), so the delays from these turns carry that error.
fn conversation_clips(speech: &Path) -> Vec<Clip> {
    let (wav, stm) = (speech.join("pyannote_sample.wav"), speech.join("pyannote_sample.stm"));
    if !wav.is_file() || !stm.is_file() {
        eprintln!("skipping {} (run scripts/deps-turns.sh)", wav.display());
        return Vec::new();
    }
    let s = read_8k(&wav);
    let text = std::fs::read_to_string(&stm).unwrap_or_else(|e| panic!("{}: {e}", stm.display()));
    // (speaker, start ms, end ms, words) per segment.
    let segs: Vec<(String, u32, u32, String)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 6, "{}: not an STM line: {l:?}", stm.display());
            let ms = |x: &str| {
                (x.parse::<f64>()
                    .unwrap_or_else(|e| panic!("{}: {x:?}: {e}", stm.display()))
                    * 1000.0)
                    .round() as u32
            };
            (f[2].to_string(), ms(f[3]), ms(f[4]), f[5..].join(" "))
        })
        .collect();
    let mut turns: Vec<Vec<&(String, u32, u32, String)>> = Vec::new();
    for seg in &segs {
        match turns.last_mut() {
            Some(t) if t[0].0 == seg.0 => t.push(seg),
            _ => turns.push(vec![seg]),
        }
    }
    turns.pop();
    let lead = 500u32;
    let mut out = Vec::new();
    for t in turns {
        let (from, to) = (t[0].1, t[t.len() - 1].2);
        let ms = |at: u32| ((at * RATE / 1000) as usize).min(s.len());
        let mut x = vec![0i16; ms(lead)];
        let mut turn = s[ms(from)..ms(to)].to_vec();
        let fade = (RATE / 100) as usize;
        let n = turn.len();
        for (i, v) in turn[n.saturating_sub(fade)..].iter_mut().enumerate() {
            *v = (*v as f32 * (fade - i) as f32 / fade as f32) as i16;
        }
        x.extend(turn);
        x.extend(std::iter::repeat_n(0i16, 2 * RATE as usize));
        let (found, _) = pauses_of(&x, 250);
        let end = lead + to - from;
        let inside: Vec<(u32, u32)> = found.into_iter().filter(|&(a, b)| a > lead && b < end).collect();
        let boundary = |(a, b): &(u32, u32)| {
            t[..t.len() - 1]
                .iter()
                .any(|seg| (a.saturating_sub(100)..=b + 100).contains(&(lead + seg.2 - from)))
        };
        let (sentence, mid): (Vec<_>, Vec<_>) = inside.into_iter().partition(boundary);
        let words: Vec<&str> = t.iter().map(|seg| seg.3.as_str()).collect();
        out.push(Clip {
            name: format!(
                "pyannote_sample {} {:.2}-{:.2}s \"{}\"",
                t[0].0,
                from as f64 / 1000.0,
                to as f64 / 1000.0,
                words.join(" ")
            ),
            kind: Kind::Conversation,
            samples: x,
            pauses: mid,
            sentence_pauses: sentence,
            speech_end: end,
        });
    }
    out
}

/// A recording's turn and which of its pauses come after a complete sentence.
struct Labels {
    name: &'static str,
    /// The stretch taken as one turn, ms: from before the first word to the end of the last.
    speech_ms: (u32, u32),
    /// Pauses [`pauses_of`] finds inside that stretch.
    pauses: usize,
    /// Starts (ms, as [`pauses_of`] finds them) of the pauses after a complete sentence; every
    /// other pause inside the turn is mid-sentence.
    sentence_ends: &'static [u32],
}

/// Made once from the text of each stretch between the pauses [`pauses_of`] finds, transcribed
/// with moonshine-voice 0.0.49's bundled tiny-en model (PyPI; `transcribe_without_streaming`
/// on each stretch +-100 ms), and checked against the passages:
/// - beckett: "Ever tried. Ever failed. | No matter. Try again. | Fail again. Fail better.":
///   both pauses after a sentence; "better" ends at 8.92 s, then -44 to -50 dBFS of breath
///   to the file's end, which the earshot VAD does not take for speech either.
/// - two_cities: "It was the best of times, | it was the worst of times, | it was the age of
///   wisdom, | ... | in short, | the period was so far like the present period, | ... | for good
///   or for evil, in the superlative degree of comparison only.": one sentence, all 15 pauses
///   at commas or a dash. A click at 520-600 ms before the first word and one at 42.9-43.1 s
///   after the last (-37 dBFS, 80-240 ms; moonshine heard "You") are outside the turn.
/// - endgame_nagg_nell: a dialogue, "Do you hear me? | Yes. | Do you hear me? | Yes | We laugh
///   less heartily ... | ... | Do you remember the day I went and fetched you from that ditch?
///   | No,": every pause after a complete line.
const LABELS: &[Labels] = &[
    Labels {
        name: "beckett.wav",
        speech_ms: (0, 8920),
        pauses: 2,
        sentence_ends: &[3240, 5560],
    },
    Labels {
        name: "two_cities.wav",
        speech_ms: (1000, 41640),
        pauses: 15,
        sentence_ends: &[],
    },
    Labels {
        name: "endgame_nagg_nell.wav",
        speech_ms: (0, 28280),
        pauses: 13,
        sentence_ends: &[
            900, 1820, 3280, 4200, 8040, 11280, 14000, 16960, 18800, 19780, 21900, 23120, 27400,
        ],
    },
];

struct Outcome {
    pauses: usize,
    cut_ins: usize,
    sentence_pauses: usize,
    /// Sentence-end pauses inside the recording taken as the end of the turn.
    sentence_ends_taken: usize,
    /// Ends decided before the end of the turn at no labelled pause: in a pause shorter than
    /// the labels' 250 ms, or where the labels hear speech and the VAD does not (quiet words).
    other_early: usize,
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
    independent: bool,
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
    // Audio before the onset, as call.rs keeps it (`vad.pre_roll_ms`).
    let mut pre_roll: std::collections::VecDeque<i16> = std::collections::VecDeque::new();
    let pre_roll_max = (vad_cfg.pre_roll_ms * RATE / 1000) as usize;
    // After a cut-in, in `independent` runs: the caller's utterance carries on.
    let mut carry = false;
    // Verdicts due at an audio time (ms): (due, pause, probability).
    let mut due: Vec<(u32, u64, f32)> = Vec::new();
    let mut decisions: Vec<u32> = Vec::new();
    for (i, f) in clip.samples.chunks(FRAME).enumerate() {
        let now = (i as u32 + 1) * 20;
        let mut actions = Vec::new();
        match vad.push(f, RATE) {
            VadEvent::SpeechStart { .. } => {
                if !std::mem::take(&mut carry) {
                    utter.clear();
                    utter.extend(pre_roll.drain(..));
                }
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
            VadEvent::None if carry => utter.extend_from_slice(f),
            VadEvent::None => {
                pre_roll.extend(f.iter().copied());
                let extra = pre_roll.len().saturating_sub(pre_roll_max);
                pre_roll.drain(..extra);
            }
        }
        let ready: Vec<_> = due.iter().filter(|d| d.0 <= now).cloned().collect();
        due.retain(|d| d.0 > now);
        for (_, pause, p) in ready {
            if std::env::var_os("TURN_PRINT_VERDICTS").is_some() && independent {
                println!(
                    "   verdict {}: {:.3} at {now} ms ({:+} ms from the end of the turn)",
                    clip.name,
                    p,
                    now as i64 - clip.speech_end as i64
                );
            }
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
                    due.clear();
                    policy.on(Event::Final { text: String::new() });
                    if independent && now < clip.speech_end {
                        // Judge the next pause as if this one had not been taken: the utterance
                        // (and the model's context) carries on from the turn's start.
                        carry = true;
                        if vad.in_speech() {
                            policy.on(Event::SpeechStart);
                        }
                    } else {
                        vad.end_now();
                        utter.clear();
                    }
                }
                _ => {}
            }
        }
    }
    let taken = |pauses: &[(u32, u32)]| {
        pauses
            .iter()
            .filter(|(a, b)| decisions.iter().any(|&d| d > *a && d <= *b + 20))
            .count()
    };
    let delay_ms = decisions
        .iter()
        .find(|&&d| d >= clip.speech_end)
        .map(|&d| d - clip.speech_end);
    let labelled = |d: u32| {
        clip.pauses
            .iter()
            .chain(&clip.sentence_pauses)
            .any(|&(a, b)| d > a && d <= b + 20)
    };
    Outcome {
        pauses: clip.pauses.len(),
        cut_ins: taken(&clip.pauses),
        sentence_pauses: clip.sentence_pauses.len(),
        sentence_ends_taken: taken(&clip.sentence_pauses),
        other_early: decisions
            .iter()
            .filter(|&&d| d < clip.speech_end && !labelled(d))
            .count(),
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
    if std::env::var_os("TURN_PRINT_PAUSES").is_some() {
        for c in clips.iter().filter(|c| c.kind != Kind::Joined) {
            let f = |v: &[(u32, u32)]| v.iter().map(|(a, b)| format!("{a}-{b}")).collect::<Vec<_>>().join(" ");
            println!(
                "pauses {} (speech ends {} ms): mid-sentence [{}], after a sentence [{}]",
                c.name,
                c.speech_end,
                f(&c.pauses),
                f(&c.sentence_pauses)
            );
        }
    }
    let vad_cfg = VadConfig::default();
    println!(
        "endpointing on {} clips (VAD: {})",
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
        .unwrap_or(vec![0.5, 0.7, 0.85, 0.95]);
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
        "cut-ins: each mid-sentence pause judged as if no earlier pause had been taken; \"cascading\": \
         a pause taken ends the utterance, so the next pause is judged on the words since"
    );
    let turns = |k: Kind| clips.iter().filter(|c| c.kind == k).count();
    println!(
        "turn ends: {} joined (espeak-ng), {} readings, {} conversation turns (real speech: \"real\" below)",
        turns(Kind::Joined),
        turns(Kind::Reading),
        turns(Kind::Conversation)
    );
    println!(
        "{:<22} {:>15} {:>15} {:>15} {:>11} {:>15} {:>10} {:>10} {:>15} {:>7}",
        "mode",
        "cut-ins joined",
        "cut-ins real",
        "sentence ends",
        "other early",
        "cascading",
        "delay p50",
        "delay p95",
        "real p50/p95",
        "no end"
    );
    for (name, tc) in &modes {
        let mut infer = Vec::new();
        let (mut pj, mut cj, mut pr, mut cr, mut ps, mut cs, mut early) = (0, 0, 0, 0, 0, 0, 0);
        let mut delays = Vec::new();
        let mut real_delays = Vec::new();
        let mut missed = 0;
        let mut cascading = 0;
        for c in &clips {
            let model = (tc.mode == TurnMode::Smart).then_some(&model);
            let o = run(c, tc, &vad_cfg, model, &mut infer, silero.as_ref(), true);
            cascading += run(c, tc, &vad_cfg, model, &mut Vec::new(), silero.as_ref(), false).cut_ins;
            early += o.other_early;
            if c.kind == Kind::Joined {
                pj += o.pauses;
                cj += o.cut_ins;
            } else {
                pr += o.pauses;
                cr += o.cut_ins;
                ps += o.sentence_pauses;
                cs += o.sentence_ends_taken;
            }
            match o.delay_ms {
                Some(d) => {
                    delays.push(d);
                    if c.kind != Kind::Joined {
                        real_delays.push(d);
                    }
                }
                None => missed += 1,
            }
            if std::env::var_os("VERBOSE").is_some() {
                println!(
                    "   {name} {}: {} of {} mid-sentence pauses cut, {} of {} sentence ends taken, {} other early ends, delay {:?}",
                    c.name, o.cut_ins, o.pauses, o.sentence_ends_taken, o.sentence_pauses, o.other_early, o.delay_ms
                );
            }
        }
        let share = |c: usize, p: usize| format!("{c}/{p} ({:.1}%)", 100.0 * c as f64 / p.max(1) as f64);
        println!(
            "{:<22} {:>15} {:>15} {:>15} {:>11} {:>15} {:>7} ms {:>7} ms {:>15} {:>7}",
            name,
            share(cj, pj),
            share(cr, pr),
            share(cs, ps),
            early,
            share(cascading, pj + pr),
            pct(&delays, 0.5),
            pct(&delays, 0.95),
            format!("{} / {} ms", pct(&real_delays, 0.5), pct(&real_delays, 0.95)),
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
