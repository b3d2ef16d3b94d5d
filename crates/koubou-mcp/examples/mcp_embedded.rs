//! MCP over stdio with an in-process Koubou (what `koubou mcp --embedded` does).
//!
//! Reads `$KOUBOU_HOME/koubou.toml` (default `./.koubou`), starts the system with its worker
//! pool, serves MCP on stdin/stdout until the client closes it, then shuts the pool down
//! gracefully (running tasks finish, or go back to the queue for the next start).
//! Logs go to stderr (stdout carries the protocol).
//!
//!     KOUBOU_HOME=/tmp/k cargo run -p koubou-mcp --example mcp_embedded

use std::{sync::Arc, time::Duration};

use koubou_system::{Config, Home, Koubou, StartOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL").unwrap_or_else(|_| "warn".into()))
        .init();
    let home = Home::from_env();
    let cfg = Config::load(&home.config_file())?;
    let mcp = cfg.mcp.clone();
    let grace = Duration::from_secs(cfg.pool.shutdown_grace_secs);
    let opts = StartOptions { node: format!("mcp-{}", std::process::id()), workers: true, ..StartOptions::default() };
    let koubou = Koubou::start(cfg, &home, opts).await?;
    let result = koubou_mcp::serve_stdio(Arc::new(koubou.clone()), mcp).await;
    koubou.shutdown(Some(grace)).await;
    result
}
