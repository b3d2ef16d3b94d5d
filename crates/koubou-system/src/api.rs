//! The service API every face speaks: one trait, its request and response shapes, and its error.
//!
//! `Koubou` (in-process) and `koubou_client::Client` (over HTTP) both implement [`Api`], so the
//! CLI and the MCP server work the same against a local system or a running `koubou serve`.
//! The shapes here are the JSON the REST API sends and takes.

use std::{pin::Pin, time::Duration};

use async_trait::async_trait;
use futures::Stream;
use koubou_backend::{MeterReading, Prices, Spared};
use koubou_task::{
    Event, FieldError, GenOptions, Millis, NewTask, Priority, Task, TaskId, TaskKind, TaskStatus, Usage, rfc3339,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

/// What went wrong, sorted by whose fault it is (each maps to one HTTP status).
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ApiError {
    /// 400: a field of the request is wrong.
    #[error("{0}")]
    Invalid(FieldError),
    /// 404.
    #[error("task {0} not found")]
    NotFound(String),
    /// 409: the request does not fit the task's state.
    #[error("{0}")]
    Conflict(String),
    /// 503: the system cannot take work now (shutting down, queue unreachable).
    #[error("{0}")]
    Unavailable(String),
    /// 429 or 503 with `Retry-After`: the request is fine but cannot be taken now, and nothing
    /// of it was stored; sending it again after `retry_after_secs` may succeed.
    #[error("{message}")]
    TryLater { why: Busy, message: String, retry_after_secs: u64 },
    /// 500: our fault.
    #[error("{0}")]
    Internal(String),
}

/// Why a request must wait ([`ApiError::TryLater`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    /// 429: `limits.max_pending` tasks are already waiting.
    QueueFull,
    /// 503: the disk holding the queue is full.
    DiskFull,
    /// 503: another process holds the database locked.
    Locked,
}

impl Busy {
    pub fn code(self) -> &'static str {
        match self {
            Busy::QueueFull => "queue_full",
            Busy::DiskFull => "disk_full",
            Busy::Locked => "database_locked",
        }
    }

    fn from_code(code: &str) -> Option<Busy> {
        [Busy::QueueFull, Busy::DiskFull, Busy::Locked].into_iter().find(|b| b.code() == code)
    }
}

impl ApiError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid(FieldError::new(field, message))
    }

    pub fn http_status(&self) -> u16 {
        match self {
            ApiError::Invalid(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::Conflict(_) => 409,
            ApiError::Unavailable(_) => 503,
            ApiError::TryLater { why: Busy::QueueFull, .. } => 429,
            ApiError::TryLater { .. } => 503,
            ApiError::Internal(_) => 500,
        }
    }

    /// Seconds to send in `Retry-After`, for errors that have one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::TryLater { retry_after_secs, .. } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// A short machine-readable code, sent as `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::TryLater { why, .. } => why.code(),
            ApiError::Internal(_) => "internal",
        }
    }

    /// The JSON error body every face sends: `{"error": {"code", "message", "field"?,
    /// "retry_after_secs"?}}`.
    pub fn body(&self) -> Value {
        let field = match self {
            ApiError::Invalid(f) => Some(f.field.clone()),
            _ => None,
        };
        ErrorBody::new(self.code(), self.to_string(), field, self.retry_after()).to_value()
    }

    /// Rebuilds an error from a status and body written by [`ApiError::body`].
    pub fn from_body(status: u16, body: &Value) -> Self {
        let msg = body["error"]["message"].as_str().unwrap_or("no message").to_owned();
        let busy = body["error"]["code"].as_str().and_then(Busy::from_code);
        match (status, busy) {
            (400 | 422, _) => {
                let field = body["error"]["field"].as_str().unwrap_or("request").to_owned();
                let message = msg.strip_prefix(&format!("{field}: ")).unwrap_or(&msg).to_owned();
                ApiError::Invalid(FieldError { field, message })
            }
            (404, _) => ApiError::NotFound(msg),
            (409, _) => ApiError::Conflict(msg),
            (429 | 503, Some(why)) => ApiError::TryLater {
                why,
                message: msg,
                retry_after_secs: body["error"]["retry_after_secs"].as_u64().unwrap_or(1),
            },
            (503, None) => ApiError::Unavailable(msg),
            _ => ApiError::Internal(msg),
        }
    }
}

