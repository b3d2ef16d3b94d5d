// Queue semantics on a real Redis: the conformance suite (with the outbox cases), then what
// only a shared queue has — several queue instances (as several processes would be) on one
// namespace, and a server that is unfit or goes away.

use std::{future::Future, sync::Arc, time::Duration};

use futures::StreamExt;
use koubou_task::{EventBus, EventKind, EventLog, TaskId, TaskKind, TaskStatus};
use tokio_util::sync::CancellationToken;

use super::{
    testing::{Namespace, Server},
    *,
};
use crate::conformance::{ANY, Factory, LEASE, done, failure, new, until, w};

fn fixture() -> Namespace {
    Namespace::new()
}

fn bus() -> Arc<dyn EventLog> {
    Arc::new(EventBus::default())
}

async fn open(ns: &Namespace) -> RedisQueue {
    RedisQueue::open(ns.config(), bus()).await.unwrap()
}

/// Queues on a namespace of their own, for the conformance suite: on the server tests share,
/// or (`scripts`) on a private one whose user may not load functions, every write then a script.
struct Namespaces {
    scripts: bool,
}

const SHARED: Namespaces = Namespaces { scripts: false };

impl Factory for Namespaces {
    type Queue = RedisQueue;
    type Place = Namespace;
    fn place(&self) -> Namespace {
        if self.scripts { Namespace::on(Arc::new(scripts_only())) } else { fixture() }
    }
    async fn open(&self, ns: &Namespace, retry: Backoff, events: Arc<dyn EventLog>) -> RedisQueue {
        RedisQueue::open(RedisConfig { retry, ..ns.config() }, events).await.unwrap()
    }
    fn queued(&self, q: &RedisQueue) -> u64 {
        q.queued()
    }
}

crate::conformance_suite!(conformance, SHARED);

#[tokio::test]
async fn the_outbox_holds_what_no_confirmed_delivery_covers() {
    crate::conformance::outbox_holds_what_no_confirmed_delivery_covers(&SHARED).await;
}

#[tokio::test]
async fn nodes_conform() {
    crate::conformance::nodes_register_renew_expire(&SHARED).await;
}

#[tokio::test]
async fn claim_id_claims_exactly_that_task_when_claimable() {
    crate::conformance::claim_id_claims_exactly_that_task_when_claimable(&SHARED).await;
}

/// Bounds a wait that should end at once, generously for a loaded machine but below the
/// 30 s a parked worker sleeps without any wake-up (so a pass proves the wake-up came).
async fn soon<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Two instances with their own connections, as two processes would be, claim concurrently
/// from one namespace while both submit: every task is claimed exactly once, and both count
/// nothing waiting after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_never_claim_a_task_twice() {
    let ns = fixture();
    let (a, b) = (Arc::new(open(&ns).await), Arc::new(open(&ns).await));
    crate::conformance::two_instances_claim_each_task_once(a.clone(), b.clone(), 600).await;
    assert_eq!((a.queued(), b.queued()), (0, 0));
}

/// A cancel made on one instance reaches the claimer on another: its token fires (through the
/// namespace's channel) and its heartbeat says `Cancelled`.
#[tokio::test]
async fn a_cancel_on_one_instance_stops_the_claimer_on_another() {
    let ns = fixture();
    let (a, b) = (open(&ns).await, open(&ns).await);
    let t = a.submit(new("x", 5)).await.unwrap().task;
    let c = a.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    assert_eq!(b.cancel(t.id).await.unwrap().status, TaskStatus::Cancelled);
    soon("the claimer's token", c.cancel.cancelled()).await;
    assert_eq!(a.heartbeat(&c.lease, LEASE, Progress::default()).await.unwrap(), LeaseStatus::Cancelled);
    assert!(matches!(a.complete(&c.lease, done("late")).await, Err(QueueError::Conflict { .. })));
}

