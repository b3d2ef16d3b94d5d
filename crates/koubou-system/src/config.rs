//! `koubou.toml`: every setting, its default, and the environment variables that override it.
//!
//! Precedence: command-line flags > environment (`KOUBOU_*`, `OLLAMA_HOST`) > `koubou.toml` >
//! defaults. [`TEMPLATE`] is what `koubou init` writes: every setting, documented, at its default.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

pub use koubou_api::settings::{McpConfig, ServerConfig};
use koubou_backend::{BackendTable, PricingConfig, TypeRoute};
use koubou_task::Limits;
use koubou_worker::PoolConfig;
use serde::{Deserialize, Serialize};

/// Errors reading configuration: always name the file, the key and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("{path}: {detail}")]
    Parse { path: String, detail: String },
    #[error("environment variable {var}={value:?}: {detail}")]
    Env { var: String, value: String, detail: String },
    #[error("{0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub queue: crate::queue::QueueConfig,
    pub pool: PoolConfig,
    pub limits: Limits,
    pub mcp: McpConfig,
    /// `[backends.NAME]`; empty means "choose automatically" (Ollama if it answers, else the
    /// embedded model).
    pub backends: BTreeMap<String, BackendTable>,
    /// `[types.NAME]`; `general` and `code` are added if missing.
    pub types: BTreeMap<String, TypeRoute>,
    /// `[pricing]`: the reference prices that value what local backends served.
    pub pricing: PricingConfig,
}

/// What `koubou init` writes.
pub const TEMPLATE: &str = include_str!("koubou.toml");

/// Where Koubou keeps its files.
#[derive(Clone, Debug)]
pub struct Home {
    pub dir: PathBuf,
}

impl Home {
    /// `$KOUBOU_HOME`, else `./.koubou`.
    pub fn from_env() -> Home {
        Home { dir: std::env::var_os("KOUBOU_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".koubou")) }
    }
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("koubou.toml")
    }
    pub fn db_file(&self) -> PathBuf {
        self.dir.join("db").join("koubou.db")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Creates the home and its `db/` and `logs/`, each readable by this user only (0700): they
    /// hold every prompt, answer and log line. A directory that exists already keeps its mode;
    /// when other users can enter the home, the answer is a warning for the caller to show.
    pub fn prepare(&self) -> std::io::Result<Option<String>> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let existed = self.dir.is_dir();
        let mut private = std::fs::DirBuilder::new();
        private.recursive(true).mode(0o700);
        for d in [self.dir.clone(), self.dir.join("db"), self.logs_dir()] {
            private.create(&d)?;
        }
        let mode = std::fs::metadata(&self.dir)?.permissions().mode() & 0o777;
        Ok((existed && mode & 0o077 != 0).then(|| {
            format!(
                "{} (mode {mode:o}) can be read by other users of this machine, and it holds every prompt and \
                 answer: chmod 700 {}",
                self.dir.display(),
                self.dir.display()
            )
        }))
    }
}

impl Config {
    /// Reads `path` if it exists (else defaults), then applies the environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut cfg = match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, &path.display().to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(e) => return Err(ConfigError::Read { path: path.display().to_string(), detail: e.to_string() }),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_owned(), detail: e.to_string() })
    }

