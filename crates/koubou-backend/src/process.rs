//! Running one child program for one generation: spawned from an argv (never a shell string) in
//! a process group of its own, with exactly the environment its provider chose (nothing is
//! inherited implicitly), stdin fed then closed, stdout streamed to the caller as it comes, the
//! tail of stderr kept for error messages, and — on cancel or timeout — the whole group
//! terminated (SIGTERM, a short grace, then SIGKILL) before returning. When the binary set up
//! [`crate::supervise`], the program runs under a supervisor that kills the group if the server
//! dies, even by `kill -9`.
//!
//! Why it exists: the exec and codex providers both hand a task to a program that may hang, fork
//! helpers (codex runs tools and a sandbox), or ignore SIGTERM. Killing only the direct child
//! would leave those running, so the group handling lives once here and both providers use it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::RwLock;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::{BackendError, CancellationToken};

/// How long a group gets between SIGTERM and SIGKILL.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(2);
/// How much of stderr is kept.
const STDERR_TAIL: usize = 4096;
/// After the program exits, how long to wait for stdout to close (a helper it left behind may
/// still hold it) before the rest of the group is killed.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// What to run.
#[derive(Clone, Debug, Default)]
pub(crate) struct ProcSpec {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// The child's whole environment.
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    /// Bytes written to stdin before it is closed; `None` means stdin is /dev/null.
    pub stdin: Option<Vec<u8>>,
}

/// How the program ended.
#[derive(Debug)]
pub(crate) struct ProcExit {
    pub status: ExitStatus,
    /// The last few KB of stderr, lossily decoded.
    pub stderr_tail: String,
}

impl ProcExit {
    /// "exit status 3" / "killed by signal 9", then the stderr tail if any.
    pub(crate) fn describe(&self) -> String {
        use std::os::unix::process::ExitStatusExt;
        let how = match (self.status.code(), self.status.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "ended abnormally".to_owned(),
        };
        let tail = self.stderr_tail.trim();
        if tail.is_empty() { format!("{how} (no stderr)") } else { format!("{how}: {tail}") }
    }
}

/// Sends `sig` to every process in group `pgid`. Returns false when the group is empty.
fn signal_group(pgid: i32, sig: libc::c_int) -> bool {
    if pgid <= 1 {
        return false; // never signal our own group or everything
    }
    // SAFETY: kill(2) with a negative pid only sends a signal; no memory is touched.
    unsafe { libc::kill(-pgid, sig) == 0 }
}

/// Kills the group with SIGKILL if the run is abandoned (its future dropped) before it ended.
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

/// Terminates the whole group: SIGTERM, up to [`KILL_GRACE`] for it to go, then SIGKILL; reaps
/// the leader.
async fn kill_group(child: &mut Child, pgid: i32) {
    signal_group(pgid, libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + KILL_GRACE;
    let mut leader_gone = false;
    loop {
        if !leader_gone {
            leader_gone = matches!(child.try_wait(), Ok(Some(_)) | Err(_));
        }
        // Zombies still count as group members until their parent reaps them, so once the
        // leader is reaped an empty group is the signal that everything is gone.
        if leader_gone && !signal_group(pgid, 0) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    signal_group(pgid, libc::SIGKILL);
    let _ = child.wait().await;
}

/// Reads `r` to the end, keeping only the last [`STDERR_TAIL`] bytes.
async fn tail_of(mut r: impl AsyncRead + Unpin) -> String {
    let mut keep: VecDeque<u8> = VecDeque::with_capacity(STDERR_TAIL);
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                keep.extend(&buf[..n]);
                let over = keep.len().saturating_sub(STDERR_TAIL);
                keep.drain(..over);
            }
        }
    }
    let bytes: Vec<u8> = keep.into();
    let s = String::from_utf8_lossy(&bytes).into_owned();
    // Cut a leading partial character the byte window may have left.
    s.trim_start_matches('\u{fffd}').to_owned()
}

/// Why a run ended early.
pub(crate) enum Stopped {
    Cancelled,
    TimedOut,
}

