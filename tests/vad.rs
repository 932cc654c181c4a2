//! The voice activity detector on real audio: the shared 8 kHz test utterances (espeak-ng,
//! 0.25 s of silence at each end), the same at 16 kHz, in odd frame sizes, through G.711 mu-law
//! and 30 dB quieter; and sounds that are not speech (a burst of white noise, a synthesized cough,
//! silence). Expected times come from the audio itself (its first and last loud 5 ms), never from
//! recorded results.

#[path = "common/mod.rs"]
mod common;

use asterisk_voice_agent::audio::{resample_all, rms_dbfs, ulaw_to_linear};
use asterisk_voice_agent::config::VadConfig;
use asterisk_voice_agent::vad::{EndReason, Vad, VadEvent};

const UTTERANCES: [&str; 5] = [
    "book_appointment.8k.wav",
    "opening_hours.8k.wav",
    "transfer_human.8k.wav",
    "phone_number.8k.wav",
    "confirm_yes.8k.wav",
];

/// Onset must be reported this soon after the true start (barge-in budget: onset + a 20 ms
/// tick within 150 ms).
const MAX_ONSET_DELAY_MS: i64 = 130;

/// The utterances present (the shared folder, else the bundled copies).
fn utterances() -> Vec<(String, u32, Vec<i16>)> {
    let list: Vec<_> = UTTERANCES
        .iter()
        .map(|n| (n, common::audio(n)))
        .filter(|(_, p)| p.is_file())
        .map(|(n, p)| {
            let (rate, s) = common::read_wav(&p);
            (n.to_string(), rate, s)
        })
        .collect();
    assert!(list.len() >= 2, "test utterances missing");
    list
}

/// Feeds `samples` in frames of the given lengths (cycled), then 2 s of silence; returns each
/// event with the time (ms) at the end of the frame that produced it.
fn feed(cfg: &VadConfig, samples: &[i16], rate: u32, lens: &[usize]) -> Vec<(i64, VadEvent)> {
    let mut v = Vad::new(cfg);
    let mut padded = samples.to_vec();
    padded.extend(std::iter::repeat_n(0i16, rate as usize * 2));
    let mut out = Vec::new();
    let mut pos = 0;
    for len in lens.iter().cycle() {
        if pos >= padded.len() {
            break;
        }
        let end = (pos + len).min(padded.len());
        let e = v.push(&padded[pos..end], rate);
        pos = end;
        if e != VadEvent::None {
            out.push(((pos as u64 * 1000 / rate as u64) as i64, e));
        }
    }
    assert!(!v.in_speech(), "still in speech after 2 s of silence: {out:?}");
    out
}

/// True speech span (ms): first and last 5 ms whose RMS is within 45 dB of the loudest.
fn speech_span(samples: &[i16], rate: u32) -> (i64, i64) {
    let w = (rate / 200) as usize;
    let levels: Vec<f32> = samples.chunks(w).map(rms_dbfs).collect();
    let top = levels.iter().cloned().fold(-120.0f32, f32::max);
    let a = levels.iter().position(|&l| l > top - 45.0).unwrap() as i64 * 5;
    let b = (levels.iter().rposition(|&l| l > top - 45.0).unwrap() as i64 + 1) * 5;
    (a, b)
}

/// Asserts one utterance: a SpeechStart soon after the true start and an Endpoint
/// `end_silence_ms` after the true end. Returns (start, end) times.
fn assert_one_utterance(what: &str, cfg: &VadConfig, events: &[(i64, VadEvent)], span: (i64, i64)) -> (i64, i64) {
    assert_one_utterance_within(what, cfg, events, span, MAX_ONSET_DELAY_MS)
}

