//! The three model engines, loaded once at start-up (in parallel) and shared by every call.
//! Start-up stops here, with the file's name and the command to fix it, when a model or a
//! native library is missing or unreadable.

use crate::config::Config;
use crate::llm::{LlmEngine, LlmSettings};
use crate::models::manifest::{self, Manifest};
use crate::stt::SttEngine;
use crate::tts::{TtsEngine, TtsSettings};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The shared engines (cheap to clone: every engine is an `Arc`).
#[derive(Clone)]
pub struct Engines {
    /// Vosk.
    pub stt: Arc<SttEngine>,
    /// llama.cpp.
    pub llm: Arc<LlmEngine>,
    /// Piper.
    pub tts: Arc<TtsEngine>,
    /// A second GGUF for when the main one keeps failing (`[call] fallback_llm`).
    pub fallback_llm: Option<Arc<LlmEngine>>,
    /// A second Piper voice for when synthesis fails (`[call] fallback_voice`).
    pub fallback_tts: Option<Arc<TtsEngine>>,
    /// The Smart Turn end-of-turn model, loaded when `turn.mode = "smart"` (issue 8).
    pub turn: Option<Arc<crate::smart_turn::SmartTurn>>,
    /// Silero VAD, loaded when `vad.engine = "silero"` (issue 8).
    pub vad: Option<Arc<crate::silero::SileroModel>>,
}

/// Lowers the calling thread's scheduling priority (nice 10) so the threads that pace audio
/// win the CPU over inference on a loaded machine. Threads it creates afterwards (llama.cpp's
/// OpenMP pool, ONNX Runtime's) inherit it. Failure is harmless and ignored.
pub fn lower_thread_priority() {
    set_thread_nice(10);
}

/// Sets the calling thread's nice value (-20..19; higher yields the CPU to the others). Failure
/// is harmless and ignored.
pub fn set_thread_nice(nice: i32) {
    // SAFETY: plain syscalls on the calling thread's own id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
}

/// Worker threads (per-call STT and LLM threads, the TTS thread, the conversation log writer)
/// that have been spawned and not yet finished. The process must not exit while one runs:
/// llama.cpp's threads segfault when the process tears down under them.
static WORKER_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Counts one worker thread while it lives: create it before spawning the thread and move it
/// into the thread's closure, so it is counted from the spawn to the thread's last statement.
#[derive(Debug)]
pub struct WorkerThread(());

