//! The language model: one engine per model shared by all calls ([`LlmEngine`]) and a
//! per-call [`LlmSession`] that keeps its KV cache across turns, so a turn evaluates only the
//! tokens the previous turn did not (the system prompt is evaluated once, while the greeting
//! plays). Tokens stream back as they come. Three ways to run it (issue 10): one llama.cpp
//! context for all calls with continuous batching ([`scheduler`], the default), one context
//! per call on its own thread (`[llm] scheduler = "per_call"`, this file), or an
//! OpenAI-compatible server ([`openai`]).

pub mod openai;
pub mod scheduler;

use crate::config::LlmScheduler;
use anyhow::{anyhow, bail, Context, Result};
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc;

/// Who said a message in the chat history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The system prompt.
    System,
    /// The caller.
    User,
    /// The agent.
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub text: String,
}

/// The opening of every call's chat history: the agent's system prompt, then its greeting as
/// the assistant's first turn (the caller has heard it before saying anything). Two messages.
pub fn prologue(agent: &crate::config::AgentConfig) -> Vec<Message> {
    vec![
        Message {
            role: Role::System,
            text: agent.system_prompt.clone(),
        },
        Message {
            role: Role::Assistant,
            text: agent.greeting.clone(),
        },
    ]
}

/// Settings for every context.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// Threads per call's context (`per_call`), or of the one shared context (`batched`),
    /// generating tokens (llama.cpp `n_threads`).
    pub threads: i32,
    /// Threads evaluating prompts (llama.cpp `n_threads_batch`); None: `threads`. Generation
    /// advances one token per decode, small work between many thread barriers; prompt
    /// evaluation is one large batch that splits well.
    pub batch_threads: Option<i32>,
    /// Context size in tokens, per call (each call's KV sequence holds this many).
    pub context: u32,
    /// Sampling temperature (0 = greedy).
    pub temperature: f32,
    /// Sampler seed.
    pub seed: u32,
    /// issue 10: one shared context with a sequence per call, or a context per call.
    pub scheduler: LlmScheduler,
    /// issue 10: KV sequences of the shared context, i.e. the most sessions alive at once
    /// (`server.max_calls`). Only for `batched`.
    pub sequences: u32,
    /// The KV cache's element type (`[llm] kv_cache`).
    pub kv_cache: crate::config::KvCache,
}

impl Default for LlmSettings {
    /// 2 threads, 2048 tokens, greedy, seed 42, batched with 8 sequences.
    fn default() -> Self {
        LlmSettings {
            threads: 2,
            batch_threads: None,
            context: 2048,
            temperature: 0.0,
            seed: 42,
            scheduler: LlmScheduler::Batched,
            sequences: 8,
            kv_cache: crate::config::KvCache::F16,
        }
    }
}

/// `params` with the KV cache's element type of `settings` (`[llm] kv_cache`).
fn with_kv_cache(params: LlamaContextParams, settings: &LlmSettings) -> LlamaContextParams {
    match settings.kv_cache {
        crate::config::KvCache::F16 => params,
        crate::config::KvCache::Q8_0 => params.with_type_k(KvCacheType::Q8_0).with_type_v(KvCacheType::Q8_0),
    }
}

static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();

/// llama.cpp's backend, initialized once per process. `LlamaBackend::init` fails when called
/// a second time, so two models loading at once (the main and the fallback GGUF, or tests in
/// parallel) must not both try: the first initializes under a lock, the others wait for it.
fn backend() -> Result<&'static LlamaBackend> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    let _init = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    let mut b = LlamaBackend::init().context("llama.cpp backend init failed")?;
    b.void_logs();
    Ok(BACKEND.get_or_init(|| b))
}

/// A loaded GGUF model with its chat template.
pub(crate) struct LocalModel {
    model: LlamaModel,
    template: LlamaChatTemplate,
    settings: LlmSettings,
}

