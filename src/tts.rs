//! Text-to-speech with Piper: one loaded voice shared by all calls ([`TtsEngine`]), a few
//! synthesis workers each with its own ONNX Runtime session of it, taking sentences in the
//! order of src/synth_order.rs; the sentence splitter that turns streamed LLM tokens into
//! speakable sentences ([`SentenceSplitter`]), and the start-up check of ONNX Runtime and
//! espeak-ng data.

use crate::audio::{f32_to_i16, resample_all, trim_leading_silence};
use crate::config::TtsOrder;
use crate::synth_order::SynthQueue;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;

/// Settings for the voice.
#[derive(Debug, Clone)]
pub struct TtsSettings {
    /// Piper length scale (speaking rate), `None` for the voice's own.
    pub length_scale: Option<f32>,
    /// Linear gain on the output.
    pub gain: f32,
    /// ONNX Runtime intra-op threads per worker.
    pub threads: usize,
    /// ONNX Runtime's CPU memory arena and memory patterns on (`tts.memory_arena`): a little
    /// faster, but the arena keeps the buffers of every sentence length it has seen.
    pub memory_arena: bool,
    /// Synthesis workers (`tts.workers`), each with its own session of the voice; at least 1.
    pub workers: usize,
    /// Which waiting sentence a free worker takes (`tts.order`).
    pub order: TtsOrder,
    /// The workers' nice value (`tts.nice`, 0..19; higher yields the CPU to the others).
    pub nice: i32,
}

/// One synthesized sentence.
#[derive(Debug, Clone)]
pub struct Speech {
    /// Mono samples at `rate_hz`.
    pub samples: Vec<i16>,
    /// Sample rate in Hz (the rate asked for).
    pub rate_hz: u32,
    /// Milliseconds spent synthesizing and resampling.
    pub synth_ms: u64,
    /// Milliseconds the sentence waited for a free worker before that.
    pub wait_ms: u64,
}

struct Job {
    text: String,
    rate_hz: u32,
    asked: Instant,
    reply: oneshot::Sender<Result<Speech>>,
}

/// The queue the workers share.
struct Pending {
    queue: SynthQueue<Job>,
    /// The engine was dropped: workers stop.
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
}

/// espeak-ng keeps global state and is not thread-safe: every phonemization in the process
/// (all workers of the main and the fallback voice) takes this lock. It holds for a fraction
/// of a millisecond per sentence; the ONNX inference, which is most of the cost, runs
/// outside it.
static ESPEAK: Mutex<()> = Mutex::new(());

/// A loaded Piper voice behind `workers` synthesis threads. Requests from all calls queue for
/// them in `order`; at a real-time factor of about 0.1 a sentence takes 0.1-0.3 s.
pub struct TtsEngine {
    shared: Arc<Shared>,
    /// The voice's native sample rate in Hz (22050 for the medium voices).
    pub voice_rate_hz: u32,
    /// The `.onnx` file.
    pub path: PathBuf,
    /// Synthesis workers running.
    pub workers: usize,
    greetings: Mutex<HashMap<(String, u32), Arc<Vec<i16>>>>,
}

impl Drop for TtsEngine {
    fn drop(&mut self) {
        self.shared.pending.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.shared.ready.notify_all();
    }
}

/// One worker's copy of the voice.
struct Voice {
    piper: piper_rs::Piper,
    espeak_voice: String,
}

impl Voice {
    fn load(onnx: &Path, config_json: &str, json: &Path, settings: &TtsSettings) -> Result<Voice> {
        let config: piper_rs::ModelConfig = serde_json::from_str(config_json)
            .with_context(|| format!("{} is not a Piper voice config", json.display()))?;
        let espeak_voice = config.espeak.voice.clone();
        let session = ort::session::Session::builder()
            .and_then(|b| b.with_intra_threads(settings.threads).map_err(Into::into))
            .and_then(|b| {
                if settings.memory_arena {
                    return Ok(b);
                }
                // The arena grows to the largest buffers of each shape it has met and keeps
                // them: with sentences of every length, RSS kept growing (issue 7's soak).
                b.with_memory_pattern(false)
                    .and_then(|b| {
                        b.with_execution_providers([ort::ep::CPU::default().with_arena_allocator(false).build()])
                    })
                    .map_err(Into::into)
            })
            .and_then(|mut b| b.commit_from_file(onnx))
            .with_context(|| format!("ONNX Runtime could not load the voice {}", onnx.display()))?;
        let mut voice = Voice {
            piper: piper_rs::Piper::from_session(session, config),
            espeak_voice,
        };
        // One synthesis proves espeak-ng and the voice work before any call arrives.
        voice.synthesize("Ready.", settings).context("test synthesis failed")?;
        Ok(voice)
    }