impl WorkerThread {
    /// Counts a thread about to be spawned.
    pub fn enter() -> WorkerThread {
        WORKER_THREADS.fetch_add(1, Ordering::SeqCst);
        WorkerThread(())
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        WORKER_THREADS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Worker threads alive now (see [`WorkerThread`]).
pub fn worker_threads() -> usize {
    WORKER_THREADS.load(Ordering::SeqCst)
}

/// Waits until every [`WorkerThread`] has finished, at most `deadline`; true if they all did.
/// Call it after the engines and every call were dropped (their channels closing is what ends
/// the threads).
pub async fn wait_for_worker_threads(deadline: Duration) -> bool {
    let t = Instant::now();
    while worker_threads() > 0 {
        if t.elapsed() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Where each model file is, after the config and the manifest were read.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    /// Vosk model folder.
    pub stt: PathBuf,
    /// GGUF file; `None` with `[llm] backend = "openai"`, which needs no local model.
    pub llm: Option<PathBuf>,
    /// Piper `.onnx` file.
    pub tts: PathBuf,
    /// `libonnxruntime.so.1`.
    pub onnxruntime: PathBuf,
    /// Folder holding `espeak-ng-data/`.
    pub espeak_data: PathBuf,
}

const FIX: &str = "run `asterisk-voice-agent model-setup` (or set the path under [models] in the config)";

impl ModelPaths {
    /// Resolves every path from the config (explicit paths win over the manifest written by
    /// `model-setup`, `manifest`) and checks that each exists and is readable.
    pub fn resolve(cfg: &Config, manifest: &Result<Manifest>) -> Result<ModelPaths> {
        let m = &cfg.models;
        let pick = |explicit: &Option<PathBuf>, kind: crate::models::ModelKind, key: &str| -> Result<PathBuf> {
            if let Some(p) = explicit {
                return Ok(p.clone());
            }
            match manifest {
                Ok(man) => man
                    .path_for(kind)
                    .ok_or_else(|| anyhow!("the manifest in {} names no {key} model: {FIX}", m.dir.display())),
                Err(e) => Err(anyhow!("no [models] {key} path in the config and {e:#}")),
            }
        };
        let paths = ModelPaths {
            stt: pick(&m.stt, crate::models::ModelKind::Stt, "stt")?,
            llm: match cfg.llm.backend {
                crate::config::LlmBackendKind::Local => Some(pick(&m.llm, crate::models::ModelKind::Llm, "llm")?),
                crate::config::LlmBackendKind::Openai => None,
            },
            tts: pick(&m.tts, crate::models::ModelKind::Tts, "tts")?,
            onnxruntime: crate::models::native::find_onnxruntime(m.onnxruntime.as_deref())?,
            espeak_data: find_espeak_data(m.espeak_data.as_deref())?,
        };
        check_readable(&paths.stt, "Vosk model folder", true)?;
        if let Some(llm) = &paths.llm {
            check_readable(llm, "GGUF model", false)?;
        }
        check_readable(&paths.tts, "Piper voice", false)?;
        check_readable(&crate::tts::config_path(&paths.tts), "Piper voice config", false)?;
        Ok(paths)
    }
}

fn check_readable(p: &Path, what: &str, dir: bool) -> Result<()> {
    let meta =
        std::fs::metadata(p).map_err(|e| anyhow!("{what} {} is missing or unreadable ({e}): {FIX}", p.display()))?;
    if dir != meta.is_dir() {
        bail!(
            "{what} {} should be a {}: {FIX}",
            p.display(),
            if dir { "folder" } else { "file" }
        );
    }
    if !dir {
        std::fs::File::open(p).map_err(|e| anyhow!("{what} {} is unreadable ({e})", p.display()))?;
    }
    Ok(())
}

/// Finds the folder that contains `espeak-ng-data/`: the config, `PIPER_ESPEAKNG_DATA_DIRECTORY`,
/// beside the binary, then Debian's `/usr/lib/x86_64-linux-gnu`.
pub fn find_espeak_data(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = explicit.map(Path::to_path_buf).into_iter().collect();
    if explicit.is_none() {
        candidates.extend(std::env::var_os("PIPER_ESPEAKNG_DATA_DIRECTORY").map(PathBuf::from));
        candidates.extend(
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Path::to_path_buf)),
        );
        candidates.push(PathBuf::from("/usr/lib/x86_64-linux-gnu"));
        candidates.push(PathBuf::from("/usr/lib/aarch64-linux-gnu"));
        candidates.push(PathBuf::from("/usr/share"));
    }
    candidates
        .iter()
        .find(|c| c.join("espeak-ng-data/phontab").is_file())
        .cloned()
        .ok_or_else(|| anyhow!("no espeak-ng-data found in {candidates:?}: install Debian's espeak-ng-data package or set [models] espeak_data"))
}

impl Engines {
    /// Loads all three models in parallel. Takes about as long as the slowest one.
    pub fn load(cfg: &Config) -> Result<Engines> {
        let manifest = manifest::load(&cfg.models.dir);
        let paths = ModelPaths::resolve(cfg, &manifest)?;
        let tier = manifest.as_ref().ok();
        if let Some(m) = tier {
            tracing::info!(tier = m.tier(), dir = %cfg.models.dir.display(), "model manifest");
        }
        let started = Instant::now();
        let batched = cfg.llm.scheduler == crate::config::LlmScheduler::Batched;
        // A per-call context's prompt threads: the key, else the tier's when `llm.threads` is
        // not set either (then the tier's generating threads are used too), else as generating.
        let per_call_batch_threads = cfg.llm.batch_threads.or_else(|| {
            cfg.llm
                .threads
                .is_none()
                .then(|| tier.and_then(Manifest::llm_batch_threads))
                .flatten()
        });
        let llm_settings = LlmSettings {
            // issue 10: the shared context uses every physical core; a per-call one the tier's.
            threads: cfg
                .llm
                .threads
                .or_else(|| batched.then(physical_cores))
                .or_else(|| tier.and_then(Manifest::llm_threads))
                .unwrap_or(2),
            // The shared context evaluates prompts on its generating threads (the physical
            // cores) unless set.
            batch_threads: if batched {
                cfg.llm.batch_threads
            } else {
                per_call_batch_threads
            },
            context: cfg
                .llm
                .context
                .or_else(|| tier.and_then(Manifest::llm_context))
                .unwrap_or(2048),
            temperature: cfg.llm.temperature,
            seed: cfg.llm.seed,
            scheduler: cfg.llm.scheduler,
            sequences: cfg.server.max_calls as u32,
            kv_cache: cfg.llm.kv_cache,
        };
        let tts_settings = TtsSettings {
            length_scale: cfg.tts.length_scale,
            gain: cfg.tts.gain,
            threads: 1,
            memory_arena: cfg.tts.memory_arena,
            workers: cfg.tts.workers.unwrap_or_else(|| physical_cores().clamp(1, 4) as usize),
            order: cfg.tts.order,
            nice: cfg.tts.nice.clamp(0, 19),
        };
        // issue 10: the fallback model is used rarely: per-call contexts, created on first use,
        // cost nothing until then (a shared one would hold max_calls KV sequences from start).
        let fallback_llm_settings = LlmSettings {
            scheduler: crate::config::LlmScheduler::PerCall,
            threads: cfg
                .llm
                .threads
                .or_else(|| tier.and_then(Manifest::llm_threads))
                .unwrap_or(2),
            batch_threads: per_call_batch_threads,
            ..llm_settings.clone()
        };
        // The fallback voice speaks only when the main one fails: one worker is enough.
        let fallback_tts_settings = TtsSettings {
            workers: 1,
            ..tts_settings.clone()
        };
        let (llm_threads, llm_batch_threads) = (
            llm_settings.threads,
            llm_settings.batch_threads.unwrap_or(llm_settings.threads),
        );
        let (stt, llm, tts) = std::thread::scope(|s| {
            let stt = s.spawn(|| timed("stt", || SttEngine::load(&paths.stt)));
            let llm = s.spawn(|| {
                timed("llm", || match &paths.llm {
                    Some(gguf) => LlmEngine::load(gguf, llm_settings),
                    None => LlmEngine::openai(&cfg.llm),
                })
            });
            let tts = s.spawn(|| {
                timed("tts", || {
                    TtsEngine::load(&paths.tts, &paths.onnxruntime, &paths.espeak_data, tts_settings)
                })
            });
            (stt.join(), llm.join(), tts.join())
        });
        let stt = stt
            .map_err(|_| anyhow!("Vosk panicked while loading"))?
            .with_context(|| format!("loading Vosk model {}", paths.stt.display()))?;
        let llm = llm
            .map_err(|_| anyhow!("llama.cpp panicked while loading"))?
            .with_context(|| match &paths.llm {
                Some(gguf) => format!("loading GGUF {}", gguf.display()),
                None => "connecting to the OpenAI-compatible LLM server".into(),
            })?;
        let tts = tts
            .map_err(|_| anyhow!("Piper panicked while loading"))?
            .with_context(|| format!("loading Piper voice {}", paths.tts.display()))?;
        let fallback_llm = match &cfg.call.fallback_llm {
            Some(p) => {
                check_readable(p, "fallback GGUF model", false)?;
                let e = LlmEngine::load(p, fallback_llm_settings)
                    .with_context(|| format!("loading fallback GGUF {}", p.display()))?;
                Some(Arc::new(e))
            }
            None => None,
        };
        // Smart Turn, after ONNX Runtime was initialized by the voice.
        let turn = match cfg.turn.mode {
            crate::config::TurnMode::Smart => {
                let p = pick_onnx_model(cfg, &manifest, crate::models::ModelKind::Turn)?;
                check_readable(&p, "Smart Turn model", false)?;
                let e = timed("turn", || crate::smart_turn::SmartTurn::load(&p, &paths.onnxruntime))
                    .with_context(|| format!("loading Smart Turn model {}", p.display()))?;
                Some(Arc::new(e))
            }
            crate::config::TurnMode::Silence => None,
        };
        let vad = match cfg.vad.engine {
            crate::config::VadEngine::Silero => {
                let p = pick_onnx_model(cfg, &manifest, crate::models::ModelKind::Vad)?;
                check_readable(&p, "Silero VAD model", false)?;
                let e = timed("vad", || crate::silero::SileroModel::load(&p, &paths.onnxruntime))
                    .with_context(|| format!("loading Silero VAD model {}", p.display()))?;
                Some(Arc::new(e))
            }
            crate::config::VadEngine::Earshot => None,
        };
        let fallback_tts = match &cfg.call.fallback_voice {
            Some(p) => {
                check_readable(p, "fallback Piper voice", false)?;
                let e = TtsEngine::load(p, &paths.onnxruntime, &paths.espeak_data, fallback_tts_settings)
                    .with_context(|| format!("loading fallback Piper voice {}", p.display()))?;
                Some(Arc::new(e))
            }
            None => None,
        };
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            stt_rate = stt.sample_rate,
            voice_rate = tts.voice_rate_hz,
            fallback_llm = fallback_llm.is_some(),
            fallback_voice = fallback_tts.is_some(),
            llm_threads,
            llm_batch_threads,
            "models loaded"
        );
        Ok(Engines {
            stt: Arc::new(stt),
            llm: Arc::new(llm),
            tts: Arc::new(tts),
            fallback_llm,
            fallback_tts,
            turn,
            vad,
        })
    }
}

