//! Test support: start the real `koubou` binary, and a fake OpenAI-compatible LLM on loopback.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, response::IntoResponse, routing::post};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_koubou"))
}

/// A running `koubou serve` child; killed on drop.
pub struct Serve {
    pub child: Child,
    pub url: String,
    pub stderr_log: PathBuf,
    /// `ws://127.0.0.1:PORT` when the WebSocket port is on (see [`Serve::start_all`]).
    pub ws_url: Option<String>,
    /// `http://127.0.0.1:PORT/graphql` when the GraphQL port is on.
    pub graphql_url: Option<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Starts `koubou serve --home HOME --port 0 …` and waits for its "serving on" line.
    pub fn start(home: &Path, extra: &[&str]) -> Serve {
        Serve::start_with_env(home, extra, &[])
    }

    /// [`Serve::start`] with the WebSocket and GraphQL ports on, each on a free port.
    pub fn start_all(home: &Path, extra: &[&str]) -> Serve {
        let mut args = vec!["--ws-port", "any", "--graphql-port", "any"];
        args.extend_from_slice(extra);
        let s = Serve::start(home, &args);
        assert!(s.ws_url.is_some() && s.graphql_url.is_some(), "serve did not announce every port");
        s
    }

    /// [`Serve::start`] with extra environment variables.
    pub fn start_with_env(home: &Path, extra: &[&str], env: &[(&str, &str)]) -> Serve {
        // In the home, or beside it when serve is to create the home.
        let log_dir = if home.is_dir() { home } else { home.parent().expect("a home with a parent") };
        let log = log_dir.join(format!(
            "serve-stderr-{}.log",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        // A face's port given in `extra` replaces the 0 that leaves it unbound.
        let ports = ["--port", "--ws-port", "--graphql-port"].into_iter().filter(|p| !extra.contains(p));
        let args: Vec<&str> = std::iter::once("serve").chain(ports.flat_map(|p| [p, "0"])).collect();
        // LOG_LEVEL info unless `env` says otherwise (a later entry wins).
        let env: Vec<(&str, &str)> = std::iter::once(("LOG_LEVEL", "info")).chain(env.iter().copied()).collect();
        let mut child = koubou_command(&args, home, &env).args(extra).spawn().expect("start koubou serve");
        let (tx, rx) = std::sync::mpsc::channel();
        let (mut sent, mut ws, mut graphql) = (false, None, None);
        let url_after = |line: &str, what: &str| {
            line.split(what).nth(1).and_then(|rest| rest.split_whitespace().next()).map(str::to_owned)
        };
        tee_stderr(&mut child, &log, move |line| {
            // The other ports are announced before the main one.
            ws = ws.take().or_else(|| url_after(line, "koubou WebSocket is serving on "));
            graphql = graphql.take().or_else(|| url_after(line, "koubou GraphQL is serving on "));
            if !sent && let Some(url) = url_after(line, "koubou is serving on ") {
                let _ = tx.send((url, ws.take(), graphql.take()));
                sent = true;
            }
        });
        let (url, ws_url, graphql_url) = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            panic!("koubou serve did not start; stderr:\n{}", std::fs::read_to_string(&log).unwrap_or_default())
        });
        Serve { child, url, stderr_log: log, ws_url, graphql_url }
    }

