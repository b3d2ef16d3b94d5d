//! GraphQL (`http://localhost:8767/graphql`): the seed's `systemStatus`, `task` and `submitTask`,
//! the prototype's queries (`tasks`, `workers`, `health`, `taskStatistics`, `pendingTasks`,
//! `submitTask(input:)`…, see `docs/compat.md`), plus `taskPage`, `pool`, `healthReport`, `nodes`,
//! `cancelTask` and subscriptions over graphql-ws.
//!
//! Everything resolves through the system's [`Api`]; subscriptions read its event feed.

use async_graphql::{
    Context, Enum, ErrorExtensions, ID, InputObject, Object, Schema, SimpleObject, Subscription, futures_util::Stream,
};
use futures::StreamExt;
use std::sync::Arc;

use koubou_api::{self as api, Api, ApiError, ListQuery, SubmitRequest};
use koubou_task::{Event, EventKind, Lagged, TaskId};
use serde_json::{Map, Value};

use crate::prototype;

/// The schema type.
pub type KoubouSchema = Schema<Query, Mutation, SubscriptionRoot>;

/// Builds the schema over a running system, with its `[limits]` on every document.
pub fn schema(k: Arc<dyn Api>) -> KoubouSchema {
    let limits = crate::gql_limits::DocumentLimits::from_limits(&k.limits());
    Schema::build(Query, Mutation, SubscriptionRoot).data(k).extension(limits).finish()
}

/// The SDL of the schema (what `docs/schema.graphql` holds).
pub fn sdl() -> String {
    Schema::build(Query, Mutation, SubscriptionRoot).finish().sdl()
}

fn k<'a>(ctx: &Context<'a>) -> &'a dyn Api {
    &**ctx.data_unchecked::<Arc<dyn Api>>()
}

/// An [`ApiError`] as a GraphQL error, with `extensions.code` (and `extensions.field`).
fn gql_err(e: ApiError) -> async_graphql::Error {
    let field = match &e {
        ApiError::Invalid(f) => Some(f.field.clone()),
        _ => None,
    };
    async_graphql::Error::new(e.to_string()).extend_with(|_, ext| {
        ext.set("code", e.code());
        if let Some(f) = &field {
            ext.set("field", f.as_str());
        }
        if let Some(s) = e.retry_after() {
            ext.set("retryAfterSecs", s);
        }
    })
}

fn parse_id(id: &str, field: &str) -> async_graphql::Result<TaskId> {
    id.parse::<TaskId>().map_err(|e| gql_err(ApiError::invalid(field, e.to_string())))
}

/// Where a task is in its life.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(remote = "koubou_task::TaskStatus")]
pub enum TaskStatus {
    Pending,
    Running,
    Retrying,
    Completed,
    Failed,
    Cancelled,
}

/// Task counts (the prototype's `TaskStatistics`).
#[derive(SimpleObject)]
pub struct TaskStatistics {
    /// Waiting to run: pending and retrying.
    pub pending: i64,
    /// Running (the prototype's name).
    pub in_progress: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub total: i64,
}

impl From<prototype::TaskStats> for TaskStatistics {
    fn from(t: prototype::TaskStats) -> Self {
        TaskStatistics {
            pending: t.pending as i64,
            in_progress: t.in_progress as i64,
            completed: t.completed as i64,
            failed: t.failed as i64,
            cancelled: t.cancelled as i64,
            total: t.total as i64,
        }
    }
}

/// Counts over the workers running now (the prototype's `WorkerStatistics`).
#[derive(SimpleObject)]
pub struct WorkerStatistics {
    pub total_workers: i64,
    pub busy_workers: i64,
    pub idle_workers: i64,
    /// Tasks the current workers completed.
    pub total_completed: i64,
    /// Tasks the current workers failed.
    pub total_failed: i64,
    /// `totalCompleted` in percent of all they finished (0 before any).
    pub success_rate: f64,
}

impl From<prototype::WorkerStats> for WorkerStatistics {
    fn from(w: prototype::WorkerStats) -> Self {
        WorkerStatistics {
            total_workers: w.total_workers as i64,
            busy_workers: w.busy_workers as i64,
            idle_workers: w.idle_workers as i64,
            total_completed: w.total_completed as i64,
            total_failed: w.total_failed as i64,
            success_rate: w.success_rate,
        }
    }
}

