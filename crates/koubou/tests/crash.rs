//! kill -9 while tasks run, restart on the same database: every accepted task completes, once.

mod support;

use std::{collections::HashSet, time::Duration};

use serde_json::{Value, json};
use support::{FakeLlm, Serve, home_with_fake};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_accepted_task() {
    let (fake, addr) = FakeLlm::start(Duration::from_millis(300)).await;
    let home = tempfile::tempdir().unwrap();
    home_with_fake(home.path(), addr, "");
    let s = Serve::start(home.path(), &[]);
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..40 {
        let v: Value = http
            .post(format!("{}/task/delegate", s.url))
            .json(&json!({"prompt": format!("job {i}"), "priority": (i % 10) + 1}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(v["task_id"].as_str().unwrap().to_owned());
    }
    // Let some finish and some be mid-generation, then kill without warning.
    let mut running = 0;
    for _ in 0..100 {
        let h: Value = http.get(format!("{}/health", s.url)).send().await.unwrap().json().await.unwrap();
        running = h["queue"]["running"].as_u64().unwrap();
        if h["queue"]["completed"].as_u64().unwrap() >= 3 && running > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(running > 0, "some tasks should be running at the kill");
    let done_before: HashSet<String> = {
        let v: Value =
            http.get(format!("{}/tasks?status=completed&limit=100", s.url)).send().await.unwrap().json().await.unwrap();
        v["tasks"].as_array().unwrap().iter().map(|t| t["prompt"].as_str().unwrap().to_owned()).collect()
    };
    s.kill9();

    let s = Serve::start(home.path(), &[]);
    let mut all_done = false;
    for _ in 0..600 {
        let h: Value = http.get(format!("{}/health", s.url)).send().await.unwrap().json().await.unwrap();
        if h["queue"]["completed"] == 40 {
            all_done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(all_done, "not every accepted task completed after the restart");
    for (i, id) in ids.iter().enumerate() {
        let v: Value = http.get(format!("{}/task/{id}/status", s.url)).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["status"], "completed");
        assert_eq!(v["result"]["output"], format!("echo: job {i}"));
    }
    // Tasks finished before the kill were not run again; the rest ran at least once, and the
    // ones cut off by the kill ran at most twice.
    for i in 0..40 {
        let p = format!("job {i}");
        let n = fake.calls(&p);
        if done_before.contains(&p) {
            assert_eq!(n, 1, "{p} completed before the kill but ran {n} times");
        } else {
            assert!((1..=2).contains(&n), "{p} ran {n} times");
        }
    }
    let page: Value = http.get(format!("{}/tasks?limit=1000", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["total"], 40, "no task duplicated");
}
