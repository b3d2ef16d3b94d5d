//! The codex provider driving the REAL Codex CLI (pinned 0.169.0, installed by
//! `scripts/ensure-codex.sh`) against a fake Responses-API provider on 127.0.0.1.
//!
//! Needs `KOUBOU_CODEX_BIN` (the path `scripts/ensure-codex.sh` prints). Without it the tests
//! fail, unless `KOUBOU_SKIP_REAL_PEERS=1`, when they say they skipped.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use koubou_backend::codex::CodexBackend;
use koubou_backend::config::CodexConfig;
use koubou_backend::{Backend, BackendError, CancellationToken};
use support::*;

const RESPONSES: &str = "/v1/responses";

/// The codex binary, or `None` when the test should skip.
fn codex_bin() -> Option<PathBuf> {
    match std::env::var("KOUBOU_CODEX_BIN") {
        Ok(p) if !p.trim().is_empty() => {
            let p = PathBuf::from(p.trim());
            assert!(p.is_file(), "KOUBOU_CODEX_BIN={} does not exist; run scripts/ensure-codex.sh", p.display());
            Some(p)
        }
        _ if std::env::var("KOUBOU_SKIP_REAL_PEERS").is_ok_and(|v| v == "1") => {
            eprintln!("skipped: KOUBOU_CODEX_BIN is unset and KOUBOU_SKIP_REAL_PEERS=1");
            None
        }
        _ => panic!(
            "KOUBOU_CODEX_BIN is unset: run `export KOUBOU_CODEX_BIN=\"$(scripts/ensure-codex.sh)\"` \
             (or set KOUBOU_SKIP_REAL_PEERS=1 to skip tests against real peers)"
        ),
    }
}

/// A CODEX_HOME with the offline config from `shared/reference/codex-cli.md`, a workdir, and
/// a backend pointed at the fake provider.
struct Rig {
    home: tempfile::TempDir,
    work: tempfile::TempDir,
    backend: CodexBackend,
}

fn rig(bin: &Path, provider_url: &str) -> Rig {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let config = format!(
        r#"model = "some-model"
model_provider = "local"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false
[analytics]
enabled = false
[feedback]
enabled = false
[history]
persistence = "none"
[features]
plugins = false
shell_snapshot = false
unbounded_connection_retries = false
[model_providers.local]
name = "local"
base_url = "{provider_url}/v1"
env_key = "LOCAL_PROVIDER_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 30000
"#
    );
    std::fs::write(home.path().join("config.toml"), config).unwrap();
    let cfg = CodexConfig {
        program: bin.to_string_lossy().into_owned(),
        workdir: Some(work.path().to_owned()),
        codex_home: Some(home.path().to_owned()),
        env: [("LOCAL_PROVIDER_KEY".to_string(), "test-key".to_string())].into(),
        ..Default::default()
    };
    let backend = CodexBackend::new("codex", &cfg).unwrap();
    Rig { home, work, backend }
}

/// Processes whose command line mentions `needle` (our unique workdir).
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return found };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if String::from_utf8_lossy(&cmd).contains(needle) {
            let zombie = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')))
                .unwrap_or(false);
            if !zombie {
                found.push(pid);
            }
        }
    }
    found
}

#[tokio::test]
async fn answers_streams_and_reports_usage() {
    let Some(bin) = codex_bin() else { return };
    let srv =
        FakeServer::start(vec![(RESPONSES, vec![responses_stream(&["Hello", " from", " the fake"], (321, 7))])]).await;
    let r = rig(&bin, &srv.url());
    let sink = Collect::default();
    let g = within("codex", r.backend.generate(request("default", "Say hello."), &sink, CancellationToken::new()))
        .await
        .unwrap();
    assert_eq!(g.text.trim_end(), "Hello from the fake");
    assert_eq!(sink.joined(), "Hello from the fake");
    assert_eq!((g.usage.prompt_tokens, g.usage.completion_tokens), (321, 7));
    assert_eq!(g.finish_reason, "stop");

    let reqs = srv.requests_to(RESPONSES);
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].header("authorization").as_deref(), Some("Bearer test-key"));
    let body = reqs[0].json();
    assert_eq!(body["model"], "some-model");
    assert_eq!(last_user_text(&body).as_deref(), Some("Say hello."));
    assert!(r.home.path().join("config.toml").exists());
}

#[tokio::test]
async fn prompts_arrive_verbatim_even_when_they_look_like_flags_or_shell() {
    let Some(bin) = codex_bin() else { return };
    let pwned = Path::new("/tmp/pwned");
    let existed = pwned.exists();
    let prompts = [
        "-starts with a dash",
        "--help",
        "$(touch /tmp/pwned); `id`",
        "-",
        "multi\nline \"quoted\" 'single' \\ back\\slash; exit 1 | cat && rm -rf /",
    ];
    for prompt in prompts {
        let srv = FakeServer::start(vec![(RESPONSES, vec![responses_stream(&["ok"], (1, 1))])]).await;
        let r = rig(&bin, &srv.url());
        let g = within(
            "codex",
            r.backend.generate(request("default", prompt), &Collect::default(), CancellationToken::new()),
        )
        .await
        .unwrap_or_else(|e| panic!("prompt {prompt:?}: {e}"));
        assert_eq!(g.text.trim_end(), "ok", "prompt {prompt:?}");
        let reqs = srv.requests_to(RESPONSES);
        assert_eq!(reqs.len(), 1, "prompt {prompt:?}");
        assert_eq!(last_user_text(&reqs[0].json()).as_deref(), Some(prompt), "prompt {prompt:?}");
    }
    if !existed {
        assert!(!pwned.exists(), "a prompt was run through a shell");
    }
}