    /// `text` as f32 samples at the voice's rate.
    fn synthesize(&mut self, text: &str, settings: &TtsSettings) -> Result<(Vec<f32>, u32)> {
        let phonemes = {
            let _one_at_a_time = ESPEAK.lock().unwrap_or_else(|e| e.into_inner());
            espeak_rs::text_to_phonemes(text, &self.espeak_voice, None)
                .map_err(|e| anyhow::anyhow!("Piper phonemization failed: {e}"))?
                .join(" ")
        };
        self.piper
            .create(&phonemes, true, None, settings.length_scale, None, None)
            .map_err(|e| anyhow::anyhow!("Piper synthesis failed: {e}"))
    }

    /// Serves jobs until the engine is dropped.
    fn work(mut self, shared: Arc<Shared>, settings: TtsSettings) {
        let cost = crate::metrics::AudioCost::new("tts");
        loop {
            let job = {
                let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if pending.closed {
                        return;
                    }
                    if let Some(job) = pending.queue.pop() {
                        break job;
                    }
                    pending = shared.ready.wait(pending).unwrap_or_else(|e| e.into_inner());
                }
            };
            let started = Instant::now();
            let wait = started.duration_since(job.asked);
            crate::metrics::tts_wait(wait);
            let wait_ms = wait.as_millis() as u64;
            let result = self
                .synthesize(&job.text, &settings)
                .and_then(|(samples, rate)| {
                    let pcm = f32_to_i16(&samples, settings.gain);
                    resample_all(&pcm, rate, job.rate_hz)
                })
                .map(|mut samples| {
                    // Piper's ~40 ms of padding would only delay the first word.
                    trim_leading_silence(&mut samples, job.rate_hz);
                    let took = started.elapsed();
                    cost.record(took, samples.len() as f64 / job.rate_hz.max(1) as f64);
                    Speech {
                        samples,
                        rate_hz: job.rate_hz,
                        synth_ms: took.as_millis() as u64,
                        wait_ms,
                    }
                });
            if let Ok(s) = &result {
                tracing::debug!(
                    wait_ms,
                    synth_ms = s.synth_ms,
                    chars = job.text.len(),
                    "sentence synthesized"
                );
            }
            let _ = job.reply.send(result);
        }
    }
}

