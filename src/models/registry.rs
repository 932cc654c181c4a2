//! The model registry: the typed form of `registry.json` (models, their sources and hashes,
//! hardware tiers), its loading and its consistency checks. Schema: docs/registry.md.

use super::ModelKind;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The registry shipped inside the binary (the repo's `registry.json` at build time).
pub const BUILTIN: &str = include_str!("../../registry.json");

/// The schema version this build reads.
pub const SCHEMA_VERSION: u32 = 1;

/// The whole registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Schema version (see docs/registry.md); this build reads [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Content version, bumped whenever a model, hash or tier changes.
    pub registry_version: u32,
    /// Free text for humans.
    #[serde(default)]
    pub about: String,
    /// Every model any tier may name.
    pub models: Vec<Model>,
    /// Hardware tiers, smallest first.
    pub tiers: Vec<Tier>,
}

/// One installable model (a Vosk folder, a GGUF file, or a Piper voice).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Unique id; also the folder name under the models dir.
    pub id: String,
    /// stt, llm or tts.
    pub kind: ModelKind,
    /// Language code (`en`, `de`, `ko`), or `multi` for a multilingual LLM.
    pub language: String,
    /// The model's license as its authors state it (or `unknown: ...`).
    pub license: String,
    /// Sample rate of the audio the model takes (STT) or makes (TTS), in Hz; null for an LLM.
    pub sample_rate_hz: Option<u32>,
    /// Total size on disk once installed, in bytes; null when not recorded.
    pub size_bytes: Option<u64>,
    /// What `serve` loads, relative to the model folder: empty for the folder itself (Vosk),
    /// else a file (the `.gguf`, or the Piper `.onnx` with its `.onnx.json` beside it).
    pub entry: String,
    /// Where the files come from.
    pub source: Source,
    /// Files that land on disk (paths relative to the model folder). For an archive source,
    /// files found in the archive but not listed here are installed too, with their hash
    /// computed and recorded in the manifest.
    pub files: Vec<FileSpec>,
    /// Free text: provenance of the hashes, caveats.
    #[serde(default)]
    pub notes: String,
}

/// One file of a model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Path relative to the model folder, `/`-separated.
    pub path: String,
    /// Size in bytes; null when not recorded.
    pub size_bytes: Option<u64>,
    /// Lower-case hex sha256; null when not recorded (never guessed).
    pub sha256: Option<String>,
}

/// Where a model's files come from: exactly one of the two.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// Each file of `files` is downloaded from a Hugging Face repo at `{subfolder}/{path}`.
    Hf(HfFolder),
    /// One archive, downloaded then extracted.
    Archive(ArchiveSource),
}

/// A folder of a Hugging Face model repo.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HfFolder {
    /// `org/name`.
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// Folder in the repo ("" for the root).
    #[serde(default)]
    pub subfolder: String,
}

/// A single file in a Hugging Face model repo.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HfFile {
    /// `org/name`.
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// Path of the file in the repo.
    pub path: String,
}

/// Archive formats.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveFormat {
    /// A zip file (a Python wheel is one).
    Zip,
    /// A gzip-compressed tar file.
    #[serde(rename = "tar.gz")]
    TarGz,
}

/// An archive source. At least one of `hf` and `url`; `hf` is preferred when both are given.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSource {
    /// The archive as a file of a Hugging Face repo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf: Option<HfFile>,
    /// The archive's plain http(s) URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// zip or tar.gz.
    pub format: ArchiveFormat,
    /// Archive size in bytes; null when not recorded.
    pub size_bytes: Option<u64>,
    /// Archive sha256; null when not recorded.
    pub sha256: Option<String>,
    /// Only entries under this prefix are extracted, with the prefix removed.
    #[serde(default)]
    pub strip_prefix: String,
    /// Extract only the files listed in the model's `files` (e.g. one file out of a wheel).
    #[serde(default)]
    pub only_listed: bool,
}

/// What a tier needs from the machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Least total RAM, in MiB.
    pub min_ram_mib: u64,
    /// Least physical CPU cores.
    pub min_physical_cores: usize,
    /// The CPU must have AVX2 (llama.cpp is built with -mavx2).
    pub avx2: bool,
    /// A GPU hint only (not checked): null when none is useful.
    pub gpu: Option<String>,
}

