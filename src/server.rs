//! (in progress)
pub async fn run(_cfg: crate::config::Config) -> anyhow::Result<()> { anyhow::bail!("not yet") }
