//! A client of a controller follows a task that runs on a worker node, over every face that
//! streams: the WebSocket, a GraphQL subscription and MCP progress notifications (REST SSE is in
//! `distributed.rs`). Real processes on the machine's Redis: `koubou serve --workers 0` (the
//! controller, every port on) and `koubou worker` (the node that runs the tasks). And every face
//! that lists nodes shows the worker node: its backends and models, its load, its last
//! heartbeat, and whether it is alive or lost. And the controller's dashboard, in a real headless
//! Chromium, shows a worker node's task as it streams (needs `scripts/ensure-chromium.sh` and
//! `scripts/ensure-node-tools.sh`, unless `KOUBOU_SKIP_REAL_PEERS=1`).

mod support;

#[path = "../../../tests/browser/peers.rs"]
mod peers;

use std::{path::Path, time::Duration};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{FakeLlm, RedisNamespace, Serve, Worker, home_with_fake};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A home on namespace `ns` whose backend is the fake at `fake`, registering with a TTL of
/// `ttl_secs` (so renewing every third of it).
fn home(ns: &RedisNamespace, fake: std::net::SocketAddr, dir: &Path, ttl_secs: u64) {
    home_with_fake(dir, fake, &ns.toml());
    let path = dir.join("koubou.toml");
    let cfg = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, cfg.replacen("[pool]\n", &format!("[pool]\nnode_ttl_secs = {ttl_secs}\n"), 1)).unwrap();
}

/// The controller: no workers of its own, every port on.
fn controller(ns: &RedisNamespace, fake: std::net::SocketAddr, dir: &Path) -> Serve {
    home(ns, fake, dir, 60);
    Serve::start_all(dir, &["--queue", &ns.url, "--workers", "0", "--node-id", "ctl"])
}

/// Starts worker node `w1` (blocking until it runs, off the test's threads).
async fn worker(ns: &RedisNamespace, dir: &Path) -> Worker {
    let (dir, url) = (dir.to_owned(), ns.url.clone());
    tokio::task::spawn_blocking(move || {
        Worker::start(&dir, &["--queue", &url, "--node-id", "w1", "--capabilities", "general"])
    })
    .await
    .unwrap()
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next JSON text message, within 30 s.
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("nothing within 30 s")
            .expect("the connection closed")
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// Messages until `done` says the last one ends it.
async fn until(ws: &mut Ws, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let m = next_json(ws).await;
        let end = done(&m);
        seen.push(m);
        if end {
            return seen;
        }
    }
}

/// The text of the tokens in `events` (each checked to name `w1` as its origin when `origin`
/// says where to find it).
fn tokens(events: &[Value], origin: Option<&str>) -> String {
    events
        .iter()
        .filter(|e| e["event"] == "task_token")
        .inspect(|e| {
            if let Some(field) = origin {
                assert_eq!(e[field], "w1", "a token not named after the node that produced it: {e}");
            }
        })
        .map(|e| e["text"].as_str().unwrap())
        .collect()
}

