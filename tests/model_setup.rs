//! model-setup and doctor end to end: the real binary against a local HTTP server on
//! 127.0.0.1 that speaks the Hugging Face resolve API (HEAD/GET, ETag, X-Repo-Commit, 304,
//! 404, ranges) and can cut a response off half way, plus a folder mirror.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const BIN: &str = env!("CARGO_BIN_EXE_asterisk-voice-agent");
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    range: Option<String>,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    /// Path -> how many more GETs of it to cut off half way.
    cut: HashMap<String, usize>,
    log: Vec<Seen>,
}

/// The local Hugging Face-like server.
struct Hub {
    base: String,
    state: Arc<Mutex<State>>,
}

impl Hub {
    fn start() -> Hub {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve_conn(s, &st);
                });
            }
        });
        Hub { base, state }
    }
    fn put(&self, path: &str, data: Vec<u8>) {
        self.state.lock().unwrap().files.insert(path.to_string(), data);
    }
    fn cut(&self, path: &str, times: usize) {
        self.state.lock().unwrap().cut.insert(path.to_string(), times);
    }
    fn gets(&self) -> Vec<Seen> {
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|s| s.method == "GET")
            .cloned()
            .collect()
    }
    fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }
}

fn serve_conn(s: TcpStream, st: &Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").split('?').next().unwrap().to_string();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let range = headers.get("range").cloned();
        let (data, cut) = {
            let mut g = st.lock().unwrap();
            g.log.push(Seen {
                method: method.clone(),
                path: path.clone(),
                range: range.clone(),
            });
            let data = g.files.get(&path).cloned();
            let cut = method == "GET" && g.cut.get(&path).is_some_and(|n| *n > 0);
            if cut {
                *g.cut.get_mut(&path).unwrap() -= 1;
            }
            (data, cut)
        };
        let Some(data) = data else {
            w.write_all(
                b"HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
            )?;
            return Ok(());
        };
        let etag = format!("\"{}\"", sha(&data));
        let hf = path.contains("/resolve/");
        let mut extra = String::new();
        if hf {
            extra = format!("ETag: {etag}\r\nX-Repo-Commit: {COMMIT}\r\n");
        } else {
            extra.push_str(&format!("ETag: {etag}\r\n"));
        }
        if headers.get("if-none-match") == Some(&etag) {
            write!(
                w,
                "HTTP/1.1 304 Not Modified\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return Ok(());
        }
        let total = data.len();
        let (status, body, crange) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
            Some(spec) if headers.get("if-range").is_none_or(|v| *v == etag) => {
                let (a, b) = spec.split_once('-').unwrap();
                let a: usize = a.parse().unwrap();
                let b: usize = if b.is_empty() {
                    total - 1
                } else {
                    b.parse::<usize>().unwrap().min(total - 1)
                };
                if a >= total {
                    write!(w, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
                    return Ok(());
                }
                (
                    "206 Partial Content",
                    &data[a..=b],
                    format!("Content-Range: bytes {a}-{b}/{total}\r\n"),
                )
            }
            _ => ("200 OK", &data[..], String::new()),
        };
        write!(
            w,
            "HTTP/1.1 {status}\r\n{extra}{crange}Accept-Ranges: bytes\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        if method == "GET" {
            if cut {
                w.write_all(&body[..body.len() / 2])?;
                w.flush()?;
                return Ok(()); // closes the connection mid-body
            }
            w.write_all(body)?;
        }
        return Ok(());
    }
}

/// Pseudo-random bytes (deterministic per seed) so files are incompressible and distinct.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (n, d) in entries {
            z.start_file(*n, o).unwrap();
            z.write_all(d).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// The synthetic models, served and described by a registry.
struct Fixture {
    hub: Hub,
    registry: PathBuf,
    llm: Vec<u8>,
    _tmp: tempfile::TempDir,
    models: PathBuf,
}

const LLM_PATH: &str = "/org/llm-repo/resolve/main/model.gguf";
const STT_PATH: &str = "/example.invalid/pkgs/stt-a.zip";
const VOICE_PATH: &str = "/org/voices/resolve/v1/en/voice.onnx";
const VOICE_JSON_PATH: &str = "/org/voices/resolve/v1/en/voice.onnx.json";

fn stt_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("am/final.mdl".into(), bytes(1, 40_000)),
        ("conf/model.conf".into(), b"--sample-frequency=16000\n".to_vec()),
        ("graph/HCLr.fst".into(), bytes(2, 70_000)),
    ]
}

