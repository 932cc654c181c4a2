//! The manifest `model-setup` writes and `serve` reads (interface only until issue 3 lands).
use super::ModelKind;
use std::path::{Path, PathBuf};

/// What is installed.
pub struct Manifest;

impl Manifest {
    /// The installed path of the model of `kind`.
    pub fn path_for(&self, _kind: ModelKind) -> Option<PathBuf> {
        None
    }
}

/// Reads `<models_dir>/manifest.json`.
pub fn load(models_dir: &Path) -> anyhow::Result<Manifest> {
    anyhow::bail!("no manifest in {}: run `asterisk-voice-agent model-setup`", models_dir.display())
}
