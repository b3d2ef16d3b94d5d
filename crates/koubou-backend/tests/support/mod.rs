//! Test support shared by the integration tests: a scripted HTTP server on 127.0.0.1 that plays
//! Ollama, an OpenAI-compatible server or a Responses-API provider for codex, and records what
//! it was sent. Each test says, per path, what the server answers.
#![allow(dead_code)]

pub mod proxy;
pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use futures::StreamExt;
use serde_json::{Value, json};

/// What the fake server answers on one path.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Status 200 with this content type, the body sent as these chunks (a little apart so the
    /// client really sees them separately); then the body ends.
    Stream { content_type: &'static str, chunks: Vec<Vec<u8>> },
    /// Like `Stream`, but after the chunks the body never ends (nor sends anything more).
    StreamThenHang { content_type: &'static str, chunks: Vec<Vec<u8>> },
    /// A whole JSON body with this status.
    Json(u16, Value),
    /// A whole JSON body with this status and these headers (e.g. `retry-after`).
    JsonWith(u16, Vec<(&'static str, String)>, Value),
    /// A plain text body with this status.
    Text(u16, String),
    /// Accepts the request and never sends a status line.
    Hang,
}

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    /// The query string, without `?` (empty when there is none).
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    }
}

struct State {
    routes: HashMap<String, Vec<Reply>>,
    hits: HashMap<String, usize>,
    log: Vec<Recorded>,
}

/// A scripted server bound to 127.0.0.1 on a free port; stops when dropped.
pub struct FakeServer {
    pub addr: SocketAddr,
    scheme: &'static str,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    /// Serves `routes`: each path answers its replies in turn, repeating the last one. Unknown
    /// paths get 404 `{"error":"no route"}`.
    pub async fn start(routes: Vec<(&str, Vec<Reply>)>) -> FakeServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        Self::serve(listener, "http", routes)
    }

    /// Like [`FakeServer::start`], over HTTPS with a certificate `ca` signed.
    pub async fn start_tls(ca: &tls::TestCa, routes: Vec<(&str, Vec<Reply>)>) -> FakeServer {
        Self::serve(ca.listener().await, "https", routes)
    }

    fn serve<L>(listener: L, scheme: &'static str, routes: Vec<(&str, Vec<Reply>)>) -> FakeServer
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let state = Arc::new(Mutex::new(State {
            routes: routes.into_iter().map(|(p, r)| (p.to_owned(), r)).collect(),
            hits: HashMap::new(),
            log: Vec::new(),
        }));
        let addr = listener.local_addr().expect("local addr");
        let st = state.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let st = st.clone();
            async move { answer(st, method, uri, headers, body).await }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeServer { addr, scheme, state, task }
    }

    /// `http://127.0.0.1:PORT` (`https://` for [`FakeServer::start_tls`]).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().log.clone()
    }

    /// The requests to `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.path == path).collect()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(st: Arc<Mutex<State>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let reply = {
        let mut s = st.lock().unwrap();
        let query = uri.query().unwrap_or_default().to_owned();
        s.log.push(Recorded { method, path: path.clone(), query, headers, body });
        let n = *s.hits.entry(path.clone()).and_modify(|n| *n += 1).or_insert(0);
        s.routes.get(&path).and_then(|rs| rs.get(n).or(rs.last()).cloned())
    };
    let Some(reply) = reply else {
        return json_response(404, json!({"error": "no route"}));
    };
    match reply {
        Reply::Json(status, v) => json_response(status, v),
        Reply::JsonWith(status, headers, v) => {
            let mut r = json_response(status, v);
            for (k, val) in headers {
                r.headers_mut().insert(k, val.parse().unwrap());
            }
            r
        }
        Reply::Text(status, t) => {
            Response::builder().status(status).header("content-type", "text/plain").body(Body::from(t)).unwrap()
        }
        Reply::Hang => std::future::pending().await,
        Reply::Stream { content_type, chunks } => streamed(content_type, chunks, false),
        Reply::StreamThenHang { content_type, chunks } => streamed(content_type, chunks, true),
    }
}

fn json_response(status: u16, v: Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

fn streamed(content_type: &'static str, chunks: Vec<Vec<u8>>, hang: bool) -> Response {
    let s = futures::stream::iter(chunks).then(|c| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok::<_, Infallible>(Bytes::from(c))
    });
    let body = if hang { Body::from_stream(s.chain(futures::stream::pending())) } else { Body::from_stream(s) };
    Response::builder().status(200).header("content-type", content_type).body(body).unwrap()
}

