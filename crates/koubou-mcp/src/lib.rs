//! Koubou's MCP server: how a coding agent (Claude Code, "the master") hands tasks to Koubou's
//! local LLM craftsmen through the Model Context Protocol.
//!
//! The server is written against `Arc<dyn koubou_api::Api>`, so the same tools work on an
//! in-process system (`koubou mcp --embedded`) and on a running `koubou serve` reached over HTTP
//! (`koubou mcp` with `koubou_client::Client`).
//!
//! Two transports:
//! - [`serve_stdio`]: MCP over stdin/stdout, for `koubou mcp`.
//! - [`http_service`]: an axum [`Router`](axum::Router) answering MCP's Streamable HTTP at `/mcp`,
//!   for `koubou serve` to merge into its own router. It is stateless: every POST is served on
//!   its own (revision 2026-07-28 needs no session, and `initialize`-era clients get no
//!   `Mcp-Session-Id`, so nothing is kept per client and a restart of the server loses nothing).
//!
//! Both speak every revision rmcp knows: 2026-07-28 (`server/discover`, as Claude Code 2.1.328
//! opens) and the `initialize` handshake of 2025-11-25 and older (the MCP Python SDK, the
//! Inspector). Unknown methods get a JSON-RPC error at once, never silence.
//!
//! Tools ([`tools`]): `delegate_task`, `get_task`, `wait_for_task`, `list_tasks`, `cancel_task`,
//! `system_status`. Every failure the caller can act on (bad argument, unknown task, a file
//! outside the allowed folders) is a tool result with `isError: true` and a message naming the
//! field, never a protocol error. No call blocks longer than [`McpConfig::max_wait_secs`]; while
//! one waits it sends `notifications/progress` every [`McpConfig::progress_every_secs`] (and as
//! the answer streams), when the caller asked for progress. A task never depends on the
//! connection that submitted it: a call that is cancelled or whose client goes away only stops
//! waiting.
//!
//! Security on HTTP: in `koubou serve`, `Host`, `Origin` and the bearer token are checked for
//! every route of every port by one authority, `koubou-http`'s guard, before a request reaches
//! `/mcp`; the server turns rmcp's own `Host` check off ([`HttpOptions::any_host`]) so that
//! `/mcp` accepts exactly what every other route accepts (rmcp's list compares names as written
//! and would refuse, say, `localhost.` or `127.0.0.2`, which the guard allows everywhere else).
//! rmcp's `Origin` allow-list is always off (the guard's applies). Used on its own, without the
//! guard in front, [`http_service`] keeps rmcp's loopback `Host` check; see [`HttpOptions`].

mod context;
mod server;
pub mod tools;
mod view;

use std::sync::Arc;

use koubou_api::{Api, settings::McpConfig};
use rmcp::{
    ServiceExt,
    transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::never::NeverSessionManager,
    },
};
pub use server::KoubouMcp;
pub use tokio_util::sync::CancellationToken;

/// Serves MCP over stdin/stdout until the client closes stdin (or sends EOF).
///
/// Returns when the client goes away. Tasks it submitted keep running in the system behind
/// `api`; with an in-process system the caller should then shut it down gracefully
/// (`Koubou::shutdown`) so running tasks finish or go back to the queue.
///
/// Logs must not go to stdout (it carries the protocol): send tracing to stderr or a file.
pub async fn serve_stdio(api: Arc<dyn Api>, cfg: McpConfig) -> anyhow::Result<()> {
    let running = KoubouMcp::new(api, cfg)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| anyhow::anyhow!("MCP over stdio: the client did not complete the handshake: {e}"))?;
    let reason = running.waiting().await.map_err(|e| anyhow::anyhow!("MCP over stdio: {e}"))?;
    tracing::info!(?reason, "MCP client on stdio went away");
    Ok(())
}

/// How the HTTP service checks requests beyond what `koubou-http` does.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// `Host` header values accepted (names or `name:port`; a name alone matches any port).
    /// Empty accepts any `Host`. Default: `localhost`, `127.0.0.1`, `::1`, rmcp's defence
    /// against DNS rebinding for a server on loopback. A server bound to another address (which
    /// Koubou allows only with an auth token) should pass its host names, or an empty list.
    pub allowed_hosts: Vec<String>,
    /// Cancelled when the server shuts down: ends open SSE streams so a graceful shutdown does
    /// not wait on them.
    pub shutdown: CancellationToken,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            shutdown: CancellationToken::new(),
        }
    }
}

impl HttpOptions {
    /// Accepts any `Host` header: for a router behind a guard that checks `Host` itself (as
    /// `koubou serve` puts `koubou-http`'s guard in front of every port).
    pub fn any_host() -> Self {
        HttpOptions { allowed_hosts: vec![], ..HttpOptions::default() }
    }
}

/// MCP over Streamable HTTP at `/mcp`, with [`HttpOptions::default`] (loopback `Host` only).
pub fn http_service(api: Arc<dyn Api>, cfg: McpConfig) -> axum::Router {
    http_service_with(api, cfg, HttpOptions::default())
}

/// MCP over Streamable HTTP at `/mcp` (POST for requests; GET answers 405 since the service is
/// stateless; DELETE likewise). Merge it into the server's router.
pub fn http_service_with(api: Arc<dyn Api>, cfg: McpConfig, opts: HttpOptions) -> axum::Router {
    let handler = KoubouMcp::new(api, cfg).remote();
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(false)
        .with_allowed_hosts(opts.allowed_hosts)
        .disable_allowed_origins()
        .with_cancellation_token(opts.shutdown);
    let service =
        StreamableHttpService::new(move || Ok(handler.clone()), Arc::new(NeverSessionManager::default()), config);
    axum::Router::new().route_service("/mcp", service)
}
