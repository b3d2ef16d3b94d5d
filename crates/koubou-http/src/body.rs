//! Request bodies on every port: at most `limits.max_body_bytes` (413), read within
//! `server.body_read_timeout_secs` (408), before any handler sees them.
//!
//! Every body Koubou accepts is one small JSON document (a task, a GraphQL query, an MCP
//! message), so the body is read whole here: a handler never waits on a client that sends a
//! byte a minute, and every face answers an oversized body with the same JSON error, whatever
//! extractor it uses. A declared `Content-Length` over the limit is refused before a byte of
//! the body is read.

use std::{sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::Response,
};
use futures::StreamExt;

use crate::error::json_error;

/// How much body a request may carry, and how long it may take to send it.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit {
    pub max_bytes: usize,
    pub read_timeout: Duration,
}

fn too_large(max: usize) -> Response {
    let mut r = json_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the request body is larger than {max} bytes (limits.max_body_bytes)"),
        Some("body"),
    );
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

enum Failed {
    TooLarge,
    Read(String),
}

async fn collect(body: Body, max: usize) -> Result<Bytes, Failed> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(data) = stream.next().await {
        let data = data.map_err(|e| Failed::Read(e.to_string()))?;
        if buf.len() + data.len() > max {
            return Err(Failed::TooLarge);
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.into())
}

/// The middleware (use with `axum::middleware::from_fn_with_state(Arc<BodyLimit>, limit_body)`).
pub async fn limit_body(State(l): State<Arc<BodyLimit>>, req: Request, next: Next) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > l.max_bytes as u64) {
        return too_large(l.max_bytes);
    }
    if axum::body::HttpBody::is_end_stream(req.body()) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(l.read_timeout, collect(body, l.max_bytes)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Err(Failed::TooLarge)) => too_large(l.max_bytes),
        Ok(Err(Failed::Read(e))) => json_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("could not read the body: {e}"),
            Some("body"),
        ),
        Err(_) => {
            let mut r = json_error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} s (server.body_read_timeout_secs)",
                    l.read_timeout.as_secs()
                ),
                Some("body"),
            );
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}
