//! Controllers and worker nodes on one Redis when things go wrong: a node stopped past its lease,
//! a node killed with only a controller left, Redis killed and restarted with AOF, a node cut off
//! by its network, priority and tags across nodes, and a 60 s chaos run. Real `koubou serve` and
//! `koubou worker` processes; a private `redis-server` wherever a test restarts it or drops its
//! connections, the machine's elsewhere (a namespace per test).
//!
//! Nothing here asserts how fast something happened: deadlines are generous, and the figures
//! (how soon workers were back after a Redis restart) are printed, not checked.

mod support;

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use koubou_queue::redis::testing::Server;
use serde_json::{Value, json};
use support::{FakeLlm, RedisNamespace, Serve, Worker, read_events, submit, tokens_from, watch_events};

/// Timings of a test's nodes: lease and registration TTL, in seconds.
#[derive(Clone, Copy)]
struct Timing {
    lease: u64,
    ttl: u64,
}

const QUICK: Timing = Timing { lease: 2, ttl: 2 };

/// A koubou.toml for a node on the queue `url` (namespace `ns`), with `workers` workers and the
/// backend `backend` (a table body, without its header).
fn home(dir: &Path, url: &str, ns: &str, workers: usize, t: Timing, backend: &str) {
    let cfg = format!(
        r#"
[pool]
min_workers = {workers}
max_workers = {workers}
lease_secs = {lease}
node_ttl_secs = {ttl}
cooldown_ms = 200
shutdown_grace_secs = 2
[queue]
url = "{url}"
max_attempts = 10
[queue.retry]
base_ms = 100
max_ms = 200
[queue.redis]
namespace = "{ns}"
timeout_ms = 2000
[backends.b]
{backend}
[types.general]
backend = "b"
"#,
        lease = t.lease,
        ttl = t.ttl,
    );
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("koubou.toml"), cfg).unwrap();
}

/// The fake backend's table body.
fn openai(addr: SocketAddr, concurrency: usize) -> String {
    format!(
        "kind = \"openai\"\nbase_url = \"http://{addr}/v1\"\nmodel = \"fake\"\napi_key_env = \"\"\nconcurrency = {concurrency}\n"
    )
}

/// A controller (no workers) on `url`.
fn controller(dir: &Path, url: &str, ns: &str, id: &str, backend: &str) -> Serve {
    home(dir, url, ns, 1, QUICK, backend);
    Serve::start(dir, &["--workers", "0", "--node-id", id])
}

async fn task(url: &str, id: &str) -> Value {
    reqwest::get(format!("{url}/task/{id}")).await.unwrap().json().await.unwrap()
}

