//! The REST routes. Paths and fields follow the seed guide and the prototype's clients
//! (`docs/compat.md`); everything else is additive.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, State, rejection::QueryRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response, sse},
    routing::{MethodRouter, get, post},
};
use futures::StreamExt;
use koubou_api::{
    Api, ApiError, HealthView, ListQuery, SubmitRequest, SubmitResponse, SystemInfo, SystemStatus, TaskList, TaskView,
    WorkersView,
};
use koubou_task::TaskId;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::{
    error::{ErrorBody, HttpError, json_error},
    openapi::{ServerTrouble, SubmitBody},
};

type Res<T> = Result<T, HttpError>;

/// The REST API. The caller adds the [`crate::guard`] layer and any other faces.
pub fn router(api: Arc<dyn Api>) -> Router {
    let body_limit = api.limits().body_bytes();
    routes()
        .into_iter()
        .fold(Router::new(), |r, (path, handler)| r.route(path, handler))
        .layer(DefaultBodyLimit::max(body_limit))
        // One DEBUG line per request and its answer (`LOG_LEVEL=debug`), in mcp_server.log.
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(api)
}

/// Every route, the one list the router is made of and the OpenAPI document is checked against.
fn routes() -> Vec<(&'static str, MethodRouter<Arc<dyn Api>>)> {
    vec![
        ("/task/delegate", post(delegate)),
        ("/task/{id}/status", get(status)),
        ("/task/status/{id}", get(status)),
        ("/task/{id}", get(status)),
        ("/task/{id}/events", get(events)),
        ("/task/{id}/cancel", post(cancel)),
        ("/tasks", get(list)),
        ("/tasks/pending", get(pending)),
        ("/tasks/active", get(active)),
        ("/tasks/completed", get(completed)),
        ("/workers/status", get(workers)),
        ("/nodes", get(nodes)),
        ("/health", get(health)),
        ("/status", get(system_status)),
        ("/metrics", get(metrics)),
        ("/system/info", get(system_info)),
        ("/openapi.json", get(openapi_json)),
    ]
}

/// The paths [`router`] serves.
pub fn paths() -> Vec<&'static str> {
    routes().into_iter().map(|(p, _)| p).collect()
}

/// 404 and 405 as JSON, for the whole server.
pub async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "not_found", "no such route; see docs/rest.md", None)
}

/// A path that names no task is 404, whether or not it is spelled like a task id (the
/// prototype's clients expect that of `/task/nonexistent/status`).
fn task_id(s: &str) -> Result<TaskId, HttpError> {
    s.parse().map_err(|_: koubou_task::id::BadTaskId| ApiError::NotFound(s.to_owned()).into())
}

/// Submit a task.
///
/// Answers once the task is stored (200 for a new task and for an earlier one with the same
/// `idempotency_key`, which `created` tells apart); with `sync`, once it has finished or the
/// wait has run out.
#[utoipa::path(post, path = "/task/delegate", tag = "tasks",
    request_body(content = SubmitBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The task is stored (and, with `sync`, finished or still running when the wait ran out).", body = SubmitResponse),
        (status = 400, description = "The body is not JSON, or a field is wrong (`field` names it).", body = ErrorBody),
        (status = 415, description = "The body was sent with a Content-Type other than JSON.", body = ErrorBody),
        (status = 429, description = "`limits.max_pending` tasks are waiting (`queue_full`), or the client's rate limit (`rate_limited`); nothing was stored.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before sending it again."))),
        ServerTrouble,
    ))]
pub(crate) async fn delegate(State(k): State<Arc<dyn Api>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(ct) = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("?"))
        && !crate::is_json(ct)
    {
        return json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send the task as JSON (Content-Type: application/json), not {ct}"),
            Some("Content-Type"),
        );
    }
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return HttpError(ApiError::invalid("body", format!("is not valid JSON: {e}"))).into_response(),
    };
    let req = match SubmitRequest::from_json(&value) {
        Ok(r) => r,
        Err(e) => return HttpError(ApiError::Invalid(e)).into_response(),
    };
    // 200 for a new task too: the prototype's clients accept nothing else (`created` tells).
    match k.submit(req).await {
        Ok(r) => (StatusCode::OK, Json(r)).into_response(),
        Err(e) => HttpError(e).into_response(),
    }
}

