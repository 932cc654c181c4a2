//! (in progress)
/// Arguments of `simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {}
/// Runs `simulate`.
pub fn run(_a: SimulateArgs) -> anyhow::Result<std::process::ExitCode> { anyhow::bail!("not yet") }
