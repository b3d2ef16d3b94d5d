//! Which queue the system opens: `[queue] url` (or `--queue`, `KOUBOU_QUEUE`) — SQLite in the
//! home (the default), a SQLite file, or a Redis shared by several nodes.

use std::{path::PathBuf, sync::Arc};

use koubou_queue::{Nodes, RedisConfig, RedisQueue, SqliteConfig, SqliteQueue, TaskQueue};
use koubou_task::EventLog;
use serde::{Deserialize, Serialize};

use crate::{StartError, config::Home};

/// `[queue]`: the URL choosing the store, SQLite's settings beside it (`max_attempts` and
/// `retry` hold for either store), and `[queue.redis]`, a Redis queue's connection settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, try_from = "RawQueueConfig")]
pub struct QueueConfig {
    /// `sqlite:`, `sqlite:PATH` or a path (SQLite), `redis://host:port/db` or `rediss://…`
    /// (Redis); unset is the home's SQLite file.
    pub url: Option<String>,
    /// `[queue.redis]`: user, `password_env`, `ca_file`, namespace, what is kept, timeouts. Its
    /// `url`, `max_attempts` and `retry` come from `[queue]`.
    pub redis: RedisConfig,
    #[serde(flatten)]
    pub sqlite: SqliteConfig,
}

/// `[queue]` as read, with the keys neither it nor SQLite's settings know (serde cannot deny
/// unknown fields beside a flattened struct, so they are collected and refused here).
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawQueueConfig {
    url: Option<String>,
    redis: RedisConfig,
    #[serde(flatten)]
    sqlite: SqliteConfig,
    #[serde(flatten)]
    unknown: std::collections::BTreeMap<String, toml::Value>,
}

impl TryFrom<RawQueueConfig> for QueueConfig {
    type Error = String;
    fn try_from(r: RawQueueConfig) -> Result<QueueConfig, String> {
        if let Some(k) = r.unknown.keys().next() {
            return Err(format!("unknown field `{k}` in [queue]"));
        }
        Ok(QueueConfig { url: r.url, redis: r.redis, sqlite: r.sqlite })
    }
}

/// A queue URL, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueUrl {
    /// SQLite: this file, or the home's.
    Sqlite(Option<PathBuf>),
    /// Redis at this URL (it may hold a password: never show it whole).
    Redis(String),
}

impl QueueUrl {
    /// `sqlite:` / `sqlite:PATH` / `sqlite://PATH` / a path, `redis://…` or `rediss://…`.
    pub fn parse(s: &str) -> Result<QueueUrl, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty: give sqlite:[PATH], a path, or redis://host:port/db".into());
        }
        if let Some(rest) = s.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            return Ok(QueueUrl::Sqlite((!path.is_empty()).then(|| PathBuf::from(path))));
        }
        if s.starts_with("redis://") || s.starts_with("rediss://") {
            RedisConfig::check_url(s)?;
            return Ok(QueueUrl::Redis(s.to_owned()));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            let hint = if scheme.starts_with("amqp") {
                " (RabbitMQ dispatch is not selectable from the command line yet)"
            } else {
                ""
            };
            return Err(format!(
                "unknown queue scheme {scheme:?}{hint}: use sqlite:[PATH], a path, or redis://host:port/db"
            ));
        }
        Ok(QueueUrl::Sqlite(Some(PathBuf::from(s))))
    }

    /// The guide's `--queue-type`: `redis` (the local Redis, database 0) or `sqlite`.
    pub fn of_type(t: &str) -> Result<QueueUrl, String> {
        match t.trim().to_ascii_lowercase().as_str() {
            "redis" => Ok(QueueUrl::Redis(DEFAULT_REDIS.into())),
            "sqlite" => Ok(QueueUrl::Sqlite(None)),
            other => Err(format!("unknown queue type {other:?}: use redis or sqlite (or --queue URL)")),
        }
    }

    /// Shared by several nodes (a worker node needs one).
    pub fn is_shared(&self) -> bool {
        matches!(self, QueueUrl::Redis(_))
    }

    /// As written in `[queue] url`.
    pub fn to_url(&self) -> String {
        match self {
            QueueUrl::Sqlite(None) => "sqlite:".into(),
            QueueUrl::Sqlite(Some(p)) => format!("sqlite:{}", p.display()),
            QueueUrl::Redis(u) => u.clone(),
        }
    }
}

/// `--queue-type redis` without a URL.
pub const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379/0";

impl QueueConfig {
    /// The store `url` names (`path` when unset: the older way to name a SQLite file).
    pub fn selected(&self) -> Result<QueueUrl, String> {
        match &self.url {
            Some(u) => QueueUrl::parse(u),
            None => Ok(QueueUrl::Sqlite(self.sqlite.path.clone())),
        }
    }