/// Runs `spec`, calling `on_stdout` with each chunk of stdout as it arrives. Returns the exit
/// once the program has exited and its stdout is closed; on `cancel` or after `timeout`, kills
/// the whole process group first and returns [`BackendError::Cancelled`] /
/// [`BackendError::Timeout`]. If `on_stdout` returns an error the group is killed and it is
/// returned. A program that cannot be started is a [`BackendError::Config`] error.
pub(crate) async fn run(
    backend: &str,
    spec: ProcSpec,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
    mut on_stdout: impl FnMut(&[u8]) -> Result<(), BackendError>,
) -> Result<ProcExit, BackendError> {
    if cancel.is_cancelled() {
        return Err(BackendError::Cancelled);
    }
    let supervisor = crate::supervise::supervision();
    let mut cmd = match supervisor {
        Some(s) => {
            let mut c = Command::new(&s.exe);
            c.arg0("koubou-supervise").args(crate::supervise::supervisor_args(s, &spec.program, &spec.args));
            // SAFETY: the hook only calls fcntl, which is async-signal-safe.
            unsafe { c.pre_exec(crate::supervise::keep_across_exec(s)) };
            c
        }
        None => {
            let mut c = Command::new(&spec.program);
            c.args(&spec.args);
            c
        }
    };
    cmd.env_clear()
        .envs(&spec.env)
        .stdin(if spec.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &spec.workdir {
        cmd.current_dir(dir);
    }
    let program = spec.program.to_string_lossy().into_owned();
    let mut child = cmd.spawn().map_err(|e| match supervisor {
        Some(s) if e.kind() != io::ErrorKind::NotFound || spec.workdir.as_ref().is_none_or(|d| d.is_dir()) => {
            BackendError::Config {
                backend: backend.to_owned(),
                detail: format!("cannot start the supervisor {}: {e}", s.exe.display()),
            }
        }
        _ => spawn_error(backend, &program, &spec, &e),
    })?;
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    let mut guard = GroupGuard { pgid, armed: true };

    if let (Some(input), Some(mut stdin)) = (spec.stdin, child.stdin.take()) {
        // Fed from a task of its own so a program that never reads stdin cannot stall us; a
        // program that exits without reading it gives a broken pipe, which is fine.
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        });
    }
    let stderr_task = child.stderr.take().map(|e| tokio::spawn(tail_of(e)));
    let mut stdout = child.stdout.take();

    let sleep = tokio::time::sleep(timeout.unwrap_or(Duration::MAX / 4));
    tokio::pin!(sleep);
    let mut buf = vec![0u8; 8192];
    let mut status: Option<ExitStatus> = None;
    let mut drain_deadline: Option<tokio::time::Instant> = None;

    let outcome: Result<(), Stopped> = loop {
        if stdout.is_none() && status.is_some() {
            break Ok(());
        }
        let drain = async {
            match drain_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break Err(Stopped::Cancelled),
            _ = &mut sleep => break Err(Stopped::TimedOut),
            r = read_some(&mut stdout, &mut buf) => match r {
                Ok(0) | Err(_) => stdout = None,
                Ok(n) => {
                    if let Err(e) = on_stdout(&buf[..n]) {
                        kill_group(&mut child, pgid).await;
                        guard.armed = false;
                        return Err(e);
                    }
                }
            },
            s = child.wait(), if status.is_none() => {
                match s {
                    Ok(s) => status = Some(s),
                    Err(e) => {
                        kill_group(&mut child, pgid).await;
                        guard.armed = false;
                        return Err(BackendError::Failed { backend: backend.to_owned(), detail: format!("waiting for {program}: {e}") });
                    }
                }
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            }
            _ = drain => {
                // The program exited but something it started still holds stdout open.
                tracing::debug!(backend, program, "child exited; killing what it left behind");
                stdout = None;
            }
        }
    };
    match outcome {
        Err(stop) => {
            kill_group(&mut child, pgid).await;
            guard.armed = false;
            if let Some(t) = stderr_task {
                t.abort();
            }
            Err(match stop {
                Stopped::Cancelled => BackendError::Cancelled,
                Stopped::TimedOut => {
                    BackendError::Timeout { backend: backend.to_owned(), timeout: timeout.unwrap_or_default() }
                }
            })
        }
        Ok(()) => {
            // Anything still in the group (helpers the program left behind) goes too.
            signal_group(pgid, libc::SIGKILL);
            guard.armed = false;
            let stderr_tail = match stderr_task {
                Some(t) => tokio::time::timeout(DRAIN_GRACE, t).await.ok().and_then(Result::ok).unwrap_or_default(),
                None => String::new(),
            };
            let status = status.unwrap_or_else(|| {
                use std::os::unix::process::ExitStatusExt;
                ExitStatus::from_raw(0)
            });
            if supervisor.is_some()
                && status.code() == Some(crate::supervise::SPAWN_FAILED_STATUS)
                && let Some((_, why)) = stderr_tail.split_once(crate::supervise::SPAWN_FAILED)
            {
                return Err(BackendError::Config {
                    backend: backend.to_owned(),
                    detail: why.lines().next().unwrap_or(why).to_owned(),
                });
            }
            Ok(ProcExit { status, stderr_tail })
        }
    }
}

