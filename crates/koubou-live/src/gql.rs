//! GraphQL (`http://localhost:8767/graphql`): the seed's `systemStatus`, `task` and `submitTask`,
//! plus `tasks`, `workers`, `health`, `cancelTask` and subscriptions over graphql-ws.
//!
//! Everything resolves through [`Koubou`]'s [`Api`]; subscriptions read the event bus.

use async_graphql::{
    Context, Enum, ErrorExtensions, ID, Object, Schema, SimpleObject, Subscription, futures_util::Stream,
};
use futures::StreamExt;
use koubou_system::{
    Api, ApiError, Koubou,
    api::{self, ListQuery, SubmitRequest},
};
use koubou_task::{Event, EventKind, TaskId};
use serde_json::{Map, Value};
use tokio::sync::broadcast::error::RecvError;

/// The schema type.
pub type KoubouSchema = Schema<Query, Mutation, SubscriptionRoot>;

/// Builds the schema over a running system, with its `[limits]` on every document.
pub fn schema(k: Koubou) -> KoubouSchema {
    let limits = crate::gql_limits::DocumentLimits::from_limits(&k.config().limits);
    Schema::build(Query, Mutation, SubscriptionRoot).data(k).extension(limits).finish()
}

/// The SDL of the schema (what `docs/schema.graphql` holds).
pub fn sdl() -> String {
    Schema::build(Query, Mutation, SubscriptionRoot).finish().sdl()
}

fn k<'a>(ctx: &Context<'a>) -> &'a Koubou {
    ctx.data_unchecked::<Koubou>()
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