/// The fields [`SubmitRequest::from_json`] reads; any other is refused. [`SubmitBody`] is their
/// schema, and a test holds the two equal.
pub const SUBMIT_FIELDS: &[&str] = &[
    "type",
    "prompt",
    "content",
    "priority",
    "system",
    "model",
    "backend",
    "max_attempts",
    "timeout_secs",
    "idempotency_key",
    "options",
    "metadata",
    "tags",
    "json",
    "schema",
    "sync",
    "wait_secs",
];

/// The JSON body [`SubmitRequest::from_json`] reads (`POST /task/delegate`), as its schema in the
/// REST API's OpenAPI document: never built, it only describes. `prompt` or its alias `content`
/// is required (`prompt` wins when both are sent); `null` is the same as an absent field, except
/// for `prompt` and `content`; any other field is refused.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct SubmitBody {
    /// The task's type (default `general`); it must be configured on the server.
    #[serde(rename = "type")]
    kind: Option<TaskKind>,
    /// The text of the task.
    #[serde(default)]
    prompt: String,
    /// The prototype's name for `prompt`.
    #[serde(default)]
    content: String,
    /// Default 5.
    priority: Option<Priority>,
    /// A system prompt (else the one configured for the type).
    system: Option<String>,
    /// Pins the model (else the router's choice for the type).
    model: Option<String>,
    /// Pins the backend (else the router's choice for the type).
    backend: Option<String>,
    /// At most `limits.max_attempts_cap` (0 counts as 1).
    max_attempts: Option<u64>,
    /// At most `limits.max_timeout_secs`.
    timeout_secs: Option<u64>,
    /// A second submission with the same key returns the first task instead of a new one.
    idempotency_key: Option<String>,
    options: Option<GenOptions>,
    /// Free JSON kept with the task (at most `limits.max_metadata_bytes` serialized).
    metadata: Option<Map<String, Value>>,
    /// Labels, lower-cased and de-duplicated (at most 16); `confidential` keeps the task off
    /// remote backends whatever the routing. One string is one tag.
    tags: Option<SubmitTags>,
    /// Ask for a JSON answer; one that does not parse fails the attempt.
    json: Option<bool>,
    /// A JSON Schema the answer must follow (implies `json`).
    #[schema(value_type = Option<Object>)]
    schema: Option<Value>,
    /// Wait for the result and answer with it (bounded by `server.sync_wait_secs`).
    sync: Option<bool>,
    /// How long to wait when `sync` (default and bound: `server.sync_wait_secs`).
    wait_secs: Option<u64>,
}

/// `tags` in [`SubmitBody`]: one tag, or a list of them.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum SubmitTags {
    One(String),
    Many(Vec<String>),
}

/// Every error every face sends, whatever its status: `{"error": {"code", "message", "field"?,
/// "retry_after_secs"?}}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong ([`ErrorBody`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable: `invalid_request`, `not_found`, `conflict`, `queue_full`, …
    pub code: String,
    /// For people: what is wrong and what to do about it.
    pub message: String,
    /// The request field (or header: `Host`, `Origin`, `Authorization`, `Content-Type`; or the
    /// setting, for a limit) at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// With 429 and some 503s: seconds to wait before sending the request again (also sent as
    /// the `Retry-After` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

