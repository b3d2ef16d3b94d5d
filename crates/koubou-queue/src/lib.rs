//! The durable task queue: where accepted tasks live until they are done.
//!
//! # Layout
//! - [`TaskStore`]: where tasks live — submit, get, list (paged by an opaque [`Cursor`]),
//!   counts, position, cancel. What the service API needs.
//! - [`Dispatch`]: how tasks reach workers — claim under a lease (at once, or waiting for work
//!   without polling), heartbeat, complete / fail / release, recover a node's tasks. What
//!   workers need.
//! - [`TaskQueue`]: both; every queue implements both.
//! - [`nodes`]: [`Nodes`], the registry of the processes running workers over the queue, each
//!   registered for a TTL and renewing it; an expired node's running tasks are recovered.
//! - [`sqlite`]: `SqliteQueue`, the embedded default (one file, WAL, group commit on one writer
//!   thread, readers on their own connections; idle workers park on it until a task arrives or
//!   something falls due).
//! - [`redis`](crate::redis) (feature `redis`, on by default): `RedisQueue`, the shared queue of a
//!   distributed Koubou (sorted sets and one Lua script per operation, under one hash tag).
//! - [`outbox`]: `Outbox`, what a dispatcher outside the store needs from it (claim a given task,
//!   the claimable tasks no confirmed delivery covers, when something next falls due); both
//!   stores implement it.
//! - [`amqp`](crate::amqp) (feature `amqp`, on by default): `AmqpDispatch`, RabbitMQ as the
//!   [`Dispatch`] over a store (publisher confirms, `basic.get`, an outbox sweep).
//! - [`backoff`]: the retry schedule.
//! - `conformance` (tests, and the `conformance` feature): the queue's semantics as one suite
//!   every implementation passes unchanged, with `insta` snapshots of each step of a task's life.
//!
//! Architecture invariants:
//! - A task runs at most once at a time: claims are atomic, and every write a worker makes is
//!   fenced by its [`Lease`] (task id + worker + attempt number), so a worker whose lease was
//!   lost can no longer change the task.
//! - An accepted task is never lost: `submit` answers only after the transaction commits, and a
//!   running task whose worker vanished goes back to the queue when its lease runs out.
//! - Events are published on the bus only after the change they describe has committed.

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod backoff;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod nodes;
pub mod outbox;
mod park;
#[cfg(feature = "redis")]
pub mod redis;
pub mod sqlite;
#[cfg(all(test, any(feature = "redis", feature = "amqp")))]
#[cfg_attr(not(all(feature = "redis", feature = "amqp")), allow(dead_code))]
mod test_tls;

use std::time::Duration;

#[cfg(feature = "redis")]
pub use self::redis::{RedisConfig, RedisQueue};
use async_trait::async_trait;
pub use koubou_task::Cursor;
use koubou_task::{NewTask, Task, TaskId, TaskKind, TaskStatus, Usage, WorkerId};
pub use nodes::{Node, NodeBackend, NodeLoad, Nodes};
pub use outbox::{Outbox, Undispatched};
use serde::Serialize;
pub use sqlite::{SqliteConfig, SqliteQueue};
use tokio_util::sync::CancellationToken;

