//! The exec provider with small real programs (the argv is test config, like a user's own).

mod support;

use std::path::Path;
use std::time::Duration;

use koubou_backend::config::ExecConfig;
use koubou_backend::exec::ExecBackend;
use koubou_backend::{Backend, BackendError, CancellationToken, GenOptions};
use serde_json::{Value, json};
use support::*;

fn exec(argv: &[&str]) -> ExecBackend {
    let cfg = ExecConfig { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    ExecBackend::new("exec", &cfg).unwrap()
}

/// Whether `pid` is still a live (non-zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(false),
    }
}

/// The pids a test program wrote to `path` (none if it was killed before it got that far, which
/// on a loaded machine can happen to a program with a short timeout).
fn pids_in(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path).unwrap_or_default().split_whitespace().map(|s| s.parse().unwrap()).collect()
}

/// Asserts every pid is gone (reparented grandchildren get a moment to be reaped).
async fn assert_gone(pids: &[i32], what: &str) {
    for &pid in pids {
        for _ in 0..100 {
            if !alive(pid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(pid), "pid {pid} survived {what}");
    }
}

#[tokio::test]
async fn stdin_gets_the_task_as_json_and_stdout_is_the_answer() {
    let b = exec(&["python3", "-c", "import sys; sys.stdout.write(sys.stdin.read())"]);
    let mut req = request("my-model", "hello \"world\" $(id) 日本");
    req.system = Some("sys".into());
    req.options = GenOptions { max_tokens: Some(9), ..Default::default() };
    let sink = Collect::default();
    let g = b.generate(req, &sink, CancellationToken::new()).await.unwrap();
    let v: Value = serde_json::from_str(&g.text).unwrap();
    assert_eq!(
        v,
        json!({"task_id": "task-1", "type": "general", "prompt": "hello \"world\" $(id) 日本", "system": "sys",
               "model": "my-model", "options": {"max_tokens": 9}})
    );
    assert_eq!(sink.joined(), g.text);
    assert_eq!((g.model.as_str(), g.finish_reason.as_str()), ("my-model", "stop"));
}

#[tokio::test]
async fn stdout_is_streamed_while_the_program_runs() {
    // The program prints "first", then waits for a file that only the sink creates on seeing
    // "first": it can finish only if "first" was streamed before it exited.
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("seen");
    let script = "import os, sys, time\n\
                  print('first', flush=True)\n\
                  while not os.path.exists(sys.argv[1]): time.sleep(0.01)\n\
                  print('second', flush=True)\n";
    let flag_s = flag.to_str().unwrap().to_owned();
    let b = exec(&["python3", "-c", script, &flag_s]);
    let flag2 = flag.clone();
    let sink = move |t: &str| {
        if t.contains("first") {
            std::fs::write(&flag2, b"").unwrap();
        }
    };
    let g = within("generate", b.generate(request("m", "p"), &sink, CancellationToken::new())).await.unwrap();
    assert_eq!(g.text, "first\nsecond\n");
}

#[tokio::test]
async fn multibyte_output_split_across_writes_stays_whole() {
    let script = "import sys\nfor b in 'é日本😀'.encode():\n    sys.stdout.buffer.write(bytes([b])); sys.stdout.buffer.flush()\n";
    let sink = Collect::default();
    let g =
        exec(&["python3", "-c", script]).generate(request("m", "p"), &sink, CancellationToken::new()).await.unwrap();
    assert_eq!(g.text, "é日本😀");
    assert!(sink.0.lock().unwrap().iter().all(|t| !t.contains('\u{fffd}')));
}

#[tokio::test]
async fn non_zero_exit_is_failed_with_the_stderr_tail() {
    let b = exec(&["sh", "-c", "cat >/dev/null; echo partial; echo 'model exploded' >&2; exit 3"]);
    let e = b.generate(request("m", "p"), &Collect::default(), CancellationToken::new()).await.unwrap_err();
    match &e {
        BackendError::Failed { detail, .. } => {
            assert!(detail.contains("status 3") && detail.contains("model exploded"), "{detail}")
        }
        other => panic!("expected Failed, got {other}"),
    }
    assert!(e.is_retryable());
}

#[tokio::test]
async fn a_program_that_ignores_stdin_is_fine() {
    let g =
        exec(&["echo", "hi"]).generate(request("m", "p"), &Collect::default(), CancellationToken::new()).await.unwrap();
    assert_eq!(g.text, "hi\n");
}

#[tokio::test]
async fn program_not_found_is_a_clear_config_error() {
    let b = exec(&["/nonexistent/koubou-worker-xyz"]);
    let e = b.generate(request("m", "p"), &Collect::default(), CancellationToken::new()).await.unwrap_err();
    match &e {
        BackendError::Config { detail, .. } => assert!(detail.contains("not found"), "{detail}"),
        other => panic!("expected Config, got {other}"),
    }
    assert!(e.falls_back());
    assert!(!b.health().await.up);
    assert!(exec(&["python3"]).health().await.up);
    assert!(ExecBackend::new("e", &ExecConfig::default()).is_err(), "empty argv is refused");
}

#[tokio::test]
async fn cancel_kills_the_whole_group_even_when_sigterm_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let pids_s = pids.to_str().unwrap().to_owned();
    // The child ignores SIGTERM (and so does the grandchild it starts, which inherits that).
    let b = exec(&["sh", "-c", "trap '' TERM; sleep 1000 & echo $$ $! > \"$0\"; echo ready; wait; wait", &pids_s]);
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    let sink = move |t: &str| {
        if t.contains("ready") {
            c2.cancel();
        }
    };
    let e = within("generate", b.generate(request("m", "p"), &sink, cancel)).await.unwrap_err();
    assert!(matches!(e, BackendError::Cancelled), "{e}");
    // Cancelled only after "ready", so both pids were written.
    let ids = pids_in(&pids);
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_gone(&ids, "the cancel").await;
}

