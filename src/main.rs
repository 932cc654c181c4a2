//! Entry point of the `asterisk-voice-agent` binary: parses the command line and runs a
//! subcommand (see [`asterisk_voice_agent::cli`]).

/// jemalloc is the process's allocator: Rust's allocations through `#[global_allocator]`, and
/// (feature `override_allocator_on_supported_platforms`) the C and C++ engines' `malloc`/`free`
/// too, since the binary then defines and exports them. Measured in the 30-minute soak (README):
/// glibc's per-thread arenas kept the freed Vosk recognizers' lookahead caches as RSS, so RSS
/// climbed about 0.5 MiB per call; jemalloc returns freed pages to the kernel after
/// `dirty_decay_ms` (10 s by default; the admin can tune it with `MALLOC_CONF`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// Keeps jemalloc's unprefixed `malloc` & co. in the link even where no Rust code names them.
use tikv_jemalloc_sys as _;

/// jemalloc's compiled-in options: [`asterisk_voice_agent::JEMALLOC_CONF`] (its docs say why).
#[allow(non_upper_case_globals)]
#[export_name = "malloc_conf"]
static malloc_conf: &[u8; 21] = asterisk_voice_agent::JEMALLOC_CONF;

fn main() -> std::process::ExitCode {
    passive_openmp();
    asterisk_voice_agent::cli::main()
}

/// llama.cpp's OpenMP threads spin-wait at every barrier by default (libgomp's
/// `OMP_WAIT_POLICY` unset = spin ~300k iterations). On a small PBX host the cores are shared
/// with the calls' STT and TTS threads, and a spinning thread whose peer was preempted burns
/// its time slice: measured here (2 cores, one call with a barge-in and a keypad utterance),
/// 21 reply tokens took 5.0-6.5 s with spinning and 1.5-2.8 s with `PASSIVE`.
///
/// libgomp reads the variable in its load-time constructor, before `main`, so setting it here
/// only takes effect in a fresh image: the process re-executes itself once (same pid, same
/// arguments) with `OMP_WAIT_POLICY=PASSIVE`. An admin's own value is left alone, and if the
/// exec fails the process goes on as it is.
fn passive_openmp() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut args = std::env::args_os();
    let Some(arg0) = args.next() else { return };
    let err = std::process::Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .exec();
    eprintln!(
        "warning: could not re-execute with OMP_WAIT_POLICY=PASSIVE ({err}); going on with OpenMP's spinning threads"
    );
}