/// A prompt over Linux's 128 KiB cap on one argv element reaches the provider byte for byte:
/// it goes on codex's stdin (`codex exec … -`), not in argv, where every local user could read
/// it in /proc/PID/cmdline.
#[tokio::test]
async fn a_prompt_larger_than_one_argv_element_arrives_whole_on_stdin() {
    let Some(bin) = codex_bin() else { return };
    let srv = FakeServer::start(vec![(RESPONSES, vec![responses_stream(&["ok"], (1, 1))])]).await;
    let r = rig(&bin, &srv.url());
    let line = "Explain this line of a very large delegated task, with \"quotes\" and $(id). 日本\n";
    let prompt: String = line.repeat((200 << 10) / line.len() + 1);
    assert!(prompt.len() > 128 << 10);
    let g =
        within("codex", r.backend.generate(request("default", &prompt), &Collect::default(), CancellationToken::new()))
            .await
            .unwrap();
    assert_eq!(g.text.trim_end(), "ok");
    let reqs = srv.requests_to(RESPONSES);
    assert_eq!(reqs.len(), 1);
    assert_eq!(last_user_text(&reqs[0].json()).as_deref(), Some(prompt.as_str()));
}

#[tokio::test]
async fn provider_500_fails_quickly_with_a_message() {
    let Some(bin) = codex_bin() else { return };
    let srv = FakeServer::start(vec![(RESPONSES, vec![Reply::Text(500, "boom".into())])]).await;
    let r = rig(&bin, &srv.url());
    let e =
        within("codex", r.backend.generate(request("default", "hi"), &Collect::default(), CancellationToken::new()))
            .await
            .unwrap_err();
    match &e {
        BackendError::Failed { detail, .. } => {
            eprintln!("codex failure, as reported: {detail}");
            assert!(!detail.is_empty())
        }
        other => panic!("expected Failed, got {other}"),
    }
    assert!(e.is_retryable());
}

#[tokio::test]
async fn timeout_kills_codex_when_the_provider_never_answers() {
    let Some(bin) = codex_bin() else { return };
    let srv = FakeServer::start(vec![(RESPONSES, vec![Reply::Hang])]).await;
    let r = rig(&bin, &srv.url());
    let needle = r.work.path().to_string_lossy().into_owned();
    let mut req = request("default", "hi");
    req.timeout = Duration::from_secs(4);
    let e = within("codex", r.backend.generate(req, &Collect::default(), CancellationToken::new())).await.unwrap_err();
    assert!(matches!(e, BackendError::Timeout { .. }), "{e}");
    // (Whether codex got as far as the provider depends on load; `cancel_kills_codex_promptly`
    // checks the case where it surely did.)
    eprintln!("codex reached the provider: {}", !srv.requests_to(RESPONSES).is_empty());
    assert_eq!(processes_mentioning(&needle), Vec::<i32>::new(), "codex processes left behind");
}

#[tokio::test]
async fn cancel_kills_codex_promptly() {
    let Some(bin) = codex_bin() else { return };
    let srv = FakeServer::start(vec![(RESPONSES, vec![Reply::Hang])]).await;
    let r = rig(&bin, &srv.url());
    let needle = r.work.path().to_string_lossy().into_owned();
    let cancel = CancellationToken::new();
    // Cancel once codex has sent its request (so it is really running).
    let c2 = cancel.clone();
    let poll = async {
        loop {
            if !srv.requests_to(RESPONSES).is_empty() {
                c2.cancel();
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let sink = Collect::default();
    let gen_fut = r.backend.generate(request("default", "hi"), &sink, cancel);
    let (e, ()) = within("codex", async { tokio::join!(gen_fut, poll) }).await;
    let e = e.unwrap_err();
    assert!(matches!(e, BackendError::Cancelled), "{e}");
    assert_eq!(processes_mentioning(&needle), Vec::<i32>::new(), "codex processes left behind");
}

#[tokio::test]
async fn health_reports_the_version() {
    let Some(bin) = codex_bin() else { return };
    let cfg = CodexConfig { program: bin.to_string_lossy().into_owned(), ..Default::default() };
    let h = CodexBackend::new("codex", &cfg).unwrap().health().await;
    assert!(h.up, "{}", h.detail);
    assert!(h.detail.contains("0.169.0"), "{}", h.detail);
    let cfg = CodexConfig { program: "/nonexistent/codex".into(), ..Default::default() };
    assert!(!CodexBackend::new("codex", &cfg).unwrap().health().await.up);
}