/// One model shared by every call: a GGUF run here (with the batched scheduler or per-call
/// contexts) or an OpenAI-compatible server.
///
/// Shutdown: dropping the last `Arc<LlmEngine>` stops the scheduler thread and joins it
/// before the model is freed; [`LlmEngine::shutdown`] does the same earlier, explicitly.
pub struct LlmEngine {
    backend: Backend,
    /// The GGUF file (for the OpenAI backend: the `base_url`).
    pub path: PathBuf,
}

enum Backend {
    Local {
        model: Arc<LocalModel>,
        /// The shared context's thread; `None` with per-call contexts.
        scheduler: Option<scheduler::Scheduler>,
    },
    Openai(Arc<openai::Client>),
}

impl LlmEngine {
    /// Loads a GGUF file. Uses the chat template stored in the GGUF. With
    /// `settings.scheduler == Batched` it also creates the shared context (a KV sequence of
    /// `settings.context` tokens for each of `settings.sequences` calls) on its thread.
    ///
    /// # Errors
    /// If the file is not a loadable GGUF, has no chat template, or the shared context cannot
    /// be created.
    pub fn load(path: &Path, settings: LlmSettings) -> Result<LlmEngine> {
        let backend = backend()?;
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| anyhow!("llama.cpp could not load {} ({e}): is it a GGUF file?", path.display()))?;
        let template = model
            .chat_template(None)
            .map_err(|e| anyhow!("{} has no chat template ({e})", path.display()))?;
        let model = Arc::new(LocalModel {
            model,
            template,
            settings,
        });
        let scheduler = match model.settings.scheduler {
            LlmScheduler::Batched => Some(scheduler::Scheduler::start(model.clone())?),
            LlmScheduler::PerCall => None,
        };
        Ok(LlmEngine {
            backend: Backend::Local { model, scheduler },
            path: path.to_path_buf(),
        })
    }

    /// An engine that asks an OpenAI-compatible server (`[llm] backend = "openai"`). Checks at
    /// once that the server answers `GET {base_url}/models`.
    ///
    /// # Errors
    /// If `base_url` is not a URL, the server is unreachable or answers with an error status,
    /// or `api_key_file` cannot be read; the message names the `[llm]` key.
    pub fn openai(cfg: &crate::config::LlmConfig) -> Result<LlmEngine> {
        let client = openai::Client::connect(cfg)?;
        Ok(LlmEngine {
            path: PathBuf::from(client.base_url()),
            backend: Backend::Openai(Arc::new(client)),
        })
    }

    /// Stops the shared context's thread (batched scheduler) and waits for it: generating
    /// turns end with an error, later requests fail at once. Idempotent; also done on drop.
    /// Per-call context threads end when their session is dropped (not joined).
    pub fn shutdown(&self) {
        if let Backend::Local { scheduler: Some(s), .. } = &self.backend {
            s.shutdown();
        }
    }
}

