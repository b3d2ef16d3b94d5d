//! Attacks on the real `koubou serve` from outside: child processes that dump their
//! environment, fork and hang or flood; a queue at its limit; a database another process locks.
//! Each checks the precise refusal, that nothing was executed or lost, and that the server is
//! healthy afterwards.

mod support;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::Serve;

/// Writes `koubou.toml` with one worker and the given backends/types.
fn home(dir: &Path, body: &str) {
    let cfg = format!(
        "[pool]\nmin_workers = 1\nmax_workers = 1\nlease_secs = 6\n[queue.retry]\nbase_ms = 100\nmax_ms = 200\n{body}"
    );
    std::fs::write(dir.join("koubou.toml"), cfg).unwrap();
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
    }
}

/// Polls `f` every 50 ms until it is true; panics with `what` after `secs`.
async fn until(secs: u64, what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Http {
    c: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Http {
    fn new(url: &str, token: Option<&str>) -> Http {
        Http { c: reqwest::Client::new(), url: url.to_owned(), token: token.map(str::to_owned) }
    }
    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }
    async fn submit(&self, body: Value) -> reqwest::Response {
        self.auth(self.c.post(format!("{}/task/delegate", self.url))).json(&body).send().await.unwrap()
    }
    async fn get(&self, path: &str) -> Value {
        self.auth(self.c.get(format!("{}{path}", self.url))).send().await.unwrap().json().await.unwrap()
    }
    async fn task(&self, id: &str) -> Value {
        self.get(&format!("/task/{id}/status")).await
    }
    async fn finished(&self, id: &str) -> Value {
        let mut last = Value::Null;
        until(60, &format!("task {id} to finish"), async || {
            last = self.task(id).await;
            matches!(last["status"].as_str(), Some("completed" | "failed" | "cancelled"))
        })
        .await;
        last
    }
}

/// Secrets in the server's environment reach no child: exec programs get only the minimal set
/// plus what their config names; codex gets the user's environment minus Koubou's token and the
/// other backends' keys, and its prompt on stdin (not in argv).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_never_see_koubous_token_or_other_backends_keys() {
    let dir = tempfile::tempdir().unwrap();
    let fake_codex = dir.path().join("codex");
    // A stand-in codex: writes its argv, stdin and environment as the final message (-o FILE).
    std::fs::write(
        &fake_codex,
        "#!/bin/sh\nwhile [ \"$1\" != \"-o\" ]; do shift; done\nout=$2\n\
         { echo \"ARGV: $*\"; echo \"STDIN: $(cat)\"; env; } > \"$out\"\n",
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&fake_codex).unwrap().permissions(), 0o755);
    std::fs::set_permissions(&fake_codex, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    home(
        dir.path(),
        &format!(
            r#"
[backends.dump]
kind = "exec"
argv = ["sh", "-c", "cat >/dev/null; env"]
pass_env = ["KOUBOU_TEST_PASSED", "KOUBOU_AUTH_TOKEN"]
env = {{ FROM_CONFIG = "yes" }}
[backends.codex]
kind = "codex"
program = "{}"
workdir = "{}"
remote = false
[backends.paid]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "OPENAI_API_KEY"
[types.general]
backend = "dump"
[types.code]
backend = "codex"
"#,
            fake_codex.display(),
            dir.path().display()
        ),
    );
    let env = [
        ("KOUBOU_AUTH_TOKEN", "koubou-secret-token"),
        ("OPENAI_API_KEY", "sk-other-backends-key"),
        ("KOUBOU_TEST_PASSED", "passed"),
        ("KOUBOU_TEST_USER_VAR", "users-own"),
    ];
    let s = Serve::start_with_env(dir.path(), &[], &env);
    let http = Http::new(&s.url, Some("koubou-secret-token"));

    let v: Value = http.submit(json!({"prompt": "dump"})).await.json().await.unwrap();
    let t = http.finished(v["task_id"].as_str().unwrap()).await;
    assert_eq!(t["status"], "completed", "{t}");
    let out = t["result"]["output"].as_str().unwrap();
    let names: Vec<&str> = out.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    for secret in ["koubou-secret-token", "sk-other-backends-key", "users-own"] {
        assert!(!out.contains(secret), "exec child saw {secret}:\n{out}");
    }
    assert!(out.contains("KOUBOU_TEST_PASSED=passed") && out.contains("FROM_CONFIG=yes"), "{out}");
    for n in &names {
        assert!(
            ["PATH", "HOME", "USER", "LANG", "TMPDIR", "KOUBOU_TEST_PASSED", "FROM_CONFIG", "PWD", "SHLVL", "_"]
                .contains(n)
                || n.starts_with("LC_"),
            "exec child got {n}:\n{out}"
        );
    }

    let prompt = "--help; $(id) the task text";
    let v: Value = http.submit(json!({"type": "code", "prompt": prompt})).await.json().await.unwrap();
    let t = http.finished(v["task_id"].as_str().unwrap()).await;
    assert_eq!(t["status"], "completed", "{t}");
    let out = t["result"]["output"].as_str().unwrap();
    assert!(
        !out.contains("koubou-secret-token") && !out.contains("sk-other-backends-key"),
        "codex saw a secret:\n{out}"
    );
    assert!(out.contains("KOUBOU_TEST_USER_VAR=users-own"), "codex keeps the user's environment:\n{out}");
    let argv = out.lines().find(|l| l.starts_with("ARGV: ")).unwrap();
    assert!(argv.ends_with(" -- -") && !argv.contains("the task text"), "{argv}");
    assert!(out.contains(&format!("STDIN: {prompt}")), "{out}");

    // A model name that would read as an option is refused at the door.
    let r = http.submit(json!({"type": "code", "prompt": "x", "model": "--yolo"})).await;
    assert_eq!(r.status(), 400);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["field"], "model", "{b}");
}

