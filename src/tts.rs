//! Text-to-speech with Piper: one loaded voice on one synthesis thread shared by all calls
//! ([`TtsEngine`]), the sentence splitter that turns streamed LLM tokens into speakable
//! sentences ([`SentenceSplitter`]), and the start-up check of ONNX Runtime and espeak-ng data.

use crate::audio::{f32_to_i16, resample_all, trim_leading_silence};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;

/// Settings for the voice.
#[derive(Debug, Clone)]
pub struct TtsSettings {
    /// Piper length scale (speaking rate), `None` for the voice's own.
    pub length_scale: Option<f32>,
    /// Linear gain on the output.
    pub gain: f32,
    /// ONNX Runtime intra-op threads.
    pub threads: usize,
    /// ONNX Runtime's CPU memory arena and memory patterns on (`tts.memory_arena`): a little
    /// faster, but the arena keeps the buffers of every sentence length it has seen.
    pub memory_arena: bool,
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
}

struct Job {
    text: String,
    rate_hz: u32,
    reply: oneshot::Sender<Result<Speech>>,
}

/// A loaded Piper voice behind one synthesis thread. Requests from all calls queue there; at
/// a real-time factor of about 0.05 a sentence takes 0.1-0.2 s, so the queue stays short.
pub struct TtsEngine {
    tx: std_mpsc::Sender<Job>,
    /// The voice's native sample rate in Hz (22050 for the medium voices).
    pub voice_rate_hz: u32,
    /// The `.onnx` file.
    pub path: PathBuf,
    greetings: Mutex<HashMap<(String, u32), Arc<Vec<i16>>>>,
}

impl TtsEngine {
    /// Loads the Piper voice `onnx` (with `<onnx>.json` beside it) using the ONNX Runtime
    /// library at `onnxruntime` and the espeak-ng data under `espeak_data/espeak-ng-data`.
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
        // piper-rs's espeak-rs reads this to find the phoneme data; set it before first use.
        std::env::set_var("PIPER_ESPEAKNG_DATA_DIRECTORY", espeak_data);
        // The path was checked above: ort rc.12 hangs forever on a path that does not exist.
        ort::init_from(onnxruntime)
            .with_context(|| format!("cannot load ONNX Runtime from {}", onnxruntime.display()))?
            .commit();
        let config: piper_rs::ModelConfig = serde_json::from_reader(std::fs::File::open(&json)?)
            .with_context(|| format!("{} is not a Piper voice config", json.display()))?;
        let voice_rate_hz = config.audio.sample_rate;
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
        let mut piper = piper_rs::Piper::from_session(session, config);
        // One synthesis proves espeak-ng and the voice work before any call arrives.
        piper
            .create("Ready.", false, None, settings.length_scale, None, None)
            .context("test synthesis failed")?;

        let (tx, rx) = std_mpsc::channel::<Job>();
        let live = crate::engines::WorkerThread::enter();
        std::thread::Builder::new().name("tts".into()).spawn(move || {
            let _live = live;
            crate::engines::lower_thread_priority();
            let cost = crate::metrics::AudioCost::new("tts");
            for job in rx {
                let started = Instant::now();
                let result = piper
                    .create(&job.text, false, None, settings.length_scale, None, None)
                    .map_err(|e| anyhow::anyhow!("Piper synthesis failed: {e}"))
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
                        }
                    });
                let _ = job.reply.send(result);
            }
        })?;
        Ok(TtsEngine {
            tx,
            voice_rate_hz,
            path: onnx.to_path_buf(),
            greetings: Mutex::default(),
        })
    }

    /// Synthesizes `text` at `rate_hz`. Runs on the synthesis thread; awaiting it does not
    /// block the async runtime.
    pub async fn synthesize(&self, text: &str, rate_hz: u32) -> Result<Speech> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            text: text.to_string(),
            rate_hz,
            reply,
        };
        self.tx
            .send(job)
            .map_err(|_| anyhow::anyhow!("TTS thread has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("TTS thread dropped the request"))?
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
