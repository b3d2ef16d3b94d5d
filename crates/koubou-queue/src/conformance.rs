//! The queue's semantics as one suite that every implementation passes unchanged.
//!
//! Each case is a function over a [`Factory`] that opens queues on a place of their own (a
//! file, a namespace), fresh and empty, and opens them again on the same place to see what was
//! kept; [`run_all`] runs them one after another, and [`conformance_suite!`](crate::conformance_suite)
//! makes one `#[tokio::test]` per case (what `SqliteQueue` runs at both durability levels,
//! `RedisQueue` against a real Redis and `AmqpDispatch` against a real RabbitMQ). The life of a
//! task is pinned down by `insta` snapshots of the stored task at each step
//! (`snapshots/koubou_queue__conformance__lifecycle_*.snap`, ids and times redacted): every
//! implementation is compared against the same files.
//!
//! Outside [`run_all`], for the queues that have what they need: the [`Outbox`] cases
//! ([`outbox_holds_what_no_confirmed_delivery_covers`],
//! [`claim_id_claims_exactly_that_task_when_claimable`]), the [`Nodes`] case
//! ([`nodes_register_renew_expire`]), and [`two_instances_claim_each_task_once`] for queues
//! shared by several instances.
//!
//! What a factory must give: queues whose tasks get 3 attempts unless they ask for another
//! number (the snapshots show `max_attempts`), retrying after the backoff they are opened with,
//! publishing their events to the log they are handed.
//!
//! Built for this crate's tests and, with the `conformance` feature, for other crates' tests:
//! ```ignore
//! struct Redis;
//! impl koubou_queue::conformance::Factory for Redis {
//!     type Queue = RedisQueue;
//!     type Place = Namespace; // deletes its keys when dropped
//!     fn place(&self) -> Namespace { Namespace::new() }
//!     async fn open(&self, ns: &Namespace, retry: Backoff, events: Arc<dyn EventLog>) -> RedisQueue { /* … */ }
//!     fn queued(&self, q: &RedisQueue) -> u64 { q.queued() }
//! }
//! koubou_queue::conformance_suite!(redis_conformance, Redis);
//! ```

use std::{collections::HashSet, future::Future, sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt};
use koubou_task::{Cursor, EventBus, EventLog, NewTask, Priority, Task, TaskId, TaskKind, TaskStatus, Usage, WorkerId};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    Capabilities, Completion, Dispatch, Failure, LeaseStatus, Node, NodeBackend, NodeLoad, Nodes, Outbox, Progress,
    QueueError, Release, TaskQuery, TaskQueue, TaskStore, backoff::Backoff,
};

/// Opens the queues a case runs on.
pub trait Factory: Send + Sync {
    type Queue: TaskQueue;
    /// Where a queue keeps its tasks (a file, a namespace); cleaned up when dropped.
    type Place: Send + Sync;
    /// A fresh, empty place (nothing another case or an earlier call wrote).
    fn place(&self) -> Self::Place;
    /// A queue over `place` — opened again on the same place, it finds what was stored there —
    /// retrying failed tasks after `retry`, publishing its events to `events`.
    fn open(
        &self,
        place: &Self::Place,
        retry: Backoff,
        events: Arc<dyn EventLog>,
    ) -> impl Future<Output = Self::Queue> + Send;
    /// The queue's own count of waiting tasks (pending or retrying) as of its last write: what
    /// `submit_bounded` checks, kept beside the tasks.
    fn queued(&self, queue: &Self::Queue) -> u64;
}

/// Runs every case, one after another, each on a queue of its own.
pub async fn run_all<F: Factory>(f: &F) {
    crate::__conformance_cases!(@run f);
}

/// One `#[tokio::test]` per conformance case, in a module `$name`, each on queues from the
/// factory `$factory` (an expression, evaluated once per test, where the macro is called).
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $factory:expr) => {
        $crate::__conformance_cases!(@tests $name, $factory);
    };
}

/// The cases, named once for [`run_all`] and [`conformance_suite!`](crate::conformance_suite).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($($how:tt)*) => {
        $crate::__conformance_each!($($how)*;
            lifecycle_snapshots,
            priority_then_fifo,
            claims_filter_by_kind,
            claims_filter_by_declared_tags,
            a_task_a_worker_cannot_serve_waits_before_it_is_claimable_again,
            concurrent_claims_never_double,
            retry_with_backoff_then_fail,
            non_retryable_fails_at_once,
            expired_lease_requeues_and_fences_the_old_worker,
            housekeeping_requeues_expired_leases_without_a_claim,
            lease_expiry_after_last_attempt_fails,
            heartbeat_renews_and_records_progress,
            cancel_pending_and_running,
            release_gives_the_attempt_back,
            idempotency_key_returns_the_first_task,
            recover_node_requeues_its_running_tasks,
            list_filters_and_pages_newest_first,
            position_counts_who_goes_first,
            events_tell_the_story,
            idle_worker_wakes_on_submit,
            a_full_queue_refuses_and_stores_nothing,
            the_waiting_count_follows_every_state_change,
            tags_format_and_where_it_ran_are_stored_and_filtered,
            a_retry_after_hint_delays_the_retry_past_the_backoff_up_to_its_cap,
            completion_keeps_cache_counts_and_warnings,
            survives_reopen
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_each {
    (@run $f:expr; $($case:ident),*) => {
        $( $crate::conformance::$case($f).await; )*
    };
    (@tests $name:ident, $factory:expr; $($case:ident),*) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    $crate::conformance::$case(&$factory).await;
                }
            )*
        }
    };
}

/// The log a case's queue publishes to.
pub(crate) fn events() -> Arc<dyn EventLog> {
    Arc::new(EventBus::default())
}

pub(crate) fn new(prompt: &str, priority: i64) -> NewTask {
    NewTask { priority: Priority::new(priority).unwrap(), ..NewTask::new(TaskKind::general(), prompt) }
}

