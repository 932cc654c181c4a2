//! ONNX Runtime sessions for the small models run through `ort` (Silero VAD, Smart Turn):
//! the library loaded once from the admin's `libonnxruntime.so.1`, each model's file checked
//! and loaded with a bounded thread count.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Loads the model file `onnx` with ONNX Runtime from `onnxruntime` (the shared library), all
/// graph optimizations on, `intra_threads` threads inside an operator and one between them.
/// `what` names the model in errors ("the VAD model").
///
/// # Errors
/// If either file is missing, ONNX Runtime cannot be loaded from `onnxruntime`, or the model
/// does not load; the message names the file.
pub fn session(onnx: &Path, onnxruntime: &Path, intra_threads: usize, what: &str) -> Result<ort::session::Session> {
    for f in [onnx, onnxruntime] {
        if !f.is_file() {
            bail!("{} is missing", f.display());
        }
    }
    ort::init_from(onnxruntime)
        .with_context(|| format!("cannot load ONNX Runtime from {}", onnxruntime.display()))?
        .commit();
    ort::session::Session::builder()
        .and_then(|b| {
            b.with_optimization_level(ort::session::builder::GraphOptimizationLevel::Level3)
                .map_err(Into::into)
        })
        .and_then(|b| b.with_intra_threads(intra_threads).map_err(Into::into))
        .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
        .and_then(|mut b| b.commit_from_file(onnx))
        .with_context(|| format!("ONNX Runtime could not load {what} {}", onnx.display()))
}