impl LocalModel {
    /// Renders the chat. With `actions`, the action instructions are appended to the first
    /// system message. `warm` and `generate` both render through here with the session's spec,
    /// so the system prompt's tokens are the same and stay in the KV cache. Earlier agent replies
    /// stay untagged (the call stores the spoken text): re-tagging them `[say]` made the test
    /// model answer `[say]` to everything.
    fn render(&self, messages: &[Message], add_assistant: bool, actions: Option<&ActionSpec>) -> Result<String> {
        let chat = render_messages(messages, actions)
            .into_iter()
            .map(|(role, text)| LlamaChatMessage::new(role.into(), text))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.model.apply_chat_template(&self.template, &chat, add_assistant)?)
    }

    /// Tokenizes the rendered chat.
    fn tokenize(
        &self,
        messages: &[Message],
        add_assistant: bool,
        actions: Option<&ActionSpec>,
    ) -> Result<Vec<LlamaToken>> {
        let prompt = self.render(messages, add_assistant, actions)?;
        Ok(self.model.vocab().tokenize(prompt.as_bytes(), true, true))
    }

    /// The prompt for a reply: drops the oldest exchanges until the prompt and `max_tokens`
    /// fit `n_ctx` tokens. Returns the tokens and the reply's token limit, or an error text.
    fn reply_prompt(
        &self,
        mut messages: Vec<Message>,
        max_tokens: u32,
        actions: Option<&ActionSpec>,
        n_ctx: usize,
    ) -> std::result::Result<(Vec<LlamaToken>, u32), String> {
        let tokens = loop {
            let tokens = self.tokenize(&messages, true, actions).map_err(|e| format!("{e:#}"))?;
            if tokens.len() + max_tokens as usize + 8 <= n_ctx || messages.len() <= 2 {
                break tokens;
            }
            messages.remove(1);
        };
        if tokens.len() + 8 > n_ctx {
            return Err(format!(
                "prompt of {} tokens does not fit the context of {n_ctx}",
                tokens.len()
            ));
        }
        let max_tokens = max_tokens.min((n_ctx - tokens.len() - 1) as u32);
        Ok((tokens, max_tokens))
    }

    /// The sampler chain of one reply: the action grammar (if any), then greedy or
    /// temperature sampling. Each reply gets its own (grammar state is per sequence).
    fn sampler(&self, actions: Option<&ActionSpec>) -> LlamaSampler {
        let s = &self.settings;
        let mut chain = Vec::new();
        if let Some(spec) = actions {
            match LlamaSampler::grammar(&self.model, &spec.grammar(), "root") {
                Ok(g) => chain.push(g),
                // Still parsed below: a malformed tag is logged and ignored.
                Err(e) => tracing::warn!("action grammar rejected ({e}); generating without it"),
            }
        }
        if s.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            chain.extend([
                LlamaSampler::penalties(self.model.n_vocab(), 64, 1.15, 0.0, 0.0),
                LlamaSampler::top_k(40),
                LlamaSampler::top_p(0.9, 1),
                LlamaSampler::temp(s.temperature),
                LlamaSampler::dist(s.seed),
            ]);
        }
        LlamaSampler::chain_simple(chain)
    }
}

/// The chat as (role, text) pairs, with the action instructions appended to the first system
/// message when `actions` is given. Shared by the local and the OpenAI backends.
fn render_messages(messages: &[Message], actions: Option<&ActionSpec>) -> Vec<(&'static str, String)> {
    let mut system_done = false;
    messages
        .iter()
        .map(|m| {
            let text = match (actions, m.role) {
                (Some(spec), Role::System) if !system_done => {
                    system_done = true;
                    format!("{}{}", m.text, spec.instructions())
                }
                _ => m.text.clone(),
            };
            (m.role.as_str(), text)
        })
        .collect()
}

/// Turns generated token bytes into whole UTF-8 pieces, splits off the action tag, and sends
/// [`LlmEvent::Action`] / [`LlmEvent::Token`]. One per reply; shared by all backends.
pub(crate) struct ReplyStream {
    started: Instant,
    tag: Option<TagState>,
    actions: Option<Arc<ActionSpec>>,
    pending: Vec<u8>,
    out: mpsc::UnboundedSender<LlmEvent>,
}

impl ReplyStream {
    pub(crate) fn new(actions: Option<Arc<ActionSpec>>, out: mpsc::UnboundedSender<LlmEvent>) -> ReplyStream {
        ReplyStream {
            started: Instant::now(),
            tag: actions.as_ref().map(|_| TagState::Tag(String::new())),
            actions,
            pending: Vec::new(),
            out,
        }
    }

    /// Feeds generated bytes. Returns false when the receiver is gone (stop generating).
    pub(crate) fn push(&mut self, bytes: &[u8]) -> bool {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        if valid == 0 {
            return !self.out.is_closed();
        }
        let mut piece = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        if let (Some(state), Some(spec)) = (self.tag.as_mut(), self.actions.as_deref()) {
            let parsed = state.push(spec, &piece);
            if let Some(action) = parsed.action {
                tracing::info!(?action, "the model chose an action");
                if self.out.send(LlmEvent::Action(action)).is_err() {
                    return false;
                }
            }
            piece = parsed.speech;
        }
        piece.is_empty() || self.out.send(LlmEvent::Token(piece)).is_ok()
    }

