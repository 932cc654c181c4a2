//! The model registry (`registry.json`), hardware tiers, `model-setup` and `doctor`.
//! (Being built for issue 3 on its own branch; this is the interface the call path uses.)

use std::process::ExitCode;

pub mod manifest;
pub mod native;

/// The kind of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Speech-to-text (Vosk).
    Stt,
    /// Language model (GGUF).
    Llm,
    /// Text-to-speech (Piper).
    Tts,
}

/// Arguments of `model-setup`.
#[derive(Debug, clap::Args)]
pub struct ModelSetupArgs {}

/// Arguments of `doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {}

/// Runs `model-setup`.
pub fn setup_main(_args: ModelSetupArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("model-setup is not built yet (issue 3)")
}

/// Runs `doctor`.
pub fn doctor_main(_args: DoctorArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("doctor is not built yet (issue 3)")
}
