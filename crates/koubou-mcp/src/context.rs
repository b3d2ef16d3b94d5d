//! Context files for `delegate_task`: read from the folders the user allowed, bounded in size,
//! and written into the prompt the craftsman sees.
//!
//! Each file is opened *beneath* its allowed folder by the kernel (`openat2` with
//! `RESOLVE_BENEATH`, or a walk of `O_NOFOLLOW` opens where that is missing), so a symlink
//! swapped in between a check and the open cannot lead outside: there is no separate check.
//! The descriptor is opened with `O_PATH` first (no side effect, never blocks, even on a FIFO
//! or a device), must be a regular file outside `/proc`, `/sys` and `/dev`, is size-checked
//! against what is left of `max_context_bytes`, and only then re-opened for reading through a
//! bounded reader (a file growing meanwhile cannot push the total past the limit).

use std::{
    ffi::CString,
    io::Read,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    os::unix::ffi::OsStrExt,
    path::{Component, Path, PathBuf},
};

use koubou_api::settings::McpConfig;
use koubou_task::FieldError;

/// One attached file.
pub(crate) struct Attached {
    pub path: PathBuf,
    pub text: String,
}

/// Where files may come from when `[mcp] allowed_paths` is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unconfigured {
    /// The working directory (stdio: the process is the user's own, started in their project).
    WorkingDir,
    /// Nowhere (HTTP: any local user can reach the port, with no token by default).
    Nothing,
}

/// Never read from these, whatever `allowed_paths` says.
const FORBIDDEN: [&str; 3] = ["/proc", "/sys", "/dev"];

/// The folders files may come from, canonicalized.
fn roots(cfg: &McpConfig, unconfigured: Unconfigured) -> Result<Vec<PathBuf>, FieldError> {
    let configured = match (cfg.allowed_paths.is_empty(), unconfigured) {
        (false, _) => cfg.allowed_paths.clone(),
        (true, Unconfigured::WorkingDir) => {
            vec![std::env::current_dir().map_err(|e| FieldError::new("files", format!("no working directory: {e}")))?]
        }
        (true, Unconfigured::Nothing) => {
            return Err(FieldError::new(
                "files",
                "this server attaches no files over HTTP until [mcp] allowed_paths is set in its koubou.toml \
                 (or pass the text in the prompt)",
            ));
        }
    };
    // A configured folder that does not exist allows nothing; it is not an error by itself.
    Ok(configured
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .filter(|p| !FORBIDDEN.iter().any(|f| p.starts_with(f)))
        .collect())
}

/// Reads `paths` (absolute, or relative to the first allowed folder), refusing anything outside
/// the allowed folders (symlinks and `..` resolved by the kernel, beneath the folder), anything
/// but a regular UTF-8 text file, and a total above `max_context_bytes`.
pub(crate) fn read(cfg: &McpConfig, unconfigured: Unconfigured, paths: &[&str]) -> Result<Vec<Attached>, FieldError> {
    if paths.is_empty() {
        return Ok(vec![]);
    }
    let err = |m: String| FieldError::new("files", m);
    let roots = roots(cfg, unconfigured)?;
    let allowed = || roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ");
    let outside = |p: &str| {
        err(format!(
            "{p} is outside the folders Koubou may read ({}); set [mcp] allowed_paths in koubou.toml to allow more",
            allowed()
        ))
    };
    let mut out = Vec::with_capacity(paths.len());
    let mut total = 0usize;
    for &p in paths {
        let given = Path::new(p);
        if given.is_absolute() && FORBIDDEN.iter().any(|f| given.starts_with(f)) {
            return Err(err(format!("{p}: files under /proc, /sys and /dev are never attached")));
        }
        let (root, rel) = match (given.is_absolute(), roots.first()) {
            (true, _) => match roots.iter().find_map(|r| given.strip_prefix(r).ok().map(|rel| (r, rel))) {
                Some(found) => found,
                None => return Err(outside(p)),
            },
            (false, Some(base)) => (base, given),
            (false, None) => return Err(err(format!("{p}: no allowed folder exists to resolve a relative path"))),
        };
        let path_fd = open_beneath(root, rel).map_err(|e| match e.raw_os_error() {
            Some(libc::EXDEV | libc::ELOOP) => outside(p),
            _ => err(format!("{p}: {e}")),
        })?;
        let real = std::fs::read_link(format!("/proc/self/fd/{}", path_fd.as_raw_fd())).unwrap_or(root.join(rel));
        if FORBIDDEN.iter().any(|f| real.starts_with(f)) {
            return Err(err(format!("{p}: files under /proc, /sys and /dev are never attached")));
        }
        let meta = fstat(&path_fd).map_err(|e| err(format!("{p}: {e}")))?;
        if meta.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(err(format!("{p} is not a regular file")));
        }
        let left = cfg.max_context_bytes.saturating_sub(total);
        let too_big = || {
            err(format!(
                "attached files total more than {} bytes (at {p}); attach fewer or smaller files, or raise [mcp] \
                 max_context_bytes",
                cfg.max_context_bytes
            ))
        };
        if meta.st_size as u64 > left as u64 {
            return Err(too_big());
        }
        // Re-open the very file checked above (not the path again) for reading.
        let file = std::fs::File::open(format!("/proc/self/fd/{}", path_fd.as_raw_fd()))
            .map_err(|e| err(format!("{p}: {e}")))?;
        let mut bytes = Vec::new();
        file.take(left as u64 + 1).read_to_end(&mut bytes).map_err(|e| err(format!("{p}: {e}")))?;
        if bytes.len() > left {
            return Err(too_big());
        }
        total += bytes.len();
        let text = String::from_utf8(bytes).map_err(|_| err(format!("{p} is not UTF-8 text")))?;
        if text.contains('\0') {
            return Err(err(format!("{p} looks binary (contains NUL bytes)")));
        }
        out.push(Attached { path: real, text });
    }
    Ok(out)
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: a zeroed stat is valid storage for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor and `st` is writable.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

