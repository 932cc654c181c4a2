//! issue 10: one llama.cpp context for all calls (`[llm] scheduler = "batched"`). One thread
//! owns the context; each live call's [`super::LlmSession`] holds one KV sequence of it
//! (`n_seq_max` = `server.max_calls`, `settings.context` tokens each). Every decode packs the
//! next token of every generating call plus bounded chunks of pending prompt evaluation
//! (continuous batching, as llama.cpp's `tools/server` does with its slots), so a long prompt
//! delays another call's next token by at most one chunk's evaluation. Calls are served
//! round-robin. A sequence keeps its KV cache across turns (longest common token prefix);
//! cancelling a reply takes the sequence out of the next decode and removes the reply's tokens
//! from its cache at once. The thread is stopped and joined by [`Scheduler::shutdown`] or on
//! drop, before the model is freed.

use super::{common_prefix, LlmBackend, LlmEvent, LocalModel, Message, ReplyStream, TurnStats, BACKEND};
use crate::llm::ActionSpec;
use anyhow::{anyhow, Result};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::mpsc;

/// Tokens of one decode (the batch's capacity): generating calls' next tokens plus prompt chunks.
const BATCH_TOKENS: usize = 512;
/// Most prompt tokens of one call in one decode.
pub const PROMPT_CHUNK: usize = 128;
/// Most prompt tokens of all calls together in one decode: bounds how long a decode, and so
/// every generating call's next token, waits on prompt evaluation.
pub const PROMPT_BUDGET: usize = 256;

/// A request to the scheduler thread.
enum Cmd {
    /// A session took sequence `seq`.
    Open {
        seq: usize,
        actions: Option<Arc<ActionSpec>>,
    },
    /// Evaluate these messages into the sequence's cache.
    Warm {
        seq: usize,
        messages: Vec<Message>,
        done: super::WarmDone,
    },
    /// Generate a reply.
    Generate {
        seq: usize,
        messages: Vec<Message>,
        max_tokens: u32,
        cancel: Arc<AtomicBool>,
        out: mpsc::UnboundedSender<LlmEvent>,
        /// When the call asked (first-token times count from here).
        started: Instant,
    },
    /// The session was dropped: clear the sequence.
    Close { seq: usize },
    /// Stop the thread.
    Shutdown,
}

/// Figures of the scheduler since start, for tests and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// `llama_decode` calls.
    pub decodes: u64,
    /// Decodes that advanced two or more sequences at once.
    pub shared_decodes: u64,
    /// Tokens decoded in all (prompt and generated).
    pub tokens: u64,
    /// Sequences held by live sessions now.
    pub sequences_in_use: usize,
}

/// The handle to the scheduler thread, owned by the [`super::LlmEngine`].
pub(crate) struct Scheduler {
    tx: Mutex<Option<std_mpsc::Sender<Cmd>>>,
    free: Arc<Mutex<Vec<usize>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Mutex<SchedulerStats>>,
    sequences: usize,
}

impl Scheduler {
    /// Creates the shared context on its thread and waits until it exists.
    ///
    /// # Errors
    /// If llama.cpp cannot create the context (e.g. not enough memory for its KV cache).
    pub(crate) fn start(model: Arc<LocalModel>) -> Result<Scheduler> {
        let sequences = model.settings.sequences.clamp(1, 256) as usize;
        let (tx, rx) = std_mpsc::channel();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<()>>();
        let stats = Arc::new(Mutex::new(SchedulerStats::default()));
        let thread_stats = stats.clone();
        let live = crate::engines::WorkerThread::enter();
        let thread = std::thread::Builder::new()
            .name("llm-scheduler".into())
            .spawn(move || {
                let _live = live;
                crate::engines::lower_thread_priority();
                run(&model, sequences, rx, ready_tx, &thread_stats);
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(anyhow!("the LLM scheduler thread died while creating its context"));
            }
        }
        Ok(Scheduler {
            tx: Mutex::new(Some(tx)),
            free: Arc::new(Mutex::new((0..sequences).rev().collect())),
            thread: Mutex::new(Some(thread)),
            stats,
            sequences,
        })
    }