/// Waits for `f` with a generous deadline (a loaded machine only makes it slower, never wrong).
async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until task `id` has `status`, and returns it.
async fn status(url: &str, id: &str, want: &str) -> Value {
    until(&format!("task {id} to be {want}"), async || {
        let t = task(url, id).await;
        (t["status"] == want).then_some(t)
    })
    .await
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

fn log_has(w: &Worker, needle: &str) -> bool {
    std::fs::read_to_string(&w.stderr_log).unwrap_or_default().contains(needle)
}

/// What a worker logs when it stops an attempt whose lease it could not renew in time, or when
/// a write of its attempt is refused.
const LATE: [&str; 3] = [
    "the lease ran out before it could be renewed; stopping this attempt",
    "the lease was lost: the task is another worker's now",
    "task changed under its worker",
];

/// SIGSTOP a worker node past its lease: another node completes the task; SIGCONT, and the
/// first finds its attempt taken, stops it, and none of its writes change the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_past_its_lease_loses_the_task_and_every_late_write() {
    let ns = RedisNamespace::new();
    let (rec, addr) = FakeLlm::start(Duration::from_secs(4)).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ctl = controller(dirs[0].path(), &ns.url, &ns.name, "ctl", &openai(addr, 4));
    home(dirs[1].path(), &ns.url, &ns.name, 1, QUICK, &openai(addr, 4));
    home(dirs[2].path(), &ns.url, &ns.name, 1, QUICK, &openai(addr, 4));
    let w1 = Worker::start(dirs[1].path(), &["--node-id", "w1"]);

    let id = submit(&ctl.url, json!({"prompt": "stalled then taken over"})).await;
    let first = status(&ctl.url, &id, "running").await;
    assert!(first["worker_id"].as_str().unwrap().starts_with("w1/"), "{first}");
    until("the first attempt to reach the backend", async || (!rec.log().is_empty()).then_some(())).await;
    signal(w1.child.id(), "-STOP");

    let w2 = Worker::start(dirs[2].path(), &["--node-id", "w2"]);
    let done = status(&ctl.url, &id, "completed").await;
    assert!(done["worker_id"].as_str().unwrap().starts_with("w2/"), "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    assert_eq!(done["result"]["output"], "echo: stalled then taken over", "{done}");

    signal(w1.child.id(), "-CONT");
    until("w1 to find its attempt taken", async || LATE.iter().any(|l| log_has(&w1, l)).then_some(())).await;
    // Give any write it still had in flight the time to land (or be refused).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = task(&ctl.url, &id).await;
    for field in ["status", "worker_id", "attempts", "result", "finished_at"] {
        assert_eq!(after[field], done[field], "{field} changed after w1 came back: {after}");
    }
    let health: Value = reqwest::get(format!("{}/health", ctl.url)).await.unwrap().json().await.unwrap();
    assert_eq!(health["queue"]["completed"], 1, "{health}");
    assert_eq!(rec.log().len(), 2, "one call per attempt: {:?}", rec.log());
    drop(w2);
}

/// A node killed mid-task with no other worker alive: the controller alone requeues the task
/// once its lease has run out, and a node started later completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_task_is_requeued_with_only_a_controller_alive() {
    let ns = RedisNamespace::new();
    let (rec, addr) = FakeLlm::start(Duration::from_secs(60)).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ctl = controller(dirs[0].path(), &ns.url, &ns.name, "ctl", &openai(addr, 4));
    home(dirs[1].path(), &ns.url, &ns.name, 1, QUICK, &openai(addr, 4));
    let w1 = Worker::start(dirs[1].path(), &["--node-id", "w1"]);
    let id = submit(&ctl.url, json!({"prompt": "left behind"})).await;
    status(&ctl.url, &id, "running").await;
    let killed = Instant::now();
    w1.kill9();

    let requeued = status(&ctl.url, &id, "pending").await;
    println!("requeued by the controller {:.1} s after the kill (lease 2 s)", killed.elapsed().as_secs_f64());
    assert_eq!((requeued["attempts"].as_u64(), requeued["worker_id"].as_str()), (Some(1), None), "{requeued}");
    let nodes: Value = reqwest::get(format!("{}/nodes", ctl.url)).await.unwrap().json().await.unwrap();
    let alive = |n: &Value| n["id"] == "w1" && n["lost"] == false;
    assert!(!nodes["nodes"].as_array().unwrap().iter().any(alive), "w1 still listed alive: {nodes}");

    rec.set_delay(Duration::from_millis(50));
    home(dirs[2].path(), &ns.url, &ns.name, 1, QUICK, &openai(addr, 4));
    let _w2 = Worker::start(dirs[2].path(), &["--node-id", "w2"]);
    let done = status(&ctl.url, &id, "completed").await;
    assert!(done["worker_id"].as_str().unwrap().starts_with("w2/"), "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
}

/// Redis killed (kill -9) and restarted on its AOF (`appendfsync always`) in the middle of a run:
/// every task accepted before completes, exactly once by its record; the nodes come back by
/// themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_run_loses_no_accepted_task() {
    let mut redis = Server::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let url = redis.url.clone();
    let (rec, addr) = FakeLlm::start(Duration::from_millis(300)).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let t = Timing { lease: 5, ttl: 5 };
    let ctl = controller(dirs[0].path(), &url, "restart", "ctl", &openai(addr, 4));
    home(dirs[1].path(), &url, "restart", 4, t, &openai(addr, 4));
    home(dirs[2].path(), &url, "restart", 4, t, &openai(addr, 4));
    let _w1 = Worker::start(dirs[1].path(), &["--node-id", "w1"]);
    let _w2 = Worker::start(dirs[2].path(), &["--node-id", "w2"]);

    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(submit(&ctl.url, json!({"prompt": format!("before the restart {i}")})).await);
    }
    let health = |url: String| async move {
        let h: Value = reqwest::get(format!("{url}/health")).await.ok()?.json().await.ok()?;
        h["queue"]["completed"].as_u64()
    };
    until("some tasks to complete", async || health(ctl.url.clone()).await.filter(|&n| n >= 5)).await;
    redis.kill();
    // While Redis is down a submission is refused, not taken and lost.
    let r = reqwest::Client::new()
        .post(format!("{}/task/delegate", ctl.url))
        .json(&json!({"prompt": "while redis is down"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(redis.restart(), "redis-server did not come back on its port");
    let back = Instant::now();

    let probe = until("the controller to take tasks again", async || {
        let r = reqwest::Client::new()
            .post(format!("{}/task/delegate", ctl.url))
            .json(&json!({"prompt": "after the restart"}))
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        v["task_id"].as_str().map(str::to_owned)
    })
    .await;
    status(&ctl.url, &probe, "completed").await;
    println!("after the restart, a new task was completed by a worker node in {:.2} s", back.elapsed().as_secs_f64());
    for id in &ids {
        let t = status(&ctl.url, id, "completed").await;
        let prompt = t["prompt"].as_str().unwrap().to_owned();
        assert_eq!(t["result"]["output"], format!("echo: {prompt}"), "{t}");
    }
    let calls = rec.log();
    for i in 0..40 {
        let p = format!("before the restart {i}");
        assert!(calls.iter().any(|c| c.prompt == p), "task {i} never ran");
    }
}

/// A node's link goes down for twice its lease while it runs a task: it stops that attempt when
/// its lease runs out by its own count, another node completes the task, and once the link is
/// back the node takes tasks again; nothing it does changes the finished task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_by_its_network_stops_its_attempt_and_comes_back() {
    let Some(net) = Netns::create() else {
        // `ip netns` needs root and iproute2 (both on the machine and in CI).
        panic!("cannot create a network namespace: run as root with iproute2 installed");
    };
    let redis = Server::start_bound(&format!("127.0.0.1 {}", net.host_ip), &[]);
    let cut_url = format!("redis://{}:{}/0", net.host_ip, redis.port);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // Programs, not network backends: the cut node's answers come from its own machine.
    let exec = |answer: &str, secs: u32| {
        format!(
            "kind = \"exec\"\nargv = [\"/bin/sh\", \"-c\", \"cat > /dev/null; sleep {secs}; echo {answer}\"]\nconcurrency = 2\n"
        )
    };
    let t = Timing { lease: 3, ttl: 3 };
    let ctl = controller(dirs[0].path(), &redis.url, "netns", "ctl", &exec("controller", 0));
    home(dirs[1].path(), &cut_url, "netns", 1, t, &exec("from-the-cut-node", 10));
    let cut = Worker::start_via(&net.exec_prefix(), dirs[1].path(), &["--node-id", "cut"]);

    let id = submit(&ctl.url, json!({"prompt": "cut off mid-task"})).await;
    let running = status(&ctl.url, &id, "running").await;
    assert!(running["worker_id"].as_str().unwrap().starts_with("cut/"), "{running}");
    net.link(false);
    let down = Instant::now();
    home(dirs[2].path(), &redis.url, "netns", 1, t, &exec("from-the-host-node", 0));
    let host = Worker::start(dirs[2].path(), &["--node-id", "host"]);
    let done = status(&ctl.url, &id, "completed").await;
    assert!(done["worker_id"].as_str().unwrap().starts_with("host/"), "{done}");
    assert_eq!(done["result"]["output"].as_str().map(str::trim), Some("from-the-host-node"), "{done}");
    until("the cut node to stop its attempt", async || log_has(&cut, LATE[0]).then_some(())).await;
    // Down for twice the lease in all.
    tokio::time::sleep(Duration::from_secs(2 * t.lease).saturating_sub(down.elapsed())).await;
    net.link(true);

    // Back: with the host node gone, the next task runs on the cut node.
    assert_eq!(tokio::task::spawn_blocking(move || host.terminate()).await.unwrap(), Some(0));
    let next = submit(&ctl.url, json!({"prompt": "after the cut"})).await;
    let later = status(&ctl.url, &next, "completed").await;
    assert!(later["worker_id"].as_str().unwrap().starts_with("cut/"), "{later}");
    let after = task(&ctl.url, &id).await;
    for field in ["status", "worker_id", "attempts", "result", "finished_at"] {
        assert_eq!(after[field], done[field], "{field} changed after the link came back: {after}");
    }
}

/// A network namespace joined to this one by a veth pair: the way to cut a node off.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

impl Netns {
    fn create() -> Option<Netns> {
        let tag = format!("{:06x}", std::process::id() & 0xff_ffff);
        let subnet = 1 + std::process::id() % 250;
        let (name, host_if, node_if) = (format!("kb{tag}"), format!("kbh{tag}"), format!("kbn{tag}"));
        let (host_ip, node_ip) = (format!("10.231.{subnet}.1"), format!("10.231.{subnet}.2"));
        let net = Netns { name: name.clone(), host_if: host_if.clone(), host_ip: host_ip.clone() };
        // What a killed run of a test with the same process id may have left.
        ip(&["link", "del", &host_if]);
        ip(&["netns", "del", &name]);
        let ok = ip(&["netns", "add", &name])
            && ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &node_if])
            && ip(&["link", "set", &node_if, "netns", &name])
            && ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&["netns", "exec", &name, "ip", "addr", "add", &format!("{node_ip}/30"), "dev", &node_if])
            && ip(&["netns", "exec", &name, "ip", "link", "set", &node_if, "up"])
            && ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        ok.then_some(net)
    }

    fn exec_prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name].map(str::to_owned).to_vec()
    }

    fn link(&self, up: bool) {
        assert!(ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["link", "del", &self.host_if]);
        ip(&["netns", "del", &self.name]);
    }
}

