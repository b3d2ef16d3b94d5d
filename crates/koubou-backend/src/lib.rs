//! LLM backends: everything that turns a prompt into streamed tokens.
//!
//! # Layout
//! - [`Backend`]: the one trait every provider implements (stream tokens, report usage, say
//!   whether it is up, say how many generations it serves at once).
//! - [`config`]: `BackendTable` (one `[backends.NAME]` table: the provider's `BackendConfig`
//!   plus what every backend may set — `remote`, prices), `TypeRoute` (one `[types.NAME]`) and
//!   `PricingConfig` (`[pricing]`).
//! - [`router`]: `Router`, which picks backend + model + timeout per task type, walks the type's
//!   fallback chain when a backend is unreachable, rate-limited or too slow, keeps confidential
//!   work on local backends, checks structured answers and counts tokens and cost per backend.
//! - [`cooldown`]: `Cooldowns`, which keeps a rate-limited backend quiet until it said it would
//!   take requests again.
//! - [`format`]: structured output — the check of an answer against the [`ResponseFormat`] a
//!   task asks for (JSON, JSON Schema).
//! - Providers: [`ollama`] (`/api/chat`), [`openai`] (`/v1/chat/completions`, SSE, with dialect
//!   options for hosted APIs), [`anthropic`] (`/v1/messages`, SSE), [`exec`] (a configured
//!   program: task JSON on stdin, answer on stdout) and [`codex`] (`codex exec`). The embedded
//!   GGUF engine lives in its own crate, `koubou-llama`, and implements the same trait.
//! - [`http`]: the HTTP client every provider (and `koubou-client`) builds: TLS roots, proxies,
//!   cancellable sends, rate-limit hints.
//! - [`supervise`]: keeps every child program (codex, exec) from outliving the server.
//!
//! Architecture invariant: nothing here knows about queues, workers or HTTP servers; a backend
//! is given a request and a cancellation token and returns a [`Generation`] or a [`BackendError`].

pub mod anthropic;
pub mod codex;
pub mod config;
pub mod cooldown;
pub mod echo;
pub mod exec;
pub mod format;
pub mod http;
pub mod ollama;
pub mod openai;
mod process;
pub mod providers;
pub mod router;
mod sse;
pub mod supervise;

use std::time::Duration;

use async_trait::async_trait;
pub use config::{
    BackendConfig, BackendSettings, BackendTable, BackendsConfig, EmbeddedConfig, PricingConfig, TypeRoute,
};
pub use koubou_task::{GenOptions, MeterReading, Prices, Spared, Usage};
pub use process::{AUTH_TOKEN_ENV, withhold_env};
pub use providers::build;
pub use router::{Meter, Plan, Profile, RouteError, Router, Served, Step};
use serde::Serialize;
pub use tokio_util::sync::CancellationToken;

/// One generation to run.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The model to ask for (the router resolves it; never empty).
    pub model: String,
    pub system: Option<String>,
    pub prompt: String,
    pub options: GenOptions,
    /// The wall-clock budget; the caller also enforces it, but process backends use it to kill
    /// their child in time.
    pub timeout: Duration,
    /// For backends that hand the whole task to a program (exec): its id and type.
    pub task_id: String,
    pub task_kind: String,
    /// The context window to ask for, in tokens, for backends that take one per request
    /// (Ollama's `num_ctx`); `None` leaves the backend's own setting.
    pub num_ctx: Option<u32>,
    /// The shape the answer must have (`None`: free text): providers that can constrain
    /// generation are asked to (Ollama's `format`, OpenAI's `response_format`, the embedded
    /// engine's grammar); the router checks the answer either way.
    pub response_format: Option<ResponseFormat>,
}

/// Structured output a task asks for (`json = true`, or a JSON Schema).
#[derive(Clone, Debug, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON value.
    Json,
    /// JSON valid against this JSON Schema (an object).
    Schema(serde_json::Value),
}

/// What a finished generation returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub text: String,
    pub usage: Usage,
    /// The model that answered, as the backend names it.
    pub model: String,
    /// `stop`, `length`, or whatever the backend said.
    pub finish_reason: String,
    /// Things the task's owner should know about this answer (e.g. the prompt filled the
    /// context window, so its start was cut off).
    pub warnings: Vec<String>,
}

/// Receives tokens as they are generated.
pub trait TokenSink: Send + Sync {
    fn token(&self, text: &str);
    /// The most bytes of answer the caller keeps (`None`: no bound). Streaming backends need not
    /// look (the router stops them once the sink has seen more); a backend that holds output
    /// before it can stream it (a whole line, a file) refuses more than this with
    /// [`BackendError::TooLarge`] instead of buffering it.
    fn max_bytes(&self) -> Option<usize> {
        None
    }
}

impl<F: Fn(&str) + Send + Sync> TokenSink for F {
    fn token(&self, text: &str) {
        self(text)
    }
}

/// A sink that drops every token (for callers that want only the final text).
pub struct Discard;

impl TokenSink for Discard {
    fn token(&self, _: &str) {}
}

/// Whether a backend can serve, and what it serves.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Health {
    pub up: bool,
    /// What was checked and what came back, in words (e.g. "ollama 0.5.1 at http://…; 3 models").
    pub detail: String,
    /// Models the backend says it has, where it can list them.
    pub models: Vec<String>,
}

