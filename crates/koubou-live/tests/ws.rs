//! The WebSocket protocol against a real server on 127.0.0.1 (tokio-tungstenite as the client).

mod support;

use std::time::Duration;

use futures::StreamExt;
use koubou_live::{WsConfig, ws::Topic, ws_router, ws_router_with};
use koubou_task::{EventKind, EventLog, TaskId};
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;

async fn welcome(ws: &mut Ws) {
    let w = next_json(ws, 5).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["protocol"], "koubou-ws/1");
    let i = next_json(ws, 5).await;
    assert_eq!(i["type"], "initial_state", "{i}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_submit_streams_tokens_then_completes() {
    let s = start(ws_router).await;
    let mut ws = connect(&s.ws("/")).await;
    welcome(&mut ws).await;
    // Exactly the seed's message.
    send(&mut ws, json!({"type": "submit_task", "payload": {"type": "code", "prompt": "Generate unit tests"}})).await;
    let (sub, _) = until(&mut ws, 10, |v| v["type"] == "task_submitted").await;
    assert_eq!(sub["status"], "pending");
    assert_eq!(sub["created"], true);
    let id = sub["task_id"].as_str().unwrap().to_owned();
    let (done, seen) = until(&mut ws, 30, |v| v["type"] == "task_completed").await;
    assert_eq!(done["task_id"], id.as_str());
    assert_eq!(done["event"], "task_completed");
    let kinds: Vec<&str> = seen.iter().filter_map(|v| v["type"].as_str()).collect();
    for k in ["task_created", "task_claimed", "task_started"] {
        assert!(kinds.contains(&k), "no {k} in {kinds:?}");
    }
    let tokens: Vec<&str> =
        seen.iter().filter(|v| v["type"] == "task_token").map(|v| v["text"].as_str().unwrap()).collect();
    assert!(tokens.len() > 3, "tokens streamed one by one, got {tokens:?}");
    send(&mut ws, json!({"type": "get_task", "task_id": id, "ref": 7})).await;
    let (t, _) = until(&mut ws, 5, |v| v["ref"] == 7).await;
    assert_eq!((t["type"].as_str(), t["ref"].as_i64()), (Some("task"), Some(7)));
    assert_eq!(t["task"]["status"], "completed");
    assert_eq!(t["task"]["result"]["output"].as_str().unwrap(), tokens.concat());
    assert_eq!(done["result"].as_str().unwrap(), tokens.concat(), "the final event carries the answer");
    assert!(tokens.concat().contains("Generate unit tests"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_and_malformed_messages_keep_the_connection() {
    let s = start(ws_router).await;
    let mut ws = connect(&s.ws("/")).await;
    welcome(&mut ws).await;
    send(&mut ws, json!({"type": "ping", "ref": "a"})).await;
    let (p, _) = until(&mut ws, 5, |v| v["ref"] == "a").await;
    assert_eq!((p["type"].as_str(), p["ref"].as_str()), (Some("pong"), Some("a")));

    let bad: Vec<(Message, &str)> = vec![
        (Message::Text("this is not json".into()), "message"),
        (Message::Text("[1,2]".into()), "message"),
        (Message::Text(r#"{"no_type": 1}"#.into()), "type"),
        (Message::Text(r#"{"type": "launch_rockets"}"#.into()), "type"),
        (Message::Text(r#"{"type": "submit_task"}"#.into()), "payload"),
        (
            Message::Text(r#"{"type": "submit_task", "payload": {"prompt": "x", "priority": 11}}"#.into()),
            "payload.priority",
        ),
        (Message::Text(r#"{"type": "submit_task", "payload": {"type": "code"}}"#.into()), "payload.prompt"),
        (Message::Text(r#"{"type": "subscribe", "task_id": "nope"}"#.into()), "task_id"),
        (Message::Text(r#"{"type": "subscribe", "topic": "weather"}"#.into()), "topic"),
        (Message::Text(r#"{"type": "cancel_task"}"#.into()), "task_id"),
        (Message::Binary(vec![0xff, 0xfe].into()), "message"),
    ];
    for (m, field) in bad {
        let shown = format!("{m:?}");
        futures::SinkExt::send(&mut ws, m).await.unwrap();
        let (e, _) =
            until(&mut ws, 5, |v| !v["type"].as_str().unwrap().starts_with("worker_") && v["type"] != "periodic_stats")
                .await;
        assert_eq!(e["type"], "error", "{shown} -> {e}");
        assert_eq!(e["error"]["field"], field, "{shown} -> {e}");
        assert_eq!(e["error"]["code"], "invalid_request");
    }
    // Unknown task: not found, still an error event.
    send(&mut ws, json!({"type": "get_task", "task_id": TaskId::new().to_string(), "ref": 1})).await;
    let (e, _) = until(&mut ws, 5, |v| v["ref"] == 1).await;
    assert_eq!(
        (e["type"].as_str(), e["error"]["code"].as_str(), e["ref"].as_i64()),
        (Some("error"), Some("not_found"), Some(1))
    );
    // Still up.
    send(&mut ws, json!({"type": "ping"})).await;
    until(&mut ws, 5, |v| v["type"] == "pong").await;
    send(&mut ws, json!({"type": "status"})).await;
    let (st, _) = until(&mut ws, 5, |v| v["type"] == "status").await;
    assert_eq!(st["type"], "status");
    assert!(st["status"]["active_workers"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_by_task_and_to_everything_and_cancel() {
    let s = start(ws_router).await;
    let mut a = connect(&s.ws("/")).await;
    let mut b = connect(&s.ws("/")).await;
    let mut c = connect(&s.ws("/")).await;
    welcome(&mut a).await;
    welcome(&mut b).await;
    welcome(&mut c).await;
    send(&mut c, json!({"type": "subscribe", "topic": "tasks"})).await;
    until(&mut c, 5, |v| v["type"] == "subscribed").await;

    send(&mut a, json!({"type": "submit_task", "payload": {"prompt": "a slow one"}})).await;
    let (sub, _) = until(&mut a, 10, |v| v["type"] == "task_submitted").await;
    let id = sub["task_id"].as_str().unwrap().to_owned();
    // Wait until it runs and has streamed a token.
    until(&mut a, 20, |v| v["type"] == "task_token").await;

    // B subscribes by id: gets a snapshot with the answer so far, then live events.
    send(&mut b, json!({"type": "subscribe", "task_id": id})).await;
    let (snap, _) = until(&mut b, 5, |v| v["type"] == "subscribed").await;
    assert_eq!(snap["task"]["status"], "running");

    // Cancel from B.
    send(&mut b, json!({"type": "cancel_task", "task_id": id, "ref": "x"})).await;
    let (r, _) = until(&mut b, 10, |v| v["ref"] == "x").await;
    assert_eq!(r["task"]["status"], "cancelled", "{r}");
    for ws in [&mut a, &mut b] {
        let (e, _) = until(ws, 10, |v| v["type"] == "task_cancelled").await;
        assert_eq!(e["task_id"], id.as_str());
    }
    // C (topic tasks) saw the life cycle but no tokens.
    let (_, seen) = until(&mut c, 10, |v| v["type"] == "task_cancelled").await;
    assert!(seen.iter().any(|v| v["type"] == "task_created" && v["task_id"] == id.as_str()));
    assert!(seen.iter().all(|v| v["type"] != "task_token"), "{seen:?}");

    // Unsubscribe from everything but system events: a new task is not heard of.
    send(&mut c, json!({"type": "unsubscribe", "topic": "tasks"})).await;
    until(&mut c, 5, |v| v["type"] == "unsubscribed").await;
    send(&mut a, json!({"type": "submit_task", "payload": {"prompt": "quiet"}})).await;
    until(&mut a, 30, |v| v["type"] == "task_completed").await;
    send(&mut c, json!({"type": "ping"})).await;
    let (_, seen) = until(&mut c, 5, |v| v["type"] == "pong").await;
    assert!(seen.iter().all(|v| !v["type"].as_str().unwrap().starts_with("task_")), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_events_and_metrics_reach_subscribers() {
    let s = start(ws_router).await;
    let mut ws = connect(&s.ws("/")).await;
    welcome(&mut ws).await;
    send(&mut ws, json!({"type": "subscribe", "topic": "metrics"})).await;
    until(&mut ws, 5, |v| v["type"] == "subscribed").await;
    s.k.bus().publish(EventKind::BackendHealth { backend: "craftsman".into(), up: false, detail: "test".into() });
    let (e, _) = until(&mut ws, 5, |v| v["type"] == "backend_health").await;
    assert_eq!((e["backend"].as_str(), e["up"].as_bool()), (Some("craftsman"), Some(false)));
    let (m, _) = until(&mut ws, 10, |v| v["type"] == "metrics").await;
    for f in ["queue_depth", "running", "throughput_per_sec", "tokens_per_sec", "rss_bytes", "active_workers"] {
        assert!(m.get(f).is_some(), "metrics has no {f}: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_dropped_with_a_reason() {
    let cfg = WsConfig { buffer: 8, default_topics: vec![Topic::All], ..WsConfig::default() };
    let s = start(move |k| ws_router_with(k, cfg)).await;
    let mut slow = connect(&s.ws("/")).await;
    let mut fast = connect(&s.ws("/")).await;
    welcome(&mut slow).await;
    welcome(&mut fast).await;
    // 600 events of 32 KiB: far more than the socket buffers and 8 queued messages hold for a
    // client that reads nothing. Each is published once the fast client has read the one
    // before, so it is never behind, however slowly a busy machine runs this test (next_json
    // panics if it is closed)...
    let id = TaskId::new();
    let text = "x".repeat(32 << 10);
    for _ in 0..600 {
        s.k.bus().publish(EventKind::TaskToken { task_id: id, text: text.clone() });
        while next_json(&mut fast, 20).await["type"] != "task_token" {}
    }
    // ...the slow one (which read nothing meanwhile) was cut off before the end: once every
    // connection has taken every event off the bus, the slow one's buffer has overflowed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while s.k.bus().backlog() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the bus never drained: {} events", s.k.bus().backlog());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut slow_got = 0;
    let mut close = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), slow.next()).await.expect("slow client not closed") {
            Some(Ok(Message::Text(_))) => slow_got += 1,
            Some(Ok(Message::Close(c))) => {
                close = c;
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    assert!(slow_got < 600, "slow client got all {slow_got} events");
    if let Some(c) = close {
        assert_eq!(u16::from(c.code), 1008);
        assert!(c.reason.contains("too slow"), "{}", c.reason);
    }
    // The fast one is still served.
    send(&mut fast, json!({"type": "ping"})).await;
    until(&mut fast, 5, |v| v["type"] == "pong").await;
}