    /// Whether the receiver is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.out.is_closed()
    }

    /// Sends the final event.
    pub(crate) fn finish(self, result: std::result::Result<TurnStats, String>) {
        if let Some(TagState::Tag(b)) = &self.tag {
            if !b.trim().is_empty() {
                tracing::warn!(reply = %b, "the reply ended inside its action tag; no action");
            }
        }
        if let Ok(st) = &result {
            crate::metrics::llm_reply(st.evaluated_tokens, st.generated_tokens, self.started.elapsed());
            // issue 10: one line per reply, for the call benchmark's aggregate tokens/s.
            let end_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            tracing::info!(
                prompt_tokens = st.prompt_tokens,
                evaluated_tokens = st.evaluated_tokens,
                generated_tokens = st.generated_tokens,
                first_token_ms = st.first_token_ms,
                ms = self.started.elapsed().as_millis() as u64,
                end_unix_ms,
                "LLM reply done"
            );
        }
        let _ = self.out.send(match result {
            Ok(stats) => LlmEvent::Done(stats),
            Err(e) => LlmEvent::Error(e),
        });
    }
}

/// What a turn sends back, in order: at most one `Action` (only in a session with actions,
/// before any token), tokens, then exactly one `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum LlmEvent {
    /// The model chose to act on the call; the reply's text (tokens) follows. Tag text is never
    /// sent as a token.
    Action(Action),
    /// A piece of generated text (whole UTF-8 characters).
    Token(String),
    /// The turn ended (end of generation, token limit or cancellation).
    Done(TurnStats),
    /// The turn failed.
    Error(String),
}

/// Figures for one turn.
#[derive(Debug, Clone, Default)]
pub struct TurnStats {
    /// Tokens in the whole prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens that had to be evaluated (the rest came from the KV cache).
    pub evaluated_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Milliseconds from the request to the first generated token.
    pub first_token_ms: Option<u64>,
}

const SAY_TAG: &str = "[say]";
const HANGUP_TAG: &str = "[hangup]";
const TRANSFER_PREFIX: &str = "[transfer:";
/// A tag longer than this (in bytes) is malformed.
const MAX_TAG_LEN: usize = 64;

/// An action the model chose for the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// End the call once the reply (a goodbye) has been spoken.
    Hangup,
    /// Transfer the call, once the reply has been spoken, to the configured destination of this
    /// name (always one of [`ActionSpec::transfer_names`]).
    Transfer {
        /// The destination's name from `[actions] transfer`.
        name: String,
    },
}

/// What the model may do besides speaking: hang up (always) and transfer to one of the named
/// destinations. Each reply then starts with one tag, `[say]`, `[hangup]` or
/// `[transfer:NAME]`, and generation is constrained by a grammar (see [`ActionSpec::grammar`])
/// that only allows these tags and these names. See docs/actions.md.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActionSpec {
    /// Transfer destination names (the keys of `[actions] transfer`), e.g. `["operator", "sales"]`.
    /// Names must be non-empty and may use letters, digits, `_`, `-`, `.` and spaces; others are
    /// left out with a warning.
    pub transfer_names: Vec<String>,
}

impl ActionSpec {
    /// An action spec with these transfer destinations.
    pub fn new<S: Into<String>>(transfer_names: impl IntoIterator<Item = S>) -> ActionSpec {
        ActionSpec {
            transfer_names: transfer_names.into_iter().map(Into::into).collect(),
        }
    }

    fn valid_name(name: &str) -> bool {
        !name.trim().is_empty()
            && name.len() <= 32
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
    }

    /// The transfer names usable in tags.
    fn names(&self) -> impl Iterator<Item = &str> {
        self.transfer_names
            .iter()
            .map(String::as_str)
            .filter(|n| Self::valid_name(n))
    }

    /// The GBNF grammar every reply must match: one tag, a space, then speakable text (no line
    /// breaks, brackets or markup characters).
    pub fn grammar(&self) -> String {
        let mut tags = vec![format!("\"{SAY_TAG}\""), format!("\"{HANGUP_TAG}\"")];
        let names: Vec<String> = self.names().map(|n| format!("\"{n}\"")).collect();
        if !names.is_empty() {
            tags.push(format!("\"{TRANSFER_PREFIX}\" dest \"]\""));
        }
        let mut g = format!(
            "root ::= tag \" \" text\ntag ::= {}\ntext ::= [^\\x00-\\x1F\\x7F\\[\\]<>{{}}*#_`|\\\\~^]+\n",
            tags.join(" | ")
        );
        if !names.is_empty() {
            g.push_str(&format!("dest ::= {}\n", names.join(" | ")));
        }
        g
    }