/// The `.onnx` of the Smart Turn (`kind` turn) or Silero VAD (`kind` vad) model: `[models] turn`
/// / `[models] vad`, else the manifest's model of that kind.
fn pick_onnx_model(cfg: &Config, manifest: &Result<Manifest>, kind: crate::models::ModelKind) -> Result<PathBuf> {
    let (explicit, why) = match kind {
        crate::models::ModelKind::Turn => (
            &cfg.models.turn,
            "turn.mode is \"smart\" (or set [turn] mode = \"silence\")",
        ),
        _ => (
            &cfg.models.vad,
            "vad.engine is \"silero\" (or set [vad] engine = \"earshot\")",
        ),
    };
    if let Some(p) = explicit {
        return Ok(p.clone());
    }
    match manifest {
        Ok(m) => m.path_for(kind).ok_or_else(|| {
            anyhow!(
                "{why}, but the manifest in {} names no {kind} model: run `asterisk-voice-agent model-setup` (or set [models] {kind})",
                cfg.models.dir.display()
            )
        }),
        Err(e) => Err(anyhow!("{why}, but there is no [models] {kind} path in the config and {e:#}")),
    }
}

/// issue 10: unless the config sets `server.max_calls`, takes the installed tier's measured
/// capacity (`llm.max_calls` in the manifest), if it has one. Call before [`Engines::load`]:
/// the batched LLM scheduler makes one KV sequence per call.
pub fn apply_tier_max_calls(cfg: &mut Config) {
    if cfg.server.max_calls_set {
        return;
    }
    if let Some(n) = manifest::load(&cfg.models.dir).ok().and_then(|m| m.max_calls()) {
        tracing::info!(max_calls = n, "server.max_calls from the installed tier");
        cfg.server.max_calls = (n as usize).max(1);
    }
}

/// issue 10: physical CPU cores (sysinfo), at least 1.
fn physical_cores() -> i32 {
    sysinfo::System::physical_core_count().unwrap_or(2).max(1) as i32
}

fn timed<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    let r = f();
    tracing::info!(
        model = what,
        ms = t.elapsed().as_millis() as u64,
        ok = r.is_ok(),
        "model load"
    );
    r
}
