//! Getting one remote object (a Hugging Face file or a plain URL) onto local disk: from the
//! internet, from a mirror folder (`--from DIR`), or from a mirror over http(s)
//! (`--from URL`). Downloads go to `<models-dir>/.downloads/<key>.part`, resume with HTTP
//! ranges, and show an indicatif progress bar. Hash checks are the caller's.

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where objects come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The real sources (Hugging Face through hf-hub, honouring `HF_ENDPOINT`; plain URLs).
    Online,
    /// A local mirror folder.
    Dir(PathBuf),
    /// An http(s) mirror: Hugging Face files through its resolve API at this base URL,
    /// URL sources at `{base}/{host}/{path}`.
    Http(String),
}

impl Origin {
    /// Parses `--from`: absent = online, `http(s)://...` = http mirror, else a folder.
    pub fn parse(from: Option<&str>) -> Result<Origin> {
        Ok(match from {
            None => Origin::Online,
            Some(s) if s.starts_with("http://") || s.starts_with("https://") => {
                Origin::Http(s.trim_end_matches('/').to_string())
            }
            Some(s) => {
                let p = PathBuf::from(s);
                if !p.is_dir() {
                    bail!("--from {s}: not a folder (nor an http(s):// URL)");
                }
                Origin::Dir(p)
            }
        })
    }
}

/// One remote object.
#[derive(Debug, Clone)]
pub enum Remote {
    /// A file in a Hugging Face model repo.
    Hf {
        /// `org/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
        /// Path in the repo.
        path: String,
    },
    /// A plain http(s) URL.
    Url(String),
}

impl Remote {
    /// Path of this object inside a mirror: `{repo}/resolve/{revision}/{path}` for Hugging
    /// Face (the Hub's own URL layout), `{host}/{path}` for a URL (wget -x layout).
    pub fn mirror_path(&self) -> Result<String> {
        match self {
            Remote::Hf { repo, revision, path } => Ok(format!("{repo}/resolve/{revision}/{path}")),
            Remote::Url(u) => {
                let url = reqwest::Url::parse(u).with_context(|| format!("bad URL {u}"))?;
                let host = url.host_str().ok_or_else(|| anyhow!("URL {u} has no host"))?;
                Ok(format!("{host}{}", url.path()))
            }
        }
    }

    /// For messages.
    pub fn describe(&self) -> String {
        match self {
            Remote::Hf { repo, revision, path } => format!("hf://{repo}@{revision}/{path}"),
            Remote::Url(u) => u.clone(),
        }
    }
}

/// What a fetch produced.
#[derive(Debug)]
pub struct Fetched {
    /// The complete local file (a mirror file itself, or a finished download).
    pub path: PathBuf,
    /// Whether `path` is a download of ours that the caller may move or delete.
    pub owned: bool,
    /// Bytes transferred over the network in this run.
    pub downloaded_bytes: u64,
}

/// Fetches objects from one origin.
pub struct Fetcher {
    origin: Origin,
    parts_dir: PathBuf,
    show_progress: bool,
    rt: tokio::runtime::Runtime,
    http: reqwest::blocking::Client,
}

/// Attempts per object within one run (each resumes where the last stopped).
const ATTEMPTS: usize = 3;