fn registry(llm_sha: &str, llm_len: usize, stt_zip: &[u8], voice: &[u8], voice_json: &[u8]) -> Value {
    let stt: Vec<Value> = stt_files()
        .iter()
        .map(|(p, d)| {
            // One file left without a recorded hash, trusted through the archive hash.
            if p == "graph/HCLr.fst" {
                json!({"path": p, "size_bytes": null, "sha256": null})
            } else {
                json!({"path": p, "size_bytes": d.len(), "sha256": sha(d)})
            }
        })
        .collect();
    json!({
      "schema_version": 1, "registry_version": 7, "about": "test",
      "models": [
        {"id": "stt-a", "kind": "stt", "language": "en", "license": "Apache-2.0", "sample_rate_hz": 16000,
         "size_bytes": null, "entry": "",
         "source": {"archive": {"url": "https://example.invalid/pkgs/stt-a.zip", "format": "zip",
            "size_bytes": stt_zip.len(), "sha256": sha(stt_zip), "strip_prefix": "stt-a/", "only_listed": false}},
         "files": stt},
        {"id": "llm-a", "kind": "llm", "language": "en", "license": "MIT", "sample_rate_hz": null,
         "size_bytes": llm_len, "entry": "model.gguf",
         "source": {"hf": {"repo": "org/llm-repo", "revision": "main", "subfolder": ""}},
         "files": [{"path": "model.gguf", "size_bytes": llm_len, "sha256": llm_sha}]},
        {"id": "tts-a", "kind": "tts", "language": "en", "license": "CC0", "sample_rate_hz": 22050,
         "size_bytes": null, "entry": "voice.onnx",
         "source": {"hf": {"repo": "org/voices", "revision": "v1", "subfolder": "en"}},
         "files": [{"path": "voice.onnx", "size_bytes": voice.len(), "sha256": sha(voice)},
                   {"path": "voice.onnx.json", "size_bytes": voice_json.len(), "sha256": sha(voice_json)}]}
      ],
      "tiers": [
        {"name": "t1", "auto": true,
         "requires": {"min_ram_mib": 1, "min_physical_cores": 1, "avx2": false, "gpu": null},
         "llm": {"threads": 3, "context": 1536},
         "languages": {"en": {"stt": "stt-a", "llm": "llm-a", "tts": "tts-a"}},
         "expected": {"voice_to_voice_ms_p50": null, "concurrent_calls": null, "measured": false, "benchmark": null}}
      ]
    })
}

impl Fixture {
    fn new() -> Fixture {
        let hub = Hub::start();
        let tmp = tempfile::tempdir().unwrap();
        let llm = bytes(3, 600_000);
        let mut entries: Vec<(String, Vec<u8>)> = stt_files()
            .into_iter()
            .map(|(p, d)| (format!("stt-a/{p}"), d))
            .collect();
        entries.push(("other/ignored.txt".into(), b"not extracted".to_vec()));
        let refs: Vec<(&str, &[u8])> = entries.iter().map(|(p, d)| (p.as_str(), d.as_slice())).collect();
        let stt_zip = zip_of(&refs);
        let voice = bytes(4, 200_000);
        let voice_json = br#"{"audio": {"sample_rate": 22050}}"#.to_vec();
        hub.put(LLM_PATH, llm.clone());
        hub.put(STT_PATH, stt_zip.clone());
        hub.put(VOICE_PATH, voice.clone());
        hub.put(VOICE_JSON_PATH, voice_json.clone());
        let reg = registry(&sha(&llm), llm.len(), &stt_zip, &voice, &voice_json);
        let registry = tmp.path().join("registry.json");
        std::fs::write(&registry, serde_json::to_string_pretty(&reg).unwrap()).unwrap();
        let models = tmp.path().join("models");
        Fixture {
            hub,
            registry,
            llm,
            models,
            _tmp: tmp,
        }
    }

    fn setup(&self, extra: &[&str]) -> Output {
        let mut c = Command::new(BIN);
        c.args(["model-setup", "--tier", "t1", "--json", "--registry"])
            .arg(&self.registry)
            .arg("--models-dir")
            .arg(&self.models)
            .args(["--from", &self.hub.base])
            .args(extra)
            .env_remove("HF_ENDPOINT")
            .env("HF_HUB_DISABLE_TELEMETRY", "1");
        c.output().unwrap()
    }

