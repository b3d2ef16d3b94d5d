//! Plumbing shared by the HTTP providers (Ollama, OpenAI-compatible): sending a request and
//! reading its body while honouring cancellation, and turning transport failures and error
//! bodies into [`BackendError`]s.
//!
//! Why it exists: both providers must stop the moment the router cancels (even when the server
//! accepted the connection and never answers), and both must say "unreachable" vs "failed" the
//! same way, so that logic lives once here.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::Value;

use crate::{BackendError, CancellationToken};

/// How long health checks wait for an answer in total.
pub(crate) const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long reading an error body may take before we give up on its details.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Error bodies are cut to this many characters in messages.
const ERROR_BODY_MAX: usize = 600;

/// The HTTP client every provider uses: connect timeout only (the overall budget is the
/// router's). Connections are kept alive and reused. Some servers (llama-cpp-python's, after
/// cutting a stream on a context overflow or a cancelled generation) leave a connection broken,
/// so [`Pool`] drops the whole pool after a broken answer, and [`send`] retries once a request
/// that got no answer at all.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(20))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// A backend's connection pool, thrown away whenever an answer broke: a connection that carried
/// a truncated or failed stream is never used again (a server may have left it half-closed).
pub(crate) struct Pool(std::sync::Mutex<reqwest::Client>);

impl Pool {
    pub(crate) fn new() -> Self {
        Pool(std::sync::Mutex::new(client()))
    }

    /// The current client (a cheap handle on the shared pool).
    pub(crate) fn get(&self) -> reqwest::Client {
        self.0.lock().map(|c| c.clone()).unwrap_or_else(|_| client())
    }

    /// Starts a fresh pool when `r` is a broken answer; passes `r` through.
    pub(crate) fn check<T>(&self, r: Result<T, BackendError>) -> Result<T, BackendError> {
        if matches!(r, Err(BackendError::Truncated { .. } | BackendError::Failed { .. } | BackendError::Cancelled))
            && let Ok(mut c) = self.0.lock()
        {
            *c = client();
        }
        r
    }
}

/// Refuses URLs this build cannot reach: only plain `http://` is compiled in (the workspace's
/// `reqwest` has no TLS feature), so an `https://` base URL is a configuration error with a clear
/// message rather than an obscure connect failure.
pub(crate) fn check_url(backend: &str, url: &str) -> Result<(), BackendError> {
    let lower = url.trim().to_ascii_lowercase();
    if lower.starts_with("http://") {
        return Ok(());
    }
    let detail = if lower.starts_with("https://") {
        format!("{url}: HTTPS is not supported by this build (no TLS in reqwest); use an http:// URL")
    } else {
        format!("{url}: the URL must start with http://")
    };
    Err(BackendError::Config { backend: backend.to_owned(), detail })
}

/// Sends `req`, giving up with [`BackendError::Cancelled`] as soon as `cancel` fires (dropping
/// the request closes the connection).
pub(crate) async fn send(
    backend: &str,
    url: &str,
    req: reqwest::RequestBuilder,
    cancel: &CancellationToken,
    unreachable_hint: &str,
) -> Result<reqwest::Response, BackendError> {
    let retry = req.try_clone();
    let first = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(BackendError::Cancelled),
        r = req.send() => r,
    };
    let e = match (first, retry) {
        (Ok(resp), _) => return Ok(resp),
        // No answer at all on what was probably a stale pooled connection: once more.
        (Err(e), Some(again)) if !e.is_connect() && !e.is_timeout() && !e.is_builder() && !e.is_status() => {
            tracing::debug!(backend, error = %error_chain(&e), "request failed before any answer; retrying once");
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(BackendError::Cancelled),
                r = again.send() => match r {
                    Ok(resp) => return Ok(resp),
                    Err(e) => e,
                },
            }
        }
        (Err(e), _) => e,
    };
    Err(transport_error(backend, url, &e, unreachable_hint))
}