    pub fn kill9(mut self) {
        unsafe_kill(self.child.id());
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

/// Copies `child`'s stderr into `log`, line by line, calling `on_line` with each.
fn tee_stderr(child: &mut Child, log: &Path, mut on_line: impl FnMut(&str) + Send + 'static) {
    let stderr = child.stderr.take().unwrap();
    let log = log.to_owned();
    std::thread::spawn(move || {
        let mut f = std::fs::File::create(&log).unwrap();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
            on_line(&line);
        }
    });
}

/// `POST /task/delegate` with `body`; the answer.
pub async fn delegate(url: &str, body: serde_json::Value) -> serde_json::Value {
    reqwest::Client::new().post(format!("{url}/task/delegate")).json(&body).send().await.unwrap().json().await.unwrap()
}

/// Submits through `POST /task/delegate` and returns the new task's id.
#[allow(dead_code)]
pub async fn submit(url: &str, body: serde_json::Value) -> String {
    let r = delegate(url, body).await;
    r["task_id"].as_str().unwrap_or_else(|| panic!("no task_id: {r}")).to_owned()
}

/// Opens the SSE events of task `id` on `url` (`GET /task/<id>/events`). Once it has answered,
/// the server watches the task: every event from then on reaches the stream (a watch starts at
/// once; what was published before is not replayed).
#[allow(dead_code)]
pub async fn watch_events(url: &str, id: &str) -> reqwest::Response {
    let r = reqwest::get(format!("{url}/task/{id}/events")).await.unwrap();
    assert!(r.status().is_success(), "GET /task/{id}/events: {}", r.status());
    r
}

/// The events of an opened SSE stream, until it ends at the task's end.
#[allow(dead_code)]
pub async fn read_events(sse: reqwest::Response) -> Vec<serde_json::Value> {
    let body = sse.text().await.unwrap();
    body.lines().filter_map(|l| l.strip_prefix("data:")).filter_map(|d| serde_json::from_str(d.trim()).ok()).collect()
}

/// The SSE events of task `id` on `url` from now until the task's end.
#[allow(dead_code)]
pub async fn task_events(url: &str, id: &str) -> Vec<serde_json::Value> {
    read_events(watch_events(url, id).await).await
}

/// The text of the `task_token` events among `events`, each checked to be named after node
/// `origin`.
#[allow(dead_code)]
pub fn tokens_from(events: &[serde_json::Value], origin: &str) -> String {
    events
        .iter()
        .filter(|e| e["event"] == "task_token")
        .inspect(|e| assert_eq!(e["origin"], origin, "a token not named after its node: {e}"))
        .map(|e| e["text"].as_str().unwrap())
        .collect()
}

fn unsafe_kill(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Runs the CLI with `args`, returning (exit code, stdout, stderr).
pub fn cli(home: &Path, url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["--home"])
        .arg(home)
        .args(["--url", url])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run koubou");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A fake OpenAI-compatible server: streams "echo: <prompt>" in words over `delay` (changeable
/// while it runs); counts calls per prompt and records when each began and ended. A prompt
/// containing "slow" takes 30 s; one containing "fail" gets a 500.
#[derive(Clone, Default)]
pub struct FakeLlm {
    pub calls: Arc<Mutex<HashMap<String, usize>>>,
    log: Arc<Mutex<Vec<Call>>>,
    delay: Arc<Mutex<Duration>>,
}

/// One call to a [`FakeLlm`]: its prompt, when it began, and when its stream ended (or was
/// dropped: the caller went away).
#[derive(Clone, Debug)]
#[allow(dead_code)]
pub struct Call {
    pub prompt: String,
    pub start: std::time::Instant,
    pub end: Option<std::time::Instant>,
}

/// Marks its call ended when dropped: the stream finished or the connection went away.
struct Ended {
    log: Arc<Mutex<Vec<Call>>>,
    i: usize,
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.log.lock().unwrap()[self.i].end = Some(std::time::Instant::now());
    }
}

async fn chat(State(f): State<FakeLlm>, Json(body): Json<serde_json::Value>) -> axum::response::Response {
    let prompt =
        body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("").to_owned();
    *f.calls.lock().unwrap().entry(prompt.clone()).or_default() += 1;
    let ended = {
        let mut log = f.log.lock().unwrap();
        log.push(Call { prompt: prompt.clone(), start: std::time::Instant::now(), end: None });
        Ended { log: f.log.clone(), i: log.len() - 1 }
    };
    if prompt.contains("fail") {
        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
    }
    let delay = if prompt.contains("slow") { Duration::from_secs(30) } else { *f.delay.lock().unwrap() };
    let words: Vec<String> = format!("echo: {prompt}").split_inclusive(' ').map(str::to_owned).collect();
    let stream = async_stream(words, delay, ended);
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(stream))
        .unwrap()
}

/// The chunks of `words` over `delay`; `ended` goes with the stream.
fn async_stream(
    words: Vec<String>,
    delay: Duration,
    ended: Ended,
) -> impl futures::Stream<Item = Result<String, std::io::Error>> {
    let per_word = delay / (words.len() as u32 + 1);
    let chunks = words.into_iter().map(|w| {
        let d = serde_json::json!({"choices":[{"index":0,"delta":{"content":w}}]});
        format!("data: {d}\n\n")
    });
    let tail = [
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n".to_owned(),
        "data: [DONE]\n\n".to_owned(),
    ];
    futures::stream::iter(chunks.chain(tail)).then(move |c| {
        let _ended = &ended;
        async move {
            tokio::time::sleep(per_word).await;
            Ok(c)
        }
    })
}

use futures::StreamExt;

