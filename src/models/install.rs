//! `model-setup`: resolves the tier and language, fetches every model (see [`super::fetch`]),
//! verifies sha256, extracts archives (see [`super::archive`]), moves each model into place
//! only once all of them are verified, and writes the manifest last.

use super::archive;
use super::fetch::{sha256_file, Fetcher, Origin, Remote};
use super::hardware::{fit, select_tier, Hardware, Selection};
use super::manifest::{self, InstalledFile, InstalledModel, Manifest, Verification, MANIFEST_VERSION};
use super::registry::{Model, Registry, Source};
use super::ModelKind;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What to install and how.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// `auto` or a tier name.
    pub tier: String,
    /// Language code.
    pub language: String,
    /// Install folder (gets `manifest.json`).
    pub models_dir: PathBuf,
    /// `--from`: a mirror folder or http(s) base URL.
    pub from: Option<String>,
    /// Only print the plan.
    pub dry_run: bool,
    /// Reinstall even what is installed.
    pub force: bool,
    /// Install models whose registry entry has no sha256, recording computed hashes.
    pub allow_unverified: bool,
    /// Show progress bars and human output on stderr.
    pub show_progress: bool,
    /// Hardware figures to use instead of reading the machine (tests, what-if).
    pub hardware: Option<Hardware>,
}

/// What happened to one model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    /// stt, llm or tts.
    pub kind: ModelKind,
    /// Registry id.
    pub id: String,
    /// What `serve` loads.
    pub path: PathBuf,
    /// `installed`, `already_installed` or `would_install` (dry run).
    pub status: String,
    /// Bytes fetched over the network in this run.
    pub downloaded_bytes: u64,
    /// Size on disk, in bytes (when known).
    pub size_bytes: Option<u64>,
    /// How its hashes were established.
    pub verification: Option<Verification>,
}

/// The outcome of `model-setup`.
#[derive(Debug, Clone, Serialize)]
pub struct SetupReport {
    /// The tier installed.
    pub tier: String,
    /// The language installed.
    pub language: String,
    /// The hardware and tier reasoning (for `--tier auto`, or the fit of a named tier).
    pub selection: Option<Selection>,
    /// The manifest written (None for a dry run).
    pub manifest: Option<PathBuf>,
    /// Per model.
    pub models: Vec<ModelReport>,
}

fn say(opts: &SetupOptions, msg: impl AsRef<str>) {
    if opts.show_progress {
        eprintln!("{}", msg.as_ref());
    }
}

