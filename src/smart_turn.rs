//! End-of-turn detection with Pipecat's Smart Turn v3.2 (BSD-2; an int8 ONNX classifier on
//! Whisper-tiny's encoder): given the caller's last <= 8 s of audio, the probability that their
//! turn is finished. This module owns the model session (one, shared by all calls) and its
//! Whisper log-mel front end ([`log_mel`]). It does no I/O beyond loading the file; the
//! decision of when to ask and what to do with the answer is `turn.rs`'s.
//!
//! Inputs and outputs, as Pipecat's `local_smart_turn_v3.py` and `_whisper_features.py`
//! (pipecat-ai 1.14.0) call the model: input `input_features`, f32 `[1, 80, 800]` (80 mel bins x
//! 800 frames of 10 ms = the last 8 s at 16 kHz, zero-padded at the front when shorter); output
//! `[1, 1]` f32, a sigmoid probability that the turn is complete.

use crate::audio::resample_all;
use anyhow::{Context, Result};
use realfft::RealFftPlanner;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The model's sample rate (Hz).
pub const RATE_HZ: u32 = 16_000;
/// Seconds of audio the model hears (the last ones).
pub const WINDOW_S: usize = 8;
/// Samples the model hears: 8 s at 16 kHz.
pub const WINDOW_SAMPLES: usize = RATE_HZ as usize * WINDOW_S;
/// Mel bins.
pub const N_MELS: usize = 80;
/// Feature frames (10 ms hop over 8 s).
pub const N_FRAMES: usize = 800;
/// FFT length = 25 ms window at 16 kHz.
const N_FFT: usize = 400;
/// 10 ms hop at 16 kHz.
const HOP: usize = 160;

/// Whisper's mel filterbank (Slaney mel scale, Slaney area normalization, 0..8 kHz) as
/// `[N_MELS][N_FFT / 2 + 1]` weights, the same construction as transformers'
/// `audio_utils.mel_filter_bank(norm="slaney", mel_scale="slaney")`.
fn mel_filters() -> Vec<Vec<f64>> {
    fn hz_to_mel(f: f64) -> f64 {
        if f >= 1000.0 {
            15.0 + (f / 1000.0).ln() * 27.0 / 6.4f64.ln()
        } else {
            3.0 * f / 200.0
        }
    }
    fn mel_to_hz(m: f64) -> f64 {
        if m >= 15.0 {
            1000.0 * (6.4f64.ln() / 27.0 * (m - 15.0)).exp()
        } else {
            200.0 * m / 3.0
        }
    }
    let bins = N_FFT / 2 + 1;
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(RATE_HZ as f64 / 2.0));
    let pts: Vec<f64> = (0..N_MELS + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (N_MELS + 1) as f64))
        .collect();
    let fft_hz: Vec<f64> = (0..bins)
        .map(|k| (RATE_HZ / 2) as f64 * k as f64 / (bins - 1) as f64)
        .collect();
    (0..N_MELS)
        .map(|m| {
            let norm = 2.0 / (pts[m + 2] - pts[m]);
            fft_hz
                .iter()
                .map(|&f| {
                    let down = (f - pts[m]) / (pts[m + 1] - pts[m]);
                    let up = (pts[m + 2] - f) / (pts[m + 2] - pts[m + 1]);
                    down.min(up).max(0.0) * norm
                })
                .collect()
        })
        .collect()
}

