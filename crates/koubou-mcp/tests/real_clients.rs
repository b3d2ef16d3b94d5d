//! Koubou's MCP server driven by real clients we did not write, over both transports:
//! - the official MCP Python SDK (`mcp` 2.3.0), in both protocol eras (`initialize` with
//!   2025-11-25, and 2026-07-28's `server/discover`), running `tests/mcp/client_test.py`;
//! - the MCP Inspector CLI 2.12.0;
//! - Claude Code 2.1.328, which must list the six tools (no login, no model call).
//!
//! The servers are this crate's examples (`mcp_embedded` on stdio, `mcp_http` on a free port),
//! each on a fresh `KOUBOU_HOME` whose only backend is `tests/mcp/fake_llm.py` (an `exec`
//! backend): fast and deterministic.
//!
//! Each test needs a client named by an environment variable, set by a script:
//!   export KOUBOU_MCP_PYTHON="$(scripts/ensure-mcp-python.sh)"
//!   export KOUBOU_MCP_INSPECTOR="$(scripts/ensure-mcp-inspector.sh)"
//!   export KOUBOU_CLAUDE_BIN="$(scripts/ensure-claude-code.sh)"
//! Unset, the test fails saying so, unless `KOUBOU_SKIP_REAL_PEERS=1` (then it says it skipped).

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    time::Instant,
};

use serde_json::Value;

/// The tests measure timings (bounded waits): run them one at a time on this small machine.
static SERIAL: Mutex<()> = Mutex::new(());

const TOOLS: [&str; 6] = ["delegate_task", "get_task", "wait_for_task", "list_tasks", "cancel_task", "system_status"];

fn peer(var: &str, script: &str) -> Option<PathBuf> {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(v) => Some(PathBuf::from(v)),
        None if std::env::var("KOUBOU_SKIP_REAL_PEERS").as_deref() == Ok("1") => {
            eprintln!("SKIPPED: {var} is not set and KOUBOU_SKIP_REAL_PEERS=1");
            None
        }
        None => panic!(
            "{var} is not set: run `export {var}=\"$(scripts/{script})\"` first \
             (or set KOUBOU_SKIP_REAL_PEERS=1 to skip the tests with real MCP clients)"
        ),
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// An example binary of this crate (`cargo test` builds them beside the test binaries).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("examples").join(name);
    assert!(p.exists(), "{} missing: run `cargo build -p koubou-mcp --examples`", p.display());
    p
}

/// A fresh `KOUBOU_HOME`: one worker, the fake LLM, short MCP waits, `files/` allowed.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        std::fs::create_dir(&files).unwrap();
        let llm = repo().join("tests/mcp/fake_llm.py");
        let toml = format!(
            r#"
[pool]
min_workers = 1
max_workers = 1

[queue]
max_attempts = 1

[mcp]
max_wait_secs = 6
progress_every_secs = 1
allowed_paths = [{files:?}]

[backends.fake]
kind = "exec"
argv = ["python3", {llm:?}]
model = "fake-echo"
concurrency = 1

[types.general]
backend = "fake"

[types.code]
backend = "fake"
"#
        );
        std::fs::write(dir.path().join("koubou.toml"), toml).unwrap();
        Home { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn files(&self) -> PathBuf {
        self.dir.path().join("files")
    }
}

/// `mcp_http` on a free port, killed on drop.
struct HttpServer {
    child: Child,
    url: String,
}

