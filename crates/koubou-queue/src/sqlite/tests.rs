// SQLite's own behaviour on a real file, included once per durability level (`DURABILITY`):
// the conformance suite every queue passes (with the outbox and node registry cases), then
// what only SQLite has (migrations, its query plan, locks, a full disk, its batch errors).

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use koubou_task::{EventBus, EventLog, Usage};

use super::*;
use crate::{
    TaskQuery, TaskStore,
    backoff::Backoff,
    conformance::{FAST, Factory, new},
};

fn config() -> SqliteConfig {
    SqliteConfig { retry: FAST, durability: DURABILITY, ..SqliteConfig::default() }
}

fn open(dir: &tempfile::TempDir) -> SqliteQueue {
    SqliteQueue::open(dir.path().join("q.db"), config(), Arc::new(EventBus::default())).unwrap()
}

/// Queues on a file of their own, in a temporary directory, for the conformance suite.
struct Files;

impl Factory for Files {
    type Queue = SqliteQueue;
    type Place = tempfile::TempDir;
    fn place(&self) -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }
    async fn open(&self, dir: &tempfile::TempDir, retry: Backoff, events: Arc<dyn EventLog>) -> SqliteQueue {
        let cfg = SqliteConfig { retry, ..config() };
        SqliteQueue::open(dir.path().join("q.db"), cfg, events).unwrap()
    }
    fn queued(&self, q: &SqliteQueue) -> u64 {
        q.queued()
    }
}

crate::conformance_suite!(conformance, Files);

#[tokio::test]
async fn nodes_conform() {
    crate::conformance::nodes_register_renew_expire(&Files).await;
}

#[tokio::test]
async fn the_outbox_holds_what_no_confirmed_delivery_covers() {
    crate::conformance::outbox_holds_what_no_confirmed_delivery_covers(&Files).await;
}

#[tokio::test]
async fn claim_id_claims_exactly_that_task_when_claimable() {
    crate::conformance::claim_id_claims_exactly_that_task_when_claimable(&Files).await;
}

#[test]
fn a_version_1_file_migrates_and_keeps_its_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(schema::MIGRATION_1_FOR_TESTS).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO tasks (id, kind, prompt, priority, status, max_attempts, created_at, available_at, \
             prompt_tokens, completion_tokens, result) VALUES (?1, 'general', 'old', 5, 'completed', 3, 1, 1, 4, 2, 'r')",
            [koubou_task::TaskId::new().to_string()],
        )
        .unwrap();
    }
    let mut conn = rusqlite::Connection::open(&path).unwrap();
    schema::migrate(&mut conn).unwrap();
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, schema::VERSION);
    let t = conn.query_row(&format!("SELECT {} FROM tasks", rows::COLUMNS), [], rows::task_from_row).unwrap();
    assert_eq!((t.usage, t.warnings.len(), t.result.as_deref()), (Some(Usage::new(4, 2)), 0, Some("r")));
    assert!(t.tags.is_empty() && !t.json && t.schema.is_none() && t.remote.is_none() && t.cost.is_none());
}

/// The claim must walk the partial index in order, never sort the backlog.
#[test]
fn claim_plan_uses_the_claim_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = rusqlite::Connection::open(dir.path().join("p.db")).unwrap();
    schema::migrate(&mut conn).unwrap();
    let plan: Vec<String> = conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT seq FROM tasks INDEXED BY tasks_claim WHERE status = 'pending' \
             AND kind IN ('code') ORDER BY priority DESC, seq LIMIT 1",
        )
        .unwrap()
        .query_map([], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let plan = plan.join("; ");
    assert!(plan.contains("tasks_claim") && !plan.contains("TEMP B-TREE"), "{plan}");
}

/// A lock held by another process answers `Locked` within the busy timeout (not a 10 s hang and
/// not "the queue is shut down"), stores nothing, and the writer works again once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_holding_the_lock_is_locked_not_closed() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    q.submit(new("before", 5)).await.unwrap();
    let other = rusqlite::Connection::open(dir.path().join("q.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let e = tokio::time::timeout(BUSY_TIMEOUT * 10, q.submit(new("while locked", 5))).await.unwrap().unwrap_err();
    assert!(matches!(e, QueueError::Locked(_)), "{e:?}");
    assert!(e.is_transient());
    other.execute_batch("ROLLBACK").unwrap();
    q.submit(new("after", 5)).await.unwrap();
    let prompts: Vec<String> = q
        .list(TaskQuery { limit: 10, ..Default::default() })
        .await
        .unwrap()
        .tasks
        .into_iter()
        .map(|t| t.prompt)
        .collect();
    assert_eq!(prompts, ["after", "before"]);
    assert_eq!(q.queued(), 2);
}

/// A full database (SQLITE_FULL, here from `max_page_count`): the write is `DiskFull`, nothing
/// is half-stored, no event is published for it, and writes succeed again once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_disk_full_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let kept = q.submit(new("kept", 5)).await.unwrap().task.id;
    let pages: i64 = q.write(Ack::Durable, |ctx| ctx.conn.query_row("PRAGMA page_count", [], |r| r.get(0)).sql()).await.unwrap();
    q.write(Ack::Durable, move |ctx| ctx.conn.pragma_update(None, "max_page_count", pages).sql()).await.unwrap();
    let mut rx = q.bus().subscribe(None);
    let big = "x".repeat(64 << 10);
    let tries: Vec<_> = (0..8).map(|_| q.submit(new(&big, 5))).collect();
    let results = futures::future::join_all(tries).await;
    let refused = results.iter().filter(|r| matches!(r, Err(QueueError::DiskFull(_)))).count();
    assert_eq!(refused, results.len(), "{:?}", results.iter().map(|r| r.as_ref().err()).collect::<Vec<_>>());
    assert!(rx.next().now_or_never().is_none(), "nothing refused was published");
    assert_eq!(q.counts().await.unwrap().total(), 1);
    assert_eq!(q.queued(), 1);

    q.write(Ack::Durable, |ctx| ctx.conn.pragma_update(None, "max_page_count", 1_073_741_823i64).sql()).await.unwrap();
    q.submit(new(&big, 5)).await.unwrap();
    assert_eq!(q.get(kept).await.unwrap().unwrap().prompt, "kept");
    assert_eq!(q.counts().await.unwrap().pending, 2);
}

/// Write errors keep their own names: a failed BEGIN is not "shut down", a failed COMMIT is not
/// "corrupt", and a full disk or a lock is neither.
#[test]
fn batch_errors_are_named_after_their_cause() {
    let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
    let busy = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None);
    let io = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR), None);
    let io2 = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR), None);
    assert!(matches!(batch_error(full, QueueError::Begin), QueueError::DiskFull(_)));
    assert!(matches!(batch_error(busy, QueueError::Commit), QueueError::Locked(_)));
    let begin = batch_error(io, QueueError::Begin);
    assert!(matches!(begin, QueueError::Begin(_)) && begin.to_string().starts_with("could not start"), "{begin}");
    let commit = batch_error(io2, QueueError::Commit);
    assert!(matches!(commit, QueueError::Commit(_)) && commit.to_string().contains("nothing was stored"), "{commit}");
}