/// Runs `model-setup`.
pub fn setup(reg: &Registry, opts: &SetupOptions) -> Result<SetupReport> {
    // 1. Tier.
    let hw = match &opts.hardware {
        Some(h) => h.clone(),
        None => Hardware::detect()?,
    };
    let sel = select_tier(reg, &hw);
    let tier_name = if opts.tier == "auto" {
        for r in &sel.reasons {
            say(opts, r);
        }
        sel.tier.clone().ok_or_else(|| {
            anyhow!(
                "no tier fits this machine ({}); name one with --tier to install anyway",
                sel.reasons.join("; ")
            )
        })?
    } else {
        let t = reg.tier(&opts.tier).ok_or_else(|| {
            anyhow!(
                "unknown tier {:?}; the registry has: {}",
                opts.tier,
                reg.tiers.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
            )
        })?;
        let f = fit(t, &hw);
        if !f.fits {
            say(
                opts,
                format!(
                    "warning: tier {} needs {} on this machine",
                    t.name,
                    f.missing.join(", ")
                ),
            );
        }
        t.name.clone()
    };
    let tier = reg.tier(&tier_name).expect("tier exists");
    let lm = tier.languages.get(&opts.language).ok_or_else(|| {
        anyhow!(
            "tier {} has no language {:?}; it has: {}",
            tier.name,
            opts.language,
            tier.languages.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    say(
        opts,
        format!(
            "tier {} ({}), into {}",
            tier.name,
            opts.language,
            opts.models_dir.display()
        ),
    );

    // 2. What is to do.
    let models: Vec<(ModelKind, &Model)> = ModelKind::ALL
        .iter()
        .filter(|&&k| !lm.id(k).is_empty())
        .map(|&k| (k, reg.model(lm.id(k)).expect("validated")))
        .collect();
    let unverifiable: Vec<&str> = models
        .iter()
        .filter(|(_, m)| !m.is_verifiable())
        .map(|(_, m)| m.id.as_str())
        .collect();
    if !unverifiable.is_empty() && !opts.allow_unverified {
        bail!(
            "the registry has no sha256 yet for {}: nothing was installed. Rerun with --allow-unverified to \
             install it and record the hashes computed on this first download, or choose another tier",
            unverifiable.join(", ")
        );
    }
    let dir = &opts.models_dir;
    let previous = manifest::load(dir).ok();
    let mut reports = Vec::new();
    let mut todo = Vec::new();
    for (kind, m) in &models {
        let done = !opts.force && previous.as_ref().is_some_and(|p| is_installed(p, m));
        let path = dir.join(&m.id).join(&m.entry);
        reports.push(ModelReport {
            kind: *kind,
            id: m.id.clone(),
            path,
            status: if done {
                "already_installed"
            } else if opts.dry_run {
                "would_install"
            } else {
                "installed"
            }
            .into(),
            downloaded_bytes: 0,
            size_bytes: m.size_bytes,
            verification: None,
        });
        if done {
            say(opts, format!("{:>3} {}: already installed", kind.to_string(), m.id));
        } else {
            todo.push((*kind, *m));
        }
    }
    let selection = Some(sel);
    if opts.dry_run {
        for (kind, m) in &todo {
            say(
                opts,
                format!(
                    "{:>3} {}: would install ({} bytes{})",
                    kind.to_string(),
                    m.id,
                    m.size_bytes
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "size unknown".into()),
                    if m.is_verifiable() { "" } else { ", UNVERIFIED" }
                ),
            );
        }
        return Ok(SetupReport {
            tier: tier.name.clone(),
            language: opts.language.clone(),
            selection,
            manifest: None,
            models: reports,
        });
    }

    // 3. Fetch, verify and stage everything; touch nothing installed until all are good.
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the models dir {}", dir.display()))?;
    clean_leftovers(dir);
    let fetcher = Fetcher::new(
        Origin::parse(opts.from.as_deref())?,
        dir.join(".downloads"),
        opts.show_progress,
    )?;
    let mut staged = Vec::new();
    for (kind, m) in &todo {
        say(opts, format!("{:>3} {}: fetching", kind.to_string(), m.id));
        let staging = tempfile::Builder::new()
            .prefix(&format!(".staging-{}-", m.id))
            .tempdir_in(dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        let (installed, downloaded) = stage_model(&fetcher, m, staging.path(), opts)
            .with_context(|| format!("{} model {} was not installed", kind, m.id))?;
        let r = reports.iter_mut().find(|r| r.id == m.id).expect("report");
        r.downloaded_bytes = downloaded;
        r.verification = Some(installed.verification);
        r.size_bytes = Some(installed.files.iter().map(|f| f.size_bytes).sum());
        staged.push((*kind, staging, installed));
    }

    // 4. Move into place, then write the manifest.
    let mut models_out: BTreeMap<ModelKind, InstalledModel> = BTreeMap::new();
    if let Some(p) = &previous {
        for (kind, m) in &models {
            if let Some(old) = p.models.get(kind).filter(|o| o.id == m.id) {
                models_out.insert(*kind, old.clone());
            }
        }
    }
    for (kind, staging, installed) in staged {
        let target = dir.join(&installed.dir);
        let staging = staging.keep();
        if target.exists() {
            let old = dir.join(format!(".old-{}-{}", installed.id, std::process::id()));
            std::fs::rename(&target, &old)?;
            std::fs::rename(&staging, &target)?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&staging, &target)?;
        }
        say(
            opts,
            format!(
                "{:>3} {}: installed in {}",
                kind.to_string(),
                installed.id,
                target.display()
            ),
        );
        models_out.insert(kind, installed);
    }
    let man = Manifest {
        manifest_version: MANIFEST_VERSION,
        registry_version: reg.registry_version,
        tier: tier.name.clone(),
        language: opts.language.clone(),
        llm: tier.llm.clone(),
        requires: tier.requires.clone(),
        installed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        models: models_out,
        dir: dir.clone(),
    };
    man.save(dir)?;
    let _ = std::fs::remove_dir(dir.join(".downloads"));
    let mpath = dir.join(manifest::FILE_NAME);
    say(opts, format!("manifest written: {}", mpath.display()));
    Ok(SetupReport {
        tier: tier.name.clone(),
        language: opts.language.clone(),
        selection,
        manifest: Some(mpath),
        models: reports,
    })
}

/// True when the previous manifest has this model with every file present at its recorded
/// size, and the hashes it recorded agree with the registry's.
fn is_installed(prev: &Manifest, m: &Model) -> bool {
    let Some(im) = prev.models.values().find(|im| im.id == m.id) else {
        return false;
    };
    let base = prev.model_dir(im);
    let files_ok = im
        .files
        .iter()
        .all(|f| std::fs::metadata(base.join(&f.path)).is_ok_and(|md| md.len() == f.size_bytes));
    let agree = m.files.iter().all(
        |spec| match (&spec.sha256, im.files.iter().find(|f| f.path == spec.path)) {
            (Some(want), Some(have)) => *want == have.sha256,
            (_, None) => false,
            (None, Some(_)) => true,
        },
    );
    let registry_ok = im.verification == Verification::Registry || !m.is_verifiable();
    files_ok && agree && registry_ok && base.join(&im.entry).exists()
}

/// Removes staging and old folders left by a killed run (never the installed models).
fn clean_leftovers(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(".staging-") || n.starts_with(".old-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn check_hash(what: &str, file: &Path, want: &Option<String>, show: bool) -> Result<String> {
    let got = sha256_file(file, show)?;
    if let Some(want) = want {
        if *want != got {
            bail!(
                "sha256 mismatch for {what} ({}): expected {want}, got {got}",
                file.display()
            );
        }
    }
    Ok(got)
}

/// Fetches one model into `staging`, verified. Returns its manifest entry and the bytes
/// downloaded.
fn stage_model(f: &Fetcher, m: &Model, staging: &Path, opts: &SetupOptions) -> Result<(InstalledModel, u64)> {
    let show = opts.show_progress;
    let mut downloaded = 0;
    let verification = if m.is_verifiable() {
        Verification::Registry
    } else {
        Verification::Recorded
    };
    match &m.source {
        Source::Hf(hf) => {
            for spec in &m.files {
                let repo_path = if hf.subfolder.is_empty() {
                    spec.path.clone()
                } else {
                    format!("{}/{}", hf.subfolder, spec.path)
                };
                let remote = Remote::Hf {
                    repo: hf.repo.clone(),
                    revision: hf.revision.clone(),
                    path: repo_path,
                };
                let key = format!("{}--{}", m.id, spec.path.replace('/', "--"));
                let got = f.fetch(&remote, &key, spec.size_bytes)?;
                downloaded += got.downloaded_bytes;
                if let Err(e) = check_hash(&spec.path, &got.path, &spec.sha256, show) {
                    if got.owned {
                        let _ = std::fs::remove_file(&got.path);
                    }
                    return Err(e);
                }
                let dest = staging.join(&spec.path);
                if let Some(p) = dest.parent() {
                    std::fs::create_dir_all(p)?;
                }
                if got.owned {
                    std::fs::rename(&got.path, &dest)?;
                } else {
                    std::fs::copy(&got.path, &dest)
                        .with_context(|| format!("cannot copy {} to {}", got.path.display(), dest.display()))?;
                }
            }
        }
        Source::Archive(a) => {
            let remote = match (&a.hf, &a.url) {
                (Some(h), _) => Remote::Hf {
                    repo: h.repo.clone(),
                    revision: h.revision.clone(),
                    path: h.path.clone(),
                },
                (None, Some(u)) => Remote::Url(u.clone()),
                (None, None) => unreachable!("validated"),
            };
            let name = remote
                .mirror_path()?
                .rsplit('/')
                .next()
                .unwrap_or("archive")
                .to_string();
            let got = f.fetch(&remote, &format!("{}--archive", m.id), a.size_bytes)?;
            downloaded += got.downloaded_bytes;
            let r = check_hash(&format!("archive {name}"), &got.path, &a.sha256, show);
            if r.is_err() && got.owned {
                let _ = std::fs::remove_file(&got.path);
            }
            r?;
            let only: Option<BTreeSet<String>> =
                a.only_listed.then(|| m.files.iter().map(|f| f.path.clone()).collect());
            let x = archive::extract(&got.path, a.format, &a.strip_prefix, only.as_ref(), staging);
            if got.owned {
                let _ = std::fs::remove_file(&got.path);
            }
            x?;
        }
    }
    // Every file on disk: hash, check against the registry, record.
    let mut files = Vec::new();
    for rel in walk_files(staging)? {
        let p = staging.join(&rel);
        let size = std::fs::metadata(&p)?.len();
        let spec = m.files.iter().find(|s| s.path == rel);
        let sha = match (&m.source, spec) {
            // Hf files were just hashed against the registry; hash again only if unknown.
            (Source::Hf(_), Some(s)) if s.sha256.is_some() => s.sha256.clone().unwrap(),
            (_, s) => check_hash(&rel, &p, &s.and_then(|s| s.sha256.clone()), show)?,
        };
        if let Some(want) = spec.and_then(|s| s.size_bytes) {
            if want != size {
                bail!("size mismatch for {rel}: expected {want} bytes, got {size}");
            }
        }
        files.push(InstalledFile {
            path: rel,
            size_bytes: size,
            sha256: sha,
        });
    }
    for spec in &m.files {
        if !files.iter().any(|f| f.path == spec.path) {
            bail!("{} is missing from the download of {}", spec.path, m.id);
        }
    }
    if !m.entry.is_empty() && !staging.join(&m.entry).is_file() {
        bail!("{} is missing from {}", m.entry, m.id);
    }
    Ok((
        InstalledModel {
            id: m.id.clone(),
            dir: m.id.clone(),
            entry: m.entry.clone(),
            sample_rate_hz: m.sample_rate_hz,
            verification,
            files,
        },
        downloaded,
    ))
}

/// Regular files under `root`, as sorted `/`-separated relative paths (symlinks skipped).
pub fn walk_files(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .expect("under root")
                    .to_string_lossy()
                    .into_owned();
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}