pub(crate) fn w(n: usize) -> WorkerId {
    WorkerId::new("test", n)
}

pub(crate) const LEASE: Duration = Duration::from_secs(30);

pub(crate) const ANY: Capabilities = Capabilities { kinds: None, tags: None };

/// The retry backoff of most cases: short, and without jitter.
pub(crate) const FAST: Backoff = Backoff { base_ms: 40, max_ms: 40, jitter: 0.0 };

/// A fresh place and a queue on it (with [`FAST`] retries and a log of its own). Bind the place
/// to a name (`_place`, not `_`): it is cleaned up when dropped.
async fn fresh<F: Factory>(f: &F) -> (F::Place, F::Queue) {
    let place = f.place();
    let q = f.open(&place, FAST, events()).await;
    (place, q)
}

/// Polls `f` until it yields, with a bound generous enough for a loaded machine.
pub(crate) async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(crate) fn done(text: &str) -> Completion {
    Completion {
        result: text.into(),
        backend: "b".into(),
        model: "m".into(),
        usage: Usage::new(3, 5),
        warnings: vec![],
        remote: false,
        cost: None,
    }
}

pub(crate) fn failure(retryable: bool) -> Failure {
    Failure {
        error: "boom".into(),
        retryable,
        backend: None,
        model: None,
        remote: None,
        partial: None,
        retry_after: None,
    }
}

/// Snapshots the stored task under `step`, its id and times redacted (a time that is unset stays
/// null: when a time is set is part of the story).
fn snapshot(step: &str, task: &Task) {
    let time = || insta::dynamic_redaction(|v, _| if v.is_nil() { v } else { "[time]".into() });
    insta::with_settings!({ snapshot_suffix => step, prepend_module_to_snapshot => true }, {
        insta::assert_json_snapshot!("lifecycle", task, {
            ".id" => "[id]",
            ".created_at" => time(),
            ".started_at" => time(),
            ".finished_at" => time(),
            ".available_at" => time(),
            ".lease_until" => time(),
        });
    });
}

/// The whole life of tasks, step by step, as stored: created, claimed, heartbeat (progress
/// recorded), retrying, completed; failed; cancelled; released by a worker that cannot serve it.
pub async fn lifecycle_snapshots<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    let mut t = new("lifecycle", 7);
    t.tags = vec!["team:a".into()];
    t.metadata.insert("ticket".into(), "K-14".into());
    let t = q.submit(t).await.unwrap().task;
    snapshot("created", &q.get(t.id).await.unwrap().unwrap());
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    snapshot("claimed", &q.get(t.id).await.unwrap().unwrap());
    let p = Progress { backend: Some("ollama"), model: Some("gemma2:2b"), remote: Some(false), partial: Some("Hel") };
    assert_eq!(q.heartbeat(&c.lease, LEASE, p).await.unwrap(), LeaseStatus::Held);
    snapshot("heartbeat", &q.get(t.id).await.unwrap().unwrap());
    let partial = Failure { partial: Some("Hel".into()), backend: Some("ollama".into()), ..failure(true) };
    q.fail(&c.lease, partial).await.unwrap();
    snapshot("retrying", &q.get(t.id).await.unwrap().unwrap());
    let c = q.claim_wait(&w(2), &ANY, LEASE, &CancellationToken::new()).await.unwrap().unwrap();
    q.complete(&c.lease, done("Hello")).await.unwrap();
    snapshot("completed", &q.get(t.id).await.unwrap().unwrap());

    let t = q.submit(new("doomed", 5)).await.unwrap().task;
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    q.fail(&c.lease, failure(false)).await.unwrap();
    snapshot("failed", &q.get(t.id).await.unwrap().unwrap());

    let t = q.submit(new("unwanted", 5)).await.unwrap().task;
    q.cancel(t.id).await.unwrap();
    snapshot("cancelled", &q.get(t.id).await.unwrap().unwrap());

    let t = q.submit(new("elsewhere", 5)).await.unwrap().task;
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    let why = Release::CannotServe { reason: "not routable here".into(), wait: LEASE };
    q.release(&c.lease, why).await.unwrap();
    snapshot("released", &q.get(t.id).await.unwrap().unwrap());
}

/// `submit_bounded` refuses once `max_queued` tasks wait (pending or retrying), stores nothing
/// of a refused task, and never refuses a resubmission of a stored one.
pub async fn a_full_queue_refuses_and_stores_nothing<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    let limit = Some(3);
    let mut keyed = new("keyed", 5);
    keyed.idempotency_key = Some("k".into());
    let first = q.submit_bounded(keyed.clone(), limit).await.unwrap();
    q.submit_bounded(new("b", 5), limit).await.unwrap();
    q.submit_bounded(new("c", 1), limit).await.unwrap();
    match q.submit_bounded(new("d", 5), limit).await {
        Err(QueueError::Full { queued: 3, limit: 3 }) => {}
        other => panic!("expected Full, got {other:?}"),
    }
    let again = q.submit_bounded(keyed, limit).await.unwrap();
    assert!(!again.created && again.task.id == first.task.id, "an idempotent resubmission is never refused");
    assert_eq!(q.counts().await.unwrap().total(), 3, "the refused task was not stored");
    // A running task does not wait; a retrying one does.
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    q.submit_bounded(new("d", 5), limit).await.unwrap();
    q.fail(&c.lease, failure(true)).await.unwrap();
    assert!(matches!(q.submit_bounded(new("e", 5), Some(4)).await, Err(QueueError::Full { queued: 4, limit: 4 })));
}

pub async fn priority_then_fifo<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    for (p, prio) in [("a", 5), ("b", 8), ("c", 5), ("d", 10), ("e", 8), ("f", 1)] {
        q.submit(new(p, prio)).await.unwrap();
    }
    let mut order = String::new();
    while let Some(c) = q.claim(&w(1), &ANY, LEASE).await.unwrap() {
        order.push_str(&c.task.prompt);
        assert_eq!(c.task.status, TaskStatus::Running);
        assert_eq!(c.task.attempts, 1);
    }
    assert_eq!(order, "dbeacf");
}

