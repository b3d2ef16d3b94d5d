//! The exec provider: a program the user configured (`argv`), given the task as one JSON object
//! on stdin, whose stdout is the answer.
//!
//! Why it exists: the seed's "custom worker type" — any script or tool can serve a task type
//! without Koubou knowing anything about it. The argv comes from the user's own config and is
//! run directly (never through a shell); task input only ever reaches the program on stdin.
//! The program's environment is minimal (`PATH`, `HOME`, `USER`, `LANG`, `LC_*`, `TMPDIR`) plus
//! its config's `pass_env` names and `env` table: never Koubou's token or another backend's key.
//! Process-group handling (streaming, timeouts, killing helpers) is in [`crate::process`].

use std::ffi::OsString;

use async_trait::async_trait;
use serde_json::json;

use crate::config::ExecConfig;
use crate::process::{self, ProcSpec, Utf8Chunker};
use crate::{Backend, BackendError, CancellationToken, GenerateRequest, Generation, Health, TokenSink, Usage};

/// A configured program.
pub struct ExecBackend {
    name: String,
    cfg: ExecConfig,
}

impl ExecBackend {
    /// Fails with [`BackendError::Config`] when `argv` is empty.
    pub fn new(name: impl Into<String>, cfg: &ExecConfig) -> Result<Self, BackendError> {
        let name = name.into();
        if cfg.argv.first().is_none_or(|p| p.trim().is_empty()) {
            return Err(BackendError::Config {
                backend: name,
                detail: "`argv` is empty: give the program and its arguments, e.g. [\"python3\", \"worker.py\"]".into(),
            });
        }
        Ok(ExecBackend { name, cfg: cfg.clone() })
    }

    fn spec(&self, stdin: Option<Vec<u8>>) -> ProcSpec {
        let mut argv = self.cfg.argv.iter().map(OsString::from);
        ProcSpec {
            program: argv.next().unwrap_or_default(),
            args: argv.collect(),
            env: process::minimal_env(&self.cfg.pass_env, &self.cfg.env),
            workdir: self.cfg.workdir.clone(),
            stdin,
        }
    }
}

/// Finds `program` the way `execvp` will: a path as given, else the first match on `PATH`.
fn locate(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &std::path::Path| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if program.contains('/') {
        let p = std::path::PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| executable(p))
}

#[async_trait]
impl Backend for ExecBackend {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "exec"
    }
    fn default_model(&self) -> &str {
        &self.cfg.model
    }
    fn capacity(&self) -> usize {
        self.cfg.concurrency.max(1)
    }

    /// Up when the program exists and is executable (it is not run: it may be costly).
    async fn health(&self) -> Health {
        let program = self.cfg.argv.first().map(String::as_str).unwrap_or_default();
        if let Some(dir) = &self.cfg.workdir
            && !dir.is_dir()
        {
            return Health::down(format!("working directory {} does not exist", dir.display()));
        }
        match locate(program) {
            Some(p) => Health::up(format!("program {}", p.display()), vec![self.cfg.model.clone()]),
            None => Health::down(format!("program {program:?} not found or not executable")),
        }
    }

    async fn generate(
        &self,
        req: GenerateRequest,
        sink: &dyn TokenSink,
        cancel: CancellationToken,
    ) -> Result<Generation, BackendError> {
        let input = json!({
            "task_id": req.task_id,
            "type": req.task_kind,
            "prompt": req.prompt,
            "system": req.system,
            "model": req.model,
            "options": req.options,
        });
        let mut line = serde_json::to_vec(&input).map_err(|e| BackendError::Failed {
            backend: self.name.clone(),
            detail: format!("cannot encode the task: {e}"),
        })?;
        line.push(b'\n');
        let mut text = String::new();
        let mut utf8 = Utf8Chunker::default();
        let exit = process::run(&self.name, self.spec(Some(line)), Some(req.timeout), &cancel, |bytes| {
            let piece = utf8.push(bytes);
            if !piece.is_empty() {
                sink.token(&piece);
                text.push_str(&piece);
            }
            Ok(())
        })
        .await?;
        let rest = utf8.finish();
        if !rest.is_empty() {
            sink.token(&rest);
            text.push_str(&rest);
        }
        if !exit.status.success() {
            return Err(BackendError::Failed { backend: self.name.clone(), detail: exit.describe() });
        }
        Ok(Generation {
            text,
            usage: Usage::default(),
            model: req.model,
            finish_reason: "stop".into(),
            warnings: vec![],
        })
    }
}