impl ErrorBody {
    pub fn new(code: &str, message: String, field: Option<String>, retry_after_secs: Option<u64>) -> Self {
        ErrorBody { error: ErrorDetail { code: code.to_owned(), message, field, retry_after_secs } }
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// A submission as every face receives it (the seed's `POST /task/delegate` body).
#[derive(Clone, Debug, PartialEq)]
pub struct SubmitRequest {
    pub task: NewTask,
    /// Wait for the result and answer with it (bounded by the server's `sync_wait_secs`).
    pub sync: bool,
    /// How long to wait when `sync` (default: the server's bound).
    pub wait_secs: Option<u64>,
}

impl SubmitRequest {
    pub fn new(task: NewTask) -> Self {
        SubmitRequest { task, sync: false, wait_secs: None }
    }

    /// Reads a JSON body field by field, so that every error names the field at fault.
    /// `content` is accepted as an alias of `prompt` (the prototype's clients send it).
    pub fn from_json(v: &Value) -> Result<SubmitRequest, FieldError> {
        let obj = v.as_object().ok_or_else(|| FieldError::new("body", "must be a JSON object"))?;
        if let Some(k) = obj.keys().find(|k| !SUBMIT_FIELDS.contains(&k.as_str())) {
            let known = SUBMIT_FIELDS.join(", ");
            // A key that is the empty string cannot name itself: the body is at fault.
            let (field, what) =
                if k.is_empty() { ("body", "a field named \"\" is unknown") } else { (k.as_str(), "unknown field") };
            return Err(FieldError::new(field, format!("{what}; known fields: {known}")));
        }
        // Both are read, so a wrong `content` beside a `prompt` is refused too; `prompt` wins.
        let content = obj.get("content").map(|c| str_field(c, "content")).transpose()?;
        let prompt = match (obj.get("prompt"), content) {
            (Some(p), _) => str_field(p, "prompt")?,
            (None, Some(c)) => c,
            (None, None) => return Err(FieldError::new("prompt", "is required (the text of the task)")),
        };
        let kind = match obj.get("type") {
            None | Some(Value::Null) => TaskKind::general(),
            Some(v) => TaskKind::parse(&str_field(v, "type")?).map_err(|m| FieldError::new("type", m))?,
        };
        let mut task = NewTask::new(kind, prompt);
        if let Some(v) = present(obj, "priority") {
            let n = v
                .as_i64()
                .filter(|_| v.is_i64() || v.is_u64())
                .ok_or_else(|| FieldError::new("priority", format!("must be an integer from 1 to 10, got {v}")))?;
            task.priority = Priority::new(n).map_err(|m| FieldError::new("priority", m))?;
        }
        task.system = opt_str(obj, "system")?;
        task.model = opt_str(obj, "model")?;
        task.backend = opt_str(obj, "backend")?;
        task.idempotency_key = opt_str(obj, "idempotency_key")?;
        task.max_attempts = opt_u64(obj, "max_attempts")?.map(|n| n.min(u32::MAX as u64) as u32);
        task.timeout_secs = opt_u64(obj, "timeout_secs")?;
        if let Some(v) = present(obj, "options") {
            // serde would read a struct from an array too (`[]` as every default): an object only.
            if !v.is_object() {
                return Err(FieldError::new("options", format!("must be a JSON object, got {v}")));
            }
            task.options = serde_json::from_value::<GenOptions>(v.clone())
                .map_err(|e| FieldError::new("options", format!("{e}")))?;
        }
        if let Some(v) = present(obj, "metadata") {
            task.metadata =
                v.as_object().cloned().ok_or_else(|| FieldError::new("metadata", "must be a JSON object"))?;
        }
        if let Some(v) = present(obj, "tags") {
            task.tags = tags(v)?;
        }
        task.json = match present(obj, "json") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(FieldError::new("json", format!("must be true or false, got {v}"))),
        };
        if let Some(v) = present(obj, "schema") {
            if !v.is_object() {
                return Err(FieldError::new("schema", format!("must be a JSON Schema object, got {v}")));
            }
            task.schema = Some(v.clone());
        }
        let sync = match present(obj, "sync") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(FieldError::new("sync", format!("must be true or false, got {v}"))),
        };
        Ok(SubmitRequest { task, sync, wait_secs: opt_u64(obj, "wait_secs")? })
    }
}

