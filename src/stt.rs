//! Speech-to-text with Vosk: one loaded model shared by all calls ([`SttEngine`]) and one
//! recognizer per call on its own thread ([`SttStream`]), fed the caller's audio as it arrives
//! and asked for the final text when the VAD declares the end of an utterance. Recognizers are
//! kept for the next call when a call ends ([`crate::recognizer_pool`]).

use crate::audio::StreamResampler;
use crate::recognizer_pool::{Pooled, RecognizerPool, Returned};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;

/// A loaded Vosk model, shared by every call.
pub struct SttEngine {
    model: Arc<vosk::Model>,
    /// The sample rate (Hz) the model's features expect (`--sample-frequency` in
    /// `conf/mfcc.conf`; 16000 when absent).
    pub sample_rate: u32,
    /// The model folder.
    pub path: PathBuf,
    /// Recognizers of ended calls, reset, for the next calls.
    pool: Arc<Pool>,
}

/// Speech that warms a fresh recognizer: mono samples and their rate (Hz).
type WarmSpeech = Arc<(Vec<i16>, u32)>;

/// Recognizers kept between calls ([`crate::recognizer_pool`]), and the speech that warms a
/// fresh one.
///
/// A fresh libvosk recognizer is slow on its first utterances with a lookahead model
/// (`Gr.fst` and `HCLr.fst`, as the small Vosk models and the test tier's Korean one ship):
/// measured with libvosk 0.3.45 on this project's 2-core machine, a fresh recognizer decoded a
/// 3.9 s utterance at a real-time factor of 1.8-2.1 with one 20 ms chunk taking ~3 s; the same
/// recognizer, reset after the utterance, decoded the next ones at 0.2-0.9 (its on-the-fly
/// composition caches are kept by `vosk_recognizer_reset`). Creating one also costs ~300 ms. So a
/// recognizer is reset and kept when its call ends, and the next call starts with it; and
/// `server.warm_recognizers` are warmed at start-up ([`SttEngine::warm_up`]). The pool holds
/// at most as many recognizers as were ever in use at once plus those warmed (each bounded by
/// `server.max_calls`), and at most [`RecognizerPool::MAX`]. Those caches also grow with use
/// and never shrink: with `server.recognizer_max_calls` (default 50; 0: never), a recognizer
/// is replaced after that many calls by a fresh one warmed in the background on the same
/// speech.
#[derive(Default)]
struct Pool {
    inner: Mutex<RecognizerPool<vosk::Recognizer>>,
    /// The rendered prompts (mono samples, their rate in Hz) that warm a fresh recognizer;
    /// none before [`SttEngine::warm_up`].
    warm_speech: Mutex<Option<WarmSpeech>>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecognizerPool<vosk::Recognizer>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self) -> Option<Pooled<vosk::Recognizer>> {
        let mut pool = self.lock();
        let rec = pool.take();
        crate::metrics::METRICS.stt_recognizers_idle.set(pool.idle() as i64);
        rec
    }

    /// Resets `rec` (the decoder state; its caches stay) and keeps it, unless it is dropped
    /// (the pool is full, or it was worn out and its replacement is ready). Says whether a
    /// replacement should be built.
    fn give_back(&self, mut p: Pooled<vosk::Recognizer>) -> Returned {
        p.rec.reset();
        self.settle(|pool| pool.give_back(p))
    }

    /// A fresh warmed recognizer joins the pool (see [`RecognizerPool::add_fresh`]).
    fn add_fresh(&self, rec: vosk::Recognizer, replaces: bool) {
        self.settle(|pool| pool.add_fresh(rec, replaces));
    }

    /// Runs `op` on the pool under its lock, updates the metrics, and drops what `op` handed
    /// back after the lock (freeing a recognizer takes a while).
    fn settle(
        &self,
        op: impl FnOnce(&mut RecognizerPool<vosk::Recognizer>) -> (Returned, Option<vosk::Recognizer>),
    ) -> Returned {
        let (returned, dropped) = {
            let mut pool = self.lock();
            let r = op(&mut pool);
            crate::metrics::METRICS.stt_recognizers_idle.set(pool.idle() as i64);
            r
        };
        drop(dropped);
        if returned == Returned::Retired {
            crate::metrics::METRICS.stt_recognizers_replaced.inc();
        }
        returned
    }

    /// Starts warming a replacement for a recognizer worn out after `calls` calls, on the
    /// speech kept by [`SttEngine::warm_up`] (cold if none). A failure is logged: the worn one
    /// goes on serving.
    fn replace_worn(self: &Arc<Self>, model: Arc<vosk::Model>, model_rate_hz: u32, calls: u32) {
        tracing::info!(
            calls,
            "STT recognizer worn (its caches only grow): warming a replacement"
        );
        let speech = self.warm_speech.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Err(e) = spawn_warm(model, model_rate_hz, Arc::downgrade(self), speech, 1, true) {
            tracing::warn!("cannot replace a worn STT recognizer: {e:#}");
        }
    }
}