/// A port on 127.0.0.1 that nothing listens on (bound, then closed).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

// ---------------------------------------------------------------------------------------------
// Ollama

/// `/api/chat` NDJSON: one line per token, then (when `done`) the final line with usage.
pub fn ollama_chat(model: &str, tokens: &[&str], done: bool) -> Reply {
    let mut chunks: Vec<Vec<u8>> = tokens
        .iter()
        .map(|t| {
            let line = json!({"model": model, "created_at": "2025-01-01T00:00:00Z",
                "message": {"role": "assistant", "content": t}, "done": false});
            format!("{line}\n").into_bytes()
        })
        .collect();
    if done {
        let line = json!({"model": model, "created_at": "2025-01-01T00:00:01Z",
            "message": {"role": "assistant", "content": ""}, "done_reason": "stop", "done": true,
            "total_duration": 1000, "prompt_eval_count": 26, "eval_count": tokens.len()});
        chunks.push(format!("{line}\n").into_bytes());
    }
    Reply::Stream { content_type: "application/x-ndjson", chunks }
}

/// `/api/tags` listing `models`.
pub fn ollama_tags(models: &[&str]) -> Reply {
    let list: Vec<Value> = models.iter().map(|m| json!({"name": m, "model": m, "size": 1})).collect();
    Reply::Json(200, json!({ "models": list }))
}

// ---------------------------------------------------------------------------------------------
// OpenAI-compatible

/// A streamed chat completion as llama-cpp-python sends it (role chunk, one chunk per token, a
/// finish chunk), optionally with a usage chunk, `[DONE]` and CRLF line endings.
pub fn openai_stream(
    tokens: &[&str],
    finish: Option<&str>,
    usage: Option<(u64, u64)>,
    done: bool,
    crlf: bool,
) -> Reply {
    let nl = if crlf { "\r\n" } else { "\n" };
    let ev = |v: Value| format!("data: {v}{nl}{nl}").into_bytes();
    let base = |delta: Value, finish: Option<&str>| {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "served-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut chunks =
        vec![format!(": ping - 2025-01-01{nl}").into_bytes(), ev(base(json!({"role": "assistant"}), None))];
    for t in tokens {
        chunks.push(ev(base(json!({"content": t}), None)));
    }
    if let Some(f) = finish {
        chunks.push(ev(base(json!({}), Some(f))));
    }
    if let Some((p, c)) = usage {
        chunks.push(ev(json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "served-model",
            "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})));
    }
    if done {
        chunks.push(format!("data: [DONE]{nl}{nl}").into_bytes());
    }
    Reply::Stream { content_type: "text/event-stream", chunks }
}

/// `/v1/models` listing `ids`.
pub fn openai_models(ids: &[&str]) -> Reply {
    let data: Vec<Value> = ids.iter().map(|id| json!({"id": id, "object": "model", "owned_by": "me"})).collect();
    Reply::Json(200, json!({"object": "list", "data": data}))
}

// ---------------------------------------------------------------------------------------------
// Anthropic Messages API

/// One server-sent event, Anthropic style (`event:` names the type, `data:` repeats it).
pub fn anthropic_event(kind: &str, v: Value) -> String {
    format!("event: {kind}\ndata: {v}\n\n")
}

/// A whole Messages stream, as one string: `message_start` (with usage, cache counts),
/// a `ping`, one text block whose deltas are `tokens`, `message_delta` with `stop_reason`, and
/// (when `stop`) `message_stop`.
pub fn anthropic_stream(tokens: &[&str], stop_reason: &str, stop: bool) -> String {
    let mut s = anthropic_event(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
            "model": "claude-served", "content": [], "stop_reason": null,
            "usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 100,
                      "cache_creation_input_tokens": 30}}}),
    );
    s += &anthropic_event("ping", json!({"type": "ping"}));
    s += &anthropic_event(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    );
    for t in tokens {
        s += &anthropic_event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}),
        );
    }
    s += &anthropic_event("content_block_stop", json!({"type": "content_block_stop", "index": 0}));
    s += &anthropic_event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": tokens.len()}}),
    );
    if stop {
        s += &anthropic_event("message_stop", json!({"type": "message_stop"}));
    }
    s
}

