//! Routing through the real `koubou serve`: the local-only guarantee (a remote route refused at
//! start, confidential work kept off the remote backend), a fallback chain of three, cost from
//! usage × prices in the task and in /metrics, and structured output (a non-JSON answer fails
//! the attempt and is retried).
//!
//! The backends are fake OpenAI-compatible servers (and one fake Ollama) on 127.0.0.1 that
//! record every request. The
//! "remote" one is marked `remote = true` in the config (its address is loopback, so the test
//! stays offline): that is exactly how Koubou decides, and the fake must record no request of
//! confidential work.

#[path = "../../koubou-backend/tests/support/mod.rs"]
mod fakes;
mod support;

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, response::IntoResponse};
use serde_json::{Value, json};
use support::Serve;

/// What a scripted fake answers to one request.
#[derive(Clone, Debug)]
enum Reply {
    /// Streams this text, then `usage` (prompt, completion, cached) and `[DONE]`.
    Answer(&'static str, (u64, u64, u64)),
    /// An error status with an OpenAI-style body.
    Status(u16),
}

#[derive(Clone)]
struct Fake {
    replies: Arc<Vec<Reply>>,
    /// Bodies of the chat requests received, in order.
    seen: Arc<Mutex<Vec<Value>>>,
}

impl Fake {
    /// Answers the n-th request with `replies[n]` (the last one repeats).
    async fn start(replies: Vec<Reply>) -> (Fake, SocketAddr) {
        let f = Fake { replies: Arc::new(replies), seen: Arc::default() };
        let app = Router::new()
            .route("/v1/chat/completions", axum::routing::post(chat))
            .route("/v1/models", axum::routing::get(|| async { Json(json!({"data": [{"id": "fake"}]})) }))
            .with_state(f.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        (f, addr)
    }

    fn requests(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }
}

async fn chat(State(f): State<Fake>, Json(body): Json<Value>) -> axum::response::Response {
    let n = {
        let mut seen = f.seen.lock().unwrap();
        seen.push(body);
        seen.len() - 1
    };
    match f.replies[n.min(f.replies.len() - 1)].clone() {
        Reply::Status(status) => {
            let code = axum::http::StatusCode::from_u16(status).unwrap();
            (code, Json(json!({"error": {"message": format!("fake says {status}")}}))).into_response()
        }
        Reply::Answer(text, (p, c, cached)) => {
            let events = [
                json!({"choices": [{"index": 0, "delta": {"content": text}}]}),
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
                json!({"choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c,
                       "prompt_tokens_details": {"cached_tokens": cached}}}),
            ];
            let mut sse: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
            sse.push_str("data: [DONE]\n\n");
            ([("content-type", "text/event-stream")], sse).into_response()
        }
    }
}

/// A port nothing listens on (bound, then closed).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn openai(name: &str, addr: &str, extra: &str) -> String {
    format!(
        "[backends.{name}]\nkind = \"openai\"\nbase_url = \"http://{addr}/v1\"\nmodel = \"{name}-model\"\n\
         api_key_env = \"\"\nconcurrency = 2\n{extra}\n"
    )
}