/// `tags`: an array of strings (or one string), lower-cased, trimmed and without repeats.
pub fn tags(v: &Value) -> Result<Vec<String>, FieldError> {
    let bad = || FieldError::new("tags", format!("must be an array of strings, got {v}"));
    let items: Vec<&str> = match v {
        Value::Array(items) => items.iter().map(|i| i.as_str().ok_or_else(bad)).collect::<Result<_, _>>()?,
        Value::String(s) => vec![s.as_str()],
        _ => return Err(bad()),
    };
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for t in items {
        let t = t.trim().to_lowercase();
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

fn present<'a>(obj: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    obj.get(k).filter(|v| !v.is_null())
}

fn str_field(v: &Value, field: &str) -> Result<String, FieldError> {
    v.as_str().map(str::to_owned).ok_or_else(|| FieldError::new(field, format!("must be a string, got {v}")))
}

fn opt_str(obj: &Map<String, Value>, k: &str) -> Result<Option<String>, FieldError> {
    present(obj, k).map(|v| str_field(v, k)).transpose()
}

fn opt_u64(obj: &Map<String, Value>, k: &str) -> Result<Option<u64>, FieldError> {
    present(obj, k)
        .map(|v| v.as_u64().ok_or_else(|| FieldError::new(k, format!("must be a positive integer, got {v}"))))
        .transpose()
}

/// What `status` says in the answer to a submission without `sync`: the task was accepted and
/// will run in the background (the prototype's word; `task_status` has the task's own status).
pub const DELEGATED: &str = "delegated";

/// The answer to a submission.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SubmitResponse {
    pub task_id: TaskId,
    /// [`DELEGATED`] without `sync`; with `sync`, the task's status when the wait ended.
    pub status: String,
    /// The task's status (`pending` for a new task).
    pub task_status: TaskStatus,
    /// False when an earlier task with the same idempotency key was returned.
    pub created: bool,
    /// With `sync`: the task as it stood when the wait ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskView>,
    /// With `sync`: the outcome (the prototype's `result` object); null if the wait ran out first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskResult>,
}

/// A finished task's outcome, in the prototype's shape (`result` in its answers).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TaskResult {
    /// True when the task completed.
    pub success: bool,
    /// The answer; for a failed or cancelled task, what was generated before it stopped.
    pub output: String,
    /// Why it failed or was cancelled; null when it succeeded.
    #[schema(required = true)]
    pub error: Option<String>,
}

impl TaskResult {
    /// The outcome of a task, once it has finished (None while it is queued or running).
    pub fn of(t: &Task) -> Option<TaskResult> {
        let output = |s: &Option<String>| s.clone().unwrap_or_default();
        match t.status {
            TaskStatus::Completed => Some(TaskResult { success: true, output: output(&t.result), error: None }),
            TaskStatus::Failed => Some(TaskResult {
                success: false,
                output: output(&t.partial),
                error: Some(t.error.clone().unwrap_or_else(|| "failed".into())),
            }),
            TaskStatus::Cancelled => Some(TaskResult {
                success: false,
                output: output(&t.partial),
                error: Some(t.error.clone().unwrap_or_else(|| "cancelled".into())),
            }),
            _ => None,
        }
    }
}

