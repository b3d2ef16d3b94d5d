//! The pool as the real binary reports it, and task event streams that leave nothing behind.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{FakeLlm, Serve, cli, home_with_fake};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn says_when_max_workers_is_more_than_the_backends_serve() {
    let (_fake, addr) = FakeLlm::start(Duration::from_millis(10)).await;
    let home = tempfile::tempdir().unwrap();
    home_with_fake(home.path(), addr, ""); // one backend, `fake`, of concurrency 4
    let s = Serve::start(home.path(), &["--max-workers", "8"]);
    let w: Value = reqwest::get(format!("{}/workers/status", s.url)).await.unwrap().json().await.unwrap();
    assert_eq!((w["max_workers"].as_u64(), w["configured_max_workers"].as_u64()), (Some(4), Some(8)), "{w}");
    assert_eq!(w["backend_capacity"], 4);
    let warning = w["warnings"][0].as_str().unwrap_or_else(|| panic!("no warning: {w}"));
    assert!(warning.contains("max_workers = 8") && warning.contains("fake 4"), "{warning}");
    // At start, in the server's log.
    let log = std::fs::read_to_string(&s.stderr_log).unwrap();
    assert!(log.contains("max_workers = 8 is more than the backends serve at once"), "{log}");
    // And in `koubou workers`.
    let (h, url) = (home.path().to_owned(), s.url.clone());
    let (code, out, err) = tokio::task::spawn_blocking(move || cli(&h, &url, &["workers"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("note: max_workers = 8"), "{out}");
    // Within the capacity, nothing to say.
    let home2 = tempfile::tempdir().unwrap();
    home_with_fake(home2.path(), addr, "");
    let s2 = Serve::start(home2.path(), &["--max-workers", "3"]);
    let w: Value = reqwest::get(format!("{}/workers/status", s2.url)).await.unwrap().json().await.unwrap();
    assert_eq!(w["warnings"], json!([]), "{w}");
    assert_eq!(w["max_workers"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_of_finished_and_unknown_tasks_leave_no_watcher() {
    let (_fake, addr) = FakeLlm::start(Duration::from_millis(10)).await;
    let home = tempfile::tempdir().unwrap();
    home_with_fake(home.path(), addr, "");
    let s = Serve::start(home.path(), &[]);
    let http = reqwest::Client::new();
    let watchers = async || {
        let m = http.get(format!("{}/metrics", s.url)).send().await.unwrap().text().await.unwrap();
        m.lines().find_map(|l| l.strip_prefix("koubou_task_watchers ")).map(|n| n.parse::<u64>().unwrap())
    };
    let done: Value = http
        .post(format!("{}/task/delegate", s.url))
        .json(&json!({"prompt": "hello", "sync": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    let id = done["task_id"].as_str().unwrap();
    for _ in 0..3 {
        let body = http.get(format!("{}/task/{id}/events", s.url)).send().await.unwrap().text().await.unwrap();
        assert!(body.contains("task_completed"), "{body}");
        let r = http.get(format!("{}/task/0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60/events", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
    assert_eq!(watchers().await, Some(0), "watches of finished and unknown tasks stayed registered");
}
