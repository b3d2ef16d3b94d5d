//! Which queue the system opens: `[queue] url` (or `--queue`, `KOUBOU_QUEUE`) — SQLite in the
//! home (the default), a SQLite file, a Redis shared by several nodes, or RabbitMQ handing out
//! the tasks of a store named by `[queue] store` (`--store`, `KOUBOU_STORE`; the home's SQLite
//! by default, Redis for many machines).

use std::{path::PathBuf, sync::Arc};

use koubou_queue::{
    Nodes, Outbox, QueueError, RedisConfig, RedisQueue, SqliteConfig, SqliteQueue, TaskQueue,
    amqp::{AmqpConfig, AmqpDispatch, URL_ENV, redact_url},
};
use koubou_task::EventLog;
use serde::{Deserialize, Serialize};

use crate::{StartError, config::Home};

/// `[queue]`: the URL choosing the queue, the store a RabbitMQ queue keeps its tasks in,
/// SQLite's settings beside them (`max_attempts` and `retry` hold for any store),
/// `[queue.redis]` (a Redis store's connection settings) and `[queue.amqp]` (RabbitMQ's).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, try_from = "RawQueueConfig")]
pub struct QueueConfig {
    /// `sqlite:`, `sqlite:PATH` or a path (SQLite), `redis://host:port/db` or `rediss://…`
    /// (Redis), `amqp://…` or `amqps://…` (RabbitMQ dispatching the tasks of `store`); unset is
    /// the home's SQLite file.
    pub url: Option<String>,
    /// With an AMQP `url`: where the tasks are kept (`sqlite:[PATH]`, a path, `redis://…`);
    /// unset is the home's SQLite file. Refused with any other `url` (which names its store).
    pub store: Option<String>,
    /// `[queue.redis]`: user, `password_env`, `ca_file`, namespace, what is kept, timeouts. Its
    /// `url`, `max_attempts` and `retry` come from `[queue]`.
    pub redis: RedisConfig,
    /// `[queue.amqp]`: `password_env`, `ca_file`, namespace (by default a Redis store's), the
    /// outbox sweep's period, timeouts. Its `url` comes from `[queue]`.
    pub amqp: AmqpConfig,
    #[serde(flatten)]
    pub sqlite: SqliteConfig,
}

/// `[queue]` as read, with the keys neither it nor SQLite's settings know (serde cannot deny
/// unknown fields beside a flattened struct, so they are collected and refused here).
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawQueueConfig {
    url: Option<String>,
    store: Option<String>,
    redis: RedisConfig,
    amqp: AmqpConfig,
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
        Ok(QueueConfig { url: r.url, store: r.store, redis: r.redis, amqp: r.amqp, sqlite: r.sqlite })
    }
}

/// A queue URL, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueUrl {
    /// SQLite: this file, or the home's.
    Sqlite(Option<PathBuf>),
    /// Redis at this URL (it may hold a password: never show it whole).
    Redis(String),
    /// RabbitMQ at this URL dispatching the tasks of `[queue] store` (it may hold a password).
    Amqp(String),
}

impl QueueUrl {
    /// `sqlite:` / `sqlite:PATH` / `sqlite://PATH` / a path, `redis://…` or `rediss://…`,
    /// `amqp://…` or `amqps://…`.
    pub fn parse(s: &str) -> Result<QueueUrl, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty: give sqlite:[PATH], a path, redis://host:port/db or amqp://host:port/vhost".into());
        }
        if let Some(rest) = s.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            return Ok(QueueUrl::Sqlite((!path.is_empty()).then(|| PathBuf::from(path))));
        }
        if s.starts_with("redis://") || s.starts_with("rediss://") {
            RedisConfig::check_url(s)?;
            return Ok(QueueUrl::Redis(s.to_owned()));
        }
        if s.starts_with("amqp://") || s.starts_with("amqps://") {
            AmqpConfig::check_url(s)?;
            return Ok(QueueUrl::Amqp(s.to_owned()));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "unknown queue scheme {scheme:?}: use sqlite:[PATH], a path, redis://host:port/db or \
                 amqp://host:port/vhost"
            ));
        }
        Ok(QueueUrl::Sqlite(Some(PathBuf::from(s))))
    }

    /// The guide's `--queue-type`: `redis` (the local Redis, database 0), `rabbitmq` (or `amqp`:
    /// the broker `KOUBOU_AMQP_URL` names, else the local one as guest) or `sqlite`.
    pub fn of_type(t: &str) -> Result<QueueUrl, String> {
        match t.trim().to_ascii_lowercase().as_str() {
            "redis" => Ok(QueueUrl::Redis(DEFAULT_REDIS.into())),
            "rabbitmq" | "amqp" => {
                let url = AmqpConfig::from_env().url;
                AmqpConfig::check_url(&url).map_err(|e| format!("{URL_ENV}: {e}"))?;
                Ok(QueueUrl::Amqp(url))
            }
            "sqlite" => Ok(QueueUrl::Sqlite(None)),
            other => Err(format!("unknown queue type {other:?}: use redis, rabbitmq or sqlite (or --queue URL)")),
        }
    }

    /// As written in `[queue] url`.
    pub fn to_url(&self) -> String {
        match self {
            QueueUrl::Sqlite(None) => "sqlite:".into(),
            QueueUrl::Sqlite(Some(p)) => format!("sqlite:{}", p.display()),
            QueueUrl::Redis(u) | QueueUrl::Amqp(u) => u.clone(),
        }
    }
}

