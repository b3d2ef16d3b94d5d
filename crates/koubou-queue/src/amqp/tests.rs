// RabbitMQ as the dispatcher, against the real broker: the conformance suite over SQLite, then
// what only a dispatcher outside the store has — deliveries acked after the claim, two
// dispatchers on one store, publishes the broker never confirmed, a broker that goes away, TLS.

use std::{future::Future, sync::Arc, time::Duration};

use koubou_task::{EventBus, EventLog, NewTask, Task, TaskId, TaskStatus, WorkerId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    testing::{Namespace, Proxy},
    *,
};
use crate::{
    backoff::Backoff,
    conformance::{ANY, FAST, Factory, LEASE, done, new, until, w},
    sqlite::{SqliteConfig, SqliteQueue},
};

/// A SQLite file and an AMQP namespace of their own.
struct Fixture {
    dir: tempfile::TempDir,
    ns: Namespace,
}

fn fixture() -> Fixture {
    Fixture { dir: tempfile::tempdir().unwrap(), ns: Namespace::new() }
}

fn store_with(f: &Fixture, retry: Backoff, events: Arc<dyn EventLog>) -> Arc<SqliteQueue> {
    let cfg = SqliteConfig { retry, ..SqliteConfig::default() };
    Arc::new(SqliteQueue::open(f.dir.path().join("q.db"), cfg, events).unwrap())
}

fn store(f: &Fixture, retry: Backoff) -> Arc<SqliteQueue> {
    store_with(f, retry, Arc::new(EventBus::default()))
}

async fn open(f: &Fixture) -> AmqpDispatch<SqliteQueue> {
    AmqpDispatch::open(store(f, FAST), f.ns.config()).await.unwrap()
}

/// Dispatchers over a SQLite store, each on a file and a broker queue of its own, for the
/// conformance suite.
struct OverSqlite;

impl Factory for OverSqlite {
    type Queue = AmqpDispatch<SqliteQueue>;
    type Place = Fixture;
    fn place(&self) -> Fixture {
        fixture()
    }
    async fn open(&self, f: &Fixture, retry: Backoff, events: Arc<dyn EventLog>) -> AmqpDispatch<SqliteQueue> {
        AmqpDispatch::open(store_with(f, retry, events), f.ns.config()).await.unwrap()
    }
    fn queued(&self, q: &AmqpDispatch<SqliteQueue>) -> u64 {
        q.store().queued()
    }
}

crate::conformance_suite!(conformance, OverSqlite);

/// Bounds a wait that should end soon, generously for a loaded machine.
async fn soon<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A store whose `claim_id` waits at a gate: the test acts while a delivery is taken and not
/// yet acked.
struct Gated {
    inner: Arc<SqliteQueue>,
    entered: Notify,
    open: tokio::sync::Semaphore,
}

#[async_trait]
impl TaskStore for Gated {
    async fn submit_bounded(&self, new: NewTask, max: Option<u64>) -> Result<Submitted, QueueError> {
        self.inner.submit_bounded(new, max).await
    }
    async fn get(&self, id: TaskId) -> Result<Option<Task>, QueueError> {
        self.inner.get(id).await
    }
    async fn list(&self, q: TaskQuery) -> Result<TaskPage, QueueError> {
        self.inner.list(q).await
    }
    async fn counts(&self) -> Result<StatusCounts, QueueError> {
        self.inner.counts().await
    }
    async fn position(&self, id: TaskId) -> Result<Option<QueuePosition>, QueueError> {
        self.inner.position(id).await
    }
    async fn cancel(&self, id: TaskId) -> Result<Task, QueueError> {
        self.inner.cancel(id).await
    }
}

#[async_trait]
impl Dispatch for Gated {
    async fn claim(&self, w: &WorkerId, c: &Capabilities, l: Duration) -> Result<Option<Claimed>, QueueError> {
        self.inner.claim(w, c, l).await
    }
    async fn claim_wait(
        &self,
        w: &WorkerId,
        c: &Capabilities,
        l: Duration,
        stop: &CancellationToken,
    ) -> Result<Option<Claimed>, QueueError> {
        self.inner.claim_wait(w, c, l, stop).await
    }
    async fn heartbeat(&self, l: &Lease, ttl: Duration, p: Progress<'_>) -> Result<LeaseStatus, QueueError> {
        self.inner.heartbeat(l, ttl, p).await
    }
    async fn complete(&self, l: &Lease, d: Completion) -> Result<Task, QueueError> {
        self.inner.complete(l, d).await
    }
    async fn fail(&self, l: &Lease, f: Failure) -> Result<Task, QueueError> {
        self.inner.fail(l, f).await
    }
    async fn release(&self, l: &Lease, why: Release) -> Result<(), QueueError> {
        self.inner.release(l, why).await
    }
    async fn recover_node(&self, node: &str) -> Result<u64, QueueError> {
        self.inner.recover_node(node).await
    }
    async fn housekeep(&self) -> Result<(), QueueError> {
        self.inner.housekeep().await
    }
}

