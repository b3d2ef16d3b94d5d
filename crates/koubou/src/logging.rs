//! Logs: human lines on stderr, JSON lines in `<home>/logs/koubou.log` (each line carries the
//! worker and task fields of its span), and the guide's human-readable files beside it —
//! `mcp_server.log`, `worker_pool.log`, `workers/worker_<id>.log` ([`crate::logfiles`]).
//! `LOG_LEVEL` (error, warn, info, debug, trace, or a full `tracing` filter, any case) sets the
//! detail of all of them; the default is `info`.

use std::path::Path;

use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt, util::SubscriberInitExt};

/// Keeps the file writer flushing until dropped (hold it for the life of `main`).
pub struct LogGuard(
    #[allow(dead_code)] Option<tracing_appender::non_blocking::WorkerGuard>,
    #[allow(dead_code)] Option<crate::logfiles::FilesGuard>,
);

fn filter() -> EnvFilter {
    let level = std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into()).to_ascii_lowercase();
    EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Logs to stderr and, when `logs_dir` is given, to a JSON file and the human-readable files in it.
pub fn init(logs_dir: Option<&Path>, file_name: &str) -> LogGuard {
    let stderr = fmt::layer().with_writer(std::io::stderr).with_target(false);
    let (file, guard, files, files_guard) = match logs_dir.and_then(|d| std::fs::create_dir_all(d).ok().map(|_| d)) {
        Some(dir) => {
            let (w, g) = tracing_appender::non_blocking(tracing_appender::rolling::never(dir, file_name));
            let (files, fg) = crate::logfiles::layer(dir);
            (Some(fmt::layer().json().with_writer(w)), Some(g), Some(files), Some(fg))
        }
        None => (None, None, None, None),
    };
    let _ = tracing_subscriber::registry().with(filter()).with(stderr).with(file).with(files).try_init();
    LogGuard(guard, files_guard)
}

/// Logs to stderr only, at warnings unless `LOG_LEVEL` says otherwise (for client commands and
/// stdio MCP, whose stdout is not ours).
pub fn init_quiet() {
    let level = std::env::var("LOG_LEVEL").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::registry()
        .with(EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("warn")))
        .with(fmt::layer().with_writer(std::io::stderr).with_target(false))
        .try_init();
}
