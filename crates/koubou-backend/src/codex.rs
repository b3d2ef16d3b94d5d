//! The Codex provider: one `codex exec` run per generation, through the shared process runner.
//!
//! Why it exists: the seed lets tasks go to the Codex CLI. Codex is an agent, not an API: it may
//! run tools, it reads stdin to EOF when stdin is not a TTY, and it never gives up by itself when
//! its provider hangs (see `shared/reference/codex-cli.md`). So this preset pins the invocation
//! (`--json` events for streaming and usage, `-o` for exactly the final message, and the prompt
//! on stdin with `-` as codex's prompt argument: argv is readable by every local user in
//! `/proc/PID/cmdline`, and one argument is capped at 128 KiB), refuses a model name that
//! starts with `-`, refuses to run without a sandbox unless the operator opted in with
//! `CODEX_UNSAFE_ALLOW_NO_SANDBOX=1`, gives codex the user's environment minus Koubou's token and
//! the keys other backends read, and relies on [`crate::process`] to kill codex's whole process
//! group when the router's timeout fires.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::config::CodexConfig;
use crate::process::{self, ProcSpec};
use crate::sse::LineSplitter;
use crate::{Backend, BackendError, CancellationToken, GenerateRequest, Generation, Health, TokenSink, Usage};

/// The environment variable that allows `danger-full-access` (the seed's escape hatch).
pub const UNSAFE_ENV: &str = "CODEX_UNSAFE_ALLOW_NO_SANDBOX";
/// The model name meaning "whatever codex's own config says" (no `-m` is passed).
pub const CONFIGURED_MODEL: &str = "default";
const SANDBOXES: [&str; 3] = ["read-only", "workspace-write", "danger-full-access"];
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The Codex CLI.
pub struct CodexBackend {
    name: String,
    cfg: CodexConfig,
}

/// Refuses a configuration that would run codex without a sandbox, unless `allow_unsafe`.
fn check_sandbox(name: &str, cfg: &CodexConfig, allow_unsafe: bool) -> Result<(), BackendError> {
    let config = |detail: String| BackendError::Config { backend: name.to_owned(), detail };
    if !SANDBOXES.contains(&cfg.sandbox.as_str()) {
        return Err(config(format!("sandbox {:?} is not one of {}", cfg.sandbox, SANDBOXES.join(", "))));
    }
    let unsandboxed = cfg.sandbox == "danger-full-access"
        || cfg.extra_args.iter().any(|a| {
            a.contains("danger-full-access") || a.contains("dangerously-bypass-approvals-and-sandbox") || a == "--yolo"
        });
    if unsandboxed && !allow_unsafe {
        return Err(config(format!(
            "running codex without a sandbox (danger-full-access / --dangerously-bypass-approvals-and-sandbox) \
             is refused; use sandbox = \"read-only\" or \"workspace-write\", or set {UNSAFE_ENV}=1 if this \
             machine is itself a sandbox"
        )));
    }
    Ok(())
}

/// A model name is passed as `-m NAME`: one that starts with `-` would be read as an option.
fn check_model(model: &str) -> Result<(), String> {
    if model.starts_with('-') {
        return Err(format!("model {model:?} starts with '-' (it would be read as an option of codex); refused"));
    }
    Ok(())
}