/// After `kill -9` of the server, no process a task started is left — not the program, not the
/// grandchild it forked — and the restarted server runs the task again only once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_server_leaves_no_child_and_recovery_runs_no_second_copy() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let marker = dir.path().join("ran-once");
    // First run: fork a grandchild, record both pids, hang. Second run: report whether any
    // process of the first is still alive.
    let script = format!(
        "cat >/dev/null; if [ -e {m} ]; then for p in $(cat {p}); do st=$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null); \
         [ -n \"$st\" ] && [ \"$st\" != Z ] && echo \"old $p alive\"; done; \
         echo second run; exit 0; fi; touch {m}; sleep 1000 & echo $$ $! > {p}; echo started; wait",
        m = marker.display(),
        p = pids.display()
    );
    home(
        dir.path(),
        &format!(
            "[backends.hang]\nkind = \"exec\"\nargv = [\"sh\", \"-c\", {script:?}]\n[types.general]\nbackend = \"hang\"\n\
             [types.code]\nbackend = \"hang\"\n"
        ),
    );
    let s = Serve::start(dir.path(), &[]);
    let http = Http::new(&s.url, None);
    let v: Value = http.submit(json!({"prompt": "fork and hang"})).await.json().await.unwrap();
    let id = v["task_id"].as_str().unwrap().to_owned();
    let mut both: Vec<i32> = vec![];
    until(60, "the program and its grandchild to start", async || {
        both = std::fs::read_to_string(&pids)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        both.len() == 2
    })
    .await;
    assert!(both.iter().all(|&p| alive(p)));
    s.kill9();
    until(30, "every process the task started to be gone", async || both.iter().all(|&p| !alive(p))).await;

    let s = Serve::start(dir.path(), &[]);
    let http = Http::new(&s.url, None);
    let t = http.finished(&id).await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(t["result"]["output"], "second run\n", "the recovered run found an older copy alive: {t}");
    let h = http.get("/health").await;
    assert_eq!(h["queue"]["completed"], 1, "{h}");
}

/// A backend that streams without end is stopped at `max_result_bytes`: the task fails "output
/// too large", the program is killed with its group, the kept partial is within the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_output_is_cut_at_max_result_bytes_and_its_process_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    home(
        dir.path(),
        &format!(
            "[limits]\nmax_result_bytes = 100000\n[backends.flood]\nkind = \"exec\"\n\
             argv = [\"sh\", \"-c\", \"echo $$ > {}; exec yes koubou\"]\n[types.general]\nbackend = \"flood\"\n\
             [types.code]\nbackend = \"flood\"\n",
            pidfile.display()
        ),
    );
    let s = Serve::start(dir.path(), &[]);
    let http = Http::new(&s.url, None);
    let v: Value = http.submit(json!({"prompt": "flood"})).await.json().await.unwrap();
    let t = http.finished(v["task_id"].as_str().unwrap()).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert!(t["error"].as_str().unwrap().contains("output too large"), "{t}");
    assert_eq!(t["attempts"], 1, "not retried: the same program would flood again");
    assert!(t["partial"].as_str().map_or(0, str::len) <= 100_000, "partial kept beyond the limit");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    until(30, "the flooding program to be killed", async || !alive(pid)).await;
    assert_eq!(http.get("/health").await["status"], "healthy");
}