#[async_trait]
impl Outbox for Gated {
    async fn claim_id(&self, id: TaskId, worker: &WorkerId, lease: Duration) -> Result<Option<Claimed>, QueueError> {
        self.entered.notify_one();
        self.open.acquire().await.unwrap().forget();
        self.inner.claim_id(id, worker, lease).await
    }
    async fn undispatched(&self, limit: usize) -> Result<Vec<Undispatched>, QueueError> {
        self.inner.undispatched(limit).await
    }
    async fn mark_dispatched(&self, marks: Vec<(TaskId, u64)>) -> Result<(), QueueError> {
        self.inner.mark_dispatched(marks).await
    }
    async fn redeliver(&self) -> Result<u64, QueueError> {
        self.inner.redeliver().await
    }
    async fn next_due(&self) -> Result<Option<Millis>, QueueError> {
        Outbox::next_due(&*self.inner).await
    }
}

/// The delivery is acked only once the store's claim has answered: a connection that dies
/// between the `basic.get` and the claim hands the delivery back, and the task is still
/// claimed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_acked_only_after_the_claim_answered() {
    let f = fixture();
    let proxy = Proxy::start(None).await;
    let store = store(&f, Backoff::default());
    let gated = Arc::new(Gated { inner: store.clone(), entered: Notify::new(), open: tokio::sync::Semaphore::new(0) });
    let cfg = AmqpConfig { url: proxy.url("amqp"), ..f.ns.config() };
    let a = AmqpDispatch::open(gated.clone(), cfg).await.unwrap();
    // A second node, straight to the broker.
    let b = AmqpDispatch::open(store, f.ns.config()).await.unwrap();
    let t = a.submit(new("x", 5)).await.unwrap().task;
    assert_eq!(f.ns.ready().await, 1);

    let entered = gated.entered.notified();
    let claim = tokio::spawn({
        let a = a.clone();
        async move { a.claim(&w(1), &ANY, LEASE).await }
    });
    soon("the claim to take the delivery", entered).await;
    assert_eq!(f.ns.ready().await, 0, "taken, unacked");
    proxy.cut().await; // the connection dies with the delivery unacked
    until("the broker to requeue the delivery", async || (f.ns.ready().await == 1).then_some(())).await;
    gated.open.add_permits(1);
    let claimed = soon("the claim", claim).await.unwrap().unwrap().expect("the store's claim stands");
    assert_eq!(claimed.task.id, t.id);

    // The requeued delivery finds the task running: dropped, and nobody claims it again.
    assert!(b.claim(&w(2), &ANY, LEASE).await.unwrap().is_none());
    assert_eq!(f.ns.ready().await, 0, "the stale delivery was dropped");
    let task = b.get(t.id).await.unwrap().unwrap();
    assert_eq!((task.status, task.attempts), (TaskStatus::Running, 1));
    b.complete(&claimed.lease, done("once")).await.unwrap();
}

/// Two dispatchers ("nodes") over one store, each with its own connection, claim 300 tasks
/// concurrently while both submit: every task is claimed exactly once, and none is left in
/// the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_dispatchers_over_one_store_claim_each_task_once() {
    let f = fixture();
    let store = store(&f, Backoff::default());
    let a = Arc::new(AmqpDispatch::open(store.clone(), f.ns.config()).await.unwrap());
    let b = Arc::new(AmqpDispatch::open(store.clone(), f.ns.config()).await.unwrap());
    crate::conformance::two_instances_claim_each_task_once(a, b, 300).await;
    assert!(store.undispatched(10).await.unwrap().is_empty());
}

