//! Finding and loading the native libraries at run time: ONNX Runtime (loaded by path, for
//! Piper) and libvosk (linked into the binary; we only report where it was loaded from).

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// File name of the ONNX Runtime shared library.
pub const ORT_FILE: &str = "libonnxruntime.so.1";

/// The places searched for ONNX Runtime, in order (after an explicit path).
pub fn onnxruntime_candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        c.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        c.push(dir.join(ORT_FILE));
    }
    c.push(PathBuf::from("/usr/lib/asterisk-voice-agent").join(ORT_FILE));
    if let Some(h) = std::env::var_os("AVA_HOME") {
        c.push(PathBuf::from(h).join("lib").join(ORT_FILE));
    }
    if let Some(h) = std::env::var_os("HOME") {
        c.push(PathBuf::from(h).join(".cache/asterisk-voice-agent/lib").join(ORT_FILE));
    }
    c
}

/// Finds `libonnxruntime.so.1`: the explicit path (`[models] onnxruntime`) if given (it
/// must exist), else `ORT_DYLIB_PATH`, beside the binary, `/usr/lib/asterisk-voice-agent/`,
/// `$AVA_HOME/lib/`, `~/.cache/asterisk-voice-agent/lib/`. The error lists every place tried.
/// (ort rc.12 hangs on a missing path, so call this before the first ort call.)
pub fn find_onnxruntime(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!(
            "ONNX Runtime not found at {} ([models] onnxruntime in the config): fix the path, or remove it to search the default places",
            p.display()
        );
    }
    let cands = onnxruntime_candidates();
    if let Some(p) = cands.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    bail!(
        "ONNX Runtime ({ORT_FILE}) not found; tried: {}. Install the package, run scripts/install-deps.sh, or set \
         [models] onnxruntime / ORT_DYLIB_PATH",
        cands
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// dlopens ONNX Runtime and checks it exports `OrtGetApiBase`.
pub fn check_onnxruntime_loads(path: &Path) -> Result<()> {
    // SAFETY: loading a shared library runs its initializers; ONNX Runtime's are benign.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", path.display()))?;
    // SAFETY: only the symbol's presence is checked; it is never called.
    let sym: Result<libloading::Symbol<unsafe extern "C" fn() -> *const std::ffi::c_void>, _> =
        unsafe { lib.get(b"OrtGetApiBase\0") };
    if let Err(e) = sym {
        bail!(
            "{} loads but is not ONNX Runtime (no OrtGetApiBase): {e}",
            path.display()
        );
    }
    Ok(())
}

/// Where libvosk was loaded from (it is linked into the binary), read from /proc/self/maps.
pub fn libvosk_path() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("libvosk"))
        .map(PathBuf::from)
}