/// llama.cpp settings for a tier.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LlmSettings {
    /// llama.cpp threads per call, generating tokens.
    pub threads: i32,
    /// llama.cpp threads per call evaluating prompts (the caller's words); absent: `threads`.
    /// A small model generates fastest on one thread (its per-token work is too small to pay
    /// for the threads' barriers), while a prompt batch splits well (benches/llm_sched.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_threads: Option<i32>,
    /// Context size per call, in tokens.
    pub context: u32,
    /// issue 10: simultaneous calls the tier sustains on its minimum hardware (measured with
    /// benches/calls.rs; null when not measured). The default of `server.max_calls` for an
    /// install of this tier (else 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_calls: Option<u32>,
}

/// Models for one language of a tier.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LanguageModels {
    /// STT model id.
    pub stt: String,
    /// LLM model id.
    pub llm: String,
    /// TTS model id.
    pub tts: String,
    /// VAD model id (Silero VAD); empty (absent) in a registry without one.
    #[serde(default)]
    pub vad: String,
    /// End-of-turn model id (Smart Turn); empty (absent) in a registry without one.
    #[serde(default)]
    pub turn: String,
}

impl LanguageModels {
    /// The model id for `kind`.
    pub fn id(&self, kind: ModelKind) -> &str {
        match kind {
            ModelKind::Stt => &self.stt,
            ModelKind::Llm => &self.llm,
            ModelKind::Tts => &self.tts,
            ModelKind::Vad => &self.vad,
            ModelKind::Turn => &self.turn,
        }
    }
}

/// Expected performance of a tier. Figures come from our own benchmark only; when
/// `measured` is false every figure is null.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expected {
    /// Median voice-to-voice latency (end of caller speech to first agent audio), in ms.
    pub voice_to_voice_ms_p50: Option<u32>,
    /// Simultaneous calls the tier sustains at that latency.
    pub concurrent_calls: Option<u32>,
    /// Whether the figures were measured.
    pub measured: bool,
    /// Which benchmark run produced them (file or commit), when measured.
    pub benchmark: Option<String>,
}

/// A hardware tier.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Tier name (`tiny`, `light`, ...).
    pub name: String,
    /// Whether `--tier auto` may pick it.
    pub auto: bool,
    /// What it needs.
    pub requires: Requirements,
    /// llama.cpp settings.
    pub llm: LlmSettings,
    /// Model ids per language code.
    pub languages: BTreeMap<String, LanguageModels>,
    /// Expected performance.
    pub expected: Expected,
    /// Free text.
    #[serde(default)]
    pub notes: String,
}

impl Registry {
    /// The registry built into the binary.
    pub fn builtin() -> Result<Registry> {
        Registry::parse(BUILTIN).context("the built-in registry.json is invalid")
    }