    /// The instruction block appended to the system prompt, with one example per tag. The
    /// wording and order were chosen by trying variants on SmolLM2-135M (docs/actions.md).
    pub fn instructions(&self) -> String {
        let names: Vec<&str> = self.names().collect();
        let mut s = String::from(
            "\n\nStart every reply with exactly one tag, then what you say:\n\
             [say] to answer the caller.\n\
             [hangup] when the caller says goodbye or has nothing more; then say a short goodbye.\n",
        );
        if let Some(first) = names.first() {
            s.push_str(&format!(
                "[transfer:NAME] when the caller asks for a person or to be transferred; NAME is one of: {}. \
                 Never transfer to any other number, extension or name; offer {} instead.\n",
                names.join(", "),
                names.join(" or ")
            ));
            s.push_str("Examples:\n");
            s.push_str(
                "Caller: What are your opening hours?\nYou: [say] We are open from nine to five, Monday to Friday.\n",
            );
            s.push_str(&format!(
                "Caller: Can you put me through to {first}, please?\nYou: [transfer:{first}] Of course, transferring you to {first} now.\n"
            ));
        } else {
            s.push_str("Examples:\n");
            s.push_str(
                "Caller: What are your opening hours?\nYou: [say] We are open from nine to five, Monday to Friday.\n",
            );
        }
        s.push_str("Caller: That's all, thanks. Bye!\nYou: [hangup] You're welcome, goodbye!");
        s
    }

    /// Parses a complete tag (`[say]`, `[hangup]`, `[transfer:NAME]`). `Ok(None)` is `[say]`;
    /// an unknown tag or a name not in the list is an error.
    pub fn parse_tag(&self, tag: &str) -> std::result::Result<Option<Action>, String> {
        let tag = tag.trim();
        if tag == SAY_TAG {
            return Ok(None);
        }
        if tag == HANGUP_TAG {
            return Ok(Some(Action::Hangup));
        }
        if let Some(name) = tag.strip_prefix(TRANSFER_PREFIX).and_then(|t| t.strip_suffix(']')) {
            return match self.names().find(|n| *n == name) {
                Some(n) => Ok(Some(Action::Transfer { name: n.to_string() })),
                None => Err(format!("transfer to {name:?}, which is not a configured destination")),
            };
        }
        Err(format!("unknown action tag {tag:?}"))
    }
}

/// Splits a reply's text into its leading tag and the speech after it, as tokens arrive.
enum TagState {
    /// Still reading the tag.
    Tag(String),
    /// Speech: `trim` while no speech has been sent yet (drops the space after the tag).
    Speech { trim: bool },
}

/// What a piece of generated text turned out to be.
#[derive(Debug, Default, PartialEq)]
struct Parsed {
    action: Option<Action>,
    speech: String,
}

impl TagState {
    fn push(&mut self, spec: &ActionSpec, piece: &str) -> Parsed {
        let mut out = Parsed::default();
        match self {
            TagState::Speech { trim } => {
                let text = if *trim { piece.trim_start() } else { piece };
                if !text.is_empty() {
                    *trim = false;
                    out.speech = text.to_string();
                }
            }
            TagState::Tag(buf) => {
                buf.push_str(piece);
                let b = buf.trim_start();
                if b.is_empty() {
                    return out;
                }
                let (tag, rest) = if !b.starts_with('[') {
                    tracing::warn!(reply = %b, "the reply has no action tag; speaking it, no action");
                    ("", b.to_string())
                } else if let Some(end) = b.find(']') {
                    (&b[..=end], b[end + 1..].to_string())
                } else if b.len() > MAX_TAG_LEN {
                    tracing::warn!(reply = %b, "malformed action tag ignored");
                    ("", b.trim_start_matches('[').to_string())
                } else {
                    return out; // the tag goes on
                };
                if !tag.is_empty() {
                    match spec.parse_tag(tag) {
                        Ok(action) => out.action = action,
                        Err(e) => tracing::warn!("malformed action ignored, not executed: {e}"),
                    }
                }
                *self = TagState::Speech { trim: true };
                let mut more = self.push(spec, &rest);
                more.action = out.action;
                return more;
            }
        }
        out
    }
}

