//! `durability = "full"` without making the writer wait for the disk: pipelined group commit.
//!
//! SQLite runs with `synchronous=NORMAL`, so a `COMMIT` writes the batch's frames to the WAL
//! file (which already survives a kill of Koubou) and returns without an fsync. The writer hands
//! the committed batch to this module's thread and starts on the next one; the thread fsyncs
//! the WAL file once for everything handed to it meanwhile, then publishes the batches' events
//! and answers their callers, in commit order. So one fsync serves every batch committed while
//! the previous one was running, and the disk's latency no longer stalls the writer.
//!
//! What reveals a write waits for the fsync that covers it: the answer to a caller outside the
//! queue (a submit's or a cancel's), every event, and every read ([`Durable::settled`]: a read
//! that may have seen commit `n` is answered once commit `n` is on disk). Only the queue's own
//! workers hear of their claims, heartbeats and outcomes at commit: a worker is part of this
//! process, and a power cut that undoes its claim undoes the worker too.
//!
//! Why this is as safe as `synchronous=FULL`: an fsync of the WAL file (any descriptor of the
//! same file) makes durable every frame written to it before the call, and SQLite's own
//! checkpoints, even in NORMAL mode, fsync the WAL before copying it into the database and the
//! database before the WAL is reused. An fsync that fails is not retried (Linux may have dropped
//! the pages it could not write and would report the retry clean): the queue stops accepting
//! work and says to restart, as PostgreSQL does.

use std::{
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
};

use koubou_task::{EventKind, EventLog};
use tokio::sync::watch;

use crate::QueueError;

use super::Reply;

/// A committed (or failed) batch waiting for the fsync that covers it.
pub(super) struct Pending {
    /// The batch's number, from [`Durable::begin_commit`].
    pub seq: u64,
    /// Whether anything reached the WAL (a failed batch only advances the count).
    pub committed: bool,
    pub events: Vec<EventKind>,
    /// Callers answered once the fsync is done.
    pub replies: Vec<Reply>,
}

/// Commit numbering shared by the writer, the sync thread and readers.
pub(super) struct Durable {
    /// The last batch the writer started to commit (readers may see it from then on).
    committing: AtomicU64,
    /// The last batch known to be on disk.
    synced: watch::Sender<u64>,
    /// Set, for good, when an fsync failed.
    failed: OnceLock<String>,
}

impl Durable {
    pub fn new() -> Durable {
        Durable { committing: AtomicU64::new(0), synced: watch::Sender::new(0), failed: OnceLock::new() }
    }

    /// Numbers the batch about to commit. Called before `COMMIT`, so that any reader that can
    /// see the batch finds at least this number afterwards.
    pub fn begin_commit(&self) -> u64 {
        self.committing.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The error every write and read gets once an fsync failed.
    pub fn failure(&self) -> Option<QueueError> {
        self.failed.get().map(|m| QueueError::Sync(m.clone()))
    }

    /// Waits until everything a read that has just finished could have seen is on disk.
    pub async fn settled(&self) -> Result<(), QueueError> {
        let seen = self.committing.load(Ordering::Acquire);
        let mut rx = self.synced.subscribe();
        // The sender lives as long as `self`, so the wait ends only by reaching `seen`.
        let _ = rx.wait_for(|&n| n >= seen).await;
        self.failure().map_or(Ok(()), Err)
    }
}

/// How the sync thread reaches the disk: [`wal_syncer`] on a real queue; tests pass their own
/// to hold a sync back or make it fail.
pub(crate) type Syncer = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// fdatasync of the WAL file at `wal` (see [`sync_wal`]).
pub(super) fn wal_syncer(wal: PathBuf) -> Syncer {
    let mut file = None;
    Box::new(move || sync_wal(&mut file, &wal))
}

/// The sync thread: one `sync` for each group of pending batches, then their events are
/// published on `bus` and their callers answered.
pub(super) fn run(rx: mpsc::Receiver<Pending>, durable: &Durable, bus: &dyn EventLog, mut sync: Syncer) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        group.extend(rx.try_iter());
        let last = group.iter().map(|p| p.seq).max().unwrap_or(0);
        let outcome = match durable.failure() {
            Some(e) => Err(e),
            None if group.iter().any(|p| p.committed) => sync().map_err(|e| {
                let why = format!("fsync of the WAL: {e}");
                tracing::error!(error = %why, "the queue's writes may not be on disk; refusing work until restart");
                let _ = durable.failed.set(why.clone());
                QueueError::Sync(why)
            }),
            None => Ok(()),
        };
        if outcome.is_err() {
            // Readers waiting for this batch must not wait for ever: they see the failure.
            durable.synced.send_replace(u64::MAX);
        } else {
            durable.synced.send_replace(last);
        }
        for p in group {
            if outcome.is_ok() {
                for e in p.events {
                    bus.publish(e);
                }
            }
            for reply in p.replies {
                reply(outcome.as_ref().map(|_| ()));
            }
        }
    }
}

