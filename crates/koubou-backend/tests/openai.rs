//! The OpenAI-compatible provider against a scripted fake server on 127.0.0.1.

mod support;

use std::time::Duration;

use koubou_backend::config::OpenAiConfig;
use koubou_backend::openai::OpenAiBackend;
use koubou_backend::{Backend, BackendError, CancellationToken, GenOptions, ResponseFormat};
use serde_json::json;
use support::*;

const CHAT: &str = "/v1/chat/completions";

fn backend(srv_url: &str, key: Option<&str>) -> OpenAiBackend {
    OpenAiBackend::new(
        "oai",
        &OpenAiConfig {
            base_url: format!("{srv_url}/v1"),
            api_key: key.map(str::to_owned),
            api_key_env: None,
            model: "m".into(),
            concurrency: 2,
            ..Default::default()
        },
    )
    .unwrap()
}

async fn run(srv: &FakeServer, key: Option<&str>) -> (Result<koubou_backend::Generation, BackendError>, Collect) {
    let sink = Collect::default();
    let r = backend(&srv.url(), key).generate(request("m", "capital?"), &sink, CancellationToken::new()).await;
    (r, sink)
}

#[tokio::test]
async fn streams_content_and_uses_the_servers_usage() {
    let srv = FakeServer::start(vec![(
        CHAT,
        vec![openai_stream(&["Par", "is", "."], Some("stop"), Some((12, 3)), true, false)],
    )])
    .await;
    let sink = Collect::default();
    let mut req = request("m", "capital?");
    req.system = Some("sys".into());
    req.options =
        GenOptions { max_tokens: Some(8), temperature: Some(0.0), seed: Some(7), stop: vec!["\n".into()], top_p: None };
    let g = backend(&srv.url(), Some("sk-test")).generate(req, &sink, CancellationToken::new()).await.unwrap();
    assert_eq!(g.text, "Paris.");
    assert_eq!(sink.0.lock().unwrap().clone(), vec!["Par", "is", "."]);
    assert_eq!((g.usage.prompt_tokens, g.usage.completion_tokens), (12, 3));
    assert_eq!(g.finish_reason, "stop");
    assert_eq!(g.model, "served-model");

    let r = &srv.requests_to(CHAT)[0];
    assert_eq!(r.header("authorization").as_deref(), Some("Bearer sk-test"));
    let body = r.json();
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    assert_eq!(body["messages"], json!([{"role":"system","content":"sys"},{"role":"user","content":"capital?"}]));
    assert_eq!(
        (body["max_tokens"].clone(), body["seed"].clone(), body["stop"].clone()),
        (json!(8), json!(7), json!(["\n"]))
    );
    assert_eq!(body["temperature"], json!(0.0));
}

#[tokio::test]
async fn without_usage_counts_deltas_and_handles_crlf() {
    let srv =
        FakeServer::start(vec![(CHAT, vec![openai_stream(&["a", "b", "c", "d"], Some("length"), None, true, true)])])
            .await;
    let (r, _) = run(&srv, None).await;
    let g = r.unwrap();
    assert_eq!(g.text, "abcd");
    assert_eq!((g.usage.prompt_tokens, g.usage.completion_tokens), (0, 4));
    assert_eq!(g.finish_reason, "length");
    assert!(srv.requests_to(CHAT)[0].header("authorization").is_none(), "no key: no Authorization header");
}

#[tokio::test]
async fn stream_ending_without_done_or_finish_reason_is_truncated() {
    // Context overflow on llama-cpp-python: 200, then the stream just ends.
    let empty = Reply::Stream { content_type: "text/event-stream", chunks: vec![] };
    // Interrupted: [DONE] but no finish_reason.
    let interrupted = openai_stream(&["The cap"], None, None, true, false);
    // Cut: finish_reason but no [DONE].
    let cut = openai_stream(&["x"], Some("stop"), None, false, false);
    let srv = FakeServer::start(vec![(CHAT, vec![empty, interrupted, cut])]).await;
    for what in ["empty", "interrupted", "cut"] {
        let (r, _) = run(&srv, None).await;
        let e = r.unwrap_err();
        assert!(matches!(e, BackendError::Truncated { .. }), "{what}: {e}");
        assert!(e.is_retryable());
    }
}