pub async fn claims_filter_by_kind<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    q.submit(new("g", 5)).await.unwrap();
    q.submit(NewTask::new(TaskKind::parse("code").unwrap(), "c")).await.unwrap();
    let code = [TaskKind::parse("code").unwrap()];
    let c = q.claim(&w(1), &Capabilities::kinds(code.clone()), LEASE).await.unwrap().unwrap();
    assert_eq!(c.task.prompt, "c");
    assert!(q.claim(&w(1), &Capabilities::kinds(code.clone()), LEASE).await.unwrap().is_none());
    assert!(q.claim(&w(1), &Capabilities::kinds([]), LEASE).await.unwrap().is_none());
}

/// A worker that declares tags claims only tasks whose every tag it declares (untagged ones
/// always); one that declares none claims any.
pub async fn claims_filter_by_declared_tags<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    for (prompt, tags) in [("gpu", &["gpu"][..]), ("gpu+team", &["gpu", "team:a"]), ("plain", &[])] {
        let mut t = new(prompt, 5);
        t.tags = tags.iter().map(|t| t.to_string()).collect();
        q.submit(t).await.unwrap();
    }
    let gpu = Capabilities { kinds: None, tags: Some(vec!["gpu".into()]) };
    let mut got = Vec::new();
    while let Some(c) = q.claim(&w(1), &gpu, LEASE).await.unwrap() {
        assert!(gpu.serves(&c.task), "{:?}", c.task.tags);
        got.push(c.task.prompt);
    }
    assert_eq!(got, ["gpu", "plain"]);
    let c = q.claim(&w(2), &ANY, LEASE).await.unwrap().unwrap();
    assert_eq!(c.task.prompt, "gpu+team");
}

/// A task handed back because the worker cannot serve it waits (retrying, its reason kept)
/// before anyone may claim it again, and its attempt does not count.
pub async fn a_task_a_worker_cannot_serve_waits_before_it_is_claimable_again<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    let t = q.submit(new("x", 5)).await.unwrap().task;
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    let wait = Duration::from_millis(300);
    let released = std::time::Instant::now();
    q.release(&c.lease, Release::CannotServe { reason: "no such backend".into(), wait }).await.unwrap();
    let after = q.get(t.id).await.unwrap().unwrap();
    assert_eq!(
        (after.status, after.attempts, after.error.as_deref()),
        (TaskStatus::Retrying, 0, Some("no such backend"))
    );
    // Not claimable before its wait ended (a loaded machine may only get here after it).
    let again = match q.claim(&w(2), &ANY, LEASE).await.unwrap() {
        Some(early) => {
            assert!(released.elapsed() >= wait, "claimable before its wait ended");
            early
        }
        None => q.claim_wait(&w(2), &ANY, LEASE, &CancellationToken::new()).await.unwrap().unwrap(),
    };
    assert_eq!((again.task.id, again.task.attempts), (t.id, 1));
}

/// Many claimers racing over many tasks while many submitters add them: every task is claimed
/// exactly once.
pub async fn concurrent_claims_never_double<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    let q = Arc::new(q);
    const N: usize = 2000;
    const SUBMITTERS: usize = 16;
    let claimers = claimers(std::slice::from_ref(&q), 32, N);
    // Submitters start once the claimers are racing, each sending its share all at once.
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|s| {
            let q = q.clone();
            tokio::spawn(async move {
                let mine = (s..N).step_by(SUBMITTERS).map(|i| q.submit(new(&i.to_string(), (i % 10) as i64 + 1)));
                // Polled together: each submit is its own job for the writer's group commit.
                for r in futures::future::join_all(mine).await {
                    r.unwrap();
                }
            })
        })
        .collect();
    for s in submitters {
        s.await.unwrap();
    }
    let seen = claimed_once(claimers, Duration::from_secs(300)).await;
    assert_eq!(seen.len(), N);
    assert_eq!(q.counts().await.unwrap().completed, N as u64);
}

pub async fn retry_with_backoff_then_fail<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    let t = q.submit(NewTask { max_attempts: Some(2), ..new("x", 5) }).await.unwrap().task;
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    let after = q.fail(&c.lease, failure(true)).await.unwrap();
    assert_eq!(after.status, TaskStatus::Retrying);
    assert!(q.claim(&w(1), &ANY, LEASE).await.unwrap().is_none(), "claimable before its backoff ended");
    // claim_wait sleeps until the backoff ends, then gets it.
    let c = q.claim_wait(&w(1), &ANY, LEASE, &CancellationToken::new()).await.unwrap().unwrap();
    assert_eq!((c.task.id, c.task.attempts), (t.id, 2));
    let last = q.fail(&c.lease, failure(true)).await.unwrap();
    assert_eq!(last.status, TaskStatus::Failed);
    assert_eq!(last.error.as_deref(), Some("boom"));
    assert!(last.finished_at.is_some());
}

pub async fn non_retryable_fails_at_once<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    q.submit(new("x", 5)).await.unwrap();
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    assert_eq!(q.fail(&c.lease, failure(false)).await.unwrap().status, TaskStatus::Failed);
}

pub async fn expired_lease_requeues_and_fences_the_old_worker<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    q.submit(new("x", 5)).await.unwrap();
    let old = q.claim(&w(1), &ANY, Duration::from_millis(30)).await.unwrap().unwrap();
    let c = q.claim_wait(&w(2), &ANY, LEASE, &CancellationToken::new()).await.unwrap().unwrap();
    assert_eq!(c.task.id, old.task.id);
    assert_eq!(c.task.attempts, 2);
    assert!(old.cancel.is_cancelled(), "the old worker is told to stop");
    assert!(matches!(q.complete(&old.lease, done("late")).await, Err(QueueError::Conflict { .. })));
    assert_eq!(q.heartbeat(&old.lease, LEASE, Progress::default()).await.unwrap(), LeaseStatus::Lost);
    let t = q.complete(&c.lease, done("on time")).await.unwrap();
    assert_eq!(t.result.as_deref(), Some("on time"));
}