/// A lease that runs out on one instance is reclaimed by another's claim: the old holder is told
/// to stop and fenced off, the new attempt completes.
#[tokio::test]
async fn an_expired_lease_is_reclaimed_by_another_instance() {
    let ns = fixture();
    let (a, b) = (open(&ns).await, open(&ns).await);
    a.submit(new("x", 5)).await.unwrap();
    let old = a.claim(&w(1), &ANY, Duration::from_millis(30)).await.unwrap().unwrap();
    let c = soon("the reclaim", b.claim_wait(&w(2), &ANY, LEASE, &CancellationToken::new())).await.unwrap().unwrap();
    assert_eq!((c.task.id, c.task.attempts), (old.task.id, 2));
    soon("the old holder's token", old.cancel.cancelled()).await;
    assert_eq!(a.heartbeat(&old.lease, LEASE, Progress::default()).await.unwrap(), LeaseStatus::Lost);
    assert!(matches!(a.complete(&old.lease, done("late")).await, Err(QueueError::Conflict { .. })));
    assert_eq!(b.complete(&c.lease, done("on time")).await.unwrap().result.as_deref(), Some("on time"));
    assert!(!c.cancel.is_cancelled(), "the new holder was never told to stop");
}

/// A worker parked on one instance wakes when a task is submitted through another, and that
/// instance's bus hears the other's events.
#[tokio::test]
async fn a_parked_worker_wakes_for_a_task_submitted_elsewhere() {
    let ns = fixture();
    let (a, b) = (Arc::new(open(&ns).await), open(&ns).await);
    let mut events = a.bus().subscribe(None);
    let parked = a.clone();
    let waiter = tokio::spawn(async move { parked.claim_wait(&w(1), &ANY, LEASE, &CancellationToken::new()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "claim_wait returned with nothing to claim");
    let t = b.submit(new("elsewhere", 5)).await.unwrap().task;
    let got = soon("the parked worker", waiter).await.unwrap().unwrap().unwrap();
    assert_eq!(got.task.id, t.id);
    let first = soon("the other instance's event", events.next()).await.unwrap().unwrap();
    assert_eq!((first.kind.name(), first.kind.task_id()), ("task_created", Some(t.id)));
    assert_eq!(a.queued(), 0);
}

/// A released task goes back to its place, ahead of those submitted after it; so does a retried
/// one once its backoff is over.
#[tokio::test]
async fn a_requeued_task_keeps_its_place() {
    let ns = fixture();
    let q = open(&ns).await;
    let first = q.submit(new("first", 5)).await.unwrap().task;
    q.submit(new("second", 5)).await.unwrap();
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    q.release(&c.lease, Release::Stopping).await.unwrap();
    assert_eq!(q.position(first.id).await.unwrap().unwrap().ahead, 0);
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    assert_eq!(c.task.id, first.id);

    let retrying = q.fail(&c.lease, failure(true)).await.unwrap();
    q.submit(new("third", 5)).await.unwrap();
    until("the backoff to end", async || (koubou_task::now_millis() > retrying.available_at).then_some(())).await;
    let mut order = Vec::new();
    while let Some(c) = q.claim(&w(1), &ANY, LEASE).await.unwrap() {
        order.push(c.task.prompt);
    }
    assert_eq!(order, ["first", "second", "third"]);
}

/// Finished tasks are kept by count (the oldest go first, with their idempotency keys) and by age.
#[tokio::test]
async fn finished_tasks_are_kept_by_count_and_age() {
    let ns = fixture();
    let q = RedisQueue::open(RedisConfig { keep_finished: 2, ..ns.config() }, bus()).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        let mut t = new(&format!("t{i}"), 5);
        t.idempotency_key = Some(format!("k{i}"));
        ids.push(q.submit(t).await.unwrap().task.id);
        let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
        q.complete(&c.lease, done("ok")).await.unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(q.get(*id).await.unwrap().is_some(), i >= 2, "task {i}");
    }
    assert_eq!(q.counts().await.unwrap().completed, 2);
    assert_eq!(q.list(TaskQuery { limit: 10, ..Default::default() }).await.unwrap().total, 2);
    let mut again = new("t0 again", 5);
    again.idempotency_key = Some("k0".into());
    assert!(q.submit(again).await.unwrap().created, "a forgotten task's key is free again");

    let ns = fixture();
    let q = RedisQueue::open(RedisConfig { keep_finished_secs: 0, ..ns.config() }, bus()).await.unwrap();
    let t = q.submit(new("old", 5)).await.unwrap().task;
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    q.complete(&c.lease, done("ok")).await.unwrap();
    until("the finished task to be forgotten", async || {
        q.claim(&w(1), &ANY, LEASE).await.unwrap();
        q.get(t.id).await.unwrap().is_none().then_some(())
    })
    .await;
}

/// Every key the queue writes is under the namespace's hash tag (one cluster slot).
#[tokio::test]
async fn every_key_is_under_the_namespace_hash_tag() {
    let ns = fixture();
    let q = open(&ns).await;
    let mut keyed = new("a", 5);
    keyed.idempotency_key = Some("k".into());
    q.submit(keyed).await.unwrap();
    q.submit(new("b", 5)).await.unwrap();
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    q.fail(&c.lease, failure(true)).await.unwrap();
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    q.complete(&c.lease, done("ok")).await.unwrap();
    let keys = ns.keys();
    assert!(keys.len() >= 10, "{keys:?}");
    let tag = format!("{{koubou:{}}}:", ns.name);
    assert!(keys.iter().all(|k| k.starts_with(&tag)), "{keys:?}");
}

/// A server that may evict keys is refused with a message naming the setting; one without AOF
/// is accepted (with a warning).
#[tokio::test]
async fn a_server_that_may_evict_is_refused() {
    let lru = Arc::new(Server::start(&["--appendonly", "no", "--maxmemory-policy", "allkeys-lru"]));
    let ns = Namespace::on(lru);
    match RedisQueue::open(ns.config(), bus()).await {
        Err(e @ QueueError::Open { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("maxmemory-policy") && msg.contains("allkeys-lru") && msg.contains("noeviction"),
                "{msg}"
            );
        }
        Err(e) => panic!("expected Open, got {e:?}"),
        Ok(_) => panic!("a server with allkeys-lru was accepted"),
    }
    let plain = Arc::new(Server::start(&["--appendonly", "no", "--maxmemory-policy", "noeviction"]));
    let ns = Namespace::on(plain);
    open(&ns).await.submit(new("ok", 5)).await.unwrap();
}

/// Nothing listening: opening fails with the address (its password hidden).
#[tokio::test]
async fn an_unreachable_server_is_refused_at_open() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg =
        RedisConfig { url: format!("redis://:secret@127.0.0.1:{port}/0"), timeout_ms: 2_000, ..Default::default() };
    let e = RedisQueue::open(cfg, bus()).await.err().expect("nothing listens there");
    let msg = e.to_string();
    assert!(matches!(e, QueueError::Open { .. }) && msg.contains(&port.to_string()), "{msg}");
    assert!(!msg.contains("secret"), "{msg}");
}

