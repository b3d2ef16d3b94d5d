//! The Ollama provider against a scripted fake Ollama on 127.0.0.1.

mod support;

use std::time::Duration;

use koubou_backend::config::OllamaConfig;
use koubou_backend::ollama::{self, OllamaBackend, PullProgress};
use koubou_backend::{Backend, BackendError, CancellationToken, GenOptions, ResponseFormat};
use serde_json::json;
use support::*;

fn backend(url: &str) -> OllamaBackend {
    OllamaBackend::new(
        "ollama",
        &OllamaConfig { url: Some(url.into()), keep_alive: Some("1m".into()), ..Default::default() },
    )
    .unwrap()
}

#[tokio::test]
async fn streams_tokens_and_reads_usage_from_the_done_line() {
    let srv =
        FakeServer::start(vec![("/api/chat", vec![ollama_chat("gemma2:2b", &["Hel", "lo ", "日本"], true)])]).await;
    let sink = Collect::default();
    let mut req = request("gemma2:2b", "say hi");
    req.system = Some("be brief".into());
    req.options = GenOptions { max_tokens: Some(5), temperature: Some(0.0), ..Default::default() };
    let g = backend(&srv.url()).generate(req, &sink, CancellationToken::new()).await.unwrap();
    assert_eq!(g.text, "Hello 日本");
    assert_eq!(sink.0.lock().unwrap().clone(), vec!["Hel", "lo ", "日本"]);
    assert_eq!((g.usage.prompt_tokens, g.usage.completion_tokens), (26, 3));
    assert_eq!(g.finish_reason, "stop");
    assert_eq!(g.model, "gemma2:2b");

    let sent = srv.requests_to("/api/chat")[0].json();
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["keep_alive"], "1m");
    assert_eq!(sent["messages"], json!([{"role":"system","content":"be brief"},{"role":"user","content":"say hi"}]));
    assert_eq!(sent["options"], json!({"temperature": 0.0, "num_predict": 5}));
}

#[tokio::test]
async fn stream_cut_before_done_is_truncated() {
    let srv = FakeServer::start(vec![("/api/chat", vec![ollama_chat("m", &["par", "tial"], false)])]).await;
    let sink = Collect::default();
    let e = backend(&srv.url()).generate(request("m", "p"), &sink, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(e, BackendError::Truncated { .. }), "{e}");
    assert_eq!(sink.joined(), "partial");
}

#[tokio::test]
async fn last_line_cut_mid_json_is_truncated() {
    let reply = Reply::Stream {
        content_type: "application/x-ndjson",
        chunks: vec![b"{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"message\":{\"con".to_vec()],
    };
    let srv = FakeServer::start(vec![("/api/chat", vec![reply])]).await;
    let e = backend(&srv.url())
        .generate(request("m", "p"), &Collect::default(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Truncated { .. }), "{e}");
}

#[tokio::test]
async fn error_line_mid_stream_is_failed() {
    let reply = Reply::Stream {
        content_type: "application/x-ndjson",
        chunks: vec![
            b"{\"message\":{\"content\":\"a\"},\"done\":false}\r\n".to_vec(),
            b"{\"error\":\"an error was encountered while running the model: out of memory\"}\n".to_vec(),
        ],
    };
    let srv = FakeServer::start(vec![("/api/chat", vec![reply])]).await;
    let e = backend(&srv.url())
        .generate(request("m", "p"), &Collect::default(), CancellationToken::new())
        .await
        .unwrap_err();
    match e {
        BackendError::Failed { detail, .. } => assert!(detail.contains("out of memory"), "{detail}"),
        other => panic!("expected Failed, got {other}"),
    }
}

#[tokio::test]
async fn missing_model_says_how_to_pull_it() {
    let body = json!({"error": "model \"qwen9:99b\" not found, try pulling it first"});
    let srv = FakeServer::start(vec![("/api/chat", vec![Reply::Json(404, body)])]).await;
    let e = backend(&srv.url())
        .generate(request("qwen9:99b", "p"), &Collect::default(), CancellationToken::new())
        .await
        .unwrap_err();
    match &e {
        BackendError::ModelMissing { model, hint, .. } => {
            assert_eq!(model, "qwen9:99b");
            assert!(hint.contains("ollama pull qwen9:99b"), "{hint}");
        }
        other => panic!("expected ModelMissing, got {other}"),
    }
    assert!(e.falls_back());
}

