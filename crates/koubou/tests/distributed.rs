//! Controllers and worker nodes on one Redis, as separate processes: `koubou serve --queue
//! redis://… --workers 0` takes the task, `koubou worker` runs it, and the controller streams
//! the worker's tokens.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{
    FakeLlm, RedisNamespace, Serve, Worker, home_with_fake, read_events, submit, task_events, tokens_from, watch_events,
};

/// A controller (no local workers) and a home for a worker node, on one namespace.
fn controller(ns: &RedisNamespace, fake: std::net::SocketAddr, dir: &std::path::Path) -> Serve {
    home_with_fake(dir, fake, &ns.toml());
    Serve::start(dir, &["--queue", &ns.url, "--workers", "0", "--node-id", "ctl"])
}

fn worker_home(ns: &RedisNamespace, fake: std::net::SocketAddr, dir: &std::path::Path, extra: &str) {
    home_with_fake(dir, fake, &format!("{extra}\n{}", ns.toml()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_streams_the_tokens_of_a_task_run_by_a_worker_node() {
    let ns = RedisNamespace::new();
    let (_fake, addr) = FakeLlm::start(Duration::from_millis(1200)).await;
    let (c_home, w_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ctl = controller(&ns, addr, c_home.path());
    worker_home(&ns, addr, w_home.path(), "");
    // Watched before any node can run it, so that no token goes by before the watch.
    let id = submit(&ctl.url, json!({"prompt": "hello from the controller"})).await;
    let sse = watch_events(&ctl.url, &id).await;
    let w = Worker::start(w_home.path(), &["--queue", &ns.url, "--node-id", "w1", "--capabilities", "general"]);
    let seen = read_events(sse).await;
    let tokens = tokens_from(&seen, "w1");
    assert_eq!(tokens, "echo: hello from the controller", "{seen:?}");
    assert_eq!(seen.last().unwrap()["event"], "task_completed", "{seen:?}");
    let task: Value = reqwest::get(format!("{}/task/{id}", ctl.url)).await.unwrap().json().await.unwrap();
    assert!(task["worker_id"].as_str().unwrap().starts_with("w1/"), "{task}");
    assert_eq!(task["result"]["output"], "echo: hello from the controller", "{task}");

    // Both nodes are registered, each with what it claims; `koubou nodes` shows them.
    let nodes = || async {
        let v: Value = reqwest::get(format!("{}/nodes", ctl.url)).await.unwrap().json().await.unwrap();
        v["nodes"].as_array().unwrap().iter().map(|n| (n["id"].to_string(), n["kinds"].to_string())).collect::<Vec<_>>()
    };
    let listed = nodes().await;
    assert!(listed.contains(&("\"w1\"".into(), "[\"general\"]".into())), "{listed:?}");
    assert!(listed.iter().any(|(id, _)| id == "\"ctl\""), "{listed:?}");
    let (code, out, err) = support::cli(c_home.path(), &ctl.url, &["nodes"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("w1") && out.contains("ctl") && out.contains("alive"), "{out}");

    // Stopped, the worker node deregisters and exits 0.
    assert_eq!(tokio::task::spawn_blocking(move || w.terminate()).await.unwrap(), Some(0));
    assert!(nodes().await.iter().all(|(id, _)| id != "\"w1\""), "w1 did not deregister");
    let health: Value = reqwest::get(format!("{}/health", ctl.url)).await.unwrap().json().await.unwrap();
    assert_eq!(health["queue"]["completed"], 1, "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_node_claims_only_the_kinds_it_declares() {
    let ns = RedisNamespace::new();
    let (_fake, addr) = FakeLlm::start(Duration::from_millis(10)).await;
    let (c_home, w_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ctl = controller(&ns, addr, c_home.path());
    worker_home(&ns, addr, w_home.path(), "");
    let _w = Worker::start(w_home.path(), &["--queue", &ns.url, "--node-id", "w1", "--capabilities", "general"]);

    // Submitted first: a code task no node serves stays pending while the general one, after
    // it, completes.
    let code = submit(&ctl.url, json!({"prompt": "a code task", "type": "code"})).await;
    let general = submit(&ctl.url, json!({"prompt": "a general task", "type": "general"})).await;
    let seen = task_events(&ctl.url, &general).await;
    assert_eq!(seen.last().unwrap()["event"], "task_completed", "{seen:?}");
    let t: Value = reqwest::get(format!("{}/task/{code}", ctl.url)).await.unwrap().json().await.unwrap();
    assert_eq!((&t["status"], &t["worker_id"]), (&json!("pending"), &Value::Null), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_node_refuses_sqlite_and_queue_flags_are_checked() {
    let w_home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(support::bin())
        .args(["worker", "--node-id", "w1", "--queue", "sqlite:", "--home"])
        .arg(w_home.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("a worker node needs a queue shared"), "{err}");
    let out = std::process::Command::new(support::bin())
        .args(["serve", "--queue", "redis://u:hunter2@h:nope/0", "--home"])
        .arg(w_home.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--queue") && err.contains("not a Redis URL") && !err.contains("hunter2"), "{err}");
    // `koubou mcp` without --embedded has no queue of its own: a queue flag is refused, not ignored.
    let out = std::process::Command::new(support::bin())
        .args(["mcp", "--queue-type", "redis", "--home"])
        .arg(w_home.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--queue and --queue-type need --embedded"), "{err}");
}

/// A worker node killed with `kill -9` mid-task: its lease runs out (6 s), another node takes the
/// task, and it completes exactly once there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_of_a_killed_worker_node_completes_once_on_another() {
    let ns = RedisNamespace::new();
    let (fast, fast_addr) = FakeLlm::start(Duration::from_millis(10)).await;
    let (stuck, stuck_addr) = FakeLlm::start(Duration::from_secs(300)).await;
    let (c_home, h1, h2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ctl = controller(&ns, fast_addr, c_home.path());
    worker_home(&ns, stuck_addr, h1.path(), "");
    worker_home(&ns, fast_addr, h2.path(), "");
    let w1 = Worker::start(h1.path(), &["--queue", &ns.url, "--node-id", "w1"]);

    let prompt = "run me once";
    let id = submit(&ctl.url, json!({"prompt": prompt})).await;
    // Wait until w1's backend has the request: the task is running on w1.
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while stuck.calls(prompt) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    waited.await.expect("w1 never sent the task to its backend");
    tokio::task::spawn_blocking(move || w1.kill9()).await.unwrap();
    let killed = std::time::Instant::now();
    let w2 = Worker::start(h2.path(), &["--queue", &ns.url, "--node-id", "w2"]);
    let seen = task_events(&ctl.url, &id).await;
    // A figure, not a check (a loaded machine is only slower): the lease is 6 s.
    println!("completed on w2 {:.2} s after w1 was killed (lease 6 s)", killed.elapsed().as_secs_f64());
    assert_eq!(seen.last().unwrap()["event"], "task_completed", "{seen:?}");
    let task: Value = reqwest::get(format!("{}/task/{id}", ctl.url)).await.unwrap().json().await.unwrap();
    assert!(task["worker_id"].as_str().unwrap().starts_with("w2/"), "{task}");
    assert_eq!(task["result"]["output"], format!("echo: {prompt}"), "{task}");
    assert_eq!((task["attempts"].as_u64(), fast.calls(prompt), stuck.calls(prompt)), (Some(2), 1, 1), "{task}");
    drop(w2);
}