/// A task as faces show it (`GET /task/{id}/status`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TaskView {
    pub task_id: TaskId,
    #[serde(rename = "type")]
    pub kind: TaskKind,
    pub status: TaskStatus,
    pub priority: Priority,
    pub prompt: String,
    #[schema(required = true)]
    pub system: Option<String>,
    /// Once finished: `{success, output, error}`; `output` is the answer.
    #[schema(required = true)]
    pub result: Option<TaskResult>,
    #[schema(required = true)]
    pub error: Option<String>,
    /// While running: the answer so far.
    #[schema(required = true)]
    pub partial: Option<String>,
    #[schema(required = true)]
    pub backend: Option<String>,
    #[schema(required = true)]
    pub model: Option<String>,
    /// Whether the backend that served (or serves) it is remote: the prompt left the machine.
    #[serde(default)]
    #[schema(required = true)]
    pub remote: Option<bool>,
    #[schema(required = true)]
    pub usage: Option<Usage>,
    /// What the answer cost at the serving backend's prices (none when it has no prices).
    #[serde(default)]
    #[schema(required = true)]
    pub cost: Option<f64>,
    #[schema(required = true)]
    pub worker_id: Option<String>,
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_at: String,
    #[schema(required = true)]
    pub started_at: Option<String>,
    #[schema(required = true)]
    pub finished_at: Option<String>,
    /// While retrying: when the next attempt may start.
    #[schema(required = true)]
    pub retry_at: Option<String>,
    /// While queued: tasks that will start before this one.
    #[schema(required = true)]
    pub queue_position: Option<u64>,
    /// While queued: a rough estimate of seconds until it starts (from recent throughput).
    #[schema(required = true)]
    pub estimated_start_secs: Option<f64>,
    #[schema(required = true, value_type = Option<i64>)]
    pub duration_ms: Option<Millis>,
    #[schema(required = true)]
    pub idempotency_key: Option<String>,
    pub options: GenOptions,
    pub metadata: Map<String, Value>,
    /// What the backend said the owner should know about the answer (e.g. the prompt did not
    /// fit the model's context window).
    #[serde(default)]
    #[schema(required = true)]
    pub warnings: Vec<String>,
    #[serde(default)]
    #[schema(required = true)]
    pub tags: Vec<String>,
    /// The answer must be JSON.
    #[serde(default)]
    #[schema(required = true)]
    pub json: bool,
    /// The JSON Schema the answer must match.
    #[serde(default)]
    #[schema(required = true, value_type = Option<Object>)]
    pub schema: Option<Value>,
}

impl TaskView {
    /// The answer of a completed task.
    pub fn answer(&self) -> Option<&str> {
        self.result.as_ref().filter(|r| r.success).map(|r| r.output.as_str())
    }

    pub fn from_task(t: Task) -> TaskView {
        let duration_ms = t.finished_at.zip(t.started_at).map(|(f, s)| f - s);
        let result = TaskResult::of(&t);
        TaskView {
            task_id: t.id,
            kind: t.kind,
            status: t.status,
            priority: t.priority,
            prompt: t.prompt,
            system: t.system,
            result,
            error: t.error,
            partial: t.partial,
            backend: t.backend,
            model: t.model,
            remote: t.remote,
            usage: t.usage,
            cost: t.cost,
            worker_id: t.worker_id.map(|w| w.0),
            attempts: t.attempts,
            max_attempts: t.max_attempts,
            created_at: rfc3339(t.created_at),
            started_at: t.started_at.map(rfc3339),
            finished_at: t.finished_at.map(rfc3339),
            retry_at: (t.status == TaskStatus::Retrying).then(|| rfc3339(t.available_at)),
            queue_position: None,
            estimated_start_secs: None,
            duration_ms,
            idempotency_key: t.idempotency_key,
            options: t.options,
            metadata: t.metadata,
            warnings: t.warnings,
            tags: t.tags,
            json: t.json,
            schema: t.schema,
        }
    }
}