#[tokio::test]
async fn http_errors_map_to_rejected_and_failed() {
    let srv = FakeServer::start(vec![(
        "/api/chat",
        vec![Reply::Json(400, json!({"error": "invalid options"})), Reply::Text(500, "Internal Server Error".into())],
    )])
    .await;
    let b = backend(&srv.url());
    let e = b.generate(request("m", "p"), &Collect::default(), CancellationToken::new()).await.unwrap_err();
    assert!(matches!(&e, BackendError::Rejected { status: 400, detail, .. } if detail == "invalid options"), "{e}");
    assert!(!e.is_retryable());
    let e = b.generate(request("m", "p"), &Collect::default(), CancellationToken::new()).await.unwrap_err();
    assert!(matches!(&e, BackendError::Failed { detail, .. } if detail.contains("500")), "{e}");
    assert!(e.is_retryable());
}

#[tokio::test]
async fn refused_connection_is_unreachable_and_says_ollama_serve() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let e = backend(&url).generate(request("m", "p"), &Collect::default(), CancellationToken::new()).await.unwrap_err();
    match &e {
        BackendError::Unreachable { detail, .. } => assert!(detail.contains("ollama serve"), "{detail}"),
        other => panic!("expected Unreachable, got {other}"),
    }
    let h = backend(&url).health().await;
    assert!(!h.up);
    assert!(h.detail.contains("ollama serve"), "{}", h.detail);
}

#[tokio::test]
async fn cancel_returns_promptly_from_a_server_that_never_answers() {
    let srv = FakeServer::start(vec![("/api/chat", vec![Reply::Hang])]).await;
    let cancel = CancellationToken::new();
    cancel_after(&cancel, Duration::from_millis(200));
    let b = backend(&srv.url());
    let e = within("generate", b.generate(request("m", "p"), &Collect::default(), cancel)).await.unwrap_err();
    assert!(matches!(e, BackendError::Cancelled), "{e}");
}

#[tokio::test]
async fn cancel_returns_promptly_mid_stream() {
    let mut reply = ollama_chat("m", &["a", "b"], false);
    if let Reply::Stream { content_type, chunks } = reply {
        reply = Reply::StreamThenHang { content_type, chunks };
    }
    let srv = FakeServer::start(vec![("/api/chat", vec![reply])]).await;
    let cancel = CancellationToken::new();
    cancel_after(&cancel, Duration::from_millis(300));
    let sink = Collect::default();
    let e = within("generate", backend(&srv.url()).generate(request("m", "p"), &sink, cancel)).await.unwrap_err();
    assert!(matches!(e, BackendError::Cancelled), "{e}");
    assert_eq!(sink.joined(), "ab");
}

#[tokio::test]
async fn health_lists_models_and_notes_a_missing_default() {
    let srv = FakeServer::start(vec![("/api/tags", vec![ollama_tags(&["gemma2:2b", "llama3:latest"])])]).await;
    let h = backend(&srv.url()).health().await;
    assert!(h.up, "{}", h.detail);
    assert_eq!(h.models, vec!["gemma2:2b", "llama3:latest"]);
    assert!(!h.detail.contains("not pulled"), "{}", h.detail);

    let srv = FakeServer::start(vec![("/api/tags", vec![ollama_tags(&["llama3:latest"])])]).await;
    let h = backend(&srv.url()).health().await;
    assert!(h.up);
    assert!(h.detail.contains("ollama pull gemma2:2b"), "{}", h.detail);
}

#[tokio::test]
async fn health_is_down_when_the_server_hangs() {
    let srv = FakeServer::start(vec![("/api/tags", vec![Reply::Hang])]).await;
    let h = within("health", backend(&srv.url()).health()).await;
    assert!(!h.up);
    assert!(h.detail.contains("did not answer"), "{}", h.detail);
}

#[tokio::test]
async fn pull_reports_progress_until_success() {
    let lines = [
        json!({"status": "pulling manifest"}),
        json!({"status": "pulling 6a0746a1ec1a", "digest": "sha256:6a07", "total": 100, "completed": 40}),
        json!({"status": "pulling 6a0746a1ec1a", "digest": "sha256:6a07", "total": 100, "completed": 100}),
        json!({"status": "verifying sha256 digest"}),
        json!({"status": "success"}),
    ];
    let chunks = lines.iter().map(|l| format!("{l}\n").into_bytes()).collect();
    let srv =
        FakeServer::start(vec![("/api/pull", vec![Reply::Stream { content_type: "application/x-ndjson", chunks }])])
            .await;
    let seen = std::sync::Mutex::new(Vec::<PullProgress>::new());
    ollama::pull(&srv.url(), "gemma2:2b", |p| seen.lock().unwrap().push(p)).await.unwrap();
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[1].completed, Some(40));
    assert_eq!(seen[1].total, Some(100));
    assert_eq!(seen[4].status, "success");
    assert_eq!(srv.requests_to("/api/pull")[0].json(), json!({"model": "gemma2:2b", "stream": true}));
}