    /// Takes a free sequence for a new session.
    ///
    /// # Errors
    /// If all sequences are in use or the scheduler has stopped.
    pub(crate) fn open(&self, actions: Option<Arc<ActionSpec>>) -> Result<SeqSession> {
        let tx = self
            .tx
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| anyhow!("the LLM scheduler has stopped"))?;
        let seq = self.free.lock().unwrap().pop().ok_or_else(|| {
            anyhow!(
                "all {} LLM sequences are in use (server.max_calls sessions)",
                self.sequences
            )
        })?;
        let _ = tx.send(Cmd::Open { seq, actions });
        Ok(SeqSession {
            seq,
            tx,
            free: self.free.clone(),
        })
    }

    /// Figures since start.
    pub(crate) fn stats(&self) -> SchedulerStats {
        let mut st = self.stats.lock().unwrap().clone();
        st.sequences_in_use = self.sequences - self.free.lock().unwrap().len();
        st
    }

    /// Stops the thread and waits for it. Idempotent.
    pub(crate) fn shutdown(&self) {
        if let Some(tx) = self.tx.lock().unwrap().take() {
            let _ = tx.send(Cmd::Shutdown);
        }
        if let Some(t) = self.thread.lock().unwrap().take() {
            if t.join().is_err() {
                tracing::error!("the LLM scheduler thread panicked");
            }
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A session's sequence. Dropping it clears the sequence and frees it for the next call.
pub(crate) struct SeqSession {
    seq: usize,
    tx: std_mpsc::Sender<Cmd>,
    free: Arc<Mutex<Vec<usize>>>,
}

impl LlmBackend for SeqSession {
    fn warm(&self, messages: Vec<Message>, done: super::WarmDone) {
        let _ = self.tx.send(Cmd::Warm {
            seq: self.seq,
            messages,
            done,
        });
    }

    fn generate(
        &self,
        messages: Vec<Message>,
        max_tokens: u32,
        cancel: Arc<AtomicBool>,
        out: mpsc::UnboundedSender<LlmEvent>,
    ) {
        let cmd = Cmd::Generate {
            seq: self.seq,
            messages,
            max_tokens,
            cancel,
            out,
            started: Instant::now(),
        };
        if let Err(std_mpsc::SendError(Cmd::Generate { out, .. })) = self.tx.send(cmd) {
            let _ = out.send(LlmEvent::Error("the LLM scheduler has stopped".into()));
        }
    }
}

impl Drop for SeqSession {
    fn drop(&mut self) {
        // The Close is queued before any request of the next session to get this sequence.
        let _ = self.tx.send(Cmd::Close { seq: self.seq });
        self.free.lock().unwrap().push(self.seq);
    }
}

/// A queued request of one sequence.
enum Req {
    Warm(Vec<Message>, super::WarmDone),
    Generate {
        messages: Vec<Message>,
        max_tokens: u32,
        cancel: Arc<AtomicBool>,
        out: mpsc::UnboundedSender<LlmEvent>,
        started: Instant,
    },
}

/// A reply being generated.
struct Reply {
    sampler: LlamaSampler,
    stream: ReplyStream,
    stats: TurnStats,
    max_tokens: u32,
    cancel: Arc<AtomicBool>,
    started: Instant,
    /// The sampled token to decode next (its logits give the following token).
    next: Option<LlamaToken>,
}

/// The request a sequence is working on: evaluate `prompt`, then (a reply) generate.
struct Job {
    prompt: Vec<LlamaToken>,
    reply: Option<Reply>,
    /// A warm-up's completion, dropped with the job.
    _done: super::WarmDone,
}

/// One sequence of the shared context.
#[derive(Default)]
struct Slot {
    actions: Option<Arc<ActionSpec>>,
    /// Tokens whose keys and values are in this sequence's cache, in order.
    cached: Vec<LlamaToken>,
    queue: VecDeque<Req>,
    job: Option<Job>,
    /// Index in the current batch of this sequence's token with logits, if any.
    logits_at: Option<i32>,
}

impl Slot {
    fn busy(&self) -> bool {
        self.job.is_some() || !self.queue.is_empty()
    }
}

/// The scheduler thread: creates the context, reports readiness, then serves until shutdown
/// or until every handle is gone. Replies still open at the end get an error.
fn run(
    model: &LocalModel,
    sequences: usize,
    rx: std_mpsc::Receiver<Cmd>,
    ready: std_mpsc::Sender<Result<()>>,
    stats: &Mutex<SchedulerStats>,
) {
    let s = &model.settings;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(s.context * sequences as u32))
        .with_n_seq_max(sequences as u32)
        // One KV buffer shared by all sequences: llama.cpp then packs the tokens of every
        // sequence into one micro-batch (split_simple). With a buffer per sequence it splits
        // "equally" and only over consecutive sequence ids (llama-batch.cpp, split_equal), so
        // most decodes would run one graph per call. Each sequence is kept within
        // `settings.context` tokens here, so the `context * sequences` cells never run out.
        .with_kv_unified(true)
        .with_n_batch(BATCH_TOKENS as u32)
        .with_n_threads(s.threads)
        .with_n_threads_batch(s.batch_threads.unwrap_or(s.threads));
    let params = super::with_kv_cache(params, s);
    let backend = BACKEND.get().expect("backend initialized by LlmEngine::load");
    let ctx = match model.model.new_context(backend, params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(anyhow!(
                "llama.cpp could not create the shared context ({sequences} sequences of {} tokens): {e}",
                s.context
            )));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    tracing::info!(
        sequences,
        context = s.context,
        threads = s.threads,
        "LLM scheduler ready"
    );
    let mut sched = Sched {
        model,
        ctx,
        batch: LlamaBatch::new(BATCH_TOKENS, 1),
        slots: (0..sequences).map(|_| Slot::default()).collect(),
        n_ctx_seq: s.context as usize,
        rr: 0,
        stats,
    };
    sched.serve(&rx);
    for slot in &mut sched.slots {
        if let Some(Job { reply: Some(r), .. }) = slot.job.take() {
            r.stream.finish(Err("the LLM scheduler stopped".into()));
        }
        for req in slot.queue.drain(..) {
            if let Req::Generate { out, .. } = req {
                let _ = out.send(LlmEvent::Error("the LLM scheduler stopped".into()));
            }
        }
    }
    // `ctx` is dropped here, on this thread, before the engine can drop the model.
}

struct Sched<'m> {
    model: &'m LocalModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    slots: Vec<Slot>,
    n_ctx_seq: usize,
    /// The slot that goes first in the next decode (round-robin).
    rr: usize,
    stats: &'m Mutex<SchedulerStats>,
}

