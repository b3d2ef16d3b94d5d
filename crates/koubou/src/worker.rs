//! `koubou worker`: a worker node — the worker pool and the backends of its own koubou.toml,
//! over a queue shared with the controllers (`koubou serve --queue redis://…`, or RabbitMQ
//! dispatching a Redis store: `--queue amqp://… --store redis://…`), without faces.

use anyhow::bail;
use clap::Args;
use koubou_system::{Koubou, StartOptions};

use crate::{Ctx, QueueArgs, logging};

#[derive(Args, Clone)]
pub struct WorkerArgs {
    /// This node's name in the queue's registry; its workers are `<node-id>/<n>`.
    #[arg(long, value_name = "ID", value_parser = node_id)]
    node_id: String,
    #[command(flatten)]
    queue: QueueArgs,
    /// The task kinds this node takes, space- or comma-separated (default: every kind its
    /// koubou.toml routes). Each needs a route here (`general` and `code` always have one).
    #[arg(long, value_name = "KINDS")]
    capabilities: Option<String>,
    /// The tags this node declares (space- or comma-separated): it takes tasks whose every tag is
    /// among them, and untagged ones (default: `[pool] tags`; with neither, none: a worker node
    /// takes only untagged tasks, so that a tagged one goes only to nodes that declare its tags).
    #[arg(long, value_name = "TAGS")]
    tags: Option<String>,
    #[arg(long)]
    min_workers: Option<usize>,
    #[arg(long)]
    max_workers: Option<usize>,
}

/// A node id: non-empty, without `/` (worker ids are `<node-id>/<n>`) or whitespace.
pub fn node_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || s.chars().any(|c| c == '/' || c.is_whitespace() || c.is_control()) {
        return Err(format!("{s:?}: a node id is 1 to 64 characters, without '/' or spaces"));
    }
    Ok(s.to_owned())
}

/// `general code`, `general,code` → its words.
fn words(s: &str) -> Vec<String> {
    s.split([',', ' ', '\t']).map(str::trim).filter(|w| !w.is_empty()).map(str::to_owned).collect()
}

pub async fn run(ctx: &Ctx, a: WorkerArgs) -> anyhow::Result<()> {
    let open_home = ctx.prepare_home()?;
    let _log = logging::init(Some(&ctx.home.logs_dir()), "koubou.log");
    if let Some(w) = open_home {
        tracing::warn!("{w}");
    }
    crate::supervise_children(None)?;
    let mut cfg = ctx.config()?;
    a.queue.apply(&mut cfg)?;
    if let Some(v) = a.min_workers {
        cfg.pool.min_workers = v;
    }
    if let Some(v) = a.max_workers {
        cfg.pool.max_workers = v;
        cfg.pool.min_workers = cfg.pool.min_workers.min(v.max(1));
    }
    if cfg.pool.max_workers == 0 {
        bail!("--max-workers (pool.max_workers) must be at least 1 on a worker node");
    }
    cfg.pool.tags = match &a.tags {
        Some(t) => Some(words(t)),
        None => Some(cfg.pool.tags.take().unwrap_or_default()),
    };
    let kinds = a.capabilities.as_deref().map(words);
    if kinds.as_ref().is_some_and(Vec::is_empty) {
        bail!("--capabilities names no task kind (e.g. --capabilities \"general code\")");
    }
    cfg.validate()?;
    crate::models::prepare(&cfg).await?;
    let opts = StartOptions { node: a.node_id.clone(), workers: true, shared_only: true, kinds };
    let k = Koubou::start(cfg, &ctx.home, opts).await?;
    // Tests and scripts wait for this line.
    eprintln!("koubou worker {} is running", a.node_id);
    crate::serve::shutdown_signal().await;
    tracing::info!(node = %a.node_id, "stopping: no new claims; running tasks get the grace period");
    k.shutdown(None).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_and_lists() {
        assert_eq!(node_id("worker-01").unwrap(), "worker-01");
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(node_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(words("general code"), ["general", "code"]);
        assert_eq!(words(" general,code ,,"), ["general", "code"]);
    }
}
