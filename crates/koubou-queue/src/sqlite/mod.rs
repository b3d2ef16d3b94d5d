//! `SqliteQueue`: the embedded default store.
//!
//! One file in WAL mode. All writes go through one writer thread that takes every job waiting
//! in its channel, runs them in one transaction (each in its own savepoint, so one failing job
//! does not undo the others), commits once, and only then answers the callers and publishes
//! their events: group commit, so durability costs one sync per batch rather than per task.
//! With `durability = "full"` the sync is pipelined: the writer commits without waiting for the
//! disk and a second thread fsyncs behind it, holding back answers, events and reads until the
//! write they reveal is on disk ([`sync`]).
//! Reads run on a small pool of separate connections and never wait for the writer.
//!
//! When a batch cannot be stored — `BEGIN` fails, SQLite rolls the transaction back by itself
//! (it does on a full disk), or `COMMIT` fails — every job in it is answered with the same error
//! ([`QueueError::DiskFull`], [`QueueError::Locked`], [`QueueError::Begin`] or
//! [`QueueError::Commit`]) and nothing of it is published: no caller is told "done" for a write
//! that did not reach the file.

mod ops;
mod rows;
mod schema;
mod sync;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
        mpsc,
    },
    time::Duration,
};

use async_trait::async_trait;
use koubou_task::{EventKind, EventLog, Millis, NewTask, Task, TaskId, WorkerId, now_millis};
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    Capabilities, Claimed, Completion, Dispatch, Failure, Lease, LeaseStatus, Node, Nodes, Progress, QueueError,
    QueuePosition, Release, StatusCounts, Submitted, TaskPage, TaskQuery, TaskStore,
    backoff::Backoff,
    outbox::{Outbox, Undispatched},
    park::{self, Parking},
};

/// How hard each commit tries to reach the disk.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// WAL with `synchronous=NORMAL`: an answered write survives a crash or kill of Koubou
    /// (it is in the WAL file); a power cut or kernel crash may lose the commits since the last
    /// sync (SQLite syncs the WAL at checkpoints).
    #[default]
    Normal,
    /// Every write is fsynced before anything reveals it — the answer to a submit or a cancel,
    /// an event, a read — so whatever a client was told survives power loss too. One fsync per
    /// group of batches, run beside the writer (see the `sync` module); only the queue's own
    /// workers hear of their claims and outcomes before the fsync.
    Full,
}

/// `[queue]` in config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SqliteConfig {
    /// The database file; unset means `$KOUBOU_HOME/db/koubou.db`.
    pub path: Option<PathBuf>,
    pub durability: Durability,
    /// Attempts a task gets unless it asks for another number.
    pub max_attempts: u32,
    pub retry: Backoff,
    /// Most jobs the writer commits in one transaction.
    pub max_batch: usize,
    /// Read connections kept open.
    pub readers: usize,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            path: None,
            durability: Durability::Normal,
            max_attempts: 3,
            retry: Backoff::default(),
            max_batch: 1024,
            readers: 4,
        }
    }
}

/// What a writer job sees: the open transaction and what to do once it commits.
pub(crate) struct Ctx<'c> {
    pub conn: &'c Connection,
    pub now: Millis,
    pub cfg: &'c SqliteConfig,
    /// Published after commit.
    pub events: Vec<EventKind>,
    /// Tasks this batch made claimable: as many parked workers are woken after commit.
    pub wake: usize,
    /// Cancel these running tasks' tokens after commit.
    pub cancels: Vec<TaskId>,
    /// Register these claims' tokens after commit.
    pub claimed: Vec<(TaskId, CancellationToken)>,
    /// The earliest retry or lease expiry written by this batch.
    pub due: Millis,
    /// Set when housekeeping recomputed the next due moment from the table.
    pub due_recomputed: Option<Millis>,
    pub next_due: Millis,
    /// Tasks waiting (pending or retrying) including this batch's changes so far.
    pub queued: i64,
    /// Set when SQLite rolled the whole transaction back under a job (a full disk does that):
    /// why, for answering every other job of the batch.
    pub aborted: Option<QueueError>,
}