/// Dropped when a warm-up's prompt is in the KV cache (or was skipped): its receiver then
/// completes ([`LlmSession::prefill`]).
pub(crate) type WarmDone = Option<tokio::sync::oneshot::Sender<()>>;

enum Request {
    /// Evaluate these messages into the KV cache without generating.
    Warm(Vec<Message>, WarmDone),
    Generate {
        messages: Vec<Message>,
        max_tokens: u32,
        cancel: Arc<AtomicBool>,
        out: mpsc::UnboundedSender<LlmEvent>,
    },
}

/// What a session does with its backend (issue 10: three real implementations: the batched
/// scheduler's sequence, a per-call context thread, an OpenAI-compatible server).
pub(crate) trait LlmBackend: Send + Sync {
    /// Evaluates `messages` into the KV cache (or nothing, where there is none to warm), then
    /// drops `done`.
    fn warm(&self, messages: Vec<Message>, done: WarmDone);
    /// Starts a reply; its events go to `out` (exactly one `Done` or `Error` at the end).
    fn generate(
        &self,
        messages: Vec<Message>,
        max_tokens: u32,
        cancel: Arc<AtomicBool>,
        out: mpsc::UnboundedSender<LlmEvent>,
    );
}

/// One call's conversation with the model: its KV sequence in the shared context (batched),
/// its own context on its own thread (per_call), or its requests to the OpenAI-compatible
/// server. Dropping it releases the sequence (batched) or ends the thread (per_call).
pub struct LlmSession {
    inner: Box<dyn LlmBackend>,
    /// Keeps the engine (and the batched scheduler's thread) alive while the session is:
    /// dropped after `inner`, whose drop frees the sequence first.
    engine: Arc<LlmEngine>,
}

impl LlmSession {
    /// Starts a session for one call, without actions: replies are plain speech.
    ///
    /// # Errors
    /// Batched: every sequence is in use (more than `server.max_calls` sessions) or the
    /// scheduler has stopped. Per-call: the thread cannot be spawned.
    pub fn start(engine: Arc<LlmEngine>, call_id: &str) -> Result<LlmSession> {
        LlmSession::start_with_actions(engine, call_id, None)
    }

    /// Starts a session for one call. With `actions`, every reply (from [`LlmSession::warm`]'s
    /// prompt on) is rendered with the action instructions and generated under the action
    /// grammar (local backends; the OpenAI backend only instructs and parses), and a turn may
    /// send one [`LlmEvent::Action`] before its tokens. The spec is fixed for the session so
    /// the system prompt stays the same, and cached, across turns.
    ///
    /// # Errors
    /// As [`LlmSession::start`].
    pub fn start_with_actions(
        engine: Arc<LlmEngine>,
        call_id: &str,
        actions: Option<Arc<ActionSpec>>,
    ) -> Result<LlmSession> {
        let inner: Box<dyn LlmBackend> = match &engine.backend {
            Backend::Local { scheduler: Some(s), .. } => Box::new(s.open(actions)?),
            Backend::Local { model, scheduler: None } => {
                Box::new(PerCallSession::start(model.clone(), call_id, actions)?)
            }
            Backend::Openai(client) => Box::new(openai::Session::new(client.clone(), actions)),
        };
        Ok(LlmSession { inner, engine })
    }

    /// True when the session keeps a KV cache here (the local backends), so warming and
    /// prefilling it save the reply work; false for the OpenAI backend, whose server keeps its
    /// own prompt cache and for which [`LlmSession::prefill`] does nothing.
    pub fn has_kv_cache(&self) -> bool {
        !matches!(self.engine.backend, Backend::Openai(_))
    }

