//! The install manifest (`<models-dir>/manifest.json`): what `model-setup` installed (tier,
//! language, model ids, paths, hashes, llama.cpp settings). `serve` and `doctor` read it.

use super::registry::{LlmSettings, Requirements};
use super::ModelKind;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// File name of the manifest inside the models dir.
pub const FILE_NAME: &str = "manifest.json";

/// The manifest's schema version.
pub const MANIFEST_VERSION: u32 = 1;

/// What `model-setup` installed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Schema version of this file ([`MANIFEST_VERSION`]).
    pub manifest_version: u32,
    /// `registry_version` of the registry it was installed from.
    pub registry_version: u32,
    /// Tier name.
    pub tier: String,
    /// Language code.
    pub language: String,
    /// llama.cpp settings of the tier.
    pub llm: LlmSettings,
    /// What the tier needs from the machine (checked by `doctor`).
    pub requires: Requirements,
    /// When it was written (RFC 3339, UTC).
    pub installed_at: String,
    /// The installed models by kind.
    pub models: BTreeMap<ModelKind, InstalledModel>,
    /// The models dir the manifest was read from (not stored).
    #[serde(skip)]
    pub dir: PathBuf,
}

/// How an installed model's hashes were established.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verification {
    /// Every file matched a sha256 recorded in the registry, or came out of an archive whose
    /// sha256 matched.
    Registry,
    /// Installed with `--allow-unverified`: the hashes were computed at install and only
    /// guard against later corruption.
    Recorded,
}

/// One installed model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstalledModel {
    /// Registry id.
    pub id: String,
    /// Model folder, relative to the models dir.
    pub dir: String,
    /// What `serve` loads, relative to the model folder ("" = the folder).
    pub entry: String,
    /// Sample rate in Hz (speech models).
    pub sample_rate_hz: Option<u32>,
    /// How the hashes were established.
    pub verification: Verification,
    /// Every file, with size (bytes) and sha256 as installed.
    pub files: Vec<InstalledFile>,
}

/// One installed file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstalledFile {
    /// Path relative to the model folder.
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
}

/// Reads `<models_dir>/manifest.json`. The error names the file and says to run
/// `asterisk-voice-agent model-setup`.
pub fn load(models_dir: &Path) -> Result<Manifest> {
    let path = models_dir.join(FILE_NAME);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read the model manifest {}: run `asterisk-voice-agent model-setup --models-dir {}` to install the models",
            path.display(),
            models_dir.display()
        )
    })?;
    let mut m: Manifest = serde_json::from_str(&text).with_context(|| {
        format!(
            "the model manifest {} is invalid: run `asterisk-voice-agent model-setup --force --models-dir {}`",
            path.display(),
            models_dir.display()
        )
    })?;
    anyhow::ensure!(
        m.manifest_version == MANIFEST_VERSION,
        "the model manifest {} has version {} but this build reads {}: run `asterisk-voice-agent model-setup --models-dir {}`",
        path.display(),
        m.manifest_version,
        MANIFEST_VERSION,
        models_dir.display()
    );
    m.dir = models_dir.to_path_buf();
    Ok(m)
}

impl Manifest {
    /// What `serve` loads for `kind`: the Vosk model folder (stt), the `.gguf` file (llm), the
    /// Piper `.onnx` file with its `.onnx.json` beside it (tts). None if not installed.
    pub fn path_for(&self, kind: ModelKind) -> Option<PathBuf> {
        let m = self.models.get(&kind)?;
        Some(self.model_dir(m).join(&m.entry))
    }

    /// Absolute folder of an installed model.
    pub fn model_dir(&self, m: &InstalledModel) -> PathBuf {
        self.dir.join(&m.dir)
    }

    /// The tier name.
    pub fn tier(&self) -> &str {
        &self.tier
    }

    /// llama.cpp threads per call for the tier.
    pub fn llm_threads(&self) -> Option<i32> {
        Some(self.llm.threads)
    }

    /// llama.cpp threads per call evaluating prompts for the tier (None: as generating).
    pub fn llm_batch_threads(&self) -> Option<i32> {
        self.llm.batch_threads
    }

    /// issue 10: the tier's measured simultaneous calls (the default `server.max_calls`).
    pub fn max_calls(&self) -> Option<u32> {
        self.llm.max_calls
    }

    /// llama.cpp context size per call, in tokens, for the tier.
    pub fn llm_context(&self) -> Option<u32> {
        Some(self.llm.context)
    }

    /// Writes the manifest atomically (temp file + rename) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot write in the models dir {}", dir.display()))?;
        serde_json::to_writer_pretty(&mut tmp, self)?;
        use std::io::Write;
        tmp.write_all(b"\n")?;
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
        tmp.as_file().sync_all()?;
        let path = dir.join(FILE_NAME);
        tmp.persist(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}
