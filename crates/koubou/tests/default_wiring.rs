//! With no backend configured: Ollama when it answers on OLLAMA_HOST, else the embedded model.

mod support;

use serde_json::{Value, json};
use support::{Serve, fake_ollama};

async fn sync_task(url: &str, body: Value) -> Value {
    let v: Value = reqwest::Client::new()
        .post(format!("{url}/task/delegate"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "completed", "{v}");
    v["task"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uses_ollama_when_it_answers_on_ollama_host() {
    let ollama = fake_ollama().await;
    let home = tempfile::tempdir().unwrap();
    let host = ollama.to_string(); // host:port without a scheme, as users often set it
    let s = Serve::start_with_env(home.path(), &[], &[("OLLAMA_HOST", &host)]);
    let h: Value = reqwest::get(format!("{}/health", s.url)).await.unwrap().json().await.unwrap();
    assert!(h["routes"]["general"].as_str().unwrap().starts_with("ollama/gemma2:2b"), "{h}");
    let t = sync_task(&s.url, json!({"prompt": "hi there", "sync": true})).await;
    assert_eq!(t["result"]["output"], "ollama says: hi there");
    assert_eq!(t["backend"], "ollama");
    assert_eq!(t["usage"]["completion_tokens"], 4);
}

/// The real SmolLM2 model, through the whole system: queue, worker, engine, stream.
#[cfg(feature = "embedded")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_the_embedded_model() {
    use std::time::Duration;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let home = tempfile::tempdir().unwrap();
    let s = Serve::start_with_env(home.path(), &[], &[("OLLAMA_HOST", &closed)]);
    let h: Value = reqwest::get(format!("{}/health", s.url)).await.unwrap().json().await.unwrap();
    assert!(h["routes"]["general"].as_str().unwrap().starts_with("embedded/"), "{h}");
    let q = "What is the capital of France? Answer in one word.";
    let body = json!({"prompt": q, "sync": true, "options": {"temperature": 0, "max_tokens": 32}});
    let a = sync_task(&s.url, body.clone()).await;
    let b = sync_task(&s.url, body).await;
    assert!(a["result"]["output"].as_str().unwrap().contains("Paris"), "{a}");
    assert_eq!(a["result"]["output"], b["result"]["output"], "temperature 0 is deterministic");
    assert_eq!(a["backend"], "embedded");
    assert!(a["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // Two at once, and a long one cancelled mid-generation.
    let http = reqwest::Client::new();
    let long = json!({"prompt": "Write a very long essay about the history of Rome.", "options": {"max_tokens": 4000, "temperature": 0}});
    let v: Value =
        http.post(format!("{}/task/delegate", s.url)).json(&long).send().await.unwrap().json().await.unwrap();
    let long_id = v["task_id"].as_str().unwrap().to_owned();
    let short = sync_task(&s.url, json!({"prompt": "Say hello.", "sync": true, "options": {"max_tokens": 16}})).await;
    assert!(!short["result"]["output"].as_str().unwrap().is_empty());
    let mut partial = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tokio::time::Instant::now() < deadline {
        let t: Value = http.get(format!("{}/task/{long_id}/status", s.url)).send().await.unwrap().json().await.unwrap();
        if let Some(p) = t["partial"].as_str().filter(|p| p.len() > 20) {
            partial = p.to_owned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!partial.is_empty(), "the long task streams a partial answer");
    let c: Value = http.post(format!("{}/task/{long_id}/cancel", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(c["status"], "cancelled");
    // The engine is free again: the next task completes promptly.
    let next = sync_task(&s.url, json!({"prompt": "Say yes.", "sync": true, "options": {"max_tokens": 8}})).await;
    assert!(!next["result"]["output"].as_str().unwrap().is_empty());
}
