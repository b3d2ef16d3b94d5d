//! The guard in front of every route of every port: `Host`, `Origin`, the per-client rate
//! limit and the auth token, checked in that order before anything else runs (a refused
//! WebSocket upgrade gets its 403 instead of the 101).
//!
//! - Host (DNS rebinding): the request's `Host` (or its target's authority) must be a name the
//!   listener answers to ([`HostRules`]: loopback names and addresses on a loopback bind, plus
//!   `server.allowed_hosts`). A page on `evil.example` whose name was rebound to 127.0.0.1 sends
//!   `Host: evil.example` and gets 403.
//! - Origin (cross-site): a request without `Origin` passes (curl, Claude Code, the MCP
//!   Inspector send none, and browsers send one on every POST and WebSocket). One with an
//!   `Origin` passes only if it is this listener's own origin — `http://`, the host the request
//!   was sent to, this listener's port — or is listed in `server.allowed_origins`. So a page on
//!   another local port is foreign, and the dashboard on 8765 is foreign to GraphQL on 8767.
//! - Rate: with `limits.rate_limit_per_sec` set, [`RateLimiter`] per client IP; over it, 429.
//! - Token: when configured, every request needs `Authorization: Bearer <token>`. Browsers,
//!   which cannot set that header on a page load or a WebSocket, open
//!   `/dashboard?access_token=<token>` once: a valid query token sets an HttpOnly, SameSite=Strict
//!   cookie `koubou_token` that later requests carry. Compared in constant time.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use koubou_api::settings::ServerConfig;

use crate::{
    authority::{Authority, HostRules, Origin, parse_allowed_origins, parse_authority, parse_origin},
    error::{Refusal, json_error},
    rate::RateLimiter,
};

/// What the guard of one listener checks.
#[derive(Clone, Debug)]
pub struct Guard {
    token: Option<String>,
    hosts: HostRules,
    origins: Vec<Origin>,
    /// The listener's port: part of its own origin.
    port: u16,
    rate: Option<Arc<RateLimiter>>,
}

impl Guard {
    /// The guard of the listener bound at `local` for `server`'s settings; `rate` is shared by
    /// every listener so a client's requests count together. Fails on a malformed
    /// `allowed_hosts` or `allowed_origins` entry, naming it.
    pub fn new(server: &ServerConfig, local: SocketAddr, rate: Option<Arc<RateLimiter>>) -> Result<Guard, String> {
        Ok(Guard {
            token: server.auth_token.clone().filter(|t| !t.is_empty()),
            hosts: HostRules::new(&server.host, local.ip(), &server.allowed_hosts)?,
            origins: parse_allowed_origins(&server.allowed_origins)?,
            port: local.port(),
            rate,
        })
    }

    /// A guard for a listener on loopback `port` with no token and nothing else allowed.
    pub fn loopback(port: u16) -> Guard {
        let local = SocketAddr::from(([127, 0, 0, 1], port));
        Guard::new(&ServerConfig::default(), local, None).expect("the defaults are valid")
    }

    pub fn with_token(mut self, token: &str) -> Guard {
        self.token = Some(token.to_owned()).filter(|t| !t.is_empty());
        self
    }

    pub fn with_allowed_origins(mut self, origins: &[String]) -> Result<Guard, String> {
        self.origins = parse_allowed_origins(origins)?;
        Ok(self)
    }

    /// The authority the request was sent to, if this listener answers to it.
    fn check_host(&self, req: &Request) -> Result<Authority, Refusal> {
        let refuse = |msg: String| Err(Refusal::new(StatusCode::FORBIDDEN, "forbidden_host", "Host", msg));
        let hosts: Vec<&HeaderValue> = req.headers().get_all(header::HOST).iter().collect();
        if hosts.len() > 1 {
            return refuse("more than one Host header".into());
        }
        let target = req.uri().authority().map(|a| a.as_str());
        let mut seen = None;
        for value in target.into_iter().chain(hosts.iter().map(|h| h.to_str().unwrap_or("\u{fffd}"))) {
            let shown = shorten(value);
            let a = match parse_authority(value) {
                Ok(a) => a,
                Err(why) => return refuse(format!("Host {shown:?} is not host[:port]: {why}")),
            };
            if !self.hosts.allows(&a) {
                return refuse(format!(
                    "Host {shown:?} is not a name this server answers to (its loopback names and addresses, \
                     and server.allowed_hosts); add it to server.allowed_hosts to allow it"
                ));
            }
            // The target's authority, when there is one, is the one that counts (RFC 9112 §3.2.2).
            seen.get_or_insert(a);
        }
        seen.map_or_else(|| refuse("a Host header is required".into()), Ok)
    }

