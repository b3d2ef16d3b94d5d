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
};

use serde_json::Value;

#[path = "../../../tests/mcp/clients.rs"]
mod clients;
use clients::{Home, TOOLS, claude_lists_tools, claude_tool_result, peer, python_sdk, run};

/// The tests measure timings (bounded waits): run them one at a time on this small machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// An example binary of this crate (`cargo test` builds them beside the test binaries).
fn example(name: &str) -> PathBuf {
    // With a build dir shared between checkouts (CARGO_BUILD_BUILD_DIR), the examples beside
    // this test binary are those of whichever checkout built last; the target dir holds ours.
    let own = std::env::var_os("CARGO_TARGET_DIR").map(|d| PathBuf::from(d).join("debug/examples").join(name));
    let exe = std::env::current_exe().unwrap();
    let beside = exe.parent().unwrap().parent().unwrap().join("examples").join(name);
    let p = own.filter(|p| p.exists()).unwrap_or(beside);
    assert!(p.exists(), "{} missing: run `cargo build -p koubou-mcp --examples`", p.display());
    p
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

#[test]
fn python_sdk_over_stdio_both_eras() {
    let Some(py) = peer("KOUBOU_MCP_PYTHON", "ensure-mcp-python.sh") else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = example("mcp_embedded");
    for mode in ["legacy", "2026-07-28"] {
        let home = Home::new();
        python_sdk(&py, &home, mode, &["--stdio", server.to_str().unwrap()], &[]);
    }
}

#[test]
fn python_sdk_over_http_both_eras() {
    let Some(py) = peer("KOUBOU_MCP_PYTHON", "ensure-mcp-python.sh") else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for mode in ["legacy", "2026-07-28"] {
        let home = Home::new();
        let server = HttpServer::start(&home);
        python_sdk(&py, &home, mode, &["--http", &server.url], &[]);
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
    assert!(v["result"]["structuredContent"]["result"].as_str().unwrap().contains("echo: hello inspector"));
    // Once: the text block says where the answer is instead of repeating it.
    let text = v["result"]["content"][0]["text"].as_str().unwrap();
    assert!(!text.contains("echo: hello inspector") && text.contains("structuredContent.result"), "{text}");
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
    assert_eq!(v["result"]["structuredContent"]["status"], "healthy");
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

/// What Claude Code's model reads of a tool result: Claude Code 2.1.328 hands it
/// `JSON.stringify(structuredContent)` when a result has one (and drops the text blocks), so
/// the answer must be there, once.
#[test]
fn claude_code_reads_the_answer_once() {
    let Some(bin) = peer("KOUBOU_CLAUDE_BIN", "ensure-claude-code.sh") else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = Home::new();
    let stdio = serde_json::json!({"mcpServers": {"koubou": {
        "command": example("mcp_embedded"), "args": [], "env": {"KOUBOU_HOME": home.path()}
    }}});
    let args = serde_json::json!({"prompt": "hello from the master", "wait_seconds": 5});
    let block = claude_tool_result(&bin, stdio, "delegate_task", args, "Claude Code, a delegate_task turn");
    let content = match &block["content"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    assert_eq!(content.matches("echo: hello from the master").count(), 1, "the model reads the answer once: {block}");
    let read: Value =
        serde_json::from_str(&content).unwrap_or_else(|e| panic!("not the structured result ({e}): {block}"));
    assert_eq!(read["status"], "completed", "{read}");
    assert!(read["task_id"].is_string());
}
