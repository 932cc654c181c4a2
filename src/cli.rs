//! The command line: one binary, `asterisk-voice-agent`, with subcommands (clap).

use crate::{config::Config, console, models, server, simulate};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Local, offline AI voice agent for Asterisk (AudioSocket + Vosk + llama.cpp + Piper).
#[derive(Debug, Parser)]
#[command(name = "asterisk-voice-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the AudioSocket server: load the models once and answer calls.
    Serve {
        /// TOML configuration file (see README "Configuration"). Without it, the defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Call an AudioSocket server like Asterisk does and report what the agent did.
    Simulate(simulate::SimulateArgs),
    /// Detect the hardware tier and install the models listed in registry.json.
    ModelSetup(models::ModelSetupArgs),
    /// Check the installed models, native libraries and listen ports.
    Doctor(models::DoctorArgs),
    /// One call through this machine's microphone and speakers (no PBX needed).
    Console(console::ConsoleArgs),
}

/// Parses the command line, sets up logging and runs the subcommand. Errors are printed with
/// their whole cause chain and give exit status 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The console's screen is the transcript: its service log stays at warnings unless asked.
    init_tracing(if matches!(cli.command, Command::Console(_)) {
        "warn"
    } else {
        "info,ort=warn"
    });
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Simulate(args) => simulate::run(args),
        Command::ModelSetup(args) => models::setup_main(args),
        Command::Doctor(args) => models::doctor_main(args),
        Command::Console(args) => console::main(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let cfg = match &config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(server::run(cfg))?;
    Ok(ExitCode::SUCCESS)
}

fn init_tracing(default_filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // ONNX Runtime logs every graph transform at INFO: keep it to warnings unless asked.
    let filter = EnvFilter::try_from_env("AVA_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