    /// `[queue]` settings that cannot be right: a bad URL, or `[queue.redis]` setting what
    /// `[queue]` holds.
    pub fn validate(&self) -> Result<(), String> {
        self.selected().map_err(|e| format!("queue.url: {e}"))?;
        let d = RedisConfig::default();
        for (key, set) in [
            ("url", self.redis.url != d.url),
            ("max_attempts", self.redis.max_attempts != d.max_attempts),
            ("retry", self.redis.retry != d.retry),
        ] {
            if set {
                return Err(format!("queue.redis.{key}: set queue.{key} instead (it holds for every store)"));
            }
        }
        Ok(())
    }
}

/// The opened store: the queue, the node registry beside it, the event log the rest of the
/// node publishes on (for Redis, one that also relays to the other nodes), and where it is (for
/// `info`; without a password).
pub(crate) struct Opened {
    pub queue: Arc<dyn TaskQueue>,
    pub log: Arc<dyn EventLog>,
    pub nodes: Arc<dyn Nodes>,
    pub place: PathBuf,
    pub shared: bool,
}

/// Opens the store `cfg` selects for node `node`; its events go to `log`, this process's.
pub(crate) async fn open(
    cfg: &QueueConfig,
    home: &Home,
    log: Arc<dyn EventLog>,
    node: &str,
) -> Result<Opened, StartError> {
    let url = cfg.selected().map_err(|e| crate::config::ConfigError::Invalid(format!("queue.url: {e}")))?;
    Ok(match url {
        QueueUrl::Sqlite(path) => {
            let db = path.unwrap_or_else(|| home.db_file());
            let q = SqliteQueue::open(db.clone(), cfg.sqlite.clone(), log.clone())?;
            Opened { queue: Arc::new(q.clone()), log, nodes: Arc::new(q), place: db, shared: false }
        }
        QueueUrl::Redis(url) => {
            let rc = RedisConfig {
                url,
                max_attempts: cfg.sqlite.max_attempts,
                retry: cfg.sqlite.retry,
                ..cfg.redis.clone()
            };
            let place = PathBuf::from(rc.redacted_url());
            tracing::info!(queue = %place.display(), namespace = %rc.namespace, "opening the Redis queue");
            let q = RedisQueue::open(rc, log).await?;
            Opened { queue: Arc::new(q.clone()), log: q.relay(node), nodes: Arc::new(q), place, shared: true }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_select_the_store() {
        assert_eq!(QueueUrl::parse("sqlite:").unwrap(), QueueUrl::Sqlite(None));
        assert_eq!(QueueUrl::parse("sqlite:/tmp/q.db").unwrap(), QueueUrl::Sqlite(Some("/tmp/q.db".into())));
        assert_eq!(QueueUrl::parse("sqlite:///tmp/q.db").unwrap(), QueueUrl::Sqlite(Some("/tmp/q.db".into())));
        assert_eq!(QueueUrl::parse("db/k.db").unwrap(), QueueUrl::Sqlite(Some("db/k.db".into())));
        assert_eq!(QueueUrl::parse("redis://h:6380/2").unwrap(), QueueUrl::Redis("redis://h:6380/2".into()));
        assert!(QueueUrl::parse("rediss://u:p@h:6380/0").unwrap().is_shared());
        assert_eq!(QueueUrl::of_type("Redis").unwrap(), QueueUrl::Redis(DEFAULT_REDIS.into()));
        assert_eq!(QueueUrl::of_type("sqlite").unwrap(), QueueUrl::Sqlite(None));
    }

    #[test]
    fn bad_urls_say_why_without_the_password() {
        let e = QueueUrl::parse("redis://u:hunter2@h:notaport/0").unwrap_err();
        assert!(e.contains("not a Redis URL") && !e.contains("hunter2"), "{e}");
        let e = QueueUrl::parse("mysql://h/db").unwrap_err();
        assert!(e.contains("unknown queue scheme \"mysql\""), "{e}");
        assert!(QueueUrl::parse("amqp://h").unwrap_err().contains("RabbitMQ"));
        assert!(QueueUrl::parse(" ").unwrap_err().contains("empty"));
        assert!(QueueUrl::of_type("kafka").unwrap_err().contains("redis or sqlite"));
    }

    #[test]
    fn config_names_the_field() {
        let cfg = QueueConfig { url: Some("ftp://x".into()), ..QueueConfig::default() };
        assert!(cfg.validate().unwrap_err().starts_with("queue.url: "));
        let mut cfg = QueueConfig::default();
        cfg.redis.max_attempts = 9;
        assert!(cfg.validate().unwrap_err().starts_with("queue.redis.max_attempts"));
        let cfg: QueueConfig =
            toml::from_str("url = \"redis://127.0.0.1:6379/3\"\nmax_attempts = 5\n[redis]\nnamespace = \"a\"\n")
                .unwrap();
        assert_eq!(cfg.selected().unwrap(), QueueUrl::Redis("redis://127.0.0.1:6379/3".into()));
        assert_eq!((cfg.sqlite.max_attempts, cfg.redis.namespace.as_str()), (5, "a"));
        let e = toml::from_str::<QueueConfig>("urll = 1\n").unwrap_err();
        assert!(e.to_string().contains("urll"), "{e}");
    }
}
