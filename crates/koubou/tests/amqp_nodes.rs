//! RabbitMQ as the dispatcher, with the real binaries: `koubou serve --queue amqp://… --store
//! redis://…` and `koubou worker` on the same broker and Redis, a serve dispatching the tasks of
//! its own SQLite, the broker closing every connection mid-run, and the flags that are refused.
//!
//! The broker is the machine's (127.0.0.1:5672 as guest, or `KOUBOU_TEST_AMQP`; started with
//! `service rabbitmq-server start` when none answers). Each test has a namespace of its own —
//! its queue `koubou.<ns>.tasks` and exchange `koubou.<ns>.wake`, deleted at its end — and closes
//! only its own processes' connections (named `koubou <ns>` on the broker), so tests run side by
//! side with each other and with other users of the broker.

mod support;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::{FakeLlm, RedisNamespace, Serve, Worker, home_with_fake, read_events, submit, tokens_from, watch_events};

/// A namespace of its own on the test broker; its queue and exchange are deleted on drop.
struct AmqpNamespace {
    name: String,
    url: String,
}

impl AmqpNamespace {
    fn new() -> AmqpNamespace {
        ensure_broker();
        let url = std::env::var("KOUBOU_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        AmqpNamespace { name: format!("bin-amqp-{:016x}", support::fastrand_u64()), url }
    }

    /// The `[queue.amqp]` table selecting this namespace, with a quick outbox sweep.
    fn toml(&self) -> String {
        format!("[queue.amqp]\nnamespace = \"{}\"\nsweep_ms = 1000\n", self.name)
    }

    /// The broker's ids of this namespace's connections.
    fn connections(&self) -> Vec<String> {
        connections_of(&self.name)
    }
}

/// The broker's ids (`<rabbit@host.N.M.0>`) of the connections of namespace `name` (each named
/// `koubou <name>`).
fn connections_of(name: &str) -> Vec<String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .stderr(Stdio::null())
        .output()
        .expect("run rabbitmqctl");
    let mine = format!("koubou {name}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&mine))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Closes every connection of namespace `name`, as `rabbitmqctl close_all_connections` would
/// (without touching anyone else's); how many it closed.
fn close_connections_of(name: &str) -> usize {
    let pids = connections_of(name);
    for pid in &pids {
        let status = Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "test"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run rabbitmqctl");
        assert!(status.success(), "rabbitmqctl close_connection {pid} failed");
    }
    pids.len()
}

impl Drop for AmqpNamespace {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // Its own thread and runtime: drop may run inside (or after) a test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                use lapin::{
                    Connect, ConnectionProperties,
                    options::{ExchangeDeleteOptions, QueueDeleteOptions},
                };
                let Ok(Ok(conn)) =
                    tokio::time::timeout(Duration::from_secs(10), url.connect(ConnectionProperties::default())).await
                else {
                    return;
                };
                if let Ok(ch) = conn.create_channel().await {
                    let queue = format!("koubou.{name}.tasks");
                    let _ = ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
                    let exchange = format!("koubou.{name}.wake");
                    let _ = ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
                }
                let _ = conn.close(200, "".into()).await;
            });
        })
        .join();
    }
}

