//! Auth token and Origin check, applied to every route on every port.
//!
//! - Token: when configured, every request needs `Authorization: Bearer <token>`. Browsers,
//!   which cannot set that header on a page load or a WebSocket, open
//!   `/dashboard?access_token=<token>` once: a valid query token sets an HttpOnly, SameSite=Strict
//!   cookie `koubou_token` that later requests carry. Compared in constant time.
//! - Origin (DNS-rebinding and cross-site protection, as the MCP spec asks of HTTP servers): a
//!   request *without* Origin passes (non-browser clients send none); one *with* Origin passes
//!   only if it is a loopback origin, the server's own host, or listed in `allowed_origins`.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::Next,
    response::Response,
};

use crate::error::json_error;

/// What the guard checks.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    pub token: Option<String>,
    pub allowed_origins: Vec<String>,
}

/// The middleware (use with `axum::middleware::from_fn_with_state(Arc<Guard>, guard)`).
pub async fn guard(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !origin_allowed(origin, req.headers(), &g.allowed_origins) {
            return json_error(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                format!("Origin {origin:?} is not allowed; add it to server.allowed_origins to allow it"),
                Some("Origin"),
            );
        }
    }
    let mut set_cookie = None;
    if let Some(token) = g.token.as_deref().filter(|t| !t.is_empty()) {
        let ok = |t: Option<String>| t.is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
        if ok(query_token(req.uri().query())) {
            set_cookie = Some(format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"));
        } else if !ok(bearer(req.headers())) && !ok(cookie_token(req.headers())) {
            return json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong token: send Authorization: Bearer <server.auth_token> \
                 (in a browser, open /dashboard?access_token=<token> once)",
                Some("Authorization"),
            );
        }
    }
    let mut resp = next.run(req).await;
    if let Some(c) = set_cookie.and_then(|c| c.parse().ok()) {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}

const COOKIE: &str = "koubou_token";

fn cookie_token(h: &HeaderMap) -> Option<String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(COOKIE).and_then(|r| r.strip_prefix('=')))
        .map(str::to_owned)
}

fn bearer(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(|t| t.trim().to_owned())
}

fn query_token(q: Option<&str>) -> Option<String> {
    q?.split('&').find_map(|kv| kv.strip_prefix("access_token=")).map(str::to_owned)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The host part of an origin or Host header: `http://[::1]:8765` → `[::1]`, `localhost:80` → `localhost`.
fn host_of(s: &str) -> &str {
    let s = s.split_once("://").map_or(s, |(_, rest)| rest);
    let s = s.split('/').next().unwrap_or(s);
    if s.starts_with('[') {
        return s.split_once(']').map_or(s, |(h, _)| &s[..h.len() + 1]);
    }
    s.rsplit_once(':').map_or(s, |(h, _)| h)
}

fn origin_allowed(origin: &str, headers: &HeaderMap, allowed: &[String]) -> bool {
    if allowed.iter().any(|a| a.trim_end_matches('/') == origin.trim_end_matches('/')) {
        return true;
    }
    let host = host_of(origin);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare == "localhost" || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
        return true;
    }
    headers.get(header::HOST).and_then(|h| h.to_str().ok()).is_some_and(|h| host_of(h).eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "koubou.lan:8765".parse().unwrap());
        assert!(origin_allowed("http://localhost:8765", &h, &[]));
        assert!(origin_allowed("http://127.0.0.1:3000", &h, &[]));
        assert!(origin_allowed("http://[::1]:8765", &h, &[]));
        assert!(origin_allowed("http://koubou.lan:8765", &h, &[]));
        assert!(!origin_allowed("https://evil.example", &h, &[]));
        assert!(!origin_allowed("http://localhost.evil.example", &h, &[]));
        assert!(origin_allowed("https://app.example", &h, &["https://app.example".into()]));
        assert!(!origin_allowed("null", &h, &[]));
    }

    #[test]
    fn tokens() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_eq!(query_token(Some("a=1&access_token=xyz")), Some("xyz".into()));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "theme=dark; koubou_token=s3cret".parse().unwrap());
        assert_eq!(cookie_token(&h), Some("s3cret".into()));
    }
}