/// Reads codex's `-o` file, refusing one larger than `limit` before reading it and reading at
/// most `limit` bytes (it may still be growing).
async fn read_last_message(path: &std::path::Path, limit: Option<usize>) -> Result<Option<String>, usize> {
    use tokio::io::AsyncReadExt;
    let Ok(f) = tokio::fs::File::open(path).await else { return Ok(None) };
    let limit = limit.unwrap_or(usize::MAX);
    if f.metadata().await.is_ok_and(|m| m.len() > limit as u64) {
        return Err(limit);
    }
    let mut bytes = Vec::new();
    if f.take((limit as u64).saturating_add(1)).read_to_end(&mut bytes).await.is_err() {
        return Ok(None);
    }
    if bytes.len() > limit {
        return Err(limit);
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

fn unsafe_allowed() -> bool {
    std::env::var(UNSAFE_ENV).is_ok_and(|v| v.trim() == "1")
}

impl CodexBackend {
    /// Fails with [`BackendError::Config`] for an unknown sandbox, or an unsandboxed one without
    /// `CODEX_UNSAFE_ALLOW_NO_SANDBOX=1`.
    pub fn new(name: impl Into<String>, cfg: &CodexConfig) -> Result<Self, BackendError> {
        let name = name.into();
        check_sandbox(&name, cfg, unsafe_allowed())?;
        if cfg.program.trim().is_empty() {
            return Err(BackendError::Config { backend: name, detail: "`program` is empty".into() });
        }
        if let Some(m) = cfg.model.as_deref()
            && let Err(detail) = check_model(m)
        {
            return Err(BackendError::Config { backend: name, detail });
        }
        Ok(CodexBackend { name, cfg: cfg.clone() })
    }

    /// The argv after the program, for one run (the prompt goes on stdin).
    fn args(&self, workdir: &std::path::Path, last_message: &std::path::Path, model: &str) -> Vec<OsString> {
        let mut a: Vec<OsString> =
            ["exec", "--skip-git-repo-check", "--sandbox", &self.cfg.sandbox, "--color", "never"]
                .iter()
                .map(OsString::from)
                .collect();
        a.push("-C".into());
        a.push(workdir.into());
        a.push("--json".into());
        a.push("-o".into());
        a.push(last_message.into());
        if !model.is_empty() && model != CONFIGURED_MODEL {
            a.push("-m".into());
            a.push(model.into());
        }
        a.extend(self.cfg.extra_args.iter().map(OsString::from));
        // `-` as the prompt: codex reads it from stdin to EOF.
        a.push("--".into());
        a.push("-".into());
        a
    }

    fn env(&self, codex_home: Option<&std::path::Path>) -> std::collections::BTreeMap<String, String> {
        let mut env = process::inherited_env(&self.cfg.pass_env, &self.cfg.env);
        if let Some(h) = codex_home.or(self.cfg.codex_home.as_deref()) {
            env.insert("CODEX_HOME".into(), h.to_string_lossy().into_owned());
        }
        env
    }
}

/// What the `--json` event stream told us.
#[derive(Default, Debug)]
struct Events {
    usage: Option<Usage>,
    completed: bool,
    failure: Option<String>,
    errors: Vec<String>,
    warnings: Vec<String>,
    last_message: Option<String>,
    streamed_any: bool,
}

impl Events {
    fn line(&mut self, line: &str, sink: &dyn TokenSink) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            tracing::debug!(line, "codex printed a non-JSON line");
            return;
        };
        let message = |v: &Value| -> String {
            v.get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| v.get("error").and_then(|e| e.get("message")).and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| v.to_string())
        };
        match v["type"].as_str().unwrap_or_default() {
            "item.completed" => {
                let item = &v["item"];
                let kind = item["type"].as_str().or_else(|| item["item_type"].as_str()).unwrap_or_default();
                match kind {
                    "agent_message" => {
                        if let Some(text) = item["text"].as_str() {
                            if self.streamed_any {
                                sink.token("\n\n");
                            }
                            sink.token(text);
                            self.streamed_any = true;
                            self.last_message = Some(text.to_owned());
                        }
                    }
                    // A warning on a run that can still succeed (e.g. unknown model metadata).
                    "error" => self.warnings.push(message(item)),
                    _ => {}
                }
            }
            "turn.completed" => {
                self.completed = true;
                let u = &v["usage"];
                self.usage = Some(Usage {
                    cache_read_tokens: u["cached_input_tokens"].as_u64(),
                    ..Usage::new(u["input_tokens"].as_u64().unwrap_or(0), u["output_tokens"].as_u64().unwrap_or(0))
                });
            }
            "turn.failed" => self.failure = Some(message(&v)),
            "error" => self.errors.push(message(&v)),
            _ => {}
        }
    }

    /// The best words for why the run failed.
    fn why(&self, fallback: String) -> String {
        let mut parts: Vec<&str> = Vec::new();
        if let Some(f) = &self.failure {
            parts.push(f);
        }
        for e in &self.errors {
            if !parts.contains(&e.as_str()) {
                parts.push(e);
            }
        }
        if parts.is_empty() { fallback } else { format!("{} ({fallback})", parts.join("; ")) }
    }
}