/// A node with no workers (a controller alone) still recovers tasks whose lease ran out; a lease
/// that holds is left alone, whoever holds it.
pub async fn housekeeping_requeues_expired_leases_without_a_claim<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    q.submit(new("held", 5)).await.unwrap();
    let held = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    q.submit(new("lost", 5)).await.unwrap();
    let old = q.claim(&w(2), &ANY, Duration::from_millis(30)).await.unwrap().unwrap();
    let t = until("the short lease to be requeued", async || {
        q.housekeep().await.unwrap();
        let t = q.get(old.task.id).await.unwrap().unwrap();
        (t.status == TaskStatus::Pending).then_some(t)
    })
    .await;
    assert_eq!((t.attempts, t.worker_id), (1, None), "requeued, its attempt counted");
    assert!(old.cancel.is_cancelled(), "the old worker is told to stop");
    assert_eq!(q.heartbeat(&old.lease, LEASE, Progress::default()).await.unwrap(), LeaseStatus::Lost);
    assert!(matches!(q.complete(&old.lease, done("late")).await, Err(QueueError::Conflict { .. })));
    let h = q.get(held.task.id).await.unwrap().unwrap();
    assert_eq!(h.status, TaskStatus::Running, "a lease that holds is left alone");
    // Waiting: a dispatcher outside the store (RabbitMQ) hands it out once its sweep published it.
    let c = q.claim_wait(&w(3), &ANY, LEASE, &CancellationToken::new()).await.unwrap().unwrap();
    assert_eq!((c.task.id, c.lease.attempt), (old.task.id, 2));
}

pub async fn lease_expiry_after_last_attempt_fails<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    q.submit(NewTask { max_attempts: Some(1), ..new("x", 5) }).await.unwrap();
    let c = q.claim(&w(1), &ANY, Duration::from_millis(20)).await.unwrap().unwrap();
    // Claims find the expired lease and fail the task (its only attempt is spent): never hand
    // it out again, however long the wait for the expiry takes.
    let t = until("the lease to expire", async || {
        assert!(q.claim(&w(2), &ANY, LEASE).await.unwrap().is_none(), "a task with no attempts left was handed out");
        let t = q.get(c.task.id).await.unwrap().unwrap();
        (t.status == TaskStatus::Failed).then_some(t)
    })
    .await;
    assert!(t.error.unwrap().contains("lease expired"));
}

pub async fn heartbeat_renews_and_records_progress<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    q.submit(new("x", 5)).await.unwrap();
    let c = q.claim(&w(1), &ANY, Duration::from_millis(200)).await.unwrap().unwrap();
    let claimed_until = q.get(c.task.id).await.unwrap().unwrap().lease_until.unwrap();
    let p = Progress { backend: Some("ollama"), model: Some("gemma2:2b"), remote: Some(false), partial: Some("Hel") };
    let before = koubou_task::now_millis();
    assert_eq!(q.heartbeat(&c.lease, LEASE, p).await.unwrap(), LeaseStatus::Held);
    let t = q.get(c.task.id).await.unwrap().unwrap();
    assert_eq!((t.partial.as_deref(), t.backend.as_deref(), t.remote), (Some("Hel"), Some("ollama"), Some(false)));
    assert!(t.lease_until.unwrap() >= before + LEASE.as_millis() as i64, "renewed for the whole ttl");
    // Past the lease it was claimed with, the renewed one still holds.
    until("the first lease to run out", async || (koubou_task::now_millis() > claimed_until + 50).then_some(())).await;
    assert!(q.claim(&w(2), &ANY, LEASE).await.unwrap().is_none(), "renewed lease must not expire");
}

pub async fn cancel_pending_and_running<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    let a = q.submit(new("a", 9)).await.unwrap().task;
    let b = q.submit(new("b", 1)).await.unwrap().task;
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    assert_eq!(c.task.id, a.id);
    assert_eq!(q.cancel(b.id).await.unwrap().status, TaskStatus::Cancelled);
    assert!(q.claim(&w(2), &ANY, LEASE).await.unwrap().is_none(), "a cancelled task is never claimed");
    q.cancel(a.id).await.unwrap();
    assert!(c.cancel.is_cancelled(), "the running worker's token fires");
    assert_eq!(q.heartbeat(&c.lease, LEASE, Progress::default()).await.unwrap(), LeaseStatus::Cancelled);
    assert!(matches!(q.complete(&c.lease, done("x")).await, Err(QueueError::Conflict { .. })));
    assert!(matches!(q.cancel(a.id).await, Err(QueueError::Conflict { status: TaskStatus::Cancelled, .. })));
    assert!(matches!(q.cancel(koubou_task::TaskId::new()).await, Err(QueueError::NotFound(_))));
}

pub async fn release_gives_the_attempt_back<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    q.submit(new("a", 5)).await.unwrap();
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    q.release(&c.lease, Release::Stopping).await.unwrap();
    let again = q.claim(&w(2), &ANY, LEASE).await.unwrap().unwrap();
    assert_eq!(again.task.attempts, 1);
}

pub async fn idempotency_key_returns_the_first_task<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    let mut n = new("a", 5);
    n.idempotency_key = Some("k1".into());
    let first = q.submit(n.clone()).await.unwrap();
    let second = q.submit(n).await.unwrap();
    assert!(first.created && !second.created);
    assert_eq!(first.task.id, second.task.id);
    assert_eq!(q.counts().await.unwrap().pending, 1);
}

