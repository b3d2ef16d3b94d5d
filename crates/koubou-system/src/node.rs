//! This process as a node of the queue: registered with a TTL at start, renewed while it runs,
//! removed at a clean stop — and, meanwhile, the sweep that finds nodes whose registration ran
//! out (a crashed `koubou mcp --embedded`, a node on another machine) and the queue's
//! housekeeping, which requeues running tasks whose lease ran out, so that they are recovered
//! even where no worker claims (a controller alone).
//!
//! A silent node's tasks are requeued when their leases run out, not when its registration
//! does: the node may be alive but cut off, still running them, and its workers stop an attempt
//! only once its lease has run out by their own count. Recovering them at once would let a
//! second attempt run beside the first. (A node's next run on the same host recovers what the
//! last one left running at once: that run is known to be gone.)

use std::{sync::Arc, time::Duration};

use koubou_backend::Router;
use koubou_queue::{Dispatch, Node, NodeBackend, NodeLoad, Nodes, QueueError};
use tokio_util::sync::CancellationToken;

/// The registration of this run of the node, and the task keeping it.
pub(crate) struct Membership {
    me: Node,
    ttl: Duration,
    registry: Arc<dyn Nodes>,
    stop: CancellationToken,
}

impl Membership {
    /// Registers `me` for `ttl`. A live registration of the same node from this host is taken
    /// over: the caller holds the node's lock on this host (`koubou serve`), or names the node
    /// after its own process (`mcp-<pid>`, `run-<pid>`), so that run is known to be over. One
    /// from another host is refused ([`QueueError::NodeTaken`]).
    pub async fn join(registry: Arc<dyn Nodes>, me: Node, ttl: Duration) -> Result<Membership, QueueError> {
        match registry.register(&me, ttl, None).await {
            Err(QueueError::NodeTaken(held)) if held.host == me.host => {
                tracing::warn!(node = %me.id, pid = held.pid, "took over the registration of an earlier run of this node");
                registry.register(&me, ttl, Some(held.instance)).await?
            }
            r => r?,
        }
        Ok(Membership { me, ttl, registry, stop: CancellationToken::new() })
    }

    /// Renews the registration at once and then every third of its TTL, each time with the
    /// node's `load` now (its heartbeat), and sweeps expired nodes, requeueing their running
    /// tasks through `dispatch`, until [`Membership::leave`].
    pub fn keep(&self, dispatch: Arc<dyn Dispatch>, load: impl Fn() -> NodeLoad + Send + 'static) {
        let (mut me, ttl, registry, stop) = (self.me.clone(), self.ttl, self.registry.clone(), self.stop.clone());
        tokio::spawn(async move {
            loop {
                me.load = load();
                renew(&*registry, &me, ttl).await;
                tokio::select! {
                    _ = tokio::time::sleep(ttl / 3) => {}
                    _ = stop.cancelled() => return,
                }
                sweep(&*registry, &*dispatch, &me.id).await;
            }
        });
    }

    /// Stops renewing and removes the registration.
    pub async fn leave(&self) {
        self.stop.cancel();
        if let Err(e) = self.registry.deregister(&self.me.id, self.me.instance).await {
            tracing::warn!(error = %e, "could not deregister this node");
        }
    }
}

async fn renew(registry: &dyn Nodes, me: &Node, ttl: Duration) {
    match registry.renew(me, ttl).await {
        Ok(true) => {}
        // Silent past its TTL (a stalled process): its tasks may have been requeued already;
        // its workers' leases say whether they still hold them. It registers again.
        Ok(false) => {
            tracing::error!(node = %me.id, "this node's registration ran out; registering again");
            if let Err(e) = registry.register(me, ttl, None).await {
                tracing::error!(error = %e, "could not register this node again");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not renew this node's registration"),
    }
}

async fn sweep(registry: &dyn Nodes, dispatch: &dyn Dispatch, me: &str) {
    match registry.expire().await {
        Ok(dead) => {
            for node in dead.iter().filter(|n| n.id != me) {
                tracing::warn!(node = %node.id, host = %node.host, "node stopped answering: its running tasks are requeued as their leases run out");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not look for dead nodes"),
    }
    if let Err(e) = dispatch.housekeep().await {
        tracing::warn!(error = %e, "could not requeue tasks whose lease ran out");
    }
}

/// What a node says of its backends: each one's name, provider and the models the
/// configuration names for it (its default model, then its routes' models), without repeats.
pub(crate) fn backends(router: &Router) -> Vec<NodeBackend> {
    router
        .backends()
        .map(|b| {
            let routed = router.types().values().filter_map(|r| {
                let first_fallback = r.fallback.first().is_some_and(|f| f == b.name());
                if r.backend == b.name() {
                    r.model.as_deref()
                } else if first_fallback {
                    r.fallback_model.as_deref()
                } else {
                    None
                }
            });
            let mut models: Vec<String> = Vec::new();
            for m in std::iter::once(b.default_model()).chain(routed) {
                if !m.is_empty() && !models.iter().any(|have| have == m) {
                    models.push(m.to_owned());
                }
            }
            NodeBackend { name: b.name().to_owned(), kind: b.kind().to_owned(), models }
        })
        .collect()
}