    fn doctor(&self, extra: &[&str]) -> Output {
        // A config whose AudioSocket port is free (bound then released).
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cfg = self.models.parent().unwrap().join(format!("doctor-{port}.toml"));
        std::fs::write(&cfg, format!("[server]\naudiosocket_listen = \"127.0.0.1:{port}\"\n")).unwrap();
        Command::new(BIN)
            .args(["doctor", "--config"])
            .arg(&cfg)
            .arg("--models-dir")
            .arg(&self.models)
            .args(extra)
            .output()
            .unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".staging") || n.starts_with(".old"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn fresh_install_then_second_run_downloads_nothing() {
    let f = Fixture::new();
    let o = f.setup(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let m = manifest(&f.models);
    assert_eq!(m["tier"], "t1");
    assert_eq!(m["llm"]["threads"], 3);
    assert_eq!(m["llm"]["context"], 1536);
    assert_eq!(m["models"]["llm"]["id"], "llm-a");
    assert_eq!(m["models"]["llm"]["verification"], "registry");
    // The archive: its listed files plus the one with no recorded hash, computed now.
    let stt = &m["models"]["stt"]["files"];
    let hclr = stt
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "graph/HCLr.fst")
        .unwrap();
    assert_eq!(hclr["sha256"], sha(&bytes(2, 70_000)));
    assert!(!f.models.join("stt-a/other").exists() && !f.models.join("stt-a/stt-a").exists());
    assert_eq!(std::fs::read(f.models.join("llm-a/model.gguf")).unwrap(), f.llm);
    assert!(f.models.join("tts-a/voice.onnx.json").is_file());
    let gets = f.hub.gets();
    assert!(gets.iter().any(|g| g.path == LLM_PATH), "{gets:?}");
    assert!(gets.iter().any(|g| g.path == STT_PATH), "{gets:?}");
    // The library reads it the way serve will.
    let man = asterisk_voice_agent::models::manifest::load(&f.models).unwrap();
    use asterisk_voice_agent::models::ModelKind;
    assert_eq!(man.path_for(ModelKind::Stt).unwrap(), f.models.join("stt-a/"));
    assert_eq!(man.path_for(ModelKind::Llm).unwrap(), f.models.join("llm-a/model.gguf"));
    assert_eq!(man.path_for(ModelKind::Tts).unwrap(), f.models.join("tts-a/voice.onnx"));
    assert_eq!(
        (man.tier(), man.llm_threads(), man.llm_context()),
        ("t1", Some(3), Some(1536))
    );

    // Second run: nothing fetched, quick.
    f.hub.clear_log();
    let t = std::time::Instant::now();
    let o = f.setup(&[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(t.elapsed().as_secs() < 10);
    assert!(f.hub.gets().is_empty(), "{:?}", f.hub.gets());
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        r["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["status"] == "already_installed"),
        "{r}"
    );
    assert!(leftovers(&f.models).is_empty());
}

#[test]
fn cut_off_download_resumes() {
    let f = Fixture::new();
    // Cut once: the same run resumes with a range from where it stopped.
    f.hub.cut(LLM_PATH, 1);
    let o = f.setup(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let gets: Vec<Seen> = f.hub.gets().into_iter().filter(|g| g.path == LLM_PATH).collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range, None);
    let half = f.llm.len() / 2;
    assert_eq!(
        gets[1].range.as_deref(),
        Some(format!("bytes={half}-{}", f.llm.len() - 1).as_str())
    );
    assert_eq!(
        sha(&std::fs::read(f.models.join("llm-a/model.gguf")).unwrap()),
        sha(&f.llm)
    );

    // Cut every time: the run fails, keeps the partial file, installs nothing; the next
    // run picks up from the kept bytes.
    let f = Fixture::new();
    f.hub.cut(LLM_PATH, 100);
    let o = f.setup(&[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("run again to resume"), "{err}");
    assert!(!f.models.join("manifest.json").exists());
    assert!(!f.models.join("llm-a").exists());
    let part = f.models.join(".downloads/llm-a--model.gguf.part");
    let kept = std::fs::metadata(&part).unwrap().len() as usize;
    assert!(kept > half && kept < f.llm.len(), "kept {kept}");
    f.hub.cut(LLM_PATH, 0);
    f.hub.clear_log();
    let o = f.setup(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let gets: Vec<Seen> = f.hub.gets().into_iter().filter(|g| g.path == LLM_PATH).collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(
        gets[0].range.as_deref(),
        Some(format!("bytes={kept}-{}", f.llm.len() - 1).as_str())
    );
    assert_eq!(
        sha(&std::fs::read(f.models.join("llm-a/model.gguf")).unwrap()),
        sha(&f.llm)
    );
    assert!(!part.exists());
}

#[test]
fn hash_mismatch_installs_nothing_and_keeps_previous() {
    let f = Fixture::new();
    assert!(f.setup(&[]).status.success());
    let before = std::fs::read(f.models.join("manifest.json")).unwrap();
    // The server now serves other bytes of the same size for the LLM.
    f.hub.put(LLM_PATH, bytes(99, f.llm.len()));
    let o = f.setup(&["--force"]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("sha256 mismatch for model.gguf"), "{err}");
    assert!(err.contains("llm model llm-a was not installed"), "{err}");
    assert_eq!(std::fs::read(f.models.join("manifest.json")).unwrap(), before);
    assert_eq!(std::fs::read(f.models.join("llm-a/model.gguf")).unwrap(), f.llm);
    assert!(leftovers(&f.models).is_empty(), "{:?}", leftovers(&f.models));
    assert!(!f.models.join(".downloads/llm-a--model.gguf").exists());
}

#[test]
fn not_found_is_a_clear_error() {
    let f = Fixture::new();
    f.hub.state.lock().unwrap().files.remove(VOICE_JSON_PATH);
    let o = f.setup(&[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("org/voices@v1/en/voice.onnx.json"), "{err}");
    assert!(err.contains("tts model tts-a was not installed"), "{err}");
    assert!(!f.models.join("manifest.json").exists());
    // A URL source that is missing.
    let f = Fixture::new();
    f.hub.state.lock().unwrap().files.remove(STT_PATH);
    let o = f.setup(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("404") && err.contains("stt-a.zip"),
        "{err}"
    );
}

fn tar_gz_with_raw_name(name: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_size(4);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, &b"evil"[..]).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

fn zip_with_symlink() -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let o = zip::write::SimpleFileOptions::default();
        z.start_file("stt-a/conf/model.conf", o).unwrap();
        z.write_all(b"x").unwrap();
        z.add_symlink("stt-a/link", "../../../etc/passwd", o).unwrap();
        z.finish().unwrap();
    }
    buf.into_inner()
}

#[test]
fn unsafe_archives_are_refused() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("zip", zip_of(&[("stt-a/../../evil.txt", b"evil")]), "contains '..'"),
        ("zip", zip_of(&[("/tmp/evil-abs.txt", b"evil")]), "absolute path"),
        ("zip", zip_with_symlink(), "points out of the target"),
        ("tar.gz", tar_gz_with_raw_name(b"stt-a/../../evil.txt"), "contains '..'"),
        ("tar.gz", tar_gz_with_raw_name(b"/tmp/evil-abs.txt"), "absolute path"),
    ];
    for (format, archive, want) in cases {
        let f = Fixture::new();
        f.hub.put(STT_PATH, archive.clone());
        let mut reg: Value = serde_json::from_str(&std::fs::read_to_string(&f.registry).unwrap()).unwrap();
        let src = &mut reg["models"][0]["source"]["archive"];
        src["format"] = format.into();
        src["sha256"] = sha(&archive).into();
        src["size_bytes"] = archive.len().into();
        std::fs::write(&f.registry, reg.to_string()).unwrap();
        let o = f.setup(&[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(want),
            "{format} {want}: {}",
            text(&o)
        );
        assert!(!f.models.join("manifest.json").exists());
        assert!(!f.models.join("stt-a").exists());
        assert!(!f.models.parent().unwrap().join("evil.txt").exists());
        assert!(leftovers(&f.models).is_empty());
    }
    assert!(!Path::new("/tmp/evil-abs.txt").exists());
}

#[test]
fn folder_mirror_with_from() {
    let f = Fixture::new();
    let mirror = f.models.parent().unwrap().join("usb");
    let files = f.hub.state.lock().unwrap().files.clone();
    for (p, d) in &files {
        let dest = mirror.join(p.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(dest, d).unwrap();
    }
    let o = Command::new(BIN)
        .args(["model-setup", "--tier", "auto", "--registry"])
        .arg(&f.registry)
        .arg("--models-dir")
        .arg(&f.models)
        .arg("--from")
        .arg(&mirror)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tier t1 fits"), "{err}");
    assert!(f.hub.gets().is_empty(), "the folder mirror must not touch the network");
    assert_eq!(std::fs::read(f.models.join("llm-a/model.gguf")).unwrap(), f.llm);
    // A file missing from the mirror is named with where it was expected.
    std::fs::remove_file(mirror.join(LLM_PATH.trim_start_matches('/'))).unwrap();
    let o = Command::new(BIN)
        .args(["model-setup", "--tier", "t1", "--force", "--registry"])
        .arg(&f.registry)
        .arg("--models-dir")
        .arg(&f.models)
        .arg("--from")
        .arg(&mirror)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("org/llm-repo/resolve/main/model.gguf"),
        "{err}"
    );
}

#[test]
fn unverified_models_need_consent_and_get_recorded_hashes() {
    let f = Fixture::new();
    let mut reg: Value = serde_json::from_str(&std::fs::read_to_string(&f.registry).unwrap()).unwrap();
    reg["models"][1]["files"][0]["sha256"] = Value::Null;
    std::fs::write(&f.registry, reg.to_string()).unwrap();
    let o = f.setup(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no sha256 yet for llm-a") && err.contains("--allow-unverified"),
        "{err}"
    );
    assert!(f.hub.gets().is_empty(), "refused before downloading");
    let o = f.setup(&["--allow-unverified"]);
    assert!(o.status.success(), "{}", text(&o));
    let m = manifest(&f.models);
    assert_eq!(m["models"]["llm"]["verification"], "recorded");
    assert_eq!(m["models"]["llm"]["files"][0]["sha256"], sha(&f.llm));
    assert_eq!(m["models"]["tts"]["verification"], "registry");
}

#[test]
fn dry_run_downloads_nothing() {
    let f = Fixture::new();
    let o = f.setup(&["--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        r["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["status"] == "would_install"),
        "{r}"
    );
    assert!(f.hub.gets().is_empty());
    assert!(!f.models.join("manifest.json").exists());
}

#[test]
fn auto_tier_with_assumed_hardware() {
    let dir = tempfile::tempdir().unwrap();
    let run = |hw: &str| {
        let o = Command::new(BIN)
            .args([
                "model-setup",
                "--dry-run",
                "--json",
                "--allow-unverified",
                "--assume-hardware",
                hw,
                "--models-dir",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    assert_eq!(run("4096,2,1")["tier"], "tiny");
    assert_eq!(run("16384,8,1")["tier"], "medium");
    let r = run("32768,16,1");
    assert_eq!(r["tier"], "heavy");
    assert_eq!(r["models"][1]["id"], "qwen2.5-7b-instruct-q4_k_m");
    // Unverified models of the built-in registry are refused without consent.
    let o = Command::new(BIN)
        .args([
            "model-setup",
            "--dry-run",
            "--assume-hardware",
            "8192,4,1",
            "--models-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no sha256 yet for qwen2.5-1.5b-instruct-q4_k_m"),
        "{err}"
    );
}

#[test]
fn doctor_good_missing_corrupt_and_busy_port() {
    let f = Fixture::new();
    assert!(f.setup(&[]).status.success());
    // Good install (hashes too). The synthetic tier needs no AVX2.
    let o = f.doctor(&["--verify-hashes"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("tier: t1") && out.contains("all checks passed"), "{out}");
    assert!(out.contains("onnxruntime: loads from"), "{out}");

    // Corrupt: same size, one byte changed. Sizes pass; hashes catch it.
    let gguf = f.models.join("llm-a/model.gguf");
    let mut d = std::fs::read(&gguf).unwrap();
    d[1000] ^= 0xff;
    std::fs::write(&gguf, &d).unwrap();
    let o = f.doctor(&["--json"]);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let llm = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "llm model")
        .unwrap()
        .clone();
    assert_eq!(llm["ok"], true, "{r}");
    let o = f.doctor(&["--verify-hashes"]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("model.gguf is corrupt") && out.contains("model-setup --force"),
        "{out}"
    );

    // Missing file.
    std::fs::remove_file(f.models.join("tts-a/voice.onnx.json")).unwrap();
    let o = f.doctor(&[]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("voice.onnx.json is missing"), "{out}");

    // Busy port.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = f.models.parent().unwrap().join("busy.toml");
    std::fs::write(
        &cfg,
        format!("[server]\naudiosocket_listen = \"{}\"\n", busy.local_addr().unwrap()),
    )
    .unwrap();
    let o = Command::new(BIN)
        .args(["doctor", "--config"])
        .arg(&cfg)
        .arg("--models-dir")
        .arg(&f.models)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success() && out.contains("[FAIL] audiosocket port"), "{out}");

    // No manifest at all.
    let empty = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["doctor", "--models-dir"])
        .arg(empty.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success() && out.contains("manifest.json") && out.contains("model-setup"),
        "{out}"
    );
}