/// A server that goes away makes writes fail as `Unavailable` (transient: a 503, and a worker
/// keeps its answer and tries again); once a server is back on the same address with its AOF,
/// the queue works again with what it had acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_server_is_unavailable_then_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let aof = ["--appendonly", "yes", "--appendfsync", "always"];
    let mut server = Server::start_on(free_port(), dir.path(), &aof).expect("a private redis-server");
    let port = server.port;
    let cfg = RedisConfig {
        url: server.url.clone(),
        namespace: "vanishing".into(),
        timeout_ms: 2_000,
        ..RedisConfig::default()
    };
    let q = RedisQueue::open(cfg, bus()).await.unwrap();
    let kept = q.submit(new("kept", 5)).await.unwrap().task.id;
    server.kill();
    let e = q.submit(new("lost", 5)).await.unwrap_err();
    assert!(matches!(e, QueueError::Unavailable(_)) && e.is_transient(), "{e:?}");
    let _back = Server::start_on(port, dir.path(), &aof).expect("the server back on its port");
    let t = until("the queue to reconnect", async || q.get(kept).await.ok().flatten()).await;
    assert_eq!(t.prompt, "kept");
    q.submit(new("after", 5)).await.unwrap();
    assert_eq!(q.counts().await.unwrap().pending, 2);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Text of every kind (quotes, newlines, slashes, non-ASCII) goes through the scripts and their