/// The seed's `systemStatus`, the prototype's fields, and a little more.
#[derive(SimpleObject)]
pub struct SystemStatus {
    /// `healthy`, or `degraded` when a backend that serves a type is down (as `health`).
    pub status: String,
    /// When this answer was made (RFC 3339).
    pub timestamp: String,
    pub version: String,
    pub task_stats: TaskStatistics,
    pub worker_stats: WorkerStatistics,
    pub active_workers: i64,
    pub busy_workers: i64,
    /// Pending and retrying tasks.
    pub pending_tasks: i64,
    pub running_tasks: i64,
    pub completed_tasks: i64,
    pub failed_tasks: i64,
    pub cancelled_tasks: i64,
    /// Tasks finished per second over the last minute.
    pub throughput_per_sec: f64,
    /// Tokens generated per second over the last minute.
    pub tokens_per_sec: f64,
    pub uptime_secs: i64,
    pub rss_bytes: i64,
}

/// Tokens a generation used.
#[derive(SimpleObject)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// A task.
pub struct Task(api::TaskView);

#[Object]
impl Task {
    async fn id(&self) -> ID {
        ID(self.0.task_id.to_string())
    }
    /// Same as `id` (the REST API's name for it).
    async fn task_id(&self) -> ID {
        ID(self.0.task_id.to_string())
    }
    #[graphql(name = "type")]
    async fn kind(&self) -> &str {
        self.0.kind.as_str()
    }
    async fn status(&self) -> TaskStatus {
        self.0.status.into()
    }
    async fn priority(&self) -> i32 {
        self.0.priority.get() as i32
    }
    async fn prompt(&self) -> &str {
        &self.0.prompt
    }
    /// Same as `prompt` (the prototype's name for it).
    async fn content(&self) -> &str {
        &self.0.prompt
    }
    async fn system(&self) -> Option<&str> {
        self.0.system.as_deref()
    }
    /// The answer, once completed.
    async fn result(&self) -> Option<&str> {
        self.0.answer()
    }
    async fn error(&self) -> Option<&str> {
        self.0.error.as_deref()
    }
    /// While running: the answer so far.
    async fn partial(&self) -> Option<&str> {
        self.0.partial.as_deref()
    }
    async fn backend(&self) -> Option<&str> {
        self.0.backend.as_deref()
    }
    async fn model(&self) -> Option<&str> {
        self.0.model.as_deref()
    }
    /// Whether the backend that served it is remote (the prompt left the machine).
    async fn remote(&self) -> Option<bool> {
        self.0.remote
    }
    /// What the answer cost at the serving backend's prices (null when it has none).
    async fn cost(&self) -> Option<f64> {
        self.0.cost
    }
    /// Labels; `confidential` keeps the task on local backends.
    async fn tags(&self) -> &[String] {
        &self.0.tags
    }
    /// The answer must be JSON.
    async fn json(&self) -> bool {
        self.0.json
    }
    /// The JSON Schema the answer must match, as JSON text.
    async fn schema_json(&self) -> Option<String> {
        self.0.schema.as_ref().map(Value::to_string)
    }
    async fn usage(&self) -> Option<Usage> {
        self.0
            .usage
            .map(|u| Usage { prompt_tokens: u.prompt_tokens as i64, completion_tokens: u.completion_tokens as i64 })
    }
    async fn worker_id(&self) -> Option<&str> {
        self.0.worker_id.as_deref()
    }
    /// Same as `workerId` (the prototype's name for it).
    async fn assigned_to(&self) -> Option<&str> {
        self.0.worker_id.as_deref()
    }
    /// The task's `metadata.source` when it is a string (`graphql` for tasks submitted here,
    /// `mcp` for MCP's); Koubou records no other submitter.
    async fn created_by(&self) -> Option<&str> {
        self.0.metadata.get("source").and_then(Value::as_str)
    }
    async fn attempts(&self) -> i32 {
        self.0.attempts as i32
    }
    async fn max_attempts(&self) -> i32 {
        self.0.max_attempts as i32
    }
    /// RFC 3339.
    async fn created_at(&self) -> &str {
        &self.0.created_at
    }
    async fn started_at(&self) -> Option<&str> {
        self.0.started_at.as_deref()
    }
    async fn finished_at(&self) -> Option<&str> {
        self.0.finished_at.as_deref()
    }
    /// The latest of `createdAt`, `startedAt` and `finishedAt`.
    async fn updated_at(&self) -> &str {
        self.0.finished_at.as_deref().or(self.0.started_at.as_deref()).unwrap_or(&self.0.created_at)
    }
    /// While queued: tasks that will start before this one.
    async fn queue_position(&self) -> Option<i64> {
        self.0.queue_position.map(|p| p as i64)
    }
    /// While queued: rough seconds until it starts.
    async fn estimated_start_secs(&self) -> Option<f64> {
        self.0.estimated_start_secs
    }
    /// From start to finish, in milliseconds.
    async fn duration_ms(&self) -> Option<i64> {
        self.0.duration_ms
    }
    /// The task's metadata object, as JSON text.
    async fn metadata_json(&self) -> String {
        Value::Object(self.0.metadata.clone()).to_string()
    }
}