impl Fetcher {
    /// A fetcher that keeps partial downloads in `parts_dir`.
    pub fn new(origin: Origin, parts_dir: PathBuf, show_progress: bool) -> Result<Fetcher> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let http = reqwest::blocking::Client::builder()
            .user_agent(concat!("asterisk-voice-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(20))
            .timeout(None)
            .build()?;
        Ok(Fetcher {
            origin,
            parts_dir,
            show_progress,
            rt,
            http,
        })
    }

    /// Gets `remote` to a local file. `key` names the partial download (stable across
    /// runs so an interrupted download resumes); `size` is the expected size in bytes.
    pub fn fetch(&self, remote: &Remote, key: &str, size: Option<u64>) -> Result<Fetched> {
        match &self.origin {
            Origin::Dir(dir) => {
                let p = dir.join(remote.mirror_path()?);
                if !p.is_file() {
                    bail!(
                        "{} is not in the mirror folder: expected {}",
                        remote.describe(),
                        p.display()
                    );
                }
                Ok(Fetched {
                    path: p,
                    owned: false,
                    downloaded_bytes: 0,
                })
            }
            origin => {
                if matches!(origin, Origin::Online) && std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| v != "0") {
                    bail!(
                        "HF_HUB_OFFLINE is set and {} is not installed: use --from DIR_OR_URL with a mirror",
                        remote.describe()
                    );
                }
                std::fs::create_dir_all(&self.parts_dir)
                    .with_context(|| format!("cannot create {}", self.parts_dir.display()))?;
                let part = self.parts_dir.join(format!("{key}.part"));
                let mut downloaded = 0;
                let mut last_err = None;
                for attempt in 1..=ATTEMPTS {
                    let before = file_len(&part);
                    let r = match remote {
                        Remote::Hf { repo, revision, path } => self.hf_download(repo, revision, path, &part),
                        Remote::Url(u) => {
                            let url = match origin {
                                Origin::Http(base) => format!("{base}/{}", remote.mirror_path()?),
                                _ => u.clone(),
                            };
                            self.url_download(&url, &part, size)
                        }
                    };
                    downloaded += file_len(&part).saturating_sub(before);
                    match r {
                        Ok(()) => {
                            let done = self.parts_dir.join(key);
                            std::fs::rename(&part, &done)?;
                            let _ = std::fs::remove_file(etag_path(&part));
                            return Ok(Fetched {
                                path: done,
                                owned: true,
                                downloaded_bytes: downloaded,
                            });
                        }
                        Err(e) => {
                            let progressed = file_len(&part) > before;
                            last_err = Some(e);
                            if !progressed || attempt == ATTEMPTS {
                                break;
                            }
                            eprintln!("  interrupted; resuming from byte {}", file_len(&part));
                        }
                    }
                }
                let e = last_err.expect("an attempt ran");
                Err(e.context(format!(
                    "download of {} failed ({} bytes kept in {}; run again to resume)",
                    remote.describe(),
                    file_len(&part),
                    part.display()
                )))
            }
        }
    }

    fn endpoint(&self) -> Option<&str> {
        match &self.origin {
            Origin::Http(base) => Some(base),
            _ => None,
        }
    }