/// At `max_pending` waiting tasks every face refuses the next submission with the limit named
/// (REST: 429 + Retry-After), nothing accepted is dropped, and room brings acceptance back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_on_every_face_and_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    home(
        dir.path(),
        "[limits]\nmax_pending = 3\n[backends.hang]\nkind = \"exec\"\nargv = [\"sleep\", \"1000\"]\n\
         [types.general]\nbackend = \"hang\"\n[types.code]\nbackend = \"hang\"\n",
    );
    let gql_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let s = Serve::start(dir.path(), &["--graphql-port", &gql_port]);
    let http = Http::new(&s.url, None);
    let mut ids = Vec::new();
    let first: Value = http.submit(json!({"prompt": "runs"})).await.json().await.unwrap();
    ids.push(first["task_id"].as_str().unwrap().to_owned());
    until(60, "the first task to run", async || http.task(&ids[0]).await["status"] == "running").await;
    for i in 0..3 {
        let r = http.submit(json!({"prompt": format!("waits {i}")})).await;
        assert_eq!(r.status(), 200);
        ids.push(r.json::<Value>().await.unwrap()["task_id"].as_str().unwrap().to_owned());
    }
    // REST.
    let r = http.submit(json!({"prompt": "one too many"})).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "queue_full", "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("max_pending"), "{b}");
    // WebSocket (/ws on the main port).
    let ws_url = format!("{}/ws", s.url.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    use futures::{SinkExt, StreamExt};
    let msg = json!({"type": "submit_task", "ref": 1, "payload": {"prompt": "ws one too many"}});
    ws.send(tokio_tungstenite::tungstenite::Message::text(msg.to_string())).await.unwrap();
    let reply = loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.unwrap().unwrap().unwrap();
        let v: Value = match m.to_text() {
            Ok(t) => serde_json::from_str(t).unwrap_or(Value::Null),
            Err(_) => continue,
        };
        if v["type"] == "error" || v["type"] == "task_submitted" {
            break v;
        }
    };
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["error"]["code"], "queue_full", "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("max_pending"), "{reply}");
    // MCP over HTTP.
    let text = mcp_delegate(&http, json!({"prompt": "mcp one too many"})).await;
    assert!(text.contains("\"isError\":true") && text.contains("max_pending"), "{text}");
    // GraphQL.
    let q = json!({"query": "mutation { submitTask(prompt: \"gql one too many\") { taskId } }"});
    let gql = format!("http://127.0.0.1:{gql_port}/graphql");
    let v: Value = http.c.post(gql).json(&q).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["errors"][0]["extensions"]["code"], "queue_full", "{v}");
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("max_pending"), "{v}");
    // Nothing accepted was dropped, nothing refused was stored.
    let all = http.get("/tasks?limit=100").await;
    assert_eq!(all["total"], 4, "{all}");
    for id in &ids {
        assert!(matches!(http.task(id).await["status"].as_str(), Some("pending" | "running")));
    }
    // Room again: cancel one waiting task and the next submission is accepted.
    http.auth(http.c.post(format!("{}/task/{}/cancel", s.url, ids[3]))).send().await.unwrap();
    assert_eq!(http.submit(json!({"prompt": "fits now"})).await.status(), 200);
}

/// `delegate_task` over the server's `/mcp`; the raw answer (an SSE stream).
async fn mcp_delegate(http: &Http, arguments: Value) -> String {
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "delegate_task", "arguments": arguments}});
    let r = http
        .auth(http.c.post(format!("{}/mcp", http.url)))
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18")
        .json(&call);
    r.send().await.unwrap().text().await.unwrap()
}

/// MCP over HTTP attaches no file while `[mcp] allowed_paths` is unset (any local user can
/// reach the port): the call is refused naming the setting, and nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_over_http_attaches_nothing_without_allowed_paths() {
    let dir = tempfile::tempdir().unwrap();
    home(
        dir.path(),
        "[backends.e]\nkind = \"echo\"\n[types.general]\nbackend = \"e\"\n[types.code]\nbackend = \"e\"\n",
    );
    let secret = dir.path().join("koubou.toml");
    let s = Serve::start(dir.path(), &[]);
    let http = Http::new(&s.url, None);
    let text = mcp_delegate(&http, json!({"prompt": "summarize", "files": [secret.to_str().unwrap()]})).await;
    assert!(text.contains("\"isError\":true") && text.contains("allowed_paths"), "{text}");
    assert!(!text.contains("[backends.e]"), "file content leaked: {text}");
    assert_eq!(http.get("/tasks").await["total"], 0);
}

