//! Checking a model file before Koubou relies on it: the pure GGUF check ([`crate::gguf`]), then
//! a trial load by llama.cpp in a child process, under a timeout and a memory cap, so that a file
//! which makes llama.cpp abort (it does, on some well-formed files) kills only the child.
//!
//! This crate does not know which program it runs in, so the child is described by a
//! [`TrialLoader`]: a program and the arguments before the model path. The `koubou` binary
//! re-executes itself (`koubou models check-load <path>`, whose body is [`child_main`]) and
//! installs that loader once at start ([`TrialLoader::install`]); [`validate`] then uses it.
//! Without an installed loader, [`validate`] does the pure check only.

use std::{
    ffi::OsString,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    gguf,
    models::{ModelError, io_err},
};

/// How long a trial load may take by default (a large model read from a slow disk takes a while:
/// the trial decodes one token, which touches every weight).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Address space a trial load may use beyond the size of the file (which it maps whole).
pub const MEMORY_HEADROOM: u64 = 4 << 30;
/// How much of the child's stderr is kept for the reason of a failure.
const STDERR_KEEP: usize = 16 << 10;

/// What a successful trial load saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialReport {
    pub architecture: String,
    pub n_params: u64,
    pub n_vocab: i32,
    /// Tokens of the test prompt decoded.
    pub decoded: usize,
}

/// What [`validate`] found.
#[derive(Clone, Debug)]
pub struct Validated {
    pub summary: gguf::Summary,
    /// `None` when no trial loader is installed.
    pub trial: Option<TrialReport>,
}

/// Why a trial load failed.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error("cannot start the trial load ({program}): {source}")]
    Spawn { program: PathBuf, source: std::io::Error },
    #[error("llama.cpp cannot load it: {0}")]
    Refused(String),
    #[error("llama.cpp crashed while loading it (signal {signal}{}){}", signal_name(.signal), tail(.stderr))]
    Crashed { signal: i32, stderr: String },
    #[error("the trial load exited with status {code}{}", tail(.stderr))]
    Exit { code: i32, stderr: String },
    #[error("the trial load did not finish within {0:?}")]
    TimedOut(Duration),
}

fn signal_name(sig: &i32) -> &'static str {
    match *sig {
        libc::SIGABRT => ", SIGABRT",
        libc::SIGSEGV => ", SIGSEGV",
        libc::SIGBUS => ", SIGBUS",
        libc::SIGFPE => ", SIGFPE",
        libc::SIGILL => ", SIGILL",
        libc::SIGKILL => ", SIGKILL: out of memory?",
        _ => "",
    }
}

fn tail(stderr: &str) -> String {
    let line = reason_line(stderr);
    if line.is_empty() { String::new() } else { format!(": {line}") }
}

/// The line of a child's stderr that says most about why it failed: an assertion, else the last
/// line that mentions an error, else the last line. Source paths are cut to the file name.
pub fn reason_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let pick = lines
        .iter()
        .rev()
        .find(|l| l.contains("GGML_ASSERT") || l.contains("GGML_ABORT"))
        .or_else(|| lines.iter().rev().find(|l| l.to_ascii_lowercase().contains("error")))
        .or(lines.last())
        .copied()
        .unwrap_or("");
    let short = match pick.split_once(": ") {
        Some((head, rest)) if head.starts_with('/') => {
            let file = head.rsplit('/').next().unwrap_or(head);
            format!("{file}: {rest}")
        }
        _ => pick.to_string(),
    };
    short.chars().take(400).collect()
}

/// A program that loads a model given as its last argument, the way [`child_main`] does.
#[derive(Clone, Debug)]
pub struct TrialLoader {
    program: PathBuf,
    args: Vec<OsString>,
    timeout: Duration,
}

static INSTALLED: OnceLock<TrialLoader> = OnceLock::new();

