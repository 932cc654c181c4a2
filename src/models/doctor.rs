//! `doctor`: checks the manifest and every model file (exists, size, sha256 on request), that
//! the tier fits this machine, that libvosk and ONNX Runtime load, and that the AudioSocket
//! port is free. Each failure says what to run.

use super::hardware::{fit, Hardware};
use super::manifest::{self, Manifest};
use super::native;
use super::registry::{Expected, Tier};
use super::ModelKind;
use crate::config::Config;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    /// The models dir checked.
    pub models_dir: PathBuf,
    /// The installed tier (if the manifest loads).
    pub tier: Option<String>,
    /// Every check.
    pub checks: Vec<Check>,
    /// True when every check passed.
    pub ok: bool,
}

fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok: true,
        detail: detail.into(),
        fix: None,
    }
}

fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok: false,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// Runs every check.
pub fn run(cfg: &Config, models_dir: &Path, verify_hashes: bool) -> DoctorReport {
    let mut checks = Vec::new();
    let reinstall = format!(
        "run `asterisk-voice-agent model-setup --force --models-dir {}`",
        models_dir.display()
    );
    let man = match manifest::load(models_dir) {
        Ok(m) => {
            checks.push(pass(
                "manifest",
                format!(
                    "{} (tier {}, {})",
                    models_dir.join(manifest::FILE_NAME).display(),
                    m.tier,
                    m.language
                ),
            ));
            Some(m)
        }
        Err(e) => {
            checks.push(fail(
                "manifest",
                format!("{e:#}"),
                format!(
                    "run `asterisk-voice-agent model-setup --models-dir {}`",
                    models_dir.display()
                ),
            ));
            None
        }
    };
    if let Some(m) = &man {
        check_models(m, cfg, verify_hashes, &reinstall, &mut checks);
        match Hardware::detect() {
            Ok(hw) => {
                let t = Tier {
                    name: m.tier.clone(),
                    auto: false,
                    requires: m.requires.clone(),
                    llm: m.llm.clone(),
                    languages: Default::default(),
                    expected: Expected {
                        voice_to_voice_ms_p50: None,
                        concurrent_calls: None,
                        measured: false,
                        benchmark: None,
                    },
                    notes: String::new(),
                };
                let f = fit(&t, &hw);
                if f.fits {
                    checks.push(pass("hardware", format!("tier {} fits: {}", t.name, hw.describe())));
                } else if !hw.avx2 && t.requires.avx2 {
                    checks.push(fail(
                        "hardware",
                        format!("this CPU has no AVX2 ({})", hw.describe()),
                        "llama.cpp in this build needs AVX2: use a machine with AVX2",
                    ));
                } else {
                    checks.push(fail(
                        "hardware",
                        format!("tier {} needs {}", t.name, f.missing.join(", ")),
                        "run `asterisk-voice-agent model-setup --tier auto --force` to install the tier that fits",
                    ));
                }
            }
            Err(e) => checks.push(fail("hardware", format!("{e:#}"), "report this as a bug")),
        }
    }
    // Explicit overrides in the config.
    for (kind, p) in [
        (ModelKind::Stt, &cfg.models.stt),
        (ModelKind::Llm, &cfg.models.llm),
        (ModelKind::Tts, &cfg.models.tts),
        (ModelKind::Vad, &cfg.models.vad),
        (ModelKind::Turn, &cfg.models.turn),
    ] {
        if let Some(p) = p {
            if p.exists() {
                checks.push(pass(format!("{kind} override"), p.display().to_string()));
            } else {
                checks.push(fail(
                    format!("{kind} override"),
                    format!("{} does not exist ([models] {kind} in the config)", p.display()),
                    "fix the path or remove it to use the manifest",
                ));
            }
        }
    }
    // Native libraries.
    match native::libvosk_path() {
        Some(p) => checks.push(pass("libvosk", format!("linked, loaded from {}", p.display()))),
        None => checks.push(pass("libvosk", "linked into the binary")),
    }
    match native::find_onnxruntime(cfg.models.onnxruntime.as_deref()) {
        Ok(p) => match native::check_onnxruntime_loads(&p) {
            Ok(()) => checks.push(pass("onnxruntime", format!("loads from {}", p.display()))),
            Err(e) => checks.push(fail(
                "onnxruntime",
                format!("{e:#}"),
                "reinstall ONNX Runtime (scripts/install-deps.sh or the package)",
            )),
        },
        Err(e) => checks.push(fail(
            "onnxruntime",
            format!("{e:#}"),
            "run scripts/install-deps.sh, or set [models] onnxruntime in the config",
        )),
    }
    // Listen port.
    let addr = cfg.server.audiosocket_listen;
    match std::net::TcpListener::bind(addr) {
        Ok(_) => checks.push(pass("audiosocket port", format!("{addr} is free"))),
        Err(e) => checks.push(fail(
            "audiosocket port",
            format!("cannot listen on {addr}: {e}"),
            format!("stop what holds it (`ss -ltnp 'sport = :{}'`; the service may already be running) or change [server] audiosocket_listen", addr.port()),
        )),
    }
    let ok = checks.iter().all(|c| c.ok);
    DoctorReport {
        models_dir: models_dir.to_path_buf(),
        tier: man.map(|m| m.tier),
        checks,
        ok,
    }
}

