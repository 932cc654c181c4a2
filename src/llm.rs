//! The language model with llama.cpp: one loaded GGUF shared by all calls ([`LlmEngine`]) and
//! one context per call on its own thread ([`LlmSession`]). The context keeps its KV cache
//! across turns, so a turn evaluates only the tokens the previous turn did not (the system
//! prompt is evaluated once, while the greeting plays). Tokens stream back as they come.

use anyhow::{anyhow, bail, Context, Result};
use llama_cpp_2::context::params::LlamaContextParams;
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

/// Settings for every context.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// Threads per call's context.
    pub threads: i32,
    /// Context size in tokens.
    pub context: u32,
    /// Sampling temperature (0 = greedy).
    pub temperature: f32,
    /// Sampler seed.
    pub seed: u32,
}

static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();

/// A loaded GGUF model with its chat template, shared by every call.
pub struct LlmEngine {
    model: LlamaModel,
    template: LlamaChatTemplate,
    settings: LlmSettings,
    /// The GGUF file.
    pub path: PathBuf,
}

impl LlmEngine {
    /// Loads a GGUF file. Uses the chat template stored in the GGUF.
    ///
    /// # Errors
    /// If the file is not a loadable GGUF or has no chat template.
    pub fn load(path: &Path, settings: LlmSettings) -> Result<LlmEngine> {
        let backend = match BACKEND.get() {
            Some(b) => b,
            None => {
                let mut b = LlamaBackend::init().context("llama.cpp backend init failed")?;
                b.void_logs();
                BACKEND.get_or_init(|| b)
            }
        };
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| anyhow!("llama.cpp could not load {} ({e}): is it a GGUF file?", path.display()))?;
        let template = model
            .chat_template(None)
            .map_err(|e| anyhow!("{} has no chat template ({e})", path.display()))?;
        Ok(LlmEngine {
            model,
            template,
            settings,
            path: path.to_path_buf(),
        })
    }

    /// Renders the chat. With `actions`, the action instructions are appended to the first
    /// system message. `warm` and `generate` both render through here with the session's spec,
    /// so the system prompt's tokens are the same and stay in the KV cache. Earlier agent replies
    /// stay untagged (the call stores the spoken text): re-tagging them `[say]` made the test
    /// model answer `[say]` to everything.
    fn render(&self, messages: &[Message], add_assistant: bool, actions: Option<&ActionSpec>) -> Result<String> {
        let mut system_done = false;
        let chat = messages
            .iter()
            .map(|m| {
                let text = match (actions, m.role) {
                    (Some(spec), Role::System) if !system_done => {
                        system_done = true;
                        format!("{}{}", m.text, spec.instructions())
                    }
                    _ => m.text.clone(),
                };
                LlamaChatMessage::new(m.role.as_str().into(), text)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.model.apply_chat_template(&self.template, &chat, add_assistant)?)
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

enum Request {
    /// Evaluate these messages into the KV cache without generating.
    Warm(Vec<Message>),
    Generate {
        messages: Vec<Message>,
        max_tokens: u32,
        cancel: Arc<AtomicBool>,
        out: mpsc::UnboundedSender<LlmEvent>,
    },
}

/// One call's llama.cpp context on its own thread. Dropping it ends the thread.
pub struct LlmSession {
    tx: std_mpsc::Sender<Request>,
}

impl LlmSession {
    /// Starts a context for one call, without actions: replies are plain speech.
    pub fn start(engine: Arc<LlmEngine>, call_id: &str) -> Result<LlmSession> {
        LlmSession::start_with_actions(engine, call_id, None)
    }

    /// Starts a context for one call. With `actions`, every reply (from [`LlmSession::warm`]'s
    /// prompt on) is rendered with the action instructions and generated under the action
    /// grammar, and a turn may send one [`LlmEvent::Action`] before its tokens. The spec is fixed
    /// for the session so the system prompt stays the same, and cached, across turns.
    pub fn start_with_actions(
        engine: Arc<LlmEngine>,
        call_id: &str,
        actions: Option<Arc<ActionSpec>>,
    ) -> Result<LlmSession> {
        let (tx, rx) = std_mpsc::channel::<Request>();
        let name = format!("llm-{}", &call_id[..8.min(call_id.len())]);
        let live = crate::engines::WorkerThread::enter();
        std::thread::Builder::new().name(name).spawn(move || {
            let _live = live;
            crate::engines::lower_thread_priority();
            if let Err(e) = session_thread(&engine, actions.as_deref(), rx) {
                tracing::error!("LLM context failed: {e:#}");
            }
        })?;
        Ok(LlmSession { tx })
    }

    /// Evaluates `messages` (e.g. the system prompt and the greeting) into the KV cache in the
    /// background, so the first turn costs only the caller's words.
    pub fn warm(&self, messages: Vec<Message>) {
        let _ = self.tx.send(Request::Warm(messages));
    }

    /// Generates the assistant's reply to `messages`; events arrive on the returned channel.
    /// Setting `cancel` stops generation at the next token.
    pub fn generate(
        &self,
        messages: Vec<Message>,
        max_tokens: u32,
        cancel: Arc<AtomicBool>,
    ) -> mpsc::UnboundedReceiver<LlmEvent> {
        let (out, rx) = mpsc::unbounded_channel();
        if let Err(std_mpsc::SendError(Request::Generate { out, .. })) = self.tx.send(Request::Generate {
            messages,
            max_tokens,
            cancel,
            out,
        }) {
            let _ = out.send(LlmEvent::Error("LLM context thread has stopped".into()));
        }
        rx
    }
}

fn session_thread(engine: &LlmEngine, actions: Option<&ActionSpec>, rx: std_mpsc::Receiver<Request>) -> Result<()> {
    let s = &engine.settings;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(s.context))
        .with_n_batch(512)
        .with_n_threads(s.threads)
        .with_n_threads_batch(s.threads);
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
            Request::Warm(messages) => {
                let prompt = engine.render(&messages, false, actions)?;
                let tokens = engine.model.vocab().tokenize(prompt.as_bytes(), true, true);
                if tokens.len() < n_ctx / 2 {
                    eval_prompt(&mut ctx, &mut batch, &mut cached, &tokens)?;
                }
            }
            Request::Generate {
                mut messages,
                max_tokens,
                cancel,
                out,
            } => {
                let started = Instant::now();
                // Drop the oldest exchanges until the prompt and the reply fit the context.
                let tokens = loop {
                    let prompt = engine.render(&messages, true, actions)?;
                    let tokens = engine.model.vocab().tokenize(prompt.as_bytes(), true, true);
                    if tokens.len() + max_tokens as usize + 8 <= n_ctx || messages.len() <= 2 {
                        break tokens;
                    }
                    messages.remove(1);
                };
                if tokens.len() + 8 > n_ctx {
                    let _ = out.send(LlmEvent::Error(format!(
                        "prompt of {} tokens does not fit the context of {n_ctx}",
                        tokens.len()
                    )));
                    continue;
                }
                let max_tokens = max_tokens.min((n_ctx - tokens.len() - 1) as u32);
                match generate(
                    engine,
                    &mut ctx,
                    &mut batch,
                    &mut cached,
                    &tokens,
                    max_tokens,
                    actions,
                    &cancel,
                    &out,
                    started,
                ) {
                    Ok(stats) => {
                        let _ = out.send(LlmEvent::Done(stats));
                    }
                    Err(e) => {
                        // The cache may be half-written: start clean next turn.
                        ctx.clear_kv_cache();
                        cached.clear();
                        let _ = out.send(LlmEvent::Error(format!("{e:#}")));
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
    let mut common = cached.iter().zip(tokens).take_while(|(a, b)| a == b).count();
    // The last prompt token is always evaluated again so its logits are fresh.
    common = common.min(tokens.len().saturating_sub(1));
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

fn batch_capacity() -> usize {
    512
}

#[allow(clippy::too_many_arguments)]
fn generate(
    engine: &LlmEngine,
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    batch: &mut LlamaBatch,
    cached: &mut Vec<LlamaToken>,
    tokens: &[LlamaToken],
    max_tokens: u32,
    actions: Option<&ActionSpec>,
    cancel: &AtomicBool,
    out: &mpsc::UnboundedSender<LlmEvent>,
    started: Instant,
) -> Result<TurnStats> {
    let mut stats = TurnStats {
        prompt_tokens: tokens.len(),
        ..Default::default()
    };
    stats.evaluated_tokens = eval_prompt(ctx, batch, cached, tokens)?;
    let s = &engine.settings;
    let mut chain = Vec::new();
    if let Some(spec) = actions {
        match LlamaSampler::grammar(&engine.model, &spec.grammar(), "root") {
            Ok(g) => chain.push(g),
            // Still parsed below: a malformed tag is logged and ignored.
            Err(e) => tracing::warn!("action grammar rejected ({e}); generating without it"),
        }
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        chain.extend([
            LlamaSampler::penalties(engine.model.n_vocab(), 64, 1.15, 0.0, 0.0),
            LlamaSampler::top_k(40),
            LlamaSampler::top_p(0.9, 1),
            LlamaSampler::temp(s.temperature),
            LlamaSampler::dist(s.seed),
        ]);
    }
    let mut sampler = LlamaSampler::chain_simple(chain);
    let mut tag = actions.map(|_| TagState::Tag(String::new()));
    let vocab = engine.model.vocab();
    let mut pending = Vec::<u8>::new();
    let mut logits_idx = batch.n_tokens() - 1;
    while stats.generated_tokens < max_tokens as usize {
        if cancel.load(Ordering::Relaxed) || out.is_closed() {
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
        pending.extend(vocab.token_to_piece(tok, false, None));
        let valid = match std::str::from_utf8(&pending) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        if valid > 0 {
            let mut piece = String::from_utf8_lossy(&pending[..valid]).into_owned();
            pending.drain(..valid);
            if let (Some(state), Some(spec)) = (tag.as_mut(), actions) {
                let parsed = state.push(spec, &piece);
                if let Some(action) = parsed.action {
                    tracing::info!(?action, "the model chose an action");
                    if out.send(LlmEvent::Action(action)).is_err() {
                        break;
                    }
                }
                piece = parsed.speech;
            }
            if !piece.is_empty() && out.send(LlmEvent::Token(piece)).is_err() {
                break;
            }
        }
        batch.clear();
        batch.add(tok, cached.len() as i32, &[0], true)?;
        ctx.decode(batch).context("llama.cpp decode failed")?;
        cached.push(tok);
        logits_idx = 0;
    }
    if let Some(TagState::Tag(b)) = &tag {
        if !b.trim().is_empty() {
            tracing::warn!(reply = %b, "the reply ended inside its action tag; no action");
        }
    }
    if stats.generated_tokens == 0 && !cancel.load(Ordering::Relaxed) {
        bail!("the model produced no tokens");
    }
    Ok(stats)
}