impl TtsEngine {
    /// Loads the Piper voice `onnx` (with `<onnx>.json` beside it) using the ONNX Runtime
    /// library at `onnxruntime` and the espeak-ng data under `espeak_data/espeak-ng-data`,
    /// once per worker (in parallel), and starts the workers.
    ///
    /// # Errors
    /// If a file is missing, ONNX Runtime cannot be loaded or the voice does not load.
    pub fn load(onnx: &Path, onnxruntime: &Path, espeak_data: &Path, settings: TtsSettings) -> Result<TtsEngine> {
        let json = config_path(onnx);
        for f in [onnx, &json, onnxruntime] {
            if !f.is_file() {
                bail!("{} is missing", f.display());
            }
        }
        if !espeak_data.join("espeak-ng-data").is_dir() {
            bail!(
                "{} has no espeak-ng-data folder (install Debian's espeak-ng-data package)",
                espeak_data.display()
            );
        }
        // espeak-rs reads this to find the phoneme data; set it before first use.
        std::env::set_var("PIPER_ESPEAKNG_DATA_DIRECTORY", espeak_data);
        // The path was checked above: ort rc.12 hangs forever on a path that does not exist.
        ort::init_from(onnxruntime)
            .with_context(|| format!("cannot load ONNX Runtime from {}", onnxruntime.display()))?
            .commit();
        let config_json = std::fs::read_to_string(&json).with_context(|| format!("cannot read {}", json.display()))?;
        let voice_rate_hz = serde_json::from_str::<piper_rs::ModelConfig>(&config_json)
            .with_context(|| format!("{} is not a Piper voice config", json.display()))?
            .audio
            .sample_rate;
        let workers = settings.workers.max(1);
        let voices: Vec<Result<Voice>> = std::thread::scope(|s| {
            let loads: Vec<_> = (0..workers)
                .map(|_| s.spawn(|| Voice::load(onnx, &config_json, &json, &settings)))
                .collect();
            loads
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("loading the voice panicked")))
                })
                .collect()
        });
        let voices = voices.into_iter().collect::<Result<Vec<Voice>>>()?;

        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                queue: SynthQueue::new(settings.order),
                closed: false,
            }),
            ready: Condvar::new(),
        });
        for (i, voice) in voices.into_iter().enumerate() {
            let live = crate::engines::WorkerThread::enter();
            let shared = shared.clone();
            let settings = settings.clone();
            std::thread::Builder::new().name(format!("tts-{i}")).spawn(move || {
                let _live = live;
                crate::engines::set_thread_nice(settings.nice);
                voice.work(shared, settings);
            })?;
        }
        Ok(TtsEngine {
            shared,
            voice_rate_hz,
            path: onnx.to_path_buf(),
            workers,
            greetings: Mutex::default(),
        })
    }

    /// Synthesizes `text` at `rate_hz`, due at once (a fixed prompt, a reply's first
    /// sentence). Runs on a synthesis worker; awaiting it does not block the async runtime.
    ///
    /// # Errors
    /// If synthesis fails or the engine is shutting down.
    pub async fn synthesize(&self, text: &str, rate_hz: u32) -> Result<Speech> {
        self.synthesize_by(text, rate_hz, Instant::now()).await
    }

    /// Synthesizes `text` at `rate_hz`, needed by `deadline` (for a reply's later sentence:
    /// when the audio queued before it will have played). With `tts.order = "deadline"` the
    /// sentence with the earliest deadline is synthesized first (src/synth_order.rs).
    ///
    /// # Errors
    /// If synthesis fails or the engine is shutting down.
    pub async fn synthesize_by(&self, text: &str, rate_hz: u32, deadline: Instant) -> Result<Speech> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            text: text.to_string(),
            rate_hz,
            asked: Instant::now(),
            reply,
        };
        {
            let mut pending = self.shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.closed {
                bail!("TTS has stopped");
            }
            pending.queue.push(job, deadline);
        }
        self.shared.ready.notify_one();
        rx.await
            .map_err(|_| anyhow::anyhow!("TTS stopped before synthesizing the sentence"))?
    }

    /// A prompt rendered earlier by [`Self::cached`], without synthesizing: usable when
    /// synthesis itself is failing.
    pub fn get_cached(&self, text: &str, rate_hz: u32) -> Option<Arc<Vec<i16>>> {
        self.greetings
            .lock()
            .unwrap()
            .get(&(text.to_string(), rate_hz))
            .cloned()
    }

    /// A fixed prompt (the greeting) at `rate_hz`, synthesized once and cached.
    pub async fn cached(&self, text: &str, rate_hz: u32) -> Result<Arc<Vec<i16>>> {
        let key = (text.to_string(), rate_hz);
        if let Some(s) = self.greetings.lock().unwrap().get(&key) {
            return Ok(s.clone());
        }
        let speech = Arc::new(self.synthesize(text, rate_hz).await?.samples);
        self.greetings.lock().unwrap().insert(key, speech.clone());
        Ok(speech)
    }
}