fn owned(fd: libc::c_long) -> std::io::Result<OwnedFd> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Opens `rel` beneath `root` with `O_PATH`: the kernel resolves every component (symlinks
/// included) and refuses to leave `root` (EXDEV). Falls back to a component-by-component walk
/// with `O_NOFOLLOW` (no symlinks at all) on kernels without `openat2`.
fn open_beneath(root: &Path, rel: &Path) -> std::io::Result<OwnedFd> {
    let root_fd = owned(
        // SAFETY: open(2) with a NUL-terminated path.
        unsafe { libc::open(cstr(root)?.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) } as _,
    )?;
    let rel_c = cstr(if rel.as_os_str().is_empty() { Path::new(".") } else { rel })?;
    // SAFETY: open_how is plain integers; all-zero is a valid value to fill in.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid directory descriptor, a NUL-terminated path and a properly
    // sized open_how.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, root_fd.as_raw_fd(), rel_c.as_ptr(), &how, size_of::<libc::open_how>())
    };
    match owned(fd) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => walk_nofollow(root_fd, rel),
        r => r,
    }
}

/// The fallback: one `openat(O_NOFOLLOW)` per component; `..` and symlinks are refused.
fn walk_nofollow(root: OwnedFd, rel: &Path) -> std::io::Result<OwnedFd> {
    let mut dir = root;
    for c in rel.components() {
        let name = match c {
            Component::Normal(n) => {
                CString::new(n.as_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?
            }
            Component::CurDir => continue,
            _ => return Err(std::io::Error::from_raw_os_error(libc::EXDEV)),
        };
        // SAFETY: openat(2) with an open directory descriptor and a NUL-terminated name.
        let fd =
            unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
        let next = owned(fd as _)?;
        if fstat(&next)?.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
        }
        dir = next;
    }
    Ok(dir)
}

