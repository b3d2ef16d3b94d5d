//! Tool results on a real in-process system (SQLite queue, worker pool, the echo backend, which
//! answers with the prompt): the answer appears once, a long one is cut with the way to read on,
//! and `get_task` with `offset` reads the rest; `delegate_task` takes `backend`, `tags`, `json`
//! and `schema` as REST does.

use std::sync::Arc;

use koubou_mcp::KoubouMcp;
use koubou_system::{Config, Home, Koubou, StartOptions, config::McpConfig};
use serde_json::{Map, Value, json};

async fn system(dir: &std::path::Path) -> Koubou {
    let cfg = Config::parse(
        r#"
        [backends.echo]
        kind = "echo"
        [backends.other]
        kind = "echo"
        reply = "{\"ok\": true}"
        [types.general]
        backend = "echo"
        "#,
        "test",
    )
    .unwrap();
    let home = Home { dir: dir.to_owned() };
    Koubou::start(cfg, &home, StartOptions { node: "mcp-test".into(), workers: true, ..StartOptions::default() })
        .await
        .unwrap()
}

fn args(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn text(r: &rmcp::model::CallToolResult) -> String {
    r.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_answers_are_cut_once_and_read_on_with_an_offset() {
    let dir = tempfile::tempdir().unwrap();
    let k = system(dir.path()).await;
    let cfg = McpConfig { max_result_chars: 1000, max_wait_secs: 20, ..McpConfig::default() };
    let mcp = KoubouMcp::new(Arc::new(k.clone()), cfg);
    // The echo backend answers with the prompt: 2,500 characters, no stretch of which repeats.
    let answer: String = (0..500).map(|i| format!("{i:05}")).collect();
    let r = mcp.call("delegate_task", Some(&args(json!({"prompt": answer, "wait_seconds": 20}))), None).await;
    assert_ne!(r.is_error, Some(true), "{r:?}");
    let s = r.structured_content.clone().unwrap();
    assert_eq!(s["status"], "completed", "{s}");
    let first = s["result"].as_str().unwrap();
    assert_eq!(first, &answer[..1000]);
    assert_eq!(s["result_chars"], 2500);
    assert!(s["next"].as_str().unwrap().contains("get_task") && s["next"].as_str().unwrap().contains("offset=1000"));
    // Once: the text block says where the answer is but does not repeat it.
    let t = text(&r);
    assert!(!t.contains(&answer[..50]), "the answer must not appear twice: {t}");
    assert!(t.contains("structuredContent.result") && t.contains("offset=1000"), "{t}");
    let whole = serde_json::to_string(&r).unwrap();
    assert_eq!(whole.matches(&answer[..200]).count(), 1, "one copy of the answer on the wire");

    let id = s["task_id"].as_str().unwrap();
    let mut read = first.to_owned();
    let mut offset = 1000;
    while offset < 2500 {
        let r = mcp.call("get_task", Some(&args(json!({"task_id": id, "offset": offset}))), None).await;
        let s = r.structured_content.unwrap();
        assert_eq!(s["offset"], offset);
        let piece = s["result"].as_str().unwrap();
        read.push_str(piece);
        offset += piece.chars().count();
        if offset < 2500 {
            assert!(s["next"].as_str().unwrap().contains(&format!("offset={offset}")), "{s}");
        } else {
            assert!(s.get("next").is_none() && s.get("result_chars").is_none(), "the last piece: {s}");
        }
    }
    assert_eq!(read, answer, "the pieces make the whole answer");
    let r = mcp.call("get_task", Some(&args(json!({"task_id": id, "offset": -1}))), None).await;
    assert_eq!(r.is_error, Some(true));
    assert!(text(&r).contains("offset"));
    k.shutdown(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegate_takes_backend_tags_and_structured_output() {
    let dir = tempfile::tempdir().unwrap();
    let k = system(dir.path()).await;
    let mcp = KoubouMcp::new(Arc::new(k.clone()), McpConfig { max_wait_secs: 20, ..McpConfig::default() });
    let call = json!({"prompt": "p", "backend": "other", "tags": ["Team:A"], "json": true,
                      "schema": {"type": "object", "required": ["ok"]}, "wait_seconds": 20});
    let r = mcp.call("delegate_task", Some(&args(call)), None).await;
    let s = r.structured_content.unwrap();
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!((s["backend"].as_str(), s["remote"].as_bool()), (Some("other"), Some(false)));
    assert_eq!(s["tags"], json!(["team:a"]));
    assert_eq!(s["result"], "{\"ok\": true}");
    let listed = mcp.call("list_tasks", Some(&args(json!({"tag": "team:a"}))), None).await;
    assert_eq!(listed.structured_content.unwrap()["total"], 1);
    for (bad, field) in [
        (json!({"prompt": "p", "backend": "nope"}), "backend"),
        (json!({"prompt": "p", "tags": "bad tag!"}), "tags"),
        (json!({"prompt": "p", "json": "yes"}), "json"),
        (json!({"prompt": "p", "schema": {"type": 3}}), "schema"),
    ] {
        let r = mcp.call("delegate_task", Some(&args(bad.clone())), None).await;
        assert_eq!(r.is_error, Some(true), "{bad}");
        assert!(text(&r).contains(field), "{bad}: {}", text(&r));
    }
    k.shutdown(None).await;
}
