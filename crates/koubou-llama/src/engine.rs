//! The engine thread: one OS thread owns llama.cpp's backend, the model and one context, and runs
//! every sequence through continuous batching.

use std::{
    collections::VecDeque,
    hash::{BuildHasher, Hasher},
    num::NonZeroU32,
    path::PathBuf,
    sync::{Mutex, mpsc},
    thread::JoinHandle,
};

use koubou_backend::{CancellationToken, ResponseFormat};
use llama_cpp_2::{
    context::params::{KvCacheType, LlamaContextParams},
    llama_backend::LlamaBackend,
    llama_batch::LlamaBatch,
    model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel, params::LlamaModelParams},
    sampling::LlamaSampler,
    token::LlamaToken,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::{
    cores::CoreShare,
    prefix::PromptCache,
    transcode::{self, WeightFormat},
};

/// How the engine is built.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    /// Threads for a decode of one token (one sequence generating).
    pub threads: usize,
    /// Threads for a decode of several tokens: prompts, and several sequences batched together.
    pub batch_threads: usize,
    /// Sequences decoded together (llama.cpp's `n_seq_max`).
    pub parallel: usize,
    /// Context per sequence, in tokens (the context holds `parallel * context`).
    pub context: u32,
    /// Most tokens in one decode call (prompt chunks plus one token per generating sequence).
    pub batch: u32,
    /// The weight format the model is served in (see [`crate::transcode`]).
    pub weights: Weights,
    /// How the KV cache stores keys and values.
    pub kv_cache: KvCache,
    /// Run a decode on one thread while other processes keep the cores its threads need busy
    /// (see [`crate::cores`]).
    pub share_cores: bool,
    /// Reuse the longest prefix a free slot's KV cache holds of a new prompt (see
    /// [`crate::prefix`]).
    pub cache_prompts: bool,
    /// Where re-encoded copies of models are kept (`None`: beside the model).
    pub copies_dir: Option<PathBuf>,
}

/// Which weight format to serve a model in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// As stored in the file.
    Original,
    /// Re-encode once when the file's format has no batched kernel on this CPU
    /// ([`crate::transcode::batched_format_for`]).
    Auto,
    /// Always this format.
    Format(WeightFormat),
}

impl Weights {
    pub fn parse(s: &str) -> Option<Weights> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Some(Weights::Auto),
            "original" => Some(Weights::Original),
            other => WeightFormat::parse(other).map(Weights::Format),
        }
    }
}

/// The KV cache's element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCache {
    F16,
    Q8_0,
}

impl KvCache {
    pub fn parse(s: &str) -> Option<KvCache> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Some(KvCache::F16),
            "q8_0" => Some(KvCache::Q8_0),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KvCache::F16 => "f16",
            KvCache::Q8_0 => "q8_0",
        }
    }

    fn llama(self) -> KvCacheType {
        match self {
            KvCache::F16 => KvCacheType::F16,
            KvCache::Q8_0 => KvCacheType::Q8_0,
        }
    }
}

/// What the loaded model is.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The GGUF file's name (no directory).
    pub file_name: String,
    pub path: PathBuf,
    pub n_params: u64,
    pub size_bytes: u64,
    /// Whether the GGUF carries a chat template (else ChatML is used).
    pub chat_template: bool,
    pub threads: usize,
    pub batch_threads: usize,
    pub parallel: usize,
    pub context: u32,
    /// The file llama.cpp runs: `path`, or a re-encoded copy of it.
    pub served_path: PathBuf,
    /// The weight format served, and where it came from (e.g. `q4_0, re-encoded from q4_1`).
    pub weights: String,
    pub kv_cache: KvCache,
}

/// The text a sequence starts from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Formatted with the model's chat template (system + user, assistant turn opened).
    Chat { system: Option<String>, user: String },
    /// Tokenized as is (special tokens parsed); for benchmarks.
    Raw(String),
}