pub async fn recover_node_requeues_its_running_tasks<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    q.submit(new("a", 5)).await.unwrap();
    q.submit(new("b", 5)).await.unwrap();
    q.claim(&WorkerId::new("serve", 1), &ANY, LEASE).await.unwrap().unwrap();
    q.claim(&WorkerId::new("other", 1), &ANY, LEASE).await.unwrap().unwrap();
    assert_eq!(q.recover_node("serve").await.unwrap(), 1);
    let c = q.counts().await.unwrap();
    assert_eq!((c.pending, c.running), (1, 1));
}

pub async fn list_filters_and_pages_newest_first<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    for i in 0..25 {
        let kind = if i % 2 == 0 { "general" } else { "code" };
        q.submit(NewTask::new(TaskKind::parse(kind).unwrap(), format!("prompt {i} 100%"))).await.unwrap();
    }
    let page = q.list(TaskQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(page.total, 25);
    assert_eq!(page.tasks[0].prompt, "prompt 24 100%");
    let page2 = q.list(TaskQuery { limit: 10, before: page.next_cursor, ..Default::default() }).await.unwrap();
    assert_eq!(page2.tasks[0].prompt, "prompt 14 100%");
    let page3 = q.list(TaskQuery { limit: 10, before: page2.next_cursor, ..Default::default() }).await.unwrap();
    assert_eq!((page3.tasks.len(), page3.next_cursor), (5, None));
    let code = q
        .list(TaskQuery { limit: 100, kind: Some(TaskKind::parse("code").unwrap()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(code.total, 12);
    let found = q.list(TaskQuery { limit: 100, search: Some("t 7 1".into()), ..Default::default() }).await.unwrap();
    assert_eq!(found.total, 1);
    let pct = q.list(TaskQuery { limit: 100, search: Some("0%".into()), ..Default::default() }).await.unwrap();
    assert_eq!(pct.total, 25, "% is matched literally");
    let pending =
        q.list(TaskQuery { limit: 5, statuses: vec![TaskStatus::Running], ..Default::default() }).await.unwrap();
    assert_eq!(pending.total, 0);
    let made_up =
        q.list(TaskQuery { limit: 10, before: Some(Cursor::new("no such cursor!")), ..Default::default() }).await;
    assert!(matches!(made_up, Err(QueueError::BadCursor(_))), "{made_up:?}");
}

pub async fn position_counts_who_goes_first<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    let a = q.submit(new("a", 5)).await.unwrap().task;
    let b = q.submit(new("b", 5)).await.unwrap().task;
    let c = q.submit(new("c", 9)).await.unwrap().task;
    assert_eq!(q.position(a.id).await.unwrap().unwrap().ahead, 1);
    assert_eq!(q.position(b.id).await.unwrap().unwrap().ahead, 2);
    assert_eq!(q.position(c.id).await.unwrap().unwrap().ahead, 0);
    q.claim(&w(1), &ANY, LEASE).await.unwrap();
    assert_eq!(q.position(c.id).await.unwrap(), None);
}

/// Events are published after commit, in order, with the task's story complete.
pub async fn events_tell_the_story<F: Factory>(f: &F) {
    let log = events();
    let place = f.place();
    let q = f.open(&place, FAST, log.clone()).await;
    let mut rx = log.subscribe(None);
    let t = q.submit(new("a", 5)).await.unwrap().task;
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    q.complete(&c.lease, done("ok")).await.unwrap();
    let mut names = Vec::new();
    for _ in 0..3 {
        let e = rx.next().await.unwrap().unwrap();
        assert_eq!(e.kind.task_id(), Some(t.id));
        names.push(e.kind.name());
    }
    assert_eq!(names, ["task_created", "task_claimed", "task_completed"]);
    assert!(rx.next().now_or_never().is_none(), "an event beyond the story: {:?}", rx.next().now_or_never());
}

/// A parked worker wakes as soon as a task arrives.
pub async fn idle_worker_wakes_on_submit<F: Factory>(f: &F) {
    let (_place, q) = fresh(f).await;
    let q = Arc::new(q);
    let q2 = q.clone();
    let waiter = tokio::spawn(async move { q2.claim_wait(&w(1), &ANY, LEASE, &CancellationToken::new()).await });
    // Give it time to find nothing and park. (Only an absence is asserted: a busy machine can
    // make the pause too short to reach the park, never make the assertion false.)
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "claim_wait returned with nothing to claim");
    let t = q.submit(new("wake", 5)).await.unwrap().task;
    let got = tokio::time::timeout(Duration::from_secs(120), waiter).await.unwrap().unwrap().unwrap().unwrap();
    assert_eq!(got.task.id, t.id);
    let stop = CancellationToken::new();
    stop.cancel();
    assert!(q.claim_wait(&w(1), &ANY, LEASE, &stop).await.unwrap().is_none());
}

pub async fn tags_format_and_where_it_ran_are_stored_and_filtered<F: Factory>(f: &F) {
    let (place, q) = fresh(f).await;
    let mut a = new("a", 5);
    a.tags = vec!["confidential".into(), "team:a".into()];
    a.schema = Some(serde_json::json!({"type": "object"}));
    let a = q.submit(a).await.unwrap().task;
    assert!(a.json, "a schema implies json");
    let mut b = new("b", 5);
    b.tags = vec!["team:b".into()];
    b.json = true;
    q.submit(b).await.unwrap();
    q.submit(new("c", 5)).await.unwrap();
    let tagged = |tag: &str| {
        let q = &q;
        let tag = tag.to_owned();
        async move {
            let page = q.list(TaskQuery { limit: 10, tag: Some(tag), ..Default::default() }).await.unwrap();
            page.tasks.into_iter().map(|t| t.prompt).collect::<Vec<_>>()
        }
    };
    assert_eq!(tagged("confidential").await, ["a"]);
    assert_eq!(tagged("team:b").await, ["b"]);
    assert!(tagged("team").await.is_empty(), "whole tags only");
    let got = q.get(a.id).await.unwrap().unwrap();
    assert_eq!(got.tags, ["confidential", "team:a"]);
    assert_eq!(got.schema, Some(serde_json::json!({"type": "object"})));
    assert_eq!((got.remote, got.cost), (None, None));

    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    let paid = Completion {
        remote: true,
        cost: Some(0.0105),
        usage: Usage { cache_read_tokens: Some(200), ..Usage::new(1000, 500) },
        ..done("ok")
    };
    let t = q.complete(&c.lease, paid).await.unwrap();
    assert_eq!((t.remote, t.cost), (Some(true), Some(0.0105)));
    assert_eq!(t.usage.unwrap().cache_read_tokens, Some(200));
    drop(q);
    let again = f.open(&place, FAST, events()).await.get(t.id).await.unwrap().unwrap();
    assert_eq!(
        (again.tags.len(), again.json, again.remote, again.cost),
        (2, true, Some(true), Some(0.0105)),
        "kept across a reopen"
    );
}

/// A task stored is found by a queue opened again on the same place, as it was submitted.
pub async fn survives_reopen<F: Factory>(f: &F) {
    let place = f.place();
    let mut t = new("keep me", 5);
    t.tags = vec!["confidential".into(), "team:a".into()];
    t.schema = Some(serde_json::json!({"type": "object"}));
    let id = f.open(&place, FAST, events()).await.submit(t).await.unwrap().task.id;
    let t = f.open(&place, FAST, events()).await.get(id).await.unwrap().unwrap();
    assert_eq!((t.prompt.as_str(), t.tags.len(), t.json, t.schema.is_some()), ("keep me", 2, true, true));
}

/// A backend's `Retry-After` puts the retry off past the backoff, but never past its cap.
pub async fn a_retry_after_hint_delays_the_retry_past_the_backoff_up_to_its_cap<F: Factory>(f: &F) {
    let place = f.place();
    let q = f.open(&place, Backoff { base_ms: 40, max_ms: 60_000, jitter: 0.0 }, events()).await;
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

/// Cache token counts and warnings are answered with the completion and kept across a reopen.
pub async fn completion_keeps_cache_counts_and_warnings<F: Factory>(f: &F) {
    let (place, q) = fresh(f).await;
    let t = q.submit(new("x", 5)).await.unwrap().task;
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    let usage = Usage { cache_read_tokens: Some(100), cache_write_tokens: Some(7), ..Usage::new(120, 5) };
    let warnings = vec!["the prompt may not fit".to_owned()];
    let finished = q.complete(&c.lease, Completion { usage, warnings: warnings.clone(), ..done("ok") }).await.unwrap();
    assert_eq!((finished.usage, finished.warnings.clone()), (Some(usage), warnings.clone()));
    drop(q);
    let read = f.open(&place, FAST, events()).await.get(t.id).await.unwrap().unwrap();
    assert_eq!((read.usage, read.warnings), (Some(usage), warnings), "kept across a reopen");
}

/// The count `submit_bounded` checks ([`Factory::queued`]) is exactly what waits (pending +
/// retrying), through every change of state, and is counted again on open.
pub async fn the_waiting_count_follows_every_state_change<F: Factory>(f: &F) {
    let (place, q) = fresh(f).await;
    let limit = Some(3);
    for p in ["a", "b", "c"] {
        q.submit_bounded(new(p, 5), limit).await.unwrap();
    }
    assert_eq!(f.queued(&q), 3);
    assert!(matches!(q.submit_bounded(new("d", 5), limit).await, Err(QueueError::Full { .. })));
    assert_eq!(f.queued(&q), 3);

    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    assert_eq!(f.queued(&q), 2);
    q.submit_bounded(new("d", 5), limit).await.unwrap();
    q.fail(&c.lease, failure(true)).await.unwrap(); // retrying counts as waiting
    assert_eq!(f.queued(&q), 4);
    let c2 = q.claim(&w(2), &ANY, LEASE).await.unwrap().unwrap();
    q.release(&c2.lease, Release::Stopping).await.unwrap();
    assert_eq!(f.queued(&q), 4);
    q.cancel(c2.task.id).await.unwrap();
    let c3 = q.claim(&w(3), &ANY, LEASE).await.unwrap().unwrap();
    q.cancel(c3.task.id).await.unwrap(); // a running task leaves nothing to uncount
    q.recover_node("test").await.unwrap();
    let counts = q.counts().await.unwrap();
    assert_eq!(f.queued(&q), counts.pending + counts.retrying);
    drop(q);
    let again = f.open(&place, FAST, events()).await;
    assert_eq!(f.queued(&again), counts.pending + counts.retrying, "counted again on open");
}

/// For a queue that is also the node registry ([`Nodes`]), outside [`run_all`] (call it with
/// the same factory): a node registers for a TTL; another run of the same node is refused while
/// that registration lives, unless it names the run it replaces; renewing keeps it alive, a
/// replaced run can no longer renew; each registration and renewal records what the node says of
/// its backends and load and the store's time as its last heartbeat; an expired node is handed
/// to exactly one sweeper, whose job is then to recover its running tasks.
pub async fn nodes_register_renew_expire<F: Factory>(f: &F)
where
    F::Queue: Nodes,
{
    let (_place, q) = fresh(f).await;
    let caps = Capabilities { kinds: Some(vec![TaskKind::general()]), tags: Some(vec!["gpu".into()]) };
    let first = Node::this_process("n1", "0.1.0", caps.clone());
    q.register(&first, LEASE, None).await.unwrap();
    let second = Node::this_process("n1", "0.1.0", caps);
    match q.register(&second, LEASE, None).await {
        Err(QueueError::NodeTaken(held)) => assert_eq!(held.instance, first.instance),
        other => panic!("a second run of a live node was not refused: {other:?}"),
    }
    assert!(q.renew(&first, LEASE).await.unwrap());
    q.register(&second, LEASE, Some(first.instance)).await.unwrap();
    assert!(!q.renew(&first, LEASE).await.unwrap(), "a replaced run renewed its registration");
    let listed = q.nodes().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].instance, &listed[0].capabilities), (second.instance, &second.capabilities));

    // What a node says of itself, and its heartbeat.
    let mut second = second;
    second.backends = vec![NodeBackend {
        name: "local".into(),
        kind: "ollama".into(),
        models: vec!["llama3.2".into(), "qwen2.5-coder".into()],
    }];
    second.load = NodeLoad { busy: 0, max_workers: 4 };
    q.register(&second, LEASE, Some(second.instance)).await.unwrap();
    let registered = q.nodes().await.unwrap().remove(0);
    assert_eq!((&registered.backends, registered.load), (&second.backends, second.load));
    assert!(registered.last_seen > 0 && registered.last_seen < registered.expires_at, "{registered:?}");
    tokio::time::sleep(Duration::from_millis(5)).await;
    second.load.busy = 3;
    second.backends[0].models.pop();
    assert!(q.renew(&second, LEASE).await.unwrap());
    let renewed = q.nodes().await.unwrap().remove(0);
    assert_eq!((&renewed.backends, renewed.load), (&second.backends, NodeLoad { busy: 3, max_workers: 4 }));
    assert!(renewed.last_seen > registered.last_seen, "a renewal is a heartbeat: {renewed:?}");
    assert!(renewed.expires_at > registered.expires_at);
    assert_eq!((renewed.started_at, &renewed.version), (second.started_at, &second.version));

    // A node that stops renewing: its running task is recovered by whoever sweeps it.
    let t = q.submit(new("orphan", 5)).await.unwrap().task;
    let ghost = Node::this_process("ghost", "0.1.0", Capabilities::any());
    q.register(&ghost, Duration::from_millis(30), None).await.unwrap();
    q.claim(&WorkerId::new("ghost", 1), &ANY, Duration::from_secs(600)).await.unwrap().unwrap();
    let dead = until("the ghost to expire", async || {
        let gone = q.expire().await.unwrap();
        (!gone.is_empty()).then_some(gone)
    })
    .await;
    assert_eq!(dead.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["ghost"]);
    assert!(q.expire().await.unwrap().is_empty(), "an expired node is handed out once");
    assert_eq!(q.recover_node("ghost").await.unwrap(), 1);
    assert_eq!(q.get(t.id).await.unwrap().unwrap().status, TaskStatus::Pending);
    // A later run of an expired node registers without naming it; a clean stop leaves nothing.
    let again = Node::this_process("ghost", "0.1.0", Capabilities::any());
    q.register(&again, LEASE, None).await.unwrap();
    q.deregister("ghost", again.instance).await.unwrap();
    assert_eq!(q.nodes().await.unwrap().iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["n1"]);
}

