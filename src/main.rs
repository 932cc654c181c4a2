//! Entry point of the `asterisk-voice-agent` binary: parses the command line and runs a
//! subcommand (see [`asterisk_voice_agent::cli`]).

fn main() -> std::process::ExitCode {
    // llama.cpp's OpenMP threads spin-wait between parallel regions by default, taking CPU
    // from the threads that pace calls' audio. Must be set before OpenMP starts.
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        std::env::set_var("OMP_WAIT_POLICY", "PASSIVE");
    }
    asterisk_voice_agent::cli::main()
}
