//! MCP through the real `koubou` binary, with clients we did not write: the MCP Python SDK over
//! `koubou mcp --embedded` (stdio), over `koubou mcp` talking to a running `koubou serve`
//! (stdio → HTTP client), and over `koubou serve`'s `/mcp`; and Claude Code listing the tools
//! over stdio and HTTP. (The koubou-mcp crate's own tests cover the same with its examples.)

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;
use support::{Serve, bin};

fn peer(var: &str, script: &str) -> Option<PathBuf> {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(v) => Some(PathBuf::from(v)),
        None if std::env::var("KOUBOU_SKIP_REAL_PEERS").as_deref() == Ok("1") => {
            eprintln!("SKIPPED: {var} is not set and KOUBOU_SKIP_REAL_PEERS=1");
            None
        }
        None => panic!("{var} is not set: run `export {var}=\"$(scripts/{script})\"` first"),
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A home whose tasks go to the streaming fake craftsman (tests/mcp/fake_llm.py).
fn home() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let llm = repo().join("tests/mcp/fake_llm.py");
    let toml = format!(
        "[pool]\nmin_workers = 1\nmax_workers = 1\n[queue]\nmax_attempts = 1\n\
         [mcp]\nmax_wait_secs = 6\nprogress_every_secs = 1\nallowed_paths = [{files:?}]\n\
         [backends.fake]\nkind = \"exec\"\nargv = [\"python3\", {llm:?}]\nmodel = \"fake-echo\"\n\
         [types.general]\nbackend = \"fake\"\n[types.code]\nbackend = \"fake\"\n"
    );
    std::fs::write(dir.path().join("koubou.toml"), toml).unwrap();
    dir
}

fn python_sdk(py: &Path, home: &Path, mode: &str, transport: &[&str], env: &[(&str, &str)]) {
    let out = Command::new(py)
        .arg(repo().join("tests/mcp/client_test.py"))
        .args(["--mode", mode, "--files-dir"])
        .arg(home.join("files"))
        .args(transport)
        .env("KOUBOU_HOME", home)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains(" passed, 0 failed"), "{mode} {transport:?}: checks failed");
}

#[test]
fn python_sdk_through_the_koubou_binary() {
    let Some(py) = peer("KOUBOU_MCP_PYTHON", "ensure-mcp-python.sh") else { return };
    let koubou = bin();
    let k = koubou.to_str().unwrap();
    // stdio, in-process system.
    let h = home();
    python_sdk(&py, h.path(), "2026-07-28", &["--stdio", k, "mcp", "--embedded"], &[]);
    // stdio, relaying to a running server; and that server's /mcp.
    let h = home();
    let s = Serve::start(h.path(), &[]);
    python_sdk(&py, h.path(), "legacy", &["--stdio", k, "mcp"], &[("KOUBOU_URL", &s.url)]);
    let h2 = home();
    let s2 = Serve::start(h2.path(), &[]);
    python_sdk(&py, h2.path(), "2026-07-28", &["--http", &format!("{}/mcp", s2.url)], &[]);
}

fn claude_tools(bin: &Path, config: Value) -> (Vec<String>, Value) {
    let scratch = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .env("HOME", scratch.path())
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
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let first = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_owned();
    let init: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("first line not JSON ({e}): {first}"));
    let tools = init["tools"].as_array().unwrap().iter().filter_map(Value::as_str).map(str::to_owned).collect();
    let server = init["mcp_servers"].as_array().unwrap().iter().find(|s| s["name"] == "koubou").unwrap().clone();
    (tools, server)
}

#[test]
fn claude_code_sees_koubou_over_stdio_and_http() {
    let Some(claude) = peer("KOUBOU_CLAUDE_BIN", "ensure-claude-code.sh") else { return };
    let h = home();
    let stdio = serde_json::json!({"mcpServers": {"koubou": {
        "command": bin(), "args": ["mcp", "--embedded"], "env": {"KOUBOU_HOME": h.path()}
    }}});
    let s = Serve::start(h.path(), &[]);
    let http = serde_json::json!({"mcpServers": {"koubou": {"type": "http", "url": format!("{}/mcp", s.url)}}});
    for (what, cfg) in [("stdio", stdio), ("http", http)] {
        let (tools, server) = claude_tools(&claude, cfg);
        assert_eq!(server["status"], "connected", "{what}: {server}");
        for t in ["delegate_task", "get_task", "wait_for_task", "list_tasks", "cancel_task", "system_status"] {
            assert!(tools.contains(&format!("mcp__koubou__{t}")), "{what}: {t} missing from {tools:?}");
        }
    }
}