/// `GET /tasks` filters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, IntoParams)]
#[serde(default)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Comma-separated statuses; `active` means pending, retrying and running.
    #[param(
        pattern = r"^\s*((pending|running|retrying|completed|failed|cancelled|active)\s*)?(,\s*((pending|running|retrying|completed|failed|cancelled|active)\s*)?)*$"
    )]
    pub status: Option<String>,
    /// Only tasks of this type.
    #[serde(rename = "type")]
    #[param(pattern = "^[a-z0-9_-]{1,64}$")]
    pub kind: Option<String>,
    /// Only tasks carrying this tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Substring of the prompt.
    pub q: Option<String>,
    /// Page size, 1–1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// Cursor from the previous page's `next_cursor`.
    pub before: Option<i64>,
}

/// One page of `GET /tasks`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TaskList {
    pub tasks: Vec<TaskView>,
    pub total: u64,
    #[schema(required = true)]
    pub next_cursor: Option<i64>,
}

/// A worker as `GET /workers/status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct WorkerView {
    pub worker_id: String,
    /// `idle`, `busy` or `stopping`.
    pub state: String,
    /// Same as `state` (the prototype's name for it).
    #[serde(default)]
    #[schema(required = true)]
    pub status: String,
    #[schema(required = true)]
    pub current_task: Option<TaskId>,
    pub tasks_done: u64,
    pub tasks_failed: u64,
    pub started_at: String,
    /// When the worker last reported: its last change of state (started, claimed, finished).
    #[serde(default)]
    #[schema(required = true)]
    pub last_heartbeat: String,
}

/// `GET /workers/status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct WorkersView {
    pub active: usize,
    pub busy: usize,
    pub min_workers: usize,
    pub max_workers: usize,
    /// The most workers the backends can keep busy at once.
    pub backend_capacity: usize,
    /// `max_workers` as configured; `max_workers` above is what runs (capped by capacity).
    #[serde(default)]
    #[schema(required = true)]
    pub configured_max_workers: usize,
    /// Why the pool runs fewer workers than asked, if it does (backend capacity, free memory).
    #[serde(default)]
    #[schema(required = true)]
    pub warnings: Vec<String>,
    pub workers: Vec<WorkerView>,
}

/// One backend's health, and the task types it serves.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BackendView {
    pub name: String,
    pub kind: String,
    /// Prompts sent there leave this machine.
    #[serde(default)]
    #[schema(required = true)]
    pub remote: bool,
    /// Its prices per million tokens (unset ones are free).
    #[serde(default)]
    #[schema(required = true)]
    pub prices: Prices,
    /// What it served since start: answers, tokens and their cost.
    #[serde(default)]
    #[schema(required = true)]
    pub served: MeterReading,
    pub up: bool,
    pub detail: String,
    pub default_model: String,
    pub capacity: usize,
    pub models: Vec<String>,
    /// Task types routed here first.
    pub serves: Vec<String>,
    /// Set while the backend is cooling down after a rate limit: no task is sent to it until then.
    #[serde(default)]
    #[schema(required = true)]
    pub cooldown: Option<CooldownView>,
}

/// A backend's cool-down after it answered "slow down".
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CooldownView {
    /// When it ends (RFC 3339).
    pub until: String,
    /// The refusal that started it.
    pub reason: String,
}

/// `GET /health`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct HealthView {
    /// [`HEALTHY`], or [`DEGRADED`] when a backend that some task type uses first is down.
    pub status: String,
    /// `koubou`.
    #[serde(default)]
    #[schema(required = true)]
    pub server: String,
    /// When this answer was made (RFC 3339).
    #[serde(default)]
    #[schema(required = true)]
    pub timestamp: String,
    pub version: String,
    pub queue: QueueView,
    pub workers: usize,
    pub backends: Vec<BackendView>,
    /// Task type → `backend/model` that serves it (with `[remote]`, its fallbacks, and
    /// `[confidential]` when the type is).
    pub routes: std::collections::BTreeMap<String, String>,
    /// What the local backends spared a paid API since start, when `[pricing]` is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spared: Option<Spared>,
}

/// `GET /health`'s `status` when every backend a task type uses first is up.
pub const HEALTHY: &str = "healthy";
/// `GET /health`'s `status` when one is down.
pub const DEGRADED: &str = "degraded";