/// MCP over the controller's `/mcp`: `delegate_task` waiting for the answer, with a progress
/// token. Returns the progress notifications' messages and the call's result.
async fn mcp_delegate(url: String, prompt: &str) -> (Vec<String>, Value) {
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "delegate_task",
        "arguments": {"prompt": prompt, "wait_seconds": 25},
        "_meta": {"progressToken": "cross-node"},
    }});
    let body = reqwest::Client::new()
        .post(format!("{url}/mcp"))
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18")
        .json(&call)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let messages: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str(d.trim()).ok())
        .collect();
    let progress = messages
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .inspect(|m| assert_eq!(m["params"]["progressToken"], "cross-node", "{m}"))
        .map(|m| m["params"]["message"].as_str().unwrap_or_default().to_owned())
        .collect();
    let result = messages.iter().find(|m| m["id"] == 7).cloned().unwrap_or_else(|| panic!("no result: {body}"));
    (progress, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_streams_a_worker_nodes_tokens_over_websocket_graphql_and_mcp() {
    let ns = RedisNamespace::new();
    let (_fake, addr) = FakeLlm::start(Duration::from_millis(2500)).await;
    let (c_home, w_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ctl = controller(&ns, addr, c_home.path());
    home(&ns, addr, w_home.path(), 30);

    // Every client is following its task before any node runs it (the controller runs none).
    // WebSocket: submitted over it, which subscribes the connection to the task.
    let (mut ws, _) = tokio_tungstenite::connect_async(ctl.ws_url.clone().unwrap()).await.unwrap();
    let ws_prompt = "tokens over the websocket from a worker node";
    send(&mut ws, json!({"type": "submit_task", "ref": 1, "payload": {"prompt": ws_prompt}})).await;
    let submitted = until(&mut ws, |m| m["type"] == "task_submitted").await.pop().unwrap();
    let ws_task = submitted["task_id"].as_str().unwrap().to_owned();

    // GraphQL: submitted with a mutation, followed with a subscription over graphql-transport-ws.
    let gql_url = ctl.graphql_url.clone().unwrap();
    let gql_prompt = "tokens over graphql from a worker node";
    let r: Value = reqwest::Client::new()
        .post(&gql_url)
        .json(&json!({"query": "mutation($p: String!) { submitTask(prompt: $p) { taskId } }", "variables": {"p": gql_prompt}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let gql_task = r["data"]["submitTask"]["taskId"].as_str().unwrap_or_else(|| panic!("{r}")).to_owned();
    let mut req = gql_url.replacen("http://", "ws://", 1).into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", "graphql-transport-ws".parse().unwrap());
    let (mut gql, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    send(&mut gql, json!({"type": "connection_init"})).await;
    assert_eq!(next_json(&mut gql).await["type"], "connection_ack");
    send(
        &mut gql,
        json!({"type": "subscribe", "id": "t", "payload": {
        "query": "subscription($id: ID!) { taskUpdates(id: $id) { event origin taskId text result } }",
        "variables": {"id": gql_task}}}),
    )
    .await;
    // Answered after the subscription above was taken in.
    send(&mut gql, json!({"type": "ping"})).await;
    until(&mut gql, |m| m["type"] == "pong").await;

    // MCP: delegate_task waiting for the answer, reporting progress as it streams.
    let mcp_prompt = "tokens over mcp from a worker node";
    let mcp = tokio::spawn(mcp_delegate(ctl.url.clone(), mcp_prompt));
    let waiting = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let v: Value =
                reqwest::get(format!("{}/tasks?status=pending", ctl.url)).await.unwrap().json().await.unwrap();
            if v["total"] == 3 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    if waiting.await.is_err() {
        panic!("three tasks were not waiting: {}", body(&format!("{}/tasks?status=pending", ctl.url)).await);
    }

    // Now a worker node runs all three.
    let w = worker(&ns, w_home.path()).await;

    let seen = until(&mut ws, |m| m["type"] == "task_completed" && m["task_id"] == ws_task.as_str()).await;
    let mine: Vec<Value> = seen.into_iter().filter(|m| m["task_id"] == ws_task.as_str()).collect();
    assert_eq!(tokens(&mine, Some("origin")), format!("echo: {ws_prompt}"), "{mine:?}");
    let done = mine.last().unwrap();
    assert_eq!((&done["origin"], &done["result"]), (&json!("w1"), &json!(format!("echo: {ws_prompt}"))), "{done}");

    let mut events = Vec::new();
    for m in until(&mut gql, |m| m["type"] == "complete" && m["id"] == "t").await {
        match m["type"].as_str().unwrap() {
            "next" => events.push(m["payload"]["data"]["taskUpdates"].clone()),
            "complete" => {}
            other => panic!("unexpected {other}: {m}"),
        }
    }
    assert_eq!(tokens(&events, Some("origin")), format!("echo: {gql_prompt}"), "{events:?}");
    let done = events.last().unwrap();
    assert_eq!((&done["event"], &done["origin"]), (&json!("task_completed"), &json!("w1")), "{done}");
    assert_eq!(done["result"], format!("echo: {gql_prompt}"));

    let (progress, result) = tokio::time::timeout(Duration::from_secs(60), mcp).await.expect("MCP answered").unwrap();
    let streamed: Vec<&String> = progress.iter().filter(|m| m.starts_with("running:")).collect();
    assert!(!streamed.is_empty(), "no progress carried the answer as it streamed: {progress:?}");
    assert!(streamed.iter().any(|m| m.contains("echo:")), "the worker's tokens are not in the progress: {progress:?}");
    let answer = &result["result"]["structuredContent"];
    assert_eq!(
        (&answer["status"], &answer["result"]),
        (&json!("completed"), &json!(format!("echo: {mcp_prompt}"))),
        "{result}"
    );
    let id = answer["task_id"].as_str().unwrap();
    let task: Value = reqwest::get(format!("{}/task/{id}", ctl.url)).await.unwrap().json().await.unwrap();
    assert!(task["worker_id"].as_str().unwrap().starts_with("w1/"), "{task}");
    drop(w);
}

/// The controller's dashboard in Chromium (`tests/browser/dashboard_nodes.cjs`): a task submitted
/// from its form runs on worker node w1; the page shows the answer growing token by token, then
/// the task completed with the whole answer and run by a worker of w1, the events log naming w1,
/// and the Nodes panel listing w1 alive with its load — no request to any host but 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_dashboard_shows_a_worker_nodes_tokens_in_a_real_browser() {
    let Some(browser) = peers::Browser::find() else { return };
    let ns = RedisNamespace::new();
    // Ten tokens ("echo: " and the prompt's nine words), 300 ms apart: the page reads the task
    // (its answer so far) when it starts, well before its first token.
    let prompt = "tokens from worker node w1 stream into the dashboard";
    let (_fake, addr) = FakeLlm::start(Duration::from_millis(3300)).await;
    let (c_home, w_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ctl = controller(&ns, addr, c_home.path());
    home(&ns, addr, w_home.path(), 30);
    let w = worker(&ns, w_home.path()).await;

    let answer = format!("echo: {prompt}");
    let env =
        [("KOUBOU_CONTROLLER", "ctl"), ("KOUBOU_NODE", "w1"), ("KOUBOU_PROMPT", prompt), ("KOUBOU_ANSWER", &answer)];
    let out = browser.run("dashboard_nodes.cjs", &ctl.url, &env).await;
    let id = out.lines().find_map(|l| l.strip_prefix("task_id=")).expect("the script names its task");
    let task: Value = reqwest::get(format!("{}/task/{id}", ctl.url)).await.unwrap().json().await.unwrap();
    assert_eq!(task["status"], "completed", "{task}");
    assert!(task["worker_id"].as_str().unwrap().starts_with("w1/"), "{task}");
    drop(w);
}

/// `GET /nodes`, GraphQL `nodes`, the dashboard's `/dashboard/api/nodes` and `koubou nodes` show
/// the worker node with its backends and models, its load at its last heartbeat, and its state:
/// alive while it renews, lost once killed and its registration ran out (until a sweep removes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_face_lists_the_nodes_with_backends_load_heartbeat_and_state() {
    let ns = RedisNamespace::new();
    let (_fake, addr) = FakeLlm::start(Duration::from_millis(10)).await;
    let (c_home, w_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The controller sweeps every 20 s: a lost node stays listed as lost meanwhile.
    let ctl = controller(&ns, addr, c_home.path());
    // The worker node renews every second.
    home(&ns, addr, w_home.path(), 3);
    let w = worker(&ns, w_home.path()).await;
    let node = |id: &'static str| {
        let url = ctl.url.clone();
        async move {
            let v: Value = reqwest::get(format!("{url}/nodes")).await.unwrap().json().await.unwrap();
            v["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).cloned()
        }
    };

    // A task that takes 30 s keeps one of its workers busy; its next heartbeat says so.
    let busy = support::delegate(&ctl.url, json!({"prompt": "slow task"})).await;
    assert!(busy["task_id"].is_string(), "{busy}");
    let w1 = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match node("w1").await {
                Some(n) if n["busy"] == 1 => return n,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .ok();
    let Some(w1) = w1 else {
        panic!("w1's heartbeat never said it is busy: {}", body(&format!("{}/nodes", ctl.url)).await)
    };
    assert_eq!(w1["backends"], json!([{"name": "fake", "kind": "openai", "models": ["fake"]}]), "{w1}");
    assert_eq!((&w1["max_workers"], &w1["state"], &w1["lost"]), (&json!(4), &json!("alive"), &json!(false)), "{w1}");
    assert_eq!(w1["kinds"], json!(["general"]), "{w1}");
    let (seen, expires) = (w1["last_seen"].as_str().unwrap(), w1["expires_at"].as_str().unwrap());
    assert!(!seen.is_empty() && seen < expires && w1["started_at"].as_str().unwrap() <= seen, "{w1}");
    let ctl_node = node("ctl").await.expect("the controller is a node too");
    assert_eq!((&ctl_node["max_workers"], &ctl_node["busy"]), (&json!(0), &json!(0)), "{ctl_node}");
    // The controller's pool and health count every node's workers: none of its own, w1's four.
    let cluster = |alive: usize, lost: usize, busy: u32, max: u32| json!({"nodes_alive": alive, "nodes_lost": lost, "busy": busy, "max_workers": max});
    for path in ["/workers/status", "/health"] {
        let v: Value = reqwest::get(format!("{}{path}", ctl.url)).await.unwrap().json().await.unwrap();
        assert_eq!(v["cluster"], cluster(2, 0, 1, 4), "{path}: {v}");
    }

    // Heartbeats move on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = node("w1").await.unwrap();
    assert!(later["last_seen"].as_str().unwrap() > seen, "no new heartbeat: {w1} then {later}");

    // GraphQL and the dashboard show the same.
    let q = "{ nodes { id state kinds backends { name kind models } busy maxWorkers lastSeen expiresAt } }";
    let r: Value = reqwest::Client::new()
        .post(ctl.graphql_url.clone().unwrap())
        .json(&json!({"query": q}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let g = r["data"]["nodes"].as_array().unwrap_or_else(|| panic!("{r}"));
    let g1 = g.iter().find(|n| n["id"] == "w1").unwrap_or_else(|| panic!("{r}"));
    assert_eq!((&g1["state"], &g1["busy"], &g1["maxWorkers"]), (&json!("ALIVE"), &json!(1), &json!(4)), "{g1}");
    assert_eq!(g1["backends"], json!([{"name": "fake", "kind": "openai", "models": ["fake"]}]), "{g1}");
    assert!(g.iter().any(|n| n["id"] == "ctl"), "{r}");
    let d: Value = reqwest::get(format!("{}/dashboard/api/nodes", ctl.url)).await.unwrap().json().await.unwrap();
    let d1 = d["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "w1").cloned().unwrap_or_else(|| panic!("{d}"));
    assert_eq!((&d1["busy"], &d1["state"]), (&json!(1), &json!("alive")), "{d1}");
    let dashboard = reqwest::get(format!("{}/dashboard/app.js", ctl.url)).await.unwrap().text().await.unwrap();
    assert!(dashboard.contains("api('/nodes')"), "the dashboard does not read the nodes");
    let (code, out, err) = support::cli(c_home.path(), &ctl.url, &["nodes"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("w1") && out.contains("fake (fake)") && out.contains("1/4"), "{out}");

    // Killed, w1 stops renewing: once its registration runs out it is lost.
    tokio::task::spawn_blocking(move || w.kill9()).await.unwrap();
    let lost = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match node("w1").await {
                Some(n) if n["state"] == "lost" => return n,
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                None => panic!("w1 was swept before it was seen lost"),
            }
        }
    })
    .await
    .expect("w1 never lost");
    assert_eq!(lost["lost"], true, "{lost}");
    let v: Value = reqwest::get(format!("{}/workers/status", ctl.url)).await.unwrap().json().await.unwrap();
    assert_eq!(v["cluster"], cluster(1, 1, 0, 0), "a lost node's workers are not counted: {v}");
    let (code, out, _) = support::cli(c_home.path(), &ctl.url, &["nodes"]);
    assert!(code == 0 && out.lines().any(|l| l.contains("w1") && l.contains("lost")), "{out}");
}

/// The body of `GET url`, for a failure's message.
async fn body(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}