/// Builds `count` fresh recognizers for the pool on one background thread at the lowest
/// priority (nice 19); each decodes `speech` (mono samples, their rate in Hz; none: it goes in
/// cold), is reset and goes to the pool, replacing a worn one when `replaces`. Stops early
/// once the engine is dropped. Returns at once.
///
/// # Errors
/// If the thread cannot be spawned or the speech's rate cannot be resampled to the model's.
fn spawn_warm(
    model: Arc<vosk::Model>,
    model_rate_hz: u32,
    pool: std::sync::Weak<Pool>,
    speech: Option<WarmSpeech>,
    count: usize,
    replaces: bool,
) -> Result<()> {
    let mut resampler = match &speech {
        Some(s) => Some(StreamResampler::new(s.1, model_rate_hz, 20)?),
        None => None,
    };
    let live = crate::engines::WorkerThread::enter();
    std::thread::Builder::new().name("stt-warm-up".into()).spawn(move || {
        let _live = live;
        crate::engines::set_thread_nice(19);
        let started = Instant::now();
        let mut buf = Vec::with_capacity(640);
        for n in 0..count {
            let Some(mut rec) = vosk::Recognizer::new(&model, model_rate_hz as f32) else {
                tracing::error!("libvosk could not create a recognizer to warm");
                return;
            };
            if let (Some(speech), Some(resampler)) = (&speech, resampler.as_mut()) {
                let (samples, rate_hz) = (&speech.0, speech.1);
                for chunk in samples.chunks((rate_hz / 50).max(1) as usize) {
                    if pool.strong_count() == 0 {
                        return;
                    }
                    buf.clear();
                    resampler.push(chunk, &mut buf);
                    let _ = rec.accept_waveform(&buf);
                }
                buf.clear();
                resampler.flush(&mut buf);
                let _ = rec.accept_waveform(&buf);
                let _ = rec.final_result();
                rec.reset();
            }
            let Some(pool) = pool.upgrade() else { return };
            pool.add_fresh(rec, replaces);
            tracing::info!(
                n = n + 1,
                of = count,
                replaces,
                ms = started.elapsed().as_millis() as u64,
                "STT recognizer warmed"
            );
        }
    })?;
    Ok(())
}