/// One page of tasks, newest first.
#[derive(SimpleObject)]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    /// Tasks matching the filters, over all pages.
    pub total: i64,
    /// Pass as `before` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The answer to `submitTask`.
#[derive(SimpleObject)]
pub struct SubmitResult {
    pub task_id: ID,
    pub status: TaskStatus,
    /// False when an earlier task with the same idempotency key was returned.
    pub created: bool,
    /// Always true: a submission that fails is a GraphQL error naming the field.
    pub success: bool,
    /// What happened, in words.
    pub message: String,
    /// The task as queued.
    pub task: Task,
}

/// The prototype's `submitTask(input:)` argument.
#[derive(InputObject)]
pub struct TaskInput {
    /// Task type: general, code, or a configured one; the prototype's `GENERAL` and `CODE` are
    /// read in lowercase.
    #[graphql(name = "type")]
    pub kind: Option<String>,
    pub prompt: String,
    /// 1 (lowest) to 10 (highest); default 5.
    pub priority: Option<i32>,
    pub system: Option<String>,
    pub model: Option<String>,
    pub backend: Option<String>,
    pub idempotency_key: Option<String>,
    /// Labels; `confidential` keeps the task on local backends.
    pub tags: Option<Vec<String>>,
    /// The answer must be JSON.
    pub json: Option<bool>,
    /// A JSON Schema (as JSON text) the answer must match.
    pub schema_json: Option<String>,
}

/// What a worker is doing.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum WorkerStatus {
    Idle,
    Busy,
    Stopping,
    Stopped,
}

impl WorkerStatus {
    fn of(state: &str) -> WorkerStatus {
        match state {
            "busy" => WorkerStatus::Busy,
            "stopping" => WorkerStatus::Stopping,
            "stopped" => WorkerStatus::Stopped,
            _ => WorkerStatus::Idle,
        }
    }
}

/// A worker of the pool.
#[derive(SimpleObject)]
pub struct Worker {
    pub worker_id: String,
    /// Same as `workerId` (the prototype's name for it).
    pub id: String,
    /// `idle`, `busy` or `stopping`.
    pub state: String,
    /// `state` as an enum (the prototype's field).
    pub status: WorkerStatus,
    pub current_task: Option<ID>,
    pub tasks_done: i64,
    /// Same as `tasksDone` (the prototype's name for it).
    pub tasks_completed: i64,
    pub tasks_failed: i64,
    pub started_at: String,
    /// Same as `startedAt` (the prototype's name for it).
    pub created_at: String,
    /// When the worker last reported: its last change of state.
    pub last_heartbeat: String,
}

impl Worker {
    fn of(w: api::WorkerView) -> Worker {
        Worker {
            id: w.worker_id.clone(),
            worker_id: w.worker_id,
            status: WorkerStatus::of(&w.state),
            state: w.state,
            current_task: w.current_task.map(|t| ID(t.to_string())),
            tasks_done: w.tasks_done as i64,
            tasks_completed: w.tasks_done as i64,
            tasks_failed: w.tasks_failed as i64,
            created_at: w.started_at.clone(),
            started_at: w.started_at,
            last_heartbeat: w.last_heartbeat,
        }
    }
}