/// The seed's `systemStatus`, plus a little more.
#[derive(SimpleObject)]
pub struct SystemStatus {
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
    async fn system(&self) -> Option<&str> {
        self.0.system.as_deref()
    }
    /// The answer, once completed.
    async fn result(&self) -> Option<&str> {
        self.0.result.as_deref()
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
    async fn usage(&self) -> Option<Usage> {
        self.0
            .usage
            .map(|u| Usage { prompt_tokens: u.prompt_tokens as i64, completion_tokens: u.completion_tokens as i64 })
    }
    async fn worker_id(&self) -> Option<&str> {
        self.0.worker_id.as_deref()
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
}

/// A worker of the pool.
#[derive(SimpleObject)]
pub struct Worker {
    pub worker_id: String,
    /// `idle`, `busy` or `stopping`.
    pub state: String,
    pub current_task: Option<ID>,
    pub tasks_done: i64,
    pub tasks_failed: i64,
    pub started_at: String,
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
    /// `ok`, or `degraded` when a backend that serves a type is down.
    pub status: String,
    pub version: String,
    pub workers: i64,
    pub backends: Vec<Backend>,
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
            task_id: e.kind.task_id().map(|id| ID(id.to_string())),
            text: None,
            status: None,
            error: None,
            worker_id: None,
            backend: None,
            model: None,
            latency_ms: None,
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
            EventKind::TaskCompleted { latency_ms, .. } => {
                t.status = Some(TaskStatus::Completed);
                t.latency_ms = Some(*latency_ms as f64);
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

#[Object]
impl Query {
    /// Workers and task counts (the seed's query).
    async fn system_status(&self, ctx: &Context<'_>) -> async_graphql::Result<SystemStatus> {
        let s = k(ctx).status().await.map_err(gql_err)?;
        Ok(SystemStatus {
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

    /// A page of tasks, newest first.
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Only these statuses (default: all).")] status: Option<Vec<TaskStatus>>,
        #[graphql(name = "type", desc = "Only this task type.")] kind: Option<String>,
        #[graphql(desc = "Substring of the prompt.")] search: Option<String>,
        #[graphql(default = 50, desc = "Page size, 1-1000.")] limit: i32,
        #[graphql(desc = "`nextCursor` of the previous page.")] before: Option<String>,
    ) -> async_graphql::Result<TaskPage> {
        let before = before
            .map(|b| b.parse::<i64>().map_err(|_| gql_err(ApiError::invalid("before", "must be a nextCursor value"))))
            .transpose()?;
        let status = status
            .map(|v| v.into_iter().map(|s| koubou_task::TaskStatus::from(s).as_str()).collect::<Vec<_>>().join(","));
        let q = ListQuery { status, kind, q: search, limit: Some(usize::try_from(limit).unwrap_or(0)), before };
        let page = k(ctx).tasks(q).await.map_err(gql_err)?;
        Ok(TaskPage {
            tasks: page.tasks.into_iter().map(Task).collect(),
            total: page.total as i64,
            next_cursor: page.next_cursor.map(|c| c.to_string()),
        })
    }

    /// The worker pool.
    async fn workers(&self, ctx: &Context<'_>) -> async_graphql::Result<Workers> {
        let w = k(ctx).workers().await.map_err(gql_err)?;
        Ok(Workers {
            active: w.active as i64,
            busy: w.busy as i64,
            min_workers: w.min_workers as i64,
            max_workers: w.max_workers as i64,
            backend_capacity: w.backend_capacity as i64,
            workers: w
                .workers
                .into_iter()
                .map(|w| Worker {
                    worker_id: w.worker_id,
                    state: w.state,
                    current_task: w.current_task.map(|t| ID(t.to_string())),
                    tasks_done: w.tasks_done as i64,
                    tasks_failed: w.tasks_failed as i64,
                    started_at: w.started_at,
                })
                .collect(),
        })
    }

    /// Health of the system and its backends.
    async fn health(&self, ctx: &Context<'_>) -> async_graphql::Result<Health> {
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
    /// Queues a task (the seed's mutation). Errors carry `extensions.code` and `extensions.field`.
    #[allow(clippy::too_many_arguments)]
    async fn submit_task(
        &self,
        ctx: &Context<'_>,
        #[graphql(name = "type", desc = "Task type: general, code, or a configured one.")] kind: Option<String>,
        prompt: String,
        #[graphql(desc = "1 (lowest) to 10 (highest); default 5.")] priority: Option<i32>,
        system: Option<String>,
        model: Option<String>,
        backend: Option<String>,
        #[graphql(name = "idempotencyKey")] idempotency_key: Option<String>,
    ) -> async_graphql::Result<SubmitResult> {
        let mut body = Map::new();
        body.insert("prompt".into(), prompt.into());
        let opt = [
            ("type", kind),
            ("system", system),
            ("model", model),
            ("backend", backend),
            ("idempotency_key", idempotency_key),
        ];
        for (key, v) in opt {
            if let Some(v) = v {
                body.insert(key.into(), v.into());
            }
        }
        if let Some(p) = priority {
            body.insert("priority".into(), p.into());
        }
        let field_name = |f: &str| match f {
            "type" => "type".to_owned(),
            "idempotency_key" => "idempotencyKey".to_owned(),
            f => f.to_owned(),
        };
        let req = SubmitRequest::from_json(&Value::Object(body)).map_err(|mut e| {
            e.field = field_name(&e.field);
            gql_err(ApiError::Invalid(e))
        })?;
        let r = k(ctx).submit(req).await.map_err(gql_err)?;
        Ok(SubmitResult { task_id: ID(r.task_id.to_string()), status: r.status.into(), created: r.created })
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
    /// event with its ending and completes.
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
    ) -> impl Stream<Item = async_graphql::Result<TaskEvent>> + use<> {
        let rx = k(ctx).subscribe();
        futures::stream::unfold(Some(rx), move |rx| async move {
            let mut rx = rx?;
            loop {
                match rx.recv().await {
                    Ok(e) if !tokens && matches!(e.kind, EventKind::TaskToken { .. }) => continue,
                    Ok(e) => return Some((Ok(TaskEvent::from_event(&e)), Some(rx))),
                    Err(RecvError::Lagged(n)) => {
                        let err = gql_err(ApiError::Unavailable(format!(
                            "too slow: fell {n} events behind the event bus; subscribe again"
                        )));
                        return Some((Err(err), None));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        })
    }
}
