//! No child outlives the server: every program a task starts runs under a small supervisor, the
//! `koubou` binary itself started again in supervisor mode, that kills the program's whole
//! process group the moment the server is gone — even after `kill -9`.
//!
//! Why not `PR_SET_PDEATHSIG` on the program: it fires when the *thread* that forked exits
//! (tokio's blocking threads come and go), it is cleared for the program's own children, and a
//! program may reset it. Instead the server holds the write end of a pipe for its whole life and
//! never lets it into a child; each supervisor holds the read end, and end-of-file on it means
//! the server's process is gone, whatever killed it and whichever thread started the child.
//!
//! A supervisor is the leader of the program's process group (so the server's group kill still
//! reaches everything), a child subreaper (descendants whose parent died are re-parented to it,
//! so one that left the group with `setsid` is still found), blocks every catchable termination
//! signal (only SIGKILL, or the server vanishing, ends it early), and exits the way the program
//! did. When it is given the server's home lock (`hold`), it keeps that open file for its whole
//! life: a restarted server cannot take the lock, and so cannot requeue and run a task again,
//! before every supervisor of the old one — and with it every program it started — is gone.
//!
//! Not covered: a descendant that both leaves the group and outlives its parent before the
//! supervisor sees it (it is re-parented to the supervisor, which kills it when the program
//! ends or the server dies, but a descendant of a still-living helper outside the group is not
//! tracked), and `kill -9` sent to the supervisor itself.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The first argument that puts the `koubou` binary in supervisor mode.
pub const SUPERVISE_ARG: &str = "__koubou-supervise";
/// What a supervisor prints on stderr, before the reason, when the program cannot be started.
pub(crate) const SPAWN_FAILED: &str = "koubou-supervise: cannot start the program: ";
/// The exit status that goes with [`SPAWN_FAILED`].
pub(crate) const SPAWN_FAILED_STATUS: i32 = 127;

/// What a server needs to start supervised children.
pub(crate) struct Supervision {
    pub exe: PathBuf,
    /// The read end of the death pipe, inherited by every supervisor.
    pub death: RawFd,
    /// A descriptor every supervisor keeps open for its life (the server's home lock).
    pub hold: Option<RawFd>,
}

struct Held {
    supervision: Supervision,
    _read: OwnedFd,
    /// Never closed while the process lives: its end-of-file is the supervisors' signal.
    _write: OwnedFd,
}

static SUPERVISION: OnceLock<Held> = OnceLock::new();

/// Makes every child program from now on run under a supervisor: `exe` is a binary whose
/// `main` calls [`main`] when its first argument is [`SUPERVISE_ARG`] (for `koubou`:
/// `/proc/self/exe`). `hold` is a descriptor each supervisor keeps open until it exits.
/// Call once, before any backend runs; later calls change nothing.
pub fn supervise_children(exe: PathBuf, hold: Option<RawFd>) -> io::Result<()> {
    if SUPERVISION.get().is_some() {
        return Ok(());
    }
    let (read, write) = io::pipe()?; // both close-on-exec
    let read: OwnedFd = read.into();
    let supervision = Supervision { exe, death: read.as_raw_fd(), hold };
    let _ = SUPERVISION.set(Held { supervision, _read: read, _write: write.into() });
    Ok(())
}

/// The supervision set up by [`supervise_children`], if any.
pub(crate) fn supervision() -> Option<&'static Supervision> {
    SUPERVISION.get().map(|h| &h.supervision)
}

/// The arguments that start a supervisor for `program args…`.
pub(crate) fn supervisor_args(s: &Supervision, program: &OsString, args: &[OsString]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        SUPERVISE_ARG.into(),
        s.death.to_string().into(),
        s.hold.map_or_else(|| "-".to_owned(), |h| h.to_string()).into(),
        "--".into(),
        program.clone(),
    ];
    a.extend(args.iter().cloned());
    a
}

/// Lets the descriptors a supervisor needs survive `exec`. Runs in the forked child before
/// `exec`, so it only calls `fcntl` (async-signal-safe).
pub(crate) fn keep_across_exec(s: &Supervision) -> impl FnMut() -> io::Result<()> + Send + Sync + 'static {
    let fds: Vec<RawFd> = std::iter::once(s.death).chain(s.hold).collect();
    move || {
        for &fd in &fds {
            // SAFETY: fcntl on a descriptor number only changes that descriptor's flags.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// The supervisor: `args` are what follows [`SUPERVISE_ARG`] (`DEATH_FD HOLD_FD|- -- PROGRAM
/// ARGS…`). Never returns: exits the way the program did.
pub fn main(args: Vec<OsString>) -> ! {
    match run(args) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("koubou-supervise: {e}");
            std::process::exit(125)
        }
    }
}