/// fdatasync of the WAL, through a descriptor kept open; reopened when the file at the path is
/// another one than the descriptor's (SQLite deleted and recreated it). A new file's directory
/// entry is synced too.
fn sync_wal(file: &mut Option<(File, u64)>, wal: &Path) -> std::io::Result<()> {
    let ino =
        std::fs::metadata(wal).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", wal.display())))?.ino();
    if file.as_ref().is_none_or(|(_, known)| *known != ino) {
        let f = File::options().read(true).write(true).open(wal)?;
        if let Some(dir) = wal.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        *file = Some((f, ino));
    }
    let (f, _) = file.as_ref().expect("opened above");
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use futures::{FutureExt, StreamExt};
    use koubou_task::{EventBus, NewTask, TaskKind, TaskStatus, WorkerId};
    use tokio::sync::mpsc::UnboundedReceiver;

    use super::*;
    use crate::{Capabilities, Dispatch, SqliteConfig, SqliteQueue, TaskQuery, TaskStore, sqlite::Durability};

    /// A full-durability queue whose syncs the test holds: each sync says it started, then
    /// waits for the outcome the test sends.
    fn held(dir: &tempfile::TempDir) -> (SqliteQueue, UnboundedReceiver<()>, mpsc::Sender<std::io::Result<()>>) {
        let (started_tx, started) = tokio::sync::mpsc::unbounded_channel();
        let (release, outcomes) = mpsc::channel::<std::io::Result<()>>();
        let syncer: Syncer = Box::new(move || {
            let _ = started_tx.send(());
            outcomes.recv().unwrap_or_else(|_| Err(std::io::Error::other("test ended")))
        });
        let cfg = SqliteConfig { durability: Durability::Full, ..SqliteConfig::default() };
        let q =
            SqliteQueue::open_with(dir.path().join("q.db"), cfg, Arc::new(EventBus::default()), Some(syncer)).unwrap();
        (q, started, release)
    }

    const LEASE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn answers_events_and_reads_wait_for_the_sync_while_workers_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let (q, mut started, release) = held(&dir);
        let q = Arc::new(q);
        let mut events = q.bus().subscribe(None);

        let submit = tokio::spawn({
            let q = q.clone();
            async move { q.submit(NewTask::new(TaskKind::general(), "p")).await }
        });
        started.recv().await.unwrap();
        // Committed, not yet on disk: the submitter and every reader wait, no event is out...
        let list = tokio::spawn({
            let q = q.clone();
            async move { q.list(TaskQuery::default()).await }
        });
        // ...but a worker claims the committed task at once: the writer is not held by the sync.
        let claimed =
            q.claim(&WorkerId::new("t", 1), &Capabilities::any(), LEASE).await.unwrap().expect("the task is claimable");
        assert!(!submit.is_finished(), "the submitter was answered before the sync");
        assert!(!list.is_finished(), "a read was answered before the sync");
        assert!(events.next().now_or_never().is_none(), "an event was published before the sync");

        release.send(Ok(())).unwrap(); // the submit's batch
        let task = submit.await.unwrap().unwrap().task;
        assert_eq!(task.id, claimed.task.id);
        assert_eq!(events.next().await.unwrap().unwrap().kind.name(), "task_created");
        // The claim's batch is the next sync's; a read that may have seen it waits for it.
        started.recv().await.unwrap();
        release.send(Ok(())).unwrap();
        assert_eq!(events.next().await.unwrap().unwrap().kind.name(), "task_claimed");
        assert_eq!(list.await.unwrap().unwrap().tasks.len(), 1);
        let got = q.get(task.id).await.unwrap().unwrap();
        assert_eq!(got.status, TaskStatus::Running);
    }

    #[tokio::test]
    async fn a_submitter_that_watches_is_answered_at_commit_and_its_read_waits() {
        let dir = tempfile::tempdir().unwrap();
        let (q, mut started, release) = held(&dir);
        let mut events = q.bus().subscribe(None);
        let task = q.submit_then_watch(NewTask::new(TaskKind::general(), "p"), None).await.unwrap().task;
        started.recv().await.unwrap();
        assert!(events.next().now_or_never().is_none(), "an event was published before the sync");
        // What it then reads of its task waits for the disk like every read.
        let q = Arc::new(q);
        let read = tokio::spawn({
            let q = q.clone();
            async move { q.get(task.id).await }
        });
        tokio::task::yield_now().await;
        assert!(!read.is_finished(), "a read was answered before the sync");
        release.send(Ok(())).unwrap();
        assert_eq!(read.await.unwrap().unwrap().unwrap().id, task.id);
        assert_eq!(events.next().await.unwrap().unwrap().kind.name(), "task_created");
    }

    #[tokio::test]
    async fn a_failed_sync_fails_its_callers_and_stops_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let (q, mut started, release) = held(&dir);
        let q = Arc::new(q);
        let mut events = q.bus().subscribe(None);
        let submit = tokio::spawn({
            let q = q.clone();
            async move { q.submit(NewTask::new(TaskKind::general(), "p")).await }
        });
        started.recv().await.unwrap();
        release.send(Err(std::io::Error::other("EIO"))).unwrap();
        let e = submit.await.unwrap().unwrap_err();
        assert!(matches!(e, QueueError::Sync(ref m) if m.contains("EIO")), "{e}");
        assert!(events.next().now_or_never().is_none(), "the failed batch's event was published");
        // From now on every write and read is refused with the same reason, and none waits.
        let again = q.submit(NewTask::new(TaskKind::general(), "q")).await.unwrap_err();
        assert!(matches!(again, QueueError::Sync(_)), "{again}");
        let read = q.list(TaskQuery::default()).await.unwrap_err();
        assert!(matches!(read, QueueError::Sync(_)), "{read}");
    }

    #[test]
    fn the_real_sync_follows_the_wal_file_when_it_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("q.db-wal");
        let mut sync = wal_syncer(wal.clone());
        let missing = sync().unwrap_err();
        assert!(missing.to_string().contains("q.db-wal"), "{missing}");
        std::fs::write(&wal, b"one").unwrap();
        sync().unwrap();
        std::fs::remove_file(&wal).unwrap();
        std::fs::write(&wal, b"two").unwrap();
        sync().unwrap();
    }
}