/// `text` sent in chunks cut at the given byte offsets (anywhere, even inside a UTF-8 character).
pub fn split_at(text: &str, cuts: &[usize]) -> Reply {
    let bytes = text.as_bytes();
    let mut chunks = Vec::new();
    let mut last = 0;
    for &c in cuts.iter().filter(|&&c| c > 0 && c < bytes.len()) {
        if c > last {
            chunks.push(bytes[last..c].to_vec());
            last = c;
        }
    }
    chunks.push(bytes[last..].to_vec());
    Reply::Stream { content_type: "text/event-stream", chunks }
}

// ---------------------------------------------------------------------------------------------
// Responses API (what codex talks to)

/// The SSE sequence codex needs for one answer (see `shared/reference/codex-cli.md`).
pub fn responses_stream(deltas: &[&str], usage: (u64, u64)) -> Reply {
    let text: String = deltas.concat();
    let ev = |kind: &str, v: Value| format!("event: {kind}\ndata: {v}\n\n").into_bytes();
    let msg_id = "msg_1";
    let mut chunks = vec![
        ev(
            "response.created",
            json!({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "output": []}}),
        ),
        ev(
            "response.in_progress",
            json!({"type": "response.in_progress", "response": {"id": "resp_1", "status": "in_progress"}}),
        ),
        ev(
            "response.output_item.added",
            json!({"type": "response.output_item.added", "output_index": 0,
                "item": {"type": "message", "id": msg_id, "role": "assistant", "status": "in_progress", "content": []}}),
        ),
        ev(
            "response.content_part.added",
            json!({"type": "response.content_part.added", "item_id": msg_id, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for d in deltas {
        chunks.push(ev(
            "response.output_text.delta",
            json!({"type": "response.output_text.delta", "item_id": msg_id, "output_index": 0, "content_index": 0, "delta": d}),
        ));
    }
    chunks.push(ev(
        "response.output_text.done",
        json!({"type": "response.output_text.done", "item_id": msg_id, "output_index": 0, "content_index": 0, "text": text}),
    ));
    chunks.push(ev(
        "response.content_part.done",
        json!({"type": "response.content_part.done", "item_id": msg_id, "output_index": 0, "content_index": 0,
            "part": {"type": "output_text", "text": text, "annotations": []}}),
    ));
    let item = json!({"type": "message", "id": msg_id, "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}]});
    chunks.push(ev(
        "response.output_item.done",
        json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
    ));
    let (input, output) = usage;
    chunks.push(ev(
        "response.completed",
        json!({"type": "response.completed", "response": {"id": "resp_1", "status": "completed", "output": [item],
            "usage": {"input_tokens": input, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": input + output}}}),
    ));
    Reply::Stream { content_type: "text/event-stream", chunks }
}

/// The text of the last user message in a Responses-API request body.
pub fn last_user_text(body: &Value) -> Option<String> {
    let input = body["input"].as_array()?;
    let msg = input.iter().rev().find(|m| m["role"] == "user")?;
    match &msg["content"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join("")),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Common

/// A sink that keeps every token.
#[derive(Default)]
pub struct Collect(pub Mutex<Vec<String>>);

impl koubou_backend::TokenSink for Collect {
    fn token(&self, text: &str) {
        self.0.lock().unwrap().push(text.to_owned());
    }
}

impl Collect {
    pub fn joined(&self) -> String {
        self.0.lock().unwrap().concat()
    }
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A request with defaults tests rarely change.
pub fn request(model: &str, prompt: &str) -> koubou_backend::GenerateRequest {
    koubou_backend::GenerateRequest {
        model: model.into(),
        system: None,
        prompt: prompt.into(),
        options: Default::default(),
        timeout: Duration::from_secs(60),
        task_id: "task-1".into(),
        task_kind: "general".into(),
        num_ctx: None,
        response_format: None,
    }
}

/// Cancels `token` after `after` (for "returns promptly when cancelled" tests).
pub fn cancel_after(token: &koubou_backend::CancellationToken, after: Duration) {
    let t = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        t.cancel();
    });
}

/// Fails the test if `fut` has not finished within a generous bound (a hang guard, not a speed
/// assertion).
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: still running after 30 s (hung)"),
    }
}