/// Counts by status.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct QueueView {
    pub pending: u64,
    pub running: u64,
    pub retrying: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// The seed's `systemStatus`, plus a little more.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SystemStatus {
    pub active_workers: usize,
    pub busy_workers: usize,
    pub pending_tasks: u64,
    pub running_tasks: u64,
    pub completed_tasks: u64,
    pub failed_tasks: u64,
    pub cancelled_tasks: u64,
    /// Tasks finished per second over the last minute.
    pub throughput_per_sec: f64,
    /// Generated tokens per second over the last minute.
    pub tokens_per_sec: f64,
    pub uptime_secs: u64,
    pub rss_bytes: u64,
}

/// A stream of events.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, ApiError>> + Send>>;

/// The operations every face offers.
#[async_trait]
pub trait Api: Send + Sync {
    async fn submit(&self, req: SubmitRequest) -> Result<SubmitResponse, ApiError>;
    async fn task(&self, id: TaskId) -> Result<TaskView, ApiError>;
    async fn tasks(&self, query: ListQuery) -> Result<TaskList, ApiError>;
    async fn cancel(&self, id: TaskId) -> Result<TaskView, ApiError>;
    async fn workers(&self) -> Result<WorkersView, ApiError>;
    async fn health(&self) -> Result<HealthView, ApiError>;
    async fn status(&self) -> Result<SystemStatus, ApiError>;
    /// Events about one task (tokens, state changes) from now until it ends. Ends at once
    /// (after one synthetic event carrying its state) if the task is already finished.
    async fn watch(&self, id: TaskId) -> Result<EventStream, ApiError>;