#[tokio::test]
async fn pull_of_an_unknown_model_is_model_missing() {
    let chunks = vec![
        format!("{}\n", json!({"status": "pulling manifest"})).into_bytes(),
        format!("{}\n", json!({"error": "pull model manifest: file does not exist"})).into_bytes(),
    ];
    let srv =
        FakeServer::start(vec![("/api/pull", vec![Reply::Stream { content_type: "application/x-ndjson", chunks }])])
            .await;
    let e = ollama::pull(&srv.url(), "nope:1b", |_| {}).await.unwrap_err();
    assert!(matches!(e, BackendError::ModelMissing { .. }), "{e}");

    let chunks = vec![format!("{}\n", json!({"status": "pulling manifest"})).into_bytes()];
    let srv =
        FakeServer::start(vec![("/api/pull", vec![Reply::Stream { content_type: "application/x-ndjson", chunks }])])
            .await;
    let e = ollama::pull(&srv.url(), "x", |_| {}).await.unwrap_err();
    assert!(matches!(e, BackendError::Truncated { .. }), "{e}");
}

#[tokio::test]
async fn num_ctx_per_backend_and_per_request_and_a_warning_when_the_prompt_fills_it() {
    let mut full = ollama_chat("gemma2:2b", &["x"], true);
    if let Reply::Stream { chunks, .. } = &mut full {
        let last = chunks.pop().unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&last).unwrap();
        v["prompt_eval_count"] = json!(2048);
        chunks.push(format!("{v}\n").into_bytes());
    }
    let srv = FakeServer::start(vec![("/api/chat", vec![ollama_chat("gemma2:2b", &["ok"], true), full])]).await;
    let cfg = OllamaConfig { url: Some(srv.url()), num_ctx: Some(2048), ..Default::default() };
    let b = OllamaBackend::new("ollama", &cfg).unwrap();
    let g = b.generate(request("gemma2:2b", "short"), &Collect::default(), CancellationToken::new()).await.unwrap();
    assert!(g.warnings.is_empty(), "{:?}", g.warnings);
    let mut per_type = request("gemma2:2b", "long");
    per_type.num_ctx = Some(2048);
    let g = b.generate(per_type, &Collect::default(), CancellationToken::new()).await.unwrap();
    assert_eq!(g.warnings.len(), 1, "{:?}", g.warnings);
    assert!(g.warnings[0].contains("num_ctx = 2048"), "{}", g.warnings[0]);
    let sent: Vec<_> = srv.requests_to("/api/chat").iter().map(|r| r.json()["options"]["num_ctx"].clone()).collect();
    assert_eq!(sent, vec![json!(2048), json!(2048)]);
    let mut bigger = request("gemma2:2b", "x");
    bigger.num_ctx = Some(32768);
    b.generate(bigger, &Collect::default(), CancellationToken::new()).await.unwrap();
    assert_eq!(srv.requests_to("/api/chat")[2].json()["options"]["num_ctx"], 32768, "the type's num_ctx wins");
}

#[tokio::test]
async fn structured_output_is_sent_as_format() {
    let srv = FakeServer::start(vec![("/api/chat", vec![ollama_chat("m", &["{}"], true)])]).await;
    let b = backend(&srv.url());
    let schema = json!({"type": "object", "required": ["a"]});
    for format in [None, Some(ResponseFormat::Json), Some(ResponseFormat::Schema(schema.clone()))] {
        let mut req = request("m", "p");
        req.response_format = format;
        b.generate(req, &Collect::default(), CancellationToken::new()).await.unwrap();
    }
    let sent: Vec<_> = srv.requests_to("/api/chat").iter().map(|r| r.json().get("format").cloned()).collect();
    assert_eq!(sent, [None, Some(json!("json")), Some(schema)]);
}

#[tokio::test]
async fn a_busy_server_is_rate_limited_and_falls_back() {
    let srv = FakeServer::start(vec![("/api/chat", vec![Reply::Json(503, json!({"error": "server busy"}))])]).await;
    let e = backend(&srv.url()).generate(request("m", "p"), &Collect::default(), CancellationToken::new()).await;
    let e = e.unwrap_err();
    assert!(matches!(&e, BackendError::RateLimited { status: 503, retry_after: None, .. }) && e.falls_back(), "{e}");
}