/// The `.onnx.json` beside a Piper `.onnx` file.
pub fn config_path(onnx: &Path) -> PathBuf {
    let mut s = onnx.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

/// Turns streamed LLM text into sentences for synthesis, so the first sentence is spoken while
/// the rest is still being generated.
#[derive(Debug, Default)]
pub struct SentenceSplitter {
    buf: String,
    /// Pieces returned so far.
    emitted: usize,
}

impl SentenceSplitter {
    /// Longest piece (chars) sent to TTS in one go; longer text is cut at a space.
    pub const MAX_CHARS: usize = 200;

    /// Adds generated text; returns the sentences it completed, cleaned for speech.
    pub fn push(&mut self, text: &str) -> Vec<String> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            // The reply's first piece may end at a clause comma, so the caller hears
            // "Of course," while the rest of the sentence is still being generated.
            let first_clause = if self.emitted == 0 { clause_end(&self.buf) } else { None };
            let cut = first_clause.or_else(|| sentence_end(&self.buf)).or_else(|| {
                // Too long without a sentence end: cut at the last space within MAX_CHARS.
                let limit = self.buf.char_indices().nth(Self::MAX_CHARS).map(|(i, _)| i)?;
                Some(self.buf[..limit].rfind(' ').filter(|&i| i > 0).unwrap_or(limit))
            });
            let Some(cut) = cut else { break };
            let rest = self.buf.split_off(cut);
            let sentence = std::mem::replace(&mut self.buf, rest);
            if let Some(s) = speakable(&sentence) {
                out.push(s);
                self.emitted += 1;
            }
        }
        out
    }

    /// Returns what is left at the end of the reply, if it has anything to say.
    pub fn finish(&mut self) -> Option<String> {
        speakable(&std::mem::take(&mut self.buf))
    }
}

/// Byte index just past a comma (followed by white space) that ends a clause of at least
/// [`MIN_CLAUSE_WORDS`] words, if it comes before any sentence end.
fn clause_end(s: &str) -> Option<usize> {
    let limit = sentence_end(s).unwrap_or(s.len());
    s.match_indices(", ")
        .map(|(i, _)| i)
        .take_while(|&i| i < limit)
        .find(|&i| s[..i].split_whitespace().count() >= MIN_CLAUSE_WORDS)
        .map(|i| i + 1)
}

/// Fewest words in a first clause cut at a comma.
const MIN_CLAUSE_WORDS: usize = 2;

/// Byte index just past the first sentence end (`.`, `!`, `?` followed by white space, or a
/// newline) in `s`.
fn sentence_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    for i in 0..b.len() {
        if b[i] == b'\n' {
            return Some(i + 1);
        }
        if matches!(b[i], b'.' | b'!' | b'?') && b.get(i + 1).is_some_and(|c| c.is_ascii_whitespace()) {
            // "e.g. " and single capitals ("J. Smith") are not sentence ends.
            let word = s[..i].rsplit(|c: char| c.is_whitespace()).next().unwrap_or("");
            if b[i] == b'.' && (word.len() == 1 || word.contains('.')) {
                continue;
            }
            return Some(i + 1);
        }
    }
    None
}

/// Strips what a voice cannot say (markdown, emoji) and collapses white space; `None` when
/// nothing speakable is left.
pub fn speakable(s: &str) -> Option<String> {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || " .,;:!?'\"-()%$&/".contains(c) {
                c
            } else {
                ' '
            }
        })
        .collect();
    let joined = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    joined.chars().any(|c| c.is_alphanumeric()).then_some(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_streamed_tokens_into_sentences() {
        let mut s = SentenceSplitter::default();
        let mut got = Vec::new();
        for tok in [
            "Of",
            " course",
            "!",
            " We open at 9",
            " a.m. on",
            " Saturday",
            ".",
            " **See** you",
            " then",
        ] {
            got.extend(s.push(tok));
        }
        assert_eq!(
            got,
            vec!["Of course!".to_string(), "We open at 9 a.m. on Saturday.".to_string()]
        );
        assert_eq!(s.finish().as_deref(), Some("See you then"));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn first_clause_is_cut_at_a_comma_only_once() {
        let mut s = SentenceSplitter::default();
        let mut got = Vec::new();
        for tok in [
            "Yes",
            ",",
            " of course",
            ",",
            " we",
            " can",
            ", gladly",
            ". Then",
            ", later",
            ".",
        ] {
            got.extend(s.push(tok));
        }
        got.extend(s.finish());
        // "Yes," is one word: no cut there; "Yes, of course," is the first clause; then whole
        // sentences only.
        assert_eq!(got, vec!["Yes, of course,", "we can, gladly.", "Then, later."]);
    }

    #[test]
    fn long_text_is_cut_and_symbols_dropped() {
        let mut s = SentenceSplitter::default();
        let long = "word ".repeat(60);
        let got = s.push(&long);
        assert_eq!(got.len(), 1);
        assert!(got[0].len() <= SentenceSplitter::MAX_CHARS);
        assert_eq!(speakable("🙂 ** ##"), None);
        assert_eq!(speakable("  Hi *there*  "), Some("Hi there".into()));
    }
}