    /// Reads and checks a registry file.
    pub fn load(path: &Path) -> Result<Registry> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read registry {}", path.display()))?;
        Registry::parse(&text).with_context(|| format!("invalid registry {}", path.display()))
    }

    /// Parses and checks registry JSON.
    pub fn parse(text: &str) -> Result<Registry> {
        let reg: Registry = serde_json::from_str(text)?;
        reg.validate()?;
        Ok(reg)
    }

    /// The model with this id.
    pub fn model(&self, id: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.id == id)
    }

    /// The tier with this name.
    pub fn tier(&self, name: &str) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.name == name)
    }

    fn validate(&self) -> Result<()> {
        if self.schema_version != SCHEMA_VERSION {
            bail!(
                "schema_version {} is not supported (this build reads {})",
                self.schema_version,
                SCHEMA_VERSION
            );
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.models {
            if !seen.insert(m.id.as_str()) {
                bail!("model id {} appears twice", m.id);
            }
            if m.id.is_empty() || m.id.contains('/') || m.id.starts_with('.') {
                bail!("model id {:?} is not a plain folder name", m.id);
            }
            for f in &m.files {
                check_rel_path(&f.path).with_context(|| format!("model {}", m.id))?;
                if let Some(h) = &f.sha256 {
                    check_sha(h).with_context(|| format!("model {} file {}", m.id, f.path))?;
                }
            }
            match &m.source {
                Source::Hf(_) if m.files.is_empty() => {
                    bail!("model {}: an hf source needs its files listed", m.id)
                }
                Source::Archive(a) => {
                    if a.hf.is_none() && a.url.is_none() {
                        bail!("model {}: archive source needs hf or url", m.id);
                    }
                    if let Some(h) = &a.sha256 {
                        check_sha(h).with_context(|| format!("model {} archive", m.id))?;
                    }
                }
                _ => {}
            }
            if !m.entry.is_empty() && !m.files.iter().any(|f| f.path == m.entry) {
                bail!("model {}: entry {} is not among its files", m.id, m.entry);
            }
        }
        for t in &self.tiers {
            for (lang, lm) in &t.languages {
                for kind in ModelKind::ALL {
                    let id = lm.id(kind);
                    if id.is_empty() && matches!(kind, ModelKind::Vad | ModelKind::Turn) {
                        continue; // optional kinds
                    }
                    match self.model(id) {
                        None => bail!("tier {} language {}: unknown {} model {}", t.name, lang, kind, id),
                        Some(m) if m.kind != kind => {
                            bail!(
                                "tier {} language {}: model {} is {} but is named as {}",
                                t.name,
                                lang,
                                id,
                                m.kind,
                                kind
                            )
                        }
                        _ => {}
                    }
                }
            }
            if t.expected.measured != (t.expected.benchmark.is_some()) {
                bail!("tier {}: measured figures must name their benchmark", t.name);
            }
            if !t.expected.measured
                && (t.expected.voice_to_voice_ms_p50.is_some() || t.expected.concurrent_calls.is_some())
            {
                bail!("tier {}: figures given but not measured", t.name);
            }
        }
        Ok(())
    }
}

impl Model {
    /// True when every byte that is downloaded has a recorded sha256 (the archive for an
    /// archive source, every file for an hf source), so the install can be verified.
    pub fn is_verifiable(&self) -> bool {
        match &self.source {
            Source::Hf(_) => self.files.iter().all(|f| f.sha256.is_some()),
            Source::Archive(a) => a.sha256.is_some(),
        }
    }
}

fn check_sha(h: &str) -> Result<()> {
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        bail!("sha256 {h:?} is not 64 lower-case hex digits");
    }
    Ok(())
}

/// Checks that a registry path is relative, `/`-separated, with no `..` or empty parts.
pub fn check_rel_path(p: &str) -> Result<()> {
    if p.is_empty() || p.starts_with('/') || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        bail!("path {p:?} must be relative with no '.', '..' or empty parts");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_is_valid_and_complete() {
        let r = Registry::builtin().unwrap();
        for name in ["tiny", "light", "medium", "heavy", "test"] {
            assert!(r.tier(name).is_some(), "tier {name} missing");
        }
        for name in ["tiny", "light", "medium", "heavy"] {
            assert!(
                r.tier(name).unwrap().languages.len() >= 2,
                "tier {name} needs a second language"
            );
        }
        let tiny = &r.tier("tiny").unwrap().languages["en"];
        assert_eq!(tiny.llm, "smollm2-135m-instruct-q4_1");
        // The test tier must be installable and verifiable from the wheels.
        for kind in ModelKind::ALL {
            let m = r.model(r.tier("test").unwrap().languages["ko"].id(kind)).unwrap();
            assert!(m.is_verifiable(), "{} must have its hashes", m.id);
        }
    }

    #[test]
    fn rejects_bad_hashes_and_paths() {
        let mut v: serde_json::Value = serde_json::from_str(BUILTIN).unwrap();
        v["models"][0]["files"][0]["sha256"] = "ABC".into();
        let e = format!("{:#}", Registry::parse(&v.to_string()).unwrap_err());
        assert!(e.contains("64 lower-case hex"), "{e}");
        let mut v: serde_json::Value = serde_json::from_str(BUILTIN).unwrap();
        v["models"][0]["files"][0]["path"] = "../x".into();
        assert!(Registry::parse(&v.to_string()).is_err());
        let mut v: serde_json::Value = serde_json::from_str(BUILTIN).unwrap();
        v["tiers"][1]["expected"]["concurrent_calls"] = 4.into();
        let e = format!("{:#}", Registry::parse(&v.to_string()).unwrap_err());
        assert!(e.contains("not measured"), "{e}");
    }
}