/// How long a connection waits for another process's lock before the write fails with
/// [`QueueError::Locked`] (answered 503 with `Retry-After`, not left hanging).
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

type Reply = Box<dyn FnOnce(Result<(), &QueueError>) + Send>;

/// Who hears of a write, which decides when it is answered with `durability = "full"`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ack {
    /// A caller outside the queue (submit, cancel): answered once the write is on disk.
    Durable,
    /// The queue's own workers (claims, heartbeats, outcomes), and a submitter that reveals
    /// the task only through later reads and events: answered at commit. Nothing outside this
    /// process learns of the write before it is on disk (events and reads wait).
    Commit,
}

struct Job {
    ack: Ack,
    run: Box<dyn FnOnce(&mut Ctx<'_>) -> Reply + Send>,
}

struct Shared {
    cfg: SqliteConfig,
    path: PathBuf,
    bus: Arc<dyn EventLog>,
    wakeup: Notify,
    /// Tokens of tasks claimed in this process, fired on cancel or lost lease.
    running: Mutex<HashMap<TaskId, CancellationToken>>,
    next_due: AtomicI64,
    /// Tasks waiting (pending or retrying) as of the last commit.
    queued: AtomicU64,
    readers: Mutex<Vec<Connection>>,
    /// Bounds concurrent reads to the pool's size, so a burst reuses connections instead of
    /// opening new ones.
    read_slots: tokio::sync::Semaphore,
    /// With `durability = "full"`: commit numbers and the sync thread's progress.
    durable: Option<sync::Durable>,
}

/// The SQLite task queue. Cheap to clone.
#[derive(Clone)]
pub struct SqliteQueue {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
}

fn open_conn(path: &PathBuf, write: bool) -> Result<Connection, QueueError> {
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| QueueError::Open { path: path.display().to_string(), detail: e.to_string() })?;
    conn.busy_timeout(BUSY_TIMEOUT).sql()?;
    conn.set_prepared_statement_cache_capacity(64);
    if write {
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).sql()?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(QueueError::Open {
                path: path.display().to_string(),
                detail: format!("cannot use WAL (got {mode})"),
            });
        }
        // NORMAL for both: commits reach the WAL file at once (safe against a kill); with "full"
        // the sync thread fsyncs the WAL before anything reveals a write.
        conn.pragma_update(None, "synchronous", "NORMAL").sql()?;
    }
    Ok(conn)
}

impl SqliteQueue {
    /// Opens (creating and migrating as needed) the queue at `path`.
    pub fn open(
        path: impl Into<PathBuf>,
        cfg: SqliteConfig,
        bus: Arc<dyn EventLog>,
    ) -> Result<SqliteQueue, QueueError> {
        SqliteQueue::open_with(path.into(), cfg, bus, None)
    }