impl SttEngine {
    /// Warms `count` recognizers for the first calls: on one background thread at the lowest
    /// priority (nice 19), each new recognizer decodes `speech` (mono samples at `rate_hz`, a
    /// few seconds of speech: the rendered prompts), is reset and goes to the pool. `speech` is
    /// kept to warm the replacements of worn recognizers (`max_calls`: a recognizer is replaced
    /// after serving that many calls; 0 never). Stops early once the engine is dropped. Returns
    /// at once.
    ///
    /// # Errors
    /// If the thread cannot be spawned or `rate_hz` cannot be resampled to the model's rate.
    pub fn warm_up(&self, speech: Vec<i16>, rate_hz: u32, count: usize, max_calls: u32) -> Result<()> {
        self.pool.lock().set_max_calls(max_calls);
        if speech.is_empty() {
            return Ok(());
        }
        let speech = Arc::new((speech, rate_hz));
        *self.pool.warm_speech.lock().unwrap_or_else(|e| e.into_inner()) = Some(speech.clone());
        if count == 0 {
            return Ok(());
        }
        spawn_warm(
            self.model.clone(),
            self.sample_rate,
            Arc::downgrade(&self.pool),
            Some(speech),
            count,
            false,
        )
    }

    /// Loads the Vosk model folder at `path`.
    ///
    /// # Errors
    /// If the folder is missing or is not a Vosk model (libvosk's `Model::new` fails).
    pub fn load(path: &Path) -> Result<SttEngine> {
        if !path.join("am").is_dir() && !path.join("conf").is_dir() {
            bail!("{} is not a Vosk model folder (no am/ or conf/ inside)", path.display());
        }
        vosk::set_log_level(vosk::LogLevel::Error);
        let model = vosk::Model::new(path.to_string_lossy())
            .with_context(|| format!("libvosk could not load the model in {}", path.display()))?;
        let sample_rate = model_sample_rate(path).unwrap_or(16000);
        Ok(SttEngine {
            model: Arc::new(model),
            sample_rate,
            path: path.to_path_buf(),
            pool: Arc::default(),
        })
    }

