//! The REST routes. Paths and fields follow the seed guide and the prototype's clients
//! (`docs/compat.md`); everything else is additive.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, State, rejection::QueryRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response, sse},
    routing::{get, post},
};
use futures::StreamExt;
use koubou_system::{
    Api, ApiError, Koubou,
    api::{ListQuery, SubmitRequest},
};
use koubou_task::TaskId;
use serde::Deserialize;

use crate::error::{HttpError, json_error};

type Res<T> = Result<T, HttpError>;

/// The REST API. The caller adds the [`crate::guard`] layer and any other faces.
pub fn router(k: Koubou) -> Router {
    let body_limit = k.config().limits.body_bytes();
    Router::new()
        .route("/task/delegate", post(delegate))
        .route("/task/{id}/status", get(status))
        .route("/task/status/{id}", get(status))
        .route("/task/{id}", get(status))
        .route("/task/{id}/events", get(events))
        .route("/task/{id}/cancel", post(cancel))
        .route("/tasks", get(list))
        .route("/tasks/pending", get(|s, q| legacy(s, q, "pending,retrying")))
        .route("/tasks/active", get(|s, q| legacy(s, q, "running")))
        .route("/tasks/completed", get(|s, q| legacy(s, q, "completed")))
        .route("/workers/status", get(workers))
        .route("/health", get(health))
        .route("/status", get(system_status))
        .route("/metrics", get(metrics))
        .route("/system/info", get(system_info))
        .layer(DefaultBodyLimit::max(body_limit))
        // One DEBUG line per request and its answer (`LOG_LEVEL=debug`), in mcp_server.log.
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(Arc::new(k))
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

async fn delegate(State(k): State<Arc<Koubou>>, headers: HeaderMap, body: Bytes) -> Response {
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

async fn status(State(k): State<Arc<Koubou>>, Path(id): Path<String>) -> Res<impl IntoResponse> {
    Ok(Json(k.task(task_id(&id)?).await?))
}

async fn cancel(State(k): State<Arc<Koubou>>, Path(id): Path<String>) -> Res<impl IntoResponse> {
    Ok(Json(k.cancel(task_id(&id)?).await?))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, HttpError> {
    q.map(|Query(v)| v).map_err(|e| {
        let msg = e.body_text();
        let field = msg.split('`').nth(1).unwrap_or("query").to_owned();
        ApiError::invalid(&field, msg).into()
    })
}

async fn list(State(k): State<Arc<Koubou>>, q: Result<Query<ListQuery>, QueryRejection>) -> Res<impl IntoResponse> {
    Ok(Json(k.tasks(query(q)?).await?))
}

#[derive(Deserialize, Default)]
struct LimitOnly {
    limit: Option<usize>,
}

/// The prototype's `/tasks/pending|active|completed?limit=`: a bare list, as its clients expect.
async fn legacy(
    State(k): State<Arc<Koubou>>,
    q: Result<Query<LimitOnly>, QueryRejection>,
    status: &str,
) -> Res<Response> {
    let limit = query(q)?.limit.unwrap_or(50);
    let page = k.tasks(ListQuery { status: Some(status.into()), limit: Some(limit), ..Default::default() }).await?;
    Ok(Json(page.tasks).into_response())
}

async fn workers(State(k): State<Arc<Koubou>>) -> Res<impl IntoResponse> {
    Ok(Json(k.workers().await?))
}

async fn health(State(k): State<Arc<Koubou>>) -> Res<impl IntoResponse> {
    Ok(Json(k.health().await?))
}

async fn system_status(State(k): State<Arc<Koubou>>) -> Res<impl IntoResponse> {
    Ok(Json(k.status().await?))
}

/// The prototype's `/system/info`: where this server keeps its files.
async fn system_info(State(k): State<Arc<Koubou>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "server_type": "koubou",
        "version": env!("CARGO_PKG_VERSION"),
        "koubou_home": k.home_dir(),
        "db_path": k.db_path(),
        "logs_dir": k.home_dir().join("logs"),
        "timestamp": koubou_task::rfc3339(koubou_task::now_millis()),
    }))
}

async fn metrics(State(k): State<Arc<Koubou>>) -> Res<impl IntoResponse> {
    let text = k.metrics_text().await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text))
}

/// Server-sent events for one task: its tokens and state changes, ending when it ends.
async fn events(State(k): State<Arc<Koubou>>, Path(id): Path<String>) -> Res<impl IntoResponse> {
    let stream = k.watch(task_id(&id)?).await?;
    let sse_events = stream.map(|e| {
        Ok::<_, Infallible>(match e {
            Ok(e) => sse::Event::default().event(e.kind.name()).data(serde_json::to_string(&e).unwrap_or_default()),
            Err(e) => sse::Event::default().event("error").data(e.body().to_string()),
        })
    });
    Ok(sse::Sse::new(sse_events).keep_alive(sse::KeepAlive::new().interval(Duration::from_secs(15))))
}