/// Priority holds across nodes, and a tagged task goes only to a node declaring its tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_and_tags_hold_across_nodes() {
    let ns = RedisNamespace::new();
    let (rec, addr) = FakeLlm::start(Duration::from_millis(400)).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ctl = controller(dirs[0].path(), &ns.url, &ns.name, "ctl", &openai(addr, 4));
    home(dirs[1].path(), &ns.url, &ns.name, 1, QUICK, &openai(addr, 1));
    home(dirs[2].path(), &ns.url, &ns.name, 1, QUICK, &openai(addr, 1));
    // Everything is queued before any node runs, so the claim order is the queue's alone.
    let mut low = Vec::new();
    for i in 0..4 {
        low.push(submit(&ctl.url, json!({"prompt": format!("low {i}"), "priority": 2})).await);
    }
    let mut high = Vec::new();
    for i in 0..2 {
        high.push(submit(&ctl.url, json!({"prompt": format!("high {i}"), "priority": 9})).await);
    }
    let secret = submit(&ctl.url, json!({"prompt": "secret", "priority": 10, "tags": ["confidential"]})).await;
    let _w1 = Worker::start(dirs[1].path(), &["--node-id", "plain"]);
    let _w2 = Worker::start(dirs[2].path(), &["--node-id", "trusted", "--tags", "confidential"]);
    for id in low.iter().chain(&high).chain([&secret]) {
        status(&ctl.url, id, "completed").await;
    }
    let s = task(&ctl.url, &secret).await;
    assert!(s["worker_id"].as_str().unwrap().starts_with("trusted/"), "{s}");
    // The two high-priority tasks reached the backend before every low one.
    let order: Vec<String> = rec.log().into_iter().map(|c| c.prompt).filter(|p| p != "secret").collect();
    let last_high = order.iter().rposition(|p| p.starts_with("high")).unwrap();
    let first_low = order.iter().position(|p| p.starts_with("low")).unwrap();
    assert!(last_high < first_low, "{order:?}");
    let lows: Vec<&String> = order.iter().filter(|p| p.starts_with("low")).collect();
    assert_eq!(lows, ["low 0", "low 1", "low 2", "low 3"], "FIFO within a priority");
}