/// Another process holding the database's write lock: a submission is answered 503
/// `database_locked` with Retry-After, nothing is stored, and once the lock is gone the server
/// accepts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_is_503_with_retry_after_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    home(
        dir.path(),
        "[backends.e]\nkind = \"echo\"\n[types.general]\nbackend = \"e\"\n[types.code]\nbackend = \"e\"\n",
    );
    let s = Serve::start(dir.path(), &[]);
    let http = Http::new(&s.url, None);
    assert_eq!(http.submit(json!({"prompt": "before"})).await.status(), 200);
    let db = dir.path().join("db").join("koubou.db");
    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let r =
        tokio::time::timeout(Duration::from_secs(30), http.submit(json!({"prompt": "while locked"}))).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "database_locked", "{b}");
    other.execute_batch("ROLLBACK").unwrap();
    drop(other);
    assert_eq!(http.submit(json!({"prompt": "after"})).await.status(), 200);
    let all = http.get("/tasks?limit=10").await;
    let prompts: Vec<&str> = all["tasks"].as_array().unwrap().iter().map(|t| t["prompt"].as_str().unwrap()).collect();
    assert_eq!(prompts, ["after", "before"]);
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(st.success(), "mounting a tmpfs needs root (the disk-full test fills one)");
        Tmpfs(dir)
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// The database on a disk that fills up: submissions are answered 503 `disk_full` with
/// Retry-After (not 500), nothing acknowledged is lost, and once there is room again the server
/// accepts and every acknowledged task completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_503_with_retry_after_loses_nothing_and_recovers() {
    let fs = Tmpfs::mount("3m");
    let dir = tempfile::tempdir().unwrap();
    let db = fs.path().join("koubou.db");
    home(
        dir.path(),
        &format!(
            "[queue]\npath = \"{}\"\n[backends.e]\nkind = \"echo\"\nreply = \"done\"\n[types.general]\nbackend = \"e\"\n\
             [types.code]\nbackend = \"e\"\n",
            db.display()
        ),
    );
    let s = Serve::start(dir.path(), &[]);
    let http = Http::new(&s.url, None);
    let mut acked: Vec<String> = Vec::new();
    for i in 0..5 {
        let r = http.submit(json!({"prompt": format!("before {i}")})).await;
        assert_eq!(r.status(), 200);
        acked.push(r.json::<Value>().await.unwrap()["task_id"].as_str().unwrap().to_owned());
    }
    // Fill the file system to the last byte.
    let filler = fs.path().join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let big = "x".repeat(256 << 10);
    let mut refused = None;
    for i in 0..40 {
        let r = http.submit(json!({"prompt": format!("{i} {big}")})).await;
        match r.status().as_u16() {
            200 => acked.push(r.json::<Value>().await.unwrap()["task_id"].as_str().unwrap().to_owned()),
            503 => {
                let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                refused = Some((retry, r.json::<Value>().await.unwrap()));
                break;
            }
            other => panic!("expected 200 or 503 on a full disk, got {other}: {}", r.text().await.unwrap()),
        }
    }
    let (retry, body) = refused.expect("a full disk never refused a submission");
    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok()), "no Retry-After");
    assert_eq!(body["error"]["code"], "disk_full", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("nothing was stored"), "{body}");
    // Room again.
    std::fs::remove_file(&filler).unwrap();
    let mut after = None;
    until(60, "a submission to be accepted once there is room", async || {
        let r = http.submit(json!({"prompt": "after"})).await;
        if r.status() == 200 {
            after = Some(r.json::<Value>().await.unwrap()["task_id"].as_str().unwrap().to_owned());
        }
        after.is_some()
    })
    .await;
    acked.extend(after);
    for id in &acked {
        let t = http.finished(id).await;
        assert_eq!(t["status"], "completed", "acknowledged task lost or failed: {t}");
    }
    assert_eq!(http.get("/tasks?limit=1").await["total"], acked.len(), "nothing refused was stored");
    assert_eq!(http.get("/health").await["status"], "healthy");
}