    fn check_origin(&self, headers: &HeaderMap, host: &Authority) -> Result<(), Refusal> {
        let mut values = headers.get_all(header::ORIGIN).iter();
        let Some(value) = values.next() else { return Ok(()) };
        let refuse = |msg: String| Err(Refusal::new(StatusCode::FORBIDDEN, "forbidden_origin", "Origin", msg));
        if values.next().is_some() {
            return refuse("more than one Origin header".into());
        }
        let raw = value.to_str().unwrap_or("\u{fffd}");
        let shown = shorten(raw);
        let origin = match parse_origin(raw) {
            Ok(o) => o,
            Err(why) => return refuse(format!("Origin {shown:?} is not allowed: {why}")),
        };
        let own = Origin::http(host.host.clone(), self.port);
        if origin == own || self.origins.contains(&origin) {
            return Ok(());
        }
        refuse(format!(
            "Origin {shown:?} is not allowed: this port's own origin is {own_s}; add it to \
             server.allowed_origins to allow it",
            own_s = format_args!("http://{}:{}", own.host, self.port)
        ))
    }
}

/// A header value as quoted in an error message: at most 100 characters.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(100) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// The middleware (use with `axum::middleware::from_fn_with_state(Arc<Guard>, guard)`).
pub async fn guard(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let host = match g.check_host(&req) {
        Ok(h) => h,
        Err(refused) => return refused.into_response(),
    };
    if let Err(refused) = g.check_origin(req.headers(), &host) {
        return refused.into_response();
    }
    if let Some(rate) = &g.rate
        && let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>()
        && let Err(refused) = rate.check(peer.ip())
    {
        return refused.into_response();
    }
    let mut set_cookie = None;
    if let Some(token) = g.token.as_deref() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn origin_ok(g: &Guard, host: &str, origin: &str) -> bool {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, origin.parse().unwrap());
        g.check_origin(&h, &parse_authority(host).unwrap()).is_ok()
    }

    #[test]
    fn own_origin_is_per_listener() {
        let g = Guard::loopback(8767);
        assert!(origin_ok(&g, "127.0.0.1:8767", "http://127.0.0.1:8767"));
        assert!(origin_ok(&g, "localhost:8767", "http://LOCALHOST:8767"));
        assert!(origin_ok(&g, "[::1]:8767", "http://[::1]:8767"));
        // Another port of the same host, the same port of another host, another scheme.
        assert!(!origin_ok(&g, "127.0.0.1:8767", "http://127.0.0.1:8765"));
        assert!(!origin_ok(&g, "127.0.0.1:8767", "http://localhost:8767"));
        assert!(!origin_ok(&g, "127.0.0.1:8767", "https://127.0.0.1:8767"));
        assert!(!origin_ok(&g, "127.0.0.1:8767", "http://127.0.0.1:3000"));
        assert!(!origin_ok(&g, "127.0.0.1:8767", "null"));
        assert!(!origin_ok(&g, "127.0.0.1:8767", "https://evil.example"));
        // The Host's port is not the listener's (a forged or forwarded Host): the listener's counts.
        assert!(!origin_ok(&g, "127.0.0.1:9999", "http://127.0.0.1:9999"));
        let g = g.with_allowed_origins(&["http://localhost:3000".into()]).unwrap();
        assert!(origin_ok(&g, "127.0.0.1:8767", "http://localhost:3000"));
        assert!(!origin_ok(&g, "127.0.0.1:8767", "http://localhost:3001"));
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
