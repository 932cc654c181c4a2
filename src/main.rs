//! Entry point of the `asterisk-voice-agent` binary: parses the command line and runs a
//! subcommand (see [`asterisk_voice_agent::cli`]).

fn main() -> std::process::ExitCode {
    asterisk_voice_agent::cli::main()
}
