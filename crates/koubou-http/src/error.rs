//! JSON errors for every HTTP failure, including the ones axum would answer in plain text.

use axum::{
    Json,
    response::{IntoResponse, Response},
};
use koubou_system::ApiError;

/// An [`ApiError`] as an HTTP response.
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = axum::http::StatusCode::from_u16(self.0.http_status())
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, Json(self.0.body())).into_response();
        if let Some(secs) = self.0.retry_after() {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        r
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