/// Whisper log-mel features of 16 kHz audio, as the model expects them: the input is cut to its
/// last 8 s or zero-padded at the front to 8 s, normalized to zero mean and unit variance,
/// framed with a periodic 400-sample (25 ms) Hann window every 160 samples (10 ms) over a
/// reflect-padded signal, power spectrum -> 80 Slaney mel bins -> log10 (floor 1e-10), the last
/// frame dropped, clamped to 8 below the maximum and mapped by (x + 4) / 4.
///
/// `audio` is in [-1, 1]. Returns `N_MELS * N_FRAMES` values, mel-major (`[mel][frame]`).
pub fn log_mel(audio: &[f32]) -> Vec<f32> {
    thread_local! {
        static FILTERS: Vec<Vec<f64>> = mel_filters();
    }
    // Last 8 s, zero-padded at the front.
    let mut x = vec![0f32; WINDOW_SAMPLES];
    let take = audio.len().min(WINDOW_SAMPLES);
    x[WINDOW_SAMPLES - take..].copy_from_slice(&audio[audio.len() - take..]);
    // Zero mean, unit variance (in f32, as the reference does).
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let sd = (var + 1e-7).sqrt();
    let x: Vec<f64> = x.iter().map(|v| ((v - mean) / sd) as f64).collect();
    // Reflect padding of N_FFT / 2 on each side.
    let pad = N_FFT / 2;
    let len = x.len();
    let padded: Vec<f64> = (0..len + 2 * pad)
        .map(|i| {
            let j = i as isize - pad as isize;
            let j = if j < 0 {
                -j
            } else if j >= len as isize {
                2 * (len as isize - 1) - j
            } else {
                j
            };
            x[j as usize]
        })
        .collect();
    let window: Vec<f64> = (0..N_FFT)
        .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64).cos())
        .collect();
    let mut planner = RealFftPlanner::<f64>::new();
    let fft = planner.plan_fft_forward(N_FFT);
    let mut input = fft.make_input_vec();
    let mut spectrum = fft.make_output_vec();
    let mut scratch = fft.make_scratch_vec();
    let mut out = vec![0f32; N_MELS * N_FRAMES];
    let mut power = vec![0f64; N_FFT / 2 + 1];
    let mut max = f32::MIN;
    FILTERS.with(|filters| {
        for t in 0..N_FRAMES {
            let start = t * HOP;
            for (i, v) in input.iter_mut().enumerate() {
                *v = padded[start + i] * window[i];
            }
            fft.process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .expect("buffer lengths come from the plan");
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.norm_sqr();
            }
            for (m, f) in filters.iter().enumerate() {
                let e: f64 = f.iter().zip(&power).map(|(w, p)| w * p).sum();
                let v = e.max(1e-10).log10() as f32;
                max = max.max(v);
                out[m * N_FRAMES + t] = v;
            }
        }
    });
    for v in &mut out {
        *v = (v.max(max - 8.0) + 4.0) / 4.0;
    }
    out
}