/// Where the tasks are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Store {
    /// SQLite: this file, or the home's.
    Sqlite(Option<PathBuf>),
    /// Redis at this URL (it may hold a password: never show it whole).
    Redis(String),
}

impl Store {
    /// A store's URL (`[queue] store`, `--store`): SQLite's or Redis's, not a broker's.
    pub fn parse(s: &str) -> Result<Store, String> {
        match QueueUrl::parse(s)? {
            QueueUrl::Sqlite(p) => Ok(Store::Sqlite(p)),
            QueueUrl::Redis(u) => Ok(Store::Redis(u)),
            QueueUrl::Amqp(_) => {
                Err("RabbitMQ keeps no tasks: give the store as sqlite:[PATH], a path or redis://host:port/db".into())
            }
        }
    }

    /// Shared by several nodes (a worker node needs one).
    pub fn is_shared(&self) -> bool {
        matches!(self, Store::Redis(_))
    }
}

/// What `[queue]` selects: the store keeping the tasks and, with RabbitMQ, the broker handing
/// them out (its URL; it may hold a password).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub store: Store,
    pub broker: Option<String>,
}

impl Selection {
    /// Shared by several nodes (a worker node needs one): the store is.
    pub fn is_shared(&self) -> bool {
        self.store.is_shared()
    }
}

/// `--queue-type redis` without a URL.
pub const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379/0";

impl QueueConfig {
    /// What `url` and `store` select (`path` when `url` is unset: the older way to name a
    /// SQLite file). The error names the field at fault.
    pub fn selected(&self) -> Result<Selection, String> {
        let default_store = || Store::Sqlite(self.sqlite.path.clone());
        let url = match &self.url {
            Some(u) => QueueUrl::parse(u).map_err(|e| format!("queue.url: {e}"))?,
            None if self.store.is_some() => QueueUrl::Sqlite(None),
            None => return Ok(Selection { store: default_store(), broker: None }),
        };
        let store = match (&self.store, &url) {
            (Some(s), QueueUrl::Amqp(_)) => Store::parse(s).map_err(|e| format!("queue.store: {e}"))?,
            (None, QueueUrl::Amqp(_)) => default_store(),
            (Some(_), _) => {
                return Err("queue.store: only with a RabbitMQ queue (queue.url = \"amqp://…\", --queue amqp://…); \
                            any other queue URL names its store itself"
                    .into());
            }
            (None, QueueUrl::Sqlite(p)) => Store::Sqlite(p.clone()),
            (None, QueueUrl::Redis(u)) => Store::Redis(u.clone()),
        };
        let broker = match url {
            QueueUrl::Amqp(u) => Some(u),
            _ => None,
        };
        Ok(Selection { store, broker })
    }

    /// Selects the queue `url` names (a flag's or the environment's, which win over the file):
    /// a queue that is not RabbitMQ names its store itself, so `store` is dropped.
    pub fn select(&mut self, url: &QueueUrl) {
        if !matches!(url, QueueUrl::Amqp(_)) {
            self.store = None;
        }
        self.url = Some(url.to_url());
    }

    /// `[queue]` settings that cannot be right: a bad URL or store, or `[queue.redis]` /
    /// `[queue.amqp]` setting what `[queue]` holds.
    pub fn validate(&self) -> Result<(), String> {
        self.selected()?;
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
        if self.amqp.url != AmqpConfig::default().url {
            return Err("queue.amqp.url: set queue.url = \"amqp://…\" instead".into());
        }
        Ok(())
    }