    /// `KOUBOU_HOST`, `KOUBOU_PORT`, `KOUBOU_WS_PORT`, `KOUBOU_GRAPHQL_PORT`, `KOUBOU_AUTH_TOKEN`,
    /// `KOUBOU_URL`, `KOUBOU_MIN_WORKERS`, `KOUBOU_MAX_WORKERS`, `KOUBOU_DB`, `KOUBOU_QUEUE`,
    /// `KOUBOU_STORE`, `KOUBOU_MAX_PROMPT_BYTES`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn num<T: std::str::FromStr>(var: &str, v: &str) -> Result<T, ConfigError> {
            v.trim().parse().map_err(|_| ConfigError::Env {
                var: var.into(),
                value: v.into(),
                detail: "must be a whole number".into(),
            })
        }
        if let Some(v) = get("KOUBOU_HOST") {
            self.server.host = v;
        }
        if let Some(v) = get("KOUBOU_PORT") {
            self.server.port = num("KOUBOU_PORT", &v)?;
        }
        if let Some(v) = get("KOUBOU_WS_PORT") {
            self.server.ws_port = num("KOUBOU_WS_PORT", &v)?;
        }
        if let Some(v) = get("KOUBOU_GRAPHQL_PORT") {
            self.server.graphql_port = num("KOUBOU_GRAPHQL_PORT", &v)?;
        }
        if let Some(v) = get("KOUBOU_AUTH_TOKEN").filter(|v| !v.is_empty()) {
            self.server.auth_token = Some(v);
        }
        if let Some(v) = get("KOUBOU_URL").filter(|v| !v.is_empty()) {
            self.server.url = Some(v);
        }
        if let Some(v) = get("KOUBOU_MIN_WORKERS") {
            self.pool.min_workers = num("KOUBOU_MIN_WORKERS", &v)?;
        }
        if let Some(v) = get("KOUBOU_MAX_WORKERS") {
            self.pool.max_workers = num("KOUBOU_MAX_WORKERS", &v)?;
        }
        if let Some(v) = get("KOUBOU_DB") {
            self.queue.sqlite.path = Some(PathBuf::from(v));
        }
        // A queue URL may hold a password: an error shows it without.
        if let Some(v) = get("KOUBOU_QUEUE").filter(|v| !v.is_empty()) {
            let url = crate::queue::QueueUrl::parse(&v).map_err(|detail| ConfigError::Env {
                var: "KOUBOU_QUEUE".into(),
                value: koubou_queue::amqp::redact_url(&v),
                detail,
            })?;
            self.queue.select(&url);
        }
        if let Some(v) = get("KOUBOU_STORE").filter(|v| !v.is_empty()) {
            crate::queue::Store::parse(&v).map_err(|detail| ConfigError::Env {
                var: "KOUBOU_STORE".into(),
                value: koubou_queue::amqp::redact_url(&v),
                detail,
            })?;
            self.queue.store = Some(v);
        }
        if let Some(v) = get("KOUBOU_MAX_PROMPT_BYTES") {
            self.limits.max_prompt_bytes = num("KOUBOU_MAX_PROMPT_BYTES", &v)?;
        }
        Ok(())
    }

    /// Checks what serde cannot: ranges and the safe-by-default rule for binding.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.pool;
        // max_workers = 0: no local workers (a controller).
        if p.max_workers > 0 && (p.min_workers == 0 || p.min_workers > p.max_workers) {
            return Err(ConfigError::Invalid(format!(
                "pool: need 1 <= min_workers <= max_workers (or max_workers = 0 for no local workers), got \
                 min_workers = {}, max_workers = {}",
                p.min_workers, p.max_workers
            )));
        }
        self.queue.validate().map_err(ConfigError::Invalid)?;
        self.validate_transport()?;
        if self.mcp.max_result_chars < 1000 {
            return Err(ConfigError::Invalid(format!(
                "mcp: max_result_chars must be at least 1000, got {}",
                self.mcp.max_result_chars
            )));
        }
        if !is_loopback(&self.server.host) && self.server.auth_token.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on {} without an auth token: set server.auth_token (or KOUBOU_AUTH_TOKEN), \
                 or bind 127.0.0.1",
                self.server.host
            )));
        }
        Ok(())
    }
}

impl Config {
    /// The listener and transport limits: each must let something through.
    fn validate_transport(&self) -> Result<(), ConfigError> {
        let (s, l) = (&self.server, &self.limits);
        if !(1..=30).contains(&s.header_read_timeout_secs) {
            return Err(ConfigError::Invalid(format!(
                "server.header_read_timeout_secs must be from 1 to 30, got {}",
                s.header_read_timeout_secs
            )));
        }
        for (key, v) in [
            ("server.body_read_timeout_secs", s.body_read_timeout_secs as usize),
            ("server.max_connections", s.max_connections),
            ("limits.max_ws_connections", l.max_ws_connections),
            ("limits.graphql_max_depth", l.graphql_max_depth),
            ("limits.graphql_max_complexity", l.graphql_max_complexity),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{key} must be at least 1")));
            }
        }
        if l.rate_limit_per_sec > 0 && l.rate_limit_burst == 0 {
            return Err(ConfigError::Invalid(
                "limits.rate_limit_burst must be at least 1 when limits.rate_limit_per_sec is set".into(),
            ));
        }
        Ok(())
    }
}

