//! The contract the Python prototype's clients rely on (`docs/compat.md`), point by point,
//! against the real `koubou serve` and a fake OpenAI-compatible LLM on loopback.

mod support;

use std::{path::Path, time::Duration};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{FakeLlm, Serve, home_with_fake};
use tokio_tungstenite::tungstenite::Message;

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn post_raw(url: &str, content_type: Option<&str>, body: &str) -> (u16, Value) {
    let mut r = reqwest::Client::new().post(url).body(body.to_owned());
    if let Some(ct) = content_type {
        r = r.header("content-type", ct);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Polls a task's status (as the prototype's clients do) until it has finished.
async fn finished(url: &str, id: &str) -> Value {
    for _ in 0..600 {
        let (_, v) = get(&format!("{url}/task/status/{id}")).await;
        if ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap_or("")) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("task {id} did not finish");
}

async fn start(delay_ms: u64, extra: &str) -> (FakeLlm, tempfile::TempDir, Serve) {
    let (fake, addr) = FakeLlm::start(Duration::from_millis(delay_ms)).await;
    let home = tempfile::tempdir().unwrap();
    home_with_fake(home.path(), addr, extra);
    let s = Serve::start(home.path(), &[]);
    (fake, home, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_healthy_with_a_timestamp() {
    let (_f, _h, s) = start(10, "").await;
    let (code, h) = get(&format!("{}/health", s.url)).await;
    assert_eq!(code, 200);
    assert_eq!(h["status"], "healthy", "{h}");
    assert!(h["timestamp"].as_str().unwrap().ends_with('Z'), "{h}");
    assert_eq!(h["server"], "koubou");
    // Koubou's own fields stay.
    assert!(h["queue"]["pending"].is_u64() && h["backends"].is_array(), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegate_answers_200_delegated_and_sync_has_the_result_object() {
    let (_f, _h, s) = start(10, "").await;
    let url = &s.url;
    // Async, with the prototype's `content`.
    let (code, v) = post(
        &format!("{url}/task/delegate"),
        json!({"type": "general", "content": "Count", "priority": 5, "sync": false}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (v["status"].as_str(), v["task_status"].as_str(), v["created"].as_bool()),
        (Some("delegated"), Some("pending"), Some(true))
    );
    assert!(v.get("result").is_none(), "no result before it ran: {v}");
    let id = v["task_id"].as_str().unwrap().to_owned();
    // Sync: the prototype's `result` object and Koubou's `task`.
    let (code, v) = post(
        &format!("{url}/task/delegate"),
        json!({"type": "general", "prompt": "What is 2 + 2?", "sync": true, "priority": 8}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["result"], json!({"success": true, "output": "echo: What is 2 + 2?", "error": null}));
    assert_eq!(v["task"]["result"], v["result"]);
    assert_eq!(v["task"]["status"], "completed");
    // An idempotent repeat is 200 too; `created` tells it apart.
    let body = json!({"prompt": "once", "idempotency_key": "k1"});
    let (c1, a) = post(&format!("{url}/task/delegate"), body.clone()).await;
    let (c2, b) = post(&format!("{url}/task/delegate"), body).await;
    assert_eq!((c1, c2), (200, 200));
    assert_eq!((a["created"].as_bool(), b["created"].as_bool()), (Some(true), Some(false)));
    assert_eq!(a["task_id"], b["task_id"]);
    finished(url, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_routes_carry_the_result_object_for_success_and_failure() {
    let (_f, _h, s) = start(10, "").await;
    let url = &s.url;
    let (_, v) = post(&format!("{url}/task/delegate"), json!({"type": "code", "prompt": "fibonacci"})).await;
    let id = v["task_id"].as_str().unwrap().to_owned();
    let done = finished(url, &id).await;
    for route in [format!("/task/status/{id}"), format!("/task/{id}/status"), format!("/task/{id}")] {
        let (code, v) = get(&format!("{url}{route}")).await;
        assert_eq!(code, 200, "{route}");
        assert_eq!(v["task_id"], id.as_str());
        assert!(v["created_at"].is_string());
        assert_eq!(v["result"], json!({"success": true, "output": "echo: fibonacci", "error": null}), "{route}: {v}");
    }
    assert_eq!(done["status"], "completed");
    // While queued the result is null, as in the prototype.
    let (_, v) = post(&format!("{url}/task/delegate"), json!({"prompt": "slow one"})).await;
    let slow = v["task_id"].as_str().unwrap().to_owned();
    let (_, v) = get(&format!("{url}/task/status/{slow}")).await;
    assert!(v["result"].is_null(), "{v}");
    post(&format!("{url}/task/{slow}/cancel"), json!({})).await;
    // A failure: success false, the error, and the top-level error too.
    let (_, v) = post(&format!("{url}/task/delegate"), json!({"prompt": "please fail", "max_attempts": 1})).await;
    let failed = finished(url, v["task_id"].as_str().unwrap()).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["result"]["success"], false, "{failed}");
    assert!(failed["result"]["error"].as_str().unwrap().contains("500"), "{failed}");
    assert_eq!(failed["result"]["error"], failed["error"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_cases_the_abnormal_scenarios_send() {
    let (fake, _h, s) = start(10, "").await;
    let url = &s.url;
    let delegate = format!("{url}/task/delegate");
    // Malformed JSON with a JSON content type.
    let (code, v) = post_raw(&delegate, Some("application/json"), "invalid json").await;
    assert_eq!((code, v["error"]["field"].as_str()), (400, Some("body")), "{v}");
    // No Content-Type at all: read as JSON (the prototype parsed it regardless), so the missing
    // prompt is what is wrong.
    let (code, v) = post_raw(&delegate, None, r#"{"type": "general"}"#).await;
    assert_eq!((code, v["error"]["field"].as_str()), (400, Some("prompt")), "{v}");
    // A declared non-JSON type is refused.
    let (code, _) = post_raw(&delegate, Some("text/plain"), r#"{"prompt": "x"}"#).await;
    assert_eq!(code, 415);
    // Empty type, empty content, priority -1: a 400 naming a field.
    let (code, v) = post(&delegate, json!({"type": "", "content": "", "priority": -1})).await;
    assert_eq!(code, 400, "{v}");
    assert!(v["error"]["field"].is_string(), "{v}");
    for (body, field) in [
        (json!({}), "prompt"),
        (json!({"type": "general"}), "prompt"),
        (json!({"type": "invalid_type", "content": "test"}), "type"),
        (json!({"type": "general", "content": "test", "priority": 100}), "priority"),
        (json!({"type": "general", "content": "test", "priority": -1}), "priority"),
    ] {
        let (code, v) = post(&delegate, body.clone()).await;
        assert_eq!((code, v["error"]["field"].as_str()), (400, Some(field)), "{body} → {v}");
    }
    // 100 KB is accepted (200); past the limit it is refused, not truncated.
    let (code, v) = post(&delegate, json!({"type": "general", "content": "x".repeat(100_000), "priority": 5})).await;
    assert_eq!(code, 200, "{v}");
    let (code, _) = post(&delegate, json!({"content": "x".repeat((1 << 20) + 1)})).await;
    assert!(code == 413 || code == 400, "{code}");
    // Unknown ids: 404, spelled like an id or not.
    for id in ["nonexistent", "0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60"] {
        assert_eq!(get(&format!("{url}/task/{id}/status")).await.0, 404);
        assert_eq!(get(&format!("{url}/task/status/{id}")).await.0, 404);
    }
    // No such route (the security scenario's /admin/shutdown).
    let (code, v) = post(&format!("{url}/admin/shutdown"), json!({})).await;
    assert_eq!((code, v["error"]["code"].as_str()), (404, Some("not_found")));
    // Ten at once from five threads: every one accepted, each its own task, each run once.
    let futs = (0..10).map(|i| {
        let d = delegate.clone();
        tokio::spawn(async move {
            post(&d, json!({"type": "general", "content": format!("Concurrent test task {i}"), "priority": 5})).await
        })
    });
    let mut ids = std::collections::HashSet::new();
    for r in futures::future::join_all(futs).await {
        let (code, v) = r.unwrap();
        assert_eq!(code, 200, "{v}");
        ids.insert(v["task_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 10);
    for id in &ids {
        assert_eq!(finished(url, id).await["status"], "completed");
    }
    for i in 0..10 {
        assert_eq!(fake.calls(&format!("Concurrent test task {i}")), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_workers_and_system_info_in_the_prototype_shapes() {
    let (_f, home, s) = start(10, "").await;
    let url = &s.url;
    let (_, v) = post(&format!("{url}/task/delegate"), json!({"prompt": "listed", "sync": true})).await;
    let id = v["task_id"].as_str().unwrap().to_owned();
    // The prototype's routes answer bare lists.
    let (code, l) = get(&format!("{url}/tasks/completed?limit=10")).await;
    assert_eq!(code, 200);
    let l = l.as_array().unwrap_or_else(|| panic!("not a list: {l}"));
    assert!(l.iter().any(|t| t["task_id"] == id.as_str() && t["status"] == "completed"));
    for route in ["/tasks/pending", "/tasks/active"] {
        let (code, l) = get(&format!("{url}{route}")).await;
        assert_eq!((code, l.is_array()), (200, true), "{route}: {l}");
    }
    // `/tasks` keeps Koubou's page, which has the prototype's `tasks` list.
    let (_, p) = get(&format!("{url}/tasks")).await;
    assert_eq!(p["tasks"][0]["task_id"], id.as_str());
    assert!(p["total"].is_u64());
    // Workers: a list under `workers`, each with the prototype's `status`.
    let (_, w) = get(&format!("{url}/workers/status")).await;
    let w0 = &w["workers"][0];
    assert_eq!(w0["status"], w0["state"], "{w}");
    assert!(["idle", "busy"].contains(&w0["status"].as_str().unwrap()), "{w}");
    assert!(w0["worker_id"].is_string() && w0["last_heartbeat"].as_str().unwrap().ends_with('Z'), "{w}");
    // System info: where the files are.
    let (code, i) = get(&format!("{url}/system/info")).await;
    assert_eq!(code, 200);
    assert_eq!(i["koubou_home"], home.path().to_str().unwrap(), "{i}");
    assert_eq!(i["db_path"], home.path().join("db/koubou.db").to_str().unwrap(), "{i}");
    assert!(i["server_type"].is_string() && i["timestamp"].is_string(), "{i}");
    assert!(i["dispatcher"].is_null(), "no RabbitMQ here: {i}");
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(s: &Serve) -> Ws {
    let url = s.url.replace("http://", "ws://") + "/ws";
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Reads until a message matches, returning it and those before it; panics after `secs`.
async fn ws_until(ws: &mut Ws, secs: u64, pred: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut seen = vec![];
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("gave up; saw {seen:#?}"))
            .expect("connection ended")
            .expect("websocket error");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if pred(&v) {
                return (v, seen);
            }
            seen.push(v);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_speaks_the_prototypes_commands_and_messages() {
    let (_f, _h, s) = start(10, "").await;
    let mut ws = ws_connect(&s).await;
    // On connect: Koubou's welcome, then the prototype's initial state.
    let (init, _) = ws_until(&mut ws, 10, |v| v["type"] == "initial_state").await;
    assert!(init["data"]["tasks"]["pending"].is_u64(), "{init}");
    assert!(init["data"]["workers"]["total_workers"].as_u64().unwrap() >= 1, "{init}");
    assert!(init["data"]["active_workers"].is_array() && init["data"]["active_tasks"].is_array(), "{init}");
    assert!(init["timestamp"].is_string());
    // test_websocket.py's messages, verbatim.
    for channel in ["task", "worker", "system"] {
        ws_send(&mut ws, json!({"command": "subscribe", "channel": channel})).await;
        let (m, _) = ws_until(&mut ws, 10, |v| v["type"] == "subscribed").await;
        assert_eq!(m["channel"], channel, "{m}");
        assert!(m["timestamp"].is_string());
    }
    ws_send(&mut ws, json!({"command": "get_stats"})).await;
    let (st, _) = ws_until(&mut ws, 10, |v| v["type"] == "stats").await;
    assert!(st["data"]["tasks"]["completed"].is_u64() && st["data"]["workers"]["busy_workers"].is_u64(), "{st}");
    ws_send(&mut ws, json!({"command": "ping"})).await;
    let (p, _) = ws_until(&mut ws, 10, |v| v["type"] == "pong").await;
    assert!(p["timestamp"].is_string());
    // A task submitted over REST: task_update for each change, the last with the answer;
    // worker_update as a worker takes it.
    let (_, v) = post(&format!("{}/task/delegate", s.url), json!({"prompt": "watched"})).await;
    let id = v["task_id"].as_str().unwrap().to_owned();
    let (done, seen) = ws_until(&mut ws, 30, |v| {
        v["type"] == "task_update" && v["task_id"] == id.as_str() && v["status"] == "completed"
    })
    .await;
    assert_eq!(done["details"]["result"], "echo: watched", "{done}");
    assert!(seen.iter().any(|v| v["type"] == "task_update" && v["status"] == "pending"), "{seen:#?}");
    assert!(seen.iter().any(|v| v["type"] == "task_update" && v["status"] == "running"), "{seen:#?}");
    assert!(seen.iter().any(|v| v["type"] == "worker_update" && v["status"] == "busy" && v["worker_id"].is_string()));
    assert!(seen.iter().all(|v| v["type"] != "task_token"), "no tokens on the task channel");
    // periodic_stats reaches every client (the `stats` topic is on by default).
    let (ps, _) = ws_until(&mut ws, 20, |v| v["type"] == "periodic_stats").await;
    assert!(ps["data"]["tasks"]["completed"].as_u64().unwrap() >= 1, "{ps}");
    assert!(ps["data"]["workers"]["total_workers"].is_u64(), "{ps}");
    assert!(ps["data"]["active_connections"].as_u64().unwrap() >= 1, "{ps}");
    // An unknown command is an error naming the field, and the connection stays.
    ws_send(&mut ws, json!({"command": "launch"})).await;
    let (e, _) = ws_until(&mut ws, 10, |v| v["type"] == "error").await;
    assert_eq!(e["error"]["field"], "type");
    ws_send(&mut ws, json!({"command": "subscribe", "channel": "weather"})).await;
    let (e, _) = ws_until(&mut ws, 10, |v| v["type"] == "error").await;
    assert_eq!(e["error"]["field"], "topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_subscribers_get_the_answer_and_the_error_from_the_final_event() {
    let (_f, _h, s) = start(10, "").await;
    let url = &s.url;
    // The fake takes 30 s over a prompt with "slow": time to join after the first tokens.
    let prompt = "slow one two three four five six";
    let (_, v) = post(&format!("{url}/task/delegate"), json!({"prompt": prompt})).await;
    let id = v["task_id"].as_str().unwrap().to_owned();
    for _ in 0..1200 {
        let (_, t) = get(&format!("{url}/task/{id}/status")).await;
        if t["partial"].as_str().is_some_and(|p| !p.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Subscribe while it runs, keeping no tokens: the final event has the whole answer.
    let mut ws = ws_connect(&s).await;
    ws_send(&mut ws, json!({"type": "subscribe", "task_id": id})).await;
    let (snap, _) = ws_until(&mut ws, 10, |v| v["type"] == "subscribed").await;
    assert_eq!(snap["task"]["status"], "running", "joined late, not after the end: {snap}");
    let (done, _) = ws_until(&mut ws, 90, |v| v["type"] == "task_completed").await;
    assert_eq!(done["result"], format!("echo: {prompt}"), "{done}");
    // After the end: the snapshot has the result object, and SSE the final event with it.
    ws_send(&mut ws, json!({"type": "subscribe", "task_id": id})).await;
    let (snap, _) = ws_until(&mut ws, 10, |v| v["type"] == "subscribed").await;
    assert_eq!(snap["task"]["result"]["output"], done["result"]);
    let sse = reqwest::get(format!("{url}/task/{id}/events")).await.unwrap().text().await.unwrap();
    assert!(sse.contains("event: task_completed") && sse.contains(&format!("\"result\":\"echo: {prompt}\"")), "{sse}");
    // A failure: task_failed carries the error, for a late watcher too.
    let (_, v) = post(&format!("{url}/task/delegate"), json!({"prompt": "fail fast", "max_attempts": 1})).await;
    let bad = v["task_id"].as_str().unwrap().to_owned();
    finished(url, &bad).await;
    let sse = reqwest::get(format!("{url}/task/{bad}/events")).await.unwrap().text().await.unwrap();
    assert!(sse.contains("event: task_failed") && sse.contains("500"), "{sse}");
    ws_send(&mut ws, json!({"type": "subscribe", "task_id": bad})).await;
    let (snap, _) = ws_until(&mut ws, 10, |v| v["type"] == "subscribed").await;
    assert_eq!(snap["task"]["result"]["success"], false);
    assert!(snap["task"]["result"]["error"].as_str().unwrap().contains("500"), "{snap}");
}

/// A free loopback port for a face `koubou serve` binds only when given one.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn gql(url: &str, query: &str, vars: Value) -> Value {
    let r = reqwest::Client::new().post(url).json(&json!({"query": query, "variables": vars})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v.get("errors").is_none(), "{query}: {v}");
    v["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_answers_the_prototypes_queries_and_mutation() {
    let (fake, addr) = FakeLlm::start(Duration::from_millis(10)).await;
    let home = tempfile::tempdir().unwrap();
    home_with_fake(home.path(), addr, "");
    let port = free_port();
    let s = Serve::start(home.path(), &["--graphql-port", &port.to_string()]);
    let g = format!("http://127.0.0.1:{port}/graphql");
    // test_graphql.py checks the server with a bare GET.
    assert_eq!(reqwest::get(&g).await.unwrap().status(), 200);
    // Its queries, verbatim.
    let d = gql(&g, "query GetSystemStatus { systemStatus { status timestamp version taskStats { pending inProgress completed failed total } workerStats { totalWorkers busyWorkers idleWorkers totalCompleted totalFailed successRate } } }", json!({})).await;
    assert_eq!(d["systemStatus"]["status"], "healthy");
    assert!(d["systemStatus"]["workerStats"]["totalWorkers"].as_i64().unwrap() >= 1, "{d}");
    let d = gql(&g, "mutation SubmitTask($input: TaskInput!) { submitTask(input: $input) { success taskId message task { id status priority createdAt } } }",
        json!({"input": {"type": "GENERAL", "prompt": "Test task from GraphQL", "priority": 7}})).await;
    let sub = &d["submitTask"];
    assert_eq!(sub["success"], true);
    assert_eq!(sub["task"]["priority"], 7);
    assert_eq!(sub["task"]["id"], sub["taskId"]);
    let id = sub["taskId"].as_str().unwrap().to_owned();
    let done = finished(&s.url, &id).await;
    assert_eq!(done["type"], "general", "GENERAL read as general");
    assert_eq!(fake.calls("Test task from GraphQL"), 1);
    let d = gql(&g, "query GetTasks($filter: TaskFilter, $limit: Int) { tasks(filter: $filter, limit: $limit) { id status priority createdBy createdAt } }", json!({})).await;
    let tasks = d["tasks"].as_array().unwrap();
    assert_eq!(tasks[0]["id"], id.as_str());
    assert_eq!(tasks[0]["createdBy"], "graphql");
    let d =
        gql(&g, "query($f: TaskFilter) { tasks(filter: $f, limit: 5) { id } }", json!({"f": {"status": "COMPLETED"}}))
            .await;
    assert_eq!(d["tasks"].as_array().unwrap().len(), 1);
    let d = gql(
        &g,
        "query GetWorkers { workers { id status currentTask tasksCompleted tasksFailed lastHeartbeat } }",
        json!({}),
    )
    .await;
    let w = &d["workers"][0];
    assert!(w["id"].is_string() && ["IDLE", "BUSY"].contains(&w["status"].as_str().unwrap()), "{d}");
    let d = gql(&g, "query GetStatistics { taskStatistics { pending inProgress completed failed total } workerStatistics { totalWorkers busyWorkers successRate } }", json!({})).await;
    assert_eq!(d["taskStatistics"]["completed"], 1);
    assert_eq!(d["taskStatistics"]["total"], 1);
    let d = gql(&g, "query ComplexQuery { pendingTasks(limit: 3) { id priority content } activeWorkers { id status currentTask } health }", json!({})).await;
    assert_eq!(d["health"], "healthy");
    assert!(d["pendingTasks"].is_array() && d["activeWorkers"].is_array());
    // Koubou's own forms: the seed's mutation, the paged list, the pool and the health report.
    let d = gql(
        &g,
        r#"mutation { submitTask(type: "code", prompt: "Create a REST API", priority: 9) { taskId status } }"#,
        json!({}),
    )
    .await;
    assert_eq!(d["submitTask"]["status"], "PENDING");
    let d = gql(&g, "{ taskPage(limit: 1) { total nextCursor tasks { id } } pool { maxWorkers } healthReport { backends { name } } }", json!({})).await;
    assert_eq!(d["taskPage"]["total"], 2);
    // Both forms at once is an error naming `input`.
    let r: Value = reqwest::Client::new()
        .post(&g)
        .json(&json!({"query": r#"mutation { submitTask(input: {prompt: "a"}, prompt: "b") { taskId } }"#}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["errors"][0]["extensions"]["field"], "input", "{r}");
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Waits for a log file to contain `needle` (the writer flushes after each burst of lines).
async fn log_has(dir: &Path, name: &str, needle: &str) -> String {
    for _ in 0..200 {
        let text = read(dir, name);
        if text.contains(needle) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} never had {needle:?}:\n{}", read(dir, name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_where_the_guide_says_human_readable_with_debug_on_demand() {
    for debug in [false, true] {
        let (fake, addr) = FakeLlm::start(Duration::from_millis(10)).await;
        let home = tempfile::tempdir().unwrap();
        home_with_fake(home.path(), addr, "");
        let level = if debug { "DEBUG" } else { "info" };
        let s = Serve::start_with_env(home.path(), &[], &[("LOG_LEVEL", level)]);
        let (_, v) = post(&format!("{}/task/delegate", s.url), json!({"prompt": "logged", "sync": true})).await;
        assert_eq!(v["status"], "completed");
        let worker = v["task"]["worker_id"].as_str().unwrap().replace('/', "-");
        let logs = home.path().join("logs");
        let server = log_has(&logs, "mcp_server.log", "task accepted").await;
        let pool = log_has(&logs, "worker_pool.log", "pool scaled up").await;
        let wname = format!("workers/worker_{worker}.log");
        let w = log_has(&logs, &wname, "task completed").await;
        for (name, text) in [("mcp_server.log", &server), ("worker_pool.log", &pool), (wname.as_str(), &w)] {
            // Human-readable: a timestamp and a level, not JSON.
            let first = text.lines().next().unwrap();
            // (WARN: serve says so first when the home, here a temp dir, is open to other users.)
            let level = [" INFO ", " DEBUG ", " WARN "].iter().any(|l| first.contains(l));
            assert!(!first.starts_with('{') && first.contains("Z ") && level, "{name}: {first}");
        }
        assert!(
            w.contains("task claimed") && w.contains(&format!("worker={}", v["task"]["worker_id"].as_str().unwrap())),
            "{w}"
        );
        assert!(!server.contains("task completed") && !server.contains("pool scaled"), "{server}");
        assert!(!pool.contains("task accepted"), "{pool}");
        // The JSON log is still there.
        let json_log = log_has(&logs, "koubou.log", "task accepted").await;
        assert!(json_log.lines().next().unwrap().starts_with('{'));
        if debug {
            log_has(&logs, &wname, "DEBUG").await;
            log_has(&logs, "mcp_server.log", "DEBUG").await;
        } else {
            assert!(!w.contains("DEBUG") && !server.contains("DEBUG"), "{w}\n{server}");
        }
        // Few descriptors on worker logs, however many workers came and went.
        let fds = std::fs::read_dir(format!("/proc/{}/fd", s.child.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|p| p.starts_with(logs.join("workers")))
            .count();
        assert!(fds <= 16, "{fds} worker log files open");
        assert_eq!(fake.calls("logged"), 1);
    }
}
