//! Models from a URL: `https://…/file.gguf`, `hf:<owner>/<repo>[@revision]/<file>` (Hugging
//! Face's resolve URLs, under `$HF_ENDPOINT` when set), or a name from [`RECOMMENDED`].
//!
//! A download goes to `<file>.part` in the store, beside a `<file>.part.json` that records the
//! URL and the server's validator (a strong ETag, else Last-Modified). A cut download resumes
//! from where it stopped with `Range` + `If-Range`, so a file that changed on the server is
//! fetched whole again instead of spliced. The finished file is checked — size and SHA-256 when
//! known, then [`crate::check::validate`] (the GGUF structure and a trial load) — before it is
//! renamed to `<file>` and registered; a file that fails a check is deleted, part and all.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::models::{ModelEntry, ModelError, ModelStore, PullProgress, hex, io_err};

/// Hugging Face's address when `HF_ENDPOINT` is not set.
pub const HF_DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A small model Koubou knows how to fetch by name.
#[derive(Clone, Copy, Debug)]
pub struct Recommended {
    pub name: &'static str,
    /// `owner/repo` on Hugging Face.
    pub repo: &'static str,
    /// The commit the hash below belongs to (`main` where none is pinned).
    pub revision: &'static str,
    pub file: &'static str,
    /// Hex SHA-256 of the file, when known.
    pub sha256: Option<&'static str>,
    pub size: Option<u64>,
    pub about: &'static str,
}

/// The built-in list. Hashes and sizes are those Hugging Face lists for the file at the pinned
/// revision (its LFS pointer); an entry without them is checked by GGUF validation only.
pub const RECOMMENDED: &[Recommended] = &[
    Recommended {
        name: "qwen2.5-coder-1.5b",
        repo: "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
        revision: "f86cb2c1fa58255f8052cc32aeede1b7482d4361",
        file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256: Some("cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
        size: Some(1_117_320_768),
        about: "Qwen2.5-Coder 1.5B Instruct, Q4_K_M (1.1 GB): code",
    },
    Recommended {
        name: "qwen2.5-coder-0.5b",
        repo: "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        revision: "ebb2015119c907b064c512bf053e945850b5875f",
        file: "qwen2.5-coder-0.5b-instruct-q8_0.gguf",
        sha256: Some("e1a77721fa97d412f121878223eec81fb4ae6f271e18f922d746711f67b344d1"),
        size: Some(675_710_848),
        about: "Qwen2.5-Coder 0.5B Instruct, Q8_0 (676 MB): code, fast",
    },
    Recommended {
        name: "smollm2-360m",
        repo: "HuggingFaceTB/SmolLM2-360M-Instruct-GGUF",
        revision: "593b5a2e04c8f3e4ee880263f93e0bd2901ad47f",
        file: "smollm2-360m-instruct-q8_0.gguf",
        sha256: Some("48ab3034d0dd401fbc721eb1df3217902fee7dab9078992d66431f09b7750201"),
        size: Some(386_404_992),
        about: "SmolLM2 360M Instruct, Q8_0 (386 MB): general",
    },
    Recommended {
        name: "smollm2-1.7b",
        repo: "HuggingFaceTB/SmolLM2-1.7B-Instruct-GGUF",
        revision: "main",
        file: "smollm2-1.7b-instruct-q4_k_m.gguf",
        sha256: None,
        size: None,
        about: "SmolLM2 1.7B Instruct, Q4_K_M (1.1 GB): general; hash unknown, checked by GGUF validation only",
    },
];

/// One file to fetch, and what it must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteModel {
    pub url: String,
    /// The name of the file in the store.
    pub file_name: String,
    /// The name to register it under (unless the caller gives one).
    pub name: String,
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

/// Hugging Face's endpoint: `$HF_ENDPOINT` (as Hugging Face's own tools read it), else
/// [`HF_DEFAULT_ENDPOINT`].
pub fn hf_endpoint() -> String {
    hf_endpoint_from(std::env::var("HF_ENDPOINT").ok())
}

fn hf_endpoint_from(var: Option<String>) -> String {
    var.filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().trim_end_matches('/').to_string())
        .unwrap_or_else(|| HF_DEFAULT_ENDPOINT.into())
}

/// `<endpoint>/<owner>/<repo>/resolve/<revision>/<file>`.
pub fn hf_url(endpoint: &str, repo: &str, revision: &str, file: &str) -> String {
    format!("{endpoint}/{repo}/resolve/{revision}/{file}")
}

/// Whether `source` names something [`resolve_source`] fetches (a URL, `hf:…`, or a
/// recommended name), as opposed to a local path.
pub fn is_remote(source: &str) -> bool {
    source.starts_with("https://")
        || source.starts_with("http://")
        || source.starts_with("hf:")
        || recommended(source).is_some()
}