    /// Waits up to `timeout` for the task to finish, calling `on_token` with each piece of the
    /// answer as it streams; returns the task as it stands then (finished or not).
    async fn wait(
        &self,
        id: TaskId,
        timeout: Duration,
        on_token: &(dyn for<'s> Fn(&'s str) + Send + Sync),
    ) -> Result<TaskView, ApiError> {
        use futures::StreamExt;
        let mut events = self.watch(id).await?;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                e = events.next() => match e {
                    Some(Ok(e)) => {
                        if let koubou_task::EventKind::TaskToken { text, .. } = &e.kind {
                            on_token(text);
                        }
                        if e.kind.is_terminal() {
                            break;
                        }
                    }
                    Some(Err(err)) => return Err(err),
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        self.task(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SubmitRequest, FieldError> {
        SubmitRequest::from_json(&serde_json::from_str(s).unwrap())
    }

    #[test]
    fn seed_bodies_parse() {
        let r =
            parse(r#"{"type": "code", "prompt": "Create a Python function for fibonacci", "priority": 8}"#).unwrap();
        assert_eq!((r.task.kind.as_str(), r.task.priority.get()), ("code", 8));
        let r = parse(r#"{"type": "general", "content": "Explain Python decorators"}"#).unwrap();
        assert_eq!(r.task.prompt, "Explain Python decorators");
        assert_eq!(r.task.priority.get(), 5);
    }

    #[test]
    fn errors_name_the_field() {
        let field = |s| parse(s).unwrap_err().field;
        assert_eq!(field(r#"{"type": "code"}"#), "prompt");
        assert_eq!(field(r#"{"prompt": 5}"#), "prompt");
        assert_eq!(field(r#"{"prompt": "x", "priority": 11}"#), "priority");
        assert_eq!(field(r#"{"prompt": "x", "priority": "high"}"#), "priority");
        assert_eq!(field(r#"{"prompt": "x", "priority": 2.5}"#), "priority");
        assert_eq!(field(r#"{"prompt": "x", "type": "Bad Type"}"#), "type");
        assert_eq!(field(r#"{"prompt": "x", "priorty": 3}"#), "priorty");
        assert_eq!(field(r#"{"prompt": "x", "options": {"temp": 1}}"#), "options");
        assert_eq!(field(r#"{"prompt": "x", "sync": "yes"}"#), "sync");
        assert_eq!(field(r#"{"prompt": "x", "content": 5}"#), "content");
        assert_eq!(field(r#"{"prompt": "x", "options": []}"#), "options");
        assert_eq!(field(r#"{"prompt": null, "content": "x"}"#), "prompt");
        assert_eq!(field(r#"[1]"#), "body");
        // Found by the task_json fuzz target: an empty key was named as the field "".
        assert_eq!(field(r#"{"": "x", "prompt": "x"}"#), "body");
        assert_eq!(field(r#"{"prompt": "x", "tags": [1]}"#), "tags");
        assert_eq!(field(r#"{"prompt": "x", "json": "yes"}"#), "json");
        assert_eq!(field(r#"{"prompt": "x", "schema": "object"}"#), "schema");
    }

    #[test]
    fn tags_json_and_schema_parse() {
        let r = parse(r#"{"prompt": "x", "tags": [" Confidential", "team:a", "confidential"], "json": true}"#).unwrap();
        assert_eq!(r.task.tags, ["confidential", "team:a"]);
        assert!(r.task.json);
        let r = parse(r#"{"prompt": "x", "tags": "gpu", "schema": {"type": "object"}}"#).unwrap();
        assert_eq!(r.task.tags, ["gpu"]);
        assert_eq!(r.task.schema.unwrap()["type"], "object");
    }

    /// The properties of a derived object schema.
    fn properties<T: utoipa::PartialSchema>() -> Vec<String> {
        match T::schema() {
            utoipa::openapi::RefOr::T(utoipa::openapi::Schema::Object(o)) => o.properties.keys().cloned().collect(),
            _ => panic!("not an object schema"),
        }
    }

    #[test]
    fn the_submit_schema_has_exactly_the_fields_read() {
        let schema = properties::<SubmitBody>();
        for f in SUBMIT_FIELDS {
            assert!(
                schema.contains(&f.to_string()),
                "SubmitRequest::from_json reads {f:?} but SubmitBody (its OpenAPI schema) has no such field: \
                 add `{f}` to SubmitBody with its type and a doc comment, then regenerate docs/openapi.json"
            );
        }
        for f in &schema {
            assert!(
                SUBMIT_FIELDS.contains(&f.as_str()),
                "SubmitBody (the OpenAPI schema of POST /task/delegate) has {f:?}, which \
                 SubmitRequest::from_json refuses: add it to SUBMIT_FIELDS and read it, or remove it"
            );
        }
        // Unknown fields are refused, so the schema says so.
        let utoipa::openapi::RefOr::T(utoipa::openapi::Schema::Object(o)) =
            <SubmitBody as utoipa::PartialSchema>::schema()
        else {
            unreachable!()
        };
        let extra = serde_json::to_value(&o.additional_properties).unwrap();
        assert_eq!(extra, serde_json::json!(false), "SubmitBody must say additionalProperties: false");
    }

    #[test]
    fn error_body_round_trips() {
        let e = ApiError::invalid("priority", "must be an integer from 1 to 10, got 11");
        let b = e.body();
        assert_eq!(b["error"]["field"], "priority");
        assert_eq!(ApiError::from_body(400, &b), e);
        for why in [Busy::QueueFull, Busy::DiskFull, Busy::Locked] {
            let e = ApiError::TryLater { why, message: "wait".into(), retry_after_secs: 7 };
            let b = e.body();
            assert_eq!(
                (b["error"]["code"].as_str(), b["error"]["retry_after_secs"].as_u64()),
                (Some(why.code()), Some(7))
            );
            assert_eq!(ApiError::from_body(e.http_status(), &b), e);
        }
        assert_eq!(
            ApiError::TryLater { why: Busy::QueueFull, message: String::new(), retry_after_secs: 1 }.http_status(),
            429
        );
    }
}
