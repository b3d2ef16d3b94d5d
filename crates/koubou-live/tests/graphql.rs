//! GraphQL against a real server on 127.0.0.1: the seed's queries, errors, pagination, GraphiQL
//! (embedded, nothing from a CDN) and subscriptions over both graphql-ws subprotocols.

mod support;

use std::time::Duration;

use futures::StreamExt;
use koubou_live::graphql_router;
use koubou_task::{EventKind, EventLog};
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

async fn gql(s: &Server, query: &str, vars: Value) -> Value {
    let r = reqwest::Client::new()
        .post(s.http("/graphql"))
        .json(&json!({"query": query, "variables": vars}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn wait_done(s: &Server, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tokio::time::Instant::now() < deadline {
        let r = gql(s, "query($id: ID!) { task(id: $id) { id status result } }", json!({"id": id})).await;
        let t = &r["data"]["task"];
        if ["COMPLETED", "FAILED", "CANCELLED"].contains(&t["status"].as_str().unwrap()) {
            return t.clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("task {id} did not finish");
}

/// Publishes a probe event until subscription `sub` delivers something: from then on it is
/// live (neither protocol acknowledges a subscribe, so this replaces a guessed pause).
async fn until_live(s: &Server, ws: &mut Ws, sub: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tokio::time::Instant::now() < deadline {
        s.k.bus().publish(EventKind::WorkerScaled { workers: 0, previous: 0, reason: "probe".into() });
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(Duration::from_millis(100), ws.next()).await {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == sub {
                return;
            }
        }
    }
    panic!("subscription {sub} never delivered an event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_queries_and_mutation() {
    let s = start(graphql_router).await;
    let r = gql(
        &s,
        r#"mutation { submitTask(type: "code", prompt: "Create a REST API", priority: 9) { taskId status } }"#,
        json!({}),
    )
    .await;
    assert!(r.get("errors").is_none(), "{r}");
    assert_eq!(r["data"]["submitTask"]["status"], "PENDING");
    let id = r["data"]["submitTask"]["taskId"].as_str().unwrap().to_owned();
    let t = wait_done(&s, &id).await;
    assert_eq!(t["status"], "COMPLETED");
    assert!(t["result"].as_str().unwrap().contains("Create a REST API"));
    // The seed's query, verbatim but for the id.
    let q = format!(
        "query {{ systemStatus {{ activeWorkers pendingTasks completedTasks }} task(id: \"{id}\") {{ id status result }} }}"
    );
    let r = gql(&s, &q, json!({})).await;
    assert!(r.get("errors").is_none(), "{r}");
    assert!(r["data"]["systemStatus"]["activeWorkers"].as_i64().unwrap() >= 1);
    assert_eq!(r["data"]["systemStatus"]["completedTasks"], 1);
    assert_eq!(r["data"]["task"]["id"], id.as_str());
    // The same over GET.
    let r: Value = reqwest::get(s.http("/graphql?query=%7BsystemStatus%7BcompletedTasks%7D%7D"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["data"]["systemStatus"]["completedTasks"], 1);
    // Workers and health.
    let r = gql(
        &s,
        "{ pool { active workers { workerId state tasksDone } } healthReport { status backends { name up } } }",
        json!({}),
    )
    .await;
    assert!(r.get("errors").is_none(), "{r}");
    assert_eq!(r["data"]["healthReport"]["backends"][0]["name"], "craftsman");
    // The nodes on the queue: this one, with its backend and model, load and heartbeat.
    let r =
        gql(&s, "{ nodes { id state kinds backends { name kind models } busy maxWorkers lastSeen } }", json!({})).await;
    assert!(r.get("errors").is_none(), "{r}");
    let node = &r["data"]["nodes"][0];
    assert_eq!(
        (&node["id"], &node["state"], &node["maxWorkers"]),
        (&json!("serve"), &json!("ALIVE"), &json!(4)),
        "{r}"
    );
    assert_eq!(node["backends"], json!([{"name": "craftsman", "kind": "exec", "models": ["craftsman-1"]}]), "{r}");
    assert!(node["lastSeen"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_field() {
    let s = start(graphql_router).await;
    let r = gql(&s, r#"mutation { submitTask(prompt: "x", priority: 11) { taskId } }"#, json!({})).await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "invalid_request", "{r}");
    assert_eq!(r["errors"][0]["extensions"]["field"], "priority");
    let r = gql(&s, r#"mutation { submitTask(type: "Bad Type", prompt: "x") { taskId } }"#, json!({})).await;
    assert_eq!(r["errors"][0]["extensions"]["field"], "type", "{r}");
    let r = gql(&s, r#"{ task(id: "task-123") { id } }"#, json!({})).await;
    assert_eq!(r["errors"][0]["extensions"]["field"], "id", "{r}");
    let r = gql(&s, r#"{ task(id: "0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60") { id } }"#, json!({})).await;
    assert!(r.get("errors").is_none(), "{r}");
    assert_eq!(r["data"]["task"], Value::Null);
    let r = gql(&s, r#"mutation { cancelTask(id: "0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60") { id } }"#, json!({})).await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "not_found", "{r}");
    let r = gql(&s, "{ taskPage(limit: 0) { total } }", json!({})).await;
    assert_eq!(r["errors"][0]["extensions"]["field"], "limit", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_filter_paginate_and_cancel() {
    let s = start(graphql_router).await;
    let mut ids = vec![];
    for p in ["alpha one", "beta two", "alpha three"] {
        let r = gql(&s, "mutation($p: String!) { submitTask(prompt: $p) { taskId } }", json!({"p": p})).await;
        ids.push(r["data"]["submitTask"]["taskId"].as_str().unwrap().to_owned());
    }
    let slow = gql(&s, r#"mutation { submitTask(prompt: "slow alpha") { taskId } }"#, json!({})).await;
    let slow = slow["data"]["submitTask"]["taskId"].as_str().unwrap().to_owned();
    for id in &ids {
        wait_done(&s, id).await;
    }
    let r =
        gql(&s, r#"{ taskPage(search: "alpha", limit: 2) { total nextCursor tasks { id prompt } } }"#, json!({})).await;
    let page = &r["data"]["taskPage"];
    assert_eq!(page["total"], 3, "{r}");
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
    assert_eq!(page["tasks"][0]["id"], slow.as_str(), "newest first");
    let cursor = page["nextCursor"].as_str().unwrap();
    let r = gql(
        &s,
        "query($c: String) { taskPage(search: \"alpha\", limit: 2, before: $c) { nextCursor tasks { id } } }",
        json!({"c": cursor}),
    )
    .await;
    assert_eq!(r["data"]["taskPage"]["tasks"][0]["id"], ids[0].as_str(), "{r}");
    assert_eq!(r["data"]["taskPage"]["nextCursor"], Value::Null);
    let r = gql(&s, "{ taskPage(status: [COMPLETED]) { total } }", json!({})).await;
    assert_eq!(r["data"]["taskPage"]["total"], 3, "{r}");

    let r = gql(&s, "mutation($id: ID!) { cancelTask(id: $id) { id status } }", json!({"id": slow})).await;
    assert_eq!(r["data"]["cancelTask"]["status"], "CANCELLED", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphiql_page_and_assets_are_served_locally() {
    let s = start(graphql_router).await;
    let c = reqwest::Client::new();
    let r = c.get(s.http("/graphql")).header("accept", "text/html,application/xhtml+xml").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-security-policy"].to_str().unwrap().contains("default-src 'self'"));
    let html = r.text().await.unwrap();
    assert!(html.contains("/graphql/assets/graphiql.min.js"));
    for src in html.split("src=\"").skip(1).chain(html.split("href=\"").skip(1)) {
        let url = src.split('"').next().unwrap();
        assert!(url.starts_with('/') || url.starts_with("data:"), "page refers to {url}");
        if url.starts_with('/') {
            let a = c.get(s.http(url)).send().await.unwrap();
            assert_eq!(a.status(), 200, "{url}");
        }
    }
    let a = c.get(s.http("/graphql/assets/LICENSE.graphiql")).send().await.unwrap();
    assert!(a.text().await.unwrap().contains("MIT"));
    assert_eq!(c.get(s.http("/graphql/assets/nope.js")).send().await.unwrap().status(), 404);
}

async fn gql_ws(s: &Server, protocol: &str) -> Ws {
    let mut req = s.ws("/graphql").into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", protocol.parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], protocol);
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_over_graphql_transport_ws() {
    let s = start(graphql_router).await;
    let mut ws = gql_ws(&s, "graphql-transport-ws").await;
    send(&mut ws, json!({"type": "connection_init"})).await;
    assert_eq!(next_json(&mut ws, 5).await["type"], "connection_ack");
    send(&mut ws, json!({"type": "subscribe", "id": "sys", "payload": {"query": "subscription { systemEvents { event taskId status } }"}})).await;
    until_live(&s, &mut ws, "sys").await;

    let r = gql(&s, r#"mutation { submitTask(prompt: "stream me") { taskId } }"#, json!({})).await;
    let id = r["data"]["submitTask"]["taskId"].as_str().unwrap().to_owned();
    send(&mut ws, json!({"type": "subscribe", "id": "one", "payload": {
        "query": "subscription($id: ID!) { taskUpdates(id: $id) { event taskId text status } }", "variables": {"id": id}}})).await;
    let mut text = String::new();
    let mut sys = vec![];
    loop {
        let m = next_json(&mut ws, 30).await;
        match (m["type"].as_str().unwrap(), m["id"].as_str()) {
            ("next", Some("one")) => {
                let e = &m["payload"]["data"]["taskUpdates"];
                assert_eq!(e["taskId"], id.as_str());
                if e["event"] == "task_token" {
                    text.push_str(e["text"].as_str().unwrap());
                }
            }
            ("next", Some("sys")) => sys.push(m["payload"]["data"]["systemEvents"].clone()),
            ("complete", Some("one")) => break,
            other => panic!("unexpected {other:?}: {m}"),
        }
    }
    assert!(text.contains("stream me"), "{text}");
    assert!(sys.iter().any(|e| e["event"] == "task_created" && e["taskId"] == id.as_str()), "{sys:?}");
    assert!(sys.iter().all(|e| e["event"] != "task_token"), "no tokens unless asked");
    // A finished task: one event with its ending, then complete.
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "again", "payload": {
        "query": "subscription($id: ID!) { taskUpdates(id: $id) { event status result } }", "variables": {"id": id}}}),
    )
    .await;
    let (m, _) = until(&mut ws, 5, |v| v["id"] == "again").await;
    assert_eq!(m["payload"]["data"]["taskUpdates"]["status"], "COMPLETED", "{m}");
    assert_eq!(
        m["payload"]["data"]["taskUpdates"]["result"].as_str().unwrap(),
        text,
        "a late subscriber has the answer"
    );
    send(&mut ws, json!({"type": "ping"})).await;
    until(&mut ws, 5, |v| v["type"] == "pong").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_over_legacy_graphql_ws() {
    let s = start(graphql_router).await;
    let mut ws = gql_ws(&s, "graphql-ws").await;
    send(&mut ws, json!({"type": "connection_init", "payload": {}})).await;
    until(&mut ws, 5, |v| v["type"] == "connection_ack").await;
    send(&mut ws, json!({"type": "start", "id": "1", "payload": {"query": "subscription { systemEvents(tokens: true) { event taskId text } }"}})).await;
    until_live(&s, &mut ws, "1").await;
    let r = gql(&s, r#"mutation { submitTask(prompt: "legacy") { taskId } }"#, json!({})).await;
    let id = r["data"]["submitTask"]["taskId"].as_str().unwrap().to_owned();
    let (m, seen) = until(&mut ws, 30, |v| v["payload"]["data"]["systemEvents"]["event"] == "task_completed").await;
    assert_eq!(m["type"], "data");
    assert_eq!(m["payload"]["data"]["systemEvents"]["taskId"], id.as_str());
    assert!(seen.iter().any(|v| v["payload"]["data"]["systemEvents"]["event"] == "task_token"));
    send(&mut ws, json!({"type": "stop", "id": "1"})).await;
    until(&mut ws, 5, |v| v["type"] == "complete").await;
}