/// The prompts of the outbox's tasks, in its order.
async fn outbox_prompts<Q: Outbox>(q: &Q) -> Vec<String> {
    let mut prompts = Vec::new();
    for u in q.undispatched(100).await.unwrap() {
        prompts.push(q.get(u.id).await.unwrap().unwrap().prompt);
    }
    prompts
}

/// For a store that an outside dispatcher drives ([`Outbox`]), outside [`run_all`]: the outbox
/// holds the claimable tasks no confirmed delivery covers, most urgent first, with what a
/// delivery carries; a claim uses a delivery up; a cancelled task leaves.
pub async fn outbox_holds_what_no_confirmed_delivery_covers<F: Factory>(f: &F)
where
    F::Queue: Outbox,
{
    let (_place, q) = fresh(f).await;
    let a = q.submit(new("a", 5)).await.unwrap().task;
    let mut tagged = new("b", 9);
    tagged.tags = vec!["gpu".into()];
    let b = q.submit(tagged).await.unwrap().task;
    let c = q.submit(new("c", 5)).await.unwrap().task;
    let out = q.undispatched(100).await.unwrap();
    assert_eq!(out.iter().map(|u| u.id).collect::<Vec<_>>(), [b.id, a.id, c.id], "most urgent first");
    assert_eq!((out[0].priority.get(), out[0].claims, out[0].kind.as_str()), (9, 0, "general"));
    assert_eq!((out[0].tags.as_slice(), out[1].tags.as_slice()), (&["gpu".to_owned()][..], &[][..]));
    assert_eq!(q.undispatched(1).await.unwrap().len(), 1);

    q.mark_dispatched(vec![(a.id, 0), (b.id, 0)]).await.unwrap();
    assert_eq!(outbox_prompts(&q).await, ["c"]);

    // A claim uses the delivery up: released, the task needs a new one, and a mark made for
    // the old claim count changes nothing.
    let claimed = q.claim_id(a.id, &w(1), LEASE).await.unwrap().unwrap();
    assert_eq!((claimed.task.id, claimed.task.status, claimed.lease.attempt), (a.id, TaskStatus::Running, 1));
    q.release(&claimed.lease, Release::Stopping).await.unwrap();
    q.mark_dispatched(vec![(a.id, 0)]).await.unwrap();
    assert_eq!(outbox_prompts(&q).await, ["a", "c"]);
    let again = q.undispatched(100).await.unwrap();
    assert_eq!(again[0].claims, 1);
    q.mark_dispatched(vec![(a.id, 1), (c.id, 0)]).await.unwrap();
    assert!(q.undispatched(100).await.unwrap().is_empty());

    // A cancelled task leaves the outbox.
    let d = q.submit(new("d", 5)).await.unwrap().task;
    q.cancel(d.id).await.unwrap();
    assert!(q.undispatched(100).await.unwrap().is_empty());

    // The broker lost its deliveries: every pending task needs one again (each once, with its
    // claim count), a running one does not.
    let e = q.submit(new("e", 5)).await.unwrap().task;
    q.mark_dispatched(vec![(e.id, 0)]).await.unwrap();
    q.claim_id(c.id, &w(2), LEASE).await.unwrap().unwrap();
    assert_eq!(q.redeliver().await.unwrap(), 3);
    assert_eq!(outbox_prompts(&q).await, ["b", "a", "e"]);
    assert_eq!(q.undispatched(100).await.unwrap()[1].claims, 1);
    assert_eq!(q.redeliver().await.unwrap(), 0, "already in the outbox");
}