/// A model of the built-in list, by name.
pub fn recommended(name: &str) -> Option<&'static Recommended> {
    RECOMMENDED.iter().find(|r| r.name.eq_ignore_ascii_case(name))
}

/// Turns a pull source into what to fetch, against `endpoint` for `hf:` and recommended names.
pub fn resolve_source(source: &str, endpoint: &str) -> Result<RemoteModel, ModelError> {
    let bad = |detail: &str| ModelError::BadSource { input: source.to_string(), detail: detail.to_string() };
    if let Some(r) = recommended(source) {
        return Ok(RemoteModel {
            url: hf_url(endpoint, r.repo, r.revision, r.file),
            file_name: r.file.into(),
            name: r.name.into(),
            sha256: r.sha256.map(str::to_string),
            size: r.size,
        });
    }
    if let Some(rest) = source.strip_prefix("hf:") {
        let mut parts = rest.splitn(3, '/');
        let (owner, repo, file) = match (parts.next(), parts.next(), parts.next()) {
            (Some(o), Some(r), Some(f)) if !o.is_empty() && !r.is_empty() && !f.is_empty() => (o, r, f),
            _ => return Err(bad("use hf:<owner>/<repo>/<file> (or hf:<owner>/<repo>@<revision>/<file>)")),
        };
        let (repo, revision) = match repo.split_once('@') {
            Some((r, rev)) if !r.is_empty() && !rev.is_empty() => (r, rev),
            Some(_) => return Err(bad("an empty repository or revision around '@'")),
            None => (repo, "main"),
        };
        let ok = |s: &str| {
            s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) && !s.chars().all(|c| c == '.')
        };
        if !ok(owner) || !ok(repo) || !ok(revision) || file.split('/').any(|seg| seg.is_empty() || seg == "..") {
            return Err(bad(
                "owner, repository and revision are letters, digits, '.', '-' or '_'; the file a path in the repository",
            ));
        }
        let file_name = file.rsplit('/').next().unwrap_or(file);
        return Ok(RemoteModel {
            url: hf_url(endpoint, &format!("{owner}/{repo}"), revision, file),
            file_name: file_name.into(),
            name: default_name(file_name),
            sha256: None,
            size: None,
        });
    }
    if source.starts_with("https://") || source.starts_with("http://") {
        let url = reqwest::Url::parse(source).map_err(|e| bad(&e.to_string()))?;
        let file_name = url
            .path_segments()
            .and_then(|mut s| s.next_back())
            .filter(|f| !f.is_empty())
            .ok_or_else(|| bad("the URL names no file"))?;
        let file_name = percent_decode(file_name);
        if file_name.contains('/') || file_name == ".." || file_name.starts_with('.') {
            return Err(bad("the URL's file name is not usable"));
        }
        return Ok(RemoteModel {
            url: source.into(),
            name: default_name(&file_name),
            file_name,
            sha256: None,
            size: None,
        });
    }
    let names: Vec<&str> = RECOMMENDED.iter().map(|r| r.name).collect();
    Err(bad(&format!("not a URL, hf:<owner>/<repo>/<file>, or a known model ({})", names.join(", "))))
}