/// Errors of the queue layer, whatever stores the tasks. `NotFound`, `Conflict`, `BadCursor` and
/// `Full` are the caller's; `DiskFull`, `Locked` and `Unavailable` pass (try again later); the
/// rest are ours. None names a driver: a store says what failed in words.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("task {0} not found")]
    NotFound(TaskId),
    /// The request does not fit the task's state (e.g. cancelling a completed task).
    #[error("task {id} is {status}: {detail}")]
    Conflict { id: TaskId, status: TaskStatus, detail: String },
    /// A page cursor this queue did not give out.
    #[error("{0:?} is not a page cursor of this queue (pass a page's next_cursor as it came)")]
    BadCursor(String),
    /// `submit_bounded` found `limit` tasks already waiting: nothing was stored.
    #[error("the queue already holds {queued} waiting tasks (limits.max_pending = {limit}); nothing was stored")]
    Full { queued: u64, limit: u64 },
    /// The disk (or quota) holding the database is full: nothing of this write was stored.
    #[error("the disk holding the queue is full ({0}); nothing was stored")]
    DiskFull(String),
    /// Another process kept the database locked past the busy timeout: nothing was stored.
    #[error("the queue's database is locked by another process ({0}); nothing was stored")]
    Locked(String),
    /// The write transaction could not be started (`BEGIN`): nothing was written.
    #[error("could not start a write transaction on the queue: {0}")]
    Begin(String),
    /// The write transaction could not be committed: nothing of this write was stored.
    #[error("could not commit to the queue ({0}); nothing was stored")]
    Commit(String),
    /// With `durability = "full"`: the disk failed to store committed writes (fsync failed).
    /// Nothing since the last good sync is promised, so the queue refuses all work until
    /// Koubou restarts and SQLite recovers from what the disk holds.
    #[error(
        "the disk failed to store the queue's writes ({0}); nothing since the last sync is promised: restart Koubou"
    )]
    Sync(String),
    /// The store failed in a way none of the above names, in its own words (SQLite's error, a
    /// Redis script error or wrong key type, …).
    #[error("the queue's store failed: {0}")]
    Storage(String),
    /// The queue's Redis server, or the RabbitMQ broker dispatching it, cannot be reached or
    /// cannot take the operation now (connection lost or refused, no answer in time, loading,
    /// out of memory). Nothing was written unless the connection broke after the server ran
    /// the write; the same call may succeed later.
    #[error("the queue's Redis or RabbitMQ server is unavailable ({0}); try again later")]
    Unavailable(String),
    #[error("cannot open the queue at {path}: {detail}")]
    Open { path: String, detail: String },
    #[error("the queue is shut down")]
    Closed,
    /// Another run of the node is registered and alive ([`Nodes::register`]).
    #[error(
        "node {} is already running (pid {} on {}, registered until {}): stop it first, or give this one another \
         node name",
        .0.id, .0.pid, .0.host, koubou_task::rfc3339(.0.expires_at)
    )]
    NodeTaken(Box<Node>),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl QueueError {
    /// A passing condition (full disk, locked database, unreachable Redis): the same write may
    /// succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, QueueError::DiskFull(_) | QueueError::Locked(_) | QueueError::Unavailable(_))
    }

    /// The same failure, for answering another caller (a batch's failure reaches every job in it).
    pub(crate) fn again(&self) -> QueueError {
        match self {
            QueueError::DiskFull(m) => QueueError::DiskFull(m.clone()),
            QueueError::Locked(m) => QueueError::Locked(m.clone()),
            QueueError::Begin(m) => QueueError::Begin(m.clone()),
            QueueError::Commit(m) => QueueError::Commit(m.clone()),
            QueueError::Closed => QueueError::Closed,
            QueueError::Sync(m) => QueueError::Sync(m.clone()),
            other => QueueError::Commit(format!("SQLite rolled the transaction back after: {other}")),
        }
    }
}

/// What `submit` did: a new task, or the existing one with the same idempotency key.
#[derive(Clone, Debug)]
pub struct Submitted {
    pub task: Task,
    pub created: bool,
}

/// Proof that a worker holds a task: every write the worker makes is checked against it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub task_id: TaskId,
    pub worker_id: WorkerId,
    pub attempt: u32,
}

/// A claimed task, its lease, and the token the queue fires when the task is cancelled.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub task: Task,
    pub lease: Lease,
    pub cancel: CancellationToken,
}

/// What a worker can serve: it claims only tasks of these kinds that carry only these tags.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Capabilities {
    /// The task kinds its router routes; `None`: any kind.
    pub kinds: Option<Vec<TaskKind>>,
    /// The tags it declares (lower case): it claims only tasks whose every tag is among them (an
    /// untagged task always). `None`: tasks with any tags.
    pub tags: Option<Vec<String>>,
}

impl Capabilities {
    /// Any task at all.
    pub fn any() -> Capabilities {
        Capabilities::default()
    }

    /// Tasks of these kinds only (with any tags).
    pub fn kinds(kinds: impl IntoIterator<Item = TaskKind>) -> Capabilities {
        Capabilities { kinds: Some(kinds.into_iter().collect()), tags: None }
    }

    /// Whether a worker with these capabilities may claim `task`.
    pub fn serves(&self, task: &Task) -> bool {
        self.serves_kind_and_tags(Some(task.kind.as_str()), Some(&task.tags))
    }

    /// [`serves`](Self::serves) for a task known only by its kind and tags, as a dispatcher's
    /// delivery names them; either unknown (`None`) is served only by a worker that takes any.
    pub fn serves_kind_and_tags(&self, kind: Option<&str>, tags: Option<&[String]>) -> bool {
        self.kinds.as_ref().is_none_or(|ks| kind.is_some_and(|k| ks.iter().any(|x| x.as_str() == k)))
            && self.tags.as_ref().is_none_or(|ts| tags.is_some_and(|tags| tags.iter().all(|t| ts.contains(t))))
    }
}