impl HttpServer {
    fn start(home: &Home) -> HttpServer {
        let mut child = Command::new(example("mcp_http"))
            .arg("0")
            .env("KOUBOU_HOME", home.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("mcp_http said {line:?}"));
        HttpServer { url: url.to_owned(), child }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let t = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    eprintln!(
        "== {what}: {} in {:.1} s\n{}{}",
        out.status,
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn python_sdk(py: &Path, home: &Home, mode: &str, transport: &[&str]) {
    let out = run(
        Command::new(py)
            .arg(repo().join("tests/mcp/client_test.py"))
            .args(["--mode", mode, "--files-dir"])
            .arg(home.files())
            .args(transport)
            .env("KOUBOU_HOME", home.path()),
        &format!("MCP Python SDK, {mode}, {}", transport[0]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains(" passed, 0 failed"), "the Python SDK checks failed (above)");
}

#[test]
fn python_sdk_over_stdio_both_eras() {
    let Some(py) = peer("KOUBOU_MCP_PYTHON", "ensure-mcp-python.sh") else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = example("mcp_embedded");
    for mode in ["legacy", "2026-07-28"] {
        let home = Home::new();
        python_sdk(&py, &home, mode, &["--stdio", server.to_str().unwrap()]);
    }
}

#[test]
fn python_sdk_over_http_both_eras() {
    let Some(py) = peer("KOUBOU_MCP_PYTHON", "ensure-mcp-python.sh") else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for mode in ["legacy", "2026-07-28"] {
        let home = Home::new();
        let server = HttpServer::start(&home);
        python_sdk(&py, &home, mode, &["--http", &server.url]);
    }
}

fn inspector(bin: &Path, home: &Home, target: &[&str], args: &[&str], what: &str) -> (Output, Value) {
    let scratch = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("--cli").env("HOME", scratch.path()).env("KOUBOU_HOME", home.path());
    if target[0].starts_with("http") {
        cmd.arg(target[0]).args(args).args(["--format", "json"]);
    } else {
        let env = format!("KOUBOU_HOME={}", home.path().display());
        cmd.args(args).args(["--format", "json", "-e", &env, "--"]).args(target);
    }
    let out = run(&mut cmd, what);
    let text = if out.stdout.is_empty() { &out.stderr } else { &out.stdout };
    let json = serde_json::from_slice(text).unwrap_or_else(|e| panic!("{what}: not JSON ({e})"));
    (out, json)
}

fn inspector_checks(bin: &Path, home: &Home, target: &[&str], name: &str) {
    for era in ["legacy", "modern"] {
        let (out, v) = inspector(
            bin,
            home,
            target,
            &["--method", "tools/list", "--protocol-era", era],
            &format!("Inspector {name} tools/list ({era})"),
        );
        assert!(out.status.success());
        let names: Vec<&str> =
            v["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names, TOOLS);
    }
    let call = |args: &str, what: &str| {
        inspector(
            bin,
            home,
            target,
            &["--method", "tools/call", "--tool-name", "delegate_task", "--tool-args-json", args],
            what,
        )
    };
    let (out, v) = call(r#"{"prompt":"hello inspector","wait_seconds":5}"#, &format!("Inspector {name} delegate_task"));
    assert!(out.status.success());
    assert_eq!(v["result"]["isError"], false);
    assert_eq!(v["result"]["structuredContent"]["status"], "completed");
    assert!(v["result"]["content"][0]["text"].as_str().unwrap().contains("echo: hello inspector"));
    // A bad argument: the tool says what is wrong (exit 5 is the Inspector's "tool returned isError").
    let (out, v) = call(r#"{"prompt":"x","priority":42}"#, &format!("Inspector {name} bad priority"));
    assert_eq!(out.status.code(), Some(5), "{v}");
    assert!(v.to_string().contains("isError"), "{v}");
    let (out, v) = inspector(
        bin,
        home,
        target,
        &["--method", "tools/call", "--tool-name", "system_status"],
        &format!("Inspector {name} system_status after the error"),
    );
    assert!(out.status.success());
    assert_eq!(v["result"]["structuredContent"]["status"], "ok");
}

#[test]
fn mcp_inspector_over_stdio_and_http() {
    let Some(bin) = peer("KOUBOU_MCP_INSPECTOR", "ensure-mcp-inspector.sh") else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = Home::new();
    let server = example("mcp_embedded");
    inspector_checks(&bin, &home, &[server.to_str().unwrap()], "stdio");
    let home = Home::new();
    let http = HttpServer::start(&home);
    inspector_checks(&bin, &home, &[&http.url], "http");
}

/// `claude -p hi --mcp-config …`: its first line lists the tools it would give its model.
fn claude_lists_tools(bin: &Path, config: Value, what: &str) {
    let scratch = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin);
    cmd.env("HOME", scratch.path())
        .env("CLAUDE_CONFIG_DIR", scratch.path().join(".claude"))
        .env("DISABLE_TELEMETRY", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("DISABLE_UPDATES", "1")
        .env("DISABLE_ERROR_REPORTING", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_GROWTHBOOK", "1")
        .env("CLAUDE_CODE_DISABLE_FEATURE_FLAGS", "1")
        .env("MCP_TIMEOUT", "15000")
        .current_dir(scratch.path())
        .args(["-p", "hi", "--strict-mcp-config", "--output-format", "stream-json", "--verbose", "--mcp-config"])
        .arg(config.to_string())
        .stdin(Stdio::null());
    let out = run(&mut cmd, what);
    let first = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_owned();
    let init: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{what}: first line not JSON ({e})"));
    let tools: Vec<&str> = init["tools"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for t in TOOLS {
        assert!(tools.contains(&format!("mcp__koubou__{t}").as_str()), "{what}: {t} missing from {tools:?}");
    }
    let server = init["mcp_servers"].as_array().unwrap().iter().find(|s| s["name"] == "koubou").unwrap();
    assert_eq!(server["status"], "connected", "{what}");
}

#[test]
fn claude_code_lists_the_tools_over_stdio_and_http() {
    let Some(bin) = peer("KOUBOU_CLAUDE_BIN", "ensure-claude-code.sh") else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = Home::new();
    let stdio = serde_json::json!({"mcpServers": {"koubou": {
        "command": example("mcp_embedded"), "args": [], "env": {"KOUBOU_HOME": home.path()}
    }}});
    claude_lists_tools(&bin, stdio, "Claude Code, stdio");
    let http = HttpServer::start(&home);
    let cfg = serde_json::json!({"mcpServers": {"koubou": {"type": "http", "url": http.url}}});
    claude_lists_tools(&bin, cfg, "Claude Code, http");
}