    /// Evaluates `messages` (e.g. the system prompt and the greeting) into the KV cache in the
    /// background, so the first turn costs only the caller's words.
    pub fn warm(&self, messages: Vec<Message>) {
        self.inner.warm(messages, None);
    }

    /// issue 8: evaluates `messages` (the history and the caller's words so far, as the reply's
    /// prompt will start) into the KV cache while the caller is still speaking, so the reply
    /// evaluates only what differs. The receiver completes (with an error: nothing is sent)
    /// once the prompt is in; requests queue in order, so the caller keeps one in flight.
    pub fn prefill(&self, messages: Vec<Message>) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.warm(messages, Some(tx));
        rx
    }

    /// Generates the assistant's reply to `messages`; events arrive on the returned channel.
    /// Setting `cancel` stops generation at the next token (batched: the sequence leaves the
    /// next decode and the reply's tokens leave its KV cache).
    pub fn generate(
        &self,
        messages: Vec<Message>,
        max_tokens: u32,
        cancel: Arc<AtomicBool>,
    ) -> mpsc::UnboundedReceiver<LlmEvent> {
        let (out, rx) = mpsc::unbounded_channel();
        self.inner.generate(messages, max_tokens, cancel, out);
        rx
    }
}

/// One call's llama.cpp context on its own thread (`scheduler = "per_call"`). Dropping it
/// ends the thread.
struct PerCallSession {
    tx: std_mpsc::Sender<Request>,
}

impl PerCallSession {
    fn start(model: Arc<LocalModel>, call_id: &str, actions: Option<Arc<ActionSpec>>) -> Result<PerCallSession> {
        let (tx, rx) = std_mpsc::channel::<Request>();
        let name = format!("llm-{}", &call_id[..8.min(call_id.len())]);
        let live = crate::engines::WorkerThread::enter();
        std::thread::Builder::new().name(name).spawn(move || {
            let _live = live;
            crate::engines::lower_thread_priority();
            if let Err(e) = session_thread(&model, actions, rx) {
                tracing::error!("LLM context failed: {e:#}");
            }
        })?;
        Ok(PerCallSession { tx })
    }
}

impl LlmBackend for PerCallSession {
    fn warm(&self, messages: Vec<Message>, done: WarmDone) {
        let _ = self.tx.send(Request::Warm(messages, done));
    }

    fn generate(
        &self,
        messages: Vec<Message>,
        max_tokens: u32,
        cancel: Arc<AtomicBool>,
        out: mpsc::UnboundedSender<LlmEvent>,
    ) {
        if let Err(std_mpsc::SendError(Request::Generate { out, .. })) = self.tx.send(Request::Generate {
            messages,
            max_tokens,
            cancel,
            out,
        }) {
            let _ = out.send(LlmEvent::Error("LLM context thread has stopped".into()));
        }
    }
}

