//! `koubou init`, `koubou serve` and `koubou mcp`: starting the system and binding its faces.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use axum::Router;
use koubou_api::Api;
use koubou_http::{BodyLimit, Guard, Listen, RateLimiter};
use koubou_live::{WsConfig, WsLimits};
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

/// `--ws-port` / `--graphql-port`: a number (0 = off), or `any` for a free port (announced on
/// stderr; the config file has no way to say this, since a user needs a port they know).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortFlag {
    Number(u16),
    Any,
}

impl std::str::FromStr for PortFlag {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "any" {
            return Ok(PortFlag::Any);
        }
        s.parse().map(PortFlag::Number).map_err(|_| format!("{s:?} is not a port (0-65535, 0 = off) or `any`"))
    }
}

/// The port to bind for a face whose config port is `configured` (0 = off), given its flag.
fn face_port(configured: u16, flag: Option<PortFlag>) -> Option<u16> {
    match flag {
        Some(PortFlag::Any) => Some(0),
        Some(PortFlag::Number(0)) => None,
        Some(PortFlag::Number(p)) => Some(p),
        None => (configured != 0).then_some(configured),
    }
}

/// Applies `serve`'s flags over the config.
fn apply_flags(cfg: &mut Config, a: &ServeArgs) {
    if let Some(v) = &a.host {
        cfg.server.host = v.clone();
    }
    if let Some(v) = a.port {
        cfg.server.port = v;
    }
    if let Some(PortFlag::Number(v)) = a.ws_port {
        cfg.server.ws_port = v;
    }
    if let Some(PortFlag::Number(v)) = a.graphql_port {
        cfg.server.graphql_port = v;
    }
    if let Some(v) = a.min_workers {
        cfg.pool.min_workers = v;
    }
    if let Some(v) = a.max_workers {
        cfg.pool.max_workers = v;
    }
    if let Some(v) = a.workers {
        cfg.pool.max_workers = v;
        cfg.pool.min_workers = cfg.pool.min_workers.min(v);
    }
}

/// Holds `<home>/serve.lock` for the life of the server (node `serve`). Other nodes know this
/// one by its registration in the queue, which lasts a TTL and is renewed while it runs (see
/// `koubou_system::StartOptions::node`); the lock stays for what a registration cannot do.
/// Every supervisor of a child process keeps this lock's file open, so after a crash or
/// `kill -9` a new server waits here until the old one's children are gone: recovery never runs
/// a task beside an older copy of itself. And the kernel drops the lock the moment its holders
/// die, so a second `koubou serve` on the same home is refused at once while the first lives,
/// yet a crashed one is replaced at once, without waiting out its registration's TTL: holding
/// the lock, this run takes over that registration and requeues the node's running tasks.
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

/// The routes of port 8765: REST, MCP at `/mcp`, WebSocket at `/ws`, the dashboard; `ws` are
/// the port's WebSocket limits, shared by `/ws` and `/dashboard/ws`.
pub fn main_router(k: &Koubou, stop: &CancellationToken, ws: WsLimits) -> Router {
    let cfg = k.config();
    let api: Arc<dyn Api> = Arc::new(k.clone());
    // The guard in front of every port checks Host for /mcp as for every other route; rmcp's
    // own check would only disagree with it. Open MCP response streams end on shutdown.
    let mcp_opts = koubou_mcp::HttpOptions { shutdown: stop.clone(), ..koubou_mcp::HttpOptions::any_host() };
    let ws_cfg = || WsConfig { limits: Some(ws.clone()), ..WsConfig::default() };
    let ws_route = Router::new()
        .route("/ws", axum::routing::get(koubou_live::ws_handler))
        .with_state(koubou_live::WsState::new(api.clone(), ws_cfg()));
    koubou_http::router(api.clone())
        .merge(koubou_mcp::http_service_with(api.clone(), cfg.mcp.clone(), mcp_opts))
        .merge(ws_route)
        .merge(koubou_live::dashboard_router_with(api, ws_cfg()))
        .fallback(koubou_http::rest::not_found)
}

async fn bind(host: &str, port: u16, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = format!(
        "{}:{port}",
        if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() }
    );
    tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr} for {what}"))
}

