//! HTTPS and proxies for the HTTP providers: a fake server whose certificate a throwaway CA
//! signed, and a recording proxy, all on 127.0.0.1.

mod support;

use koubou_backend::config::{AnthropicConfig, OllamaConfig, OpenAiConfig};
use koubou_backend::ollama::OllamaBackend;
use koubou_backend::openai::OpenAiBackend;
use koubou_backend::{Backend, BackendError, CancellationToken};
use support::proxy::RecordingProxy;
use support::tls::TestCa;
use support::*;

const CHAT: &str = "/v1/chat/completions";

fn openai(base: String, ca_file: Option<&std::path::Path>, proxy: Option<String>) -> OpenAiBackend {
    let cfg = OpenAiConfig {
        base_url: base,
        api_key_env: None,
        ca_file: ca_file.map(ToOwned::to_owned),
        proxy,
        ..Default::default()
    };
    OpenAiBackend::new("hosted", &cfg).unwrap()
}

async fn ask(b: &dyn Backend) -> Result<koubou_backend::Generation, BackendError> {
    b.generate(request("m", "hello"), &Collect::default(), CancellationToken::new()).await
}

#[tokio::test]
async fn https_with_an_unknown_ca_fails_naming_ca_file_and_streams_once_it_is_set() {
    let ca = TestCa::new();
    let srv = FakeServer::start_tls(
        &ca,
        vec![
            (CHAT, vec![openai_stream(&["se", "cure"], Some("stop"), Some((3, 2)), true, false)]),
            ("/v1/models", vec![openai_models(&["m"])]),
        ],
    )
    .await;
    assert!(srv.url().starts_with("https://127.0.0.1:"));
    let base = format!("{}/v1", srv.url());

    let untrusting = openai(base.clone(), None, Some("none".into()));
    let e = ask(&untrusting).await.unwrap_err();
    match &e {
        BackendError::Config { detail, .. } => {
            assert!(detail.contains("ca_file") && detail.contains("unknown issuer"), "{detail}")
        }
        other => panic!("expected a configuration error naming ca_file, got {other:?}"),
    }
    assert!(!e.is_retryable() && e.falls_back());
    let h = untrusting.health().await;
    assert!(!h.up && h.detail.contains("ca_file"), "{}", h.detail);
    assert!(srv.requests().is_empty(), "nothing was sent over an unverified connection");

    let trusting = openai(base, Some(&ca.ca_file), Some("none".into()));
    let g = ask(&trusting).await.unwrap();
    assert_eq!((g.text.as_str(), g.usage.prompt_tokens), ("secure", 3));
    let h = trusting.health().await;
    assert!(h.up, "{}", h.detail);
    // A second request reuses the setup (and, after a broken answer, a fresh pool from it).
    assert_eq!(ask(&trusting).await.unwrap().text, "secure");
}

#[tokio::test]
async fn localhost_names_are_verified_too() {
    let ca = TestCa::new();
    let srv = FakeServer::start_tls(&ca, vec![("/api/chat", vec![ollama_chat("gemma2:2b", &["ok"], true)])]).await;
    let cfg = OllamaConfig {
        url: Some(format!("https://localhost:{}", srv.addr.port())),
        ca_file: Some(ca.ca_file.clone()),
        ..Default::default()
    };
    let b = OllamaBackend::new("ollama", &cfg).unwrap();
    assert_eq!(ask(&b).await.unwrap().text, "ok");
}

#[tokio::test]
async fn a_backend_with_its_own_proxy_goes_through_it_even_to_loopback() {
    let proxy = RecordingProxy::start().await;
    let plain = FakeServer::start(vec![(CHAT, vec![openai_stream(&["via"], Some("stop"), None, true, false)])]).await;
    let b = openai(format!("{}/v1", plain.url()), None, Some(proxy.url()));
    assert_eq!(ask(&b).await.unwrap().text, "via");
    assert_eq!(proxy.seen(), vec![format!("POST {}{CHAT}", plain.url())], "forwarded in absolute form");

    // HTTPS through the proxy: a CONNECT tunnel, TLS end to end.
    let ca = TestCa::new();
    let secure =
        FakeServer::start_tls(&ca, vec![(CHAT, vec![openai_stream(&["tun"], Some("stop"), None, true, false)])]).await;
    let b = openai(format!("{}/v1", secure.url()), Some(&ca.ca_file), Some(proxy.url()));
    assert_eq!(ask(&b).await.unwrap().text, "tun");
    assert_eq!(proxy.seen().last().cloned(), Some(format!("CONNECT {}", secure.addr)));

    // `proxy = "none"` goes direct.
    let before = proxy.seen().len();
    let b = openai(format!("{}/v1", plain.url()), None, Some("none".into()));
    assert_eq!(ask(&b).await.unwrap().text, "via");
    assert_eq!(proxy.seen().len(), before);
}

#[tokio::test]
async fn a_proxy_that_refuses_is_unreachable_and_says_so() {
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let b = openai("http://api.example.invalid/v1".into(), None, Some(dead.clone()));
    let e = ask(&b).await.unwrap_err();
    assert!(matches!(&e, BackendError::Unreachable { detail, .. } if detail.contains("through proxy")), "{e}");
}

#[test]
fn bad_ca_file_or_proxy_is_a_configuration_error_at_build_time() {
    let missing = OpenAiConfig { ca_file: Some("/nonexistent/ca.pem".into()), ..Default::default() };
    let e = OpenAiBackend::new("x", &missing).err().unwrap();
    assert!(matches!(&e, BackendError::Config { detail, .. } if detail.contains("ca_file")), "{e}");
    let proxy = AnthropicConfig { proxy: Some("gopher://x".into()), ..Default::default() };
    let e = koubou_backend::build("x", &koubou_backend::BackendConfig::Anthropic(proxy)).err().unwrap();
    assert!(e.to_string().contains("proxy"), "{e}");
}