/// For an [`Outbox`] store, outside [`run_all`]: `claim_id` claims exactly the given task, and
/// only while it is claimable (not running, cancelled, unknown, or waiting for its retry, which
/// `next_due` announces); a retry that fell due and a lease that ran out put the task back in
/// the outbox with its claim count, the old holder fenced.
pub async fn claim_id_claims_exactly_that_task_when_claimable<F: Factory>(f: &F)
where
    F::Queue: Outbox,
{
    let log = events();
    let place = f.place();
    let q = f.open(&place, FAST, log.clone()).await;
    let mut rx = log.subscribe(None);
    let a = q.submit(new("a", 1)).await.unwrap().task;
    let b = q.submit(new("b", 9)).await.unwrap().task;
    let c = q.claim_id(a.id, &w(1), LEASE).await.unwrap().unwrap();
    assert_eq!(c.task.id, a.id, "the given task, not the most urgent one");
    assert_eq!(f.queued(&q), 1);
    assert!(q.claim_id(a.id, &w(2), LEASE).await.unwrap().is_none(), "running: not claimable");
    assert!(q.claim_id(TaskId::new(), &w(2), LEASE).await.unwrap().is_none(), "unknown");
    q.cancel(b.id).await.unwrap();
    assert!(q.claim_id(b.id, &w(2), LEASE).await.unwrap().is_none(), "cancelled");
    let names: Vec<_> =
        std::iter::from_fn(|| rx.next().now_or_never().flatten()).map(|e| e.unwrap().kind.name()).collect();
    assert_eq!(names, ["task_created", "task_created", "task_claimed", "task_cancelled"]);

    // Retrying: not before its backoff is over (when the store says something falls due),
    // then claimable (and in the outbox).
    let after = q.fail(&c.lease, failure(true)).await.unwrap();
    assert_eq!(after.status, TaskStatus::Retrying);
    assert!(q.claim_id(a.id, &w(2), LEASE).await.unwrap().is_none(), "claimed before its backoff ended");
    let due = q.next_due().await.unwrap().expect("the retry falls due");
    assert!(due >= after.available_at - 5, "due at {due}, the retry at {}", after.available_at);
    let out = until("the retry to fall due", async || {
        let out = q.undispatched(10).await.unwrap();
        (!out.is_empty()).then_some(out)
    })
    .await;
    assert_eq!((out[0].id, out[0].claims), (a.id, 1));
    let again = q.claim_id(a.id, &w(2), LEASE).await.unwrap().unwrap();
    assert_eq!(again.task.attempts, 2);
    // Its lease runs out: requeued, in the outbox again, and the old holder is fenced.
    q.heartbeat(&again.lease, Duration::from_millis(1), Progress::default()).await.unwrap();
    let out = until("the lease to run out", async || {
        let out = q.undispatched(10).await.unwrap();
        (!out.is_empty()).then_some(out)
    })
    .await;
    assert_eq!((out[0].id, out[0].claims), (a.id, 2));
    assert!(again.cancel.is_cancelled());
    let third = q.claim_id(a.id, &w(3), LEASE).await.unwrap().unwrap();
    assert_eq!(third.task.attempts, 3);
    assert!(matches!(q.complete(&again.lease, done("late")).await, Err(QueueError::Conflict { .. })));
}

