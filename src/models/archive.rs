//! Safe extraction of model archives (zip, tar.gz). Every entry is checked before anything
//! is written: absolute paths, `..` and symlinks pointing out of the target refuse the whole
//! archive. Only entries under a prefix are extracted, with the prefix removed.

use super::registry::ArchiveFormat;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

/// Checks an archive entry name and returns it as a relative path with only normal parts.
pub fn safe_entry_path(name: &str) -> Result<PathBuf> {
    if name.contains('\\') && name.contains(':') {
        bail!("unsafe archive entry {name:?}: a Windows path");
    }
    let mut out = PathBuf::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => bail!("unsafe archive entry {name:?}: contains '..'"),
            Component::RootDir | Component::Prefix(_) => {
                bail!("unsafe archive entry {name:?}: absolute path")
            }
        }
    }
    Ok(out)
}

/// Checks that a symlink at `link` (relative) pointing at `target` stays inside the tree.
fn check_link(link: &Path, target: &Path) -> Result<()> {
    let mut depth: Vec<&std::ffi::OsStr> = Vec::new();
    for c in link.parent().unwrap_or(Path::new("")).components() {
        if let Component::Normal(p) = c {
            depth.push(p);
        }
    }
    for c in target.components() {
        match c {
            Component::Normal(p) => depth.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    bail!(
                        "unsafe archive entry {}: symlink to {} points out of the target",
                        link.display(),
                        target.display()
                    );
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                bail!(
                    "unsafe archive entry {}: symlink to absolute path {}",
                    link.display(),
                    target.display()
                )
            }
        }
    }
    Ok(())
}

/// Maps an entry name to its destination below the prefix (None = not extracted).
fn strip(rel: &Path, prefix: &Path, only: Option<&BTreeSet<String>>) -> Option<PathBuf> {
    let r = rel.strip_prefix(prefix).ok()?;
    if r.as_os_str().is_empty() {
        return None;
    }
    if let Some(only) = only {
        let s = r.to_string_lossy().replace('\\', "/");
        if !only.contains(&s) {
            return None;
        }
    }
    Some(r.to_path_buf())
}

/// Extracts the entries of `archive` under `strip_prefix` into `dest` (which must exist).
/// With `only`, just those paths (relative to the prefix). Returns the files written.
pub fn extract(
    archive: &Path,
    format: ArchiveFormat,
    strip_prefix: &str,
    only: Option<&BTreeSet<String>>,
    dest: &Path,
) -> Result<Vec<PathBuf>> {
    let prefix = safe_entry_path(strip_prefix)?;
    let r = match format {
        ArchiveFormat::Zip => extract_zip(archive, &prefix, only, dest),
        ArchiveFormat::TarGz => extract_tar_gz(archive, &prefix, only, dest),
    };
    r.with_context(|| format!("cannot extract {}", archive.display()))
}

fn extract_zip(archive: &Path, prefix: &Path, only: Option<&BTreeSet<String>>, dest: &Path) -> Result<Vec<PathBuf>> {
    let mut zip = zip::ZipArchive::new(File::open(archive)?)?;
    // Pass 1: check every entry (the central directory) before writing anything.
    let mut links = Vec::new();
    for i in 0..zip.len() {
        let mut e = zip.by_index(i)?;
        let rel = safe_entry_path(e.name())?;
        let is_link = e.unix_mode().is_some_and(|m| m & 0o170000 == 0o120000);
        if is_link {
            let mut target = String::new();
            std::io::Read::read_to_string(&mut e, &mut target)?;
            let inside = rel.strip_prefix(prefix).unwrap_or(&rel).to_path_buf();
            check_link(&inside, Path::new(&target))?;
            links.push((i, target));
        }
    }
    // Pass 2: extract.
    let mut written = Vec::new();
    for i in 0..zip.len() {
        let mut e = zip.by_index(i)?;
        let rel = safe_entry_path(e.name())?;
        let Some(out) = strip(&rel, prefix, only) else {
            continue;
        };
        let path = dest.join(&out);
        if e.is_dir() {
            std::fs::create_dir_all(&path)?;
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if let Some((_, target)) = links.iter().find(|(j, _)| *j == i) {
            std::os::unix::fs::symlink(target, &path)?;
            continue;
        }
        let mut f = File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        std::io::copy(&mut e, &mut f)?;
        written.push(out);
    }
    Ok(written)
}

fn extract_tar_gz(archive: &Path, prefix: &Path, only: Option<&BTreeSet<String>>, dest: &Path) -> Result<Vec<PathBuf>> {
    // Pass 1: check every entry.
    let open = || -> Result<tar::Archive<flate2::read::GzDecoder<File>>> {
        Ok(tar::Archive::new(flate2::read::GzDecoder::new(File::open(archive)?)))
    };
    let mut ar = open()?;
    for e in ar.entries()? {
        let e = e?;
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let rel = safe_entry_path(&name)?;
        let kind = e.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = e.link_name()?.map(|t| t.into_owned()).unwrap_or_default();
            let inside = rel.strip_prefix(prefix).unwrap_or(&rel).to_path_buf();
            if kind.is_hard_link() {
                // A hard link's target is an archive path, not relative to the link.
                safe_entry_path(&target.to_string_lossy())?;
            } else {
                check_link(&inside, &target)?;
            }
        }
    }
    // Pass 2: extract.
    let mut ar = open()?;
    let mut written = Vec::new();
    for e in ar.entries()? {
        let mut e = e?;
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let rel = safe_entry_path(&name)?;
        let Some(out) = strip(&rel, prefix, only) else {
            continue;
        };
        let path = dest.join(&out);
        let kind = e.header().entry_type();
        if kind.is_dir() {
            std::fs::create_dir_all(&path)?;
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if kind.is_symlink() {
            let target = e.link_name()?.map(|t| t.into_owned()).unwrap_or_default();
            std::os::unix::fs::symlink(target, &path)?;
        } else if kind.is_file() {
            let mut f = File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
            std::io::copy(&mut e, &mut f)?;
            written.push(out);
        } else {
            bail!("archive entry {name:?} is neither a file, a folder nor a symlink");
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths() {
        assert_eq!(safe_entry_path("a/./b").unwrap(), PathBuf::from("a/b"));
        assert!(safe_entry_path("../x").is_err());
        assert!(safe_entry_path("a/../../x").is_err());
        assert!(safe_entry_path("/etc/passwd").is_err());
        check_link(Path::new("a/b/l"), Path::new("../c")).unwrap();
        assert!(check_link(Path::new("a/l"), Path::new("../../c")).is_err());
        assert!(check_link(Path::new("l"), Path::new("/etc/passwd")).is_err());
    }
}
