//! Finding the native libraries loaded at run time (ONNX Runtime).
use anyhow::{anyhow, Result};
use std::path::{Path, PathBuf};

/// Finds `libonnxruntime.so.1`: the config's path, `ORT_DYLIB_PATH`, beside the binary,
/// `/usr/lib/asterisk-voice-agent/`, then `~/.cache/asterisk-voice-agent/lib/`.
pub fn find_onnxruntime(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut c: Vec<PathBuf> = explicit.map(Path::to_path_buf).into_iter().collect();
    if explicit.is_none() {
        c.extend(std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from));
        c.extend(std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("libonnxruntime.so.1"))));
        c.push(PathBuf::from("/usr/lib/asterisk-voice-agent/libonnxruntime.so.1"));
        c.extend(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/asterisk-voice-agent/lib/libonnxruntime.so.1")));
    }
    c.iter().find(|p| p.is_file()).cloned().ok_or_else(|| anyhow!("ONNX Runtime (libonnxruntime.so.1) not found in {c:?}: install the package or run scripts/install-deps.sh"))
}