/// One generation request for the engine.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub prompt: Prompt,
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// `None` = a fresh random seed.
    pub seed: Option<u64>,
    /// Generation ends before any of these (they are not part of the text).
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// A llama.cpp grammar (GBNF, root rule `root`) every token must keep the text within; see
    /// [`grammar_for`].
    pub grammar: Option<String>,
}

/// The GBNF grammar for a structured-output request: any JSON object for
/// [`ResponseFormat::Json`], JSON valid against the schema for [`ResponseFormat::Schema`]
/// (llama.cpp's own `json_schema_to_grammar`, which covers types, `properties`/`required`,
/// `items`, `enum`, `const`, `anyOf`/`oneOf`, string `pattern`/`format`/lengths, numeric bounds
/// and local `$ref`s).
pub fn grammar_for(format: &ResponseFormat) -> Result<String, EngineError> {
    let schema = match format {
        ResponseFormat::Json => serde_json::json!({"type": "object"}),
        ResponseFormat::Schema(s) => s.clone(),
    };
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(EngineError::Invalid("a JSON schema must be an object".into()));
    }
    llama_cpp_2::json_schema_to_grammar(&schema.to_string())
        .map_err(|e| EngineError::Invalid(format!("the JSON schema cannot be enforced: {e}")))
}

/// Why a sequence ended normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached, or the sequence's context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A finished sequence.
#[derive(Clone, Debug)]
pub struct Finished {
    pub text: String,
    pub prompt_tokens: u32,
    /// Of `prompt_tokens`, how many were already in the slot's KV cache (not processed again).
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    pub finish_reason: FinishReason,
}

/// What a submitted job sends back, in order: `Token`s, then one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// The text that became final with one generated token (may be empty: a split multibyte
    /// character, or text held back because it may begin a stop string).
    Token(String),
    Done(Finished),
    Failed(EngineError),
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load the model: {0}")]
    Load(String),
    #[error("the prompt has {tokens} tokens; the context per sequence is {context}")]
    PromptTooLong { tokens: usize, context: u32 },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
    #[error("cancelled")]
    Cancelled,
    #[error("the engine thread has stopped")]
    Stopped,
}

struct Job {
    spec: JobSpec,
    events: UnboundedSender<Event>,
    cancel: CancellationToken,
}

enum Cmd {
    Job(Box<Job>),
    Shutdown,
}

/// A running engine. Dropping it stops the thread (and frees the model).
pub struct Engine {
    tx: Mutex<mpsc::Sender<Cmd>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    info: ModelInfo,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("info", &self.info).finish()
    }
}