#[tokio::test]
async fn timeout_kills_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let b = exec(&["sh", "-c", "echo $$ > \"$0\"; exec sleep 1000", pidfile.to_str().unwrap()]);
    let mut req = request("m", "p");
    req.timeout = Duration::from_secs(1);
    let e = within("generate", b.generate(req, &Collect::default(), CancellationToken::new())).await.unwrap_err();
    assert!(matches!(e, BackendError::Timeout { .. }), "{e}");
    assert_gone(&pids_in(&pidfile), "the timeout").await;
}

#[tokio::test]
async fn helpers_left_behind_after_exit_are_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    // Exits at once, leaving a background helper that holds stdout open.
    let b = exec(&["sh", "-c", "sleep 1000 & echo $! > \"$0\"; echo done", pidfile.to_str().unwrap()]);
    let g =
        within("generate", b.generate(request("m", "p"), &Collect::default(), CancellationToken::new())).await.unwrap();
    assert_eq!(g.text, "done\n");
    let pids = pids_in(&pidfile);
    assert_eq!(pids.len(), 1);
    assert_gone(&pids, "the end of the run").await;
}

#[tokio::test]
async fn the_routers_timeout_kills_an_exec_child() {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use koubou_backend::{Router, TypeRoute};
    use koubou_task::{NewTask, Task, TaskId, TaskKind};

    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let b: Arc<dyn Backend> = Arc::new(exec(&[
        "sh",
        "-c",
        "trap '' TERM; sleep 1000 & echo $$ $! > \"$0\"; wait; wait",
        pidfile.to_str().unwrap(),
    ]));
    let types = BTreeMap::from([(
        "code".to_string(),
        TypeRoute { backend: "exec".into(), timeout_secs: 1, ..TypeRoute::default() },
    )]);
    let router = Router::new([b], types).unwrap();
    let task = Task::from_new(TaskId::new(), NewTask::new(TaskKind::parse("code").unwrap(), "p"), 3, 0);
    let plan = router.plan(&task).unwrap();
    let e = within("router", plan.run(&task, &Collect::default(), &CancellationToken::new())).await.unwrap_err();
    assert!(matches!(e, BackendError::Timeout { .. }), "{e}");
    assert_gone(&pids_in(&pidfile), "the router's timeout").await;
}