/// 60 s of chaos: 3 worker nodes, 2 controllers, 2,000 tasks; every 2–5 s a node is killed
/// (and started again) or the Redis connections are dropped. Afterwards every task has ended
/// once, by its own result, and no two attempts of one task ran at the same time at the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_nodes_killed_and_connections_dropped_lose_nothing_and_never_overlap() {
    const TASKS: usize = 2000;
    const RUN: Duration = Duration::from_secs(60);
    let redis = Server::start(&[]);
    let url = redis.url.clone();
    let (rec, addr) = FakeLlm::start(Duration::from_millis(150)).await;
    let t = Timing { lease: 2, ttl: 2 };
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let ctls = [
        controller(dirs[0].path(), &url, "chaos", "c1", &openai(addr, 4)),
        controller(dirs[1].path(), &url, "chaos", "c2", &openai(addr, 4)),
    ];
    for d in &dirs[2..] {
        home(d.path(), &url, "chaos", 4, t, &openai(addr, 4));
    }
    let start_node = |k: usize| Worker::start(dirs[2 + k].path(), &["--node-id", &format!("w{k}")]);
    let mut nodes: Vec<Option<Worker>> = (0..3).map(|k| Some(start_node(k))).collect();

    let began = Instant::now();
    // Submissions, spread over the first 40 s, alternating controllers, each with its own key.
    let submitter = {
        let urls: Vec<String> = ctls.iter().map(|c| c.url.clone()).collect();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut ids = Vec::with_capacity(TASKS);
            for i in 0..TASKS {
                let at = Duration::from_millis(40_000 * i as u64 / TASKS as u64);
                tokio::time::sleep(at.saturating_sub(began.elapsed())).await;
                let body = json!({"prompt": format!("chaos {i}"), "idempotency_key": format!("chaos-{i}")});
                let id = loop {
                    // A controller answering an error (its Redis connection just dropped) is
                    // asked again: the key makes a retry the same task.
                    let r = http.post(format!("{}/task/delegate", urls[i % 2])).json(&body).send().await;
                    if let Ok(r) = r
                        && let Ok(v) = r.json::<Value>().await
                        && let Some(id) = v["task_id"].as_str()
                    {
                        break id.to_owned();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                ids.push(id);
            }
            ids
        })
    };

    let mut disruptions = Vec::new();
    while began.elapsed() < RUN {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(2000..5000))).await;
        if fastrand::u64(0..2) == 0 {
            let k = fastrand::u64(0..3) as usize;
            if let Some(w) = nodes[k].take() {
                w.kill9();
            }
            nodes[k] = Some(start_node(k));
            disruptions.push(format!("killed w{k}"));
        } else {
            // Every node's writer and event reader (a blocking XREAD) are normal connections.
            let _ = redis.query(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]);
            disruptions.push("dropped every connection".to_owned());
        }
    }
    let ids = submitter.await.unwrap();
    println!("chaos: {} disruptions: {disruptions:?}", disruptions.len());

    let http = reqwest::Client::new();
    for (i, id) in ids.iter().enumerate() {
        let t: Value = until(&format!("chaos task {i} to end"), async || {
            let t: Value = http.get(format!("{}/task/{id}", ctls[i % 2].url)).send().await.ok()?.json().await.ok()?;
            matches!(t["status"].as_str(), Some("completed" | "failed" | "cancelled")).then_some(t)
        })
        .await;
        assert_eq!(t["status"], "completed", "{t}");
        assert_eq!(t["result"]["output"], format!("echo: chaos {i}"), "{t}");
    }
    let h: Value = http.get(format!("{}/health", ctls[0].url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(h["queue"]["completed"].as_u64(), Some(TASKS as u64), "one record per task: {h}");

    // No two attempts of one task at the backend at once.
    let mut calls = rec.log();
    calls.sort_by(|a, b| a.prompt.cmp(&b.prompt).then(a.start.cmp(&b.start)));
    let mut retried = 0;
    for pair in calls.windows(2) {
        if pair[0].prompt == pair[1].prompt {
            retried += 1;
            let end = pair[0].end.expect("an earlier attempt never ended");
            assert!(end <= pair[1].start, "two attempts of {:?} overlapped: {pair:?}", pair[0].prompt);
        }
    }
    println!("chaos: {TASKS} tasks completed once each; {retried} ran again after a disruption, never overlapping");
}

/// A controller cut off from Redis (its ACL user turned off, its connections killed) while a
/// worker node streams a task's tokens: once it is let back, its SSE client gets every token
/// it missed, in order and once, then the completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_cut_off_from_redis_misses_no_token() {
    let redis = Server::start(&["--user", "ctl", "on", ">ctl-pw", "~*", "&*", "+@all"]);
    let (rec, addr) = FakeLlm::start(Duration::from_secs(8)).await;
    let (c_home, w_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ctl_url = format!("redis://ctl:ctl-pw@127.0.0.1:{}/0", redis.port);
    let ctl = controller(c_home.path(), &ctl_url, "cut", "ctl", &openai(addr, 4));
    home(w_home.path(), &redis.url, "cut", 1, QUICK, &openai(addr, 4));

    // Watched before the worker node starts: every token is published after the watch began.
    let prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen";
    let id = submit(&ctl.url, json!({ "prompt": prompt })).await;
    let sse = tokio::spawn(read_events(watch_events(&ctl.url, &id).await));
    let _w1 = Worker::start(w_home.path(), &["--node-id", "w1"]);
    until("the task to reach the backend", async || (!rec.log().is_empty()).then_some(())).await;
    redis.query(&["ACL", "SETUSER", "ctl", "off"]).unwrap();
    let killed = redis.query(&["CLIENT", "KILL", "USER", "ctl"]).unwrap();
    assert!(matches!(killed, redis::Value::Int(n) if n >= 2), "the controller was connected: {killed:?}");
    // The worker goes on streaming while the controller is away.
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.query(&["ACL", "SETUSER", "ctl", "on"]).unwrap();

    let seen = tokio::time::timeout(Duration::from_secs(180), sse).await.expect("the SSE stream ended").unwrap();
    assert_eq!(tokens_from(&seen, "w1"), format!("echo: {prompt}"), "{seen:?}");
    assert_eq!(seen.last().unwrap()["event"], "task_completed", "{seen:?}");
    let log = std::fs::read_to_string(&ctl.stderr_log).unwrap_or_default();
    assert!(log.contains("reading the queue's event stream again"), "the controller never reconnected:\n{log}");
    println!("the controller missed nothing over its reconnection ({} events)", seen.len());
}