impl TrialLoader {
    /// `program args… <model>`, with the default timeout.
    pub fn new(program: impl Into<PathBuf>, args: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        TrialLoader {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Makes this the loader [`validate`] uses in this process. Returns `false` (and changes
    /// nothing) when one is installed already.
    pub fn install(self) -> bool {
        INSTALLED.set(self).is_ok()
    }

    /// The installed loader, if any.
    pub fn installed() -> Option<&'static TrialLoader> {
        INSTALLED.get()
    }

    /// Runs the child on `model` and reads its report. The child runs in its own process group
    /// (killed whole on timeout), with its address space capped at the file's size plus
    /// [`MEMORY_HEADROOM`], and without ggml's debugger-attaching backtraces.
    pub fn run(&self, model: &Path) -> Result<TrialReport, TrialError> {
        use std::os::unix::process::{CommandExt, ExitStatusExt};

        let file_len = std::fs::metadata(model).map(|m| m.len()).unwrap_or(0);
        let limit = file_len.saturating_add(MEMORY_HEADROOM);
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .arg(model)
            .env("GGML_NO_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: between fork and exec only async-signal-safe calls: setrlimit.
        unsafe {
            cmd.pre_exec(move || {
                let rl = libc::rlimit { rlim_cur: limit as libc::rlim_t, rlim_max: limit as libc::rlim_t };
                if libc::setrlimit(libc::RLIMIT_AS, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| TrialError::Spawn { program: self.program.clone(), source })?;
        let stdout = collect(child.stdout.take(), 64 << 10);
        let stderr = collect(child.stderr.take(), STDERR_KEEP);
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() >= deadline => {
                    // SAFETY: signalling the child's own process group.
                    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                    let _ = child.wait();
                    return Err(TrialError::TimedOut(self.timeout));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(TrialError::Spawn { program: self.program.clone(), source: e }),
            }
        };
        let out = finish(stdout);
        let err = finish(stderr);
        if let Some(signal) = status.signal() {
            return Err(TrialError::Crashed { signal, stderr: err });
        }
        let report = out.lines().rev().find_map(|l| serde_json::from_str::<ChildOutcome>(l).ok());
        match (status.code(), report) {
            (Some(0), Some(ChildOutcome::Loaded(r))) => Ok(r),
            (_, Some(ChildOutcome::Failed { error })) => Err(TrialError::Refused(error)),
            (code, _) => Err(TrialError::Exit { code: code.unwrap_or(-1), stderr: err }),
        }
    }
}

type Collected = (std::thread::JoinHandle<()>, Arc<Mutex<Vec<u8>>>);

/// Reads a pipe on a thread, keeping its last `keep` bytes.
fn collect(pipe: Option<impl Read + Send + 'static>, keep: usize) -> Option<Collected> {
    let mut pipe = pipe?;
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    let h = std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            let mut v = b.lock().unwrap_or_else(|p| p.into_inner());
            v.extend_from_slice(&chunk[..n]);
            if v.len() > 2 * keep {
                let cut = v.len() - keep;
                v.drain(..cut);
            }
        }
    });
    Some((h, buf))
}

fn finish(c: Option<Collected>) -> String {
    let Some((h, buf)) = c else { return String::new() };
    let _ = h.join();
    let v = buf.lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(&v).into_owned()
}

/// The one JSON line the child prints on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
enum ChildOutcome {
    Loaded(TrialReport),
    Failed { error: String },
}

/// The body of the trial-load child: loads `model` with llama.cpp, creates a small context,
/// decodes a short prompt, prints one JSON line on stdout and returns the exit code (0 loaded,
/// 1 refused). llama.cpp's own log goes to stderr, where the parent finds the reason when the
/// load aborts.
pub fn child_main(model: &Path) -> i32 {
    let outcome = match trial_load_here(model) {
        Ok(r) => ChildOutcome::Loaded(r),
        Err(error) => ChildOutcome::Failed { error },
    };
    let code = i32::from(matches!(outcome, ChildOutcome::Failed { .. }));
    println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
    code
}

/// Loads `model` in this process (only ever called in the child).
fn trial_load_here(model: &Path) -> Result<TrialReport, String> {
    use std::num::NonZeroU32;

    use llama_cpp_2::{
        context::params::LlamaContextParams,
        llama_backend::LlamaBackend,
        llama_batch::LlamaBatch,
        model::{LlamaModel, params::LlamaModelParams},
    };

    let backend = LlamaBackend::init().map_err(|e| format!("llama.cpp backend: {e}"))?;
    let m = LlamaModel::load_from_file(&backend, model, &LlamaModelParams::default())
        .map_err(|e| format!("loading the model failed ({e})"))?;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(64))
        .with_n_batch(64)
        .with_n_ubatch(64)
        .with_n_threads(1)
        .with_n_threads_batch(1);
    let mut ctx = m.new_context(&backend, params).map_err(|e| format!("creating a context failed ({e})"))?;
    let mut tokens = m.vocab().tokenize(b"Hello", true, true);
    tokens.truncate(32);
    if !tokens.is_empty() {
        let mut batch = LlamaBatch::new(64, 1);
        for (i, &t) in tokens.iter().enumerate() {
            batch.add(t, i as i32, &[0], i + 1 == tokens.len()).map_err(|e| format!("batch: {e}"))?;
        }
        ctx.decode(&mut batch).map_err(|e| format!("decoding a test prompt failed ({e})"))?;
    }
    Ok(TrialReport {
        architecture: m.meta_val_str("general.architecture").unwrap_or_default(),
        n_params: m.n_params(),
        n_vocab: m.n_vocab(),
        decoded: tokens.len(),
    })
}

/// Checks the model at `path`: the GGUF structure, then a trial load in a child when a
/// [`TrialLoader`] is installed. The error names the file and says what is wrong with it.
pub fn validate(path: &Path) -> Result<Validated, ModelError> {
    validate_with(path, TrialLoader::installed())
}

/// [`validate`] with an explicit loader (`None`: the structural check only).
pub fn validate_with(path: &Path, trial: Option<&TrialLoader>) -> Result<Validated, ModelError> {
    let invalid = |reason: String| ModelError::Invalid { path: path.to_path_buf(), reason };
    let summary = match gguf::check_file(path) {
        Ok(s) => s,
        Err(gguf::CheckError::Io(e)) => return Err(io_err(path)(e)),
        Err(e) => return Err(invalid(e.to_string())),
    };
    let trial = match trial {
        Some(l) => Some(l.run(path).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    Ok(Validated { summary, trial })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// koubou-gguf's table of tensor types (it cannot link ggml) agrees with ggml's own.
    #[test]
    fn gguf_type_table_matches_ggml() {
        use crate::gguf::GGML_TYPES;
        for id in 0..llama_cpp_sys_2::GGML_TYPE_COUNT {
            let (blck, size) = unsafe { (llama_cpp_sys_2::ggml_blck_size(id), llama_cpp_sys_2::ggml_type_size(id)) };
            match GGML_TYPES.iter().find(|t| t.0 == id) {
                Some(&(_, name, b, s)) => assert_eq!((b, s), (blck as u64, size as u64), "{name} ({id})"),
                None => assert_eq!(blck, 0, "type {id} is missing from GGML_TYPES"),
            }
        }
        assert!(GGML_TYPES.iter().all(|t| t.0 < llama_cpp_sys_2::GGML_TYPE_COUNT));
    }
    #[test]
    fn reason_line_prefers_assertions_and_shortens_paths() {
        let err = "llama_model_loader: loaded meta data\n\
                   /root/.cargo/registry/src/x/llama.cpp/src/llama-model.cpp:1330: GGML_ASSERT(hparams.n_layer_all > 0) failed\n\
                   Aborted\n";
        assert_eq!(reason_line(err), "llama-model.cpp:1330: GGML_ASSERT(hparams.n_layer_all > 0) failed");
        let err = "a\nllama_model_load: error loading model: key not found\nllama_load_model_from_file: failed\n";
        assert_eq!(reason_line(err), "llama_model_load: error loading model: key not found");
        assert_eq!(reason_line("one\ntwo\n"), "two");
        assert_eq!(reason_line(""), "");
    }

    #[test]
    fn a_crashing_child_is_reported_with_its_signal() {
        // A stand-in child that aborts the way llama.cpp does: message on stderr, then SIGABRT.
        let l = TrialLoader::new("sh", ["-c", "echo 'x.cpp:1: GGML_ASSERT(n > 0) failed' >&2; kill -ABRT $$", "sh"]);
        let t = tempfile::NamedTempFile::new().unwrap();
        let err = l.run(t.path()).unwrap_err();
        assert!(matches!(err, TrialError::Crashed { signal: libc::SIGABRT, .. }), "{err}");
        assert!(err.to_string().contains("SIGABRT"), "{err}");
        assert!(err.to_string().contains("GGML_ASSERT(n > 0)"), "{err}");
    }

    #[test]
    fn a_hanging_child_is_killed_at_the_timeout() {
        let l = TrialLoader::new("sh", ["-c", "sleep 600", "sh"]).with_timeout(Duration::from_millis(200));
        let t = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(l.run(t.path()), Err(TrialError::TimedOut(_))));
    }

    #[test]
    fn the_child_reports_refusals_as_json() {
        let l = TrialLoader::new("sh", ["-c", "echo '{\"outcome\":\"failed\",\"error\":\"no vocab\"}'; exit 1", "sh"]);
        let t = tempfile::NamedTempFile::new().unwrap();
        let err = l.run(t.path()).unwrap_err();
        assert!(matches!(&err, TrialError::Refused(e) if e == "no vocab"), "{err}");
        let l = TrialLoader::new("sh", ["-c", "exit 3", "sh"]);
        assert!(matches!(l.run(t.path()), Err(TrialError::Exit { code: 3, .. })));
        let l = TrialLoader::new("/no/such/program", Vec::<String>::new());
        assert!(matches!(l.run(t.path()), Err(TrialError::Spawn { .. })));
    }
}