/// ONNX Runtime threads for one inference: `AVA_TURN_THREADS`, default 1 (the verdicts of
/// several calls then run side by side instead of fighting for the same cores).
fn intra_threads() -> usize {
    std::env::var("AVA_TURN_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// A verdict of the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Probability (0..1) that the caller's turn is complete.
    pub probability: f32,
    /// Time the features and the inference took (ms).
    pub ms: f32,
    /// Of which the log-mel features (ms).
    pub features_ms: f32,
}

/// The loaded Smart Turn model, shared by all calls (behind a mutex: one inference at a time,
/// each ~tens of ms). Call [`SmartTurn::predict`] off the async runtime (`spawn_blocking`).
pub struct SmartTurn {
    session: Mutex<ort::session::Session>,
    /// The `.onnx` file.
    pub path: PathBuf,
}

impl SmartTurn {
    /// Loads `smart-turn-v3.2-cpu.onnx` at `onnx` with ONNX Runtime from `onnxruntime`, and runs
    /// one inference on silence to prove it works.
    ///
    /// # Errors
    /// If a file is missing, ONNX Runtime cannot be loaded, or the model does not load or run.
    pub fn load(onnx: &Path, onnxruntime: &Path) -> Result<SmartTurn> {
        let session = crate::onnx::session(onnx, onnxruntime, intra_threads(), "the turn model")?;
        let st = SmartTurn {
            session: Mutex::new(session),
            path: onnx.to_path_buf(),
        };
        st.predict(&[0i16; 1600], 8000).context("test inference failed")?;
        Ok(st)
    }

    /// The probability that the turn is over, given the caller's audio so far (`samples` at
    /// `rate_hz`, any rate; only the last 8 s count). Blocking: tens of ms of CPU.
    ///
    /// # Errors
    /// If resampling or inference fails.
    pub fn predict(&self, samples: &[i16], rate_hz: u32) -> Result<Verdict> {
        let t = Instant::now();
        // Resample only the last 8 s (plus a little for the filter).
        let keep = (rate_hz as usize * WINDOW_S + rate_hz as usize / 10).min(samples.len());
        let tail = &samples[samples.len() - keep..];
        let pcm = if rate_hz == RATE_HZ {
            tail.to_vec()
        } else {
            resample_all(tail, rate_hz, RATE_HZ)?
        };
        let audio: Vec<f32> = pcm.iter().map(|&s| s as f32 / 32768.0).collect();
        let feats = log_mel(&audio);
        let features_ms = t.elapsed().as_secs_f32() * 1000.0;
        let input = ort::value::Tensor::from_array(([1usize, N_MELS, N_FRAMES], feats))?;
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let outputs = session.run(ort::inputs!["input_features" => input])?;
        let (_, p) = outputs[0].try_extract_tensor::<f32>()?;
        let probability = *p.first().context("the turn model returned no value")?;
        Ok(Verdict {
            probability,
            ms: t.elapsed().as_secs_f32() * 1000.0,
            features_ms,
        })
    }
}

/// Runs [`SmartTurn::predict`] on a blocking thread (never the async runtime's).
pub async fn predict_async(model: Arc<SmartTurn>, samples: Vec<i16>, rate_hz: u32) -> Result<Verdict> {
    tokio::task::spawn_blocking(move || model.predict(&samples, rate_hz))
        .await
        .context("the turn model task panicked")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filterbank_shape_and_area() {
        let f = mel_filters();
        assert_eq!(f.len(), N_MELS);
        assert!(f.iter().all(|r| r.len() == N_FFT / 2 + 1));
        // every filter has some weight, none negative
        assert!(f
            .iter()
            .all(|r| r.iter().any(|&w| w > 0.0) && r.iter().all(|&w| w >= 0.0)));
    }

    #[test]
    fn features_of_silence_are_flat() {
        let m = log_mel(&[0.0; 16000]);
        assert_eq!(m.len(), N_MELS * N_FRAMES);
        // all at the floor: log10(1e-10) = -10 -> (-10 + 4) / 4
        assert!(m.iter().all(|&v| (v - (-1.5)).abs() < 1e-6), "{:?}", &m[..4]);
    }

    /// The features match a reference computed once with Pipecat's numpy front end
    /// (tests/fixtures/smart_turn_features.json says how).
    #[test]
    fn features_match_the_reference() {
        let r: serde_json::Value =
            serde_json::from_str(include_str!("../tests/fixtures/smart_turn_features.json")).unwrap();
        let wav = hound::WavReader::open(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/opening_hours.8k.wav"
        ))
        .unwrap();
        let audio: Vec<f32> = wav.into_samples::<i16>().map(|s| s.unwrap() as f32 / 32768.0).collect();
        let m = log_mel(&audio);
        let mut worst = 0f32;
        let frames = r["frames"].as_array().unwrap();
        for (i, t) in frames.iter().enumerate() {
            let t = t.as_u64().unwrap() as usize;
            for (mel, v) in r["values"][i].as_array().unwrap().iter().enumerate() {
                worst = worst.max((m[mel * N_FRAMES + t] - v.as_f64().unwrap() as f32).abs());
            }
        }
        for (mel, v) in r["first_frame"].as_array().unwrap().iter().enumerate() {
            worst = worst.max((m[mel * N_FRAMES] - v.as_f64().unwrap() as f32).abs());
        }
        assert!(worst < 2e-3, "largest difference from the reference: {worst}");
    }
}
