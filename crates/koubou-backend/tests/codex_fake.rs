//! The codex provider with a stand-in `codex` program (a small Python script), so the event
//! handling, the argv, stdin and the sandbox policy are checked on every machine, with or without
//! the real CLI (`codex_real.rs` checks the real one).

mod support;

use std::path::{Path, PathBuf};

use koubou_backend::codex::CodexBackend;
use koubou_backend::config::{BackendConfig, CodexConfig};
use koubou_backend::{Backend, BackendError, CancellationToken};
use serde_json::Value;
use support::*;

const FAKE_CODEX: &str = r#"#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
stdin = sys.stdin.read()
with open(os.environ["FAKE_LOG"], "w") as f:
    json.dump({"args": args, "stdin": stdin, "codex_home": os.environ.get("CODEX_HOME")}, f)
if args == ["--version"]:
    print("codex-cli 9.9.9"); sys.exit(0)
out = args[args.index("-o") + 1]
mode = os.environ.get("FAKE_MODE", "ok")
def ev(**kw): print(json.dumps(kw), flush=True)
ev(type="thread.started", thread_id="t1")
ev(type="turn.started")
if mode == "ok":
    ev(type="item.completed", item={"id": "i0", "type": "error", "message": "Model metadata for `x` not found"})
    ev(type="item.completed", item={"id": "i1", "type": "agent_message", "text": "streamed text"})
    ev(type="turn.completed", usage={"input_tokens": 50, "cached_input_tokens": 0, "output_tokens": 4})
    open(out, "w").write("final answer")
elif mode == "turn_failed_exit0":
    ev(type="error", message="unexpected status 401 Unauthorized")
    ev(type="turn.failed", error={"message": "unexpected status 401 Unauthorized"})
elif mode == "no_o_file":
    ev(type="item.completed", item={"id": "i1", "type": "agent_message", "text": "only in events"})
    ev(type="turn.completed", usage={"input_tokens": 1, "output_tokens": 1})
elif mode == "exit2":
    sys.stderr.write("fatal: bad config\n"); sys.exit(2)
"#;

struct Fake {
    dir: tempfile::TempDir,
    program: PathBuf,
}

fn fake() -> Fake {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("codex");
    std::fs::write(&program, FAKE_CODEX).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    Fake { dir, program }
}

impl Fake {
    fn backend(&self, mode: &str, home: Option<&Path>) -> CodexBackend {
        let cfg = CodexConfig {
            program: self.program.to_string_lossy().into_owned(),
            workdir: Some(self.dir.path().to_owned()),
            codex_home: home.map(Path::to_owned),
            model: Some("gpt-x".into()),
            extra_args: vec!["-c".into(), "foo=1".into()],
            env: [
                ("FAKE_MODE".to_string(), mode.to_string()),
                ("FAKE_LOG".to_string(), self.log_path().to_string_lossy().into_owned()),
            ]
            .into(),
            ..Default::default()
        };
        CodexBackend::new("codex", &cfg).unwrap()
    }
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log.json")
    }
    fn log(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.log_path()).unwrap()).unwrap()
    }
}

#[tokio::test]
async fn runs_the_pinned_invocation_and_returns_the_o_file() {
    let f = fake();
    let home = tempfile::tempdir().unwrap();
    let sink = Collect::default();
    let g = f
        .backend("ok", Some(home.path()))
        .generate(request("gpt-x", "-rf $(id)"), &sink, CancellationToken::new())
        .await;
    let g = g.unwrap();
    assert_eq!(g.text, "final answer");
    assert_eq!(sink.joined(), "streamed text");
    assert_eq!((g.usage.prompt_tokens, g.usage.completion_tokens), (50, 4));
    let log = f.log();
    let args: Vec<&str> = log["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let workdir = f.dir.path().to_str().unwrap();
    assert_eq!(
        &args[..8],
        ["exec", "--skip-git-repo-check", "--sandbox", "read-only", "--color", "never", "-C", workdir]
    );
    assert_eq!(&args[8..10], ["--json", "-o"]);
    assert_eq!(&args[11..], ["-m", "gpt-x", "-c", "foo=1", "--", "-"]);
    assert_eq!(log["stdin"], "-rf $(id)", "the prompt comes on stdin, never in argv");
    assert_eq!(log["codex_home"], home.path().to_str().unwrap());
}

#[tokio::test]
async fn turn_failed_is_a_failure_even_with_exit_0() {
    let f = fake();
    let e = f
        .backend("turn_failed_exit0", None)
        .generate(request("m", "p"), &Collect::default(), CancellationToken::new())
        .await;
    match e.unwrap_err() {
        BackendError::Failed { detail, .. } => assert!(detail.contains("401 Unauthorized"), "{detail}"),
        other => panic!("expected Failed, got {other}"),
    }
}

#[tokio::test]
async fn without_the_o_file_the_last_agent_message_is_the_answer() {
    let f = fake();
    let g =
        f.backend("no_o_file", None).generate(request("m", "p"), &Collect::default(), CancellationToken::new()).await;
    assert_eq!(g.unwrap().text, "only in events");
}

#[tokio::test]
async fn non_zero_exit_reports_stderr() {
    let f = fake();
    let e = f.backend("exit2", None).generate(request("m", "p"), &Collect::default(), CancellationToken::new()).await;
    match e.unwrap_err() {
        BackendError::Failed { detail, .. } => {
            assert!(detail.contains("status 2") && detail.contains("fatal: bad config"), "{detail}")
        }
        other => panic!("expected Failed, got {other}"),
    }
}

#[tokio::test]
async fn health_runs_version_with_a_scratch_codex_home() {
    let f = fake();
    let h = f.backend("ok", None).health().await;
    assert!(h.up, "{}", h.detail);
    assert!(h.detail.contains("codex-cli 9.9.9"), "{}", h.detail);
    let log = f.log();
    assert_eq!(log["args"], serde_json::json!(["--version"]));
    let home = log["codex_home"].as_str().expect("CODEX_HOME is set for --version");
    assert!(!Path::new(home).exists(), "the scratch CODEX_HOME is removed afterwards");
}

#[tokio::test]
async fn missing_program_is_a_config_error() {
    let cfg = CodexConfig { program: "/nonexistent/codex".into(), ..Default::default() };
    let b = CodexBackend::new("codex", &cfg).unwrap();
    let e = b.generate(request("m", "p"), &Collect::default(), CancellationToken::new()).await.unwrap_err();
    assert!(matches!(e, BackendError::Config { .. }), "{e}");
    assert!(!b.health().await.up);
}

#[test]
fn unsandboxed_codex_is_refused_without_the_opt_in() {
    // The opt-in variable is not set in this test's environment by the suite.
    if std::env::var("CODEX_UNSAFE_ALLOW_NO_SANDBOX").is_ok_and(|v| v == "1") {
        eprintln!("skipped: CODEX_UNSAFE_ALLOW_NO_SANDBOX=1 is set in this environment");
        return;
    }
    let cfg = CodexConfig { sandbox: "danger-full-access".into(), ..Default::default() };
    let e = koubou_backend::build("codex", &BackendConfig::Codex(cfg)).err().expect("refused");
    match e {
        BackendError::Config { detail, .. } => assert!(detail.contains("CODEX_UNSAFE_ALLOW_NO_SANDBOX=1"), "{detail}"),
        other => panic!("expected Config, got {other}"),
    }
}