/// Filters of `tasks` (the prototype's `TaskFilter`).
#[derive(InputObject, Default)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    /// Only this task type.
    #[graphql(name = "type")]
    pub kind: Option<String>,
    /// Substring of the prompt.
    pub search: Option<String>,
}

/// The worker pool.
#[derive(SimpleObject)]
pub struct Workers {
    pub active: i64,
    pub busy: i64,
    pub min_workers: i64,
    pub max_workers: i64,
    pub backend_capacity: i64,
    pub workers: Vec<Worker>,
}

/// One backend and its health.
#[derive(SimpleObject)]
pub struct Backend {
    pub name: String,
    pub kind: String,
    /// Prompts sent there leave this machine.
    pub remote: bool,
    /// Tokens it processed since start (prompt and completion).
    pub tokens: i64,
    /// What its tokens cost since start, at its prices.
    pub cost: f64,
    pub up: bool,
    pub detail: String,
    pub default_model: String,
    pub capacity: i64,
    pub models: Vec<String>,
    /// Task types routed here first.
    pub serves: Vec<String>,
}

/// Health of the system and its backends.
#[derive(SimpleObject)]
pub struct Health {
    /// `healthy`, or `degraded` when a backend that serves a type is down.
    pub status: String,
    pub version: String,
    pub workers: i64,
    pub backends: Vec<Backend>,
}

/// Whether a node renews its registration.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum NodeState {
    Alive,
    /// Its registration ran out: taken for dead, its running tasks requeued by the next sweep
    /// (which removes it).
    Lost,
}

/// A backend of a node.
#[derive(SimpleObject)]
pub struct NodeBackend {
    pub name: String,
    /// Its provider (`ollama`, `openai`, `embedded`, ...).
    pub kind: String,
    /// The models its node's configuration names for it.
    pub models: Vec<String>,
}

/// A node registered with the queue: a `koubou serve`, `koubou worker`, `koubou run` or
/// `koubou mcp --embedded` process (`GET /nodes`).
#[derive(SimpleObject)]
pub struct Node {
    /// Its name; its workers are `<id>/<n>`.
    pub id: String,
    pub host: String,
    pub pid: i64,
    pub version: String,
    /// The task types it claims; null: any.
    pub kinds: Option<Vec<String>>,
    /// The tags it declares; null: tasks with any tags.
    pub tags: Option<Vec<String>>,
    pub backends: Vec<NodeBackend>,
    /// Its workers running a task, at its last heartbeat.
    pub busy: i64,
    /// The most workers it runs.
    pub max_workers: i64,
    pub started_at: String,
    /// Its last heartbeat (RFC 3339).
    pub last_seen: String,
    /// When its registration runs out unless renewed (RFC 3339).
    pub expires_at: String,
    pub state: NodeState,
}

impl Node {
    fn of(n: api::NodeView) -> Node {
        Node {
            state: if n.lost { NodeState::Lost } else { NodeState::Alive },
            id: n.id,
            host: n.host,
            pid: n.pid.into(),
            version: n.version,
            kinds: n.kinds,
            tags: n.tags,
            backends: n
                .backends
                .into_iter()
                .map(|b| NodeBackend { name: b.name, kind: b.kind, models: b.models })
                .collect(),
            busy: n.busy.into(),
            max_workers: n.max_workers.into(),
            started_at: n.started_at,
            last_seen: n.last_seen,
            expires_at: n.expires_at,
        }
    }
}

/// Something that happened, from the event bus. Fields not part of an event kind are null.
#[derive(SimpleObject)]
pub struct TaskEvent {
    /// `task_created`, `task_claimed`, `task_started`, `task_token`, `task_completed`,
    /// `task_failed`, `task_cancelled`, `task_requeued`, `worker_scaled`, `worker_state` or
    /// `backend_health`.
    pub event: String,
    /// Milliseconds since the Unix epoch.
    pub at: f64,
    /// The node that produced it (a worker node's tokens name that node on every controller).
    pub origin: String,
    pub task_id: Option<ID>,
    /// `task_token`: the piece of the answer.
    pub text: Option<String>,
    /// `task_failed`: the task's status after the failure (`retrying` or `failed`).
    pub status: Option<TaskStatus>,
    pub error: Option<String>,
    pub worker_id: Option<String>,
    pub backend: Option<String>,
    pub model: Option<String>,
    pub latency_ms: Option<f64>,
    /// `task_completed`: the whole answer (for a subscriber that joined after the tokens).
    pub result: Option<String>,
    /// `backend_health`.
    pub up: Option<bool>,
    /// `worker_scaled`: workers now.
    pub workers: Option<i64>,
    /// `task_requeued`, `worker_scaled`: why; `worker_state`: the new state; `backend_health`: detail.
    pub reason: Option<String>,
    /// The whole event as the WebSocket sends it, as JSON text.
    pub json: String,
}

