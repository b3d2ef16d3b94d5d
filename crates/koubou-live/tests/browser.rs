//! The dashboard in a real headless Chromium (Debian's), driven by playwright-core through
//! `tests/browser/dashboard.cjs`: submit from the form, watch it complete, cancel another, no
//! request to any host but 127.0.0.1; screenshots in `KOUBOU_ARTIFACTS` (or `artifacts/`).
//!
//! Needs `scripts/ensure-chromium.sh` and `scripts/ensure-node-tools.sh` (fails, naming them,
//! when missing) unless `KOUBOU_SKIP_REAL_PEERS=1`.

mod support;

#[path = "../../../tests/browser/peers.rs"]
mod peers;

use koubou_live::{dashboard_router, graphql_router};
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    let Some(browser) = peers::Browser::find() else { return };
    let s = start(|k| dashboard_router(k.clone()).merge(graphql_router(k))).await;
    // Some history on the board.
    for p in
        ["Explain Python decorators", "Create a Python function for fibonacci", "Review this SQL", "explode please"]
    {
        let r = reqwest::Client::new()
            .post(s.http("/dashboard/api/tasks"))
            .json(&json!({"prompt": p}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    browser.run("dashboard.cjs", &format!("http://{}", s.addr), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_api_pages_and_errors() {
    let s = start(dashboard_router).await;
    let c = reqwest::Client::new();
    let html = c.get(s.http("/dashboard")).send().await.unwrap();
    assert_eq!(html.status(), 200);
    assert!(html.headers()["content-security-policy"].to_str().unwrap().contains("default-src 'self'"));
    let html = html.text().await.unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"), "the page names no other host");
    for f in ["app.js", "charts.js", "app.css", "favicon.svg"] {
        assert_eq!(c.get(s.http(&format!("/dashboard/{f}"))).send().await.unwrap().status(), 200, "{f}");
    }
    for i in 0..5 {
        c.post(s.http("/dashboard/api/tasks")).json(&json!({"prompt": format!("slow {i}")})).send().await.unwrap();
    }
    let page: serde_json::Value =
        c.get(s.http("/dashboard/api/tasks?limit=2")).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["total"], 5);
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"].as_i64().unwrap();
    let next: serde_json::Value = c
        .get(s.http(&format!("/dashboard/api/tasks?limit=2&before={cursor}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(next["tasks"][0]["task_id"], page["tasks"][0]["task_id"]);
    let r = c.post(s.http("/dashboard/api/tasks")).json(&json!({"prompt": "x", "priority": 0})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["field"], "priority");
    assert_eq!(c.get(s.http("/dashboard/api/tasks?limit=abc")).send().await.unwrap().status(), 400);
    assert_eq!(c.get(s.http("/dashboard/api/tasks/nope")).send().await.unwrap().status(), 400);
    let id = page["tasks"][0]["task_id"].as_str().unwrap();
    let r: serde_json::Value =
        c.post(s.http(&format!("/dashboard/api/tasks/{id}/cancel"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["status"], "cancelled");
    for p in ["workers", "health", "status", "metrics"] {
        assert_eq!(c.get(s.http(&format!("/dashboard/api/{p}"))).send().await.unwrap().status(), 200, "{p}");
    }
}
