//! The settings faces read: `[server]` (where and how they listen) and `[mcp]` (how MCP tools
//! behave). They are sections of `koubou.toml`, read by `koubou_system::Config`, and live here
//! so that a face needs nothing of the system to know them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[server]`: where the faces listen.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind. Anything but loopback requires `auth_token`.
    pub host: String,
    /// REST API, MCP over HTTP, dashboard, metrics, and WebSocket at `/ws`.
    pub port: u16,
    /// The seed's WebSocket port (0 = off).
    pub ws_port: u16,
    /// The seed's GraphQL port (0 = off).
    pub graphql_port: u16,
    /// Bearer token required on every request when set.
    pub auth_token: Option<String>,
    /// Browser origins allowed besides the server's own (e.g. "http://localhost:3000").
    pub allowed_origins: Vec<String>,
    /// `Host` names (or `name:port`) the server answers to besides its loopback names and
    /// addresses; any other `Host` is refused (DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// Longest a client may take to send a request's headers (and to start the next one on a
    /// kept-alive connection), in seconds; at most 30.
    pub header_read_timeout_secs: u64,
    /// Longest a client may take to send a request's body, in seconds.
    pub body_read_timeout_secs: u64,
    /// HTTP connections open at once on one port (WebSockets count in `limits.max_ws_connections`
    /// once upgraded).
    pub max_connections: usize,
    /// Longest a `"sync": true` submission waits for its result, in seconds.
    pub sync_wait_secs: u64,
    /// URL clients (`koubou submit`, `koubou mcp`) use to reach a running server.
    pub url: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8765,
            ws_port: 8766,
            graphql_port: 8767,
            auth_token: None,
            allowed_origins: vec![],
            allowed_hosts: vec![],
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            max_connections: 512,
            sync_wait_secs: 120,
            url: None,
        }
    }
}

impl ServerConfig {
    /// The URL a local client uses to reach this server.
    pub fn client_url(&self) -> String {
        if let Some(u) = &self.url {
            return u.trim_end_matches('/').to_owned();
        }
        let host = match self.host.as_str() {
            "0.0.0.0" | "::" | "" => "127.0.0.1",
            h => h,
        };
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
        format!("http://{host}:{}", self.port)
    }
}

/// `[mcp]`: how MCP tools behave.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct McpConfig {
    /// Longest any tool call blocks, in seconds (MCP clients time out; keep it well under a minute).
    pub max_wait_secs: u64,
    /// Longest answer (or partial answer, or error) a tool result carries, in characters; the
    /// rest is read with `get_task` and an `offset`. Claude Code refuses tool results over
    /// 25,000 tokens by default: 16,000 characters stay under it even for text that costs a
    /// token per character (CJK), with room for the rest of the result.
    pub max_result_chars: usize,
    /// How often a waiting tool call sends a progress notification, in seconds.
    pub progress_every_secs: u64,
    /// Folders whose files `delegate_task` may attach as context (empty: the working directory
    /// over stdio, nothing over HTTP). `/proc`, `/sys` and `/dev` are never read.
    pub allowed_paths: Vec<PathBuf>,
    /// Largest total size of attached context files, in bytes.
    pub max_context_bytes: usize,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            max_wait_secs: 25,
            max_result_chars: 16_000,
            progress_every_secs: 5,
            allowed_paths: vec![],
            max_context_bytes: 256 << 10,
        }
    }
}
