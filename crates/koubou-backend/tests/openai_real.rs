//! The OpenAI-compatible provider against a REAL server nobody here wrote: llama-cpp-python's
//! (pinned 0.3.36), serving SmolLM2-135M-Instruct offline on 127.0.0.1.
//!
//! Needs `KOUBOU_LLAMA_CPP_PYTHON` (a python with `llama_cpp[server]` installed) and
//! `KOUBOU_TEST_MODEL` (the SmolLM2-135M-Instruct Q4_1 gguf). Without them the test fails,
//! unless `KOUBOU_SKIP_REAL_PEERS=1`, when it says it skipped.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use koubou_backend::config::OpenAiConfig;
use koubou_backend::openai::OpenAiBackend;
use koubou_backend::{Backend, BackendError, CancellationToken, GenOptions};
use support::*;

const ALIAS: &str = "smollm2-135m-instruct";

fn peers() -> Option<(PathBuf, PathBuf)> {
    let get = |k: &str| std::env::var(k).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    match (get("KOUBOU_LLAMA_CPP_PYTHON"), get("KOUBOU_TEST_MODEL")) {
        (Some(py), Some(model)) => {
            let (py, model) = (PathBuf::from(py), PathBuf::from(model));
            assert!(py.exists(), "KOUBOU_LLAMA_CPP_PYTHON={} does not exist", py.display());
            assert!(model.is_file(), "KOUBOU_TEST_MODEL={} does not exist", model.display());
            Some((py, model))
        }
        _ if std::env::var("KOUBOU_SKIP_REAL_PEERS").is_ok_and(|v| v == "1") => {
            eprintln!("skipped: KOUBOU_LLAMA_CPP_PYTHON / KOUBOU_TEST_MODEL unset and KOUBOU_SKIP_REAL_PEERS=1");
            None
        }
        _ => panic!(
            "KOUBOU_LLAMA_CPP_PYTHON and KOUBOU_TEST_MODEL must be set: run \
             `export KOUBOU_LLAMA_CPP_PYTHON=\"$(scripts/ensure-llama-cpp-python.sh)\"` and point \
             KOUBOU_TEST_MODEL at SmolLM2-135M-Instruct.Q4_1.gguf (or set KOUBOU_SKIP_REAL_PEERS=1 to skip)"
        ),
    }
}

/// The server process; killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(py: &PathBuf, model: &PathBuf, port: u16) -> Server {
    let child = Command::new(py)
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(model)
        .args(["--model_alias", ALIAS, "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--n_ctx", "2048", "--n_threads", "2", "--n_threads_batch", "2"])
        .args(["--interrupt_requests", "false", "--verbose", "false"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python -m llama_cpp.server");
    Server(child)
}

#[tokio::test]
async fn llama_cpp_python_server() {
    let Some((py, model)) = peers() else { return };
    let port = closed_port();
    let mut server = start(&py, &model, port);
    let base = format!("http://127.0.0.1:{port}/v1");
    let backend = OpenAiBackend::new(
        "llama-cpp-python",
        &OpenAiConfig {
            base_url: base.clone(),
            api_key: None,
            api_key_env: None,
            model: ALIAS.into(),
            concurrency: 1,
            ..Default::default()
        },
    )
    .unwrap();

    // Wait for it to serve (it loads in ~1.5 s; the bound only guards against a hang).
    let mut health = backend.health().await;
    for _ in 0..240 {
        if health.up {
            break;
        }
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("llama_cpp.server exited early with {status}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        health = backend.health().await;
    }
    assert!(health.up, "server never came up: {}", health.detail);
    assert_eq!(health.models, vec![ALIAS.to_string()]);

    // A real streamed answer.
    let sink = Collect::default();
    let mut req = request(ALIAS, "What is the capital of France? Answer in one word.");
    req.options = GenOptions { temperature: Some(0.0), max_tokens: Some(48), ..Default::default() };
    let g = within("generate", backend.generate(req, &sink, CancellationToken::new())).await.unwrap();
    eprintln!("answer: {:?} ({:?}, finish {})", g.text, g.usage, g.finish_reason);
    assert!(g.text.contains("Paris"), "{:?}", g.text);
    assert_eq!(sink.joined(), g.text);
    assert!(sink.count() > 1, "the answer came in one piece: not streamed");
    assert!(g.usage.completion_tokens > 0, "{:?}", g.usage);
    assert!(["stop", "length"].contains(&g.finish_reason.as_str()), "{}", g.finish_reason);

    // A prompt far beyond the 2048-token context: the stream ends with nothing, which must be
    // an error, not an empty answer.
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(600);
    let e = within("overflow", backend.generate(request(ALIAS, &long), &Collect::default(), CancellationToken::new()))
        .await
        .unwrap_err();
    eprintln!("overflow: {e}");
    assert!(matches!(e, BackendError::Truncated { .. } | BackendError::Rejected { .. }), "{e}");

    // Still serving after that.
    let mut req = request(ALIAS, "Say hi.");
    req.options = GenOptions { temperature: Some(0.0), max_tokens: Some(8), ..Default::default() };
    let g =
        within("generate again", backend.generate(req, &Collect::default(), CancellationToken::new())).await.unwrap();
    assert!(!g.text.is_empty());
}
