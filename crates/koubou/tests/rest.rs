//! The REST API and CLI, against the real binary and a fake OpenAI-compatible LLM on loopback.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{FakeLlm, Serve, cli, home_with_fake};

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Waits for the task to reach `want`, with a bound generous enough for a loaded machine.
async fn wait_status(url: &str, id: &str, want: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = get(&format!("{url}/task/{id}/status")).await;
        if v["status"] == want {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "task {id} never became {want}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_routes_and_errors() {
    let (fake, addr) = FakeLlm::start(Duration::from_millis(50)).await;
    let home = tempfile::tempdir().unwrap();
    home_with_fake(home.path(), addr, "[types.translate]\nbackend = \"fake\"\nsystem_prompt = \"Translate.\"");
    let s = Serve::start(home.path(), &[]);
    let url = &s.url;

    // The seed's Python example.
    let (code, v) = post(
        &format!("{url}/task/delegate"),
        json!({"type": "code", "prompt": "Create a Python function for fibonacci", "priority": 8}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!((v["status"].as_str(), v["task_status"].as_str()), (Some("delegated"), Some("pending")));
    let id = v["task_id"].as_str().unwrap().to_owned();
    let done = wait_status(url, &id, "completed").await;
    assert_eq!(done["result"]["output"], "echo: Create a Python function for fibonacci");
    assert_eq!(done["task_id"], id.as_str());
    assert!(done["error"].is_null());
    assert_eq!(done["backend"], "fake");
    assert_eq!(done["usage"]["completion_tokens"], 7);
    assert_eq!(fake.calls("Create a Python function for fibonacci"), 1);
    // The alias route and the seed's cURL body with `content`.
    let (code, alias) = get(&format!("{url}/task/status/{id}")).await;
    assert_eq!((code, &alias["status"]), (200, &json!("completed")));
    let (code, v) = post(
        &format!("{url}/task/delegate"),
        json!({"type": "general", "content": "Explain Python decorators", "sync": true}),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(v["status"], "completed", "sync waits for the result: {v}");
    assert_eq!(v["task"]["result"]["output"], "echo: Explain Python decorators");
    // A custom type from config.
    let (code, _) =
        post(&format!("{url}/task/delegate"), json!({"type": "translate", "prompt": "hola", "sync": true})).await;
    assert_eq!(code, 200);

    // Precise 4xx naming the field.
    for (body, field) in [
        (json!({"type": "code"}), "prompt"),
        (json!({"prompt": "x", "priority": 11}), "priority"),
        (json!({"prompt": "x", "priority": "urgent"}), "priority"),
        (json!({"prompt": "x", "type": "poetry"}), "type"),
        (json!({"prompt": "x", "backend": "nope"}), "backend"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": "x", "priorty": 2}), "priorty"),
    ] {
        let (code, v) = post(&format!("{url}/task/delegate"), body.clone()).await;
        assert_eq!(code, 400, "{body} → {v}");
        assert_eq!(v["error"]["field"], field, "{body} → {v}");
        assert_eq!(v["error"]["code"], "invalid_request");
    }
    let r = reqwest::Client::new()
        .post(format!("{url}/task/delegate"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["field"], "body");
    let r = reqwest::Client::new()
        .post(format!("{url}/task/delegate"))
        .header("content-type", "text/plain")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let big = "x".repeat(1 << 20 | 1);
    let (code, v) = post(&format!("{url}/task/delegate"), json!({"prompt": big})).await;
    assert!(code == 400 || code == 413, "{code} {v}");
    let (code, v) = get(&format!("{url}/task/not-an-id/status")).await;
    assert_eq!((code, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (code, _) = get(&format!("{url}/task/0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60/status")).await;
    assert_eq!(code, 404);
    let (code, v) = get(&format!("{url}/tasks?limit=0")).await;
    assert_eq!((code, v["error"]["field"].as_str()), (400, Some("limit")));
    let (code, v) = get(&format!("{url}/tasks?status=done")).await;
    assert_eq!((code, v["error"]["field"].as_str()), (400, Some("status")));
    let (code, v) = get(&format!("{url}/nope")).await;
    assert_eq!((code, v["error"]["code"].as_str()), (404, Some("not_found")));

    // Cancel: a running task stops mid-generation; a finished one is a conflict.
    let (_, v) = post(&format!("{url}/task/delegate"), json!({"prompt": "slow one"})).await;
    let slow = v["task_id"].as_str().unwrap().to_owned();
    wait_status(url, &slow, "running").await;
    let (code, v) = post(&format!("{url}/task/{slow}/cancel"), json!({})).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("cancelled")));
    let (code, v) = post(&format!("{url}/task/{slow}/cancel"), json!({})).await;
    assert_eq!((code, v["error"]["code"].as_str()), (409, Some("conflict")));
    let (code, v) = post(&format!("{url}/task/{id}/cancel"), json!({})).await;
    assert_eq!(code, 409, "{v}");

    // Retries, then failed with the last error.
    let (_, v) = post(&format!("{url}/task/delegate"), json!({"prompt": "please fail", "max_attempts": 2})).await;
    let failing = v["task_id"].as_str().unwrap().to_owned();
    let failed = wait_status(url, &failing, "failed").await;
    assert_eq!(failed["attempts"], 2);
    assert!(failed["error"].as_str().unwrap().contains("500"), "{failed}");
    assert_eq!(fake.calls("please fail"), 2);

    // Listing, newest first, with filters and the prototype's routes.
    let (_, page) = get(&format!("{url}/tasks?limit=2")).await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
    assert!(page["next_cursor"].is_i64());
    let (_, page) = get(&format!("{url}/tasks?status=completed&type=code")).await;
    assert_eq!(page["total"], 1);
    let (_, legacy) = get(&format!("{url}/tasks/completed?limit=10")).await;
    assert_eq!(legacy.as_array().map(Vec::len), Some(3));
    let (_, legacy) = get(&format!("{url}/tasks/pending")).await;
    assert_eq!(legacy, json!([]));

    let (_, w) = get(&format!("{url}/workers/status")).await;
    assert!(w["active"].as_u64().unwrap() >= 2, "{w}");
    assert!(w["workers"][0]["tasks_done"].is_u64());
    let (code, h) = get(&format!("{url}/health")).await;
    assert_eq!(code, 200);
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(h["backends"][0]["up"], true);
    assert_eq!(h["routes"]["code"], "fake/fake");
    let metrics = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("koubou_queue_tasks{status=\"completed\"} 3"), "{metrics}");
    assert!(metrics.contains("koubou_tasks_total{outcome=\"cancelled\"} 1"));
    assert!(metrics.contains("koubou_task_latency_seconds_count 3"));
    assert!(metrics.contains("koubou_backend_up{backend=\"fake\"} 1"));

    // Browser requests from a foreign origin are refused — another local port is one too —;
    // the server's own origin and no Origin (curl, MCP clients) pass. (tests/guard.rs has more.)
    for (origin, want) in [("https://evil.example", 403), ("http://localhost:5173", 403), (url.as_str(), 200)] {
        let r = reqwest::Client::new().get(format!("{url}/health")).header("origin", origin).send().await.unwrap();
        assert_eq!(r.status().as_u16(), want, "{origin}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_submit_wait_status_and_exit_codes() {
    let (_fake, addr) = FakeLlm::start(Duration::from_millis(100)).await;
    let home = tempfile::tempdir().unwrap();
    home_with_fake(home.path(), addr, "");
    let s = Serve::start(home.path(), &[]);
    let h = home.path().to_owned();
    let url = s.url.clone();
    let run = move |args: Vec<&'static str>| {
        let (h, url) = (h.clone(), url.clone());
        tokio::task::spawn_blocking(move || cli(&h, &url, &args))
    };
    let (code, out, err) =
        run(vec!["submit", "--type", "code", "--priority", "8", "Create a Python function for fibonacci", "--wait"])
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "echo: Create a Python function for fibonacci");
    let (code, id, _) = run(vec!["submit", "hello there"]).await.unwrap();
    assert_eq!(code, 0);
    let id = id.trim().to_owned();
    wait_status(&s.url, &id, "completed").await;
    let (h2, url2, id2) = (home.path().to_owned(), s.url.clone(), id.clone());
    let (code, out, _) =
        tokio::task::spawn_blocking(move || cli(&h2, &url2, &["--json", "status", &id2])).await.unwrap();
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "completed");
    let (code, _, err) = run(vec!["submit", "--priority", "11", "x"]).await.unwrap();
    assert_eq!(code, 5, "invalid request exits 5: {err}");
    let (code, _, _) = run(vec!["status", "0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60"]).await.unwrap();
    assert_eq!(code, 3, "not found exits 3");
    let (code, _, _) = run(vec!["submit", "please fail", "--wait"]).await.unwrap();
    assert_eq!(code, 1, "a failed task exits 1");
    let (code, out, _) = run(vec!["tasks", "--limit", "50"]).await.unwrap();
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("completed"), "{out}");
    let (code, out, _) = run(vec!["health"]).await.unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("fake") && out.contains("up"), "{out}");
    let (code, out, _) = run(vec!["workers"]).await.unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("serve/1"), "{out}");
    drop(s);
    let (h3, url3) = (home.path().to_owned(), "http://127.0.0.1:9".to_owned());
    let (code, _, err) =
        tokio::task::spawn_blocking(move || cli(&h3, &url3, &["status", "0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60"]))
            .await
            .unwrap();
    assert_eq!(code, 4, "unreachable server exits 4: {err}");
}

#[test]
fn init_writes_a_documented_config_and_public_bind_needs_a_token() {
    let home = tempfile::tempdir().unwrap();
    let out =
        std::process::Command::new(support::bin()).args(["--home"]).arg(home.path()).arg("init").output().unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(home.path().join("koubou.toml")).unwrap();
    assert!(text.contains("max_workers = 8") && text.contains("port = 8765"));
    let out =
        std::process::Command::new(support::bin()).args(["--home"]).arg(home.path()).arg("init").output().unwrap();
    assert!(!out.status.success(), "init does not overwrite without --force");
    let out = std::process::Command::new(support::bin())
        .args(["--home"])
        .arg(home.path())
        .args(["serve", "--host", "0.0.0.0", "--port", "0"])
        .env_remove("KOUBOU_AUTH_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth token"));
}