pub async fn shutdown_signal() {
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
    let open_home = ctx.prepare_home()?;
    let _log = logging::init(Some(&ctx.home.logs_dir()), "koubou.log");
    if let Some(w) = open_home {
        tracing::warn!("{w}");
    }
    let lock = lock_home(ctx).await?;
    crate::supervise_children(Some(std::os::fd::AsRawFd::as_raw_fd(&lock)))?;
    let mut cfg = ctx.config()?;
    apply_flags(&mut cfg, &args);
    args.queue.apply(&mut cfg)?;
    cfg.validate()?;
    crate::models::prepare(&cfg).await?;
    // Bind every port before starting anything, so a port in use fails the start at once.
    let host = cfg.server.host.clone();
    let main_l = bind(&host, cfg.server.port, "REST, MCP (/mcp), WebSocket (/ws) and the dashboard").await?;
    let ws_l = match face_port(cfg.server.ws_port, args.ws_port) {
        Some(p) => Some(bind(&host, p, "the WebSocket").await?),
        None => None,
    };
    let gql_l = match face_port(cfg.server.graphql_port, args.graphql_port) {
        Some(p) => Some(bind(&host, p, "GraphQL").await?),
        None => None,
    };
    let opts = StartOptions { node: args.node_id.clone(), ..StartOptions::default() };
    let k = Koubou::start(cfg.clone(), &ctx.home, opts).await?;
    let stop = CancellationToken::new();
    let faces = Faces {
        cfg: &cfg,
        rate: RateLimiter::new(cfg.limits.rate_limit_per_sec, cfg.limits.rate_limit_burst).map(Arc::new),
        body: BodyLimit {
            max_bytes: cfg.limits.body_bytes(),
            read_timeout: Duration::from_secs(cfg.server.body_read_timeout_secs),
        },
        listen: Listen {
            header_read_timeout: Duration::from_secs(cfg.server.header_read_timeout_secs),
            max_connections: cfg.server.max_connections,
        },
        stop: stop.clone(),
    };
    // Each port has its own WebSocket limits, shared by the WebSocket routes it serves.
    let ws_limits = || WsLimits::from_limits(&cfg.limits);
    let mut servers = Vec::new();
    // Tests and scripts read these lines to learn the ports; the main one comes last, once all
    // are listening.
    if let Some(l) = ws_l {
        let cfg = WsConfig { limits: Some(ws_limits()), ..WsConfig::default() };
        let addr = faces.start(l, koubou_live::ws_router_with(Arc::new(k.clone()), cfg), &mut servers)?;
        eprintln!("koubou WebSocket is serving on ws://{addr}");
    }
    if let Some(l) = gql_l {
        let addr = faces.start(l, koubou_live::graphql_router_with(Arc::new(k.clone()), ws_limits()), &mut servers)?;
        eprintln!("koubou GraphQL is serving on http://{addr}/graphql");
    }
    let addr = faces.start(main_l, main_router(&k, &stop, ws_limits()), &mut servers)?;
    eprintln!("koubou is serving on http://{addr} (dashboard: http://{addr}/dashboard)");
    shutdown_signal().await;
    tracing::info!("shutting down: no new claims; running tasks get the grace period");
    stop.cancel();
    k.shutdown(None).await;
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    Ok(())
}

/// What every port is served with.
struct Faces<'a> {
    cfg: &'a Config,
    /// One for all ports: a client's requests count together.
    rate: Option<Arc<RateLimiter>>,
    body: BodyLimit,
    listen: Listen,
    stop: CancellationToken,
}

impl Faces<'_> {
    /// Serves `router` on `listener` behind its own guard (its own origin is its own port).
    fn start(
        &self,
        listener: tokio::net::TcpListener,
        router: Router,
        servers: &mut Vec<tokio::task::JoinHandle<()>>,
    ) -> anyhow::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        let guard = Guard::new(&self.cfg.server, addr, self.rate.clone()).map_err(anyhow::Error::msg)?;
        let app = koubou_http::protect(router, Arc::new(guard), self.body);
        tracing::info!(%addr, "listening");
        servers.push(tokio::spawn(koubou_http::serve(listener, app, self.listen, self.stop.clone())));
        Ok(addr)
    }
}

/// MCP over stdio: against a running server, or (`--embedded`) an in-process system.
pub async fn mcp(ctx: &Ctx, embedded: bool, queue: &crate::QueueArgs) -> anyhow::Result<()> {
    logging::init_quiet();
    if !embedded && queue.given() {
        anyhow::bail!(
            "--queue and --queue-type need --embedded (so does --store): without it, `koubou mcp` talks \
             to a running `koubou serve` (KOUBOU_URL), which has its own queue"
        );
    }
    let mut cfg = ctx.config()?;
    queue.apply(&mut cfg)?;
    if embedded {
        if let Some(w) = ctx.prepare_home()? {
            tracing::warn!("{w}");
        }
        crate::supervise_children(None)?;
        crate::models::prepare(&cfg).await?;
        let opts =
            StartOptions { node: format!("mcp-{}", std::process::id()), workers: true, ..StartOptions::default() };
        let k = Koubou::start(cfg.clone(), &ctx.home, opts).await?;
        let r = koubou_mcp::serve_stdio(Arc::new(k.clone()), cfg.mcp.clone()).await;
        k.shutdown(Some(Duration::from_secs(5))).await;
        r
    } else {
        koubou_mcp::serve_stdio(Arc::new(ctx.client()?), cfg.mcp.clone()).await
    }
}
