//! Attacks on the real `koubou serve`, on all three of its ports, sent as an attacker sends them
//! (raw TCP where a client library would "fix" the request): DNS rebinding (a foreign `Host`),
//! cross-site requests (a foreign `Origin`, a GraphQL mutation from a GET or a `text/plain`
//! POST), oversized bodies and messages, oversized GraphQL documents, slowloris, connection
//! floods, request floods. Each checks the precise refusal, that nothing ran (no task in the
//! queue) and that the server still answers `/health`.

mod support;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{FakeLlm, Serve, home_with_fake};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, protocol::frame::coding::CloseCode};

/// `host:port` of a URL such as `http://127.0.0.1:1234/graphql` or `ws://127.0.0.1:1234`.
fn addr(url: &str) -> String {
    url.split("://").nth(1).unwrap().split('/').next().unwrap().to_owned()
}

fn port(url: &str) -> u16 {
    addr(url).rsplit(':').next().unwrap().parse().unwrap()
}

/// The three ports of a server started with [`Serve::start_all`].
struct Ports {
    main: String,
    ws: String,
    gql: String,
}

fn ports(s: &Serve) -> Ports {
    Ports { main: addr(&s.url), ws: addr(s.ws_url.as_ref().unwrap()), gql: addr(s.graphql_url.as_ref().unwrap()) }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// Reads one response from `s`: its head, then the body its Content-Length announces (or
/// until the server closes). A 101 has no body.
async fn read_answer(s: &mut TcpStream) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut chunk))
            .await
            .expect("no answer within 60 s")
            .unwrap_or(0);
        assert!(n > 0, "connection closed before an answer: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = buf[head_end + 4..].to_vec();
    let mut a = Answer { status, head, body: vec![] };
    if status != 101 {
        let len: Option<usize> = a.header("content-length").and_then(|v| v.parse().ok());
        while len.is_none_or(|l| body.len() < l) {
            match tokio::time::timeout(Duration::from_secs(60), s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
    }
    a.body = body;
    a
}

/// Sends `request` exactly as written on a new connection and reads the answer.
async fn raw(to: &str, request: &str) -> Answer {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    read_answer(&mut s).await
}

/// A request for `path` on `to` with `Host: host`, extra header lines and an optional JSON body.
fn request(method: &str, path: &str, host: &str, headers: &str, body: Option<&str>) -> String {
    let body_headers =
        body.map_or(String::new(), |b| format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    // An upgrade asks to keep the connection; anything else asks the server to close it after.
    let close = if headers.contains("Upgrade") { "" } else { "Connection: close\r\n" };
    format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{headers}{body_headers}{close}\r\n{}", body.unwrap_or(""))
}

const UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
const GRAPHQL_WS: &str = "Sec-WebSocket-Protocol: graphql-transport-ws\r\n";
const DELEGATE: &str = r#"{"prompt":"run me","type":"general"}"#;
const MUTATION: &str = r#"{"query":"mutation { submitTask(prompt: \"run me\") { taskId } }"}"#;
const MCP_INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;

/// Every kind of route of every port: (port, method, path, extra headers, body).
fn every_route(p: &Ports) -> Vec<(String, &'static str, &'static str, String, Option<&'static str>)> {
    let mcp = "Accept: application/json, text/event-stream\r\n".to_owned();
    vec![
        (p.main.clone(), "POST", "/task/delegate", String::new(), Some(DELEGATE)),
        (p.main.clone(), "GET", "/tasks", String::new(), None),
        (p.main.clone(), "GET", "/task/0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60/status", String::new(), None),
        (p.main.clone(), "GET", "/health", String::new(), None),
        (p.main.clone(), "GET", "/metrics", String::new(), None),
        (p.main.clone(), "GET", "/dashboard", String::new(), None),
        (p.main.clone(), "GET", "/dashboard/api/tasks", String::new(), None),
        (p.main.clone(), "POST", "/dashboard/api/tasks", String::new(), Some(DELEGATE)),
        (p.main.clone(), "POST", "/mcp", mcp, Some(MCP_INIT)),
        (p.main.clone(), "GET", "/ws", UPGRADE.into(), None),
        (p.main.clone(), "GET", "/dashboard/ws", UPGRADE.into(), None),
        (p.main.clone(), "GET", "/nope", String::new(), None),
        (p.ws.clone(), "GET", "/", UPGRADE.into(), None),
        (p.gql.clone(), "POST", "/graphql", String::new(), Some(MUTATION)),
        (p.gql.clone(), "GET", "/graphql?query=%7BsystemStatus%7BpendingTasks%7D%7D", String::new(), None),
        (p.gql.clone(), "GET", "/graphql", format!("{UPGRADE}{GRAPHQL_WS}"), None),
    ]
}

async fn task_total(url: &str) -> i64 {
    let v: Value = reqwest::get(format!("{url}/tasks")).await.unwrap().json().await.unwrap();
    v["total"].as_i64().unwrap()
}

async fn healthy(url: &str) {
    for _ in 0..600 {
        if let Ok(r) = reqwest::get(format!("{url}/health")).await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/health did not answer 200");
}

async fn started(extra_config: &str) -> (Serve, tempfile::TempDir, FakeLlm) {
    let (fake, fake_addr) = FakeLlm::start(Duration::from_millis(10)).await;
    let home = tempfile::tempdir().unwrap();
    home_with_fake(home.path(), fake_addr, extra_config);
    let s = Serve::start_all(home.path(), &[]);
    (s, home, fake)
}

fn assert_refused(a: &Answer, status: u16, code: &str, field: &str, what: &str) {
    let v = a.json();
    assert_eq!(a.status, status, "{what}: {a:?}");
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
    assert_eq!(v["error"]["field"], field, "{what}: {v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_rebinding_foreign_host_is_refused_on_every_port_and_route() {
    let (s, _home, fake) = started("").await;
    let p = ports(&s);
    for (to, method, path, headers, body) in every_route(&p) {
        let port = to.rsplit(':').next().unwrap();
        for host in [
            "evil.example".to_owned(),
            format!("evil.example:{port}"),
            format!("localhost.evil.example:{port}"),
            format!("127.0.0.1.nip.io:{port}"),
            format!("[::2]:{port}"),
            format!("192.168.1.5:{port}"),
        ] {
            let a = raw(&to, &request(method, path, &host, &headers, body)).await;
            let what = format!("{method} {to}{path} with Host {host}");
            assert_refused(&a, 403, "forbidden_host", "Host", &what);
            assert!(a.json()["error"]["message"].as_str().unwrap().contains("server.allowed_hosts"), "{what}");
        }
        // A foreign Host with a matching Origin, as a rebound page sends it: still refused.
        let rebound = format!("{headers}Origin: http://evil.example:{port}\r\n");
        let a = raw(&to, &request(method, path, &format!("evil.example:{port}"), &rebound, body)).await;
        assert_refused(&a, 403, "forbidden_host", "Host", &format!("rebound {method} {path}"));
    }
    // Nothing ran.
    assert_eq!(task_total(&s.url).await, 0);
    assert_eq!(fake.calls("run me"), 0);
    // The same requests to names the server answers to go through: the refusal was the Host's.
    for (to, method, path, headers, body) in every_route(&p) {
        if body == Some(DELEGATE) || body == Some(MUTATION) {
            continue;
        }
        let port = to.rsplit(':').next().unwrap();
        for host in [format!("localhost:{port}"), format!("LOCALHOST.:{port}"), format!("[::1]:{port}")] {
            let a = raw(&to, &request(method, path, &host, &headers, body)).await;
            assert_ne!(a.status, 403, "{method} {path} with Host {host}: {a:?}");
            if headers.contains("Upgrade") {
                assert_eq!(a.status, 101, "{method} {path} with Host {host}");
            }
            if path == "/mcp" {
                // rmcp's own Host check agrees with the guard (it is off behind it).
                assert_eq!(a.status, 200, "/mcp with Host {host}: {a:?}");
            }
        }
    }
    healthy(&s.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_origins_are_refused_and_websocket_upgrades_get_no_101() {
    let (s, _home, fake) = started("[server]\nallowed_origins = [\"http://localhost:3000\"]\n").await;
    let p = ports(&s);
    let fake_port = port(&s.url) ^ 1; // any other local port
    for (to, method, path, headers, body) in every_route(&p) {
        let here = port(&format!("http://{to}"));
        let other_port = if to == p.main { port(&format!("http://{}", p.gql)) } else { port(&s.url) };
        for origin in [
            format!("http://127.0.0.1:{other_port}"),
            format!("http://localhost:{fake_port}"),
            format!("http://localhost:{here}"), // Host is 127.0.0.1: another origin
            format!("https://127.0.0.1:{here}"),
            "http://localhost:3001".into(),
            "null".into(),
            "https://evil.example".into(),
            format!("http://127.0.0.1.nip.io:{here}"),
        ] {
            let h = format!("{headers}Origin: {origin}\r\n");
            let a = raw(&to, &request(method, path, &format!("127.0.0.1:{here}"), &h, body)).await;
            let what = format!("{method} {to}{path} with Origin {origin}");
            assert_refused(&a, 403, "forbidden_origin", "Origin", &what);
        }
    }
    assert_eq!(task_total(&s.url).await, 0);
    assert_eq!(fake.calls("run me"), 0);
    // Its own origin, and a listed one, pass (queries only: nothing runs).
    for (to, method, path, headers, body) in every_route(&p) {
        if body == Some(DELEGATE) || body == Some(MUTATION) {
            continue;
        }
        let here = port(&format!("http://{to}"));
        for origin in [format!("http://127.0.0.1:{here}"), "http://localhost:3000".into()] {
            let h = format!("{headers}Origin: {origin}\r\n");
            let a = raw(&to, &request(method, path, &format!("127.0.0.1:{here}"), &h, body)).await;
            assert_ne!(a.status, 403, "{method} {path} with Origin {origin}: {a:?}");
        }
    }
    // A WebSocket client library, too, is refused before the upgrade.
    for url in [format!("ws://{}/ws", p.main), format!("ws://{}/", p.ws)] {
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut().insert("origin", "https://evil.example".parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403, "{url}"),
            other => panic!("{url}: expected a 403, got {:?}", other.map(|_| ())),
        }
    }
    healthy(&s.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_runs_mutations_only_from_json_posts() {
    let (s, _home, fake) = started("").await;
    let p = ports(&s);
    let host = format!("Host: {}\r\n", p.gql);
    // <img src="http://127.0.0.1:8767/graphql?query=mutation...">: a GET, no Origin.
    let q = "mutation%20%7B%20submitTask(prompt%3A%20%22run%20me%22)%20%7B%20taskId%20%7D%20%7D";
    let a = raw(&p.gql, &format!("GET /graphql?query={q} HTTP/1.1\r\n{host}Connection: close\r\n\r\n")).await;
    assert_eq!(a.status, 405, "{a:?}");
    assert_eq!(a.header("allow").as_deref(), Some("POST"));
    assert_eq!(a.json()["errors"][0]["extensions"]["code"], "method_not_allowed", "{:?}", a.json());
    // The named mutation of a document with a query in it, chosen by operationName.
    let q = "query%20Q%20%7B%20healthReport%20%7B%20status%20%7D%20%7D%20mutation%20M%20%7B%20submitTask(prompt%3A%20%22run%20me%22)%20%7B%20taskId%20%7D%20%7D";
    // (async-graphql reads the operation's name from `operation_name` in a query string.)
    let a =
        raw(&p.gql, &format!("GET /graphql?query={q}&operation_name=M HTTP/1.1\r\n{host}Connection: close\r\n\r\n"))
            .await;
    assert_eq!(a.status, 405, "{a:?}");
    let a =
        raw(&p.gql, &format!("GET /graphql?query={q}&operation_name=Q HTTP/1.1\r\n{host}Connection: close\r\n\r\n"))
            .await;
    assert_eq!(a.status, 200, "a query from a GET still runs: {a:?}");
    assert_eq!(a.json()["data"]["healthReport"]["status"], "healthy", "{:?}", a.json());
    // Named the spec's way, the name is not read: which operation is meant is unknown, and none runs.
    let a = raw(&p.gql, &format!("GET /graphql?query={q}&operationName=M HTTP/1.1\r\n{host}Connection: close\r\n\r\n"))
        .await;
    assert!(a.json()["data"].is_null() && a.json()["errors"][0]["message"].is_string(), "{:?}", a.json());
    // A cross-site form or fetch without preflight: text/plain, form-urlencoded, multipart.
    for ct in [
        "text/plain",
        "text/plain; x=json",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ] {
        let req = format!(
            "POST /graphql HTTP/1.1\r\n{host}Content-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{MUTATION}",
            MUTATION.len()
        );
        let a = raw(&p.gql, &req).await;
        assert_eq!(a.status, 415, "{ct}: {a:?}");
        let e = &a.json()["errors"][0];
        assert_eq!(
            (e["extensions"]["code"].as_str(), e["extensions"]["field"].as_str()),
            (Some("unsupported_media_type"), Some("Content-Type")),
            "{ct}"
        );
    }
    let no_type = format!(
        "POST /graphql HTTP/1.1\r\n{host}Content-Length: {}\r\nConnection: close\r\n\r\n{MUTATION}",
        MUTATION.len()
    );
    assert_eq!(raw(&p.gql, &no_type).await.status, 415);
    // REST compares the MIME essence too.
    for ct in ["text/plain; x=json", "application/jsonx", "text/json"] {
        let req = format!(
            "POST /task/delegate HTTP/1.1\r\nHost: {}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{DELEGATE}",
            p.main,
            DELEGATE.len()
        );
        let a = raw(&p.main, &req).await;
        assert_refused(&a, 415, "unsupported_media_type", "Content-Type", ct);
    }
    assert_eq!(task_total(&s.url).await, 0);
    assert_eq!(fake.calls("run me"), 0);
    // A JSON POST runs it.
    let a = raw(&p.gql, &request("POST", "/graphql", &p.gql, "", Some(MUTATION))).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.json()["data"]["submitTask"]["taskId"].is_string(), "{:?}", a.json());
    assert_eq!(task_total(&s.url).await, 1);
    healthy(&s.url).await;
}

async fn gql(url: &str, query: &str) -> (u16, Value) {
    let r = reqwest::Client::new().post(url).json(&json!({"query": query})).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn nested(depth: usize) -> String {
    // tasks { tasks { ... } } is not in the schema: depth is measured before validation, so any
    // field names do; the limit must refuse it before anything else looks at it.
    let mut q = "id".to_owned();
    for _ in 1..depth {
        q = format!("task {{ {q} }}");
    }
    format!("{{ {q} }}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_documents_over_the_limits_get_a_400_naming_it() {
    let (s, _home, fake) = started("").await;
    let url = s.graphql_url.clone().unwrap();
    let aliases = (0..31).map(|i| format!("a{i}: submitTask(prompt: \"run me\") {{ taskId }}")).collect::<Vec<_>>();
    let fields = (0..501).map(|i| format!("f{i}")).collect::<Vec<_>>().join(" ");
    let mut bomb = String::from("query { ...F0 }\n");
    for i in 0..30 {
        bomb.push_str(&format!("fragment F{i} on Query {{ healthReport {{ status }} ...F{n} ...F{n} }}\n", n = i + 1));
    }
    bomb.push_str("fragment F30 on Query { healthReport { status } }\n");
    for (query, code, field) in [
        (nested(21), "query_too_deep", "limits.graphql_max_depth"),
        (format!("mutation {{ {} }}", aliases.join(" ")), "too_many_aliases", "limits.graphql_max_aliases"),
        (format!("{{ {fields} }}"), "query_too_complex", "limits.graphql_max_complexity"),
        (bomb, "query_too_complex", "limits.graphql_max_complexity"),
    ] {
        let (status, v) = gql(&url, &query).await;
        assert_eq!(status, 400, "{v}");
        let e = &v["errors"][0];
        assert_eq!(e["extensions"]["code"], code, "{v}");
        assert_eq!(e["extensions"]["field"], field, "{v}");
        assert!(e["message"].as_str().unwrap().contains(field), "{v}");
        assert!(v["data"].is_null(), "{v}");
    }
    assert_eq!(task_total(&s.url).await, 0);
    assert_eq!(fake.calls("run me"), 0);
    // Within the limits: the seed's query, 30 aliases, and an introspection as deep as GraphiQL's.
    let (status, v) = gql(&url, "{ systemStatus { activeWorkers pendingTasks } }").await;
    assert_eq!(status, 200, "{v}");
    let within = (0..30).map(|i| format!("h{i}: healthReport {{ status }}")).collect::<Vec<_>>().join(" ");
    let (status, v) = gql(&url, &format!("{{ {within} }}")).await;
    assert_eq!((status, v.get("errors")), (200, None), "{v}");
    let (status, v) = gql(&url, INTROSPECTION).await;
    assert_eq!((status, v.get("errors")), (200, None), "{v}");
    assert!(v["data"]["__schema"]["types"].as_array().unwrap().len() > 10);

    // Over a graphql-ws subscription, the same limit, as a protocol error.
    let mut req = format!("ws://{}/graphql", addr(&url)).into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", "graphql-transport-ws".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(tungstenite::Message::Text(json!({"type": "connection_init"}).to_string().into())).await.unwrap();
    let ack = next_text(&mut ws).await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    let deep = format!("subscription {}", nested(21));
    let sub = json!({"id": "1", "type": "subscribe", "payload": {"query": deep}});
    ws.send(tungstenite::Message::Text(sub.to_string().into())).await.unwrap();
    // async-graphql answers it as the operation's result: errors, no data.
    let err = next_text(&mut ws).await;
    assert_eq!((err["id"].as_str(), err["payload"]["data"].is_null()), (Some("1"), true), "{err}");
    assert_eq!(err["payload"]["errors"][0]["extensions"]["code"], "query_too_deep", "{err}");
    healthy(&s.url).await;
}

async fn next_text(ws: &mut WsStream) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.expect("no message").expect("closed");
        if let tungstenite::Message::Text(t) = m.unwrap() {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A query as deep as the one the bundled GraphiQL sends to load its docs (depth 15: a type's
/// `ofType` nine deep).
const INTROSPECTION: &str = r#"query {
  __schema {
    queryType { name } mutationType { name } subscriptionType { name }
    types { kind name description
      fields(includeDeprecated: true) { name description args { name type { ...T } defaultValue } type { ...T } isDeprecated }
      inputFields { name type { ...T } } interfaces { ...T } enumValues(includeDeprecated: true) { name } possibleTypes { ...T } }
    directives { name locations args { name type { ...T } } }
  }
}
fragment T on __Type { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name
  ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } } } }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_on_every_port() {
    let (s, _home, fake) = started("").await;
    let p = ports(&s);
    let limit = 1_310_720usize;
    // Declared too large: refused before a byte of the body is read (none is sent).
    for (to, path, headers) in [
        (&p.main, "/task/delegate", ""),
        (&p.main, "/dashboard/api/tasks", ""),
        (&p.main, "/mcp", "Accept: application/json, text/event-stream\r\n"),
        (&p.gql, "/graphql", ""),
    ] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {to}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            limit + 1
        );
        let a = raw(to, &req).await;
        assert_refused(&a, 413, "payload_too_large", "body", path);
        assert!(a.json()["error"]["message"].as_str().unwrap().contains("limits.max_body_bytes"));
    }
    // Chunked, no length: refused once the limit is passed.
    let mut c = TcpStream::connect(&p.main).await.unwrap();
    let head = format!(
        "POST /task/delegate HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        p.main
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, "x".repeat(64 << 10));
    let mut sent = 0;
    while sent <= limit {
        if c.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        sent += 64 << 10;
    }
    let a = read_answer(&mut c).await;
    assert_refused(&a, 413, "payload_too_large", "body", "chunked");
    assert_eq!(task_total(&s.url).await, 0);
    assert_eq!(fake.calls("run me"), 0);
    healthy(&s.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_over_the_limit_close_with_1009() {
    // The message limit never drops below a prompt at its limit plus 256 KiB: 1 KiB prompts.
    let (s, _home, fake) = started("[limits]\nmax_prompt_bytes = 1024\nmax_ws_message_bytes = 1\n").await;
    let p = ports(&s);
    let limit = 1024 + (256 << 10);
    let big = json!({"type": "submit_task", "payload": {"prompt": "x".repeat(limit)}}).to_string();
    for (url, protocol) in [
        (format!("ws://{}/ws", p.main), None),
        (format!("ws://{}/dashboard/ws", p.main), None),
        (format!("ws://{}/", p.ws), None),
        (format!("ws://{}/graphql", p.gql), Some("graphql-transport-ws")),
    ] {
        let mut req = url.as_str().into_client_request().unwrap();
        if let Some(proto) = protocol {
            req.headers_mut().insert("sec-websocket-protocol", proto.parse().unwrap());
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let _ = ws.send(tungstenite::Message::Text(big.clone().into())).await;
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(60), ws.next()).await.expect("no close within 60 s") {
                Some(Ok(tungstenite::Message::Close(f))) => break f.expect("a close frame with a code"),
                Some(Ok(_)) => continue,
                other => panic!("{url}: expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(close.code, CloseCode::Size, "{url}: {close:?}");
        assert!(close.reason.contains("limits.max_ws_message_bytes"), "{url}: {close:?}");
    }
    assert_eq!(task_total(&s.url).await, 0);
    assert_eq!(fake.calls("run me"), 0);
    healthy(&s.url).await;
}

async fn ws_open(url: &str) -> Result<WsStream, u16> {
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("{url}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_connections_are_capped_per_port() {
    let (s, _home, _fake) = started("[limits]\nmax_ws_connections = 2\n").await;
    let p = ports(&s);
    // 8765's /ws and /dashboard/ws share the port's two places.
    let a = ws_open(&format!("ws://{}/ws", p.main)).await.unwrap();
    let _b = ws_open(&format!("ws://{}/dashboard/ws", p.main)).await.unwrap();
    let third = raw(&p.main, &request("GET", "/ws", &p.main, UPGRADE, None)).await;
    assert_refused(&third, 503, "too_many_connections", "limits.max_ws_connections", "third on 8765");
    assert_eq!(third.header("retry-after").as_deref(), Some("1"));
    // Other ports have their own places.
    let _c = ws_open(&format!("ws://{}/", p.ws)).await.unwrap();
    let _d = ws_open(&format!("ws://{}/", p.ws)).await.unwrap();
    assert_eq!(ws_open(&format!("ws://{}/", p.ws)).await.err(), Some(503));
    let gql = raw(&p.gql, &request("GET", "/graphql", &p.gql, &format!("{UPGRADE}{GRAPHQL_WS}"), None)).await;
    assert_eq!(gql.status, 101);
    // A place comes back when a connection ends.
    drop(a);
    let mut reopened = None;
    for _ in 0..600 {
        if let Ok(ws) = ws_open(&format!("ws://{}/ws", p.main)).await {
            reopened = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reopened.is_some(), "the closed connection's place never came back");
    healthy(&s.url).await;
}

/// Sends `start`, then `forever` over and over, a byte at a time, one every `every`, until the
/// server closes the connection; returns what the server sent before closing.
async fn slowloris(to: String, start: String, forever: &'static str, every: Duration) -> Vec<u8> {
    let mut c = TcpStream::connect(&to).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    for b in start.bytes().chain(forever.bytes().cycle()) {
        tokio::select! {
            r = c.read(&mut buf) => match r {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            },
            _ = tokio::time::sleep(every) => {
                if c.write_all(&[b]).await.is_err() {
                    return got;
                }
            }
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_idle_connections_are_cut_and_health_keeps_answering() {
    let (s, _home, fake) = started("[server]\nheader_read_timeout_secs = 2\nbody_read_timeout_secs = 2\n").await;
    let p = ports(&s);
    let mut attackers = Vec::new();
    for to in [&p.main, &p.main, &p.main, &p.ws, &p.gql] {
        for _ in 0..4 {
            // Headers that never end: a new header line forever.
            let start = format!("POST /task/delegate HTTP/1.1\r\nHost: {to}\r\n");
            attackers.push(tokio::spawn(slowloris(to.clone(), start, "X-Padding: a\r\n", Duration::from_millis(50))));
        }
        // A connection that sends nothing at all.
        let idle = TcpStream::connect(to).await.unwrap();
        attackers.push(tokio::spawn(async move {
            let mut idle = idle;
            let mut buf = [0u8; 64];
            let mut got = Vec::new();
            while let Ok(n) = idle.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            got
        }));
    }
    // While they hang on, /health answers.
    for _ in 0..5 {
        let r = reqwest::get(format!("{}/health", s.url)).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // A body sent a byte at a time: 408 naming the setting.
    let mut c = TcpStream::connect(&p.main).await.unwrap();
    let head = format!(
        "POST /task/delegate HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        p.main,
        DELEGATE.len()
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let dribble = tokio::spawn(async move {
        for b in DELEGATE.bytes().take(DELEGATE.len() - 1) {
            if c.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        c
    });
    let mut c = dribble.await.unwrap();
    let a = read_answer(&mut c).await;
    assert_refused(&a, 408, "request_timeout", "body", "slow body");
    assert!(a.json()["error"]["message"].as_str().unwrap().contains("server.body_read_timeout_secs"));
    // Every slowloris and idle connection is cut by the server (each task ends only then),
    // without a response.
    for t in attackers {
        let got = tokio::time::timeout(Duration::from_secs(120), t).await.expect("a connection was never cut").unwrap();
        assert!(!String::from_utf8_lossy(&got).contains(" 200 "), "{:?}", String::from_utf8_lossy(&got));
    }
    assert_eq!(task_total(&s.url).await, 0);
    assert_eq!(fake.calls("run me"), 0);
    healthy(&s.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_503_and_the_port_recovers() {
    let (s, _home, _fake) = started("[server]\nmax_connections = 4\nheader_read_timeout_secs = 30\n").await;
    let p = ports(&s);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(&p.main).await.unwrap());
    }
    // The accept loop takes them in order: wait until the fifth is the one refused.
    let mut refused = None;
    for _ in 0..600 {
        let a = raw(&p.main, &request("GET", "/health", &p.main, "", None)).await;
        if a.status == 503 {
            refused = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = refused.expect("the fifth connection was never refused");
    assert_refused(&a, 503, "too_many_connections", "server.max_connections", "fifth connection");
    // Other ports have their own cap.
    let gql =
        raw(&p.gql, &request("GET", "/graphql?query=%7BsystemStatus%7BpendingTasks%7D%7D", &p.gql, "", None)).await;
    assert_eq!(gql.status, 200);
    drop(held);
    healthy(&s.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_the_rate_limit_gets_429_and_nothing_runs() {
    let (s, _home, _fake) = started("[limits]\nrate_limit_per_sec = 1\nrate_limit_burst = 3\n").await;
    let p = ports(&s);
    let mut created = 0;
    let mut limited = None;
    for i in 0..50 {
        let body = format!(r#"{{"prompt":"flood {i}"}}"#);
        let a = raw(&p.main, &request("POST", "/task/delegate", &p.main, "", Some(&body))).await;
        match a.status {
            200 => created += 1,
            429 => {
                limited = Some(a);
                break;
            }
            other => panic!("unexpected {other}: {a:?}"),
        }
    }
    let a = limited.expect("50 requests in a row were never limited");
    assert!(created >= 3, "the burst of 3 passed first, got {created}");
    assert_refused(&a, 429, "rate_limited", "limits.rate_limit_per_sec", "flood");
    let retry: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    // The other ports count the same client: GraphQL is refused too while the bucket is empty,
    // unless a token came back meanwhile.
    let g = raw(&p.gql, &request("POST", "/graphql", &p.gql, "", Some(MUTATION))).await;
    assert!(g.status == 429 || g.status == 200, "{g:?}");
    let created = created + usize::from(g.status == 200);
    // Once a token is back, the queue holds exactly the tasks that were let in.
    let mut total = None;
    for _ in 0..600 {
        let r = reqwest::get(format!("{}/tasks", s.url)).await.unwrap();
        if r.status() == 200 {
            total = r.json::<Value>().await.unwrap()["total"].as_u64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(total, Some(created as u64));
    healthy(&s.url).await;
}

/// Other users of the machine cannot read the prompts on disk: a home `koubou serve` creates is
/// 0700, its `db/` and `logs/` too; started in a home others can enter, it says so and how to
/// close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_home_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let (_fake, fake_addr) = FakeLlm::start(Duration::from_millis(10)).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg_dir = tmp.path().join("cfg");
    home_with_fake(&cfg_dir, fake_addr, "");
    let config = cfg_dir.join("koubou.toml");
    let config = config.to_str().unwrap();

    std::fs::create_dir(tmp.path().join("fresh")).unwrap();
    let fresh = tmp.path().join("fresh").join(".koubou");
    let s = Serve::start(&fresh, &["--config", config]);
    healthy(&s.url).await;
    for d in [fresh.clone(), fresh.join("db"), fresh.join("logs")] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    assert!(fresh.join("db").join("koubou.db").is_file());
    let log = std::fs::read_to_string(&s.stderr_log).unwrap();
    assert!(!log.contains("chmod 700"), "a private home needs no warning: {log}");
    drop(s);

    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Serve::start(&open, &["--config", config]);
    healthy(&s.url).await;
    let log = std::fs::read_to_string(&s.stderr_log).unwrap();
    assert!(log.contains("mode 755") && log.contains(&format!("chmod 700 {}", open.display())), "{log}");
    assert_eq!(mode(&open), 0o755, "an existing home keeps the mode its owner gave it");
}