async fn read_some(r: &mut Option<tokio::process::ChildStdout>, buf: &mut [u8]) -> io::Result<usize> {
    match r {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

fn spawn_error(backend: &str, program: &str, spec: &ProcSpec, e: &io::Error) -> BackendError {
    let detail = match &spec.workdir {
        Some(dir) if e.kind() == io::ErrorKind::NotFound && !dir.is_dir() => {
            format!("working directory {} does not exist", dir.display())
        }
        _ => describe_spawn_error(program, e),
    };
    BackendError::Config { backend: backend.to_owned(), detail }
}

/// Why `program` could not be started, in words that say what to do.
pub(crate) fn describe_spawn_error(program: &str, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => format!("program {program:?} not found (give a full path, or put it on PATH)"),
        io::ErrorKind::PermissionDenied => format!("program {program:?} is not executable (permission denied)"),
        _ => format!("cannot start {program:?}: {e}"),
    }
}

/// Koubou's own secret: never in a child's environment, whatever the configuration says.
pub const AUTH_TOKEN_ENV: &str = "KOUBOU_AUTH_TOKEN";

/// Variables no child inherits unless its own `pass_env` names them: the keys backends read.
/// Process-wide, like the environment it filters.
static WITHHELD: RwLock<BTreeSet<String>> = RwLock::new(BTreeSet::new());

/// Withholds `names` (other backends' key variables) from every child that inherits the
/// server's environment. The system calls it with every configured backend's `key_env` before
/// it starts them.
pub fn withhold_env(names: impl IntoIterator<Item = String>) {
    WITHHELD.write().unwrap_or_else(|e| e.into_inner()).extend(names);
}

fn value_of(name: &str) -> Option<(String, String)> {
    (name != AUTH_TOKEN_ENV).then(|| std::env::var(name).ok().map(|v| (name.to_owned(), v))).flatten()
}

/// An exec program's environment: only what a program needs to find itself, its home and its
/// language (`PATH`, `HOME`, `USER`, `LANG`, `LC_*`, `TMPDIR`), the variables `pass` names, then
/// `set`.
pub(crate) fn minimal_env(pass: &[String], set: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| matches!(k.as_str(), "PATH" | "HOME" | "USER" | "LANG" | "TMPDIR") || k.starts_with("LC_"))
        .collect();
    env.extend(pass.iter().filter_map(|n| value_of(n)));
    env.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// The server's environment minus Koubou's token and the withheld keys (except those `pass`
/// names), then `set`: for a program (codex) that needs the user's own setup.
pub(crate) fn inherited_env(pass: &[String], set: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let withheld = WITHHELD.read().unwrap_or_else(|e| e.into_inner());
    let mut env: BTreeMap<String, String> =
        std::env::vars().filter(|(k, _)| k != AUTH_TOKEN_ENV && (!withheld.contains(k) || pass.contains(k))).collect();
    env.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Cuts a byte stream into pieces that are whole UTF-8 (a character split across two reads is
/// held until its end arrives; invalid bytes become U+FFFD).
#[derive(Default)]
pub(crate) struct Utf8Chunker {
    pending: Vec<u8>,
}

impl Utf8Chunker {
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let keep = incomplete_tail(&self.pending);
        let cut = self.pending.len() - keep;
        let out = String::from_utf8_lossy(&self.pending[..cut]).into_owned();
        self.pending.drain(..cut);
        out
    }

    pub(crate) fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// How many bytes at the end of `b` are the start of a UTF-8 sequence that is not complete yet.
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let byte = b[b.len() - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: look further back
        }
        let need = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if need > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_chunker_never_splits_a_character() {
        let s = "aé日本😀z";
        let bytes = s.as_bytes();
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let mut c = Utf8Chunker::default();
                let parts = [c.push(&bytes[..i]), c.push(&bytes[i..j]), c.push(&bytes[j..]), c.finish()];
                assert!(parts.iter().all(|p| !p.contains('\u{fffd}')), "split {i},{j}: {parts:?}");
                assert_eq!(parts.concat(), s);
            }
        }
        let mut c = Utf8Chunker::default();
        assert_eq!(c.push(b"a\xff"), "a\u{fffd}");
        assert_eq!(c.push(b"\xe6"), "");
        assert_eq!(c.finish(), "\u{fffd}");
    }

    #[test]
    fn never_signals_own_or_all_groups() {
        assert!(!signal_group(0, 0));
        assert!(!signal_group(1, 0));
    }
}