enum Never {}

fn fd_arg(a: Option<&OsString>, what: &str) -> io::Result<Option<RawFd>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("bad {what} argument"));
    match a.and_then(|s| s.to_str()) {
        Some("-") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| bad()),
        None => Err(bad()),
    }
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: fcntl on a descriptor number only changes that descriptor's flags.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

fn run(args: Vec<OsString>) -> io::Result<Never> {
    let death = fd_arg(args.first(), "death pipe")?
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no death pipe"))?;
    let hold = fd_arg(args.get(1), "hold")?;
    if args.get(2).and_then(|s| s.to_str()) != Some("--") || args.len() < 4 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "usage: DEATH_FD HOLD_FD|- -- PROGRAM [ARGS…]"));
    }
    // The program gets neither descriptor; the supervisor keeps both until it exits.
    set_cloexec(death);
    if let Some(h) = hold {
        set_cloexec(h);
    }
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes this process's attributes.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    block_termination_signals();

    let program = &args[3];
    let child = match std::process::Command::new(program).args(&args[4..]).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{SPAWN_FAILED}{}", crate::process::describe_spawn_error(&program.to_string_lossy(), &e));
            std::process::exit(SPAWN_FAILED_STATUS);
        }
    };
    let pid = child.id() as i32;
    // SAFETY: the descriptor was inherited from the server and nothing else in this process
    // owns it.
    let pipe = std::fs::File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(death) });
    std::thread::spawn(move || watch_server(pipe, pid));
    let status = wait_reaping(pid);
    // The program is done: whatever it left that was re-parented here goes too. (Helpers still
    // in the group are the server's to kill once it has read their output.)
    kill_adopted(pid, false);
    exit_like(status)
}

/// Blocks until the server's end of the pipe closes, then kills everything this supervisor
/// answers for, itself included.
fn watch_server(mut pipe: std::fs::File, program: i32) {
    let mut buf = [0u8; 16];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    kill_adopted(program, true);
    // SAFETY: kill(0, SIGKILL) signals this process's own group, which this supervisor leads.
    unsafe { libc::kill(0, libc::SIGKILL) };
}

/// Only SIGKILL, or the server vanishing, ends a supervisor early: the server's own SIGTERM to
/// the group is for the program. (`std::process::Command` clears the mask for the program.)
fn block_termination_signals() {
    // SAFETY: a zeroed sigset_t is valid storage; sigemptyset/sigaddset initialise it, and
    // pthread_sigmask only changes this thread's mask (threads started later inherit it).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGPIPE] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits for `pid`, reaping any re-parented descendant that exits meanwhile. Returns the raw
/// wait status of `pid`.
fn wait_reaping(pid: i32) -> libc::c_int {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local.
        let got = unsafe { libc::waitpid(-1, &mut status, 0) };
        if got == pid {
            return status;
        }
        if got == -1 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return 0; // no children left (cannot happen while `pid` lives)
        }
    }
}

/// This process's children, from `/proc/self/task/*/children`.
fn children() -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return vec![] };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

/// SIGKILLs every child (and the group each leads), except the program unless `with_program`.
fn kill_adopted(program: i32, with_program: bool) {
    for pid in children() {
        if pid == program && !with_program {
            continue;
        }
        // SAFETY: kill only sends signals. `-pid` names a group only if `pid` (alive, our
        // child) leads it: a group id is never reused while its group exists.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Exits with the program's status, or dies of the signal that killed it (without a core).
fn exit_like(status: libc::c_int) -> io::Result<Never> {
    if libc::WIFEXITED(status) {
        std::process::exit(libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: resetting a disposition, unblocking and raising only affect this process.
        unsafe {
            let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(sig);
        }
    }
    std::process::exit(128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let s = Supervision { exe: "/proc/self/exe".into(), death: 7, hold: Some(9) };
        let a = supervisor_args(&s, &"prog".into(), &["-x".into(), "--".into()]);
        assert_eq!(a, ["__koubou-supervise", "7", "9", "--", "prog", "-x", "--"].map(OsString::from));
        assert_eq!(fd_arg(a.get(1), "d").unwrap(), Some(7));
        assert_eq!(fd_arg(Some(&"-".into()), "h").unwrap(), None);
        assert!(fd_arg(Some(&"x".into()), "h").is_err());
    }
}