#[async_trait]
impl Backend for CodexBackend {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "codex"
    }
    fn default_model(&self) -> &str {
        self.cfg.model.as_deref().filter(|m| !m.is_empty()).unwrap_or(CONFIGURED_MODEL)
    }
    fn capacity(&self) -> usize {
        self.cfg.concurrency.max(1)
    }

    /// Runs `codex --version` (with a throwaway `CODEX_HOME` when none is configured, since even
    /// that writes under it).
    async fn health(&self) -> Health {
        if let Err(e) = check_sandbox(&self.name, &self.cfg, unsafe_allowed()) {
            return Health::down(e.to_string());
        }
        let scratch = match self.cfg.codex_home {
            Some(_) => None,
            None => match tempfile::Builder::new().prefix("koubou-codex-home-").tempdir() {
                Ok(d) => Some(d),
                Err(e) => return Health::down(format!("cannot make a temporary CODEX_HOME: {e}")),
            },
        };
        let spec = ProcSpec {
            program: OsString::from(&self.cfg.program),
            args: vec!["--version".into()],
            env: self.env(scratch.as_ref().map(|d| d.path())),
            workdir: None,
            stdin: None,
        };
        let mut out = Vec::new();
        let r = process::run(&self.name, spec, Some(HEALTH_TIMEOUT), &CancellationToken::new(), |b| {
            out.extend_from_slice(b);
            Ok(())
        })
        .await;
        match r {
            Ok(exit) if exit.status.success() => {
                let version = String::from_utf8_lossy(&out).trim().to_owned();
                Health::up(format!("{version} ({}; sandbox {})", self.cfg.program, self.cfg.sandbox), vec![])
            }
            Ok(exit) => Health::down(format!("`{} --version` {}", self.cfg.program, exit.describe())),
            Err(BackendError::Timeout { .. }) => {
                Health::down(format!("`{} --version` did not answer within {HEALTH_TIMEOUT:?}", self.cfg.program))
            }
            Err(e) => Health::down(e.to_string()),
        }
    }

    async fn generate(
        &self,
        req: GenerateRequest,
        sink: &dyn TokenSink,
        cancel: CancellationToken,
    ) -> Result<Generation, BackendError> {
        check_sandbox(&self.name, &self.cfg, unsafe_allowed())?;
        if let Err(detail) = check_model(&req.model) {
            return Err(BackendError::Rejected { backend: self.name.clone(), status: 400, detail });
        }
        let failed = |detail: String| BackendError::Failed { backend: self.name.clone(), detail };
        let scratch = tempfile::Builder::new()
            .prefix("koubou-codex-")
            .tempdir()
            .map_err(|e| failed(format!("cannot make a temporary directory: {e}")))?;
        let last_message = scratch.path().join("last-message.txt");
        let workdir = match &self.cfg.workdir {
            Some(d) => d.clone(),
            None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
        };
        if !workdir.is_dir() {
            return Err(BackendError::Config {
                backend: self.name.clone(),
                detail: format!("workdir {} does not exist", workdir.display()),
            });
        }
        let prompt = match &req.system {
            // Codex has no separate system prompt in `exec`; put it ahead of the task.
            Some(s) if !s.trim().is_empty() => format!("{s}\n\n{}", req.prompt),
            _ => req.prompt.clone(),
        };
        let spec = ProcSpec {
            program: OsString::from(&self.cfg.program),
            args: self.args(&workdir, &last_message, &req.model),
            env: self.env(None),
            workdir: Some(workdir.clone()),
            stdin: Some(prompt.into_bytes()),
        };
        let mut events = Events::default();
        let mut lines = LineSplitter::new();
        let exit = process::run(&self.name, spec, Some(req.timeout), &cancel, |bytes| {
            for line in lines.push(bytes) {
                events.line(&line, sink);
            }
            Ok(())
        })
        .await?;
        if let Some(line) = lines.finish() {
            events.line(&line, sink);
        }
        for w in &events.warnings {
            tracing::warn!(backend = %self.name, warning = %w, "codex reported an error item (not fatal)");
        }
        if !exit.status.success() {
            return Err(failed(events.why(format!("codex {}", exit.describe()))));
        }
        if events.failure.is_some() {
            return Err(failed(events.why("turn failed".into())));
        }
        let text = read_last_message(&last_message, sink.max_bytes())
            .await
            .map_err(|limit| BackendError::TooLarge { backend: self.name.clone(), limit })?;
        let text = match (text, &events.last_message) {
            (Some(t), _) if !t.is_empty() => t,
            (_, Some(m)) => m.clone(),
            (Some(t), None) if events.completed => t,
            _ => {
                return Err(failed(events.why(format!(
                    "codex exited 0 without an answer (no -o file, no agent message); stderr: {}",
                    exit.stderr_tail.trim()
                ))));
            }
        };
        let model = if req.model.is_empty() { CONFIGURED_MODEL.to_owned() } else { req.model };
        Ok(Generation {
            text,
            usage: events.usage.unwrap_or_default(),
            model,
            finish_reason: "stop".into(),
            warnings: events.warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_policy() {
        let cfg = |sandbox: &str, extra: &[&str]| CodexConfig {
            sandbox: sandbox.into(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(check_sandbox("c", &cfg("read-only", &[]), false).is_ok());
        assert!(check_sandbox("c", &cfg("workspace-write", &[]), false).is_ok());
        assert!(matches!(check_sandbox("c", &cfg("danger-full-access", &[]), false), Err(BackendError::Config { .. })));
        assert!(check_sandbox("c", &cfg("danger-full-access", &[]), true).is_ok());
        assert!(check_sandbox("c", &cfg("read-only", &["--dangerously-bypass-approvals-and-sandbox"]), false).is_err());
        assert!(check_sandbox("c", &cfg("read-only", &["-c", "sandbox_mode=\"danger-full-access\""]), false).is_err());
        assert!(check_sandbox("c", &cfg("none", &[]), true).is_err());
        let e = check_sandbox("c", &cfg("danger-full-access", &[]), false).unwrap_err().to_string();
        assert!(e.contains(UNSAFE_ENV), "{e}");
    }

    #[test]
    fn argv_ends_with_a_dash_so_the_prompt_comes_on_stdin() {
        let b = CodexBackend::new(
            "c",
            &CodexConfig {
                model: Some("m1".into()),
                extra_args: vec!["-c".into(), "x=1".into()],
                ..Default::default()
            },
        )
        .unwrap();
        let a = b.args("/w".as_ref(), "/o".as_ref(), "m1");
        let a: Vec<&str> = a.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(
            a,
            [
                "exec",
                "--skip-git-repo-check",
                "--sandbox",
                "read-only",
                "--color",
                "never",
                "-C",
                "/w",
                "--json",
                "-o",
                "/o",
                "-m",
                "m1",
                "-c",
                "x=1",
                "--",
                "-"
            ]
        );
        let a = b.args("/w".as_ref(), "/o".as_ref(), CONFIGURED_MODEL);
        assert!(!a.iter().any(|s| s == "-m"));
    }

    #[test]
    fn a_model_starting_with_a_dash_is_refused() {
        assert!(check_model("gpt-5").is_ok());
        let e = CodexBackend::new("c", &CodexConfig { model: Some("--yolo".into()), ..Default::default() });
        assert!(matches!(&e, Err(BackendError::Config { detail, .. }) if detail.contains("starts with '-'")));
    }

    #[tokio::test]
    async fn the_last_message_file_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o");
        assert_eq!(read_last_message(&p, Some(4)).await, Ok(None), "missing");
        std::fs::write(&p, "12345").unwrap();
        assert_eq!(read_last_message(&p, Some(4)).await, Err(4));
        assert_eq!(read_last_message(&p, Some(5)).await, Ok(Some("12345".into())));
    }

    #[test]
    fn events_stream_messages_usage_and_failures() {
        let got = std::sync::Mutex::new(String::new());
        let sink = |t: &str| got.lock().unwrap().push_str(t);
        let mut ev = Events::default();
        for l in [
            r#"{"type":"thread.started","thread_id":"x"}"#,
            r#"{"type":"item.completed","item":{"id":"i0","type":"error","message":"Model metadata for `m` not found"}}"#,
            r#"{"type":"item.completed","item":{"id":"i1","type":"agent_message","text":"one"}}"#,
            "not json",
            r#"{"type":"item.completed","item":{"id":"i2","type":"agent_message","text":"two"}}"#,
            r#"{"type":"turn.completed","usage":{"input_tokens":10,"cached_input_tokens":0,"output_tokens":3}}"#,
        ] {
            ev.line(l, &sink);
        }
        assert_eq!(*got.lock().unwrap(), "one\n\ntwo");
        assert_eq!(ev.usage, Some(Usage { cache_read_tokens: Some(0), ..Usage::new(10, 3) }));
        assert!(ev.completed && ev.failure.is_none() && ev.warnings.len() == 1);

        let mut ev = Events::default();
        ev.line(r#"{"type":"error","message":"stream disconnected"}"#, &sink);
        ev.line(r#"{"type":"turn.failed","error":{"message":"stream disconnected"}}"#, &sink);
        assert_eq!(ev.why("exit 1".into()), "stream disconnected (exit 1)");
    }
}