/// Starts Debian's `rabbitmq-server` when nothing answers on 127.0.0.1:5672 (with another
/// broker in `KOUBOU_TEST_AMQP`, that one is the caller's business).
fn ensure_broker() {
    if std::env::var_os("KOUBOU_TEST_AMQP").is_some() {
        return;
    }
    let answers =
        || std::net::TcpStream::connect_timeout(&"127.0.0.1:5672".parse().unwrap(), Duration::from_secs(2)).is_ok();
    if answers() {
        return;
    }
    let _ = Command::new("service").args(["rabbitmq-server", "start"]).status();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !answers() {
        assert!(Instant::now() < deadline, "RabbitMQ does not answer on 127.0.0.1:5672");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A home whose backend is `fake`, with `extra` settings and leases long enough that a loaded
/// machine does not run a task twice.
fn home(dir: &Path, fake: std::net::SocketAddr, extra: &str) {
    home_with_fake(dir, fake, extra);
    let file = dir.join("koubou.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("lease_secs = 6", "lease_secs = 30")).unwrap();
}

/// The flags selecting RabbitMQ over the test Redis namespace.
fn over_redis<'a>(amqp: &'a AmqpNamespace, ns: &'a RedisNamespace) -> [&'a str; 4] {
    ["--queue", &amqp.url, "--store", &ns.url]
}

async fn task(url: &str, id: &str) -> Value {
    reqwest::get(format!("{url}/task/{id}")).await.unwrap().json().await.unwrap()
}

/// Waits (generously) until every task in `ids` has finished; their views.
async fn finished(url: &str, ids: &[String]) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let mut views = Vec::new();
        for id in ids {
            views.push(task(url, id).await);
        }
        if views.iter().all(|t| ["completed", "failed", "cancelled"].contains(&t["status"].as_str().unwrap_or(""))) {
            return views;
        }
        assert!(Instant::now() < deadline, "tasks did not finish: {views:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An RFC 3339 time as (date, seconds into the day), which orders times of one task list.
fn instant(t: &Value) -> (String, f64) {
    let s = t["started_at"].as_str().unwrap_or_else(|| panic!("not started: {t}"));
    let (date, time) = s.split_once('T').unwrap();
    let time = time.trim_end_matches('Z');
    let secs = time.split(':').fold(0.0, |acc, part| acc * 60.0 + part.parse::<f64>().unwrap());
    (date.to_owned(), secs)
}

fn signal(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill {sig} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_node_runs_what_rabbitmq_hands_out_most_urgent_first() {
    let (ns, amqp) = (RedisNamespace::new(), AmqpNamespace::new());
    let (fake, addr) = FakeLlm::start(Duration::from_millis(400)).await;
    let (c_home, w_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let settings = format!("{}{}", ns.toml(), amqp.toml());
    home(c_home.path(), addr, &settings);
    home(w_home.path(), addr, &settings);
    let ctl =
        Serve::start(c_home.path(), &[&over_redis(&amqp, &ns)[..], &["--workers", "0", "--node-id", "ctl"]].concat());
    // The controller streams the tokens of a task the worker node runs (watched before the node
    // starts, so that no token goes by before the watch).
    let id = submit(&ctl.url, json!({"prompt": "hello over rabbitmq"})).await;
    let sse = watch_events(&ctl.url, &id).await;
    let w = Worker::start(
        w_home.path(),
        &[&over_redis(&amqp, &ns)[..], &["--node-id", "w1", "--max-workers", "1"]].concat(),
    );
    assert!(!amqp.connections().is_empty(), "no connection named after the namespace");
    let seen = read_events(sse).await;
    let tokens = tokens_from(&seen, "w1");
    assert_eq!(tokens, "echo: hello over rabbitmq", "{seen:?}");
    assert_eq!(seen.last().unwrap()["event"], "task_completed", "{seen:?}");
    assert!(task(&ctl.url, &id).await["worker_id"].as_str().unwrap().starts_with("w1/"));

    // With the worker node stopped, three tasks of low priority, then one of high priority:
    // resumed, its one worker takes the urgent one first, then the others in their order.
    signal(&w.child, "-STOP");
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(submit(&ctl.url, json!({"prompt": format!("low {n}"), "priority": 2})).await);
    }
    let high = submit(&ctl.url, json!({"prompt": "high", "priority": 9})).await;
    signal(&w.child, "-CONT");
    ids.insert(0, high);
    let mut done = finished(&ctl.url, &ids).await;
    for t in &done {
        assert_eq!((t["status"].as_str(), t["attempts"].as_u64()), (Some("completed"), Some(1)), "{t}");
    }
    let order: Vec<String> = {
        done.sort_by(|a, b| instant(a).partial_cmp(&instant(b)).unwrap());
        done.iter().map(|t| t["prompt"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(order, ["high", "low 1", "low 2", "low 3"]);
    for p in ["hello over rabbitmq", "high", "low 1", "low 2", "low 3"] {
        assert_eq!(fake.calls(p), 1, "{p}");
    }
    assert_eq!(tokio::task::spawn_blocking(move || w.terminate()).await.unwrap(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_completes_once_when_the_broker_closes_every_connection_mid_run() {
    let (ns, amqp) = (RedisNamespace::new(), AmqpNamespace::new());
    let (fake, addr) = FakeLlm::start(Duration::from_millis(1500)).await;
    let (c_home, w_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let settings = format!("{}{}", ns.toml(), amqp.toml());
    home(c_home.path(), addr, &settings);
    home(w_home.path(), addr, &settings);
    let ctl =
        Serve::start(c_home.path(), &[&over_redis(&amqp, &ns)[..], &["--workers", "0", "--node-id", "ctl"]].concat());
    let _w = Worker::start(
        w_home.path(),
        &[&over_redis(&amqp, &ns)[..], &["--node-id", "w1", "--max-workers", "2", "--min-workers", "2"]].concat(),
    );

    let prompt = |n: usize| format!("task {n}");
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(submit(&ctl.url, json!({"prompt": prompt(n)})).await);
    }
    // Tasks running on the worker node and more queued: the broker drops both nodes' links.
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..6).all(|n| fake.calls(&prompt(n)) == 0) {
        assert!(Instant::now() < deadline, "no task reached the backend");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let name = amqp.name.clone();
    let closed = tokio::task::spawn_blocking(move || close_connections_of(&name)).await.unwrap();
    assert!(closed >= 2, "closed {closed} connections; the controller and the worker node each have one");
    // Submitted while the links are down or coming back: stored, and published by a submit or
    // by the outbox sweep once a link is there again.
    for n in 6..9 {
        ids.push(submit(&ctl.url, json!({"prompt": prompt(n)})).await);
    }

    let done = finished(&ctl.url, &ids).await;
    for t in &done {
        assert_eq!((t["status"].as_str(), t["attempts"].as_u64()), (Some("completed"), Some(1)), "{t}");
        assert!(t["worker_id"].as_str().unwrap().starts_with("w1/"), "{t}");
    }
    for n in 0..9 {
        assert_eq!(fake.calls(&prompt(n)), 1, "the backend ran {:?} {} times", prompt(n), fake.calls(&prompt(n)));
    }
    // Both nodes connected again, and go on working.
    let deadline = Instant::now() + Duration::from_secs(60);
    while amqp.connections().len() < 2 {
        assert!(Instant::now() < deadline, "the nodes did not connect again: {:?}", amqp.connections());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let id = submit(&ctl.url, json!({"prompt": "after the cut"})).await;
    assert_eq!(finished(&ctl.url, &[id]).await[0]["status"], "completed");
    assert_eq!(fake.calls("after the cut"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_dispatches_the_tasks_of_a_serve_on_sqlite_and_of_koubou_run() {
    let amqp = AmqpNamespace::new();
    let (fake, addr) = FakeLlm::start(Duration::from_millis(50)).await;
    let dir = tempfile::tempdir().unwrap();
    home(dir.path(), addr, &amqp.toml());
    // The home's SQLite keeps the tasks; the serve's own workers take them from the broker.
    let serve = Serve::start(dir.path(), &["--queue", &amqp.url]);
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(submit(&serve.url, json!({"prompt": format!("local {n}"), "priority": 1 + 2 * n})).await);
    }
    for t in finished(&serve.url, &ids).await {
        assert_eq!((t["status"].as_str(), t["attempts"].as_u64()), (Some("completed"), Some(1)), "{t}");
        assert!(t["worker_id"].as_str().unwrap().starts_with("serve/"), "{t}");
    }
    assert!(!amqp.connections().is_empty(), "the serve has no connection to the broker");
    // /system/info names the broker and its queue (not its password) beside the store.
    let info: Value = reqwest::get(format!("{}/system/info", serve.url)).await.unwrap().json().await.unwrap();
    let dispatcher = info["dispatcher"].as_str().unwrap_or_default();
    assert!(dispatcher.starts_with("amqp://") && dispatcher.contains(".tasks)"), "{info}");
    assert!(!dispatcher.contains("guest:guest") && info["db_path"].as_str().unwrap().ends_with(".db"), "{info}");
    let stderr_log = serve.stderr_log.clone();
    drop(serve);
    let log = std::fs::read_to_string(&stderr_log).unwrap();
    assert!(log.contains("RabbitMQ hands out the tasks"), "{log}");
    assert!(!log.contains("guest:guest"), "the broker's password was logged");

    // `koubou run --queue-type rabbitmq`: the broker from KOUBOU_AMQP_URL, over its own home.
    let run_home = tempfile::tempdir().unwrap();
    home(run_home.path(), addr, &amqp.toml());
    let out = tokio::task::spawn_blocking({
        let (home, url) = (run_home.path().to_owned(), amqp.url.clone());
        move || {
            Command::new(support::bin())
                .arg("--home")
                .arg(home)
                .args(["run", "--queue-type", "rabbitmq", "one prompt end to end"])
                .env("KOUBOU_AMQP_URL", url)
                .env_remove("KOUBOU_HOME")
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("echo: one prompt end to end"), "{stdout}\n{stderr}");
    assert_eq!(fake.calls("one prompt end to end"), 1);
}

#[test]
fn rabbitmq_flags_that_cannot_work_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path();
    let broker = "amqp://guest:guest@127.0.0.1:5672/%2f";
    // A worker node over RabbitMQ keeps its tasks where the controllers do: a Redis store.
    let e = support::refused(h, &["worker", "--node-id", "w1", "--queue", broker], &[]);
    assert!(e.contains("--store redis://") && e.contains("queue.store"), "{e}");
    let e = support::refused(h, &["worker", "--node-id", "w1", "--queue", broker, "--store", "sqlite:"], &[]);
    assert!(e.contains("--store redis://"), "{e}");
    // Bad URLs name the flag or variable, never the password.
    let e = support::refused(h, &["serve", "--queue", "amqp://u:hunter2@h:notaport/"], &[]);
    assert!(e.contains("--queue") && e.contains("not an AMQP URL") && !e.contains("hunter2"), "{e}");
    let e = support::refused(h, &["serve", "--queue", broker, "--store", "amqp://u:hunter2@h/"], &[]);
    assert!(e.contains("--store") && e.contains("RabbitMQ keeps no tasks") && !e.contains("hunter2"), "{e}");
    let e = support::refused(h, &["serve"], &[("KOUBOU_QUEUE", "amqp://u:hunter2@h:x/")]);
    assert!(e.contains("KOUBOU_QUEUE") && !e.contains("hunter2"), "{e}");
    let e = support::refused(
        h,
        &["worker", "--node-id", "w1", "--queue-type", "rabbitmq"],
        &[("KOUBOU_AMQP_URL", "amqp://u:hunter2@h:x/")],
    );
    assert!(e.contains("KOUBOU_AMQP_URL") && !e.contains("hunter2"), "{e}");
    // A store only goes with RabbitMQ; other queue URLs name their store themselves.
    let e = support::refused(h, &["serve", "--queue", "redis://127.0.0.1:6379/0", "--store", "sqlite:"], &[]);
    assert!(e.contains("--store: only with a RabbitMQ queue"), "{e}");
    std::fs::write(h.join("koubou.toml"), "[queue]\nstore = \"redis://127.0.0.1:6379/0\"\n").unwrap();
    let e = support::refused(h, &["serve"], &[]);
    assert!(e.contains("queue.store: only with a RabbitMQ queue"), "{e}");
    std::fs::write(h.join("koubou.toml"), "[queue.amqp]\nurl = \"amqp://h/\"\n").unwrap();
    let e = support::refused(h, &["serve"], &[]);
    assert!(e.contains("queue.amqp.url"), "{e}");
    std::fs::remove_file(h.join("koubou.toml")).unwrap();
    // `koubou mcp` without --embedded has no queue of its own.
    let e = support::refused(h, &["mcp", "--store", "redis://127.0.0.1:6379/0"], &[]);
    assert!(e.contains("need --embedded"), "{e}");
}