    /// [`SqliteQueue::open`], with `durability = "full"` syncing through `syncer` instead of an
    /// fsync of the WAL file.
    pub(crate) fn open_with(
        path: PathBuf,
        cfg: SqliteConfig,
        bus: Arc<dyn EventLog>,
        syncer: Option<sync::Syncer>,
    ) -> Result<SqliteQueue, QueueError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| QueueError::Open { path: dir.display().to_string(), detail: e.to_string() })?;
        }
        let mut conn = open_conn(&path, true)?;
        schema::migrate(&mut conn)?;
        let first_due = ops::next_due_from_table(&conn)?;
        let queued = ops::queued_from_table(&conn)?;
        let cfg_readers = cfg.readers.max(1);
        let durable = (cfg.durability == Durability::Full).then(sync::Durable::new);
        let shared = Arc::new(Shared {
            cfg,
            path,
            bus,
            wakeup: Notify::new(),
            running: Mutex::new(HashMap::new()),
            next_due: AtomicI64::new(first_due),
            queued: AtomicU64::new(queued),
            readers: Mutex::new(Vec::new()),
            read_slots: tokio::sync::Semaphore::new(cfg_readers),
            durable,
        });
        let spawn_error =
            |e: std::io::Error| QueueError::Open { path: shared.path.display().to_string(), detail: e.to_string() };
        let synced = match shared.durable {
            Some(_) => {
                let (tx, rx) = mpsc::channel::<sync::Pending>();
                let s = shared.clone();
                let syncer = syncer.unwrap_or_else(|| {
                    let mut wal = s.path.clone().into_os_string();
                    wal.push("-wal");
                    sync::wal_syncer(wal.into())
                });
                std::thread::Builder::new()
                    .name("koubou-sqlite-sync".into())
                    .spawn(move || sync::run(rx, s.durable.as_ref().expect("full"), &*s.bus, syncer))
                    .map_err(spawn_error)?;
                Some(tx)
            }
            None => None,
        };
        let (jobs, rx) = mpsc::channel::<Job>();
        let s = shared.clone();
        std::thread::Builder::new()
            .name("koubou-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, s, synced))
            .map_err(spawn_error)?;
        Ok(SqliteQueue { shared, jobs })
    }

    pub fn path(&self) -> &PathBuf {
        &self.shared.path
    }

    pub fn bus(&self) -> &Arc<dyn EventLog> {
        &self.shared.bus
    }

    /// Runs `f` on the writer thread inside the current batch's transaction; answers after commit
    /// (with `durability = "full"` and [`Ack::Durable`], after the fsync).
    async fn write<T: Send + 'static>(
        &self,
        ack: Ack,
        f: impl FnOnce(&mut Ctx<'_>) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let (tx, rx) = oneshot::channel::<Result<T, QueueError>>();
        let run = Box::new(move |ctx: &mut Ctx<'_>| -> Reply {
            // No transaction open: BEGIN failed, or SQLite rolled it back under an earlier job.
            // Running `f` now would write outside the batch, so it is answered with the batch's
            // error instead.
            if ctx.conn.is_autocommit() {
                return Box::new(move |committed: Result<(), &QueueError>| {
                    let _ = tx.send(Err(committed
                        .map_or_else(QueueError::again, |()| QueueError::Begin("no transaction was open".into()))));
                });
            }
            let mark = (ctx.events.len(), ctx.cancels.len(), ctx.claimed.len(), ctx.wake, ctx.queued);
            let result = ctx.conn.execute_batch("SAVEPOINT job").map_err(db).and_then(|_| {
                let r = f(ctx);
                if ctx.conn.is_autocommit() {
                    return r; // rolled back with the whole transaction: no savepoint is left
                }
                let end = if r.is_ok() { "RELEASE job" } else { "ROLLBACK TO job; RELEASE job" };
                ctx.conn.execute_batch(end).sql()?;
                r
            });
            if let Err(e) = &result {
                ctx.events.truncate(mark.0);
                ctx.cancels.truncate(mark.1);
                ctx.claimed.truncate(mark.2);
                ctx.wake = mark.3;
                ctx.queued = mark.4;
                if ctx.conn.is_autocommit() && ctx.aborted.is_none() {
                    ctx.aborted = Some(e.again());
                }
            }
            Box::new(move |committed: Result<(), &QueueError>| {
                let _ = tx.send(match committed {
                    Ok(()) => result,
                    Err(e) => Err(e.again()),
                });
            })
        });
        self.jobs.send(Job { ack, run }).map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    /// With `durability = "full"`, holds a read's answer until every write it may have seen is
    /// on disk.
    async fn settled<T>(&self, read: Result<T, QueueError>) -> Result<T, QueueError> {
        match (&self.shared.durable, read) {
            (Some(d), Ok(v)) => d.settled().await.map(|()| v),
            (_, r) => r,
        }
    }

    /// Runs `f` on a read connection from the pool, on the calling thread: for lookups by key
    /// (tens of µs), where handing the work to a blocking thread would cost more than it does.
    async fn read_inline<T>(&self, f: impl FnOnce(&Connection) -> Result<T, QueueError>) -> Result<T, QueueError> {
        let _slot = self.shared.read_slots.acquire().await.map_err(|_| QueueError::Closed)?;
        let conn = match self.shared.readers.lock().pop() {
            Some(c) => c,
            None => open_conn(&self.shared.path, false)?,
        };
        let r = f(&conn);
        self.shared.readers.lock().push(conn);
        self.settled(r).await
    }

    /// Runs `f` on a read connection from the pool, on a blocking thread (scans, counts).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let _slot = self.shared.read_slots.acquire().await.map_err(|_| QueueError::Closed)?;
        let shared = self.shared.clone();
        let r = tokio::task::spawn_blocking(move || {
            let conn = match shared.readers.lock().pop() {
                Some(c) => c,
                None => open_conn(&shared.path, false)?,
            };
            let r = f(&conn);
            let mut pool = shared.readers.lock();
            if pool.len() < shared.cfg.readers.max(1) {
                pool.push(conn);
            }
            r
        })
        .await
        .map_err(|e| QueueError::Corrupt(format!("reader panicked: {e}")))?;
        self.settled(r).await
    }
}

fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    synced: Option<mpsc::Sender<sync::Pending>>,
) {
    let max_batch = shared.cfg.max_batch.max(1);
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(max_batch - 1));
        let mut ctx = Ctx {
            conn: &conn,
            now: now_millis(),
            cfg: &shared.cfg,
            events: Vec::new(),
            wake: 0,
            cancels: Vec::new(),
            claimed: Vec::new(),
            due: Millis::MAX,
            due_recomputed: None,
            next_due: shared.next_due.load(Ordering::Acquire),
            queued: shared.queued.load(Ordering::Acquire) as i64,
            aborted: None,
        };
        // A failed BEGIN leaves the connection in autocommit mode, so every job below sees no
        // transaction and is answered with `begun`'s error without running. After a failed
        // fsync nothing more is written.
        let begun = match shared.durable.as_ref().and_then(sync::Durable::failure) {
            Some(e) => Err(e),
            None => conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| batch_error(e, QueueError::Begin)),
        };
        let replies: Vec<(Ack, Reply)> = batch.into_iter().map(|job| (job.ack, (job.run)(&mut ctx))).collect();
        let seq = shared.durable.as_ref().map(sync::Durable::begin_commit);
        let committed = begun.and_then(|()| match ctx.aborted.take() {
            Some(e) => Err(e),
            None => conn.execute_batch("COMMIT").map_err(|e| {
                let _ = conn.execute_batch("ROLLBACK");
                batch_error(e, QueueError::Commit)
            }),
        });
        let result = committed.as_ref().map(|_| ());
        match &committed {
            Ok(()) => publish_state(&shared, &mut ctx),
            Err(e) => tracing::error!(error = %e, "a queue write failed; nothing of it was stored"),
        }
        match (seq, &synced) {
            (Some(seq), Some(syncer)) => {
                // Workers hear now; events and outside callers once the sync thread has
                // fsynced this commit. A failed batch is answered at once (nothing of it is
                // visible); the sync thread still counts it, for the readers waiting on it.
                let mut later = Vec::new();
                for (ack, reply) in replies {
                    match ack {
                        Ack::Durable if committed.is_ok() => later.push(reply),
                        _ => reply(result),
                    }
                }
                let events = if committed.is_ok() { std::mem::take(&mut ctx.events) } else { Vec::new() };
                let pending = sync::Pending { seq, committed: committed.is_ok(), events, replies: later };
                if let Err(mpsc::SendError(p)) = syncer.send(pending) {
                    for reply in p.replies {
                        reply(Err(&QueueError::Closed));
                    }
                }
            }
            _ => {
                for e in ctx.events.drain(..) {
                    shared.bus.publish(e);
                }
                for (_, reply) in replies {
                    reply(result);
                }
            }
        }
    }
}

/// SQLite's "disk full" and "busy/locked" get their own variants; anything else is
/// [`QueueError::Storage`], in SQLite's words.
pub(crate) fn db(e: rusqlite::Error) -> QueueError {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => QueueError::DiskFull(e.to_string()),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => QueueError::Locked(e.to_string()),
        _ => QueueError::Storage(e.to_string()),
    }
}

/// `?` on a SQLite result inside this module: the error becomes a [`QueueError`] ([`db`]).
pub(crate) trait Sql<T> {
    fn sql(self) -> Result<T, QueueError>;
}

