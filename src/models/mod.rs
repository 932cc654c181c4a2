//! The model registry (`registry.json`), hardware tiers, `model-setup` and `doctor`.
//! (Being built for issue 3; `serve` reads explicit paths from the config until then.)

use std::process::ExitCode;

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
