//! `koubou init`, `koubou serve` and `koubou mcp`: starting the system and binding its faces.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use axum::Router;
use koubou_http::Guard;
use koubou_system::{Config, Koubou, StartOptions, config::TEMPLATE};
use tokio_util::sync::CancellationToken;

use crate::{Ctx, ServeArgs, logging};

pub fn init(ctx: &Ctx, force: bool) -> anyhow::Result<()> {
    let path = &ctx.config_path;
    if path.exists() && !force {
        bail!("{} already exists (use --force to overwrite)", path.display());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, TEMPLATE).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Applies `serve`'s flags over the config.
fn apply_flags(cfg: &mut Config, a: &ServeArgs) {
    if let Some(v) = &a.host {
        cfg.server.host = v.clone();
    }
    if let Some(v) = a.port {
        cfg.server.port = v;
    }
    if let Some(v) = a.ws_port {
        cfg.server.ws_port = v;
    }
    if let Some(v) = a.graphql_port {
        cfg.server.graphql_port = v;
    }
    if let Some(v) = a.min_workers {
        cfg.pool.min_workers = v;
    }
    if let Some(v) = a.max_workers {
        cfg.pool.max_workers = v;
    }
}

/// Holds `<home>/serve.lock` for the life of the server: one server per home, so that on start
/// every task still marked running by this home's workers is known to be orphaned. Every
/// supervisor of a child process keeps this lock's file open too, so after a crash or `kill -9`
/// a new server waits here until the old one's children are gone: recovery never runs a task
/// beside an older copy of itself.
async fn lock_home(ctx: &Ctx) -> anyhow::Result<std::fs::File> {
    use std::io::{Seek, Write};
    std::fs::create_dir_all(&ctx.home.dir).with_context(|| format!("creating {}", ctx.home.dir.display()))?;
    let path = ctx.home.dir.join("serve.lock");
    let mut f = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path)?;
    let deadline = tokio::time::Instant::now() + LEFTOVER_WAIT;
    let mut told = false;
    loop {
        if f.try_lock().is_ok() {
            f.set_len(0)?;
            f.rewind()?;
            write!(f, "{}", std::process::id())?;
            return Ok(f);
        }
        let holder: Option<u32> = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok());
        let server_alive = holder.is_some_and(is_koubou_serve);
        if server_alive || tokio::time::Instant::now() >= deadline {
            bail!(
                "another `koubou serve` is running on {} (pid {}; it holds {})",
                ctx.home.dir.display(),
                holder.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
                path.display()
            );
        }
        if !told {
            tracing::warn!("waiting for the child processes of a previous server on this home to exit");
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a new server waits for the supervisors of a dead one to finish killing its children.
const LEFTOVER_WAIT: Duration = Duration::from_secs(15);

/// Whether `pid` is a live `koubou serve` (not a supervisor holding the lock after it died).
fn is_koubou_serve(pid: u32) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
    args.contains(&&b"serve"[..]) && !args.iter().any(|a| *a == koubou_backend::supervise::SUPERVISE_ARG.as_bytes())
}

/// The routes of port 8765: REST, MCP at `/mcp`, WebSocket at `/ws`, the dashboard.
pub fn main_router(k: &Koubou, stop: &CancellationToken) -> Router {
    let cfg = k.config();
    let api: Arc<dyn koubou_system::Api> = Arc::new(k.clone());
    let mut mcp_opts = if koubou_system::config::is_loopback(&cfg.server.host) {
        koubou_mcp::HttpOptions::default()
    } else {
        // Bound beyond loopback (only allowed with an auth token): any Host may reach /mcp.
        koubou_mcp::HttpOptions::any_host()
    };
    // Open MCP response streams end when the server shuts down.
    mcp_opts.shutdown = stop.clone();
    let ws = Router::new()
        .route("/ws", axum::routing::get(koubou_live::ws_handler))
        .with_state(koubou_live::WsState::new(k.clone(), koubou_live::WsConfig::default()));
    koubou_http::router(k.clone())
        .merge(koubou_mcp::http_service_with(api, cfg.mcp.clone(), mcp_opts))
        .merge(ws)
        .merge(koubou_live::dashboard_router(k.clone()))
        .fallback(koubou_http::rest::not_found)
}

fn guarded(r: Router, guard: &Arc<Guard>) -> Router {
    r.layer(axum::middleware::from_fn_with_state(guard.clone(), koubou_http::guard))
}

async fn bind(host: &str, port: u16, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = format!(
        "{}:{port}",
        if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() }
    );
    tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr} for {what}"))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

pub async fn serve(ctx: &Ctx, args: ServeArgs) -> anyhow::Result<()> {
    let _log = logging::init(Some(&ctx.home.logs_dir()), "koubou.log");
    let lock = lock_home(ctx).await?;
    crate::supervise_children(Some(std::os::fd::AsRawFd::as_raw_fd(&lock)))?;
    let mut cfg = ctx.config()?;
    apply_flags(&mut cfg, &args);
    cfg.validate()?;
    crate::models::prepare(&cfg).await?;
    let k = Koubou::start(cfg.clone(), &ctx.home, StartOptions::default()).await?;
    let guard =
        Arc::new(Guard { token: cfg.server.auth_token.clone(), allowed_origins: cfg.server.allowed_origins.clone() });
    let stop = CancellationToken::new();
    let mut servers = Vec::new();
    let host = cfg.server.host.clone();
    let faces: Vec<(u16, &str, Router)> = vec![
        (cfg.server.port, "REST, MCP (/mcp), WebSocket (/ws) and the dashboard", main_router(&k, &stop)),
        (cfg.server.ws_port, "the WebSocket", koubou_live::ws_router(k.clone())),
        (cfg.server.graphql_port, "GraphQL", koubou_live::graphql_router(k.clone())),
    ];
    let mut main_addr = None;
    for (i, (port, what, router)) in faces.into_iter().enumerate() {
        if port == 0 && i > 0 {
            continue;
        }
        let listener = bind(&host, port, what).await?;
        let addr: SocketAddr = listener.local_addr()?;
        main_addr.get_or_insert(addr);
        tracing::info!(%addr, "{what} listening");
        let app = guarded(router, &guard).into_make_service_with_connect_info::<SocketAddr>();
        let stop = stop.clone();
        servers.push(tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await
        }));
    }
    if let Some(addr) = main_addr {
        // Tests and scripts read this line to learn the port when it was 0.
        eprintln!("koubou is serving on http://{addr} (dashboard: http://{addr}/dashboard)");
    }
    shutdown_signal().await;
    tracing::info!("shutting down: no new claims; running tasks get the grace period");
    stop.cancel();
    k.shutdown(None).await;
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    Ok(())
}

/// MCP over stdio: against a running server, or (`--embedded`) an in-process system.
pub async fn mcp(ctx: &Ctx, embedded: bool) -> anyhow::Result<()> {
    logging::init_quiet();
    let cfg = ctx.config()?;
    if embedded {
        crate::supervise_children(None)?;
        crate::models::prepare(&cfg).await?;
        let opts = StartOptions { node: format!("mcp-{}", std::process::id()), workers: true };
        let k = Koubou::start(cfg.clone(), &ctx.home, opts).await?;
        let r = koubou_mcp::serve_stdio(Arc::new(k.clone()), cfg.mcp.clone()).await;
        k.shutdown(Some(Duration::from_secs(5))).await;
        r
    } else {
        koubou_mcp::serve_stdio(Arc::new(ctx.client()?), cfg.mcp.clone()).await
    }
}
