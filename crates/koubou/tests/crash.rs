//! kill -9 while tasks run, restart on the same database: every accepted task completes, once.

mod support;

use std::{collections::HashSet, time::Duration};

use futures::StreamExt;
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tokio::time::Instant::now() < deadline {
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while tokio::time::Instant::now() < deadline {
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

/// 1,000 tasks submitted by 32 clients at once (every fifth one waiting for its answer on the
/// open request), and the server killed with SIGKILL three times in a row while they run; each
/// client retries with its idempotency key until answered. At the end every task exists exactly
/// once and completed with its own answer: no acknowledged task was lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sigkill_under_load_with_waiters_loses_and_duplicates_nothing() {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    };
    const N: usize = 1000;
    const KILLS: usize = 3;
    let (fake, addr) = FakeLlm::start(Duration::from_millis(40)).await;
    let home = tempfile::tempdir().unwrap();
    home_with_fake(home.path(), addr, "");
    let mut s = Serve::start(home.path(), &[]);
    let url = Arc::new(Mutex::new(s.url.clone()));
    let acked = Arc::new(AtomicUsize::new(0));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let (url2, acked2, http2) = (url.clone(), acked.clone(), http.clone());
    let submitters = futures::stream::iter(0..N)
        .map(move |i| {
            let (url, acked, http) = (url2.clone(), acked2.clone(), http2.clone());
            async move {
                let body = json!({"prompt": format!("job {i}"), "idempotency_key": format!("k{i}"), "sync": i % 5 == 0,
                                  "wait_secs": 30});
                loop {
                    let u = url.lock().unwrap().clone();
                    match http.post(format!("{u}/task/delegate")).json(&body).send().await {
                        Ok(r) if r.status().is_success() => {
                            if let Ok(v) = r.json::<Value>().await
                                && let Some(id) = v["task_id"].as_str()
                            {
                                acked.fetch_add(1, Ordering::Relaxed);
                                return (i, id.to_owned());
                            }
                        }
                        Ok(r) => panic!("job {i}: {} {}", r.status(), r.text().await.unwrap_or_default()),
                        Err(_) => {} // the server was killed under us: retry with the same key
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<(usize, String)>>();
    let submitters = tokio::spawn(submitters);
    for k in 0..KILLS {
        // Kill once some more work has been done since the last start.
        let target = (k + 1) * 150;
        let mut done = 0;
        for _ in 0..1200 {
            let h: Value = match http.get(format!("{}/health", s.url)).send().await {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            done = h["queue"]["completed"].as_u64().unwrap_or(0) as usize;
            if done >= target && h["queue"]["running"].as_u64().unwrap_or(0) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(done >= target, "kill {k}: only {done} tasks completed");
        s.kill9();
        s = Serve::start(home.path(), &[]);
        *url.lock().unwrap() = s.url.clone();
    }
    let ids = tokio::time::timeout(Duration::from_secs(300), submitters).await.expect("clients stuck").unwrap();
    assert_eq!(ids.len(), N);
    let mut all_done = false;
    for _ in 0..3000 {
        let h: Value = http.get(format!("{}/health", s.url)).send().await.unwrap().json().await.unwrap();
        if h["queue"]["completed"] == N {
            all_done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(all_done, "not every acknowledged task completed after {KILLS} kills");
    let page: Value = http.get(format!("{}/tasks?limit=1000", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["total"], N, "a task was duplicated");
    let mut seen = HashSet::new();
    for (i, id) in &ids {
        let v: Value = http.get(format!("{}/task/{id}/status", s.url)).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["status"], "completed");
        assert_eq!(v["result"]["output"], format!("echo: job {i}"));
        assert!(seen.insert(id.clone()), "two submissions got one id");
        let calls = fake.calls(&format!("job {i}"));
        assert!((1..=KILLS + 1).contains(&calls), "job {i} ran {calls} times");
    }
}
