//! What the service answers: tasks, pages, workers, health, status, as every face shows them.

use koubou_task::{
    Cursor, GenOptions, MeterReading, Millis, Prices, Priority, Spared, Task, TaskId, TaskKind, TaskStatus, Usage,
    rfc3339,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

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
    /// The previous page's `next_cursor`, as it came (an opaque cursor).
    #[param(value_type = Option<String>)]
    pub before: Option<Cursor>,
}

/// One page of `GET /tasks`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TaskList {
    pub tasks: Vec<TaskView>,
    pub total: u64,
    /// Pass as `before` for the next page; null on the last page. Opaque: a number from SQLite,
    /// which another store may make a string.
    #[schema(required = true)]
    pub next_cursor: Option<Cursor>,
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

/// One node registered with the queue (`GET /nodes`): a `koubou serve`, `koubou worker`,
/// `koubou run` or `koubou mcp --embedded` process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct NodeView {
    /// Its name; its workers are `<id>/<n>`.
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// The Koubou version it runs.
    pub version: String,
    /// The task kinds it claims; absent: any.
    pub kinds: Option<Vec<String>>,
    /// The tags it declares; absent: tasks with any tags.
    pub tags: Option<Vec<String>>,
    /// Its backends and the models its configuration names for them.
    #[serde(default)]
    #[schema(required = true)]
    pub backends: Vec<NodeBackendView>,
    /// Its workers running a task, at its last heartbeat.
    #[serde(default)]
    #[schema(required = true)]
    pub busy: u32,
    /// The most workers it runs (0: none, a controller started with `--workers 0`).
    #[serde(default)]
    #[schema(required = true)]
    pub max_workers: u32,
    /// RFC 3339.
    pub started_at: String,
    /// Its last heartbeat (registration or renewal, on the queue's clock; RFC 3339).
    #[serde(default)]
    #[schema(required = true)]
    pub last_seen: String,
    /// When its registration runs out unless renewed (RFC 3339); it renews every third of its TTL.
    pub expires_at: String,
    /// `alive`, or `lost`: past `expires_at`, taken for dead until the next sweep removes it; its
    /// running tasks are requeued as their leases run out.
    #[serde(default)]
    #[schema(required = true)]
    pub state: String,
    /// `state` is `lost`.
    pub lost: bool,
}

impl NodeView {
    /// [`NodeView::state`] of a node that renews its registration.
    pub const ALIVE: &str = "alive";
    /// [`NodeView::state`] of a node whose registration ran out.
    pub const LOST: &str = "lost";
}

/// A backend of a node (`GET /nodes`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct NodeBackendView {
    pub name: String,
    /// Its provider (`ollama`, `openai`, `embedded`, …).
    pub kind: String,
    /// The models its node's configuration names for it: its default model, then its routes'.
    pub models: Vec<String>,
}

/// `GET /nodes`: every node registered with the queue, oldest first.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct NodesView {
    pub nodes: Vec<NodeView>,
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
    /// This node's workers (other nodes' are counted in `cluster`).
    pub workers: Vec<WorkerView>,
    /// Every node's workers, on a queue several nodes share.
    #[serde(default)]
    #[schema(required = true)]
    pub cluster: ClusterView,
}

/// The workers of every node registered with the queue: this node's as they are now, another
/// node's as of its last heartbeat (`GET /nodes` lists them one by one).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ClusterView {
    /// Nodes whose registration is live.
    pub nodes_alive: usize,
    /// Nodes that stopped renewing their registration and are not swept yet.
    pub nodes_lost: usize,
    /// Workers of the live nodes running a task.
    pub busy: u32,
    /// The most workers the live nodes run.
    pub max_workers: u32,
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
    /// This node's workers.
    pub workers: usize,
    /// Every node's workers, on a queue several nodes share.
    #[serde(default)]
    #[schema(required = true)]
    pub cluster: ClusterView,
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

/// `GET /system/info`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SystemInfo {
    /// `koubou`.
    pub server_type: String,
    pub version: String,
    /// The server's home directory.
    #[schema(value_type = String)]
    pub koubou_home: std::path::PathBuf,
    /// Where the tasks are kept: the task database's file, or the Redis URL (without its
    /// password).
    #[schema(value_type = String)]
    pub db_path: std::path::PathBuf,
    /// With RabbitMQ handing the tasks out: the broker's URL (without its password) and the
    /// queue on it; null otherwise.
    #[schema(required = true)]
    pub dispatcher: Option<String>,
    #[schema(value_type = String)]
    pub logs_dir: std::path::PathBuf,
    /// When this answer was made (RFC 3339).
    pub timestamp: String,
}

/// One second of history: what finished and what streamed in it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Second {
    /// The second's start, in milliseconds since the Unix epoch.
    pub at: Millis,
    /// Tasks that ended (completed, failed for good, cancelled).
    pub finished: u64,
    /// Tokens streamed.
    pub tokens: u64,
}

impl Second {
    /// Whether this second lies within the last `secs` seconds (the current one included).
    pub fn within_last(&self, secs: usize) -> bool {
        self.at > koubou_task::now_millis() / 1000 * 1000 - secs as Millis * 1000
    }
}