impl TaskEvent {
    fn from_event(e: &Event) -> TaskEvent {
        let mut t = TaskEvent {
            event: e.kind.name().to_owned(),
            at: e.at as f64,
            origin: e.origin.to_string(),
            task_id: e.kind.task_id().map(|id| ID(id.to_string())),
            text: None,
            status: None,
            error: None,
            worker_id: None,
            backend: None,
            model: None,
            latency_ms: None,
            result: None,
            up: None,
            workers: None,
            reason: None,
            json: serde_json::to_string(e).unwrap_or_default(),
        };
        match &e.kind {
            EventKind::TaskToken { text, .. } => t.text = Some(text.clone()),
            EventKind::TaskClaimed { worker_id, .. } => t.worker_id = Some(worker_id.0.clone()),
            EventKind::TaskStarted { worker_id, backend, model, .. } => {
                t.worker_id = Some(worker_id.0.clone());
                t.backend = Some(backend.clone());
                t.model = Some(model.clone());
            }
            EventKind::TaskCompleted { latency_ms, result, .. } => {
                t.status = Some(TaskStatus::Completed);
                t.latency_ms = Some(*latency_ms as f64);
                t.result = Some(result.clone());
            }
            EventKind::TaskFailed { error, status, .. } => {
                t.error = Some(error.clone());
                t.status = Some((*status).into());
            }
            EventKind::TaskCancelled { .. } => t.status = Some(TaskStatus::Cancelled),
            EventKind::TaskRequeued { reason, .. } => t.reason = Some(reason.clone()),
            EventKind::WorkerScaled { workers, reason, .. } => {
                t.workers = Some(*workers as i64);
                t.reason = Some(reason.clone());
            }
            EventKind::WorkerState { worker_id, state, .. } => {
                t.worker_id = Some(worker_id.0.clone());
                t.reason = Some(state.clone());
            }
            EventKind::BackendHealth { backend, up, detail } => {
                t.backend = Some(backend.clone());
                t.up = Some(*up);
                t.reason = Some(detail.clone());
            }
            EventKind::TaskCreated { .. } => {}
        }
        t
    }
}

pub struct Query;

/// One page of tasks, the one query behind `tasks`, `taskPage` and `pendingTasks`.
async fn page(
    ctx: &Context<'_>,
    statuses: Vec<TaskStatus>,
    kind: Option<String>,
    tag: Option<String>,
    search: Option<String>,
    limit: i32,
    before: Option<String>,
) -> async_graphql::Result<api::TaskList> {
    let before = before.map(koubou_task::Cursor::from);
    let status = (!statuses.is_empty())
        .then(|| statuses.into_iter().map(|s| koubou_task::TaskStatus::from(s).as_str()).collect::<Vec<_>>().join(","));
    let q = ListQuery { status, kind, tag, q: search, limit: Some(usize::try_from(limit).unwrap_or(0)), before };
    k(ctx).tasks(q).await.map_err(gql_err)
}

async fn worker_list(ctx: &Context<'_>) -> async_graphql::Result<Vec<Worker>> {
    Ok(k(ctx).workers().await.map_err(gql_err)?.workers.into_iter().map(Worker::of).collect())
}