/// A misbehaving OpenAI-compatible server: by prompt, it answers garbage, cuts the stream after
/// one chunk, or accepts and never answers.
async fn bad_llm() -> std::net::SocketAddr {
    use axum::{Json, routing::post};
    async fn chat(Json(body): Json<Value>) -> axum::response::Response {
        let prompt = body["messages"][0]["content"].as_str().unwrap_or_default().to_owned();
        let sse = |b: axum::body::Body| {
            axum::response::Response::builder().header("content-type", "text/event-stream").body(b).unwrap()
        };
        match prompt.as_str() {
            "garbage" => sse("{{{ not an event stream at all ]]]\n\n".into()),
            "cut" => {
                let chunk = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"half\"}}]}\n\n";
                sse(axum::body::Body::from_stream(futures::stream::iter([Ok::<_, std::io::Error>(chunk)])))
            }
            _ => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                sse("".into())
            }
        }
    }
    let app = axum::Router::new().route("/v1/chat/completions", post(chat));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

/// A backend down from the start, one answering garbage, one cutting the stream, one hanging:
/// each task is tried a bounded number of times, then fails with words that say what happened,
/// and `/health` shows the dead backend down; the server stays healthy for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_backends_get_bounded_retries_then_a_clear_failure() {
    let bad = bad_llm().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    home(
        dir.path(),
        &format!(
            r#"
[queue]
max_attempts = 2
[backends.dead]
kind = "openai"
base_url = "http://{dead}/v1"
api_key_env = ""
[backends.bad]
kind = "openai"
base_url = "http://{bad}/v1"
api_key_env = ""
[types.general]
backend = "bad"
timeout_secs = 2
[types.code]
backend = "dead"
"#
        ),
    );
    let s = Serve::start(dir.path(), &[]);
    let http = Http::new(&s.url, None);
    let mut cases = Vec::new();
    for (ty, prompt, words) in [
        ("code", "anything", "unreachable"),
        ("general", "garbage", "ended early"),
        ("general", "cut", "ended early"),
        ("general", "hang", "did not finish within 2s"),
    ] {
        let v: Value = http.submit(json!({"type": ty, "prompt": prompt})).await.json().await.unwrap();
        cases.push((v["task_id"].as_str().unwrap().to_owned(), prompt, words));
    }
    for (id, prompt, words) in cases {
        let t = http.finished(&id).await;
        eprintln!("{prompt}: {}", t["error"]);
        assert_eq!(t["status"], "failed", "{prompt}: {t}");
        assert_eq!(t["attempts"], 2, "{prompt}: retries are bounded by max_attempts");
        let error = t["error"].as_str().unwrap();
        assert!(error.contains(words), "{prompt}: {error}");
    }
    let h = http.get("/health").await;
    let dead_b = h["backends"].as_array().unwrap().iter().find(|b| b["name"] == "dead").unwrap().clone();
    assert_eq!(dead_b["up"], false, "{h}");
    assert!(!dead_b["detail"].as_str().unwrap().is_empty());
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["queue"]["failed"], 4);
}

/// SIGTERM while tasks run and more wait: the server stops claiming, lets running tasks finish
/// (or hands them back), exits by itself, and a restart completes every accepted task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    home(
        dir.path(),
        "[backends.slow]\nkind = \"exec\"\nargv = [\"sh\", \"-c\", \"cat >/dev/null; sleep 0.3; echo done\"]\n\
         concurrency = 1\n[types.general]\nbackend = \"slow\"\n[types.code]\nbackend = \"slow\"\n",
    );
    let mut s = Serve::start(dir.path(), &[]);
    let http = Http::new(&s.url, None);
    let mut ids = Vec::new();
    for i in 0..20 {
        let v: Value = http.submit(json!({"prompt": format!("job {i}")})).await.json().await.unwrap();
        ids.push(v["task_id"].as_str().unwrap().to_owned());
    }
    until(60, "a task to be running", async || http.get("/health").await["queue"]["running"] == 1).await;
    let pid = s.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "koubou serve did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
    drop(s);
    let s = Serve::start(dir.path(), &[]);
    let http = Http::new(&s.url, None);
    for id in &ids {
        let t = http.finished(id).await;
        assert_eq!((t["status"].as_str(), t["result"]["output"].as_str()), (Some("completed"), Some("done\n")), "{t}");
    }
}
