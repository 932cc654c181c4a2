//! Silero VAD (MIT; snakers4/silero-vad, the ONNX file shipped in the pipecat-ai wheel) through
//! ONNX Runtime: one loaded model shared by all calls ([`SileroModel`]) and one recurrent state
//! per call ([`SileroStream`]). It runs natively on 8 kHz audio (256-sample = 32 ms windows) and
//! 16 kHz audio (512 samples); other rates are resampled to 16 kHz. `vad.rs` uses its speech
//! probability in place of earshot's score when `vad.engine = "silero"`.
//!
//! The model's inputs and outputs, as Pipecat's `pipecat/audio/vad/silero.py` (pipecat-ai
//! 1.14.0) calls it: `input` f32 `[1, context + window]` (the window preceded by the last 32
//! samples at 8 kHz / 64 at 16 kHz of the previous one, in [-1, 1]), `state` f32 `[2, 1, 128]`,
//! `sr` i64 scalar; outputs `output` `[1, 1]` (speech probability) and `stateN` `[2, 1, 128]`.

use crate::audio::StreamResampler;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Length of the recurrent state (2 x 1 x 128).
const STATE_LEN: usize = 2 * 128;

/// The loaded Silero VAD model, shared by every call. One window costs a fraction of a
/// millisecond, so it runs inline on the call's task (measured: `benches/vad_tuning.rs`).
pub struct SileroModel {
    session: Mutex<ort::session::Session>,
    /// The `.onnx` file.
    pub path: PathBuf,
}

impl std::fmt::Debug for SileroModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SileroModel").field("path", &self.path).finish()
    }
}

impl SileroModel {
    /// Loads `silero_vad.onnx` at `onnx` with ONNX Runtime from `onnxruntime` and runs one
    /// window to prove it works.
    ///
    /// # Errors
    /// If a file is missing, ONNX Runtime cannot be loaded, or the model does not load or run.
    pub fn load(onnx: &Path, onnxruntime: &Path) -> Result<SileroModel> {
        let session = crate::onnx::session(onnx, onnxruntime, 1, "the VAD model")?;
        let m = SileroModel {
            session: Mutex::new(session),
            path: onnx.to_path_buf(),
        };
        let mut state = vec![0f32; STATE_LEN];
        m.run(&[0f32; 32 + 256], 8000, &mut state)
            .context("test inference failed")?;
        Ok(m)
    }

    /// One window: `input` is context + window at `rate_hz` (8000 or 16000); `state` is
    /// updated. Returns the speech probability (0..1).
    fn run(&self, input: &[f32], rate_hz: u32, state: &mut [f32]) -> Result<f32> {
        use ort::value::Tensor;
        let x = Tensor::from_array(([1usize, input.len()], input.to_vec()))?;
        let st = Tensor::from_array(([2usize, 1, 128], state.to_vec()))?;
        let sr = Tensor::from_array(((), vec![rate_hz as i64]))?;
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let out = session.run(ort::inputs!["input" => x, "state" => st, "sr" => sr])?;
        let (_, p) = out[0].try_extract_tensor::<f32>()?;
        let p = *p.first().context("Silero returned no probability")?;
        let (_, s) = out[1].try_extract_tensor::<f32>()?;
        anyhow::ensure!(s.len() == STATE_LEN, "Silero returned a state of {} values", s.len());
        state.copy_from_slice(s);
        Ok(p)
    }
}

/// One call's Silero state: push audio at any rate, read speech probabilities per window.
pub struct SileroStream {
    model: Arc<SileroModel>,
    /// The rate the model runs at (8000 or 16000) and the input rate.
    model_rate: u32,
    in_rate: u32,
    resampler: Option<StreamResampler>,
    state: Vec<f32>,
    /// The last `context` samples of the previous window.
    context: Vec<f32>,
    pending: Vec<f32>,
    scratch: Vec<i16>,
    /// The latest probability (0 before the first window).
    last: f32,
    /// Windows since the state was last reset, and consecutive windows below 0.1.
    since_reset: u32,
    low: u32,
}

impl std::fmt::Debug for SileroStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SileroStream")
            .field("model_rate", &self.model_rate)
            .field("last", &self.last)
            .finish()
    }
}

impl SileroStream {
    /// A fresh state on the shared model.
    pub fn new(model: Arc<SileroModel>) -> SileroStream {
        SileroStream {
            model,
            model_rate: 0,
            in_rate: 0,
            resampler: None,
            state: vec![0.0; STATE_LEN],
            context: Vec::new(),
            pending: Vec::new(),
            scratch: Vec::new(),
            last: 0.0,
            since_reset: 0,
            low: 0,
        }
    }

    /// Samples per window at the model's rate (256 at 8 kHz, 512 at 16 kHz).
    fn window(&self) -> usize {
        if self.model_rate == 8000 {
            256
        } else {
            512
        }
    }

    /// Adds `samples` at `rate_hz` and runs every whole window. A change of rate starts over.
    /// Returns the latest speech probability (0..1). An inference error is logged and leaves
    /// the probability at 0 (no speech) for that window.
    pub fn push(&mut self, samples: &[i16], rate_hz: u32) -> f32 {
        if rate_hz == 0 {
            return self.last;
        }
        if rate_hz != self.in_rate {
            self.in_rate = rate_hz;
            self.model_rate = if rate_hz == 8000 { 8000 } else { 16000 };
            self.resampler = if rate_hz == 8000 || rate_hz == 16000 {
                None
            } else {
                match StreamResampler::new(rate_hz, 16000, 10) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!("Silero VAD cannot resample {rate_hz} Hz: {e:#}");
                        return self.last;
                    }
                }
            };
            self.state.iter_mut().for_each(|s| *s = 0.0);
            self.context = vec![0.0; if self.model_rate == 8000 { 32 } else { 64 }];
            self.pending.clear();
        }
        match self.resampler.as_mut() {
            Some(r) => {
                self.scratch.clear();
                r.push(samples, &mut self.scratch);
                self.pending.extend(self.scratch.iter().map(|&s| s as f32 / 32768.0));
            }
            None => self.pending.extend(samples.iter().map(|&s| s as f32 / 32768.0)),
        }
        let w = self.window();
        while self.pending.len() >= w {
            let mut input = Vec::with_capacity(self.context.len() + w);
            input.extend_from_slice(&self.context);
            input.extend_from_slice(&self.pending[..w]);
            match self.model.run(&input, self.model_rate, &mut self.state) {
                Ok(p) => self.last = p,
                Err(e) => {
                    tracing::warn!("Silero VAD inference failed: {e:#}");
                    self.last = 0.0;
                }
            }
            let c = self.context.len();
            self.context.copy_from_slice(&input[input.len() - c..]);
            self.pending.drain(..w);
            // As Pipecat does: reset the recurrent state about every 2 s, but only in clear
            // non-speech (5 windows below 0.1); long silence or noise at 8 kHz otherwise leaves
            // it deaf to the speech that follows.
            self.since_reset += 1;
            self.low = if self.last < 0.1 { self.low + 1 } else { 0 };
            if self.since_reset >= 2000 / 32 && self.low >= 5 {
                self.state.iter_mut().for_each(|s| *s = 0.0);
                self.context.iter_mut().for_each(|s| *s = 0.0);
                self.since_reset = 0;
            }
        }
        self.last
    }

    /// The latest speech probability (0..1).
    pub fn probability(&self) -> f32 {
        self.last
    }
}