fn session_thread(
    engine: &LocalModel,
    actions: Option<Arc<ActionSpec>>,
    rx: std_mpsc::Receiver<Request>,
) -> Result<()> {
    let s = &engine.settings;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(s.context))
        .with_n_batch(512)
        .with_n_threads(s.threads)
        .with_n_threads_batch(s.batch_threads.unwrap_or(s.threads));
    let params = with_kv_cache(params, s);
    let backend = BACKEND.get().expect("backend initialized by LlmEngine::load");
    let mut ctx = engine
        .model
        .new_context(backend, params)
        .context("llama.cpp could not create a context")?;
    let mut batch = LlamaBatch::new(512, 1);
    // Tokens whose keys and values are in the KV cache, in order.
    let mut cached: Vec<LlamaToken> = Vec::new();
    let n_ctx = ctx.n_ctx() as usize;

    for req in rx {
        match req {
            Request::Warm(messages, _done) => {
                let tokens = engine.tokenize(&messages, false, actions.as_deref())?;
                if tokens.len() < n_ctx / 2 {
                    eval_prompt(&mut ctx, &mut batch, &mut cached, &tokens)?;
                }
            }
            Request::Generate {
                messages,
                max_tokens,
                cancel,
                out,
            } => {
                let started = Instant::now();
                let (tokens, max_tokens) = match engine.reply_prompt(messages, max_tokens, actions.as_deref(), n_ctx) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = out.send(LlmEvent::Error(e));
                        continue;
                    }
                };
                let mut stream = ReplyStream::new(actions.clone(), out);
                match generate(
                    engine,
                    &mut ctx,
                    &mut batch,
                    &mut cached,
                    &tokens,
                    max_tokens,
                    actions.as_deref(),
                    &cancel,
                    &mut stream,
                    started,
                ) {
                    Ok(stats) => stream.finish(Ok(stats)),
                    Err(e) => {
                        // The cache may be half-written: start clean next turn.
                        ctx.clear_kv_cache();
                        cached.clear();
                        stream.finish(Err(format!("{e:#}")));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Makes the KV cache hold exactly `tokens`, evaluating only what differs from `cached`.
/// Returns the number of tokens evaluated. The logits of the last token are computed.
fn eval_prompt(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    batch: &mut LlamaBatch,
    cached: &mut Vec<LlamaToken>,
    tokens: &[LlamaToken],
) -> Result<usize> {
    let common = common_prefix(cached, tokens);
    if common < cached.len() {
        ctx.clear_kv_cache_seq(Some(0), Some(common as u32), None)?;
        cached.truncate(common);
    }
    let todo = &tokens[common..];
    for (ci, chunk) in todo.chunks(batch_capacity()).enumerate() {
        batch.clear();
        let last_chunk = (ci + 1) * batch_capacity() >= todo.len();
        for (i, t) in chunk.iter().enumerate() {
            let pos = (common + ci * batch_capacity() + i) as i32;
            batch.add(*t, pos, &[0], last_chunk && i == chunk.len() - 1)?;
        }
        ctx.decode(batch).context("llama.cpp decode of the prompt failed")?;
        cached.extend_from_slice(chunk);
    }
    Ok(todo.len())
}

/// How many leading tokens of `tokens` are already in the KV cache (`cached`) and can be kept.
/// The last prompt token is always evaluated again so its logits are fresh.
fn common_prefix(cached: &[LlamaToken], tokens: &[LlamaToken]) -> usize {
    let common = cached.iter().zip(tokens).take_while(|(a, b)| a == b).count();
    common.min(tokens.len().saturating_sub(1))
}

fn batch_capacity() -> usize {
    512
}

#[allow(clippy::too_many_arguments)]
fn generate(
    engine: &LocalModel,
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    batch: &mut LlamaBatch,
    cached: &mut Vec<LlamaToken>,
    tokens: &[LlamaToken],
    max_tokens: u32,
    actions: Option<&ActionSpec>,
    cancel: &AtomicBool,
    stream: &mut ReplyStream,
    started: Instant,
) -> Result<TurnStats> {
    let mut stats = TurnStats {
        prompt_tokens: tokens.len(),
        ..Default::default()
    };
    stats.evaluated_tokens = eval_prompt(ctx, batch, cached, tokens)?;
    let mut sampler = engine.sampler(actions);
    let vocab = engine.model.vocab();
    let mut logits_idx = batch.n_tokens() - 1;
    while stats.generated_tokens < max_tokens as usize {
        if cancel.load(Ordering::Relaxed) || stream.is_closed() {
            break;
        }
        let tok = sampler.sample(ctx, logits_idx);
        if vocab.is_eog(tok) {
            break;
        }
        stats.generated_tokens += 1;
        if stats.first_token_ms.is_none() {
            stats.first_token_ms = Some(started.elapsed().as_millis() as u64);
        }
        if !stream.push(&vocab.token_to_piece(tok, false, None)) {
            break;
        }
        batch.clear();
        batch.add(tok, cached.len() as i32, &[0], true)?;
        ctx.decode(batch).context("llama.cpp decode failed")?;
        cached.push(tok);
        logits_idx = 0;
    }
    if stats.generated_tokens == 0 && !cancel.load(Ordering::Relaxed) {
        bail!("the model produced no tokens");
    }
    Ok(stats)
}
