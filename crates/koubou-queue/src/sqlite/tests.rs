// SQLite's own behaviour on a real file, included once per durability level (`DURABILITY`):
// the conformance suite every queue passes, then what only SQLite has (migrations, reopening a
// file, its query plan, its counters, locks, a full disk, the backoff settings).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt, StreamExt};
use koubou_task::{EventBus, EventLog, TaskStatus, Usage};

use super::*;
use crate::{
    Dispatch, Failure, Release, TaskQuery, TaskStore,
    backoff::Backoff,
    conformance::{ANY, Factory, LEASE, done, failure, new, w},
};

fn config() -> SqliteConfig {
    SqliteConfig { retry: Backoff { base_ms: 40, max_ms: 40, jitter: 0.0 }, durability: DURABILITY, ..SqliteConfig::default() }
}

fn open(dir: &tempfile::TempDir) -> SqliteQueue {
    SqliteQueue::open(dir.path().join("q.db"), config(), Arc::new(EventBus::default())).unwrap()
}

/// Queues on fresh files in one temporary directory, for the conformance suite.
struct Files {
    dir: tempfile::TempDir,
    opened: AtomicUsize,
}

fn files() -> Files {
    Files { dir: tempfile::tempdir().unwrap(), opened: AtomicUsize::new(0) }
}

impl Factory for Files {
    type Queue = SqliteQueue;
    async fn open(&self, events: Arc<dyn EventLog>) -> SqliteQueue {
        let n = self.opened.fetch_add(1, Ordering::Relaxed);
        SqliteQueue::open(self.dir.path().join(format!("q{n}.db")), config(), events).unwrap()
    }
}

crate::conformance_suite!(conformance, files());

#[tokio::test]
async fn nodes_conform() {
    crate::conformance::nodes_register_renew_expire(&files()).await;
}

#[tokio::test]
async fn a_retry_after_hint_delays_the_retry_past_the_backoff_up_to_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SqliteConfig {
        retry: Backoff { base_ms: 40, max_ms: 60_000, jitter: 0.0 },
        durability: DURABILITY,
        ..SqliteConfig::default()
    };
    let q = SqliteQueue::open(dir.path().join("q.db"), cfg, Arc::new(EventBus::default())).unwrap();
    let hinted = |secs| Failure { retry_after: Some(Duration::from_secs(secs)), ..failure(true) };
    q.submit(new("x", 5)).await.unwrap();
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    let before = koubou_task::now_millis();
    let after = q.fail(&c.lease, hinted(30)).await.unwrap();
    assert_eq!(after.status, TaskStatus::Retrying);
    assert!(
        after.available_at >= before + 30_000,
        "retry at {} (+{} ms)",
        after.available_at,
        after.available_at - before
    );
    assert!(after.available_at <= koubou_task::now_millis() + 30_000);
    // A hint beyond the cap waits the cap.
    q.submit(new("y", 5)).await.unwrap();
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    let before = koubou_task::now_millis();
    let after = q.fail(&c.lease, hinted(3_600)).await.unwrap();
    assert!((before + 60_000..=koubou_task::now_millis() + 60_000).contains(&after.available_at));
}

#[tokio::test]
async fn completion_keeps_cache_counts_and_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let t = q.submit(new("x", 5)).await.unwrap().task;
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    let usage = Usage { cache_read_tokens: Some(100), cache_write_tokens: Some(7), ..Usage::new(120, 5) };
    let warnings = vec!["the prompt may not fit".to_owned()];
    let finished = q.complete(&c.lease, Completion { usage, warnings: warnings.clone(), ..done("ok") }).await.unwrap();
    assert_eq!((finished.usage, finished.warnings.clone()), (Some(usage), warnings.clone()));
    drop(q);
    let q = open(&dir);
    let read = q.get(t.id).await.unwrap().unwrap();
    assert_eq!((read.usage, read.warnings), (Some(usage), warnings), "kept across a reopen");
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

#[tokio::test]
async fn survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = new("keep me", 5);
    t.tags = vec!["confidential".into(), "team:a".into()];
    t.schema = Some(serde_json::json!({"type": "object"}));
    let id = {
        let q = open(&dir);
        q.submit(t).await.unwrap().task.id
    };
    let t = open(&dir).get(id).await.unwrap().unwrap();
    assert_eq!((t.prompt.as_str(), t.tags.len(), t.json, t.schema.is_some()), ("keep me", 2, true, true));
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

/// The count `submit_bounded` checks (SQLite keeps it beside the table, updated at each commit)
/// is exactly what waits (pending + retrying), through every change of state, and is counted
/// again on open.
#[tokio::test]
async fn the_waiting_count_follows_every_state_change() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let limit = Some(3);
    for p in ["a", "b", "c"] {
        q.submit_bounded(new(p, 5), limit).await.unwrap();
    }
    assert_eq!(q.queued(), 3);
    assert!(matches!(q.submit_bounded(new("d", 5), limit).await, Err(QueueError::Full { .. })));
    assert_eq!(q.queued(), 3);

    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    assert_eq!(q.queued(), 2);
    q.submit_bounded(new("d", 5), limit).await.unwrap();
    q.fail(&c.lease, failure(true)).await.unwrap(); // retrying counts as waiting
    assert_eq!(q.queued(), 4);
    let c2 = q.claim(&w(2), &ANY, LEASE).await.unwrap().unwrap();
    q.release(&c2.lease, Release::Stopping).await.unwrap();
    assert_eq!(q.queued(), 4);
    q.cancel(c2.task.id).await.unwrap();
    let c3 = q.claim(&w(3), &ANY, LEASE).await.unwrap().unwrap();
    q.cancel(c3.task.id).await.unwrap(); // a running task leaves nothing to uncount
    q.recover_node("test").await.unwrap();
    let counts = q.counts().await.unwrap();
    assert_eq!(q.queued(), counts.pending + counts.retrying);
    drop(q);
    assert_eq!(open(&dir).queued(), counts.pending + counts.retrying, "counted again on open");
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