/// JSON messages unchanged.
#[tokio::test]
async fn any_text_survives_the_scripts() {
    let ns = fixture();
    let (a, b) = (open(&ns).await, open(&ns).await);
    let mut heard = b.bus().subscribe(None);
    let text = "日本語 \"quoted\" \\ back/slash\n\ttab \u{1F600} {}[]";
    let t = a.submit(new(text, 5)).await.unwrap().task;
    let c = a.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    assert_eq!(c.task.prompt, text);
    let p = Progress { partial: Some(text), ..Progress::default() };
    a.heartbeat(&c.lease, LEASE, p).await.unwrap();
    assert_eq!(b.get(t.id).await.unwrap().unwrap().partial.as_deref(), Some(text));
    a.complete(&c.lease, done(text)).await.unwrap();
    loop {
        let e = soon("the completion on the other instance", heard.next()).await.unwrap().unwrap();
        if let EventKind::TaskCompleted { result, .. } = &e.kind {
            assert_eq!(result, text);
            break;
        }
    }
}

/// A task deleted behind the queue's back (by hand, say) leaves entries in the claim order and
/// the leases; claims drop them instead of failing or handing out a half task.
#[tokio::test]
async fn a_task_deleted_behind_the_queues_back_does_not_jam_claims() {
    let ns = fixture();
    let q = open(&ns).await;
    let gone = q.submit(new("gone", 9)).await.unwrap().task;
    let kept = q.submit(new("kept", 5)).await.unwrap().task;
    q.submit(new("running", 1)).await.unwrap();
    let mut conn = ::redis::Client::open(ns.server.url.as_str()).unwrap().get_connection().unwrap();
    let del = |conn: &mut ::redis::Connection, id: TaskId| {
        let _: () = ::redis::cmd("DEL").arg(format!("{{koubou:{}}}:task:{id}", ns.name)).query(conn).unwrap();
    };
    del(&mut conn, gone.id);
    let c = q.claim(&w(1), &Capabilities::kinds([TaskKind::general()]), LEASE).await.unwrap().unwrap();
    assert_eq!(c.task.id, kept.id);
    q.complete(&c.lease, done("ok")).await.unwrap();
    let short = q.claim(&w(2), &ANY, Duration::from_millis(20)).await.unwrap().unwrap();
    del(&mut conn, short.task.id);
    until("the stale lease to be dropped", async || {
        assert!(q.claim(&w(3), &ANY, LEASE).await.unwrap().is_none());
        q.due().await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(q.get(gone.id).await.unwrap(), None);
}

/// An ACL user (the default user off), its password from the environment: the queue logs in
/// and works; a wrong password is refused, and no message shows it.
#[tokio::test]
async fn an_acl_user_with_its_password_from_the_environment() {
    let server = Arc::new(Server::start_with_login(
        &["--user", "koubou", "on", ">s3cret-acl", "~*", "&*", "+@all", "--user", "default", "off"],
        "koubou:s3cret-acl@",
    ));
    let ns = Namespace::on(server.clone());
    let var = format!("KOUBOU_TEST_REDIS_PW_{:x}", fastrand::u64(..));
    // SAFETY: a variable of this test's own (random) name, read only by this test.
    unsafe { std::env::set_var(&var, "s3cret-acl") };
    let base = format!("redis://127.0.0.1:{}/0", server.port);
    let cfg = RedisConfig {
        url: base.clone(),
        username: Some("koubou".into()),
        password_env: Some(var.clone()),
        ..ns.config()
    };
    let q = RedisQueue::open(cfg.clone(), bus()).await.unwrap();
    let t = q.submit(new("authenticated", 5)).await.unwrap().task;
    assert_eq!(q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap().task.id, t.id);

    let anonymous = RedisConfig { username: None, password_env: None, ..cfg.clone() };
    let e = RedisQueue::open(anonymous, bus()).await.err().expect("the default user is off");
    assert!(matches!(e, QueueError::Open { .. }), "{e:?}");
    let wrong = RedisConfig { url: format!("redis://koubou:Wr0ng-pw@127.0.0.1:{}/0", server.port), ..ns.config() };
    assert!(format!("{wrong:?}").contains("koubou:***@") && !format!("{wrong:?}").contains("Wr0ng-pw"));
    let e = RedisQueue::open(wrong, bus()).await.err().expect("a wrong password");
    let text = format!("{e} {e:?}");
    assert!(!text.contains("Wr0ng-pw") && text.contains("koubou:***@"), "{text}");
    let unset = RedisConfig { password_env: Some(format!("{var}_UNSET")), ..cfg };
    let e = RedisQueue::open(unset, bus()).await.err().expect("an unset variable").to_string();
    assert!(e.contains("not set"), "{e}");
    unsafe { std::env::remove_var(&var) };
}

/// `rediss://`: TLS to a private redis-server, its certificate checked against `ca_file`;
/// without that CA (system roots only) the connection is refused.
#[tokio::test]
async fn rediss_with_a_private_ca() {
    let ca = crate::test_tls::TestCa::new();
    let tls_port = free_port();
    let (cert, key, ca_file) =
        (ca.cert_file.display().to_string(), ca.key_file.display().to_string(), ca.ca_file.display().to_string());
    let tls_args = [
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca_file,
        "--tls-auth-clients",
        "no",
    ];
    let server = Arc::new(Server::start(&tls_args));
    let ns = Namespace::on(server.clone());
    let url = format!("rediss://127.0.0.1:{tls_port}/0");
    let cfg = RedisConfig { url: url.clone(), ca_file: Some(ca.ca_file.clone()), ..ns.config() };
    let q = RedisQueue::open(cfg, bus()).await.unwrap();
    let t = q.submit(new("over tls", 5)).await.unwrap().task;
    assert_eq!(q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap().task.id, t.id);
    assert!(!ns.keys().is_empty(), "stored on that server");

    let untrusted = RedisConfig { url, timeout_ms: 3_000, ..ns.config() };
    let e = RedisQueue::open(untrusted, bus()).await.err().expect("an unknown CA");
    assert!(matches!(e, QueueError::Open { .. }), "{e:?}");
    let plain_ca = RedisConfig { ca_file: Some(ca.ca_file.clone()), ..ns.config() };
    let e = RedisQueue::open(plain_ca, bus()).await.err().expect("ca_file without rediss").to_string();
    assert!(e.contains("not rediss://"), "{e}");
}

/// What a node publishes on its relay log (a worker's tokens) reaches every other node's log,
/// named after the node that produced it, once; its own log has it once too.
#[tokio::test]
async fn relayed_events_reach_the_other_nodes_with_their_origin() {
    let ns = fixture();
    let (bus_a, bus_b) = (EventBus::with_origin("a", 64), EventBus::with_origin("b", 64));
    let a = RedisQueue::open(ns.config(), Arc::new(bus_a.clone())).await.unwrap();
    let b = RedisQueue::open(ns.config(), Arc::new(bus_b.clone())).await.unwrap();
    let (mut on_a, mut on_b) = (bus_a.subscribe(None), bus_b.subscribe(None));
    let token = |text: &str| EventKind::TaskToken { task_id: TaskId::new(), text: text.into() };
    a.relay("w1").publish(token("from w1"));
    let e = soon("w1's token on b", on_b.next()).await.unwrap().unwrap();
    assert_eq!((&*e.origin, e.kind.name()), ("w1", "task_token"));
    b.relay("b").publish(token("from b"));
    // a sees its own token once, then b's: nothing of its own came back from the channel.
    let mine = soon("a's own token", on_a.next()).await.unwrap().unwrap();
    let theirs = soon("b's token on a", on_a.next()).await.unwrap().unwrap();
    assert_eq!([(&*mine.origin, mine.seq), (&*theirs.origin, theirs.seq)], [("w1", 1), ("b", 2)]);
    assert!(matches!(&theirs.kind, EventKind::TaskToken { text, .. } if text == "from b"));
}

/// The queue's own events (created, claimed, completed) reach the other nodes named after the
/// node whose queue made them, not the node that heard them; each node's own are its own.
#[tokio::test]
async fn queue_events_reach_the_other_nodes_with_their_producer() {
    let ns = fixture();
    let (bus_a, bus_b) = (EventBus::with_origin("ctl", 64), EventBus::with_origin("gpu-01", 64));
    let a = RedisQueue::open(ns.config(), Arc::new(bus_a.clone())).await.unwrap();
    let b = RedisQueue::open(ns.config(), Arc::new(bus_b.clone())).await.unwrap();
    let (mut on_a, mut on_b) = (bus_a.subscribe(None), bus_b.subscribe(None));
    let t = a.submit(new("made on ctl", 5)).await.unwrap().task;
    let claimed = b.claim(&WorkerId::new("gpu-01", 1), &ANY, LEASE).await.unwrap().unwrap();
    b.complete(&claimed.lease, done("ok")).await.unwrap();
    for (log, who) in [(&mut on_a, "on ctl"), (&mut on_b, "on gpu-01")] {
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let e = soon(who, log.next()).await.unwrap().unwrap();
            if e.kind.task_id() == Some(t.id) {
                seen.push((e.kind.name(), e.origin.to_string()));
            }
        }
        let expected = [("task_created", "ctl"), ("task_claimed", "gpu-01"), ("task_completed", "gpu-01")];
        assert_eq!(seen, expected.map(|(k, o)| (k, o.to_owned())), "{who}");
    }
}

/// A private server where queue `b` logs in as its own ACL user, so that the test can cut `b`
/// off (its user turned off and its connections killed) while `a` goes on, and let it back.
struct CutOff {
    server: Arc<Server>,
    a: RedisQueue,
    b: RedisQueue,
    on_b: koubou_task::Subscription,
    _ns: Namespace,
}

impl CutOff {
    async fn start(keep_events: u64) -> CutOff {
        let server = Arc::new(Server::start(&["--user", "b", "on", ">b-pw", "~*", "&*", "+@all"]));
        let ns = Namespace::on(server.clone());
        let cfg = RedisConfig { keep_events, ..ns.config() };
        let a = RedisQueue::open(cfg.clone(), Arc::new(EventBus::with_origin("a", 4096))).await.unwrap();
        let bus_b = EventBus::with_origin("b", 4096);
        let on_b = bus_b.subscribe(None);
        let b_url = format!("redis://b:b-pw@127.0.0.1:{}/0", server.port);
        let b = RedisQueue::open(RedisConfig { url: b_url, ..cfg }, Arc::new(bus_b)).await.unwrap();
        CutOff { server, a, b, on_b, _ns: ns }
    }

    /// `b` can neither keep nor make a connection.
    fn cut(&self) {
        self.server.query(&["ACL", "SETUSER", "b", "off"]).unwrap();
        let killed = self.server.query(&["CLIENT", "KILL", "USER", "b"]).unwrap();
        assert!(matches!(killed, redis::Value::Int(n) if n >= 2), "b's writer and reader were connected: {killed:?}");
    }

    fn mend(&self) {
        self.server.query(&["ACL", "SETUSER", "b", "on"]).unwrap();
    }
}

/// A node cut off from Redis misses nothing other nodes published meanwhile: once back, it
/// reads on from the last entry it saw, and its log gets every event, in order, once.
#[tokio::test]
async fn a_node_cut_off_reads_what_it_missed_once_back() {
    let mut t = CutOff::start(100_000).await;
    let id = TaskId::new();
    let token = |i: usize| EventKind::TaskToken { task_id: id, text: format!("t{i}") };
    t.a.relay("w1").publish(token(0));
    let first = soon("the token sent before the cut", t.on_b.next()).await.unwrap().unwrap();
    assert!(matches!(&first.kind, EventKind::TaskToken { text, .. } if text == "t0"));

    t.cut();
    for i in 1..=50 {
        t.a.relay("w1").publish(token(i));
    }
    let task = t.a.submit(new("while b was away", 5)).await.unwrap().task;
    // The relayed tokens go through a's writer in order with its scripts: the submission's
    // answer means they are all in the stream.
    t.mend();

    let mut heard = Vec::new();
    while heard.len() < 51 {
        let e = soon("what b missed", t.on_b.next()).await.unwrap().unwrap();
        heard.push(match &e.kind {
            EventKind::TaskToken { text, .. } => (e.origin.to_string(), text.clone()),
            EventKind::TaskCreated { task_id, .. } if *task_id == task.id => (e.origin.to_string(), "created".into()),
            other => panic!("unexpected {other:?}"),
        });
    }
    let mut expected: Vec<(String, String)> = (1..=50).map(|i| ("w1".to_owned(), format!("t{i}"))).collect();
    expected.push(("a".into(), "created".into()));
    assert_eq!(heard, expected);
    // And b works again: its writes go through once its writer has reconnected too (a write
    // on the connection that was killed fails, as a worker's would, and is asked again).
    let claimed = soon("b's claim", async {
        loop {
            match t.b.claim_wait(&w(1), &ANY, LEASE, &CancellationToken::new()).await {
                Err(QueueError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                other => return other,
            }
        }
    })
    .await;
    assert_eq!(claimed.unwrap().unwrap().task.id, task.id);
}

/// The stream keeps about `keep_events` entries: a node away for longer misses the oldest,
/// still gets the newest, and does not stall.
#[tokio::test]
async fn a_node_away_past_the_stream_cap_gets_the_newest() {
    let mut t = CutOff::start(10).await;
    t.cut();
    let id = TaskId::new();
    for i in 0..1000 {
        t.a.relay("w1").publish(EventKind::TaskToken { task_id: id, text: format!("t{i}") });
    }
    t.a.submit(new("a mark after the tokens", 5)).await.unwrap();
    let len = t.server.query(&["XLEN", &t.a.key("events")]).unwrap();
    assert!(matches!(len, redis::Value::Int(n) if n < 1000), "the stream was trimmed: {len:?} entries");
    t.mend();
    let mut tokens = 0;
    loop {
        let e = soon("the newest events", t.on_b.next()).await.unwrap().unwrap();
        match &e.kind {
            EventKind::TaskToken { .. } => tokens += 1,
            EventKind::TaskCreated { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(tokens < 1000, "b got {tokens} of the 1000 tokens: the oldest were dropped");
}

/// What ran the writes on a server, from `INFO commandstats`: (`FCALL`s, `EVALSHA`s).
fn calls_by_kind(server: &Server) -> (u64, u64) {
    let info = match server.query(&["INFO", "commandstats"]).unwrap() {
        ::redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
        ::redis::Value::VerbatimString { text, .. } => text,
        other => panic!("INFO answered {other:?}"),
    };
    let calls = |cmd: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    (calls("fcall"), calls("evalsha"))
}

/// One task through its life: submitted, claimed, completed.
async fn one_task(q: &RedisQueue) {
    let t = q.submit(new("one", 5)).await.unwrap().task;
    let c = q.claim(&w(1), &ANY, LEASE).await.unwrap().unwrap();
    assert_eq!(c.task.id, t.id);
    let done = q.complete(&c.lease, done("ok")).await.unwrap();
    assert_eq!((done.status, done.result.as_deref()), (TaskStatus::Completed, Some("ok")));
}

/// On a server with functions the writes run as the library's; after the server lost it
/// (`FUNCTION FLUSH`, as a restart without persistence does) the next write loads it again.
#[tokio::test]
async fn writes_run_as_functions_and_the_library_is_loaded_again_when_lost() {
    let server = Arc::new(Server::start(&[]));
    let ns = Namespace::on(server.clone());
    let q = open(&ns).await;
    one_task(&q).await;
    server.query(&["FUNCTION", "FLUSH"]).unwrap();
    one_task(&q).await;
    let (fcalls, evalshas) = calls_by_kind(&server);
    assert!(fcalls >= 6 && evalshas == 0, "{fcalls} FCALLs, {evalshas} EVALSHAs");
    let libraries = format!("{:?}", server.query(&["FUNCTION", "LIST", "LIBRARYNAME", "koubou_*"]).unwrap());
    assert!(libraries.contains("_batch"), "the library is loaded again: {libraries}");
}

/// A user not allowed to load functions (or a server before Redis 7) runs the same writes as
/// scripts.
#[tokio::test]
async fn a_user_who_may_not_load_functions_runs_scripts() {
    let server = Arc::new(scripts_only());
    let q = open(&Namespace::on(server.clone())).await;
    one_task(&q).await;
    let (fcalls, evalshas) = calls_by_kind(&server);
    assert!(fcalls == 0 && evalshas >= 3, "{fcalls} FCALLs, {evalshas} EVALSHAs");
}

/// A private server whose only user may run anything but `FUNCTION`.
fn scripts_only() -> Server {
    Server::start_with_login(
        &["--user", "koubou", "on", ">scripts-pw", "~*", "&*", "+@all", "-function", "--user", "default", "off"],
        "koubou:scripts-pw@",
    )
}

crate::conformance_suite!(conformance_as_scripts, Namespaces { scripts: true });

/// Writes sent at once go in batches: each still has its own answer, an operation that fails
/// (here on a key of the wrong type) fails alone, and every event reaches another instance
/// once. (On one thread, so that every submission is waiting before the writer runs.)
#[tokio::test]
async fn concurrent_writes_go_in_batches_each_with_its_own_answer() {
    let ns = fixture();
    let (a, b) = (open(&ns).await, open(&ns).await);
    let mut heard = b.bus().subscribe(None);
    let mut conn = ::redis::Client::open(ns.server.url.as_str()).unwrap().get_connection().unwrap();
    let _: () =
        ::redis::cmd("SET").arg(format!("{{koubou:{}}}:pending:broken", ns.name)).arg("x").query(&mut conn).unwrap();
    let mut broken = new("broken", 5);
    broken.kind = TaskKind::parse("broken").unwrap();
    let mut submits: Vec<_> = (0..200).map(|i| a.submit(new(&format!("t{i}"), 5))).collect();
    submits.insert(100, a.submit(broken));
    let answers = futures::future::join_all(submits).await;
    let failed: Vec<_> = answers.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].to_string().contains("WRONGTYPE"), "{}", failed[0]);
    let ids: Vec<TaskId> = answers.iter().filter_map(|r| r.as_ref().ok()).map(|s| s.task.id).collect();
    assert_eq!(ids.len(), 200);
    for id in &ids {
        assert_eq!(a.get(*id).await.unwrap().unwrap().status, TaskStatus::Pending);
    }
    let mut created = Vec::new();
    while created.len() < 200 {
        let e = soon("the other instance's events", heard.next()).await.unwrap().unwrap();
        if let EventKind::TaskCreated { task_id, .. } = e.kind {
            created.push(task_id);
        }
    }
    let mut submitted = ids.clone();
    submitted.sort();
    let mut seen = created.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, submitted, "every task created once");
    let entries: u64 = ::redis::cmd("XLEN").arg(format!("{{koubou:{}}}:events", ns.name)).query(&mut conn).unwrap();
    assert!(entries < 200, "{entries} stream entries for 200 submissions: none were batched");
}

/// A queue's own events and another node's keep the stream's order on its log, however its
/// answers and its stream reader race: every task's `task_created` (made here) comes before
/// its `task_claimed` and `task_completed` (made by the other instance), each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_and_other_nodes_events_keep_the_streams_order() {
    let ns = fixture();
    let (a, b) = (open(&ns).await, open(&ns).await);
    let mut log = a.bus().subscribe(None);
    let stop = CancellationToken::new();
    let claimer = {
        let (b, stop) = (b.clone(), stop.clone());
        tokio::spawn(async move {
            while let Some(c) = b.claim_wait(&w(1), &ANY, LEASE, &stop).await.unwrap() {
                b.complete(&c.lease, done("ok")).await.unwrap();
            }
        })
    };
    let submits = (0..300).map(|i| a.submit(new(&format!("t{i}"), 5)));
    let ids: Vec<TaskId> = futures::future::join_all(submits).await.into_iter().map(|s| s.unwrap().task.id).collect();
    let mut seen: std::collections::HashMap<TaskId, Vec<&'static str>> = Default::default();
    let mut completed = 0;
    while completed < ids.len() {
        let e = soon("the events of 300 tasks", log.next()).await.unwrap().unwrap();
        if let Some(id) = e.kind.task_id() {
            completed += usize::from(matches!(e.kind, EventKind::TaskCompleted { .. }));
            seen.entry(id).or_default().push(e.kind.name());
        }
    }
    stop.cancel();
    claimer.await.unwrap();
    for id in &ids {
        assert_eq!(seen[id], ["task_created", "task_claimed", "task_completed"], "task {id}");
    }
}