fn check_models(m: &Manifest, cfg: &Config, verify: bool, reinstall: &str, checks: &mut Vec<Check>) {
    for kind in ModelKind::ALL {
        let overridden = match kind {
            ModelKind::Stt => cfg.models.stt.is_some(),
            // With an OpenAI-compatible server no local GGUF is needed.
            ModelKind::Llm => cfg.models.llm.is_some() || cfg.llm.backend == crate::config::LlmBackendKind::Openai,
            ModelKind::Tts => cfg.models.tts.is_some(),
            // Needed only when the config uses them (Silero VAD, Smart Turn).
            ModelKind::Vad => cfg.models.vad.is_some() || cfg.vad.engine != crate::config::VadEngine::Silero,
            ModelKind::Turn => cfg.models.turn.is_some() || cfg.turn.mode != crate::config::TurnMode::Smart,
        };
        let Some(im) = m.models.get(&kind) else {
            if !overridden {
                checks.push(fail(format!("{kind} model"), "not in the manifest", reinstall));
            }
            continue;
        };
        let base = m.model_dir(im);
        let mut problems = Vec::new();
        for f in &im.files {
            let p = base.join(&f.path);
            match std::fs::metadata(&p) {
                Err(_) => problems.push(format!("{} is missing", p.display())),
                Ok(md) if md.len() != f.size_bytes => problems.push(format!(
                    "{} has {} bytes, expected {}",
                    p.display(),
                    md.len(),
                    f.size_bytes
                )),
                Ok(_) if verify => match super::fetch::sha256_file(&p, false) {
                    Ok(h) if h == f.sha256 => {}
                    Ok(h) => problems.push(format!("{} is corrupt: sha256 {h}, expected {}", p.display(), f.sha256)),
                    Err(e) => problems.push(format!("{e:#}")),
                },
                Ok(_) => {}
            }
        }
        let entry = m.path_for(kind).expect("in manifest");
        if !entry.exists() && problems.is_empty() {
            problems.push(format!("{} is missing", entry.display()));
        }
        let what = format!(
            "{} files{}",
            im.files.len(),
            if verify { ", sha256 checked" } else { ", sizes checked" }
        );
        if problems.is_empty() {
            checks.push(pass(
                format!("{kind} model"),
                format!("{} at {} ({what})", im.id, entry.display()),
            ));
        } else {
            checks.push(fail(
                format!("{kind} model"),
                format!("{}: {}", im.id, problems.join("; ")),
                reinstall,
            ));
        }
    }
}
