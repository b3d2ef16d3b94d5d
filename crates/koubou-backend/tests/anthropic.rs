//! The Anthropic provider against a scripted fake Messages API on 127.0.0.1.

mod support;

use koubou_backend::anthropic::AnthropicBackend;
use koubou_backend::config::{AnthropicConfig, Auth};
use koubou_backend::{Backend, BackendError, CancellationToken};
use serde_json::json;
use support::*;

const MESSAGES: &str = "/v1/messages";

fn backend(url: &str, key: Option<&str>, key_env: Option<&str>) -> AnthropicBackend {
    let cfg = AnthropicConfig {
        base_url: url.into(),
        api_key: key.map(str::to_owned),
        api_key_env: key_env.map(str::to_owned),
        model: "claude-test".into(),
        ..Default::default()
    };
    AnthropicBackend::new("claude", &cfg).unwrap()
}

async fn run(b: &AnthropicBackend) -> (Result<koubou_backend::Generation, BackendError>, Collect) {
    let sink = Collect::default();
    let mut req = request("claude-test", "capital?");
    req.system = Some("terse".into());
    (b.generate(req, &sink, CancellationToken::new()).await, sink)
}

#[tokio::test]
async fn streams_text_split_anywhere_ignores_pings_and_keeps_cache_counts() {
    let whole = anthropic_stream(&["Pa", "rís", " — 日本"], "end_turn", true);
    let n = whole.len();
    // Cut at arbitrary byte offsets, some inside multi-byte characters and inside `event:` lines.
    let replies: Vec<Reply> = [vec![], vec![1, 7, 50, 51, n / 2, n - 3], (1..n).step_by(13).collect::<Vec<_>>()]
        .iter()
        .map(|cuts| split_at(&whole, cuts))
        .collect();
    let srv = FakeServer::start(vec![(MESSAGES, replies)]).await;
    let b = backend(&srv.url(), Some("sk-ant"), None);
    for _ in 0..3 {
        let (r, sink) = run(&b).await;
        let g = r.unwrap();
        assert_eq!(g.text, "París — 日本");
        assert_eq!(sink.joined(), g.text);
        assert_eq!((g.finish_reason.as_str(), g.model.as_str()), ("stop", "claude-served"));
        assert_eq!((g.usage.prompt_tokens, g.usage.completion_tokens), (12 + 100 + 30, 3));
        assert_eq!((g.usage.cache_read_tokens, g.usage.cache_write_tokens), (Some(100), Some(30)));
    }
    let r = &srv.requests_to(MESSAGES)[0];
    assert_eq!(r.header("x-api-key").as_deref(), Some("sk-ant"));
    assert_eq!(r.header("anthropic-version").as_deref(), Some("2023-06-01"));
    assert!(r.header("authorization").is_none());
    let body = r.json();
    assert_eq!(body["system"], "terse");
    assert_eq!(body["messages"], json!([{"role": "user", "content": "capital?"}]));
    assert_eq!((body["max_tokens"].clone(), body["stream"].clone()), (json!(4096), json!(true)));
}

#[tokio::test]
async fn a_stream_without_message_stop_is_truncated_and_max_tokens_is_length() {
    let cut = split_at(&anthropic_stream(&["half"], "end_turn", false), &[]);
    let long = split_at(&anthropic_stream(&["a", "b"], "max_tokens", true), &[]);
    let srv = FakeServer::start(vec![(MESSAGES, vec![cut, long])]).await;
    let b = backend(&srv.url(), None, None);
    let (r, _) = run(&b).await;
    let e = r.unwrap_err();
    assert!(matches!(&e, BackendError::Truncated { detail, .. } if detail.contains("message_stop")), "{e}");
    assert!(e.is_retryable());
    assert_eq!(run(&b).await.0.unwrap().finish_reason, "length");
}

#[tokio::test]
async fn an_overloaded_error_event_mid_stream_is_a_retryable_rate_limit() {
    let mut s = anthropic_stream(&["par"], "end_turn", false);
    let end = s.find("event: message_delta").unwrap();
    s.truncate(end);
    s += &anthropic_event(
        "error",
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    );
    let other = anthropic_event("error", json!({"type": "error", "error": {"type": "api_error", "message": "boom"}}));
    let srv = FakeServer::start(vec![(MESSAGES, vec![split_at(&s, &[]), split_at(&other, &[])])]).await;
    let b = backend(&srv.url(), None, None);
    let e = run(&b).await.0.unwrap_err();
    assert!(
        matches!(&e, BackendError::RateLimited { status: 529, detail, .. } if detail.contains("Overloaded")),
        "{e}"
    );
    assert!(e.is_retryable());
    let e = run(&b).await.0.unwrap_err();
    assert!(matches!(&e, BackendError::Failed { detail, .. } if detail.contains("boom")), "{e}");
    assert!(e.is_retryable());
}

#[tokio::test]
async fn http_errors_name_the_key_source_and_rate_limits_carry_their_hint() {
    let err = |kind: &str, msg: &str| json!({"type": "error", "error": {"type": kind, "message": msg}});
    let srv = FakeServer::start(vec![(
        MESSAGES,
        vec![
            Reply::Json(401, err("authentication_error", "invalid x-api-key")),
            Reply::JsonWith(529, vec![], err("overloaded_error", "Overloaded")),
            Reply::JsonWith(429, vec![("retry-after", "17".into())], err("rate_limit_error", "slow down")),
            Reply::Json(404, err("not_found_error", "model: claude-nope")),
        ],
    )])
    .await;
    let b = backend(&srv.url(), None, Some("KOUBOU_TEST_SURELY_UNSET_ANTHROPIC_KEY"));
    match run(&b).await.0 {
        Err(BackendError::Rejected { status: 401, detail, .. }) => {
            assert!(
                detail.contains("$KOUBOU_TEST_SURELY_UNSET_ANTHROPIC_KEY") && detail.contains("invalid x-api-key"),
                "{detail}"
            )
        }
        other => panic!("expected a 401 rejection, got {other:?}"),
    }
    let e = run(&b).await.0.unwrap_err();
    assert!(matches!(e, BackendError::RateLimited { status: 529, retry_after: None, .. }), "{e}");
    let e = run(&b).await.0.unwrap_err();
    assert_eq!(e.retry_after(), Some(std::time::Duration::from_secs(17)), "{e}");
    assert!(matches!(run(&b).await.0, Err(BackendError::ModelMissing { .. })));
}

#[tokio::test]
async fn bearer_auth_for_servers_that_want_it_and_health_lists_models() {
    let srv = FakeServer::start(vec![
        (MESSAGES, vec![split_at(&anthropic_stream(&["ok"], "end_turn", true), &[])]),
        ("/v1/models", vec![Reply::Json(200, json!({"data": [{"id": "claude-a"}, {"id": "claude-b"}]}))]),
    ])
    .await;
    let cfg = AnthropicConfig {
        base_url: format!("{}/v1", srv.url()),
        api_key: Some("ollama-key".into()),
        auth: Auth::Bearer,
        ..Default::default()
    };
    let b = AnthropicBackend::new("cloud", &cfg).unwrap();
    assert_eq!(run(&b).await.0.unwrap().text, "ok");
    let r = &srv.requests_to(MESSAGES)[0];
    assert_eq!(r.header("authorization").as_deref(), Some("Bearer ollama-key"));
    assert!(r.header("x-api-key").is_none());
    let h = b.health().await;
    assert!(h.up, "{}", h.detail);
    assert_eq!(h.models, vec!["claude-a", "claude-b"]);
}
