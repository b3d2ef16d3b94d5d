//! Shared by the tests that drive Koubou's MCP server with real clients (crates/koubou-mcp's
//! and crates/koubou's): finding the clients, a home whose craftsman is `fake_llm.py`, running
//! the MCP Python SDK checks and asking Claude Code which tools it sees.
//! Included with `#[path = "../../../tests/mcp/clients.rs"] mod clients;`.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Instant,
};

use serde_json::Value;

pub const TOOLS: [&str; 6] =
    ["delegate_task", "get_task", "wait_for_task", "list_tasks", "cancel_task", "system_status"];

pub fn peer(var: &str, script: &str) -> Option<PathBuf> {
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

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A fresh `KOUBOU_HOME`: one worker, the fake LLM, short MCP waits, `files/` allowed.
pub struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Home {
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
max_result_chars = 1000
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
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn files(&self) -> PathBuf {
        self.dir.path().join("files")
    }
}

pub fn run(cmd: &mut Command, what: &str) -> Output {
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

pub fn python_sdk(py: &Path, home: &Home, mode: &str, transport: &[&str], env: &[(&str, &str)]) {
    let out = run(
        Command::new(py)
            .arg(repo().join("tests/mcp/client_test.py"))
            .args(["--mode", mode, "--files-dir"])
            .arg(home.files())
            .args(transport)
            .env("KOUBOU_HOME", home.path())
            .envs(env.iter().copied()),
        &format!("MCP Python SDK, {mode}, {}", transport[0]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains(" passed, 0 failed"), "the Python SDK checks failed (above)");
}

/// Claude Code, offline and with a throwaway home: no telemetry, no updates, no login.
fn claude(bin: &Path, scratch: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env("HOME", scratch)
        .env("CLAUDE_CONFIG_DIR", scratch.join(".claude"))
        .env("DISABLE_TELEMETRY", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("DISABLE_UPDATES", "1")
        .env("DISABLE_ERROR_REPORTING", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_GROWTHBOOK", "1")
        .env("CLAUDE_CODE_DISABLE_FEATURE_FLAGS", "1")
        .env("MCP_TIMEOUT", "15000")
        .current_dir(scratch)
        .stdin(Stdio::null());
    cmd
}

/// `claude -p hi --mcp-config …`: its first line lists the tools it would give its model.
pub fn claude_lists_tools(bin: &Path, config: Value, what: &str) {
    let scratch = tempfile::tempdir().unwrap();
    let mut cmd = claude(bin, scratch.path());
    cmd.args(["-p", "hi", "--strict-mcp-config", "--output-format", "stream-json", "--verbose", "--mcp-config"])
        .arg(config.to_string());
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

/// One real turn of Claude Code against `tests/mcp/fake_anthropic.py`: the fake model calls
/// `mcp__koubou__{tool}` with `args`; returns the `tool_result` block Claude Code then sends
/// the model — exactly what the model reads of the tool's result.
pub fn claude_tool_result(bin: &Path, config: Value, tool: &str, args: Value, what: &str) -> Value {
    use std::io::BufRead;
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("messages.jsonl");
    let name = format!("mcp__koubou__{tool}");
    let mut fake = Command::new("python3")
        .arg(repo().join("tests/mcp/fake_anthropic.py"))
        .arg(&log)
        .arg(&name)
        .arg(args.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs tests/mcp/fake_anthropic.py");
    let mut line = String::new();
    std::io::BufReader::new(fake.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("fake said {line:?}")).to_owned();
    let mut cmd = claude(bin, scratch.path());
    // Tool search would defer MCP tools behind a search step; a one-call turn needs them listed.
    cmd.env("ANTHROPIC_BASE_URL", format!("http://127.0.0.1:{port}"))
        .env("ANTHROPIC_API_KEY", "sk-ant-offline-test")
        .env("ENABLE_TOOL_SEARCH", "false")
        .args(["-p", "use the tool", "--strict-mcp-config", "--output-format", "stream-json", "--verbose"])
        .args(["--allowedTools", &name, "--mcp-config"])
        .arg(config.to_string());
    let out = run(&mut cmd, what);
    let _ = fake.kill();
    let _ = fake.wait();
    assert!(out.status.success(), "{what}: claude failed");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .flat_map(|r| r["body"]["messages"].as_array().cloned().unwrap_or_default())
        .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
        .find(|c| c["type"] == "tool_result" && c["tool_use_id"] == "toolu_koubou_1")
        .unwrap_or_else(|| panic!("{what}: Claude Code sent no tool_result; requests:\n{text}"))
}
