//! MCP over Streamable HTTP with an in-process Koubou: `http://127.0.0.1:PORT/mcp`.
//!
//! The port is the first argument (default 8765; 0 picks a free one). Prints
//! `listening on http://127.0.0.1:PORT/mcp` on stdout once it accepts connections. This is only
//! the `/mcp` part of `koubou serve` (no REST API, no auth/Origin middleware).
//!
//!     KOUBOU_HOME=/tmp/k cargo run -p koubou-mcp --example mcp_http -- 8765

use std::{io::Write, sync::Arc, time::Duration};

use koubou_system::{Config, Home, Koubou, StartOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL").unwrap_or_else(|_| "warn".into()))
        .init();
    let port: u16 = std::env::args().nth(1).map(|p| p.parse()).transpose()?.unwrap_or(8765);
    let home = Home::from_env();
    let cfg = Config::load(&home.config_file())?;
    let mcp = cfg.mcp.clone();
    let grace = Duration::from_secs(cfg.pool.shutdown_grace_secs);
    let koubou = Koubou::start(cfg, &home, StartOptions::default()).await?;
    let shutdown = koubou_mcp::CancellationToken::new();
    let opts = koubou_mcp::HttpOptions { shutdown: shutdown.clone(), ..Default::default() };
    let app = koubou_mcp::http_service_with(Arc::new(koubou.clone()), mcp, opts);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}/mcp", listener.local_addr()?);
    std::io::stdout().flush()?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel();
        })
        .await?;
    koubou.shutdown(Some(grace)).await;
    Ok(())
}