    /// Downloads through hf-hub's streaming API with a byte range starting at the part's length.
    fn hf_download(&self, repo: &str, revision: &str, path: &str, part: &Path) -> Result<()> {
        use futures_util::StreamExt;
        let mut b = hf_hub::HFClient::builder().cache_enabled(false).retry_max_attempts(1);
        if let Some(ep) = self.endpoint() {
            b = b.endpoint(ep);
        }
        let client = b.build().context("cannot set up the Hugging Face client")?;
        let (org, name) = repo
            .split_once('/')
            .ok_or_else(|| anyhow!("hf repo {repo} is not org/name"))?;
        let hf = client.model(org, name);
        let what = format!("{repo}@{revision}/{path}");
        let meta = self
            .rt
            .block_on(hf.get_file_metadata().filepath(path).revision(revision).send())
            .with_context(|| format!("cannot find {what}"))?;
        let total = meta.file_size;
        // Resume only onto bytes of the same object.
        let etag_file = etag_path(part);
        let stored = std::fs::read_to_string(&etag_file).unwrap_or_default();
        let mut start = file_len(part);
        if stored != meta.etag || (total > 0 && start > total) {
            start = 0;
        }
        let mut file = open_part(part, start)?;
        std::fs::write(&etag_file, &meta.etag)?;
        if total > 0 && start == total {
            return Ok(());
        }
        let pb = self.bar(path, total, start);
        let req = hf
            .download_file_stream()
            .filename(path)
            .revision(revision.to_string())
            .maybe_range((start > 0).then_some(start..total));
        let result: Result<()> = self.rt.block_on(async {
            let (len, mut stream) = req.send().await.with_context(|| format!("cannot download {what}"))?;
            if start > 0 && len == Some(total) {
                // The server ignored the range: start over.
                use std::io::Seek;
                file.set_len(0)?;
                file.seek(std::io::SeekFrom::Start(0))?;
                pb.set_position(0);
            }
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.with_context(|| format!("download of {what} cut off"))?;
                file.write_all(&chunk)?;
                pb.inc(chunk.len() as u64);
            }
            Ok(())
        });
        file.flush()?;
        pb.finish_and_clear();
        result?;
        let got = file_len(part);
        if total > 0 && got != total {
            bail!("download of {what} ended at {got} of {total} bytes");
        }
        Ok(())
    }

    /// Downloads a plain URL with reqwest, resuming with `Range` + `If-Range`.
    fn url_download(&self, url: &str, part: &Path, size: Option<u64>) -> Result<()> {
        use reqwest::header::{CONTENT_LENGTH, ETAG, IF_RANGE, RANGE};
        let etag_file = etag_path(part);
        let stored = std::fs::read_to_string(&etag_file).unwrap_or_default();
        let mut start = file_len(part);
        if stored.is_empty() || size.is_some_and(|s| start > s) {
            start = 0;
        }
        if size.is_some_and(|s| s == start && s > 0) {
            return Ok(());
        }
        let mut req = self.http.get(url);
        if start > 0 {
            req = req
                .header(RANGE, format!("bytes={start}-"))
                .header(IF_RANGE, stored.clone());
        }
        let mut resp = req.send().with_context(|| format!("cannot download {url}"))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            bail!("{url}: 404 not found");
        }
        if !status.is_success() {
            bail!("{url}: HTTP {status}");
        }
        if status != reqwest::StatusCode::PARTIAL_CONTENT {
            start = 0;
        }
        let len: Option<u64> = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let total = size.or(len.map(|l| l + start)).unwrap_or(0);
        if let Some(e) = resp.headers().get(ETAG).and_then(|v| v.to_str().ok()) {
            std::fs::write(&etag_file, e)?;
        }
        let mut file = open_part(part, start)?;
        let pb = self.bar(url.rsplit('/').next().unwrap_or(url), total, start);
        let r = std::io::copy(&mut resp, &mut pb.wrap_write(&mut file));
        file.flush()?;
        pb.finish_and_clear();
        r.with_context(|| format!("download of {url} cut off"))?;
        let got = file_len(part);
        if let Some(l) = len {
            if got != start + l {
                bail!("download of {url} ended at {got} of {} bytes", start + l);
            }
        }
        Ok(())
    }

    fn bar(&self, name: &str, total: u64, pos: u64) -> ProgressBar {
        if !self.show_progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template("  {msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        pb.set_message(name.rsplit('/').next().unwrap_or(name).to_string());
        pb.set_position(pos);
        pb
    }
}

fn etag_path(part: &Path) -> PathBuf {
    let mut s = part.as_os_str().to_owned();
    s.push(".etag");
    PathBuf::from(s)
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn open_part(part: &Path, start: u64) -> Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(part)
        .with_context(|| format!("cannot write {}", part.display()))?;
    file.set_len(start)?;
    let mut file = file;
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(start))?;
    Ok(file)
}

/// sha256 of a file as lower-case hex, with a progress bar when `show` is set.
pub fn sha256_file(path: &Path, show: bool) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let len = f.metadata()?.len();
    let pb = if show && len > 64 << 20 {
        let pb = ProgressBar::new(len);
        pb.set_style(
            ProgressStyle::with_template("  verifying {msg:24!} [{bar:30}] {bytes}/{total_bytes}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        pb.set_message(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut h = Sha256::new();
    std::io::copy(&mut pb.wrap_read(&mut f), &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    pb.finish_and_clear();
    Ok(format!("{:x}", h.finalize()))
}
