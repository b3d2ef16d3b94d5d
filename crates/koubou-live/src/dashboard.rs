//! The web dashboard under `/dashboard`: embedded HTML/CSS/JS, a WebSocket at `/dashboard/ws`
//! (the same protocol as port 8766) and small JSON endpoints under `/dashboard/api/`, each a thin
//! wrapper over one [`Api`] call. Lists are always paged: the page never loads all tasks.

use axum::{
    Json, Router,
    extract::{Path, Query, State, rejection::JsonRejection},
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use std::sync::Arc;

use koubou_api::{Api, ApiError, ListQuery, SubmitRequest};
use koubou_http::error::HttpError;
use koubou_task::TaskId;
use serde_json::{Value, json};

use crate::{
    assets,
    ws::{WsConfig, WsState, ws_handler},
};

/// Everything under `/dashboard`.
pub fn dashboard_router(k: Arc<dyn Api>) -> Router {
    dashboard_router_with(k, WsConfig::default())
}

/// [`dashboard_router`] with other WebSocket tuning (e.g. the port's shared [`crate::WsLimits`]).
pub fn dashboard_router_with(k: Arc<dyn Api>, ws: WsConfig) -> Router {
    let st = WsState::new(k, ws);
    Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/ws", get(ws_handler))
        .route("/dashboard/api/tasks", get(list).post(submit))
        .route("/dashboard/api/tasks/{id}", get(one))
        .route("/dashboard/api/tasks/{id}/cancel", post(cancel))
        .route("/dashboard/api/workers", get(workers))
        .route("/dashboard/api/nodes", get(nodes))
        .route("/dashboard/api/health", get(health))
        .route("/dashboard/api/status", get(status))
        .route("/dashboard/api/metrics", get(metrics))
        .route("/dashboard/{file}", get(asset))
        .with_state(st)
}

async fn index() -> Response {
    let mut r = assets::serve(assets::DASHBOARD, "index.html");
    r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(assets::CSP));
    r
}

async fn asset(Path(file): Path<String>) -> Response {
    if file == "index.html" {
        return index().await;
    }
    assets::serve(assets::DASHBOARD, &file)
}

fn reply<T: serde::Serialize>(r: Result<T, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}

fn error(e: ApiError) -> Response {
    HttpError(e).into_response()
}

fn parse_id(id: &str) -> Result<TaskId, ApiError> {
    id.parse().map_err(|e: koubou_task::id::BadTaskId| ApiError::invalid("id", e.to_string()))
}

async fn list(
    State(st): State<WsState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    match q {
        Ok(Query(q)) => reply(st.k.tasks(q).await),
        Err(e) => error(ApiError::invalid("query", e.body_text())),
    }
}

async fn one(State(st): State<WsState>, Path(id): Path<String>) -> Response {
    match parse_id(&id) {
        Ok(id) => reply(st.k.task(id).await),
        Err(e) => error(e),
    }
}

async fn cancel(State(st): State<WsState>, Path(id): Path<String>) -> Response {
    match parse_id(&id) {
        Ok(id) => reply(st.k.cancel(id).await),
        Err(e) => error(e),
    }
}

async fn submit(State(st): State<WsState>, body: Result<Json<Value>, JsonRejection>) -> Response {
    let v = match body {
        Ok(Json(v)) => v,
        Err(e) => return error(ApiError::invalid("body", e.body_text())),
    };
    match SubmitRequest::from_json(&v) {
        Ok(mut req) => {
            req.sync = false;
            reply(st.k.submit(req).await)
        }
        Err(e) => error(ApiError::Invalid(e)),
    }
}

async fn workers(State(st): State<WsState>) -> Response {
    reply(st.k.workers().await)
}

async fn nodes(State(st): State<WsState>) -> Response {
    reply(st.k.nodes().await)
}

async fn health(State(st): State<WsState>) -> Response {
    reply(st.k.health().await)
}

async fn status(State(st): State<WsState>) -> Response {
    reply(st.k.status().await)
}

/// Recent metric samples (for charts when the page opens) and the per-second history of
/// finished tasks and tokens.
async fn metrics(State(st): State<WsState>) -> Response {
    let mut samples = st.sampler.history();
    if samples.is_empty() {
        samples.extend(st.sampler.latest(&*st.k).await);
    }
    let seconds = match st.k.history(600).await {
        Ok(s) => s,
        Err(e) => return error(e),
    };
    Json(json!({
        "every_ms": crate::metrics::SAMPLE_EVERY.as_millis() as u64,
        "samples": samples,
        "seconds": seconds,
    }))
    .into_response()
}