/// Maps a failure to get an answer at all.
pub(crate) fn transport_error(backend: &str, url: &str, e: &reqwest::Error, unreachable_hint: &str) -> BackendError {
    if e.is_connect() {
        let hint = if unreachable_hint.is_empty() { String::new() } else { format!("; {unreachable_hint}") };
        BackendError::Unreachable {
            backend: backend.to_owned(),
            detail: format!("cannot connect to {url}: {}{hint}", error_chain(e)),
        }
    } else if e.is_builder() {
        BackendError::Config { backend: backend.to_owned(), detail: format!("bad URL {url}: {}", error_chain(e)) }
    } else {
        BackendError::Failed {
            backend: backend.to_owned(),
            detail: format!("request to {url} failed: {}", error_chain(e)),
        }
    }
}

/// The error and its sources, joined (reqwest's own message alone says little).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = inner.source();
    }
    s
}

/// A response body as a stream of chunks, read under cancellation.
pub(crate) struct Body {
    stream: BoxStream<'static, reqwest::Result<Bytes>>,
}

impl Body {
    pub(crate) fn new(resp: reqwest::Response) -> Self {
        Body { stream: resp.bytes_stream().boxed() }
    }

    /// The next chunk; `Ok(None)` at the end of the body.
    pub(crate) async fn next(
        &mut self,
        backend: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Bytes>, BackendError> {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(BackendError::Cancelled),
            c = self.stream.next() => match c {
                None => Ok(None),
                Some(Ok(b)) => Ok(Some(b)),
                Some(Err(e)) => Err(BackendError::Truncated {
                    backend: backend.to_owned(),
                    detail: format!("reading the stream failed: {}", error_chain(&e)),
                }),
            },
        }
    }
}

/// Reads an error response's body (bounded in time and size, cancellable) and pulls the
/// provider's message out of it: `{"error":"..."}`, `{"error":{"message":...}}`, `{"detail":...}`
/// or `{"message":...}`, else the text itself.
pub(crate) async fn error_message(resp: reqwest::Response, cancel: &CancellationToken) -> Result<String, BackendError> {
    let text = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(BackendError::Cancelled),
        r = tokio::time::timeout(ERROR_BODY_TIMEOUT, resp.text()) => match r {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => format!("(error body unreadable: {e})"),
            Err(_) => "(error body did not arrive)".to_owned(),
        },
    };
    Ok(message_of(&text))
}

pub(crate) fn message_of(text: &str) -> String {
    let msg = match serde_json::from_str::<Value>(text) {
        Ok(v) => json_message(&v).unwrap_or_else(|| text.trim().to_owned()),
        Err(_) => text.trim().to_owned(),
    };
    let msg = if msg.is_empty() { "(empty body)".to_owned() } else { msg };
    truncate(&msg, ERROR_BODY_MAX)
}

/// The message in an error object, if it has one.
pub(crate) fn json_message(v: &Value) -> Option<String> {
    let e = v.get("error").or_else(|| v.get("detail")).unwrap_or(v);
    match e {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => match o.get("message") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => {
                if std::ptr::eq(e, v) {
                    None
                } else {
                    Some(e.to_string())
                }
            }
        },
        Value::Null => None,
        other if !std::ptr::eq(other, v) => Some(other.to_string()),
        _ => None,
    }
}

/// Cuts `s` to at most `max` characters, marking the cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_from_error_bodies() {
        assert_eq!(
            message_of(r#"{"error":"model \"x\" not found, try pulling it first"}"#),
            "model \"x\" not found, try pulling it first"
        );
        assert_eq!(message_of(r#"{"error":{"message":"bad key","type":"auth"}}"#), "bad key");
        assert_eq!(message_of(r#"{"detail":"Not Found"}"#), "Not Found");
        assert_eq!(message_of(r#"{"message":"nope"}"#), "nope");
        assert_eq!(message_of("Internal Server Error\n"), "Internal Server Error");
        assert_eq!(message_of(""), "(empty body)");
        assert_eq!(message_of(r#"{"error":{"code":5}}"#), r#"{"code":5}"#);
        assert_eq!(message_of(r#"{"x":1}"#), r#"{"x":1}"#);
        assert_eq!(truncate("日本語", 2), "日本…");
        assert!(check_url("b", "http://127.0.0.1:1/v1").is_ok());
        assert!(matches!(check_url("b", "https://api.example/v1"), Err(BackendError::Config { .. })));
        assert!(check_url("b", "127.0.0.1:8080").is_err());
    }
}