#[Object]
impl Query {
    /// Workers and task counts (the seed's query, with the prototype's fields).
    async fn system_status(&self, ctx: &Context<'_>) -> async_graphql::Result<SystemStatus> {
        let k = k(ctx);
        let (s, w, h) = tokio::try_join!(k.status(), k.workers(), k.health()).map_err(gql_err)?;
        Ok(SystemStatus {
            status: h.status,
            timestamp: prototype::timestamp(),
            version: h.version,
            task_stats: prototype::TaskStats::of_status(&s).into(),
            worker_stats: prototype::WorkerStats::of(&w).into(),
            active_workers: s.active_workers as i64,
            busy_workers: s.busy_workers as i64,
            pending_tasks: s.pending_tasks as i64,
            running_tasks: s.running_tasks as i64,
            completed_tasks: s.completed_tasks as i64,
            failed_tasks: s.failed_tasks as i64,
            cancelled_tasks: s.cancelled_tasks as i64,
            throughput_per_sec: s.throughput_per_sec,
            tokens_per_sec: s.tokens_per_sec,
            uptime_secs: s.uptime_secs as i64,
            rss_bytes: s.rss_bytes as i64,
        })
    }

    /// One task; null when there is no task with that id.
    async fn task(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Task>> {
        match k(ctx).task(parse_id(&id, "id")?).await {
            Ok(t) => Ok(Some(Task(t))),
            Err(ApiError::NotFound(_)) => Ok(None),
            Err(e) => Err(gql_err(e)),
        }
    }

    /// Tasks, newest first (the prototype's list; `taskPage` pages through them with a cursor).
    #[allow(clippy::too_many_arguments)]
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The prototype's filter; its `status` adds to `status`.")] filter: Option<TaskFilter>,
        #[graphql(desc = "Only these statuses (default: all).")] status: Option<Vec<TaskStatus>>,
        #[graphql(name = "type", desc = "Only this task type.")] kind: Option<String>,
        #[graphql(desc = "Only tasks with this tag.")] tag: Option<String>,
        #[graphql(desc = "Substring of the prompt.")] search: Option<String>,
        #[graphql(default = 50, desc = "How many, 1-1000.")] limit: Option<i32>,
        #[graphql(default = 0, desc = "Skip this many first; `offset + limit` at most 1000.")] offset: Option<i32>,
    ) -> async_graphql::Result<Vec<Task>> {
        let f = filter.unwrap_or_default();
        let mut statuses = status.unwrap_or_default();
        statuses.extend(f.status);
        let (limit, offset) = (limit.unwrap_or(50), offset.unwrap_or(0).max(0));
        if !(1..=1000).contains(&limit) {
            return Err(gql_err(ApiError::invalid("limit", format!("must be from 1 to 1000, got {limit}"))));
        }
        if offset + limit > 1000 {
            return Err(gql_err(ApiError::invalid("offset", "offset + limit must be at most 1000; use taskPage")));
        }
        let l = page(ctx, statuses, kind.or(f.kind), tag, search.or(f.search), offset + limit, None).await?;
        Ok(l.tasks.into_iter().skip(offset as usize).map(Task).collect())
    }

    /// A page of tasks, newest first, with the total and a cursor to the next page.
    #[allow(clippy::too_many_arguments)]
    async fn task_page(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Only these statuses (default: all).")] status: Option<Vec<TaskStatus>>,
        #[graphql(name = "type", desc = "Only this task type.")] kind: Option<String>,
        #[graphql(desc = "Only tasks with this tag.")] tag: Option<String>,
        #[graphql(desc = "Substring of the prompt.")] search: Option<String>,
        #[graphql(default = 50, desc = "Page size, 1-1000.")] limit: i32,
        #[graphql(desc = "`nextCursor` of the previous page.")] before: Option<String>,
    ) -> async_graphql::Result<TaskPage> {
        let l = page(ctx, status.unwrap_or_default(), kind, tag, search, limit, before).await?;
        Ok(TaskPage {
            tasks: l.tasks.into_iter().map(Task).collect(),
            total: l.total as i64,
            next_cursor: l.next_cursor.map(|c| c.to_string()),
        })
    }

