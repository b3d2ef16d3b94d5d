//! The durable task queue: where accepted tasks live until they are done.
//!
//! # Layout
//! - [`TaskQueue`]: the one trait every store implements: submit, read, list, claim with a
//!   lease, heartbeat, complete / fail / release, cancel, count.
//! - [`sqlite`]: `SqliteQueue`, the embedded default (one file, WAL, group commit on one writer
//!   thread, readers on their own connections).
//! - [`redis`](crate::redis) (feature `redis`, on by default): `RedisQueue`, the shared queue of a
//!   distributed Koubou (sorted sets and one Lua script per operation, under one hash tag).
//! - [`outbox`]: `Outbox`, what a dispatcher outside the store needs from it (claim a given task,
//!   the claimable tasks no confirmed delivery covers); both stores implement it.
//! - [`amqp`](crate::amqp) (feature `amqp`, on by default): `AmqpDispatch`, RabbitMQ as the
//!   dispatcher over a store (publisher confirms, `basic.get`, an outbox sweep).
//! - [`wait`]: `claim_wait`, which parks an idle worker until a task arrives or something falls
//!   due (a retry's backoff, a lease's expiry) — woken by the queue, never by a polling timer.
//! - [`backoff`]: the retry schedule.
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
pub mod outbox;
#[cfg(feature = "redis")]
pub mod redis;
pub mod sqlite;
#[cfg(all(test, any(feature = "redis", feature = "amqp")))]
#[cfg_attr(not(all(feature = "redis", feature = "amqp")), allow(dead_code))]
mod test_tls;
pub mod wait;

use std::time::Duration;

#[cfg(feature = "redis")]
pub use self::redis::{RedisConfig, RedisQueue};
use async_trait::async_trait;
use koubou_task::{Millis, NewTask, Task, TaskId, TaskKind, TaskStatus, Usage, WorkerId};
pub use outbox::{Outbox, Undispatched};
use serde::Serialize;
pub use sqlite::{SqliteConfig, SqliteQueue};
use tokio_util::sync::CancellationToken;
pub use wait::claim_wait;

/// Errors of the queue layer. `NotFound`, `Conflict` and `Full` are the caller's; `DiskFull`,
/// `Locked` and `Unavailable` pass (try again later); the rest are ours.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("task {0} not found")]
    NotFound(TaskId),
    /// The request does not fit the task's state (e.g. cancelling a completed task).
    #[error("task {id} is {status}: {detail}")]
    Conflict { id: TaskId, status: TaskStatus, detail: String },
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
    #[error("database error: {0}")]
    Db(rusqlite::Error),
    /// The queue's Redis server, or the RabbitMQ broker dispatching it, cannot be reached or
    /// cannot take the operation now (connection lost or refused, no answer in time, loading,
    /// out of memory). Nothing was written unless the connection broke after the server ran
    /// the write; the same call may succeed later.
    #[error("the queue's Redis or RabbitMQ server is unavailable ({0}); try again later")]
    Unavailable(String),
    /// Redis refused a queue operation for another reason (a script error, a wrong key type).
    #[error("Redis error: {0}")]
    Redis(String),
    #[error("cannot open the queue at {path}: {detail}")]
    Open { path: String, detail: String },
    #[error("the queue is shut down")]
    Closed,
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

/// SQLite's "disk full" and "busy/locked" get their own variants; everything else is `Db`.
impl From<rusqlite::Error> for QueueError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => QueueError::DiskFull(e.to_string()),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => QueueError::Locked(e.to_string()),
            _ => QueueError::Db(e),
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
    /// Only tasks older than this cursor (from a previous page's `next_cursor`).
    pub before: Option<i64>,
    pub limit: usize,
}

/// One page of tasks.
#[derive(Clone, Debug, Serialize)]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    /// Pass as `before` for the next page; `None` on the last page.
    pub next_cursor: Option<i64>,
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

/// A durable task store with atomic, leased claims.
#[async_trait]
pub trait TaskQueue: Send + Sync + 'static {
    /// Stores a validated task (or returns the one with the same idempotency key).
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
    /// Tasks waiting to run (pending or retrying), as of the last commit.
    fn queued(&self) -> u64;
    async fn get(&self, id: TaskId) -> Result<Option<Task>, QueueError>;
    async fn list(&self, query: TaskQuery) -> Result<TaskPage, QueueError>;
    async fn counts(&self) -> Result<StatusCounts, QueueError>;
    /// `None` when the task is not queued.
    async fn position(&self, id: TaskId) -> Result<Option<QueuePosition>, QueueError>;

    /// Takes the most urgent claimable task (highest priority, then oldest), if any, for
    /// `lease` — optionally only of the given kinds.
    async fn claim(
        &self,
        worker: &WorkerId,
        kinds: Option<&[TaskKind]>,
        lease: Duration,
    ) -> Result<Option<Claimed>, QueueError>;
    /// Renews the lease (and records progress).
    async fn heartbeat(&self, lease: &Lease, ttl: Duration, progress: Progress<'_>) -> Result<LeaseStatus, QueueError>;
    async fn complete(&self, lease: &Lease, done: Completion) -> Result<Task, QueueError>;
    /// Schedules a retry with backoff, or fails the task for good.
    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<Task, QueueError>;
    /// Gives the task back untouched (shutdown): it is claimable again at once and the attempt
    /// does not count.
    async fn release(&self, lease: &Lease) -> Result<(), QueueError>;
    /// Cancels a queued or running task; a running one's worker is told through its token.
    async fn cancel(&self, id: TaskId) -> Result<Task, QueueError>;
    /// Requeues every running task held by workers of `node` (after that node restarted).
    async fn recover_node(&self, node: &str) -> Result<u64, QueueError>;

    /// Fires whenever a task may have become claimable.
    fn wakeup(&self) -> &tokio::sync::Notify;
    /// The next moment something falls due without any new write (a retry, a lease expiry).
    async fn next_due(&self) -> Result<Option<Millis>, QueueError>;
}