impl Sched<'_> {
    fn serve(&mut self, rx: &std_mpsc::Receiver<Cmd>) {
        loop {
            // Block only when no sequence has work.
            if !self.slots.iter().any(Slot::busy) {
                match rx.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        if !self.slots.iter().any(Slot::busy) {
                            return;
                        }
                        break;
                    }
                }
            }
            for seq in 0..self.slots.len() {
                self.check_cancel(seq);
                if self.slots[seq].job.is_none() {
                    self.start_next(seq);
                }
            }
            self.step();
        }
    }

    /// Applies a command; false on shutdown.
    fn handle(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Open { seq, actions } => {
                self.slots[seq].actions = actions;
            }
            Cmd::Warm { seq, messages, done } => self.slots[seq].queue.push_back(Req::Warm(messages, done)),
            Cmd::Generate {
                seq,
                messages,
                max_tokens,
                cancel,
                out,
                started,
            } => self.slots[seq].queue.push_back(Req::Generate {
                messages,
                max_tokens,
                cancel,
                out,
                started,
            }),
            Cmd::Close { seq } => {
                let slot = &mut self.slots[seq];
                if let Some(Job { reply: Some(r), .. }) = slot.job.take() {
                    r.stream.finish(Err("the LLM session was closed".into()));
                }
                slot.queue.clear();
                slot.cached.clear();
                slot.actions = None;
                let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            }
            Cmd::Shutdown => return false,
        }
        true
    }

    /// Ends a reply whose cancel flag is set or whose receiver is gone: the sequence leaves the
    /// next decode and the reply's tokens leave its cache (the prompt stays for reuse).
    fn check_cancel(&mut self, seq: usize) {
        let slot = &mut self.slots[seq];
        let cancelled = match &slot.job {
            Some(Job { reply: Some(r), .. }) => r.cancel.load(Ordering::Relaxed) || r.stream.is_closed(),
            _ => false,
        };
        if !cancelled {
            return;
        }
        let job = slot.job.take().unwrap();
        let keep = job.prompt.len().min(slot.cached.len());
        if keep < slot.cached.len() {
            let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), Some(keep as u32), None);
            slot.cached.truncate(keep);
        }
        let r = job.reply.unwrap();
        r.stream.finish(Ok(r.stats));
    }

    /// Takes the sequence's next request: renders and tokenizes it and drops from the cache
    /// what is not a common prefix with the new prompt.
    fn start_next(&mut self, seq: usize) {
        let model = self.model;
        let n_ctx = self.n_ctx_seq;
        let slot = &mut self.slots[seq];
        let Some(req) = slot.queue.pop_front() else {
            return;
        };
        let actions = slot.actions.clone();
        let (prompt, reply, done) = match req {
            Req::Warm(messages, done) => match model.tokenize(&messages, false, actions.as_deref()) {
                Ok(t) if !t.is_empty() && t.len() < n_ctx / 2 => (t, None, done),
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!("LLM warm-up failed: {e:#}");
                    return;
                }
            },
            Req::Generate {
                messages,
                max_tokens,
                cancel,
                out,
                started,
            } => match model.reply_prompt(messages, max_tokens, actions.as_deref(), n_ctx) {
                Ok((tokens, _)) if tokens.is_empty() => {
                    let _ = out.send(LlmEvent::Error("the prompt has no tokens".into()));
                    return;
                }
                Ok((tokens, max_tokens)) => {
                    let reply = Reply {
                        sampler: model.sampler(actions.as_deref()),
                        stream: ReplyStream::new(actions.clone(), out),
                        stats: TurnStats {
                            prompt_tokens: tokens.len(),
                            ..Default::default()
                        },
                        max_tokens,
                        cancel,
                        started,
                        next: None,
                    };
                    (tokens, Some(reply), None)
                }
                Err(e) => {
                    let _ = out.send(LlmEvent::Error(e));
                    return;
                }
            },
        };
        let common = common_prefix(&slot.cached, &prompt);
        if common < slot.cached.len() {
            let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), Some(common as u32), None);
            slot.cached.truncate(common);
        }
        let mut job = Job {
            prompt,
            reply,
            _done: done,
        };
        if let Some(r) = &mut job.reply {
            r.stats.evaluated_tokens = job.prompt.len() - common;
        }
        slot.job = Some(job);
    }

    /// One decode: every generating sequence's next token, then prompt chunks, round-robin.
    fn step(&mut self) {
        let n = self.slots.len();
        let order: Vec<usize> = (0..n).map(|i| (self.rr + i) % n).collect();
        self.rr = (self.rr + 1) % n;
        self.batch.clear();
        let mut in_batch: Vec<usize> = Vec::new();
        let mut prompt_tokens = 0usize;
        for &seq in &order {
            let slot = &mut self.slots[seq];
            slot.logits_at = None;
            let Some(job) = &mut slot.job else { continue };
            if let Some(tok) = job.reply.as_mut().and_then(|r| r.next.take()) {
                let pos = slot.cached.len() as i32;
                if self.batch.add(tok, pos, &[seq as i32], true).is_err() {
                    continue;
                }
                slot.logits_at = Some(self.batch.n_tokens() - 1);
                slot.cached.push(tok);
                in_batch.push(seq);
            }
        }
        for &seq in &order {
            let slot = &mut self.slots[seq];
            let Some(job) = &slot.job else { continue };
            let done = slot.cached.len();
            if done >= job.prompt.len() || slot.logits_at.is_some() {
                continue;
            }
            let room = (BATCH_TOKENS - self.batch.n_tokens() as usize).min(PROMPT_BUDGET - prompt_tokens);
            let take = (job.prompt.len() - done).min(PROMPT_CHUNK).min(room);
            if take == 0 {
                break;
            }
            let last = done + take == job.prompt.len();
            let mut ok = true;
            for (i, t) in job.prompt[done..done + take].iter().enumerate() {
                let logits = last && i == take - 1;
                if self.batch.add(*t, (done + i) as i32, &[seq as i32], logits).is_err() {
                    ok = false;
                    break;
                }
            }
            if !ok {
                break;
            }
            slot.cached.extend_from_slice(&job.prompt[done..done + take]);
            if last {
                slot.logits_at = Some(self.batch.n_tokens() - 1);
            }
            prompt_tokens += take;
            in_batch.push(seq);
        }
        if in_batch.is_empty() {
            return;
        }
        let decoded = self.ctx.decode(&mut self.batch);
        {
            let mut st = self.stats.lock().unwrap();
            st.decodes += 1;
            st.tokens += self.batch.n_tokens() as u64;
            if in_batch.len() > 1 {
                st.shared_decodes += 1;
            }
        }
        if let Err(e) = decoded {
            // The batch's sequences may be half-written: clear them, fail their replies.
            tracing::error!("llama.cpp decode failed: {e}");
            for seq in in_batch {
                let slot = &mut self.slots[seq];
                let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
                slot.cached.clear();
                slot.logits_at = None;
                if let Some(Job { reply: Some(r), .. }) = slot.job.take() {
                    r.stream.finish(Err(format!("llama.cpp decode failed: {e}")));
                }
            }
            return;
        }
        for seq in in_batch {
            self.after_decode(seq);
        }
    }

    /// Samples the sequence's next token if the decode computed its logits.
    fn after_decode(&mut self, seq: usize) {
        let model = self.model;
        let vocab = model.model.vocab();
        let slot = &mut self.slots[seq];
        let Some(idx) = slot.logits_at.take() else { return };
        let Some(job) = &mut slot.job else { return };
        let Some(r) = &mut job.reply else {
            // A warm-up is done once its prompt is in.
            slot.job = None;
            return;
        };
        let tok = r.sampler.sample(&self.ctx, idx);
        let mut finished = vocab.is_eog(tok);
        if !finished {
            r.stats.generated_tokens += 1;
            if r.stats.first_token_ms.is_none() {
                r.stats.first_token_ms = Some(r.started.elapsed().as_millis() as u64);
            }
            let open = r.stream.push(&vocab.token_to_piece(tok, false, None));
            finished = !open || r.stats.generated_tokens >= r.max_tokens as usize;
            if !finished {
                r.next = Some(tok);
            }
        }
        if finished {
            let r = slot.job.take().unwrap().reply.unwrap();
            let result = if r.stats.generated_tokens == 0 && !r.cancel.load(Ordering::Relaxed) {
                Err("the model produced no tokens".to_string())
            } else {
                Ok(r.stats)
            };
            r.stream.finish(result);
        }
    }
}

impl super::LlmEngine {
    /// issue 10: the batched scheduler's figures (decodes, decodes shared by several calls,
    /// tokens, sequences in use); `None` for per-call contexts and the OpenAI backend.
    pub fn scheduler_stats(&self) -> Option<SchedulerStats> {
        match &self.backend {
            super::Backend::Local { scheduler: Some(s), .. } => Some(s.stats()),
            _ => None,
        }
    }
}