impl FakeLlm {
    pub async fn start(delay: Duration) -> (FakeLlm, SocketAddr) {
        let f = FakeLlm { delay: Arc::new(Mutex::new(delay)), ..FakeLlm::default() };
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route(
                "/v1/models",
                axum::routing::get(|| async {
                    Json(serde_json::json!({"object":"list","data":[{"id":"fake","object":"model"}]}))
                }),
            )
            .with_state(f.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        (f, addr)
    }

    pub fn calls(&self, prompt: &str) -> usize {
        self.calls.lock().unwrap().get(prompt).copied().unwrap_or(0)
    }

    /// Every call so far, in the order they came.
    #[allow(dead_code)]
    pub fn log(&self) -> Vec<Call> {
        self.log.lock().unwrap().clone()
    }

    /// How long the next answers take.
    #[allow(dead_code)]
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }
}

/// A home whose koubou.toml routes `general` and `code` to the fake server.
pub fn home_with_fake(dir: &Path, fake: SocketAddr, extra: &str) {
    let cfg = format!(
        r#"
[pool]
min_workers = 2
max_workers = 4
lease_secs = 6
cooldown_ms = 200
[queue.retry]
base_ms = 100
max_ms = 200
[backends.fake]
kind = "openai"
base_url = "http://{fake}/v1"
model = "fake"
api_key_env = ""
concurrency = 4
[types.general]
backend = "fake"
[types.code]
backend = "fake"
{extra}
"#
    );
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("koubou.toml"), cfg).unwrap();
}

/// A fake Ollama: `/api/tags` lists gemma2:2b; `/api/chat` streams "ollama says: <prompt>" as NDJSON.
pub async fn fake_ollama() -> SocketAddr {
    async fn tags() -> impl IntoResponse {
        Json(serde_json::json!({"models": [{"name": "gemma2:2b", "model": "gemma2:2b"}]}))
    }
    async fn chat(Json(body): Json<serde_json::Value>) -> impl IntoResponse {
        let prompt =
            body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("");
        let model = body["model"].as_str().unwrap_or("");
        let mut lines = String::new();
        for w in format!("ollama says: {prompt}").split_inclusive(' ') {
            let l = serde_json::json!({"model": model, "message": {"role": "assistant", "content": w}, "done": false});
            lines.push_str(&format!("{l}\n"));
        }
        let last = serde_json::json!({"model": model, "message": {"role": "assistant", "content": ""}, "done": true,
            "done_reason": "stop", "prompt_eval_count": 9, "eval_count": 4});
        lines.push_str(&format!("{last}\n"));
        ([("content-type", "application/x-ndjson")], lines)
    }
    let app = Router::new().route("/api/tags", axum::routing::get(tags)).route("/api/chat", post(chat));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

/// A namespace of its own on the machine's Redis (`KOUBOU_TEST_REDIS`), its keys deleted on drop.
#[allow(unused_imports)]
pub use koubou_queue::redis::testing::Namespace as RedisNamespace;

pub fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    h.finish()
}

/// A running `koubou worker` child; killed on drop.
pub struct Worker {
    pub child: Child,
    pub stderr_log: PathBuf,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    /// Starts `koubou worker --home HOME …` and waits for its "is running" line.
    pub fn start(home: &Path, args: &[&str]) -> Worker {
        Worker::start_via(&[], home, args)
    }

    /// [`Worker::start`] through a program that runs it (e.g. `ip netns exec NAME`).
    pub fn start_via(via: &[String], home: &Path, args: &[&str]) -> Worker {
        let log = home.join(format!(
            "worker-stderr-{}.log",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let mut cmd = match via.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let mut child = cmd
            .arg("worker")
            .arg("--home")
            .arg(home)
            .args(args)
            .env("LOG_LEVEL", "info")
            .env_remove("KOUBOU_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start koubou worker");
        let (tx, rx) = std::sync::mpsc::channel();
        tee_stderr(&mut child, &log, move |line| {
            if line.contains("koubou worker ") && line.ends_with(" is running") {
                let _ = tx.send(());
            }
        });
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            panic!("koubou worker did not start; stderr:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        Worker { child, stderr_log: log }
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let code = self.child.wait().ok().and_then(|s| s.code());
        std::mem::forget(self);
        code
    }

    pub fn kill9(mut self) {
        unsafe_kill(self.child.id());
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

/// `koubou ARGS --home HOME` with `env` (and not the caller's `KOUBOU_HOME`), stdin and
/// stdout null, stderr piped; more arguments may follow.
pub fn koubou_command(args: &[&str], home: &Path, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(bin());
    c.args(args)
        .arg("--home")
        .arg(home)
        .env_remove("KOUBOU_HOME")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Runs `koubou ARGS --home HOME` (with `env`), which must exit with a failure on its own (it is
/// killed after a minute): its stderr.
pub fn refused(home: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = koubou_command(args, home, env).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("koubou {args:?} was not refused");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "koubou {args:?} succeeded: {err}");
    err
}