/// The store name for a file: its stem, lowercased, with anything but `[a-z0-9._-]` as `-`.
pub fn default_name(file_name: &str) -> String {
    let stem = file_name.strip_suffix(".gguf").unwrap_or(file_name).to_lowercase();
    let s: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '-' }).collect();
    if s.is_empty() { "model".into() } else { s.chars().take(128).collect() }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hexval = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hexval(b[i + 1]), hexval(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The HTTPS client for downloads: rustls with the bundled web roots and the system's (which
/// honour `SSL_CERT_FILE`), plus `ca_file` when given. Kept in one place so it can become the
/// workspace's shared client.
pub fn http_client(ca_file: Option<&Path>) -> Result<reqwest::Client, ModelError> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .user_agent(concat!("koubou/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120));
    if let Some(p) = ca_file {
        let pem = fs::read(p).map_err(io_err(p))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ModelError::BadSource {
            input: p.display().to_string(),
            detail: format!("not a PEM CA file: {e}"),
        })?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build().map_err(|e| ModelError::Download {
        url: String::new(),
        detail: format!("TLS client: {e}"),
        resumable: false,
    })
}

/// What `<file>.part.json` records about a download in progress.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct PartMeta {
    url: String,
    /// `If-Range` value: a strong ETag, else Last-Modified.
    validator: Option<String>,
    total: Option<u64>,
}

/// `Content-Range: bytes <start>-<end>/<total>` → (start, total).
fn content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

impl ModelStore {
    /// Fetches `model` into the store (resuming a cut download), checks it, and registers it
    /// under `name` (default: `model.name`).
    pub async fn pull_remote(
        &self,
        model: &RemoteModel,
        name: Option<&str>,
        client: &reqwest::Client,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<ModelEntry, ModelError> {
        let name = name.unwrap_or(&model.name).to_string();
        Self::check_name(&name)?;
        fs::create_dir_all(self.dir()).map_err(io_err(self.dir()))?;
        let dest = self.dir().join(&model.file_name);
        let part = self.dir().join(format!("{}.part", model.file_name));
        let meta_path = self.dir().join(format!("{}.part.json", model.file_name));
        let dl_err =
            |detail: String, resumable: bool| ModelError::Download { url: model.url.clone(), detail, resumable };

        let mut file = OpenOptions::new().create(true).read(true).append(true).open(&part).map_err(io_err(&part))?;
        if file.try_lock().is_err() {
            return Err(dl_err(format!("another pull is writing {}", part.display()), false));
        }
        let meta: PartMeta =
            fs::read(&meta_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let mut have = file.metadata().map_err(io_err(&part))?.len();
        let resume = have > 0 && meta.url == model.url && meta.validator.is_some();
        if !resume && have > 0 {
            file.set_len(0).map_err(io_err(&part))?;
            have = 0;
        }

        let mut req = client.get(&model.url);
        if resume {
            req = req
                .header(reqwest::header::RANGE, format!("bytes={have}-"))
                .header(reqwest::header::IF_RANGE, meta.validator.clone().unwrap_or_default());
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                if have == 0 {
                    // Nothing to resume: leave nothing behind.
                    drop(file);
                    let _ = fs::remove_file(&part);
                    let _ = fs::remove_file(&meta_path);
                }
                return Err(dl_err(error_chain(&e), have > 0));
            }
        };
        let status = resp.status();
        let header =
            |h: reqwest::header::HeaderName| resp.headers().get(h).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (start, total) = match status.as_u16() {
            206 if resume => {
                let (start, total) = header(reqwest::header::CONTENT_RANGE)
                    .as_deref()
                    .and_then(content_range)
                    .ok_or_else(|| dl_err("a 206 answer without a usable Content-Range".into(), false))?;
                if start != have {
                    return Err(dl_err(format!("asked to resume at byte {have}, the server sent from {start}"), false));
                }
                (have, total)
            }
            200 => {
                // A fresh start, or the file changed on the server (If-Range did not match).
                file.set_len(0).map_err(io_err(&part))?;
                (0, resp.content_length())
            }
            416 if resume => {
                // Nothing left to send: the part may already be whole; the checks below decide.
                (have, meta.total)
            }
            s => {
                let _ = fs::remove_file(&meta_path);
                drop(file);
                let _ = fs::remove_file(&part);
                return Err(dl_err(format!("HTTP {s} {}", status.canonical_reason().unwrap_or("")), false));
            }
        };
        if let (Some(t), Some(want)) = (total, model.size)
            && t != want
        {
            return Err(self.discard(
                &part,
                &meta_path,
                dl_err(format!("the server offers {t} bytes, expected {want}"), false),
            ));
        }
        let etag = header(reqwest::header::ETAG).filter(|e| !e.starts_with("W/"));
        let validator = etag.or_else(|| header(reqwest::header::LAST_MODIFIED));
        let new_meta = PartMeta { url: model.url.clone(), validator, total };
        if let Ok(json) = serde_json::to_vec(&new_meta) {
            fs::write(&meta_path, json).map_err(io_err(&meta_path))?;
        }

        // Hash what is already there, then the rest as it arrives.
        let mut hasher = Sha256::new();
        if start > 0 {
            let mut f = File::open(&part).map_err(io_err(&part))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = start;
            while left > 0 {
                let n = f.read(&mut buf[..(left.min(1 << 20) as usize)]).map_err(io_err(&part))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
        }
        let mut done = start;
        progress(PullProgress::Fetching { url: model.url.clone(), done, total, resumed_from: start });
        if status.as_u16() != 416 {
            loop {
                let chunk = match resp.chunk().await {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = file.sync_data();
                        return Err(dl_err(format!("cut at byte {done}: {}", error_chain(&e)), true));
                    }
                };
                hasher.update(&chunk);
                file.write_all(&chunk).map_err(io_err(&part))?;
                done += chunk.len() as u64;
                progress(PullProgress::Fetching { url: model.url.clone(), done, total, resumed_from: start });
            }
        }
        file.sync_all().map_err(io_err(&part))?;
        if let Some(t) = total
            && done < t
        {
            return Err(dl_err(format!("the connection ended at byte {done} of {t}"), true));
        }
        let actual = hex(&hasher.finalize());
        let size_bad = model.size.is_some_and(|s| s != done) || total.is_some_and(|t| t != done);
        let sha_bad = model.sha256.as_ref().is_some_and(|s| !s.eq_ignore_ascii_case(&actual));
        if size_bad || sha_bad {
            let err = ModelError::Checksum {
                what: model.url.clone(),
                expected: model.sha256.clone().unwrap_or_else(|| "(any)".into()),
                actual,
                expected_size: model.size.or(total).unwrap_or(done),
                actual_size: done,
            };
            return Err(self.discard(&part, &meta_path, err));
        }
        progress(PullProgress::Checking { path: part.clone() });
        let path_for_check = part.clone();
        let checked = tokio::task::spawn_blocking(move || crate::check::validate(&path_for_check))
            .await
            .map_err(|e| dl_err(format!("the check did not run: {e}"), false))?;
        if let Err(e) = checked {
            let e = match e {
                ModelError::Invalid { reason, .. } => ModelError::Invalid { path: PathBuf::from(&model.url), reason },
                other => other,
            };
            return Err(self.discard(&part, &meta_path, e));
        }
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = file.set_permissions(fs::Permissions::from_mode(0o644));
        }
        drop(file);
        fs::rename(&part, &dest).map_err(io_err(&dest))?;
        let _ = fs::remove_file(&meta_path);
        let entry = self.record(&name, &dest, Some(actual))?;
        progress(PullProgress::Done { path: dest });
        Ok(entry)
    }

    /// Deletes a download that failed a check (it must not be resumed or mistaken for a model).
    fn discard(&self, part: &Path, meta: &Path, err: ModelError) -> ModelError {
        let _ = fs::remove_file(part);
        let _ = fs::remove_file(meta);
        err
    }
}

/// An error with its sources, for messages (reqwest's own Display hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_sources_map_to_resolve_urls() {
        let e = "http://127.0.0.1:9";
        let m = resolve_source("hf:Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", e)
            .unwrap();
        assert_eq!(
            m.url,
            "http://127.0.0.1:9/Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
        );
        assert_eq!(m.file_name, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf");
        assert_eq!(m.name, "qwen2.5-coder-1.5b-instruct-q4_k_m");
        assert_eq!(m.sha256, None);
        // A revision, and a file in a folder.
        let m = resolve_source("hf:o/r@abc123/sub/dir/M.Q4.gguf", e).unwrap();
        assert_eq!(m.url, "http://127.0.0.1:9/o/r/resolve/abc123/sub/dir/M.Q4.gguf");
        assert_eq!(m.file_name, "M.Q4.gguf");
        assert_eq!(m.name, "m.q4");
        for bad in ["hf:", "hf:o", "hf:o/r", "hf:o/r/", "hf:o/r@/f.gguf", "hf:o/../f", "hf:o/r/../x.gguf", "hf:o$/r/f"]
        {
            assert!(matches!(resolve_source(bad, e), Err(ModelError::BadSource { .. })), "{bad}");
        }
    }

    #[test]
    fn the_endpoint_comes_from_hf_endpoint() {
        assert_eq!(hf_endpoint_from(None), "https://huggingface.co");
        assert_eq!(hf_endpoint_from(Some("".into())), "https://huggingface.co");
        assert_eq!(hf_endpoint_from(Some("https://127.0.0.1:4443/".into())), "https://127.0.0.1:4443");
    }

    #[test]
    fn recommended_names_carry_their_pins() {
        let m = resolve_source("qwen2.5-coder-1.5b", "https://huggingface.co").unwrap();
        assert_eq!(
            m.url,
            "https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF/resolve/f86cb2c1fa58255f8052cc32aeede1b7482d4361/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
        );
        assert_eq!(m.size, Some(1_117_320_768));
        assert_eq!(m.name, "qwen2.5-coder-1.5b");
        for r in RECOMMENDED {
            assert!(r.sha256.is_none_or(|s| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())), "{}", r.name);
            assert!(ModelStore::check_name(r.name).is_ok());
            assert!(r.file.ends_with(".gguf"));
            assert!(is_remote(r.name));
        }
        assert!(!is_remote("./model.gguf"));
    }

    #[test]
    fn plain_urls_name_their_file() {
        let m = resolve_source("https://example.invalid/models/My%20Model.gguf?download=true", "").unwrap();
        assert_eq!(m.file_name, "My Model.gguf");
        assert_eq!(m.name, "my-model");
        assert!(resolve_source("https://example.invalid/", "").is_err());
        assert!(resolve_source("https://example.invalid/..%2Fx", "").is_err());
        assert!(resolve_source("nonsense", "").unwrap_err().to_string().contains("qwen2.5-coder-1.5b"));
    }

    #[test]
    fn content_range_is_parsed() {
        assert_eq!(content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(content_range("items 1-2/3"), None);
    }
}