    /// Starts a recognizer for one call whose audio arrives at `call_rate_hz`. Results come
    /// back on the returned receiver.
    pub fn start_stream(
        &self,
        call_id: &str,
        call_rate_hz: u32,
    ) -> Result<(SttStream, mpsc::UnboundedReceiver<SttResult>)> {
        let mut resampler = StreamResampler::new(call_rate_hz, self.sample_rate, 20)?;
        let (cmd_tx, cmd_rx) = std_mpsc::channel::<Command>();
        let (res_tx, res_rx) = mpsc::unbounded_channel();
        let (model, model_rate_hz, pool) = (self.model.clone(), self.sample_rate, self.pool.clone());
        let live = crate::engines::WorkerThread::enter();
        let queued = Arc::new(AtomicUsize::new(0));
        let queued_in_thread = queued.clone();
        let closed = Arc::new(AtomicBool::new(false));
        let closed_in_thread = closed.clone();
        let id = call_id.to_string();
        std::thread::Builder::new()
            .name(format!("stt-{}", &call_id[..8.min(call_id.len())]))
            .spawn(move || {
                let _live = live;
                crate::engines::lower_thread_priority();
                // Created here, not on the caller's (async) thread: with a large model this
                // takes tens of ms, which would stall other calls' audio pacing.
                let (mut pooled, reused) = match pool.take() {
                    Some(p) => (p, true),
                    None => match vosk::Recognizer::new(&model, model_rate_hz as f32) {
                        Some(rec) => (Pooled::new(rec), false),
                        None => {
                            tracing::error!("libvosk could not create a recognizer: this call gets no transcripts");
                            return;
                        }
                    },
                };
                tracing::debug!(call_id = %id, reused, calls = pooled.calls, "STT recognizer ready");
                let rec = &mut pooled.rec;
                let cost = crate::metrics::AudioCost::new("stt");
                let mut buf = Vec::with_capacity(640);
                let mut text = String::new();
                for cmd in cmd_rx {
                    if closed_in_thread.load(Ordering::Relaxed) {
                        // The call has ended: what is still queued (up to MAX_QUEUED_SECONDS
                        // of audio) would be decoded for nobody, taking CPU from live calls.
                        tracing::debug!(
                            call_id = %id,
                            queued_samples = queued_in_thread.load(Ordering::Relaxed),
                            "STT stopped: the call ended"
                        );
                        break;
                    }
                    match cmd {
                        Command::Audio(samples) => {
                            queued_in_thread.fetch_sub(samples.len(), Ordering::Relaxed);
                            let started = Instant::now();
                            buf.clear();
                            resampler.push(&samples, &mut buf);
                            if let Ok(vosk::DecodingState::Finalized) = rec.accept_waveform(&buf) {
                                // Vosk's own endpoint inside a long utterance: keep its text.
                                push_words(&mut text, rec.result().single().map(|r| r.text).unwrap_or(""));
                            }
                            cost.record(started.elapsed(), samples.len() as f64 / call_rate_hz.max(1) as f64);
                        }
                        Command::Finish(asked) => {
                            let started = Instant::now();
                            buf.clear();
                            resampler.flush(&mut buf);
                            let _ = rec.accept_waveform(&buf);
                            push_words(&mut text, rec.final_result().single().map(|r| r.text).unwrap_or(""));
                            rec.reset();
                            cost.record(started.elapsed(), 0.0);
                            let result = SttResult {
                                text: std::mem::take(&mut text),
                                finish_ms: asked.elapsed().as_millis() as u64,
                            };
                            if res_tx.send(result).is_err() {
                                break;
                            }
                        }
                        Command::SoFar(reply) => {
                            // Finalize what was heard up to the pause and keep it: the rest of
                            // the utterance (if the caller goes on) is appended, as after
                            // Vosk's own endpoint above.
                            let started = Instant::now();
                            buf.clear();
                            resampler.flush(&mut buf);
                            let _ = rec.accept_waveform(&buf);
                            push_words(&mut text, rec.final_result().single().map(|r| r.text).unwrap_or(""));
                            rec.reset();
                            cost.record(started.elapsed(), 0.0);
                            let _ = reply.send(text.clone());
                        }
                        Command::Partial(reply) => {
                            // Vosk's current best path: no finalizing, nothing reset.
                            let started = Instant::now();
                            let mut so_far = text.clone();
                            push_words(&mut so_far, rec.partial_result().partial);
                            cost.record(started.elapsed(), 0.0);
                            let _ = reply.send(so_far);
                        }
                        Command::Discard => {
                            rec.reset();
                            text.clear();
                        }
                    }
                }
                if let Returned::Replace { calls } = pool.give_back(pooled) {
                    pool.replace_worn(model, model_rate_hz, calls);
                }
            })?;
        Ok((
            SttStream {
                tx: cmd_tx,
                closed,
                queued,
                rate_hz: call_rate_hz,
                dropping: false,
            },
            res_rx,
        ))
    }
}

/// Reads `--sample-frequency=N` from the model's `conf/mfcc.conf`.
fn model_sample_rate(path: &Path) -> Option<u32> {
    let conf = std::fs::read_to_string(path.join("conf/mfcc.conf")).ok()?;
    conf.lines()
        .find_map(|l| l.trim().strip_prefix("--sample-frequency=")?.trim().parse().ok())
}

fn push_words(text: &mut String, words: &str) {
    let words = words.trim();
    if !words.is_empty() {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(words);
    }
}

enum Command {
    Audio(Vec<i16>),
    Finish(Instant),
    SoFar(tokio::sync::oneshot::Sender<String>),
    Partial(tokio::sync::oneshot::Sender<String>),
    Discard,
}