/// The prompt the craftsman sees: the files first, then the instructions.
pub(crate) fn compose(prompt: &str, files: &[Attached]) -> String {
    if files.is_empty() {
        return prompt.to_owned();
    }
    let mut s = String::new();
    for f in files {
        s.push_str(&format!("--- file: {} ---\n", f.path.display()));
        s.push_str(&f.text);
        if !f.text.ends_with('\n') {
            s.push('\n');
        }
        s.push_str("--- end of file ---\n\n");
    }
    s.push_str(prompt);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(root: &Path, max: usize) -> McpConfig {
        McpConfig { allowed_paths: vec![root.into()], max_context_bytes: max, ..McpConfig::default() }
    }

    #[test]
    fn reads_only_allowed_text_within_budget() {
        let allowed = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(allowed.path().join("a.txt"), "alpha").unwrap();
        std::fs::write(allowed.path().join("bin"), b"\xff\xfe").unwrap();
        std::fs::write(outside.path().join("secret"), "no").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), allowed.path().join("link")).unwrap();
        std::fs::create_dir(allowed.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("../a.txt", allowed.path().join("sub/inside")).unwrap();
        let cfg = cfg(allowed.path(), 8);
        let d = Unconfigured::Nothing;
        let a = allowed.path().canonicalize().unwrap().join("a.txt");
        let files = read(&cfg, d, &[a.to_str().unwrap()]).unwrap();
        assert_eq!(files[0].text, "alpha");
        assert_eq!(read(&cfg, d, &["a.txt"]).unwrap()[0].text, "alpha", "relative to the first allowed folder");
        assert_eq!(read(&cfg, d, &["sub/inside"]).unwrap()[0].text, "alpha", "a symlink that stays inside");
        let msg = |p: &str| read(&cfg, d, &[p]).err().unwrap().message;
        assert!(msg(outside.path().join("secret").to_str().unwrap()).contains("outside"));
        assert!(msg("link").contains("outside"), "symlinks are resolved beneath the folder");
        assert!(msg("../x").contains("outside"), "{}", msg("../x"));
        assert!(msg("bin").contains("UTF-8"));
        assert!(msg("missing").contains("No such file"));
        assert!(msg("sub").contains("not a regular file"));
        assert!(read(&cfg, d, &["a.txt", "a.txt"]).err().unwrap().message.contains("more than 8 bytes"));
        let p = compose("Summarize.", &files);
        assert!(p.starts_with("--- file: ") && p.contains("alpha\n--- end of file ---\n\nSummarize."));
    }

    #[test]
    fn proc_sys_dev_and_special_files_are_refused_without_blocking() {
        let root = tempfile::tempdir().unwrap();
        let fifo = root.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink("/dev/zero", root.path().join("zero")).unwrap();
        std::os::unix::fs::symlink("/proc/self/environ", root.path().join("environ")).unwrap();
        let cfg = cfg(root.path(), 1 << 20);
        let d = Unconfigured::Nothing;
        // A FIFO nobody writes to would block a plain open for reading forever.
        assert!(read(&cfg, d, &["fifo"]).err().unwrap().message.contains("not a regular file"));
        assert!(read(&cfg, d, &["zero"]).err().unwrap().message.contains("outside"));
        assert!(read(&cfg, d, &["environ"]).err().unwrap().message.contains("outside"));
        for p in ["/proc/self/environ", "/dev/zero", "/sys/kernel/notes"] {
            assert!(read(&cfg, d, &[p]).err().unwrap().message.contains("never attached"), "{p}");
        }
        let everything = McpConfig { allowed_paths: vec!["/".into()], ..McpConfig::default() };
        let m = read(&everything, d, &["/proc/self/environ"]).err().unwrap().message;
        assert!(m.contains("never attached"), "{m}");
        let m = read(&everything, d, &["proc/self/status"]).err().unwrap().message;
        assert!(m.contains("never attached"), "even with / allowed: {m}");
    }

    #[test]
    fn over_http_nothing_is_attached_until_allowed_paths_is_set() {
        let m = read(&McpConfig::default(), Unconfigured::Nothing, &["README.md"]).err().unwrap();
        assert_eq!(m.field, "files");
        assert!(m.message.contains("allowed_paths"), "{}", m.message);
        assert!(read(&McpConfig::default(), Unconfigured::Nothing, &[]).unwrap().is_empty());
    }

    /// A symlink swapped in for a file, as fast as possible, while reads go on: no read ever
    /// returns what is outside the folder.
    #[test]
    fn a_symlink_swapped_in_during_reads_never_leads_outside() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "TOP SECRET").unwrap();
        let target = root.path().join("f");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (stop, target, secret) = (stop.clone(), target.clone(), outside.path().join("secret"));
            let tmp_file = root.path().join("f.file");
            let tmp_link = root.path().join("f.link");
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::fs::write(&tmp_file, "harmless").unwrap();
                    std::fs::rename(&tmp_file, &target).unwrap();
                    let _ = std::fs::remove_file(&tmp_link);
                    std::os::unix::fs::symlink(&secret, &tmp_link).unwrap();
                    std::fs::rename(&tmp_link, &target).unwrap();
                }
            })
        };
        let cfg = cfg(root.path(), 1 << 20);
        while !target.exists() {
            std::thread::yield_now();
        }
        // Read until both outcomes were seen many times (or a generous deadline passes).
        let (mut read_ok, mut refused) = (0, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while (read_ok < 100 || refused < 100) && std::time::Instant::now() < deadline {
            match read(&cfg, Unconfigured::Nothing, &["f"]) {
                Ok(files) => {
                    assert_eq!(files[0].text, "harmless", "read through the swapped-in symlink");
                    read_ok += 1;
                }
                Err(e) => {
                    assert!(!e.message.contains("TOP SECRET"));
                    assert!(e.message.contains("outside"), "{}", e.message);
                    refused += 1;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
        eprintln!("{read_ok} reads of the file, {refused} refusals of the symlink");
        assert!(read_ok > 0 && refused > 0, "the race was not exercised");
    }
}