    /// RabbitMQ's settings for the broker at `url` dispatching `store`'s tasks: `[queue.amqp]`,
    /// whose namespace, left at `default`, follows a Redis store's (one Redis namespace, one
    /// broker queue).
    fn amqp_for(&self, url: String, store: &Store) -> AmqpConfig {
        let namespace = match store {
            Store::Redis(_) if self.amqp.namespace == AmqpConfig::default().namespace => self.redis.namespace.clone(),
            _ => self.amqp.namespace.clone(),
        };
        AmqpConfig { url, namespace, ..self.amqp.clone() }
    }
}

/// The opened store: the queue, the node registry beside it, the event log the rest of the
/// node publishes on (for Redis, one that also relays to the other nodes), and where the tasks
/// are (for `info`; without a password).
pub(crate) struct Opened {
    pub queue: Arc<dyn TaskQueue>,
    pub log: Arc<dyn EventLog>,
    pub nodes: Arc<dyn Nodes>,
    pub place: PathBuf,
    /// With RabbitMQ handing the tasks out: the broker (its URL without the password) and the
    /// queue on it.
    pub dispatcher: Option<String>,
}

/// Opens what `sel` (read from `cfg`) selects for node `node`; its events go to `log`, this
/// process's.
pub(crate) async fn open(
    cfg: &QueueConfig,
    sel: Selection,
    home: &Home,
    log: Arc<dyn EventLog>,
    node: &str,
) -> Result<Opened, StartError> {
    let broker = sel.broker.map(|url| cfg.amqp_for(url, &sel.store));
    let dispatcher = broker.as_ref().map(|b| format!("{} (queue {})", redact_url(&b.url), b.queue_name()));
    Ok(match sel.store {
        Store::Sqlite(path) => {
            let db = path.unwrap_or_else(|| home.db_file());
            let q = SqliteQueue::open(db.clone(), cfg.sqlite.clone(), log.clone())?;
            Opened { queue: dispatched(q.clone(), broker).await?, log, nodes: Arc::new(q), place: db, dispatcher }
        }
        Store::Redis(url) => {
            let rc = RedisConfig {
                url,
                max_attempts: cfg.sqlite.max_attempts,
                retry: cfg.sqlite.retry,
                ..cfg.redis.clone()
            };
            let place = PathBuf::from(rc.redacted_url());
            tracing::info!(queue = %place.display(), namespace = %rc.namespace, "opening the Redis queue");
            let q = RedisQueue::open(rc, log).await?;
            let relay = q.relay(node);
            Opened { queue: dispatched(q.clone(), broker).await?, log: relay, nodes: Arc::new(q), place, dispatcher }
        }
    })
}

