//! The backend HTTP stack through the real `koubou serve`: HTTPS to a server whose certificate a
//! throwaway CA signed, proxies that never see loopback traffic (from a backend or from
//! `koubou submit`), and a 429 cool-down shown in `/health`. Everything listens on 127.0.0.1.

#[path = "../../koubou-backend/tests/support/mod.rs"]
mod fakes;
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fakes::proxy::RecordingProxy;
use fakes::tls::TestCa;
use fakes::{FakeServer, ollama_chat, ollama_tags, openai_models, openai_stream};
use serde_json::{Value, json};
use support::{Serve, bin};

fn write_config(home: &Path, body: &str) {
    std::fs::create_dir_all(home).unwrap();
    let cfg = format!("[pool]\nmin_workers = 1\nmax_workers = 3\ncooldown_ms = 100\n{body}");
    std::fs::write(home.join("koubou.toml"), cfg).unwrap();
}

async fn submit(url: &str, kind: &str, prompt: &str) -> String {
    let r = reqwest::Client::builder().no_proxy().build().unwrap();
    let v: Value = r
        .post(format!("{url}/task/delegate"))
        .json(&json!({"type": kind, "prompt": prompt, "max_attempts": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["task_id"].as_str().unwrap_or_else(|| panic!("no task id: {v}")).to_owned()
}

async fn get(url: &str) -> Value {
    let r = reqwest::Client::builder().no_proxy().build().unwrap();
    r.get(url).send().await.unwrap().json().await.unwrap()
}

/// Waits (generously) until the task is completed or failed.
async fn finished(url: &str, id: &str) -> Value {
    for _ in 0..1200 {
        let v = get(&format!("{url}/task/{id}/status")).await;
        if v["status"] == "completed" || v["status"] == "failed" {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("task {id} did not finish within 60 s");
}

fn secure_config(srv: &FakeServer, ca_file: Option<&Path>) -> String {
    let ca = ca_file.map(|p| format!("ca_file = {:?}\n", p.display().to_string())).unwrap_or_default();
    format!(
        "[backends.secure]\nkind = \"openai\"\nbase_url = \"{}/v1\"\napi_key_env = \"\"\nmodel = \"m\"\n{ca}\
         [types.general]\nbackend = \"secure\"\n[types.code]\nbackend = \"secure\"\n",
        srv.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backend_needs_its_ca_from_ca_file_or_ssl_cert_file() {
    let ca = TestCa::new();
    let srv = FakeServer::start_tls(
        &ca,
        vec![
            ("/v1/chat/completions", vec![openai_stream(&["over ", "tls"], Some("stop"), None, true, false)]),
            ("/v1/models", vec![openai_models(&["m"])]),
        ],
    )
    .await;

    let home = tempfile::tempdir().unwrap();
    write_config(home.path(), &secure_config(&srv, None));
    let s = Serve::start(home.path(), &[]);
    let id = submit(&s.url, "general", "hi").await;
    let v = finished(&s.url, &id).await;
    assert_eq!(v["status"], "failed", "{v}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("ca_file") && err.contains("unknown issuer"), "{err}");
    assert_eq!(v["attempts"], 1, "a certificate problem is not retried");
    drop(s);

    for (cfg, env) in [
        (secure_config(&srv, Some(&ca.ca_file)), vec![]),
        (secure_config(&srv, None), vec![("SSL_CERT_FILE", ca.ca_file.to_str().unwrap())]),
    ] {
        let home = tempfile::tempdir().unwrap();
        write_config(home.path(), &cfg);
        let s = Serve::start_with_env(home.path(), &[], &env);
        let id = submit(&s.url, "general", "hi").await;
        let v = finished(&s.url, &id).await;
        assert_eq!(
            (v["status"].as_str(), v["result"]["output"].as_str()),
            (Some("completed"), Some("over tls")),
            "{v}"
        );
        let h = get(&format!("{}/health", s.url)).await;
        assert_eq!(h["backends"][0]["up"], true, "{h}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_traffic_never_goes_through_the_environments_proxy() {
    let proxy = RecordingProxy::start().await;
    let ollama = FakeServer::start(vec![
        ("/api/chat", vec![ollama_chat("gemma2:2b", &["direct"], true)]),
        ("/api/tags", vec![ollama_tags(&["gemma2:2b"])]),
    ])
    .await;
    let proxied = FakeServer::start(vec![
        ("/v1/chat/completions", vec![openai_stream(&["proxied"], Some("stop"), None, true, false)]),
        ("/v1/models", vec![openai_models(&["m"])]),
    ])
    .await;
    let home = tempfile::tempdir().unwrap();
    write_config(
        home.path(),
        &format!(
            "[backends.local]\nkind = \"ollama\"\nurl = \"{}\"\n\
             [backends.via]\nkind = \"openai\"\nbase_url = \"{}/v1\"\napi_key_env = \"\"\nmodel = \"m\"\nproxy = \"{}\"\n\
             [types.general]\nbackend = \"local\"\n[types.code]\nbackend = \"via\"\n",
            ollama.url(),
            proxied.url(),
            proxy.url()
        ),
    );
    let p = proxy.url();
    let env = [
        ("HTTP_PROXY", p.as_str()),
        ("http_proxy", p.as_str()),
        ("HTTPS_PROXY", p.as_str()),
        ("ALL_PROXY", p.as_str()),
        ("all_proxy", p.as_str()),
    ];
    let s = Serve::start_with_env(home.path(), &[], &env);

    // `koubou submit` reaches `koubou serve` on 127.0.0.1 directly, and the task goes to the local Ollama.
    let out = Command::new(bin())
        .args(["--home"])
        .arg(home.path())
        .args(["--url", &s.url, "submit", "--type", "general", "--wait", "hello"])
        .envs(env)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "submit failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("direct"), "{stdout}");
    assert_eq!(ollama.requests_to("/api/chat").len(), 1);

    // The backend configured with `proxy` goes through it (loopback or not).
    let id = submit(&s.url, "code", "x").await;
    let v = finished(&s.url, &id).await;
    assert_eq!(v["result"]["output"], "proxied", "{v}");
    let seen = proxy.seen();
    assert!(seen.contains(&format!("POST {}/v1/chat/completions", proxied.url())), "{seen:?}");
    let stray: Vec<&String> = seen.iter().filter(|l| !l.contains(&proxied.addr.to_string())).collect();
    assert!(stray.is_empty(), "loopback traffic went through the proxy: {stray:?}");
}

/// A fake OpenAI server that refuses the first chat request with 429 + `Retry-After`, then answers;
/// it records when each request arrived (and when the refusal left).
async fn rate_limited_server(retry_after_secs: u64) -> (std::net::SocketAddr, Arc<Mutex<Vec<Instant>>>) {
    use axum::response::IntoResponse;
    let log: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let st = log.clone();
    let chat = move || {
        let st = st.clone();
        async move {
            let first = {
                let mut l = st.lock().unwrap();
                l.push(Instant::now());
                l.len() == 1
            };
            if first {
                let body = json!({"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded"}});
                let mut r = (axum::http::StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
                r.headers_mut().insert("retry-after", retry_after_secs.to_string().parse().unwrap());
                st.lock().unwrap()[0] = Instant::now();
                return r;
            }
            let chunk = |v: Value| format!("data: {v}\n\n");
            let body = [
                chunk(json!({"choices": [{"index": 0, "delta": {"content": "ok"}}]})),
                chunk(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})),
                "data: [DONE]\n\n".to_owned(),
            ]
            .concat();
            ([("content-type", "text/event-stream")], body).into_response()
        }
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(chat))
        .route("/v1/models", axum::routing::get(|| async { axum::Json(json!({"data": [{"id": "m"}]})) }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (addr, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_cools_the_backend_down_for_every_queued_task_and_health_shows_it() {
    const WAIT: Duration = Duration::from_secs(6);
    let (addr, log) = rate_limited_server(WAIT.as_secs()).await;
    let home = tempfile::tempdir().unwrap();
    write_config(
        home.path(),
        &format!(
            "[queue.retry]\nbase_ms = 100\nmax_ms = 30000\n\
             [backends.hosted]\nkind = \"openai\"\nbase_url = \"http://{addr}/v1\"\napi_key_env = \"\"\nmodel = \"m\"\nconcurrency = 1\n\
             [types.general]\nbackend = \"hosted\"\n[types.code]\nbackend = \"hosted\"\n"
        ),
    );
    let s = Serve::start(home.path(), &[]);
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(submit(&s.url, "general", &format!("task {i}")).await);
    }
    // While it cools down, /health says until when and why.
    let mut cooling = Value::Null;
    for _ in 0..200 {
        let h = get(&format!("{}/health", s.url)).await;
        cooling = h["backends"][0]["cooldown"].clone();
        if !cooling.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(cooling["reason"].as_str().is_some_and(|r| r.contains("429")), "no cool-down in /health: {cooling}");
    assert!(cooling["until"].as_str().is_some_and(|u| u.contains('T')), "{cooling}");

    for id in &ids {
        let v = finished(&s.url, id).await;
        assert_eq!(v["status"], "completed", "{v}");
    }
    let times = log.lock().unwrap().clone();
    let refused = times[0];
    assert!(times.len() >= 5, "4 tasks, one refused once: {} requests", times.len());
    for (i, t) in times.iter().enumerate().skip(1) {
        let after = t.saturating_duration_since(refused);
        assert!(after >= WAIT, "request {i} came {after:?} after the 429, inside the {WAIT:?} cool-down");
    }
    let h = get(&format!("{}/health", s.url)).await;
    assert!(h["backends"][0]["cooldown"].is_null(), "{h}");
}
