//! The REST face on port 8765, and the guard, limits and listener every HTTP port shares.
//!
//! # Layout
//! - [`rest`]: the seed's routes (`POST /task/delegate`, `GET /task/{id}/status`, …) plus
//!   listing, cancelling, workers, health, metrics, and `GET /task/{id}/events` (SSE).
//! - [`guard`]: `Host` (DNS rebinding), `Origin` (cross-site), the rate limit and the bearer
//!   token, in front of every route of every port; [`authority`] parses what it compares.
//! - [`rate`]: the optional per-client token bucket.
//! - [`body`]: request bodies — size limit and read deadline — for every port.
//! - [`listener`]: serving a port with a header-read timeout and a connection cap.
//! - [`error`]: every error leaves as JSON `{"error": {"code", "message", "field"?}}`.
//! - [`openapi`]: the REST API's OpenAPI 3.1 document (`GET /openapi.json`, `docs/openapi.json`),
//!   made from the handlers and the types they send.
//!
//! Architecture invariant: handlers call an `Arc<dyn` [`koubou_api::Api`]`>` and nothing else (this
//! crate does not know the system that serves it);
//! nothing reaches a handler that the guard and the body limit have not let through.

pub mod authority;
pub mod body;
pub mod error;
pub mod guard;
pub mod listener;
pub mod openapi;
pub mod rate;
pub mod rest;

use std::sync::Arc;

use axum::{Router, extract::DefaultBodyLimit, middleware::from_fn_with_state};
pub use body::BodyLimit;
pub use guard::{Guard, guard};
pub use listener::{Listen, serve};
pub use rate::RateLimiter;
pub use rest::router;

/// `r` behind the guard and the body limit: what every port serves.
pub fn protect(r: Router, guard: Arc<Guard>, body: BodyLimit) -> Router {
    r.layer(from_fn_with_state(Arc::new(body), body::limit_body))
        .layer(DefaultBodyLimit::max(body.max_bytes))
        .layer(from_fn_with_state(guard, guard::guard))
}

/// True when a `Content-Type` value's MIME essence is `application/json` (parameters such as
/// `charset` aside): the type is compared, never a substring of the whole value, so
/// `text/plain; x=json` is not JSON.
pub fn is_json(content_type: &str) -> bool {
    content_type.parse::<mime::Mime>().is_ok_and(|m| m.essence_str() == "application/json")
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_is_the_essence_not_a_substring() {
        use super::is_json;
        assert!(is_json("application/json") && is_json("Application/JSON; charset=utf-8"));
        for ct in ["text/plain; x=json", "application/jsonx", "application/x-json", "text/json", "", "json"] {
            assert!(!is_json(ct), "{ct}");
        }
    }
}