/// A publish the broker never confirmed (the way to it was cut): the task is stored and in the
/// outbox, claims say the broker is unavailable, and once it is back the sweep publishes the
/// task and it is claimed, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_publish_is_published_by_the_sweep() {
    let f = fixture();
    let proxy = Proxy::start(None).await;
    let store = store(&f, Backoff::default());
    let cfg = AmqpConfig { url: proxy.url("amqp"), sweep_ms: 200, timeout_ms: 2_000, ..f.ns.config() };
    let q = AmqpDispatch::open(store.clone(), cfg).await.unwrap();
    proxy.cut().await;
    let t = q.submit(new("while the broker is away", 5)).await.unwrap().task;
    assert_eq!(q.get(t.id).await.unwrap().unwrap().status, TaskStatus::Pending, "stored all the same");
    assert_eq!(store.undispatched(10).await.unwrap()[0].id, t.id, "in the outbox");
    let e = q.claim(&w(1), &ANY, LEASE).await.unwrap_err();
    assert!(matches!(e, QueueError::Unavailable(_)) && e.is_transient(), "{e:?}");
    assert_eq!(f.ns.ready().await, 0, "never reached the queue");

    proxy.resume();
    // As a worker does: a claim that finds the broker unavailable is tried again.
    let c = until("the task, published by the sweep", async || match q.claim(&w(1), &ANY, LEASE).await {
        Ok(c) => c,
        Err(e) if e.is_transient() => None,
        Err(e) => panic!("{e}"),
    })
    .await;
    assert_eq!(c.task.id, t.id);
    assert!(store.undispatched(10).await.unwrap().is_empty());
    assert!(q.claim(&w(2), &ANY, LEASE).await.unwrap().is_none());
}

/// A task another node stored but never published (it died between its commit and the
/// publish): this node's periodic sweep publishes it.
#[tokio::test]
async fn a_task_a_dead_node_never_published_is_published_by_the_sweep() {
    let f = fixture();
    let store = store(&f, Backoff::default());
    let q = AmqpDispatch::open(store.clone(), AmqpConfig { sweep_ms: 100, ..f.ns.config() }).await.unwrap();
    // Let the first sweep finish (nothing to publish), so the next one comes from the period.
    q.sweep_now().await;
    let t = store.submit(new("orphan", 5)).await.unwrap().task;
    let c = soon("the sweep", q.claim_wait(&w(1), &ANY, LEASE, &CancellationToken::new())).await.unwrap().unwrap();
    assert_eq!(c.task.id, t.id);
}

/// Deliveries the broker lost after confirming them (its queue purged): the audit finds the
/// queue empty while tasks wait, twice in a row, and they are published again and claimed,
/// each once.
#[tokio::test]
async fn tasks_whose_confirmed_deliveries_the_broker_lost_are_published_again() {
    let f = fixture();
    let q =
        AmqpDispatch::open(store(&f, Backoff::default()), AmqpConfig { sweep_ms: 100, ..f.ns.config() }).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(q.submit(new(&format!("t{i}"), 5)).await.unwrap().task.id);
    }
    assert_eq!(f.ns.ready().await, 3);
    assert!(q.store().undispatched(10).await.unwrap().is_empty(), "all three confirmed");
    assert_eq!(f.ns.purge().await, 3);
    until("the lost deliveries to be published again", async || (f.ns.ready().await == 3).then_some(())).await;
    let mut claimed = Vec::new();
    while let Some(c) = q.claim(&w(1), &ANY, LEASE).await.unwrap() {
        q.complete(&c.lease, done("ok")).await.unwrap();
        claimed.push(c.task.id);
    }
    assert_eq!(claimed, ids);
}

/// A lease that runs out: the task is requeued in the store, republished by the sweep and
/// claimed again; the old holder is fenced.
#[tokio::test]
async fn an_expired_lease_is_republished_and_claimed_again() {
    let f = fixture();
    let q = open(&f).await;
    let t = q.submit(new("x", 5)).await.unwrap().task;
    let old = q.claim(&w(1), &ANY, Duration::from_millis(100)).await.unwrap().unwrap();
    assert_eq!(f.ns.ready().await, 0);
    let c =
        soon("the requeued task", q.claim_wait(&w(2), &ANY, LEASE, &CancellationToken::new())).await.unwrap().unwrap();
    assert_eq!((c.task.id, c.task.attempts), (t.id, 2));
    assert!(old.cancel.is_cancelled());
    assert!(matches!(q.complete(&old.lease, done("late")).await, Err(QueueError::Conflict { .. })));
    q.complete(&c.lease, done("ok")).await.unwrap();
}

/// Cancelling a queued task leaves its delivery in the broker; the next claim drops it (acks
/// it without claiming) and goes on to the next delivery.
#[tokio::test]
async fn a_cancelled_tasks_delivery_is_dropped_at_claim() {
    let f = fixture();
    let q = open(&f).await;
    let a = q.submit(new("a", 9)).await.unwrap().task;
    let b = q.submit(new("b", 1)).await.unwrap().task;
    q.cancel(a.id).await.unwrap();
    assert_eq!(f.ns.ready().await, 2);
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    assert_eq!(c.task.id, b.id);
    assert_eq!(f.ns.ready().await, 0, "the cancelled task's delivery was dropped, not handed back");
    assert_eq!(q.get(a.id).await.unwrap().unwrap().status, TaskStatus::Cancelled);
}