/// A task: its status, answer, timings, queue position.
#[utoipa::path(get, path = "/task/{id}/status", tag = "tasks",
    params(("id" = String, Path, description = "The task's id (a UUID); anything else names no task (404).")),
    responses(
        (status = 200, description = "The task.", body = TaskView),
        (status = 404, description = "No such task.", body = ErrorBody),
        ServerTrouble,
    ))]
pub(crate) async fn status(State(k): State<Arc<dyn Api>>, Path(id): Path<String>) -> Res<impl IntoResponse> {
    Ok(Json(k.task(task_id(&id)?).await?))
}

/// Cancel a task that has not finished.
#[utoipa::path(post, path = "/task/{id}/cancel", tag = "tasks",
    params(("id" = String, Path, description = "The task's id (a UUID); anything else names no task (404).")),
    responses(
        (status = 200, description = "The task, cancelled.", body = TaskView),
        (status = 404, description = "No such task.", body = ErrorBody),
        (status = 409, description = "The task has already finished.", body = ErrorBody),
        ServerTrouble,
    ))]
pub(crate) async fn cancel(State(k): State<Arc<dyn Api>>, Path(id): Path<String>) -> Res<impl IntoResponse> {
    Ok(Json(k.cancel(task_id(&id)?).await?))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, HttpError> {
    q.map(|Query(v)| v).map_err(|e| {
        let msg = e.body_text();
        let field = msg.split('`').nth(1).unwrap_or("query").to_owned();
        ApiError::invalid(&field, msg).into()
    })
}

/// Tasks, newest first, one page at a time.
#[utoipa::path(get, path = "/tasks", tag = "tasks", params(ListQuery),
    responses(
        (status = 200, description = "One page.", body = TaskList),
        (status = 400, description = "A query parameter is wrong (`field` names it).", body = ErrorBody),
        ServerTrouble,
    ))]
pub(crate) async fn list(
    State(k): State<Arc<dyn Api>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Res<impl IntoResponse> {
    Ok(Json(k.tasks(query(q)?).await?))
}

/// The query of the prototype's lists.
#[derive(Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LimitOnly {
    /// Most tasks to list, 1–1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// What the prototype's lists answer besides the guard's refusals and [`ServerTrouble`].
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum LegacyListAnswers {
    /// The tasks.
    #[response(status = 200)]
    Tasks(Vec<TaskView>),
    /// `limit` is wrong.
    #[response(status = 400)]
    BadLimit(ErrorBody),
}

/// The prototype's lists: a bare array, newest first.
macro_rules! legacy_list {
    ($name:ident, $path:literal, $statuses:literal, $what:literal) => {
        #[doc = concat!("The prototype's list of ", $what, " tasks (`", $statuses, "`): a bare array, newest first.")]
        #[utoipa::path(get, path = $path, tag = "prototype", params(LimitOnly), responses(LegacyListAnswers, ServerTrouble))]
        pub(crate) async fn $name(s: State<Arc<dyn Api>>, q: Result<Query<LimitOnly>, QueryRejection>) -> Res<Response> {
            legacy(s, q, $statuses).await
        }
    };
}
legacy_list!(pending, "/tasks/pending", "pending,retrying", "waiting");
legacy_list!(active, "/tasks/active", "running", "running");
legacy_list!(completed, "/tasks/completed", "completed", "completed");

/// The prototype's `/tasks/pending|active|completed?limit=`: a bare list, as its clients expect.
async fn legacy(
    State(k): State<Arc<dyn Api>>,
    q: Result<Query<LimitOnly>, QueryRejection>,
    status: &str,
) -> Res<Response> {
    let limit = query(q)?.limit.unwrap_or(50);
    let page = k.tasks(ListQuery { status: Some(status.into()), limit: Some(limit), ..Default::default() }).await?;
    Ok(Json(page.tasks).into_response())
}

/// The worker pool: its bounds and each worker's state.
#[utoipa::path(get, path = "/workers/status", tag = "system",
    responses((status = 200, description = "The pool.", body = WorkersView), ServerTrouble))]
