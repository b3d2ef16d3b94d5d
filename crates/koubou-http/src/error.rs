//! JSON errors for every HTTP failure, including the ones axum would answer in plain text.
//!
//! [`ErrorBody`] is the one shape of an error on the wire, on every port and in every face that
//! sends JSON (REST, the dashboard, WebSocket messages, MCP tool results); [`status`] is the HTTP
//! status of each [`ApiError`], and [`from_body`] rebuilds the error a server sent.

use axum::{
    Json,
    response::{IntoResponse, Response},
};
use koubou_api::{ApiError, Busy};
use koubou_task::FieldError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// An [`ApiError`] as an HTTP response.
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            axum::http::StatusCode::from_u16(status(&self.0)).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, Json(body(&self.0))).into_response();
        if let Some(secs) = self.0.retry_after() {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        r
    }
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

/// The HTTP status of an error.
pub fn status(e: &ApiError) -> u16 {
    match e {
        ApiError::Invalid(_) => 400,
        ApiError::NotFound(_) => 404,
        ApiError::Conflict(_) => 409,
        ApiError::Unavailable(_) => 503,
        ApiError::TryLater { why: Busy::QueueFull, .. } => 429,
        ApiError::TryLater { .. } => 503,
        ApiError::Internal(_) => 500,
    }
}

/// The JSON error body every face sends: `{"error": {"code", "message", "field"?,
/// "retry_after_secs"?}}`.
pub fn body(e: &ApiError) -> Value {
    ErrorBody::new(e.code(), e.to_string(), e.field().map(str::to_owned), e.retry_after()).to_value()
}

/// Rebuilds an error from a status and a body written by [`body`].
pub fn from_body(status: u16, body: &Value) -> ApiError {
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

/// A JSON error with any status and code (for 401, 403, 405, 413, 415…).
pub fn json_error(
    status: axum::http::StatusCode,
    code: &str,
    message: impl Into<String>,
    field: Option<&str>,
) -> Response {
    let mut e = serde_json::json!({ "code": code, "message": message.into() });
    if let Some(f) = field {
        e["field"] = f.into();
    }
    (status, Json(serde_json::json!({ "error": e }))).into_response()
}

/// A request refused before any handler ran (by the guard or a limit): answered as the JSON
/// error, with `Retry-After` when waiting helps.
#[derive(Debug)]
pub struct Refusal {
    pub status: axum::http::StatusCode,
    pub code: &'static str,
    pub field: &'static str,
    pub message: String,
    pub retry_after_secs: Option<u64>,
}

impl Refusal {
    pub fn new(status: axum::http::StatusCode, code: &'static str, field: &'static str, message: String) -> Self {
        Refusal { status, code, field, message, retry_after_secs: None }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = json_error(self.status, self.code, self.message, Some(self.field));
        if let Some(s) = self.retry_after_secs {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_round_trips() {
        let e = ApiError::invalid("priority", "must be an integer from 1 to 10, got 11");
        let b = body(&e);
        assert_eq!(b["error"]["field"], "priority");
        assert_eq!(from_body(400, &b), e);
        for why in [Busy::QueueFull, Busy::DiskFull, Busy::Locked] {
            let e = ApiError::TryLater { why, message: "wait".into(), retry_after_secs: 7 };
            let b = body(&e);
            assert_eq!(
                (b["error"]["code"].as_str(), b["error"]["retry_after_secs"].as_u64()),
                (Some(why.code()), Some(7))
            );
            assert_eq!(from_body(status(&e), &b), e);
        }
        assert_eq!(
            status(&ApiError::TryLater { why: Busy::QueueFull, message: String::new(), retry_after_secs: 1 }),
            429
        );
    }
}