/// `store` itself, or RabbitMQ (`broker`) handing out its tasks.
async fn dispatched<S: Outbox>(store: S, broker: Option<AmqpConfig>) -> Result<Arc<dyn TaskQueue>, QueueError> {
    let Some(cfg) = broker else { return Ok(Arc::new(store)) };
    tracing::info!(broker = %redact_url(&cfg.url), namespace = %cfg.namespace, queue = %cfg.queue_name(),
        "RabbitMQ hands out the tasks");
    Ok(Arc::new(AmqpDispatch::open(Arc::new(store), cfg).await?))
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
        assert!(Store::parse("rediss://u:p@h:6380/0").unwrap().is_shared());
        assert_eq!(
            QueueUrl::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap(),
            QueueUrl::Amqp("amqp://guest:guest@127.0.0.1:5672/%2f".into())
        );
        assert!(matches!(QueueUrl::parse("amqps://broker.lan/koubou").unwrap(), QueueUrl::Amqp(_)));
        assert_eq!(QueueUrl::of_type("Redis").unwrap(), QueueUrl::Redis(DEFAULT_REDIS.into()));
        assert_eq!(QueueUrl::of_type("sqlite").unwrap(), QueueUrl::Sqlite(None));
    }

    #[test]
    fn bad_urls_say_why_without_the_password() {
        let e = QueueUrl::parse("redis://u:hunter2@h:notaport/0").unwrap_err();
        assert!(e.contains("not a Redis URL") && !e.contains("hunter2"), "{e}");
        let e = QueueUrl::parse("mysql://h/db").unwrap_err();
        assert!(e.contains("unknown queue scheme \"mysql\""), "{e}");
        let e = QueueUrl::parse("amqp://u:hunter2@h:notaport/").unwrap_err();
        assert!(e.contains("not an AMQP URL") && !e.contains("hunter2"), "{e}");
        assert!(QueueUrl::parse(" ").unwrap_err().contains("empty"));
        assert!(QueueUrl::of_type("kafka").unwrap_err().contains("redis, rabbitmq or sqlite"));
        let e = Store::parse("amqp://u:hunter2@h/").unwrap_err();
        assert!(e.contains("RabbitMQ keeps no tasks") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn config_names_the_field() {
        let cfg = QueueConfig { url: Some("ftp://x".into()), ..QueueConfig::default() };
        assert!(cfg.validate().unwrap_err().starts_with("queue.url: "));
        let cfg = QueueConfig { url: Some("amqp://u:hunter2@h:x/".into()), ..QueueConfig::default() };
        let e = cfg.validate().unwrap_err();
        assert!(e.starts_with("queue.url: ") && !e.contains("hunter2"), "{e}");
        assert!(cfg.validate().unwrap_err().starts_with("queue.url: "));
        let mut cfg = QueueConfig::default();
        cfg.redis.max_attempts = 9;
        assert!(cfg.validate().unwrap_err().starts_with("queue.redis.max_attempts"));
        let cfg: QueueConfig =
            toml::from_str("url = \"redis://127.0.0.1:6379/3\"\nmax_attempts = 5\n[redis]\nnamespace = \"a\"\n")
                .unwrap();
        assert_eq!(cfg.selected().unwrap().store, Store::Redis("redis://127.0.0.1:6379/3".into()));
        assert_eq!((cfg.sqlite.max_attempts, cfg.redis.namespace.as_str()), (5, "a"));
        let mut cfg = QueueConfig::default();
        cfg.amqp.url = "amqp://elsewhere/".into();
        assert!(cfg.validate().unwrap_err().starts_with("queue.amqp.url"));
        let e = toml::from_str::<QueueConfig>("urll = 1\n").unwrap_err();
        assert!(e.to_string().contains("urll"), "{e}");
    }

    #[test]
    fn rabbitmq_dispatches_the_tasks_of_a_store() {
        let read = |text: &str| toml::from_str::<QueueConfig>(text).unwrap();
        // The home's SQLite by default; a Redis store shares the namespace with the broker queue.
        let cfg = read("url = \"amqp://127.0.0.1:5672/%2f\"\n");
        let sel = cfg.selected().unwrap();
        assert_eq!(
            (sel.store.clone(), sel.broker.as_deref()),
            (Store::Sqlite(None), Some("amqp://127.0.0.1:5672/%2f"))
        );
        assert!(!sel.is_shared());
        assert_eq!(cfg.amqp_for(sel.broker.unwrap(), &sel.store).namespace, "default");
        let cfg = read(
            "url = \"amqp://127.0.0.1:5672/%2f\"\nstore = \"redis://127.0.0.1:6379/0\"\n[redis]\nnamespace = \"r\"\n\
             [amqp]\nsweep_ms = 500\n",
        );
        let sel = cfg.selected().unwrap();
        assert!(sel.is_shared());
        let a = cfg.amqp_for(sel.broker.clone().unwrap(), &sel.store);
        assert_eq!((a.namespace.as_str(), a.sweep_ms, a.url.as_str()), ("r", 500, "amqp://127.0.0.1:5672/%2f"));
        let cfg = read(
            "url = \"amqp://h/\"\nstore = \"redis://h:6379/0\"\n[redis]\nnamespace = \"r\"\n[amqp]\nnamespace = \"a\"\n",
        );
        let sel = cfg.selected().unwrap();
        assert_eq!(cfg.amqp_for(sel.broker.unwrap(), &sel.store).namespace, "a");

        // A store beside a queue that names its own, or a broker as the store: refused, naming the field.
        let e = read("url = \"redis://h:6379/0\"\nstore = \"sqlite:\"\n").validate().unwrap_err();
        assert!(e.starts_with("queue.store: only with a RabbitMQ queue"), "{e}");
        let e = read("store = \"redis://h:6379/0\"\n").validate().unwrap_err();
        assert!(e.starts_with("queue.store: "), "{e}");
        let e = read("url = \"amqp://h/\"\nstore = \"amqp://u:hunter2@h/\"\n").validate().unwrap_err();
        assert!(e.starts_with("queue.store: RabbitMQ keeps no tasks") && !e.contains("hunter2"), "{e}");

        // A flag selecting another queue drops the file's store; one selecting RabbitMQ keeps it.
        let mut cfg = read("url = \"amqp://h/\"\nstore = \"redis://h:6379/0\"\n");
        cfg.select(&QueueUrl::Amqp("amqp://other/".into()));
        assert_eq!(cfg.selected().unwrap().store, Store::Redis("redis://h:6379/0".into()));
        cfg.select(&QueueUrl::Redis("redis://h:6379/1".into()));
        assert_eq!(cfg.selected().unwrap(), Selection { store: Store::Redis("redis://h:6379/1".into()), broker: None });
    }
}