/// For a queue several instances share (as several processes would), outside [`run_all`]: two
/// instances `a` and `b` over the same tasks, each with its own connections, claim `n` tasks
/// concurrently while both submit; every task is claimed exactly once and completed.
pub async fn two_instances_claim_each_task_once<Q: TaskQueue>(a: Arc<Q>, b: Arc<Q>, n: usize) {
    let claimers = claimers(&[a.clone(), b.clone()], 16, n);
    let submits = (0..n).map(|i| {
        let q = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move { q.submit(new(&i.to_string(), (i % 10) as i64 + 1)).await.unwrap() }
    });
    futures::future::join_all(submits).await;
    assert_eq!(claimed_once(claimers, Duration::from_secs(120)).await.len(), n);
    assert_eq!(a.counts().await.unwrap().completed, n as u64);
}

/// `count` claimers spread over `queues` in turn, racing until `n` tasks in all have been
/// claimed: each parked between claims (never giving up on an empty queue while submitters
/// still run), completing what it claims. Await them with [`claimed_once`].
pub fn claimers<Q: TaskQueue>(queues: &[Arc<Q>], count: usize, n: usize) -> Vec<JoinHandle<Vec<TaskId>>> {
    let claimed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let all_claimed = CancellationToken::new();
    (0..count)
        .map(|i| {
            let q = queues[i % queues.len()].clone();
            let (claimed, all_claimed) = (claimed.clone(), all_claimed.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some(c) = q.claim_wait(&w(i), &ANY, LEASE, &all_claimed).await.unwrap() {
                    mine.push(c.task.id);
                    q.complete(&c.lease, done("ok")).await.unwrap();
                    if claimed.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n {
                        all_claimed.cancel();
                    }
                }
                mine
            })
        })
        .collect()
}

/// Every task the [`claimers`] claimed, once they are done (all within `within`), each
/// asserted claimed once only.
pub async fn claimed_once(claimers: Vec<JoinHandle<Vec<TaskId>>>, within: Duration) -> HashSet<TaskId> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = HashSet::new();
    for h in claimers {
        let ids = tokio::time::timeout_at(deadline, h).await.expect("the claimers never saw every task").unwrap();
        for id in ids {
            assert!(seen.insert(id), "task {id} claimed twice");
        }
    }
    seen
}
