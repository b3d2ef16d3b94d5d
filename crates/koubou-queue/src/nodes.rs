//! Nodes: the processes that run workers over one queue, each registered for a while (a TTL)
//! and renewing it while it lives. A node that stops renewing is taken for dead once its
//! registration expires, and its running tasks are requeued by whichever node notices.
//!
//! The registry lives with the tasks (the same store) so that every node sharing a queue sees
//! every other; [`Nodes`] is what a store implements for it.

use std::time::Duration;

use async_trait::async_trait;
use koubou_task::Millis;
use serde::{Deserialize, Serialize};

use crate::{Capabilities, QueueError};

/// One run of a node, as registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The node's name: its workers are `<id>/<n>`.
    pub id: String,
    /// This run of the node (a new one at every start), so that a registration taken over by a
    /// later run can no longer be renewed by an earlier one.
    pub instance: u64,
    /// Where it runs: host name and process id.
    pub host: String,
    pub pid: u32,
    /// The Koubou version it runs.
    pub version: String,
    /// What its workers claim.
    pub capabilities: Capabilities,
    pub started_at: Millis,
    /// When the registration runs out unless renewed (set by the registry).
    pub expires_at: Millis,
    /// Its backends, as it last said (at registration or renewal).
    #[serde(default)]
    pub backends: Vec<NodeBackend>,
    /// How busy it was at its last renewal.
    #[serde(default)]
    pub load: NodeLoad,
    /// Its last heartbeat: when it registered or last renewed, on the store's clock (set by the
    /// registry).
    #[serde(default)]
    pub last_seen: Millis,
}

/// A backend of a node, as the node's configuration names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBackend {
    pub name: String,
    /// Its provider (`ollama`, `openai`, `embedded`, …).
    pub kind: String,
    /// The models it serves as far as the configuration says: its default model and the models
    /// its routes name.
    #[serde(default)]
    pub models: Vec<String>,
}

/// How busy a node is: its workers running a task, and the most workers it runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    pub busy: u32,
    pub max_workers: u32,
}

impl Node {
    /// A new run of node `id` on this host and process.
    pub fn this_process(id: &str, version: &str, capabilities: Capabilities) -> Node {
        Node {
            id: id.to_owned(),
            // Kept within i64, which any store holds.
            instance: fastrand::u64(1..i64::MAX as u64),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "localhost".into()),
            pid: std::process::id(),
            version: version.to_owned(),
            capabilities,
            started_at: koubou_task::now_millis(),
            expires_at: 0,
            backends: Vec::new(),
            load: NodeLoad::default(),
            last_seen: 0,
        }
    }
}

/// The registry of nodes.
#[async_trait]
pub trait Nodes: Send + Sync + 'static {
    /// Registers `node` until `ttl` from now. Refused with [`QueueError::NodeTaken`] while
    /// another run of the same id is registered and not expired — unless that run is
    /// `replace`, which the caller knows to be dead (e.g. it holds that node's lock on this
    /// host). An expired registration is replaced without asking.
    async fn register(&self, node: &Node, ttl: Duration, replace: Option<u64>) -> Result<(), QueueError>;
    /// Renews this run's registration (`node.id`, `node.instance`) for `ttl`, with what `node`
    /// now says of its backends and load, and records the store's time as its last heartbeat;
    /// false when it is gone (expired and swept, or taken over by a later run): the node must
    /// not go on as if registered.
    async fn renew(&self, node: &Node, ttl: Duration) -> Result<bool, QueueError>;
    /// Every registered node, oldest first (expired ones too, until swept).
    async fn nodes(&self) -> Result<Vec<Node>, QueueError>;
    /// Removes every expired registration and returns those nodes, each to exactly one caller:
    /// their running tasks are that caller's to recover ([`Dispatch::recover_node`](crate::Dispatch::recover_node)).
    async fn expire(&self) -> Result<Vec<Node>, QueueError>;
    /// Removes this run's registration (a clean stop).
    async fn deregister(&self, id: &str, instance: u64) -> Result<(), QueueError>;
}