#[tokio::test]
async fn error_statuses_map_to_typed_errors() {
    let srv = FakeServer::start(vec![(
        CHAT,
        vec![
            Reply::Json(
                404,
                json!({"error": {"message": "The model `gpt-9` does not exist", "code": "model_not_found"}}),
            ),
            Reply::Json(401, json!({"error": {"message": "Incorrect API key provided"}})),
            Reply::Json(429, json!({"error": {"message": "Rate limit reached"}})),
            Reply::Text(500, "Internal Server Error".into()),
            Reply::Json(400, json!({"error": {"message": "context too long", "code": "context_length_exceeded"}})),
            Reply::Json(404, json!({"detail": "Not Found"})),
        ],
    )])
    .await;
    let (r, _) = run(&srv, Some("sk-bad")).await;
    assert!(matches!(r, Err(BackendError::ModelMissing { .. })), "{r:?}");
    let (r, _) = run(&srv, Some("sk-bad")).await;
    match r {
        Err(BackendError::Rejected { status: 401, detail, .. }) => {
            assert!(detail.contains("Incorrect API key") && detail.contains("API key"), "{detail}")
        }
        other => panic!("expected Rejected 401, got {other:?}"),
    }
    let (r, _) = run(&srv, None).await;
    assert!(
        matches!(&r, Err(BackendError::RateLimited { status: 429, retry_after: None, detail, .. }) if detail.contains("Rate limit")),
        "{r:?}"
    );
    assert!(r.unwrap_err().falls_back(), "a rate limit moves to the next backend of the chain");
    let (r, _) = run(&srv, None).await;
    assert!(
        matches!(&r, Err(BackendError::Failed { detail, .. }) if detail.contains("Internal Server Error")),
        "{r:?}"
    );
    let (r, _) = run(&srv, None).await;
    assert!(matches!(&r, Err(BackendError::Rejected { status: 400, .. })), "{r:?}");
    let (r, _) = run(&srv, None).await;
    assert!(matches!(&r, Err(BackendError::Rejected { status: 404, detail, .. }) if detail.contains("/v1")), "{r:?}");
}

#[tokio::test]
async fn error_event_mid_stream_is_failed() {
    let reply = Reply::Stream {
        content_type: "text/event-stream",
        chunks: vec![b"data: {\"error\":{\"message\":\"backend crashed\"}}\n\n".to_vec()],
    };
    let srv = FakeServer::start(vec![(CHAT, vec![reply])]).await;
    let (r, _) = run(&srv, None).await;
    assert!(matches!(&r, Err(BackendError::Failed { detail, .. }) if detail == "backend crashed"), "{r:?}");
}

#[tokio::test]
async fn refused_is_unreachable() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let e = backend(&url, None)
        .generate(request("m", "p"), &Collect::default(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(e, BackendError::Unreachable { .. }), "{e}");
    assert!(e.falls_back());
    assert!(!backend(&url, None).health().await.up);
}

#[tokio::test]
async fn cancel_returns_promptly_when_the_server_never_answers() {
    let srv = FakeServer::start(vec![(CHAT, vec![Reply::Hang]), ("/v1/models", vec![Reply::Hang])]).await;
    let cancel = CancellationToken::new();
    cancel_after(&cancel, Duration::from_millis(200));
    let b = backend(&srv.url(), None);
    let e = within("generate", b.generate(request("m", "p"), &Collect::default(), cancel)).await.unwrap_err();
    assert!(matches!(e, BackendError::Cancelled), "{e}");
    let h = within("health", b.health()).await;
    assert!(!h.up && h.detail.contains("did not answer"), "{}", h.detail);
}

#[tokio::test]
async fn health_lists_models_and_reports_bad_keys() {
    let srv = FakeServer::start(vec![(
        "/v1/models",
        vec![
            openai_models(&["smollm2-135m-instruct", "other"]),
            Reply::Json(401, json!({"error": {"message": "bad key"}})),
        ],
    )])
    .await;
    let b = backend(&srv.url(), Some("k"));
    let h = b.health().await;
    assert!(h.up, "{}", h.detail);
    assert_eq!(h.models, vec!["smollm2-135m-instruct", "other"]);
    assert_eq!(srv.requests_to("/v1/models")[0].header("authorization").as_deref(), Some("Bearer k"));
    let h = b.health().await;
    assert!(!h.up && h.detail.contains("bad key"), "{}", h.detail);
}

#[tokio::test]
async fn dialect_options_arrive_as_configured() {
    let srv = FakeServer::start(vec![(CHAT, vec![openai_stream(&["az"], Some("stop"), None, true, false)])]).await;
    let cfg = OpenAiConfig {
        base_url: format!("{}/v1", srv.url()),
        api_key: Some("azure-key".into()),
        api_key_env: None,
        auth: koubou_backend::config::Auth::ApiKey,
        headers: [
            ("X-Title".to_owned(), "Koubou".to_owned()),
            ("HTTP-Referer".to_owned(), "https://k.example".to_owned()),
        ]
        .into(),
        query: [("api-version".to_owned(), "2024-10-21".to_owned())].into(),
        max_tokens_field: "max_completion_tokens".into(),
        extra_body: serde_json::from_value(json!({"reasoning_effort": "low", "user": "koubou"})).unwrap(),
        ..Default::default()
    };
    let b = OpenAiBackend::new("azure", &cfg).unwrap();
    let mut req = request("m", "hi");
    req.options.max_tokens = Some(11);
    b.generate(req, &Collect::default(), CancellationToken::new()).await.unwrap();
    let r = &srv.requests_to(CHAT)[0];
    assert_eq!(r.query, "api-version=2024-10-21");
    assert_eq!(r.header("api-key").as_deref(), Some("azure-key"));
    assert!(r.header("authorization").is_none());
    assert_eq!(r.header("x-title").as_deref(), Some("Koubou"));
    assert_eq!(r.header("http-referer").as_deref(), Some("https://k.example"));
    let body = r.json();
    assert_eq!((body["max_completion_tokens"].clone(), body.get("max_tokens")), (json!(11), None));
    assert_eq!((body["reasoning_effort"].clone(), body["user"].clone()), (json!("low"), json!("koubou")));
}

