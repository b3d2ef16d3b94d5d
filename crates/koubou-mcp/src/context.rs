//! Context files for `delegate_task`: read from the folders the user allowed, bounded in size,
//! and written into the prompt the craftsman sees.

use std::path::{Path, PathBuf};

use koubou_system::config::McpConfig;
use koubou_task::FieldError;

/// One attached file.
pub(crate) struct Attached {
    pub path: PathBuf,
    pub text: String,
}

/// The folders files may come from, canonicalized (empty config: the working directory).
fn roots(cfg: &McpConfig) -> Result<Vec<PathBuf>, FieldError> {
    let configured = if cfg.allowed_paths.is_empty() {
        vec![std::env::current_dir().map_err(|e| FieldError::new("files", format!("no working directory: {e}")))?]
    } else {
        cfg.allowed_paths.clone()
    };
    // A configured folder that does not exist allows nothing; it is not an error by itself.
    Ok(configured.iter().filter_map(|p| p.canonicalize().ok()).collect())
}

/// Reads `paths` (absolute, or relative to the first allowed folder), refusing anything outside
/// the allowed folders (after resolving symlinks and `..`), anything not UTF-8 text, and a total
/// above `max_context_bytes`.
pub(crate) fn read(cfg: &McpConfig, paths: &[&str]) -> Result<Vec<Attached>, FieldError> {
    if paths.is_empty() {
        return Ok(vec![]);
    }
    let err = |m: String| FieldError::new("files", m);
    let roots = roots(cfg)?;
    let allowed = || roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ");
    let mut out = Vec::with_capacity(paths.len());
    let mut total = 0usize;
    for &p in paths {
        let given = Path::new(p);
        let joined = match (given.is_absolute(), roots.first()) {
            (true, _) => given.to_path_buf(),
            (false, Some(base)) => base.join(given),
            (false, None) => return Err(err(format!("{p}: no allowed folder exists to resolve a relative path"))),
        };
        let real = joined.canonicalize().map_err(|e| err(format!("{p}: {e}")))?;
        if !roots.iter().any(|r| real.starts_with(r)) {
            return Err(err(format!(
                "{p} is outside the folders Koubou may read ({}); set [mcp] allowed_paths in koubou.toml to allow more",
                allowed()
            )));
        }
        if !real.is_file() {
            return Err(err(format!("{p} is not a file")));
        }
        let bytes = std::fs::read(&real).map_err(|e| err(format!("{p}: {e}")))?;
        total += bytes.len();
        if total > cfg.max_context_bytes {
            return Err(err(format!(
                "attached files total more than {} bytes (at {p}); attach fewer or smaller files, or raise [mcp] \
                 max_context_bytes",
                cfg.max_context_bytes
            )));
        }
        let text = String::from_utf8(bytes).map_err(|_| err(format!("{p} is not UTF-8 text")))?;
        if text.contains('\0') {
            return Err(err(format!("{p} looks binary (contains NUL bytes)")));
        }
        out.push(Attached { path: real, text });
    }
    Ok(out)
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

    #[test]
    fn reads_only_allowed_text_within_budget() {
        let allowed = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(allowed.path().join("a.txt"), "alpha").unwrap();
        std::fs::write(allowed.path().join("bin"), b"\xff\xfe").unwrap();
        std::fs::write(outside.path().join("secret"), "no").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), allowed.path().join("link")).unwrap();
        let cfg =
            McpConfig { allowed_paths: vec![allowed.path().into()], max_context_bytes: 8, ..McpConfig::default() };
        let a = allowed.path().join("a.txt");
        let files = read(&cfg, &[a.to_str().unwrap()]).unwrap();
        assert_eq!(files[0].text, "alpha");
        assert_eq!(read(&cfg, &["a.txt"]).unwrap()[0].text, "alpha", "relative to the first allowed folder");
        let msg = |p: &str| read(&cfg, &[p]).err().unwrap().message;
        assert!(msg(outside.path().join("secret").to_str().unwrap()).contains("outside"));
        assert!(msg("link").contains("outside"), "symlinks are resolved");
        assert!(msg("../x").contains("No such file") || msg("../x").contains("outside"));
        assert!(msg("bin").contains("UTF-8"));
        assert!(msg("missing").contains("missing"));
        assert!(read(&cfg, &["a.txt", "a.txt"]).err().unwrap().message.contains("more than 8 bytes"));
        let p = compose("Summarize.", &files);
        assert!(p.starts_with("--- file: ") && p.contains("alpha\n--- end of file ---\n\nSummarize."));
    }
}