/// True for 127.0.0.0/8, ::1 and `localhost`.
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_home_is_private_and_an_open_one_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        let home = Home { dir: tmp.path().join("a").join(".koubou") };
        assert_eq!(home.prepare().unwrap(), None);
        for d in [home.dir.clone(), home.dir.join("db"), home.logs_dir()] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        // An existing home keeps its mode, and the warning says how to close it.
        std::fs::set_permissions(&home.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let warning = home.prepare().unwrap().expect("a warning");
        assert!(warning.contains("mode 755") && warning.contains("chmod 700"), "{warning}");
        assert_eq!(mode(&home.dir), 0o755);
    }

    #[test]
    fn template_documents_the_defaults() {
        let from_template = Config::parse(TEMPLATE, "template").unwrap();
        assert_eq!(from_template, Config::default(), "koubou.toml template drifted from the defaults");
    }

    /// Every commented `[backends.NAME]` / `[types.NAME]` example in the template, uncommented.
    fn template_examples() -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut cur: Option<String> = None;
        for line in TEMPLATE.lines() {
            let body = line.strip_prefix('#').map(|l| l.strip_prefix(' ').unwrap_or(l));
            match body {
                Some(b) if b.starts_with("[backends.") || b.starts_with("[types.") => {
                    out.extend(cur.take());
                    cur = Some(format!("{b}\n"));
                }
                Some(b) if !b.trim().is_empty() && cur.is_some() => {
                    let c = cur.as_mut().expect("checked");
                    c.push_str(b);
                    c.push('\n');
                }
                _ => out.extend(cur.take()),
            }
        }
        out.extend(cur);
        out
    }

    #[test]
    fn every_template_example_parses_and_builds_its_backend() {
        let examples = template_examples();
        let kinds = ["openai", "anthropic", "gemini", "openrouter", "groq", "mistral", "azure", "vllm", "lmstudio"];
        for name in kinds.iter().chain(&["llama-server", "ollama", "codex", "embedded"]) {
            assert!(
                examples.iter().any(|e| e.starts_with(&format!("[backends.{name}]"))),
                "the template has no [backends.{name}] example"
            );
        }
        for text in &examples {
            let cfg = Config::parse(text, "template example").unwrap_or_else(|e| panic!("{e}\n{text}"));
            for (name, backend) in &cfg.backends {
                if let Err(e) = koubou_backend::build(name, &backend.provider) {
                    panic!("[backends.{name}] does not build: {e}\n{text}");
                }
            }
            assert!(!cfg.backends.is_empty() || !cfg.types.is_empty(), "an empty example:\n{text}");
        }
    }

    #[test]
    fn env_overrides_and_errors_name_the_variable() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "KOUBOU_PORT" => Some("9000".into()),
            "KOUBOU_MAX_WORKERS" => Some("3".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!((c.server.port, c.pool.max_workers), (9000, 3));
        let e = c.apply_env(|k| (k == "KOUBOU_PORT").then(|| "http".into())).unwrap_err();
        assert!(e.to_string().contains("KOUBOU_PORT"));
    }

    #[test]
    fn queue_variables_select_rabbitmq_and_its_store_without_showing_passwords() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "KOUBOU_QUEUE" => Some("amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            "KOUBOU_STORE" => Some("redis://127.0.0.1:6379/0".into()),
            _ => None,
        })
        .unwrap();
        let sel = c.queue.selected().unwrap();
        assert!(sel.broker.is_some() && sel.is_shared(), "{sel:?}");
        for var in ["KOUBOU_QUEUE", "KOUBOU_STORE"] {
            let e = c.apply_env(|k| (k == var).then(|| "amqp://u:hunter2@h:x/".into())).unwrap_err().to_string();
            assert!(e.contains(var) && e.contains("u:***@h") && !e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn refuses_public_bind_without_token() {
        let mut c = Config::default();
        c.server.host = "0.0.0.0".into();
        assert!(c.validate().unwrap_err().to_string().contains("auth token"));
        c.server.auth_token = Some("s3cret".into());
        c.validate().unwrap();
        assert!(is_loopback("127.0.0.2") && is_loopback("::1") && is_loopback("localhost"));
        assert!(!is_loopback("192.168.1.2"));
    }

    #[test]
    fn transport_limits_are_checked() {
        let mut c = Config::default();
        c.server.header_read_timeout_secs = 31;
        assert!(c.validate().unwrap_err().to_string().contains("server.header_read_timeout_secs"));
        c.server.header_read_timeout_secs = 30;
        c.server.max_connections = 0;
        assert!(c.validate().unwrap_err().to_string().contains("server.max_connections"));
        c.server.max_connections = 1;
        c.limits.rate_limit_per_sec = 5;
        c.limits.rate_limit_burst = 0;
        assert!(c.validate().unwrap_err().to_string().contains("limits.rate_limit_burst"));
        c.limits.rate_limit_burst = 1;
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::parse("[server]\nprot = 1\n", "koubou.toml").unwrap_err();
        assert!(e.to_string().contains("prot"), "{e}");
    }
}