impl Health {
    pub fn up(detail: impl Into<String>, models: Vec<String>) -> Self {
        Health { up: true, detail: detail.into(), models }
    }
    pub fn down(detail: impl Into<String>) -> Self {
        Health { up: false, detail: detail.into(), models: vec![] }
    }
}

/// An LLM provider.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The configured name (`[backends.NAME]`).
    fn name(&self) -> &str;
    /// The provider kind: `ollama`, `openai`, `anthropic`, `codex`, `exec` or `embedded`.
    fn kind(&self) -> &'static str;
    /// The model used when neither the task nor its type names one.
    fn default_model(&self) -> &str;
    /// How many generations it serves at once without queueing them itself; the pool never runs
    /// more workers against it than this.
    fn capacity(&self) -> usize;
    /// Checks reachability (and, where possible, which models exist). Must answer within a few
    /// seconds even when the provider hangs.
    async fn health(&self) -> Health;
    /// Runs one generation, calling `sink` with each piece of text as it arrives. Stops promptly
    /// (and kills any child process) when `cancel` fires, returning [`BackendError::Cancelled`].
    async fn generate(
        &self,
        req: GenerateRequest,
        sink: &dyn TokenSink,
        cancel: CancellationToken,
    ) -> Result<Generation, BackendError>;
}

/// Why a generation failed. Each variant says whether trying again (or elsewhere) can help.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Nothing answered (connection refused, DNS, program not found). The router tries the
    /// fallback backend; the queue retries later.
    #[error("backend {backend} is unreachable: {detail}")]
    Unreachable { backend: String, detail: String },
    /// The provider answered but does not have the model. `hint` says how to get it.
    #[error("model {model:?} is not available on {backend}: {hint}")]
    ModelMissing { backend: String, model: String, hint: String },
    /// The provider refused the request (4xx): trying again will not help.
    #[error("{backend} rejected the request (HTTP {status}): {detail}")]
    Rejected { backend: String, status: u16, detail: String },
    /// The provider asked us to slow down (429; 529 overloaded; 503 with `Retry-After`; an
    /// overloaded error mid-stream). `retry_after` is the wait it asked for, if it said. The
    /// router cools the backend down meanwhile; the queue retries no sooner than that.
    #[error("{backend} is rate-limited (HTTP {status}{}): {detail}", retry_after.map(|d| format!(", retry after {:.1} s", d.as_secs_f64())).unwrap_or_default())]
    RateLimited { backend: String, status: u16, retry_after: Option<Duration>, detail: String },
    /// The provider failed (5xx, a crashed program, a broken stream): may work next time.
    #[error("{backend} failed: {detail}")]
    Failed { backend: String, detail: String },
    /// The stream ended without the provider saying it was done.
    #[error("{backend}: the answer stream ended early: {detail}")]
    Truncated { backend: String, detail: String },
    #[error("{backend} did not finish within {0:?}", .timeout)]
    Timeout { backend: String, timeout: Duration },
    /// The answer grew past `limits.max_result_bytes`; the backend was stopped.
    #[error("{backend}: output too large: more than {limit} bytes (limits.max_result_bytes)")]
    TooLarge { backend: String, limit: usize },
    /// The answer is not the structured output the task asked for (not JSON, or not valid
    /// against its schema). Another attempt may do better.
    #[error("{backend} answered, but not with the JSON asked for: {detail}")]
    BadOutput { backend: String, detail: String },
    #[error("cancelled")]
    Cancelled,
    /// The configuration cannot work (bad URL, missing program, missing key).
    #[error("backend {backend} is misconfigured: {detail}")]
    Config { backend: String, detail: String },
}

impl BackendError {
    /// Worth another attempt later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            BackendError::Unreachable { .. }
                | BackendError::RateLimited { .. }
                | BackendError::Failed { .. }
                | BackendError::Truncated { .. }
                | BackendError::Timeout { .. }
                | BackendError::BadOutput { .. }
        )
    }

    /// The backend that failed (none for a cancel).
    pub fn backend(&self) -> Option<&str> {
        match self {
            BackendError::Unreachable { backend, .. }
            | BackendError::ModelMissing { backend, .. }
            | BackendError::Rejected { backend, .. }
            | BackendError::RateLimited { backend, .. }
            | BackendError::Failed { backend, .. }
            | BackendError::Truncated { backend, .. }
            | BackendError::Timeout { backend, .. }
            | BackendError::TooLarge { backend, .. }
            | BackendError::BadOutput { backend, .. }
            | BackendError::Config { backend, .. } => Some(backend),
            BackendError::Cancelled => None,
        }
    }

    /// The wait the provider asked for before another request.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BackendError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Worth trying the next backend of the type's fallback chain right away: this backend
    /// cannot serve now (unreachable, rate-limited or overloaded, too slow, without the model,
    /// misconfigured). Never for a request the provider refused as bad, nor a cancel.
    pub fn falls_back(&self) -> bool {
        matches!(
            self,
            BackendError::Unreachable { .. }
                | BackendError::RateLimited { .. }
                | BackendError::Timeout { .. }
                | BackendError::ModelMissing { .. }
                | BackendError::Config { .. }
        )
    }
}