/// Priority is the broker's: tasks submitted before any claim come out most urgent first, each
/// priority level in submission order, across all ten levels.
#[tokio::test]
async fn the_broker_orders_claims_by_priority() {
    let f = fixture();
    let q = open(&f).await;
    let mut want = Vec::new();
    for i in 0..30 {
        let p = (i * 7 % 10) + 1;
        let t = q.submit(new(&format!("{p}-{i}"), p)).await.unwrap().task;
        want.push((std::cmp::Reverse(p), i, t.id));
    }
    want.sort();
    let mut got = Vec::new();
    while let Some(c) = q.claim(&w(1), &ANY, LEASE).await.unwrap() {
        got.push(c.task.id);
    }
    assert_eq!(got, want.into_iter().map(|(_, _, id)| id).collect::<Vec<_>>());
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Wrong credentials: the error says so and never shows the password, nor does any log line,
/// down to the AMQP client's traces.
#[tokio::test]
async fn a_refused_login_never_shows_the_password() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber =
        tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || writer.clone()).finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
    let f = fixture();
    let url = broker_url_with_password("Wr0ng-s3cret");
    let e = AmqpDispatch::open(store(&f, Backoff::default()), AmqpConfig { url, ..f.ns.config() }).await.err();
    let text = format!("{e:?} {}", e.as_ref().map(ToString::to_string).unwrap_or_default());
    assert!(matches!(e, Some(QueueError::Open { .. })), "{text}");
    assert!(!text.contains("Wr0ng-s3cret") && text.contains(":***@"), "{text}");
    let logs = String::from_utf8_lossy(&logs.0.lock()).into_owned();
    assert!(logs.contains("Connecting"), "the client's traces were captured: {logs}");
    assert!(!logs.contains("Wr0ng-s3cret"), "{logs}");
}

/// The test broker's URL with another password.
fn broker_url_with_password(password: &str) -> String {
    redact_url(&super::testing::broker_url()).replace("***", password)
}

/// `amqps://`: TLS to the broker (here a TLS end in front of it), checked against `ca_file`;
/// without that CA the certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca() {
    let f = fixture();
    let ca = crate::test_tls::TestCa::new();
    let proxy = Proxy::start(Some(ca.acceptor())).await;
    let url = proxy.url("amqps").replace("localhost", "127.0.0.1");
    let cfg = AmqpConfig { url: url.clone(), ca_file: Some(ca.ca_file.clone()), ..f.ns.config() };
    let q = AmqpDispatch::open(store(&f, Backoff::default()), cfg).await.unwrap();
    let t = q.submit(new("over tls", 5)).await.unwrap().task;
    assert_eq!(q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap().task.id, t.id);

    let untrusted = AmqpConfig { url, timeout_ms: 3_000, ..f.ns.config() };
    let e = AmqpDispatch::open(store(&fixture(), Backoff::default()), untrusted).await.err().expect("untrusted");
    assert!(matches!(e, QueueError::Open { .. }), "{e:?}");
}

/// Two nodes, each its own Redis queue instance and dispatcher on one Redis namespace and one
/// broker queue: tasks submitted on one are claimed by the other's parked workers, woken
/// through the wake-up exchange (well before the 30 s a parked worker sleeps unwoken), each
/// exactly once.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submit_on_one_redis_node_wakes_the_workers_of_another() {
    let ns = crate::redis::testing::Namespace::new();
    let amqp = Namespace::new();
    let node = |_| async {
        let store = Arc::new(crate::RedisQueue::open(ns.config(), Arc::new(EventBus::default())).await.unwrap());
        Arc::new(AmqpDispatch::open(store, amqp.config()).await.unwrap())
    };
    let (a, b) = (node(1).await, node(2).await);
    const N: usize = 100;
    let claimers = crate::conformance::claimers(&[b], 4, N);
    for i in 0..N {
        a.submit(new(&i.to_string(), (i % 10) as i64 + 1)).await.unwrap();
    }
    // Well below the 30 s a parked worker sleeps unwoken: a pass proves the wake-ups came.
    let seen = crate::conformance::claimed_once(claimers, Duration::from_secs(20)).await;
    assert_eq!(seen.len(), N);
    assert_eq!(a.counts().await.unwrap().completed, N as u64);
}
