// Build script: tells the linker where libvosk is (it ships only in the `vosk` PyPI wheel,
// unpacked by scripts/install-deps.sh) and links libsonic, which espeak-ng (inside piper-rs)
// needs. The binary gets rpaths to $ORIGIN, the packaged library folder and the dev folder,
// so it runs from target/, from the .deb and from the Docker image without LD_LIBRARY_PATH.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=AVA_LIB_DIR");
    println!("cargo:rerun-if-env-changed=AVA_HOME");
    let lib_dir = env::var_os("AVA_LIB_DIR")
        .map(PathBuf::from)
        .or_else(|| env::var_os("AVA_HOME").map(|h| PathBuf::from(h).join("lib")))
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/asterisk-voice-agent/lib")))
        .expect("set AVA_LIB_DIR to the folder holding libvosk.so");
    if !lib_dir.join("libvosk.so").exists() {
        println!(
            "cargo:warning=libvosk.so not found in {}: run ./scripts/install-deps.sh (or set AVA_LIB_DIR)",
            lib_dir.display()
        );
    }
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=vosk");
    println!("cargo:rustc-link-lib=sonic");
    for rpath in ["$ORIGIN", "/usr/lib/asterisk-voice-agent"] {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{rpath}");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
}