/// Why a worker hands a task back ([`Dispatch::release`]); either way the attempt does not
/// count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Release {
    /// The worker is stopping: the task is claimable again at once.
    Stopping,
    /// The worker cannot serve it (its router cannot route it here): the task waits `wait`
    /// before any worker may claim it again (retrying), with `reason` as its error meanwhile,
    /// so that a node that cannot run it does not claim it over and over.
    CannotServe { reason: String, wait: Duration },
}

/// What a heartbeat learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Still ours; renewed.
    Held,
    /// Cancelled by a user: stop now.
    Cancelled,
    /// Gone (expired and requeued, or finished elsewhere): stop and write nothing more.
    Lost,
}

/// While running: what to record with a heartbeat.
#[derive(Clone, Debug, Default)]
pub struct Progress<'a> {
    pub backend: Option<&'a str>,
    pub model: Option<&'a str>,
    /// Whether that backend is remote.
    pub remote: Option<bool>,
    pub partial: Option<&'a str>,
}

/// A successful attempt.
#[derive(Clone, Debug)]
pub struct Completion {
    pub result: String,
    pub backend: String,
    pub model: String,
    pub usage: Usage,
    /// What the owner should know about the answer (shown with the task).
    pub warnings: Vec<String>,
    /// The serving backend is remote: the prompt left the machine.
    pub remote: bool,
    /// At the serving backend's prices, when it has any.
    pub cost: Option<f64>,
}

/// A failed attempt.
#[derive(Clone, Debug)]
pub struct Failure {
    pub error: String,
    /// Worth trying again (if attempts remain).
    pub retryable: bool,
    pub backend: Option<String>,
    pub model: Option<String>,
    pub remote: Option<bool>,
    /// Output produced before the failure, kept for the record.
    pub partial: Option<String>,
    /// The wait the backend asked for (a rate limit's `Retry-After`): the retry comes no sooner
    /// than this, nor sooner than the backoff (and no later than the backoff's cap).
    pub retry_after: Option<Duration>,
}

/// A filter and page for listing tasks, newest first.
#[derive(Clone, Debug, Default)]
pub struct TaskQuery {
    pub statuses: Vec<TaskStatus>,
    pub kind: Option<TaskKind>,
    /// Only tasks carrying this tag.
    pub tag: Option<String>,
    /// Substring of the prompt (case-insensitive for ASCII).
    pub search: Option<String>,
    /// Only tasks older than this cursor (a previous page's `next_cursor`).
    pub before: Option<Cursor>,
    pub limit: usize,
}

/// One page of tasks.
#[derive(Clone, Debug, Serialize)]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    /// Pass as `before` for the next page; `None` on the last page.
    pub next_cursor: Option<Cursor>,
    /// How many tasks match the filter in all.
    pub total: u64,
}

/// How many tasks are in each status.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct StatusCounts {
    pub pending: u64,
    pub running: u64,
    pub retrying: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl StatusCounts {
    pub fn get(&self, s: TaskStatus) -> u64 {
        match s {
            TaskStatus::Pending => self.pending,
            TaskStatus::Running => self.running,
            TaskStatus::Retrying => self.retrying,
            TaskStatus::Completed => self.completed,
            TaskStatus::Failed => self.failed,
            TaskStatus::Cancelled => self.cancelled,
        }
    }
    pub fn total(&self) -> u64 {
        TaskStatus::ALL.iter().map(|s| self.get(*s)).sum()
    }
}

/// Where a queued task stands.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct QueuePosition {
    /// Queued tasks that will be claimed before this one (higher priority, or older at the same).
    pub ahead: u64,
}