    /// Tasks waiting to run (pending and retrying), newest first.
    async fn pending_tasks(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 10, desc = "How many, 1-1000.")] limit: Option<i32>,
    ) -> async_graphql::Result<Vec<Task>> {
        let statuses = vec![TaskStatus::Pending, TaskStatus::Retrying];
        let l = page(ctx, statuses, None, None, None, limit.unwrap_or(10), None).await?;
        Ok(l.tasks.into_iter().map(Task).collect())
    }

    /// Task counts.
    async fn task_statistics(&self, ctx: &Context<'_>) -> async_graphql::Result<TaskStatistics> {
        let s = k(ctx).status().await.map_err(gql_err)?;
        Ok(prototype::TaskStats::of_status(&s).into())
    }

    /// The workers running now (`activeOnly` is the prototype's argument: every worker listed is
    /// running, so it changes nothing).
    async fn workers(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "Some(true)")] active_only: Option<bool>,
    ) -> async_graphql::Result<Vec<Worker>> {
        let _ = active_only;
        worker_list(ctx).await
    }

    /// Same as `workers`.
    async fn active_workers(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Worker>> {
        worker_list(ctx).await
    }

    /// Counts over the workers running now.
    async fn worker_statistics(&self, ctx: &Context<'_>) -> async_graphql::Result<WorkerStatistics> {
        let w = k(ctx).workers().await.map_err(gql_err)?;
        Ok(prototype::WorkerStats::of(&w).into())
    }

    /// The worker pool: its bounds, capacity and workers.
    async fn pool(&self, ctx: &Context<'_>) -> async_graphql::Result<Workers> {
        let w = k(ctx).workers().await.map_err(gql_err)?;
        Ok(Workers {
            active: w.active as i64,
            busy: w.busy as i64,
            min_workers: w.min_workers as i64,
            max_workers: w.max_workers as i64,
            backend_capacity: w.backend_capacity as i64,
            workers: w.workers.into_iter().map(Worker::of).collect(),
        })
    }

    /// Every node registered with the queue, oldest first: the controllers and worker nodes
    /// sharing it, each with its backends, load and last heartbeat.
    async fn nodes(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Node>> {
        Ok(k(ctx).nodes().await.map_err(gql_err)?.nodes.into_iter().map(Node::of).collect())
    }

    /// `healthy`, or `degraded` when a backend that serves a type is down (`healthReport` says
    /// which).
    async fn health(&self, ctx: &Context<'_>) -> async_graphql::Result<String> {
        Ok(k(ctx).health().await.map_err(gql_err)?.status)
    }

    /// Health of the system and its backends.
    async fn health_report(&self, ctx: &Context<'_>) -> async_graphql::Result<Health> {
        let h = k(ctx).health().await.map_err(gql_err)?;
        Ok(Health {
            status: h.status,
            version: h.version,
            workers: h.workers as i64,
            backends: h
                .backends
                .into_iter()
                .map(|b| Backend {
                    name: b.name,
                    kind: b.kind,
                    remote: b.remote,
                    tokens: (b.served.prompt_tokens + b.served.completion_tokens) as i64,
                    cost: b.served.cost,
                    up: b.up,
                    detail: b.detail,
                    default_model: b.default_model,
                    capacity: b.capacity as i64,
                    models: b.models,
                    serves: b.serves,
                })
                .collect(),
        })
    }
}

pub struct Mutation;

#[Object]
impl Mutation {
    /// Queues a task: the seed's arguments, or the prototype's `input` (not both). Errors carry
    /// `extensions.code` and `extensions.field`.
    #[allow(clippy::too_many_arguments)]
    async fn submit_task(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The prototype's form of all the other arguments.")] input: Option<TaskInput>,
        #[graphql(name = "type", desc = "Task type: general, code, or a configured one.")] kind: Option<String>,
        #[graphql(desc = "Required unless `input` is given.")] prompt: Option<String>,
        #[graphql(desc = "1 (lowest) to 10 (highest); default 5.")] priority: Option<i32>,
        system: Option<String>,
        model: Option<String>,
        backend: Option<String>,
        #[graphql(name = "idempotencyKey")] idempotency_key: Option<String>,
        #[graphql(desc = "Labels; `confidential` keeps the task on local backends.")] tags: Option<Vec<String>>,
        #[graphql(desc = "The answer must be JSON.")] json: Option<bool>,
        #[graphql(name = "schemaJson", desc = "A JSON Schema (as JSON text) the answer must match.")]
        schema_json: Option<String>,
    ) -> async_graphql::Result<SubmitResult> {
        let args = [&kind, &prompt, &system, &model, &backend, &idempotency_key, &schema_json];
        let (t, prefix) = match input {
            None if prompt.is_none() => {
                return Err(gql_err(ApiError::invalid("prompt", "is required (or give `input`)")));
            }
            None => (
                TaskInput {
                    kind,
                    prompt: prompt.unwrap_or_default(),
                    priority,
                    system,
                    model,
                    backend,
                    idempotency_key,
                    tags,
                    json,
                    schema_json,
                },
                "",
            ),
            Some(_) if priority.is_some() || tags.is_some() || json.is_some() || args.iter().any(|v| v.is_some()) => {
                return Err(gql_err(ApiError::invalid(
                    "input",
                    "give either `input` or the other arguments, not both",
                )));
            }
            Some(i) => (TaskInput { kind: i.kind.map(|k| k.to_ascii_lowercase()), ..i }, "input."),
        };
        let mut body = Map::new();
        body.insert("prompt".into(), t.prompt.into());
        let opt = [
            ("type", t.kind),
            ("system", t.system),
            ("model", t.model),
            ("backend", t.backend),
            ("idempotency_key", t.idempotency_key),
        ];
        for (key, v) in opt {
            if let Some(v) = v {
                body.insert(key.into(), v.into());
            }
        }
        if let Some(p) = t.priority {
            body.insert("priority".into(), p.into());
        }
        if let Some(tags) = t.tags {
            body.insert("tags".into(), tags.into());
        }
        if let Some(j) = t.json {
            body.insert("json".into(), j.into());
        }
        if let Some(text) = t.schema_json {
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| gql_err(ApiError::invalid(&format!("{prefix}schemaJson"), format!("is not JSON: {e}"))))?;
            body.insert("schema".into(), v);
        }
        body.insert("metadata".into(), serde_json::json!({"source": "graphql"}));
        let field_name = |f: &str| match f {
            "idempotency_key" => format!("{prefix}idempotencyKey"),
            "schema" => format!("{prefix}schemaJson"),
            f => format!("{prefix}{f}"),
        };
        let req = SubmitRequest::from_json(&Value::Object(body)).map_err(|mut e| {
            e.field = field_name(&e.field);
            gql_err(ApiError::Invalid(e))
        })?;
        let k = k(ctx);
        // The router names submission fields too (`schema`, `tags`, `backend`).
        let r = k.submit(req).await.map_err(|e| match e {
            ApiError::Invalid(mut f) => {
                f.field = field_name(&f.field);
                gql_err(ApiError::Invalid(f))
            }
            e => gql_err(e),
        })?;
        let task = k.task(r.task_id).await.map_err(gql_err)?;
        let message = if r.created { "task queued" } else { "an earlier task with this idempotency key" };
        Ok(SubmitResult {
            task_id: ID(r.task_id.to_string()),
            status: r.task_status.into(),
            created: r.created,
            success: true,
            message: message.into(),
            task: Task(task),
        })
    }

    /// Cancels a queued or running task and returns it.
    async fn cancel_task(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Task> {
        let t = k(ctx).cancel(parse_id(&id, "id")?).await.map_err(gql_err)?;
        Ok(Task(t))
    }
}

pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// Events of one task (tokens and state changes) until it ends. A finished task yields one
    /// event with its ending and completes. A subscription made after the task began first
    /// replays the task's events the server still keeps (its last 4,096 of all tasks), then goes
    /// on live, each event once.
    async fn task_updates(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<TaskEvent>> + use<>> {
        let id = parse_id(&id, "id")?;
        let s = k(ctx).watch(id).await.map_err(gql_err)?;
        Ok(s.map(|e| e.map(|e| TaskEvent::from_event(&e)).map_err(gql_err)))
    }

    /// Everything on the event bus except tokens (ask with `tokens: true` for those too).
    /// A subscriber that falls behind gets an error and the subscription ends.
    async fn system_events(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = false)] tokens: bool,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<TaskEvent>> + use<>> {
        let feed = k(ctx).events(None).await.map_err(gql_err)?;
        Ok(futures::stream::unfold(Some(feed), move |feed| async move {
            let mut feed = feed?;
            loop {
                match feed.next().await? {
                    Ok(e) if !tokens && matches!(e.kind, EventKind::TaskToken { .. }) => continue,
                    Ok(e) => return Some((Ok(TaskEvent::from_event(&e)), Some(feed))),
                    Err(Lagged(n)) => {
                        let err = gql_err(ApiError::Unavailable(format!(
                            "too slow: fell {n} events behind the event bus; subscribe again"
                        )));
                        return Some((Err(err), None));
                    }
                }
            }
        }))
    }
}