pub(crate) async fn workers(State(k): State<Arc<dyn Api>>) -> Res<impl IntoResponse> {
    Ok(Json(k.workers().await?))
}

/// Every node registered with the queue: controllers and worker nodes, lost ones marked.
#[utoipa::path(get, path = "/nodes", tag = "system",
    responses((status = 200, description = "The nodes, oldest first.", body = koubou_api::NodesView), ServerTrouble))]
pub(crate) async fn nodes(State(k): State<Arc<dyn Api>>) -> Res<impl IntoResponse> {
    Ok(Json(k.nodes().await?))
}

/// Health: `healthy`, or `degraded` when a backend that some task type uses first is down.
#[utoipa::path(get, path = "/health", tag = "system",
    responses((status = 200, description = "Health (200 whether healthy or degraded; `status` says).", body = HealthView), ServerTrouble))]
pub(crate) async fn health(State(k): State<Arc<dyn Api>>) -> Res<impl IntoResponse> {
    Ok(Json(k.health().await?))
}

/// Counts, throughput and resource use (the seed's `systemStatus`).
#[utoipa::path(get, path = "/status", tag = "system",
    responses((status = 200, description = "The system's status.", body = SystemStatus), ServerTrouble))]
pub(crate) async fn system_status(State(k): State<Arc<dyn Api>>) -> Res<impl IntoResponse> {
    Ok(Json(k.status().await?))
}

/// Where this server keeps its files (the prototype's `/system/info`).
#[utoipa::path(get, path = "/system/info", tag = "prototype",
    responses((status = 200, description = "Paths and version.", body = SystemInfo), ServerTrouble))]
pub(crate) async fn system_info(State(k): State<Arc<dyn Api>>) -> Res<Json<SystemInfo>> {
    Ok(Json(k.info().await?))
}

/// This document: the REST API on this port, in OpenAPI 3.1.
#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI document (also in docs/openapi.json).", content_type = "application/json",
        body = Object)))]
pub(crate) async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], crate::openapi::json()).into_response()
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "The metrics.", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String),
        ServerTrouble))]
pub(crate) async fn metrics(State(k): State<Arc<dyn Api>>) -> Res<impl IntoResponse> {
    let text = k.metrics_text().await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text))
}

/// One server-sent event of `GET /task/{id}/events` (keep-alive comments aside).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TaskEventMessage {
    /// The event's kind: its `Event`'s `event` (`task_token`, `task_completed`, …), or `error`.
    event: String,
    /// One `Event` as JSON (an `ErrorBody` for `error`).
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// Server-sent events for one task: its tokens and state changes, ending when it ends.
///
/// Each event's name is its kind (`task_token`, `task_completed`, …) and its data one `Event`
/// as JSON (see the `Event` schema); a task already finished gets one event carrying its state.
/// A stream opened after the task began first replays the task's events the server still keeps
/// (its last 4,096 events of all tasks), then goes on live, each event once.
/// `error` events carry an `ErrorBody` (e.g. a client too slow to keep up is dropped).
#[utoipa::path(get, path = "/task/{id}/events", tag = "tasks",
    params(("id" = String, Path, description = "The task's id (a UUID); anything else names no task (404).")),
    responses(
        (status = 200, description = "The stream, until the task ends.", content_type = "text/event-stream", body = TaskEventMessage),
        (status = 404, description = "No such task.", body = ErrorBody),
        ServerTrouble,
    ))]
pub(crate) async fn events(State(k): State<Arc<dyn Api>>, Path(id): Path<String>) -> Res<impl IntoResponse> {
    let stream = k.watch(task_id(&id)?).await?;
    let sse_events = stream.map(|e| {
        Ok::<_, Infallible>(match e {
            Ok(e) => sse::Event::default().event(e.kind.name()).data(serde_json::to_string(&e).unwrap_or_default()),
            Err(e) => sse::Event::default().event("error").data(crate::error::body(&e).to_string()),
        })
    });
    Ok(sse::Sse::new(sse_events).keep_alive(sse::KeepAlive::new().interval(Duration::from_secs(15))))
}