/// Where tasks live: what the service API reads and writes.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// Stores a validated task (or returns the one with the same idempotency key); answers once
    /// the task is stored for good.
    async fn submit(&self, new: NewTask) -> Result<Submitted, QueueError> {
        self.submit_bounded(new, None).await
    }
    /// Like [`submit`](Self::submit), but when `max_queued` tasks already wait (pending or
    /// retrying) the task is refused with [`QueueError::Full`] and nothing is stored. A task
    /// returned for its idempotency key is never refused.
    async fn submit_bounded(&self, new: NewTask, max_queued: Option<u64>) -> Result<Submitted, QueueError>;
    /// Like [`submit_bounded`](Self::submit_bounded), for a caller that reveals the task only
    /// through later reads or events (which a store with delayed durability holds until the
    /// write is on disk) — e.g. a submission that answers with the task's outcome. Such a store
    /// may answer it at commit instead of after the sync.
    async fn submit_then_watch(&self, new: NewTask, max_queued: Option<u64>) -> Result<Submitted, QueueError> {
        self.submit_bounded(new, max_queued).await
    }
    async fn get(&self, id: TaskId) -> Result<Option<Task>, QueueError>;
    /// One page, newest first.
    async fn list(&self, query: TaskQuery) -> Result<TaskPage, QueueError>;
    async fn counts(&self) -> Result<StatusCounts, QueueError>;
    /// `None` when the task is not queued; [`QueueError::NotFound`] when there is no such task.
    async fn position(&self, id: TaskId) -> Result<Option<QueuePosition>, QueueError>;
    /// Cancels a queued or running task; a running one's worker is told through its token.
    async fn cancel(&self, id: TaskId) -> Result<Task, QueueError>;
}

/// How tasks reach workers: leased claims and what workers report. Every write a worker makes
/// is fenced by its [`Lease`].
#[async_trait]
pub trait Dispatch: Send + Sync + 'static {
    /// Takes the most urgent claimable task that `caps` serves (highest priority, then
    /// oldest), if any, for `lease`.
    async fn claim(
        &self,
        worker: &WorkerId,
        caps: &Capabilities,
        lease: Duration,
    ) -> Result<Option<Claimed>, QueueError>;
    /// Like [`claim`](Self::claim), but waits for a task as long as needed — woken by the store
    /// when one may have become claimable (submitted, released, requeued, a retry's backoff or a
    /// lease ending), never by polling; `None` once `stop` fires.
    async fn claim_wait(
        &self,
        worker: &WorkerId,
        caps: &Capabilities,
        lease: Duration,
        stop: &CancellationToken,
    ) -> Result<Option<Claimed>, QueueError>;
    /// Renews the lease (and records progress).
    async fn heartbeat(&self, lease: &Lease, ttl: Duration, progress: Progress<'_>) -> Result<LeaseStatus, QueueError>;
    async fn complete(&self, lease: &Lease, done: Completion) -> Result<Task, QueueError>;
    /// Schedules a retry with backoff, or fails the task for good.
    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<Task, QueueError>;
    /// Gives the task back untouched, the attempt not counted: claimable again at once when
    /// the worker is stopping, after a wait when it cannot serve the task ([`Release`]).
    async fn release(&self, lease: &Lease, why: Release) -> Result<(), QueueError>;
    /// Requeues every running task held by workers of `node`, whatever their leases: for a
    /// node known to be gone (its next run, starting on the same host, recovers what the last
    /// one left running).
    async fn recover_node(&self, node: &str) -> Result<u64, QueueError>;
    /// What every claim does first, for a node that may have no workers claiming: requeues (or
    /// fails, attempts used up) the running tasks whose lease has run out and makes retries
    /// whose backoff is over claimable. A task whose node stopped answering waits for its lease
    /// to run out, not only its node's registration: the node may be alive but cut off, and its
    /// worker stops the attempt only once that lease has run out by its own count.
    async fn housekeep(&self) -> Result<(), QueueError>;
}

/// A queue: a [`TaskStore`] that also does [`Dispatch`]. Every queue is one (blanket impl).
pub trait TaskQueue: TaskStore + Dispatch {}

impl<Q: TaskStore + Dispatch + ?Sized> TaskQueue for Q {}

#[cfg(test)]
mod tests {
    use koubou_task::TaskKind;

    use super::Capabilities;

    /// What a dispatcher's delivery names is checked like a task; a kind or tags it does not
    /// name go only to a worker that takes any.
    #[test]
    fn capabilities_serve_what_a_delivery_names() {
        let gpu = vec!["gpu".to_owned()];
        let code = Capabilities { kinds: Some(vec![TaskKind::parse("code").unwrap()]), tags: Some(gpu.clone()) };
        assert!(code.serves_kind_and_tags(Some("code"), Some(&gpu)));
        assert!(code.serves_kind_and_tags(Some("code"), Some(&[])), "an untagged task");
        assert!(!code.serves_kind_and_tags(Some("code"), Some(&["team:a".to_owned()])));
        assert!(!code.serves_kind_and_tags(Some("general"), Some(&[])));
        assert!(!code.serves_kind_and_tags(None, Some(&[])), "unknown kind");
        assert!(!code.serves_kind_and_tags(Some("code"), None), "unknown tags");
        assert!(Capabilities::any().serves_kind_and_tags(None, None));
    }
}