fn write_home(dir: &Path, body: &str) {
    let cfg = format!(
        "[pool]\nmin_workers = 1\nmax_workers = 2\n[queue.retry]\nbase_ms = 50\nmax_ms = 100\njitter = 0.0\n{body}"
    );
    std::fs::write(dir.join("koubou.toml"), cfg).unwrap();
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn get(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// Polls the task until it is finished (completed, failed or cancelled), for up to a minute.
async fn finished(url: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = get(&format!("{url}/task/{id}/status")).await;
        if ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(Instant::now() < deadline, "task {id} did not finish: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn submit(url: &str, body: Value) -> String {
    let (code, v) = post(&format!("{url}/task/delegate"), body).await;
    assert_eq!(code, 200, "{v}");
    v["task_id"].as_str().unwrap().to_owned()
}

/// `koubou serve` on this home must refuse to start, saying `words`.
fn refused_at_start(home: &Path, words: &[&str]) {
    let err = support::refused(home, &["serve", "--port", "0", "--ws-port", "0", "--graphql-port", "0"], &[]);
    for w in words {
        assert!(err.contains(w), "the refusal should say {w:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_route_without_allow_remote_is_refused_at_start() {
    let (remote, addr) = Fake::start(vec![Reply::Answer("x", (1, 1, 0))]).await;
    let home = tempfile::tempdir().unwrap();
    let paid = openai("paid", &addr.to_string(), "remote = true");
    let local = openai("local", &addr.to_string(), "");
    // A type routed to the remote backend.
    write_home(home.path(), &format!("{paid}{local}[types.general]\nbackend = \"paid\"\n"));
    refused_at_start(home.path(), &["allow_remote", "[types.general]", "paid"]);
    // A type whose fallback is remote.
    write_home(home.path(), &format!("{paid}{local}[types.general]\nbackend = \"local\"\nfallback = [\"paid\"]\n"));
    refused_at_start(home.path(), &["allow_remote", "paid"]);
    // (That a host beyond loopback is remote without anyone saying so is checked by
    // koubou-backend's unit tests: this test sends nothing off loopback, even by mistake.)
    assert!(remote.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confidential_work_never_reaches_the_remote_backend() {
    let (remote, raddr) = Fake::start(vec![Reply::Answer("remote answer", (10, 5, 0))]).await;
    let (local, laddr) = Fake::start(vec![Reply::Answer("local answer", (10, 5, 0))]).await;
    let home = tempfile::tempdir().unwrap();
    let body = format!(
        "{}{}[types.general]\nbackend = \"paid\"\nfallback = \"local\"\nallow_remote = true\n\
         [types.cloud]\nbackend = \"paid\"\nallow_remote = true\n\
         [types.secret]\nbackend = \"paid\"\nfallback = [\"local\"]\nallow_remote = true\nconfidential = true\n\
         [types.code]\nbackend = \"local\"\n",
        openai("paid", &raddr.to_string(), "remote = true\nprice_input_per_mtok = 1.0"),
        openai("local", &laddr.to_string(), ""),
    );
    write_home(home.path(), &body);
    let s = Serve::start(home.path(), &[]);

    // Tagged confidential on a type whose chain starts remote: runs on the local backend.
    let id = submit(&s.url, json!({"prompt": "tagged secret", "tags": ["Confidential"]})).await;
    let v = finished(&s.url, &id).await;
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!((v["backend"].as_str(), v["remote"].as_bool()), (Some("local"), Some(false)), "{v}");
    assert_eq!(v["result"]["output"], "local answer");
    assert_eq!(v["tags"], json!(["confidential"]));
    // A type that is confidential itself: the same.
    let id = submit(&s.url, json!({"type": "secret", "prompt": "typed secret"})).await;
    assert_eq!(finished(&s.url, &id).await["backend"], "local");
    // No local backend in the chain: refused, naming the tags.
    let (code, v) =
        post(&format!("{}/task/delegate", s.url), json!({"type": "cloud", "prompt": "x", "tags": ["confidential"]}))
            .await;
    assert_eq!((code, v["error"]["field"].as_str()), (400, Some("tags")), "{v}");
    // Pinning the remote backend: refused, naming `backend` (also on the type that is remote first).
    for body in [
        json!({"prompt": "x", "tags": ["confidential"], "backend": "paid"}),
        json!({"type": "code", "prompt": "x", "tags": ["confidential"], "backend": "paid"}),
        json!({"type": "secret", "prompt": "x", "backend": "paid"}),
    ] {
        let (code, v) = post(&format!("{}/task/delegate", s.url), body.clone()).await;
        assert_eq!((code, v["error"]["field"].as_str()), (400, Some("backend")), "{body}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("confidential"), "{v}");
    }
    // A type without allow_remote may not pin the remote backend either.
    let (code, v) =
        post(&format!("{}/task/delegate", s.url), json!({"type": "code", "prompt": "x", "backend": "paid"})).await;
    assert_eq!((code, v["error"]["field"].as_str()), (400, Some("backend")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("allow_remote"), "{v}");

    assert!(remote.requests().is_empty(), "the remote fake saw confidential work: {:?}", remote.requests());
    assert_eq!(local.requests().len(), 2);

    // Work that is not confidential goes remote where the type allows it, and says so.
    let id = submit(&s.url, json!({"prompt": "public"})).await;
    let v = finished(&s.url, &id).await;
    assert_eq!((v["backend"].as_str(), v["remote"].as_bool()), (Some("paid"), Some(true)), "{v}");
    assert_eq!(remote.requests().len(), 1);
    // The tag filter finds the confidential ones.
    let page = get(&format!("{}/tasks?tag=confidential", s.url)).await;
    assert_eq!(page["total"], 1, "{page}");
    // /health says which backend is remote.
    let h = get(&format!("{}/health", s.url)).await;
    let paid = h["backends"].as_array().unwrap().iter().find(|b| b["name"] == "paid").unwrap();
    assert_eq!(paid["remote"], true);
    assert!(h["routes"]["general"].as_str().unwrap().contains("[remote]"), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_chain_of_three_ends_on_the_one_that_answers_and_costs_are_counted() {
    let (busy, baddr) = Fake::start(vec![Reply::Status(429)]).await;
    let (third, taddr) = Fake::start(vec![Reply::Answer("third answers", (1_000_000, 200_000, 400_000))]).await;
    let home = tempfile::tempdir().unwrap();
    let down = format!("127.0.0.1:{}", closed_port());
    let body = format!(
        "{}{}{}[types.general]\nbackend = \"first\"\nfallback = [\"second\", \"third\"]\n\
         [pricing]\nreference = \"third\"\n",
        openai("first", &down, ""),
        openai("second", &baddr.to_string(), ""),
        openai(
            "third",
            &taddr.to_string(),
            "price_input_per_mtok = 2.0\nprice_output_per_mtok = 10.0\nprice_cached_input_per_mtok = 0.5"
        ),
    );
    write_home(home.path(), &body);
    let s = Serve::start(home.path(), &[]);
    let id = submit(&s.url, json!({"prompt": "who answers?"})).await;
    let v = finished(&s.url, &id).await;
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!((v["backend"].as_str(), v["model"].as_str()), (Some("third"), Some("third-model")), "{v}");
    assert_eq!(v["attempts"], 1, "the chain is walked within one attempt");
    assert_eq!(busy.requests().len(), 1, "the rate-limited backend was asked once");
    assert_eq!(third.requests().len(), 1);
    // 600k fresh input × 2 + 400k cached × 0.5 + 200k output × 10, per million tokens.
    let want = 1.2 + 0.2 + 2.0;
    assert!((v["cost"].as_f64().unwrap() - want).abs() < 1e-9, "{v}");
    assert_eq!(v["usage"]["cache_read_tokens"], 400_000);

    let metrics = reqwest::get(format!("{}/metrics", s.url)).await.unwrap().text().await.unwrap();
    let line = |prefix: &str| -> f64 {
        let l = metrics.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} in:\n{metrics}"));
        l.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(line("koubou_backend_tokens_total{backend=\"third\",remote=\"false\",kind=\"prompt\"}"), 1e6);
    assert_eq!(line("koubou_backend_tokens_total{backend=\"third\",remote=\"false\",kind=\"completion\"}"), 2e5);
    assert!((line("koubou_backend_cost_total{backend=\"third\",remote=\"false\"}") - want).abs() < 1e-9);
    assert_eq!(line("koubou_backend_answers_total{backend=\"second\",remote=\"false\"}"), 0.0);
    // Local tokens at the reference prices, all prompt tokens as fresh input: 1M × 2 + 200k × 10.
    assert!((line("koubou_spared_cost_total") - 4.0).abs() < 1e-9, "{metrics}");
    let h = get(&format!("{}/health", s.url)).await;
    assert!((h["spared"]["cost"].as_f64().unwrap() - 4.0).abs() < 1e-9, "{h}");
    assert!(h["routes"]["general"].as_str().unwrap().contains("fallback second, third"), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_json_answer_fails_the_attempt_and_is_retried() {
    let (fake, addr) = Fake::start(vec![
        Reply::Answer("Sure! here it is: {\"n\": 1}", (5, 5, 0)),
        Reply::Answer("{\"n\": \"one\"}", (5, 5, 0)),
        Reply::Answer("{\"n\": 1}", (5, 5, 0)),
    ])
    .await;
    let (_prose, paddr) = Fake::start(vec![Reply::Answer("I would rather chat.", (5, 5, 0))]).await;
    let home = tempfile::tempdir().unwrap();
    let body = format!(
        "{}{}[types.general]\nbackend = \"llm\"\n[types.chatty]\nbackend = \"prose\"\njson = true\n",
        openai("llm", &addr.to_string(), ""),
        openai("prose", &paddr.to_string(), "")
    );
    write_home(home.path(), &body);
    let s = Serve::start(home.path(), &[]);
    let schema = json!({"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}});
    let id = submit(&s.url, json!({"prompt": "count", "schema": schema, "max_attempts": 3})).await;
    let v = finished(&s.url, &id).await;
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["attempts"], 3, "prose, then a schema violation, then a valid answer: {v}");
    assert_eq!(v["result"]["output"], "{\"n\": 1}");
    let sent = fake.requests();
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[0]["response_format"]["type"], "json_schema");
    assert_eq!(sent[0]["response_format"]["json_schema"]["schema"], schema);
    // A type that wants JSON, served prose until the attempts run out: failed, saying why.
    let id = submit(&s.url, json!({"type": "chatty", "prompt": "hello", "max_attempts": 2})).await;
    let v = finished(&s.url, &id).await;
    assert_eq!((v["status"].as_str(), v["attempts"].as_u64()), (Some("failed"), Some(2)), "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(error.contains("not JSON") && error.contains("I would rather chat"), "{error}");
    // A schema that is not one is refused at submission.
    let (code, v) = post(&format!("{}/task/delegate", s.url), json!({"prompt": "x", "schema": {"type": 7}})).await;
    assert_eq!((code, v["error"]["field"].as_str()), (400, Some("schema")), "{v}");
}

/// `koubou submit --tag --schema` to a type with `num_ctx`: the fake Ollama receives the type's
/// context window as `options.num_ctx` and the schema as `format`, and the record says where
/// the task ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_gets_num_ctx_and_format_from_the_cli() {
    let ollama = fakes::FakeServer::start(vec![
        ("/api/chat", vec![fakes::ollama_chat("m", &["{\"n\": ", "1}"], true)]),
        ("/api/tags", vec![fakes::ollama_tags(&["m"])]),
    ])
    .await;
    let home = tempfile::tempdir().unwrap();
    write_home(
        home.path(),
        &format!(
            "[backends.box]\nkind = \"ollama\"\nurl = \"{}\"\nmodel = \"m\"\nnum_ctx = 4096\n\
             [types.general]\nbackend = \"box\"\nnum_ctx = 8192\n",
            ollama.url()
        ),
    );
    let s = Serve::start(home.path(), &[]);
    let schema = json!({"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}});
    let out = Command::new(support::bin())
        .arg("--home")
        .arg(home.path())
        .args(["--url", &s.url, "submit", "--tag", "Confidential", "--schema", &schema.to_string(), "--wait", "count"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "submit failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("{\"n\": 1}"), "{stdout}");
    let sent = ollama.requests_to("/api/chat");
    assert_eq!(sent.len(), 1);
    let body = sent[0].json();
    assert_eq!(body["options"]["num_ctx"], 8192, "the type's num_ctx wins over the backend's: {body}");
    assert_eq!(body["format"], schema, "{body}");
    let page = get(&format!("{}/tasks?tag=confidential", s.url)).await;
    assert_eq!(page["total"], 1, "{page}");
    let t = &page["tasks"][0];
    assert_eq!(
        (t["backend"].as_str(), t["remote"].as_bool(), t["json"].as_bool()),
        (Some("box"), Some(false), Some(true)),
        "{t}"
    );
    assert_eq!((&t["schema"], &t["tags"]), (&schema, &json!(["confidential"])), "{t}");
}
