//! The model registry (`registry.json`), hardware tiers, `model-setup` and `doctor`.
//! [`registry`] types the registry, [`hardware`] picks a tier, [`fetch`] + [`archive`] get
//! files, [`install`] puts them in place, [`manifest`] records what `serve` loads,
//! [`native`] finds ONNX Runtime, [`doctor`] checks an install.

pub mod archive;
pub mod doctor;
pub mod fetch;
pub mod hardware;
pub mod install;
pub mod manifest;
pub mod native;
pub mod registry;

pub use manifest::Manifest;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::ExitCode;

/// The kinds of model a call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Speech to text (a Vosk model folder).
    Stt,
    /// The language model (a GGUF file for llama.cpp).
    Llm,
    /// Text to speech (a Piper voice: `.onnx` + `.onnx.json`).
    Tts,
    /// Voice activity detection (Silero VAD, one `.onnx`; issue 8).
    Vad,
    /// End-of-turn detection (Smart Turn, one `.onnx`; issue 8).
    Turn,
}

impl ModelKind {
    /// All kinds, in call order.
    pub const ALL: [ModelKind; 5] = [
        ModelKind::Stt,
        ModelKind::Llm,
        ModelKind::Tts,
        ModelKind::Vad,
        ModelKind::Turn,
    ];
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Stt => "stt",
            ModelKind::Llm => "llm",
            ModelKind::Tts => "tts",
            ModelKind::Vad => "vad",
            ModelKind::Turn => "turn",
        })
    }
}

/// Default models dir (also `[models] dir`'s default).
pub const DEFAULT_MODELS_DIR: &str = "/var/lib/asterisk-voice-agent/models";

/// Arguments of `model-setup`.
#[derive(Debug, clap::Args)]
pub struct ModelSetupArgs {
    /// `auto` (pick the largest tier this machine fits) or a tier name from the registry.
    #[arg(long, default_value = "auto")]
    pub tier: String,
    /// Language code (`en`, `de`; the `test` tier has `ko`).
    #[arg(long, default_value = "en")]
    pub language: String,
    /// Where to install; `serve` reads `<DIR>/manifest.json`.
    #[arg(long, default_value = DEFAULT_MODELS_DIR)]
    pub models_dir: PathBuf,
    /// A mirror of the sources: a folder (USB stick) or an http(s) base URL (LAN host).
    /// Layout: docs/registry.md "Mirrors".
    #[arg(long, value_name = "DIR_OR_URL")]
    pub from: Option<String>,
    /// Print what would be installed and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Reinstall even models that are installed and intact.
    #[arg(long)]
    pub force: bool,
    /// Install models the registry has no sha256 for, recording the hashes computed now.
    #[arg(long)]
    pub allow_unverified: bool,
    /// Print the result as JSON on stdout (no progress bars).
    #[arg(long)]
    pub json: bool,
    /// Use this registry file instead of the one built into the binary.
    #[arg(long, value_name = "FILE")]
    pub registry: Option<PathBuf>,
    /// Pretend the machine has these figures: `RAM_MIB,PHYSICAL_CORES,AVX2(0|1)` (what-if).
    #[arg(long, value_name = "RAM_MIB,CORES,AVX2", hide = true)]
    pub assume_hardware: Option<String>,
}

/// Arguments of `doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// The service's TOML configuration (listen address, models dir, overrides).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Models dir to check (default: `[models] dir` of the config).
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Also check every file's sha256 (reads every byte).
    #[arg(long)]
    pub verify_hashes: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_hw(s: &str) -> anyhow::Result<hardware::Hardware> {
    let p: Vec<&str> = s.split(',').map(str::trim).collect();
    anyhow::ensure!(p.len() == 3, "--assume-hardware wants RAM_MIB,CORES,AVX2");
    let cores: usize = p[1].parse()?;
    Ok(hardware::Hardware {
        ram_mib: p[0].parse()?,
        physical_cores: cores,
        logical_cpus: cores,
        cpu_brand: "assumed".into(),
        avx2: p[2] == "1",
        avx512: false,
    })
}

/// Runs `model-setup`.
pub fn setup_main(args: ModelSetupArgs) -> anyhow::Result<ExitCode> {
    let reg = match &args.registry {
        Some(p) => registry::Registry::load(p)?,
        None => registry::Registry::builtin()?,
    };
    let opts = install::SetupOptions {
        tier: args.tier,
        language: args.language,
        models_dir: args.models_dir,
        from: args.from,
        dry_run: args.dry_run,
        force: args.force,
        allow_unverified: args.allow_unverified,
        show_progress: !args.json,
        hardware: args.assume_hardware.as_deref().map(parse_hw).transpose()?,
    };
    let report = install::setup(&reg, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `doctor`: exit status 1 when any check fails.
pub fn doctor_main(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let cfg = match &args.config {
        Some(p) => crate::config::Config::load(p)?,
        None => crate::config::Config::default(),
    };
    let dir = args.models_dir.clone().unwrap_or_else(|| cfg.models.dir.clone());
    let report = doctor::run(&cfg, &dir, args.verify_hashes);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if let Some(t) = &report.tier {
            println!("tier: {t}");
        }
        for c in &report.checks {
            println!("[{}] {}: {}", if c.ok { " ok " } else { "FAIL" }, c.name, c.detail);
            if let Some(f) = &c.fix {
                println!("       fix: {f}");
            }
        }
        let failed = report.checks.iter().filter(|c| !c.ok).count();
        println!(
            "{}",
            if failed == 0 {
                "all checks passed".to_string()
            } else {
                format!("{failed} check(s) failed")
            }
        );
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