/// A server like Mistral's: any unknown field, `stream_options` included, is a 422.
async fn strict_server() -> std::net::SocketAddr {
    use axum::{Json, response::IntoResponse};
    async fn chat(Json(body): Json<serde_json::Value>) -> axum::response::Response {
        if let Some(extra) = body
            .as_object()
            .and_then(|o| o.keys().find(|k| !["model", "messages", "stream", "max_tokens"].contains(&k.as_str())))
        {
            let detail = json!({"detail": [{"type": "extra_forbidden", "loc": ["body", extra], "msg": "Extra inputs are not permitted"}]});
            return (
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"object": "error", "message": detail, "type": "invalid_request_error"})),
            )
                .into_response();
        }
        let chunk = |v: serde_json::Value| format!("data: {v}\n\n");
        let body = [
            chunk(json!({"choices": [{"index": 0, "delta": {"content": "bonjour"}}]})),
            chunk(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 4, "completion_tokens": 1}})),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat();
        ([("content-type", "text/event-stream")], body).into_response()
    }
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(chat));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

#[tokio::test]
async fn stream_usage_false_works_with_servers_that_refuse_unknown_fields() {
    let addr = strict_server().await;
    let cfg = |stream_usage| OpenAiConfig {
        base_url: format!("http://{addr}/v1"),
        api_key_env: None,
        stream_usage,
        ..Default::default()
    };
    let e = OpenAiBackend::new("mistral", &cfg(true))
        .unwrap()
        .generate(request("m", "hi"), &Collect::default(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BackendError::Rejected { status: 422, detail, .. } if detail.contains("stream_options")),
        "{e}"
    );
    let g = OpenAiBackend::new("mistral", &cfg(false))
        .unwrap()
        .generate(request("m", "hi"), &Collect::default(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((g.text.as_str(), g.usage.prompt_tokens), ("bonjour", 4), "usage still read from the last chunk");
}

#[tokio::test]
async fn rate_limits_are_typed_with_their_hint() {
    let limit = |status, headers: Vec<(&'static str, String)>| {
        Reply::JsonWith(status, headers, json!({"error": {"message": "slow down"}}))
    };
    let srv = FakeServer::start(vec![(
        CHAT,
        vec![
            limit(429, vec![("retry-after", "3".into())]),
            limit(429, vec![("retry-after-ms", "1500".into()), ("retry-after", "9".into())]),
            limit(503, vec![("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT".into())]),
            limit(503, vec![]),
        ],
    )])
    .await;
    let (r, _) = run(&srv, None).await;
    assert_eq!(r.unwrap_err().retry_after(), Some(Duration::from_secs(3)));
    let (r, _) = run(&srv, None).await;
    assert_eq!(r.unwrap_err().retry_after(), Some(Duration::from_millis(1500)));
    let (r, _) = run(&srv, None).await;
    assert!(matches!(r, Err(BackendError::RateLimited { status: 503, retry_after: Some(d), .. }) if d.is_zero()));
    let (r, _) = run(&srv, None).await;
    assert!(matches!(&r, Err(BackendError::Failed { .. })), "a 503 that asks for no wait is a plain failure: {r:?}");
}

#[tokio::test]
async fn structured_output_is_sent_as_response_format() {
    let answer = openai_stream(&["{}"], Some("stop"), Some((1, 1)), true, false);
    let srv = FakeServer::start(vec![(CHAT, vec![answer])]).await;
    let b = backend(&srv.url(), None);
    let schema = json!({"title": "Reply", "type": "object", "properties": {"a": {"type": "string"}}});
    for format in [None, Some(ResponseFormat::Json), Some(ResponseFormat::Schema(schema.clone()))] {
        let mut req = request("m", "p");
        req.response_format = format;
        b.generate(req, &Collect::default(), CancellationToken::new()).await.unwrap();
    }
    let sent: Vec<_> = srv.requests_to(CHAT).iter().map(|r| r.json()["response_format"].clone()).collect();
    assert_eq!(
        sent,
        [
            serde_json::Value::Null,
            json!({"type": "json_object"}),
            json!({"type": "json_schema", "json_schema": {"name": "Reply", "schema": schema}}),
        ]
    );
}