fn assert_one_utterance_within(
    what: &str,
    cfg: &VadConfig,
    events: &[(i64, VadEvent)],
    span: (i64, i64),
    max_onset_delay_ms: i64,
) -> (i64, i64) {
    let starts: Vec<_> = events
        .iter()
        .filter(|(_, e)| matches!(e, VadEvent::SpeechStart { .. }))
        .collect();
    let ends: Vec<_> = events
        .iter()
        .filter(|(_, e)| matches!(e, VadEvent::SpeechEnd(_)))
        .collect();
    assert_eq!(starts.len(), 1, "{what}: {events:?} (speech {span:?})");
    assert_eq!(ends.len(), 1, "{what}: {events:?} (speech {span:?})");
    assert_eq!(ends[0].1, VadEvent::SpeechEnd(EndReason::Endpoint), "{what}");
    let (t_start, t_end) = (starts[0].0, ends[0].0);
    let onset_delay = t_start - span.0;
    assert!(
        (0..=max_onset_delay_ms).contains(&onset_delay),
        "{what}: onset reported {onset_delay} ms after the true start ({events:?}, speech {span:?})"
    );
    if let VadEvent::SpeechStart { onset_ms } = starts[0].1 {
        assert!(
            (cfg.min_speech_ms as i64..=onset_delay + 40).contains(&(onset_ms as i64)),
            "{what}: onset_ms {onset_ms}, reported {onset_delay} ms after the true start"
        );
    }
    let end_delay = t_end - span.1;
    let want = cfg.end_silence_ms as i64;
    assert!(
        (want - 20..=want + 100).contains(&end_delay),
        "{what}: endpoint {end_delay} ms after the true end, want about {want} ({events:?}, speech {span:?})"
    );
    (t_start, t_end)
}

/// G.711 mu-law encoding (ITU-T G.711), to test decoded mu-law input.
fn linear_to_ulaw(s: i16) -> u8 {
    const BIAS: i32 = 0x84;
    let mut v = s as i32;
    let sign = if v < 0 {
        v = -v;
        0x80
    } else {
        0
    };
    v = (v.min(32635)) + BIAS;
    let exp = (31 - (v as u32).leading_zeros() as i32 - 7).clamp(0, 7);
    let mant = (v >> (exp + 3)) & 0x0f;
    !(sign | (exp << 4) | mant) as u8
}

/// Deterministic white noise in [-1, 1].
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// Scales `x` to an RMS of `dbfs` and converts to samples.
fn at_level(x: &[f32], dbfs: f32) -> Vec<i16> {
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
    let g = 10f32.powf(dbfs / 20.0) * 32768.0 / rms;
    x.iter().map(|v| (v * g).clamp(-32768.0, 32767.0) as i16).collect()
}

/// `pre` ms of silence, the sound, 1 s of silence.
fn surround(sound: &[i16], rate: u32) -> Vec<i16> {
    let mut s = vec![0i16; rate as usize / 2];
    s.extend_from_slice(sound);
    s.extend(std::iter::repeat_n(0i16, rate as usize));
    s
}

/// Median RMS level (dBFS) of the loud part of the utterances: "a level like speech".
fn speech_level() -> f32 {
    let mut levels: Vec<f32> = utterances()
        .iter()
        .flat_map(|(_, rate, s)| s.chunks((rate / 50) as usize).map(rms_dbfs).collect::<Vec<_>>())
        .filter(|l| *l > -60.0)
        .collect();
    levels.sort_by(f32::total_cmp);
    levels[levels.len() / 2]
}

#[test]
fn each_utterance_is_one_utterance_at_8k() {
    let cfg = VadConfig::default();
    for (name, rate, s) in utterances() {
        assert_eq!(rate, 8000);
        let ev = feed(&cfg, &s, rate, &[160]);
        assert_one_utterance(&name, &cfg, &ev, speech_span(&s, rate));
    }
}

#[test]
fn other_end_silence_settings_are_followed() {
    for end_silence_ms in [300, 900] {
        let cfg = VadConfig {
            end_silence_ms,
            ..Default::default()
        };
        let (name, rate, s) = utterances().remove(0);
        let ev = feed(&cfg, &s, rate, &[160]);
        assert_one_utterance(
            &format!("{name} end_silence_ms {end_silence_ms}"),
            &cfg,
            &ev,
            speech_span(&s, rate),
        );
    }
}

#[test]
fn sixteen_khz_works_like_eight() {
    let cfg = VadConfig::default();
    for (name, rate, s) in utterances() {
        let at8 = assert_one_utterance(&name, &cfg, &feed(&cfg, &s, rate, &[160]), speech_span(&s, rate));
        let s16 = resample_all(&s, rate, 16000).unwrap();
        let ev = feed(&cfg, &s16, 16000, &[320]);
        let at16 = assert_one_utterance(&format!("{name} at 16 kHz"), &cfg, &ev, speech_span(&s16, 16000));
        assert!(
            (at8.0 - at16.0).abs() <= 40 && (at8.1 - at16.1).abs() <= 40,
            "{name}: 8 kHz {at8:?}, 16 kHz {at16:?}"
        );
    }
}