impl Drop for SttStream {
    fn drop(&mut self) {
        tracing::debug!("STT stream dropped");
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// The final text of one utterance.
#[derive(Debug, Clone)]
pub struct SttResult {
    /// What Vosk heard; empty when it recognized nothing.
    pub text: String,
    /// Milliseconds from the endpoint ([`SttStream::finish`]) to this result: Vosk's own share
    /// of the latency (finishing the queued audio and the final decode).
    pub finish_ms: u64,
}

/// Caller audio queued for one recognizer and not yet decoded is capped at this many seconds
/// (audio arriving faster than Vosk decodes it, e.g. a peer sending faster than real time);
/// beyond it new audio is dropped with a warning.
pub const MAX_QUEUED_SECONDS: usize = 5;

/// One call's recognizer. Dropping it stops its thread after the command being decoded,
/// without decoding what is still queued.
pub struct SttStream {
    tx: std_mpsc::Sender<Command>,
    /// Set when the stream is dropped: the thread stops at its next command.
    closed: Arc<AtomicBool>,
    /// Samples sent to the thread and not yet decoded.
    queued: Arc<AtomicUsize>,
    /// The call's sample rate (Hz), 0 for a detached stream: the queue holds at most
    /// [`MAX_QUEUED_SECONDS`] of audio at it, and [`Self::backlog_ms`] counts in it.
    rate_hz: u32,
    /// Audio is being dropped (logged once per overflow).
    dropping: bool,
}

impl SttStream {
    /// A stream with no recognizer behind it (nothing is decoded, no result ever comes), for a
    /// call whose first audio frame has not arrived yet; see [`SttEngine::start_stream`].
    pub fn detached() -> (SttStream, mpsc::UnboundedReceiver<SttResult>) {
        let (tx, _) = std_mpsc::channel();
        let (_, rx) = mpsc::unbounded_channel();
        (
            SttStream {
                tx,
                closed: Arc::new(AtomicBool::new(false)),
                queued: Arc::new(AtomicUsize::new(0)),
                rate_hz: 0,
                dropping: false,
            },
            rx,
        )
    }

    /// Feeds caller audio (samples at the call's rate). Non-blocking; drops the audio (and
    /// logs once) while more than [`MAX_QUEUED_SECONDS`] of audio wait for the recognizer.
    pub fn audio(&mut self, samples: Vec<i16>) {
        let queued = self.queued.load(Ordering::Relaxed);
        // A detached stream (rate 0) never decodes: nothing to bound.
        let max_queued = MAX_QUEUED_SECONDS * self.rate_hz as usize;
        if self.rate_hz > 0 && queued + samples.len() > max_queued {
            if !self.dropping {
                self.dropping = true;
                tracing::warn!(
                    queued_samples = queued,
                    "caller audio arrives faster than STT decodes it: dropping audio beyond {MAX_QUEUED_SECONDS} s"
                );
            }
            return;
        }
        self.dropping = false;
        self.queued.fetch_add(samples.len(), Ordering::Relaxed);
        let _ = self.tx.send(Command::Audio(samples));
    }

    /// Caller audio sent to the recognizer and not yet decoded, in ms (0 for a detached
    /// stream): how far Vosk is behind the caller.
    pub fn backlog_ms(&self) -> u64 {
        let queued = self.queued.load(Ordering::Relaxed) as u64;
        queued * 1000 / u64::from(self.rate_hz.max(1))
    }

    /// Ends the current utterance; its [`SttResult`] arrives on the result channel.
    pub fn finish(&self) {
        let _ = self.tx.send(Command::Finish(Instant::now()));
    }

    /// The text of the current utterance so far, at a pause (issue 8: the speculative reply
    /// starts from it). The audio up to now is finalized and kept, not dropped: the
    /// utterance's final text ([`Self::finish`]) is this text plus whatever follows.
    pub fn text_so_far(&self) -> tokio::sync::oneshot::Receiver<String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(Command::SoFar(tx));
        rx
    }

    /// issue 8: the current utterance's text so far from Vosk's partial result (its current
    /// best path, after the audio queued before this call), without finalizing anything: the
    /// final text may still differ. Cheap: the LLM prefill asks for it while the caller speaks.
    pub fn partial_text(&self) -> tokio::sync::oneshot::Receiver<String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(Command::Partial(tx));
        rx
    }

    /// Drops the current utterance's audio without a result.
    pub fn discard(&self) {
        let _ = self.tx.send(Command::Discard);
    }
}