impl Engine {
    /// Starts the engine thread and waits until the model is loaded.
    pub fn start(cfg: EngineConfig) -> Result<Engine, EngineError> {
        if cfg.parallel == 0 || cfg.parallel > 256 {
            return Err(EngineError::Invalid(format!("parallel must be 1..=256, not {}", cfg.parallel)));
        }
        if cfg.threads == 0 || cfg.threads > 512 {
            return Err(EngineError::Invalid(format!("threads must be 1..=512, not {}", cfg.threads)));
        }
        if cfg.context < 16 {
            return Err(EngineError::Invalid(format!("context must be at least 16 tokens, not {}", cfg.context)));
        }
        let total = (cfg.parallel as u64) * u64::from(cfg.context);
        if total > u64::from(u32::MAX / 2) {
            return Err(EngineError::Invalid(format!("parallel * context = {total} is too large")));
        }
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("koubou-llama".into())
            .spawn(move || run(cfg, ready_tx, rx))
            .map_err(|e| EngineError::Load(format!("cannot spawn the engine thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(info)) => Ok(Engine { tx: Mutex::new(tx), thread: Mutex::new(Some(thread)), info }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(EngineError::Load("the engine thread died while loading".into()))
            }
        }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Queues a job. Events arrive on the returned receiver; dropping the receiver or firing
    /// `cancel` ends the sequence at the next step.
    pub fn submit(&self, spec: JobSpec, cancel: CancellationToken) -> Result<UnboundedReceiver<Event>, EngineError> {
        if !spec.temperature.is_finite() || spec.temperature < 0.0 {
            return Err(EngineError::Invalid(format!("temperature must be >= 0, not {}", spec.temperature)));
        }
        if !spec.top_p.is_finite() || spec.top_p <= 0.0 || spec.top_p > 1.0 {
            return Err(EngineError::Invalid(format!("top_p must be in (0, 1], not {}", spec.top_p)));
        }
        if spec.max_tokens == 0 {
            return Err(EngineError::Invalid("max_tokens must be at least 1".into()));
        }
        let (events, rx) = unbounded_channel();
        let job = Box::new(Job { spec, events, cancel });
        let tx = self.tx.lock().map_err(|_| EngineError::Stopped)?;
        tx.send(Cmd::Job(job)).map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(Cmd::Shutdown);
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// One live sequence in a slot (slot index = llama.cpp sequence id).
struct Seq {
    job: Box<Job>,
    /// Tokens still to feed (the prompt, then one sampled token at a time).
    pending: Vec<LlamaToken>,
    /// Position of the next token to feed.
    n_past: u32,
    prompt_tokens: u32,
    cached_tokens: u32,
    completion_tokens: u32,
    sampler: LlamaSampler,
    /// The grammar sampler, applied before `sampler` (see [`sample_constrained`]).
    grammar: Option<LlamaSampler>,
    decoder: encoding_rs::Decoder,
    piece: Vec<u8>,
    text: String,
    /// Bytes of `text` already sent.
    emitted: usize,
    max_stop: usize,
}

enum Step {
    Continue,
    /// Ends the sequence; `true` flushes an incomplete UTF-8 tail.
    Finish(FinishReason, bool),
}

fn run(cfg: EngineConfig, ready: mpsc::SyncSender<Result<ModelInfo, EngineError>>, rx: mpsc::Receiver<Cmd>) {
    let fail = |e: String| {
        let _ = ready.send(Err(EngineError::Load(e)));
    };
    // A build made for another CPU would die with SIGILL inside llama.cpp: say so instead.
    let exts = crate::cpu::extensions();
    if let Err(e) = crate::cpu::check() {
        return fail(e.to_string());
    }
    if crate::cpu::unused(&exts).is_empty() {
        tracing::debug!("koubou-llama: {}", crate::cpu::describe(&exts));
    } else {
        tracing::info!("koubou-llama: {}", crate::cpu::describe(&exts));
    }
    let mut backend = match LlamaBackend::init() {
        Ok(b) => b,
        Err(e) => return fail(format!("llama.cpp backend: {e}")),
    };
    let debug = std::env::var("LOG_LEVEL").is_ok_and(|v| v.eq_ignore_ascii_case("debug"));
    if !debug {
        backend.void_logs();
    }
    let (served_path, weights) =
        match transcode::resolve(&cfg.model_path, cfg.weights, cfg.copies_dir.as_deref(), cfg.batch_threads) {
            Ok(r) => r,
            Err(e) => return fail(e.to_string()),
        };
    let model = match LlamaModel::load_from_file(&backend, &served_path, &LlamaModelParams::default()) {
        Ok(m) => m,
        Err(e) => return fail(format!("{}: {e}", served_path.display())),
    };
    let threads = i32::try_from(cfg.threads).unwrap_or(1);
    let n_ctx = cfg.context.saturating_mul(cfg.parallel as u32);
    let batch_cap = cfg.batch.clamp(16, n_ctx.max(16));
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_seq_max(cfg.parallel as u32)
        .with_n_batch(batch_cap)
        .with_n_ubatch(batch_cap)
        .with_n_threads(threads)
        .with_n_threads_batch(i32::try_from(cfg.batch_threads.max(1)).unwrap_or(threads))
        // One KV stream per sequence: a sequence's cells sit at the same places as when it runs
        // alone, so batching does not change its arithmetic.
        .with_kv_unified(false);
    let with_kv = |kv: KvCache| params.clone().with_type_k(kv.llama()).with_type_v(kv.llama());
    // A quantized V cache needs flash attention, which some architectures lack: fall back to f16.
    let (mut ctx, kv_cache) = match model.new_context(&backend, with_kv(cfg.kv_cache)) {
        Ok(c) => (c, cfg.kv_cache),
        Err(first) if cfg.kv_cache != KvCache::F16 => match model.new_context(&backend, with_kv(KvCache::F16)) {
            Ok(c) => {
                tracing::warn!(error = %first, "a {} KV cache is not possible with this model; using f16", cfg.kv_cache.as_str());
                (c, KvCache::F16)
            }
            Err(e) => return fail(format!("cannot create a context of {n_ctx} tokens: {e}")),
        },
        Err(e) => return fail(format!("cannot create a context of {n_ctx} tokens: {e}")),
    };
    let template = model.chat_template(None).ok();
    let info = ModelInfo {
        file_name: cfg
            .model_path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| cfg.model_path.display().to_string()),
        path: cfg.model_path.clone(),
        n_params: model.n_params(),
        size_bytes: model.size(),
        chat_template: template.is_some(),
        threads: cfg.threads,
        batch_threads: cfg.batch_threads,
        parallel: cfg.parallel,
        context: cfg.context,
        served_path,
        weights,
        kv_cache,
    };
    if ready.send(Ok(info)).is_err() {
        return;
    }
    tracing::debug!(model = %cfg.model_path.display(), threads, parallel = cfg.parallel, "koubou-llama engine ready");

    let mut cores = CoreShare::new(cfg.share_cores);
    let mut slots: Vec<Option<Seq>> = (0..cfg.parallel).map(|_| None).collect();
    let mut cache = PromptCache::new(cfg.parallel, cfg.cache_prompts);
    let mut waiting: VecDeque<Box<Job>> = VecDeque::new();
    let mut batch = LlamaBatch::new(batch_cap as usize, 1);
    // (slot, batch index) of the sequences whose logits the next decode produces.
    let mut to_sample: Vec<(usize, i32)> = Vec::with_capacity(cfg.parallel);
    let mut in_batch: Vec<usize> = Vec::with_capacity(cfg.parallel);

    'outer: loop {
        // 1. Take new jobs: block when idle, otherwise just drain.
        let idle = slots.iter().all(Option::is_none) && waiting.is_empty();
        if idle {
            if cores.shared + cores.narrowed > 0 {
                tracing::debug!(
                    on_all_threads = cores.shared,
                    on_one = cores.narrowed,
                    others = cores.others(),
                    "batched decodes since the engine was last idle"
                );
                (cores.shared, cores.narrowed) = (0, 0);
            }
            match rx.recv() {
                Ok(Cmd::Job(j)) => waiting.push_back(j),
                Ok(Cmd::Shutdown) | Err(_) => break 'outer,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Cmd::Job(j)) => waiting.push_back(j),
                Ok(Cmd::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => break 'outer,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }

        // 2. End cancelled sequences (and those whose caller went away); free their slots.
        for slot in slots.iter_mut() {
            if slot.as_ref().is_some_and(|s| s.job.cancel.is_cancelled() || s.job.events.is_closed()) {
                let s = slot.take().expect("checked above");
                // The cells hold what was fed and decoded: still a reusable prefix (admission
                // clears whatever a new prompt does not reuse).
                let _ = s.job.events.send(Event::Failed(EngineError::Cancelled));
            }
        }

        // 3. Admit waiting jobs into free slots.
        while !waiting.is_empty() && slots.iter().any(Option::is_none) {
            let job = waiting.pop_front().expect("not empty");
            if job.cancel.is_cancelled() || job.events.is_closed() {
                let _ = job.events.send(Event::Failed(EngineError::Cancelled));
                continue;
            }
            match admit(job, &model, template.as_ref(), cfg.context) {
                Ok(mut seq) => {
                    let place = cache.place(&seq.pending, |id| slots[id].is_none()).expect("a slot is free");
                    let id = place.slot;
                    // Keep the cells of the shared prefix, remove the rest; a cache that cannot
                    // remove part of a sequence is cleared whole.
                    let kept = place.reuse > 0
                        && ctx.clear_kv_cache_seq(Some(id as u32), Some(place.reuse as u32), None).unwrap_or(false);
                    if kept {
                        seq.pending.drain(..place.reuse);
                        seq.n_past = place.reuse as u32;
                        seq.cached_tokens = place.reuse as u32;
                    } else {
                        clear(&mut ctx, &mut cache, id);
                    }
                    slots[id] = Some(seq);
                }
                Err((job, e)) => {
                    let _ = job.events.send(Event::Failed(e));
                }
            }
        }

        // 4. Build one batch: the next token of every generating sequence first (so a long
        //    prompt never stalls them), then prompt chunks with whatever room is left.
        batch.clear();
        to_sample.clear();
        in_batch.clear();
        let mut room = batch_cap as usize;
        for prefill_pass in [false, true] {
            for (id, slot) in slots.iter_mut().enumerate() {
                let Some(seq) = slot.as_mut() else { continue };
                let prefilling = seq.completion_tokens == 0;
                if prefilling != prefill_pass || seq.pending.is_empty() || room == 0 {
                    continue;
                }
                let take = seq.pending.len().min(room);
                let last_chunk = take == seq.pending.len();
                for (k, &tok) in seq.pending[..take].iter().enumerate() {
                    let logits = last_chunk && k + 1 == take;
                    if batch.add(tok, (seq.n_past as usize + k) as i32, &[id as i32], logits).is_err() {
                        break;
                    }
                    if logits {
                        to_sample.push((id, batch.n_tokens() - 1));
                    }
                }
                cache.fed(id, &seq.pending[..take]);
                seq.pending.drain(..take);
                seq.n_past += take as u32;
                room -= take;
                in_batch.push(id);
            }
        }
        if batch.n_tokens() == 0 {
            continue;
        }

        // 5. One decode for all of them (on one thread if others keep the cores busy).
        cores.before_decode(if batch.n_tokens() > 1 { cfg.batch_threads } else { cfg.threads });
        if let Err(e) = ctx.decode(&mut batch) {
            let detail = e.to_string();
            for &id in &in_batch {
                if let Some(s) = slots[id].take() {
                    let _ = s.job.events.send(Event::Failed(EngineError::Decode(detail.clone())));
                    clear(&mut ctx, &mut cache, id);
                }
            }
            continue;
        }

        // 6. Sample per sequence, stream text, and end the finished ones.
        for &(id, idx) in &to_sample {
            let Some(seq) = slots[id].as_mut() else { continue };
            let token = match seq.grammar.as_mut() {
                None => seq.sampler.sample(&ctx, idx),
                Some(g) => match sample_constrained(&ctx, idx, g, &mut seq.sampler) {
                    Ok(t) => t,
                    Err(e) => {
                        let s = slots[id].take().expect("present");
                        let _ = s.job.events.send(Event::Failed(EngineError::Decode(e)));
                        clear(&mut ctx, &mut cache, id);
                        continue;
                    }
                },
            };
            match seq.on_token(token, &model, cfg.context) {
                Step::Continue => {}
                Step::Finish(reason, flush) => {
                    let s = slots[id].take().expect("present");
                    s.finish(reason, flush);
                }
            }
        }
    }

    // Shutting down: tell everyone still waiting.
    for s in slots.into_iter().flatten() {
        let _ = s.job.events.send(Event::Failed(EngineError::Stopped));
    }
    for j in waiting {
        let _ = j.events.send(Event::Failed(EngineError::Stopped));
    }
    drop(ctx);
}

/// Clears a slot's KV cells and forgets what they held.
fn clear(ctx: &mut llama_cpp_2::context::LlamaContext<'_>, cache: &mut PromptCache, id: usize) {
    let _ = ctx.clear_kv_cache_seq(Some(id as u32), None, None);
    cache.forget(id);
}

/// ChatML, for models whose GGUF has no (usable) chat template.
pub fn chatml(system: Option<&str>, user: &str) -> String {
    let mut s = String::new();
    if let Some(sys) = system {
        s.push_str("<|im_start|>system\n");
        s.push_str(sys);
        s.push_str("<|im_end|>\n");
    }
    s.push_str("<|im_start|>user\n");
    s.push_str(user);
    s.push_str("<|im_end|>\n<|im_start|>assistant\n");
    s
}

fn format_chat(model: &LlamaModel, template: Option<&LlamaChatTemplate>, system: Option<&str>, user: &str) -> String {
    if let Some(t) = template {
        let mut msgs = Vec::with_capacity(2);
        if let Some(sys) = system {
            msgs.extend(LlamaChatMessage::new("system".into(), sys.into()));
        }
        msgs.extend(LlamaChatMessage::new("user".into(), user.into()));
        if msgs.len() == 1 + usize::from(system.is_some())
            && let Ok(s) = model.apply_chat_template(t, &msgs, true)
        {
            return s;
        }
    }
    chatml(system, user)
}

fn random_seed() -> u32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.finish() as u32
}

fn sampler_for(spec: &JobSpec) -> LlamaSampler {
    if spec.temperature <= 0.0 {
        return LlamaSampler::greedy();
    }
    let seed = spec.seed.map(|s| (s ^ (s >> 32)) as u32).unwrap_or_else(random_seed);
    let mut chain = vec![LlamaSampler::top_k(40)];
    if spec.top_p < 1.0 {
        chain.push(LlamaSampler::top_p(spec.top_p, 1));
    }
    chain.push(LlamaSampler::temp(spec.temperature));
    chain.push(LlamaSampler::dist(seed));
    LlamaSampler::chain_simple(chain)
}

/// Samples under a grammar: the grammar masks the candidates first, then the usual chain picks
/// among those left, and the grammar accepts the pick. Done by hand rather than with the grammar
/// inside the chain because llama.cpp's `llama_sampler_sample` accepts without catching the
/// exception a dead-end grammar throws (an abort through FFI); here a dead end fails only this
/// sequence.
fn sample_constrained(
    ctx: &llama_cpp_2::context::LlamaContext<'_>,
    idx: i32,
    grammar: &mut LlamaSampler,
    chain: &mut LlamaSampler,
) -> Result<LlamaToken, String> {
    let mut cands = ctx.token_data_array_ith(idx);
    cands.apply_sampler(grammar);
    if cands.data.iter().all(|d| d.logit() == f32::NEG_INFINITY) {
        return Err("the grammar allows no token the model can produce here".into());
    }
    cands.apply_sampler(chain);
    let token = cands.selected_token().ok_or("the sampler selected no token")?;
    grammar.try_accept(token).map_err(|e| format!("the grammar refused the sampled token ({e})"))?;
    chain.accept(token);
    Ok(token)
}

#[allow(clippy::result_large_err)]
fn admit(
    job: Box<Job>,
    model: &LlamaModel,
    template: Option<&LlamaChatTemplate>,
    context: u32,
) -> Result<Seq, (Box<Job>, EngineError)> {
    let has_nul = match &job.spec.prompt {
        Prompt::Chat { system, user } => user.contains('\0') || system.as_ref().is_some_and(|s| s.contains('\0')),
        Prompt::Raw(s) => s.contains('\0'),
    };
    if has_nul {
        return Err((job, EngineError::Invalid("the prompt contains a NUL byte".into())));
    }
    let text = match &job.spec.prompt {
        Prompt::Chat { system, user } => format_chat(model, template, system.as_deref(), user),
        Prompt::Raw(s) => s.clone(),
    };
    let tokens = model.vocab().tokenize(text.as_bytes(), true, true);
    if tokens.is_empty() {
        return Err((job, EngineError::EmptyPrompt));
    }
    // Room for the prompt plus at least one generated token.
    if tokens.len() >= context as usize {
        let n = tokens.len();
        return Err((job, EngineError::PromptTooLong { tokens: n, context }));
    }
    let grammar = match &job.spec.grammar {
        Some(g) => match LlamaSampler::grammar(model, g, "root") {
            Ok(s) => Some(s),
            Err(e) => return Err((job, EngineError::Invalid(format!("the grammar is not valid GBNF: {e}")))),
        },
        None => None,
    };
    let sampler = sampler_for(&job.spec);
    let max_stop = job.spec.stop.iter().map(String::len).max().unwrap_or(0);
    Ok(Seq {
        prompt_tokens: tokens.len() as u32,
        cached_tokens: 0,
        pending: tokens,
        n_past: 0,
        completion_tokens: 0,
        sampler,
        grammar,
        decoder: encoding_rs::UTF_8.new_decoder_without_bom_handling(),
        piece: Vec::with_capacity(32),
        text: String::new(),
        emitted: 0,
        max_stop,
        job,
    })
}

impl Seq {
    fn on_token(&mut self, token: LlamaToken, model: &LlamaModel, context: u32) -> Step {
        self.completion_tokens += 1;
        let vocab = model.vocab();
        if !self.job.spec.ignore_eos && vocab.is_eog(token) {
            return Step::Finish(FinishReason::Stop, true);
        }
        self.piece.clear();
        vocab.token_to_piece_into(token, &mut self.piece, false, None);
        let before = self.text.len();
        self.push_bytes(false);

        if self.max_stop > 0 {
            // Only a stop string overlapping the new text can be new.
            let mut from = before.saturating_sub(self.max_stop - 1);
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            let hit = self
                .job
                .spec
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| self.text[from..].find(s.as_str()))
                .min();
            if let Some(at) = hit {
                self.text.truncate(from + at);
                return Step::Finish(FinishReason::Stop, false);
            }
        }
        // The token would be fed at position `n_past`, which must fit the sequence's context.
        if self.completion_tokens >= self.job.spec.max_tokens || self.n_past >= context {
            return Step::Finish(FinishReason::Length, true);
        }
        // Send what can no longer become part of a stop string.
        let safe = self.text.len() - self.held_back();
        let piece = if safe > self.emitted { self.text[self.emitted..safe].to_string() } else { String::new() };
        self.emitted = self.emitted.max(safe);
        if self.job.events.send(Event::Token(piece)).is_err() {
            // The caller is gone; the sequence is dropped at the next step.
            return Step::Continue;
        }
        self.pending.push(token);
        Step::Continue
    }

    fn push_bytes(&mut self, last: bool) {
        let need = self.decoder.max_utf8_buffer_length(self.piece.len()).unwrap_or(self.piece.len() * 3 + 8);
        self.text.reserve(need);
        let (_, _, _) = self.decoder.decode_to_string(&self.piece, &mut self.text, last);
    }

    /// Length of the longest suffix of `text` that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let bytes = self.text.as_bytes();
        let mut best = 0;
        for s in &self.job.spec.stop {
            let s = s.as_bytes();
            for k in (1..s.len().min(bytes.len() + 1)).rev() {
                if k <= best {
                    break;
                }
                if bytes.ends_with(&s[..k]) {
                    best = k;
                    break;
                }
            }
        }
        best
    }

    fn finish(mut self, reason: FinishReason, flush: bool) {
        if flush {
            // The text may end inside a multibyte character: emit it as U+FFFD.
            self.piece.clear();
            self.push_bytes(true);
        }
        if self.text.len() > self.emitted {
            let rest = self.text[self.emitted..].to_string();
            self.emitted = self.text.len();
            let _ = self.job.events.send(Event::Token(rest));
        }
        let done = Finished {
            text: std::mem::take(&mut self.text),
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            completion_tokens: self.completion_tokens,
            finish_reason: reason,
        };
        let _ = self.job.events.send(Event::Done(done));
    }
}