#[test]
fn odd_frame_sizes_work() {
    let cfg = VadConfig::default();
    // 72..448-byte frames (36..224 samples) as at the end of a playback, and some stranger ones
    let lens = [160, 36, 224, 160, 97, 1, 160, 200, 160, 3];
    for (name, rate, s) in utterances() {
        let ev = feed(&cfg, &s, rate, &lens);
        assert_one_utterance(&format!("{name} in odd frames"), &cfg, &ev, speech_span(&s, rate));
        let s16 = resample_all(&s, rate, 16000).unwrap();
        let lens16: Vec<usize> = lens.iter().map(|l| l * 2 + 1).collect();
        let ev = feed(&cfg, &s16, 16000, &lens16);
        assert_one_utterance(
            &format!("{name} at 16 kHz in odd frames"),
            &cfg,
            &ev,
            speech_span(&s16, 16000),
        );
    }
}

#[test]
fn mulaw_decoded_audio_works() {
    let cfg = VadConfig::default();
    for (name, rate, s) in utterances() {
        let decoded: Vec<i16> = s.iter().map(|&x| ulaw_to_linear(linear_to_ulaw(x))).collect();
        let ev = feed(&cfg, &decoded, rate, &[160]);
        assert_one_utterance(&format!("{name} through mu-law"), &cfg, &ev, speech_span(&s, rate));
    }
}

#[test]
fn quiet_caller_at_minus_30_db_is_detected() {
    let cfg = VadConfig::default();
    let g = 10f32.powf(-30.0 / 20.0);
    for (name, rate, s) in utterances() {
        let quiet: Vec<i16> = s.iter().map(|&x| (x as f32 * g).round() as i16).collect();
        let ev = feed(&cfg, &quiet, rate, &[160]);
        // the span of the original, whose faint first consonant is now under -70 dBFS: 150 ms
        assert_one_utterance_within(&format!("{name} at -30 dB"), &cfg, &ev, speech_span(&s, rate), 150);
    }
}

#[test]
fn white_noise_burst_is_not_an_utterance() {
    let cfg = VadConfig::default();
    let level = speech_level();
    for seed in 1..=5 {
        let burst = at_level(&noise(8000 * 300 / 1000, seed), level);
        let ev = feed(&cfg, &surround(&burst, 8000), 8000, &[160]);
        assert!(
            ev.is_empty(),
            "300 ms of white noise at {level:.1} dBFS must not start an utterance: {ev:?}"
        );
    }
}

#[test]
fn cough_is_not_an_utterance() {
    let cfg = VadConfig::default();
    let level = speech_level();
    for seed in 1..=5 {
        // 250 ms of noise, low-passed (two one-pole filters at about 1 kHz), with a 5 ms attack
        // and a 50 ms exponential decay
        let n = 8000 * 250 / 1000;
        let mut x = noise(n, seed);
        let a = (-2.0 * std::f32::consts::PI * 1000.0 / 8000.0).exp();
        for _ in 0..2 {
            let mut y = 0.0;
            for v in x.iter_mut() {
                y = (1.0 - a) * *v + a * y;
                *v = y;
            }
        }
        for (i, v) in x.iter_mut().enumerate() {
            let t = i as f32 / 8000.0;
            *v *= (t / 0.005).min(1.0) * (-(t - 0.005).max(0.0) / 0.05).exp();
        }
        // RMS over the 250 ms at the speech median (its attack is louder)
        let cough = at_level(&x, level);
        let ev = feed(&cfg, &surround(&cough, 8000), 8000, &[160]);
        // no vowel in it: no SpeechStart at all (so no barge-in pause either)
        assert!(ev.is_empty(), "a cough must not start an utterance: {ev:?}");
    }
}

#[test]
fn silence_produces_nothing() {
    let cfg = VadConfig::default();
    for rate in [8000u32, 16000] {
        let zeros = vec![0i16; rate as usize * 5];
        assert!(feed(&cfg, &zeros, rate, &[(rate / 50) as usize]).is_empty());
        // line hiss at -75 dBFS
        let hiss = at_level(&noise(rate as usize * 5, 7), -75.0);
        assert!(feed(&cfg, &hiss, rate, &[(rate / 50) as usize]).is_empty());
    }
}