impl<T> Sql<T> for rusqlite::Result<T> {
    fn sql(self) -> Result<T, QueueError> {
        self.map_err(db)
    }
}

/// A batch-level failure: a full disk and a lock keep their own variants; anything else is
/// named after the step that failed (`BEGIN` or `COMMIT`).
fn batch_error(e: rusqlite::Error, step: fn(String) -> QueueError) -> QueueError {
    match db(e) {
        e @ (QueueError::DiskFull(_) | QueueError::Locked(_)) => e,
        e => step(e.to_string()),
    }
}

/// After a commit: fires cancels, registers claims and wakes workers (the events are the
/// caller's to publish, at once or after the fsync).
fn publish_state(shared: &Shared, ctx: &mut Ctx<'_>) {
    let base = ctx.due_recomputed.unwrap_or(ctx.next_due);
    shared.next_due.store(base.min(ctx.due), Ordering::Release);
    shared.queued.store(ctx.queued.max(0) as u64, Ordering::Release);
    {
        // Cancels first: a lease that expired and was claimed again in the same batch must
        // stop the old holder, not the new one.
        let mut running = shared.running.lock();
        for id in &ctx.cancels {
            if let Some(t) = running.remove(id) {
                t.cancel();
            }
        }
        for (id, token) in ctx.claimed.drain(..) {
            running.insert(id, token);
        }
        for id in ctx.events.iter().filter(|e| e.is_terminal()).filter_map(|e| e.task_id()) {
            running.remove(&id);
        }
    }
    // One worker per new claimable task, not all of them: no thundering herd of claims that
    // find nothing.
    for _ in 0..ctx.wake.min(1024) {
        shared.wakeup.notify_one();
    }
}

impl SqliteQueue {
    /// Tasks waiting to run (pending or retrying), as of the last commit.
    pub fn queued(&self) -> u64 {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// The next moment something falls due without any new write (a retry, a lease expiry).
    fn due(&self) -> Option<Millis> {
        let due = self.shared.next_due.load(Ordering::Acquire);
        (due != Millis::MAX).then_some(due)
    }
}

#[async_trait]
impl Parking for SqliteQueue {
    fn wakeup(&self) -> &Notify {
        &self.shared.wakeup
    }

    async fn next_due(&self) -> Result<Option<Millis>, QueueError> {
        Ok(self.due())
    }
}

#[async_trait]
impl TaskStore for SqliteQueue {
    async fn submit_bounded(&self, new: NewTask, max_queued: Option<u64>) -> Result<Submitted, QueueError> {
        self.write(Ack::Durable, move |ctx| ops::submit(ctx, new, max_queued)).await
    }

    async fn submit_then_watch(&self, new: NewTask, max_queued: Option<u64>) -> Result<Submitted, QueueError> {
        self.write(Ack::Commit, move |ctx| ops::submit(ctx, new, max_queued)).await
    }

    async fn get(&self, id: TaskId) -> Result<Option<Task>, QueueError> {
        self.read_inline(|c| ops::get(c, id)).await
    }

    async fn list(&self, query: TaskQuery) -> Result<TaskPage, QueueError> {
        self.read(move |c| ops::list(c, &query)).await
    }

    async fn counts(&self) -> Result<StatusCounts, QueueError> {
        self.read(ops::counts).await
    }

    async fn position(&self, id: TaskId) -> Result<Option<QueuePosition>, QueueError> {
        self.read_inline(|c| ops::position(c, id)).await
    }

    async fn cancel(&self, id: TaskId) -> Result<Task, QueueError> {
        self.write(Ack::Durable, move |ctx| ops::cancel(ctx, id)).await
    }
}

#[async_trait]
impl Dispatch for SqliteQueue {
    async fn claim(
        &self,
        worker: &WorkerId,
        caps: &Capabilities,
        lease: Duration,
    ) -> Result<Option<Claimed>, QueueError> {
        let (worker, caps) = (worker.clone(), caps.clone());
        self.write(Ack::Commit, move |ctx| ops::claim(ctx, &worker, &caps, lease)).await
    }

