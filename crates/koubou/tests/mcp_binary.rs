//! MCP through the real `koubou` binary, with clients we did not write: the MCP Python SDK over
//! `koubou mcp --embedded` (stdio), over `koubou mcp` talking to a running `koubou serve`
//! (stdio → HTTP client), and over `koubou serve`'s `/mcp`; and Claude Code listing the tools
//! over stdio and HTTP. (The koubou-mcp crate's own tests cover the same with its examples.)

mod support;

#[path = "../../../tests/mcp/clients.rs"]
mod clients;

use clients::{Home, claude_lists_tools, peer, python_sdk};
use support::{Serve, bin};

#[test]
fn python_sdk_through_the_koubou_binary() {
    let Some(py) = peer("KOUBOU_MCP_PYTHON", "ensure-mcp-python.sh") else { return };
    let koubou = bin();
    let k = koubou.to_str().unwrap();
    // stdio, in-process system.
    let h = Home::new();
    python_sdk(&py, &h, "2026-07-28", &["--stdio", k, "mcp", "--embedded"], &[]);
    // stdio, relaying to a running server; and another server's /mcp.
    let h = Home::new();
    let s = Serve::start(h.path(), &[]);
    python_sdk(&py, &h, "legacy", &["--stdio", k, "mcp"], &[("KOUBOU_URL", &s.url)]);
    let h2 = Home::new();
    let s2 = Serve::start(h2.path(), &[]);
    python_sdk(&py, &h2, "2026-07-28", &["--http", &format!("{}/mcp", s2.url)], &[]);
}

#[test]
fn claude_code_sees_koubou_over_stdio_and_http() {
    let Some(claude) = peer("KOUBOU_CLAUDE_BIN", "ensure-claude-code.sh") else { return };
    let h = Home::new();
    let stdio = serde_json::json!({"mcpServers": {"koubou": {
        "command": bin(), "args": ["mcp", "--embedded"], "env": {"KOUBOU_HOME": h.path()}
    }}});
    claude_lists_tools(&claude, stdio, "Claude Code, koubou mcp --embedded");
    let s = Serve::start(h.path(), &[]);
    let http = serde_json::json!({"mcpServers": {"koubou": {"type": "http", "url": format!("{}/mcp", s.url)}}});
    claude_lists_tools(&claude, http, "Claude Code, koubou serve /mcp");
}