    async fn claim_wait(
        &self,
        worker: &WorkerId,
        caps: &Capabilities,
        lease: Duration,
        stop: &CancellationToken,
    ) -> Result<Option<Claimed>, QueueError> {
        park::claim_wait(self, worker, caps, lease, stop).await
    }

    async fn heartbeat(&self, lease: &Lease, ttl: Duration, progress: Progress<'_>) -> Result<LeaseStatus, QueueError> {
        let lease = lease.clone();
        let own = |s: Option<&str>| s.map(str::to_owned);
        let p = ops::OwnedProgress {
            backend: own(progress.backend),
            model: own(progress.model),
            remote: progress.remote,
            partial: own(progress.partial),
        };
        self.write(Ack::Commit, move |ctx| ops::heartbeat(ctx, &lease, ttl, p)).await
    }

    async fn complete(&self, lease: &Lease, done: Completion) -> Result<Task, QueueError> {
        let lease = lease.clone();
        self.write(Ack::Commit, move |ctx| ops::complete(ctx, &lease, done)).await
    }

    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<Task, QueueError> {
        let lease = lease.clone();
        self.write(Ack::Commit, move |ctx| ops::fail(ctx, &lease, failure)).await
    }

    async fn release(&self, lease: &Lease, why: Release) -> Result<(), QueueError> {
        let lease = lease.clone();
        self.write(Ack::Commit, move |ctx| ops::release(ctx, &lease, why)).await
    }

    async fn recover_node(&self, node: &str) -> Result<u64, QueueError> {
        let node = node.to_owned();
        self.write(Ack::Durable, move |ctx| ops::recover_node(ctx, &node)).await
    }

    async fn housekeep(&self) -> Result<(), QueueError> {
        self.write(Ack::Commit, ops::housekeep).await
    }
}

#[async_trait]
impl Nodes for SqliteQueue {
    async fn register(&self, node: &Node, ttl: Duration, replace: Option<u64>) -> Result<(), QueueError> {
        let node = node.clone();
        self.write(Ack::Durable, move |ctx| ops::register(ctx, &node, ttl, replace)).await
    }

    async fn renew(&self, node: &Node, ttl: Duration) -> Result<bool, QueueError> {
        let node = node.clone();
        self.write(Ack::Commit, move |ctx| ops::renew(ctx, &node, ttl)).await
    }

    async fn nodes(&self) -> Result<Vec<Node>, QueueError> {
        self.read(ops::nodes).await
    }

    async fn expire(&self) -> Result<Vec<Node>, QueueError> {
        self.write(Ack::Durable, ops::expire).await
    }

    async fn deregister(&self, id: &str, instance: u64) -> Result<(), QueueError> {
        let id = id.to_owned();
        self.write(Ack::Durable, move |ctx| ops::deregister(ctx, &id, instance)).await
    }
}

#[async_trait]
impl Outbox for SqliteQueue {
    async fn claim_id(&self, id: TaskId, worker: &WorkerId, lease: Duration) -> Result<Option<Claimed>, QueueError> {
        let worker = worker.clone();
        self.write(Ack::Commit, move |ctx| ops::claim_id(ctx, id, &worker, lease)).await
    }

    async fn undispatched(&self, limit: usize) -> Result<Vec<Undispatched>, QueueError> {
        self.write(Ack::Commit, move |ctx| ops::undispatched(ctx, limit)).await
    }

    async fn mark_dispatched(&self, marks: Vec<(TaskId, u64)>) -> Result<(), QueueError> {
        if marks.is_empty() {
            return Ok(());
        }
        self.write(Ack::Commit, move |ctx| ops::mark_dispatched(ctx, &marks)).await
    }

    async fn redeliver(&self) -> Result<u64, QueueError> {
        self.write(Ack::Commit, ops::redeliver).await
    }

    async fn next_due(&self) -> Result<Option<Millis>, QueueError> {
        Ok(self.due())
    }
}

/// The queue's semantics, once per durability level.
#[cfg(test)]
mod tests {
    const DURABILITY: super::Durability = super::Durability::Normal;
    include!("tests.rs");
}
#[cfg(test)]
mod tests_full {
    const DURABILITY: super::Durability = super::Durability::Full;
    include!("tests.rs");
}
