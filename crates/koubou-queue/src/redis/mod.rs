//! `RedisQueue`: the queue in Redis, shared by every Koubou node pointed at the same namespace.
//!
//! # Layout (all keys under `{koubou:<namespace>}:`, one hash tag: one cluster slot)
//! - `task:<id>`: a hash per task ([`record`]): `spec` (the task as submitted, JSON) and the
//!   fields that change (status, attempts, worker, lease, result, …).
//! - `pending` and `pending:<kind>`: the claim order, sorted sets scored
//!   `(10 - priority) * 2^43 + seq` — priority, then submission order, exact in a double. A
//!   task that comes back (released, requeued, retried) is put back at its own score: its place.
//! - `delayed`: retrying tasks by the moment their backoff ends; `leases`: running tasks by
//!   the moment their lease runs out. Claims move what is due (housekeeping), once `due` (the
//!   earliest of those heads and of the finished tasks' ageing out, at most a second ahead) has
//!   come.
//! - `s:<status>`: every task by status, scored by `seq` (counts, lists: a list of every
//!   status merges the six); `finished`: finished tasks by when, for keeping only
//!   `keep_finished` of them for `keep_finished_secs`; `idem`: idempotency key → task id;
//!   `seq`, `version`: counters.
//! - `outbox`: the claimable tasks no confirmed delivery of an outside dispatcher (RabbitMQ)
//!   covers, in claim order; a task's `claims` field counts its claims ([`crate::outbox`]).
//! - `nodes`, `node_inst`, `node_exp`, `node_seen`: the node registry ([`crate::Nodes`],
//!   `nodes.lua`): each node's registration (JSON: what it says of itself, its backends and load
//!   at its last renewal), the run holding it, when it runs out and its last heartbeat.
//! - `events`: the namespace's event stream, capped at about `keep_events` entries: each script
//!   appends what it did (field `m`, a [`record::Message`]) and each node what its workers
//!   produce (field `r`, a relayed event: tokens, worker states, backend health).
//!
//! Every operation that writes is one call of Lua ([`scripts`]: a library of functions run in
//! batches, or one script each on a server without functions), so it is atomic; it takes the
//! time from Redis (`TIME`), never from the client. Fencing is the same as SQLite's: a
//! worker's write applies only while the task is running under its (worker, attempt).
//!
//! This process's writes go through one writer task, in order (pipelined on one connection,
//! so order holds). Its own events reach the bus in the stream's order, among other nodes':
//! each operation is numbered (`<instance>#<n>` in its message), and whichever sees it first,
//! its answer or the stream reader, publishes its events. Other processes' events, wake-ups and
//! cancels arrive on the `events` stream, read from the last entry this instance saw (a
//! blocking `XREAD` on a connection of its own), and are applied here too: a parked worker
//! wakes for a task submitted elsewhere, and a cancel made elsewhere fires the claimer's token
//! (its next heartbeat would also say `Cancelled`). A node that lost its connection reads, once
//! back, what was appended meanwhile, so its clients miss no event unless the stream dropped it.

mod nodes;
mod record;
mod scripts;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use ::redis::{
    AsyncCommands, AsyncConnectionConfig, Client, IntoConnectionInfo, RedisError, RetryMethod,
    aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
};
use async_trait::async_trait;
use futures::StreamExt;
use koubou_task::{
    Cursor, EventKind, EventLog, Millis, NewTask, Priority, Task, TaskId, TaskKind, TaskStatus, WorkerId, now_millis,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};

use self::{
    record::{Fields, Message},
    scripts::{Op, Scripts},
};
use crate::{
    Capabilities, Claimed, Completion, Dispatch, Failure, Lease, LeaseStatus, Progress, QueueError, QueuePosition,
    Release, StatusCounts, Submitted, TaskPage, TaskQuery, TaskStore,
    backoff::Backoff,
    outbox::{Outbox, Undispatched},
    park::{self, Parking},
};

/// `[queue]` with a `redis://` or `rediss://` URL.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`, or `rediss://…` for TLS.
    pub url: String,
    /// The ACL user to log in as (replaces the URL's).
    pub username: Option<String>,
    /// Take the password from this environment variable (it replaces the URL's).
    pub password_env: Option<String>,
    /// With `rediss://`: PEM file of the CA certificates the server's certificate is checked
    /// against, instead of the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// Queues with the same namespace on the same server are one queue.
    pub namespace: String,
    /// Attempts a task gets unless it asks for another number.
    pub max_attempts: u32,
    pub retry: Backoff,
    /// Finished tasks kept (the oldest are forgotten first).
    pub keep_finished: u64,
    /// Finished tasks are forgotten this long after they finished.
    pub keep_finished_secs: u64,
    /// About how many events the namespace's stream keeps (Redis trims it a little above):
    /// a node cut off from Redis catches up on what other nodes published meanwhile, within
    /// these last entries.
    pub keep_events: u64,
    /// Longest wait for a connection or an answer before the operation fails as unavailable.
    pub timeout_ms: u64,
    /// Start even when the server does not let us read `maxmemory-policy` (managed services
    /// that disable `CONFIG`): set only after checking yourself that it is `noeviction`.
    pub assume_noeviction: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/0".into(),
            username: None,
            password_env: None,
            ca_file: None,
            namespace: "default".into(),
            max_attempts: 3,
            retry: Backoff::default(),
            keep_finished: 100_000,
            keep_finished_secs: 7 * 24 * 3600,
            keep_events: 100_000,
            timeout_ms: 10_000,
            assume_noeviction: false,
        }
    }
}

/// The URL shows without its password.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("username", &self.username)
            .field("password_env", &self.password_env)
            .field("ca_file", &self.ca_file)
            .field("namespace", &self.namespace)
            .field("max_attempts", &self.max_attempts)
            .field("retry", &self.retry)
            .field("keep_finished", &self.keep_finished)
            .field("keep_finished_secs", &self.keep_finished_secs)
            .field("keep_events", &self.keep_events)
            .field("timeout_ms", &self.timeout_ms)
            .field("assume_noeviction", &self.assume_noeviction)
            .finish()
    }
}

impl RedisConfig {
    /// Whether `url` reads as a Redis URL (`redis://…` or `rediss://…`); the error never shows
    /// the password.
    pub fn check_url(url: &str) -> Result<(), String> {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(format!("{:?} is not a Redis URL: it must start with redis:// or rediss://", redact(url)));
        }
        url.into_connection_info().map(drop).map_err(|_| {
            format!("{:?} is not a Redis URL (redis://[user:password@]host:port/db or rediss://…)", redact(url))
        })
    }

    /// The URL without its password, for messages and `info`.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// The client for this config: the URL, with the user, the password from the environment
    /// and the CA file applied. Errors never show the password.
    fn client(&self) -> Result<(Client, Option<String>), String> {
        let mut info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(|_| "not a Redis URL (redis://[user:password@]host:port/db or rediss://…)".to_owned())?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(var) = &self.password_env {
            let password =
                std::env::var(var).map_err(|_| format!("password_env names {var}, which is not set (or not UTF-8)"))?;
            settings = settings.set_password(password);
        }
        let secret = settings.password().filter(|p| !p.is_empty()).map(str::to_owned);
        info = info.set_redis_settings(settings);
        let tls = matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. });
        let client = match &self.ca_file {
            Some(path) if tls => {
                let pem = std::fs::read(path).map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
                Client::build_with_tls(info, ::redis::TlsCertificates { client_tls: None, root_cert: Some(pem) })
            }
            Some(_) => return Err("ca_file is set but the URL is not rediss://".into()),
            None => Client::open(info),
        };
        let client = client.map_err(|e| scrub(format!("cannot use this URL: {e}"), secret.as_deref()))?;
        Ok((client, secret))
    }
}

/// `text` with every occurrence of `secret` replaced by `***`.
fn scrub(text: String, secret: Option<&str>) -> String {
    match secret {
        Some(s) if text.contains(s) => text.replace(s, "***"),
        _ => text,
    }
}

/// The Redis task queue. Cheap to clone; the background tasks stop when the last clone is dropped.
#[derive(Clone)]
pub struct RedisQueue {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    calls: mpsc::UnboundedSender<Job>,
    _stop: DropGuard,
}

struct Shared {
    cfg: RedisConfig,
    /// `{koubou:<namespace>}:`
    prefix: String,
    /// This instance's id in the messages scripts publish: `<node>@<random run id>`, the node
    /// being the one its log names (the events of its scripts keep it on the other nodes).
    origin: String,
    conn: ConnectionManager,
    scripts: Scripts,
    /// Whether the operations run as the library's functions (`FCALL`); as scripts otherwise.
    functions: AtomicBool,
    /// The arguments every operation starts with (the prelude's ARGV[1..4]): this instance's
    /// id, how many finished tasks to keep and for how long, about how many events.
    common: [String; 4],
    bus: Arc<dyn EventLog>,
    wakeup: Notify,
    /// Tokens of tasks claimed through this instance, with the attempt they hold.
    running: Mutex<HashMap<TaskId, (u32, CancellationToken)>>,
    /// The newest namespace version applied, and what waited then.
    version: Mutex<u64>,
    queued: AtomicU64,
    /// Numbers this instance's operations (`<origin>#<n>` in their messages).
    ops: AtomicU64,
    /// Own messages whose events one of the two that see them (the operation's answer, the
    /// stream reader) has published and the other has not yet seen: whichever comes first
    /// publishes them, so they keep their place among other nodes' events (see `heard`).
    published: Mutex<std::collections::BTreeSet<u64>>,
}

/// Most own messages `Shared::published` remembers (one whose answer never came stays).
const PUBLISHED_KEPT: usize = 100_000;

/// Most writes the writer task has sent and not yet seen answered (see `write_loop`).
const WRITES_IN_FLIGHT: usize = 256;

/// What the writer task does, in order: a script, or an event relayed to the other nodes
/// (in line with the scripts, so a worker's last tokens reach them before its completion).
enum Job {
    Script(Call),
    Relay(String),
}

/// A write for the writer task.
struct Call {
    op: Op,
    args: Vec<String>,
    reply: oneshot::Sender<Result<Answer, QueueError>>,
}

/// What a script answered, after its message was applied.
struct Answer {
    code: String,
    /// What follows the message: a task's values (`record::TASK_FIELDS`, `None` where the
    /// task has no such field), or what the script says.
    extra: Vec<Option<String>>,
    /// For a claim: the token registered for it.
    token: Option<CancellationToken>,
}

impl Answer {
    fn first(&self) -> Option<&str> {
        self.extra.first().and_then(Option::as_deref)
    }
    fn task(&self) -> Result<Task, QueueError> {
        record::task(&record::returned(&self.extra))
    }
}

/// Redis's error codes for a condition that passes (out of memory, busy, loading, a replica
/// without its master, a read-only replica): the same write may succeed later.
const PASSING: [&str; 5] = ["OOM", "BUSY", "LOADING", "MASTERDOWN", "READONLY"];

/// A connection failure, a timeout, a server loading or out of memory: the caller may try again.
fn from_redis(e: RedisError) -> QueueError {
    let passing = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_cluster_error()
        || matches!(
            e.retry_method(),
            RetryMethod::Reconnect
                | RetryMethod::ReconnectFromInitialConnections
                | RetryMethod::WaitAndRetry
                | RetryMethod::RefreshSlotsAndRetry
        )
        || e.code().is_some_and(|c| PASSING.contains(&c));
    if passing { QueueError::Unavailable(e.to_string()) } else { QueueError::Storage(format!("Redis refused it: {e}")) }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// An optional script argument: `""` for none, `"=" + value` for a value.
fn opt(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(String::new, |v| format!("={v}"))
}

fn json(v: &impl Serialize) -> Result<String, QueueError> {
    serde_json::to_string(v).map_err(|e| QueueError::Corrupt(e.to_string()))
}

fn flag(b: bool) -> String {
    (if b { "1" } else { "0" }).into()
}

impl RedisQueue {
    /// Connects, checks the server is fit to hold a queue (`maxmemory-policy` must be
    /// `noeviction`; without AOF a warning), and starts reading the namespace's event stream
    /// from its end.
    pub async fn open(cfg: RedisConfig, bus: Arc<dyn EventLog>) -> Result<RedisQueue, QueueError> {
        let at = redact(&cfg.url);
        let refuse = |detail: String| QueueError::Open { path: at.clone(), detail };
        if cfg.namespace.is_empty() || cfg.namespace.contains(['{', '}']) {
            return Err(refuse(format!("namespace {:?} must be non-empty, without '{{' or '}}'", cfg.namespace)));
        }
        if cfg.keep_events == 0 {
            return Err(refuse("keep_events must be at least 1".into()));
        }
        let (client, secret) = cfg.client().map_err(refuse)?;
        let refuse = |detail: String| refuse(scrub(detail, secret.as_deref()));
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(2);
        let mut conn = ConnectionManager::new_with_config(client.clone(), manager)
            .await
            .map_err(|e| refuse(format!("cannot connect: {e}")))?;
        check_server(&mut conn, &cfg).await.map_err(refuse)?;

        let prefix = format!("{{koubou:{}}}:", cfg.namespace);
        let (version, queued): (Option<u64>, (u64, u64)) = ::redis::pipe()
            .get(format!("{prefix}version"))
            .zcard(format!("{prefix}pending"))
            .zcard(format!("{prefix}delayed"))
            .query_async(&mut conn)
            .await
            .map(|(v, p, d)| (v, (p, d)))
            .map_err(|e| refuse(e.to_string()))?;
        let scripts = Scripts::new();
        let functions = load_library(&mut conn, &scripts).await;
        let origin = format!("{}@{:016x}", bus.origin(), fastrand::u64(..));
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            prefix,
            origin: origin.clone(),
            conn,
            scripts,
            functions: AtomicBool::new(functions),
            common: [
                origin.clone(),
                cfg.keep_finished.to_string(),
                cfg.keep_finished_secs.saturating_mul(1000).to_string(),
                cfg.keep_events.to_string(),
            ],
            bus,
            wakeup: Notify::new(),
            running: Mutex::new(HashMap::new()),
            version: Mutex::new(version.unwrap_or(0)),
            queued: AtomicU64::new(queued.0 + queued.1),
            ops: AtomicU64::new(0),
            published: Mutex::new(Default::default()),
            cfg,
        });
        let (ready_tx, ready) = oneshot::channel();
        tokio::spawn(Listen { shared: shared.clone(), client, stop: stop.clone() }.run(ready_tx));
        ready
            .await
            .map_err(|_| refuse("the event reader stopped".into()))?
            .map_err(|e| refuse(format!("cannot read the queue's event stream: {e}")))?;
        let (calls, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(shared.clone(), rx));
        Ok(RedisQueue { inner: Arc::new(Inner { shared, calls, _stop: stop.drop_guard() }) })
    }

    pub fn bus(&self) -> &Arc<dyn EventLog> {
        &self.inner.shared.bus
    }

    /// The event log for everything else on node `node` (its workers' tokens, backend health):
    /// published on this queue's local log and relayed to every other node on the namespace,
    /// named after `node`. The queue itself must have been opened on the local log.
    pub fn relay(&self, node: &str) -> Arc<dyn EventLog> {
        Arc::new(RelayLog {
            local: self.inner.shared.bus.clone(),
            calls: self.inner.calls.clone(),
            instance: self.inner.shared.origin.clone(),
            node: node.to_owned(),
        })
    }

    /// Tasks waiting to run (pending or retrying), as of the last script this instance ran or
    /// heard of.
    pub fn queued(&self) -> u64 {
        self.inner.shared.queued.load(Ordering::Acquire)
    }

    /// The earliest retry or lease expiry, moved from Redis's clock to ours.
    async fn due(&self) -> Result<Option<Millis>, QueueError> {
        let first = |set| {
            let mut p = ::redis::cmd("ZRANGE");
            p.arg(self.key(set)).arg(0).arg(0).arg("WITHSCORES");
            p
        };
        type Head = Vec<(String, f64)>;
        let (time, retry, lease): ((i64, i64), Head, Head) = ::redis::pipe()
            .cmd("TIME")
            .add_command(first("delayed"))
            .add_command(first("leases"))
            .query_async(&mut self.conn())
            .await
            .map_err(from_redis)?;
        let redis_now = time.0 * 1000 + time.1 / 1000;
        let due = retry.iter().chain(&lease).map(|(_, at)| *at as Millis).min();
        Ok(due.map(|at| now_millis() + (at - redis_now)))
    }

    pub fn config(&self) -> &RedisConfig {
        &self.inner.shared.cfg
    }

    /// Runs a writing script through the writer task.
    async fn write(&self, op: Op, args: Vec<String>) -> Result<Answer, QueueError> {
        let (reply, rx) = oneshot::channel();
        self.inner.calls.send(Job::Script(Call { op, args, reply })).map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.inner.shared.prefix)
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.shared.conn.clone()
    }

    /// The tasks with these ids, in order; tasks forgotten meanwhile are left out.
    async fn fetch(&self, ids: &[(String, i64)]) -> Result<Vec<(Task, i64)>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = ::redis::pipe();
        for (id, _) in ids {
            pipe.hgetall(self.key(&format!("task:{id}")));
        }
        let all: Vec<Fields> = pipe.query_async(&mut self.conn()).await.map_err(from_redis)?;
        let mut out = Vec::with_capacity(ids.len());
        for (f, (_, seq)) in all.iter().zip(ids) {
            if !f.is_empty() {
                out.push((record::task(f)?, *seq));
            }
        }
        Ok(out)
    }

    /// Ids and `seq` of the tasks in these status sets (or all), newest first, below `before`,
    /// at most `limit` (all with `None`).
    async fn newest(
        &self,
        sets: &[String],
        before: Option<i64>,
        limit: Option<usize>,
    ) -> Result<Vec<(String, i64)>, QueueError> {
        let max = before.map_or_else(|| "+inf".to_owned(), |b| format!("({b}"));
        let mut pipe = ::redis::pipe();
        for set in sets {
            match limit {
                Some(n) => pipe.zrevrangebyscore_limit_withscores(set, &max, "-inf", 0, n as isize),
                None => pipe.zrevrangebyscore_withscores(set, &max, "-inf"),
            };
        }
        let per_set: Vec<Vec<(String, f64)>> = pipe.query_async(&mut self.conn()).await.map_err(from_redis)?;
        let mut ids: Vec<(String, i64)> = per_set.into_iter().flatten().map(|(id, s)| (id, s as i64)).collect();
        ids.sort_by_key(|(_, seq)| std::cmp::Reverse(*seq));
        if let Some(n) = limit {
            ids.truncate(n);
        }
        Ok(ids)
    }
}

/// Refuses a server that may evict keys (an evicted key is a lost task); warns without AOF.
async fn check_server(conn: &mut ConnectionManager, cfg: &RedisConfig) -> Result<(), String> {
    let config = |name: &'static str| {
        let mut conn = conn.clone();
        async move {
            let v: Vec<String> = ::redis::cmd("CONFIG").arg("GET").arg(name).query_async(&mut conn).await?;
            Ok::<_, RedisError>(v.into_iter().nth(1).unwrap_or_default())
        }
    };
    match config("maxmemory-policy").await {
        Ok(policy) if policy == "noeviction" => {}
        Ok(policy) => {
            return Err(format!(
                "maxmemory-policy is {policy:?}: Redis may evict the queue's keys and lose tasks. Set \
                 `maxmemory-policy noeviction` in redis.conf (or CONFIG SET maxmemory-policy noeviction)"
            ));
        }
        Err(e) if cfg.assume_noeviction => {
            tracing::warn!(error = %e, "cannot read maxmemory-policy; assuming noeviction as configured");
        }
        Err(e) => {
            return Err(format!(
                "cannot read maxmemory-policy ({e}); if the server forbids CONFIG, check that it is noeviction and \
                 set queue.assume_noeviction = true"
            ));
        }
    }
    match config("appendonly").await {
        Ok(aof) if aof == "no" => tracing::warn!(
            "Redis runs without AOF (appendonly no): tasks accepted since its last snapshot are lost if it stops; \
             set appendonly yes (and appendfsync everysec or always)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read appendonly; Redis may keep the queue only in memory"),
    }
    Ok(())
}

/// Loads the library of functions (`FUNCTION LOAD REPLACE`): whether the operations can run
/// as functions. A server without them (before Redis 7) or a user not allowed to load them
/// runs them as scripts instead.
async fn load_library(conn: &mut ConnectionManager, scripts: &Scripts) -> bool {
    let mut load = ::redis::cmd("FUNCTION");
    load.arg("LOAD").arg("REPLACE").arg(&scripts.library);
    match load.query_async::<String>(conn).await {
        Ok(_) => true,
        Err(e) => {
            tracing::info!(error = %e, "the queue's operations run as Lua scripts (EVALSHA): cannot load them as functions");
            false
        }
    }
}

/// A function the server no longer has (a restart without persistence, `FUNCTION FLUSH`).
fn function_gone(e: &RedisError) -> bool {
    e.detail().is_some_and(|d| d.starts_with("Function not found"))
}

/// Notes that one of the two who see own message `id` published its events.
fn remember(published: &mut std::collections::BTreeSet<u64>, id: u64) {
    published.insert(id);
    while published.len() > PUBLISHED_KEPT {
        published.pop_first();
    }
}

/// The same error again, for each operation of a batch that failed as a whole.
fn same(e: &QueueError) -> QueueError {
    match e {
        QueueError::Unavailable(s) => QueueError::Unavailable(s.clone()),
        other => QueueError::Storage(other.to_string()),
    }
}

impl Shared {
    /// The next operation's number.
    fn op_id(&self) -> u64 {
        self.ops.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs one writing operation as a script, and applies what it did.
    async fn run(&self, conn: &mut ConnectionManager, op: Op, args: &[String]) -> Result<Answer, QueueError> {
        let id = self.op_id();
        let mut common = self.common.clone();
        common[0] = format!("{}#{id}", self.origin);
        let mut call = self.scripts.get(op).key(&self.prefix);
        call.arg(&common).arg(args);
        let raw: Vec<Option<String>> = call.invoke_async(conn).await.map_err(from_redis)?;
        self.answer(op, id, raw)
    }

    /// Runs writing operations, in order, as one batch of the library's, and applies what each
    /// did; as scripts, one by one, if the library cannot be loaded (any more).
    async fn run_batch(
        &self,
        conn: &mut ConnectionManager,
        calls: &[(Op, &[String])],
    ) -> Vec<Result<Answer, QueueError>> {
        let ids: Vec<u64> = calls.iter().map(|_| self.op_id()).collect();
        let fcall = || {
            let mut call = ::redis::cmd("FCALL");
            call.arg(&self.scripts.batch).arg(1).arg(&self.prefix).arg(&self.common);
            for ((op, args), id) in calls.iter().zip(&ids) {
                call.arg(Scripts::name(*op)).arg(id).arg(args.len()).arg(*args);
            }
            call
        };
        let mut answers = fcall().query_async::<Vec<Vec<Option<String>>>>(conn).await;
        if answers.as_ref().is_err_and(function_gone) {
            // Gone from the server (a restart without persistence, `FUNCTION FLUSH`): loaded
            // again, then called again; if it cannot be, scripts from now on.
            if !load_library(conn, &self.scripts).await {
                self.functions.store(false, Ordering::Relaxed);
                let mut out = Vec::with_capacity(calls.len());
                for (op, args) in calls {
                    out.push(self.run(conn, *op, args).await);
                }
                return out;
            }
            answers = fcall().query_async(conn).await;
        }
        match answers {
            Ok(answers) if answers.len() == calls.len() => {
                calls.iter().zip(ids).zip(answers).map(|(((op, _), id), raw)| self.answer(*op, id, raw)).collect()
            }
            Ok(answers) => {
                let e = format!("a batch of {} queue operations answered {}", calls.len(), answers.len());
                calls.iter().map(|_| Err(QueueError::Corrupt(e.clone()))).collect()
            }
            Err(e) => {
                let e = from_redis(e);
                calls.iter().map(|_| Err(same(&e))).collect()
            }
        }
    }

    /// What operation `id` answered, `{code, message, extra…}`, once its message is applied.
    fn answer(&self, op: Op, id: u64, raw: Vec<Option<String>>) -> Result<Answer, QueueError> {
        let mut raw = raw.into_iter();
        let (Some(Some(code)), Some(Some(msg))) = (raw.next(), raw.next()) else {
            return Err(QueueError::Corrupt(format!("a queue script ({op:?}) answered nothing")));
        };
        if code == "!" {
            // An error raised inside a batch, for this operation alone: Redis's own error
            // (its code first, as Redis sends it) or Lua's.
            let passing = msg.split_once(' ').is_some_and(|(c, _)| PASSING.contains(&c));
            return Err(if passing {
                QueueError::Unavailable(msg)
            } else {
                QueueError::Storage(format!("Redis refused it: {msg}"))
            });
        }
        let msg = Message::parse(msg.as_bytes())?;
        let events = msg.events()?;
        // A claim's own `TaskClaimed` comes last, after its housekeeping's events.
        let claimed = match events.last() {
            Some(EventKind::TaskClaimed { task_id, attempt, .. })
                if matches!(op, Op::Claim | Op::ClaimId) && code == "ok" =>
            {
                Some((*task_id, *attempt, CancellationToken::new()))
            }
            _ => None,
        };
        let token = claimed.as_ref().map(|c| c.2.clone());
        let stops = msg.stops()?;
        // A message with news is also on the stream, where this instance's reader may have
        // published its events already, in their place among other nodes' (`heard`).
        let news = !msg.notes.is_empty() || !stops.is_empty() || msg.wake > 0;
        let mut published = self.published.lock();
        let publish = !(news && published.remove(&id));
        if news && publish {
            remember(&mut published, id);
        }
        self.apply(&msg, events, stops, claimed, publish.then_some(None));
        Ok(Answer { code, extra: raw.collect(), token })
    }

    /// After a script: stops the claims it ended, registers the claim it made, wakes parked
    /// workers, counts what waits, then publishes its events — as this node's (`publish` is
    /// `Some(None)`) or as those of the node that ran it (`Some(Some(node))`); `None` when they
    /// were published already.
    fn apply(
        &self,
        msg: &Message,
        events: Vec<EventKind>,
        stops: Vec<(TaskId, u32)>,
        claimed: Option<(TaskId, u32, CancellationToken)>,
        publish: Option<Option<&str>>,
    ) {
        {
            let mut version = self.version.lock();
            if let Some(queued) = msg.queued
                && msg.version > *version
            {
                *version = msg.version;
                self.queued.store(queued, Ordering::Release);
            }
        }
        {
            // Stops first: a lease that expired and was claimed again by the same script must
            // stop the old holder, not the new one.
            let mut running = self.running.lock();
            for (id, attempt) in stops {
                stop_claim(&mut running, id, attempt);
            }
            if let Some((id, attempt, token)) = claimed {
                running.insert(id, (attempt, token));
            }
            for id in events.iter().filter(|e| e.is_terminal()).filter_map(EventKind::task_id) {
                running.remove(&id);
            }
        }
        for _ in 0..msg.wake.min(1024) {
            self.wakeup.notify_one();
        }
        let Some(from) = publish else { return };
        for e in events {
            match from {
                Some(node) => self.bus.publish_from(node, e),
                None => self.bus.publish(e),
            }
        }
    }

    /// A message another instance published: its events keep the node that ran the script.
    fn heard(&self, payload: &[u8]) {
        let applied = Message::parse(payload).and_then(|msg| {
            if msg.instance() != self.origin {
                let (events, stops) = (msg.events()?, msg.stops()?);
                self.apply(&msg, events, stops, None, Some(msg.node()));
            } else if let Some(id) = msg.op() {
                // One of this instance's: its answer applies the rest (claims, stops, wake-ups);
                // its events are published here if the answer has not come yet, so that they
                // come before the other nodes' events that follow them on the stream.
                let mut published = self.published.lock();
                if !published.remove(&id) {
                    remember(&mut published, id);
                    for e in msg.events()? {
                        self.bus.publish(e);
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = applied {
            tracing::warn!(error = %e, "ignored a message on the queue's channel");
        }
    }

    /// An event another node published through its [`RedisQueue::relay`] log.
    fn relayed(&self, payload: &[u8]) {
        match serde_json::from_slice::<Relayed>(payload) {
            Ok(r) if r.instance != self.origin => self.bus.publish_from(&r.origin, r.event),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "ignored a relayed event"),
        }
    }

    /// Fires and forgets a claim's token once the claim is known to be over.
    fn drop_claim(&self, lease: &Lease) {
        stop_claim(&mut self.running.lock(), lease.task_id, lease.attempt);
    }
}

/// A relayed event on the namespace's stream (field `r`): which queue instance sent it (to skip our own),
/// the node that produced it, and the event.
#[derive(Serialize, Deserialize)]
struct Relayed {
    #[serde(rename = "i")]
    instance: String,
    #[serde(rename = "o")]
    origin: String,
    #[serde(rename = "e")]
    event: EventKind,
}

/// The event log of a node on a Redis queue: what is published on it goes to this process's
/// log and, through the queue's writer (in order with its scripts), to every other node's. The
/// scripts' own events reach the other nodes on the same stream, so the queue itself
/// publishes on the local log only.
struct RelayLog {
    local: Arc<dyn EventLog>,
    calls: mpsc::UnboundedSender<Job>,
    instance: String,
    node: String,
}

impl RelayLog {
    fn send(&self, origin: &str, event: &EventKind) {
        let relayed = Relayed { instance: self.instance.clone(), origin: origin.to_owned(), event: event.clone() };
        match serde_json::to_string(&relayed) {
            Ok(payload) => {
                let _ = self.calls.send(Job::Relay(payload));
            }
            Err(e) => tracing::warn!(error = %e, "could not encode an event for the other nodes"),
        }
    }
}

impl EventLog for RelayLog {
    fn publish(&self, kind: EventKind) {
        self.send(&self.node, &kind);
        self.local.publish_from(&self.node, kind);
    }
    fn publish_from(&self, origin: &str, kind: EventKind) {
        self.send(origin, &kind);
        self.local.publish_from(origin, kind);
    }
    fn subscribe(&self, after: Option<u64>) -> koubou_task::Subscription {
        self.local.subscribe(after)
    }
    fn follow(&self, f: koubou_task::Tap) {
        self.local.follow(f)
    }
    fn head(&self) -> u64 {
        self.local.head()
    }
    fn origin(&self) -> &str {
        &self.node
    }
}

/// Fires and forgets the token of task `id`'s claim if it holds `attempt` (a newer claim of the
/// same task keeps its own).
fn stop_claim(running: &mut HashMap<TaskId, (u32, CancellationToken)>, id: TaskId, attempt: u32) {
    if running.get(&id).is_some_and(|(a, _)| *a == attempt)
        && let Some((_, token)) = running.remove(&id)
    {
        token.cancel();
    }
}

/// Most operations one batch carries (see `write_loop`).
const MAX_BATCH: usize = 64;

async fn write_loop(shared: Arc<Shared>, mut calls: mpsc::UnboundedReceiver<Job>) {
    let stream = format!("{}events", shared.prefix);
    // `batch`: with the library, the operations that go with a script's in one batch.
    let run = |job: Job, batch: Option<Vec<Call>>| {
        let (shared, stream) = (&shared, &stream);
        let mut conn = shared.conn.clone();
        // Unconstrained by tokio's cooperative budget: a future whose budget ran out would yield
        // before sending its command and be polled again after those pushed later, sending its
        // write after theirs (seen: a burst of relayed events overtaken by a later script).
        tokio::task::unconstrained(async move {
            match job {
                Job::Script(call) if batch.is_none() => {
                    let r = shared.run(&mut conn, call.op, &call.args).await;
                    let _ = call.reply.send(r);
                }
                Job::Script(first) => {
                    let calls: Vec<Call> = std::iter::once(first).chain(batch.into_iter().flatten()).collect();
                    let ops: Vec<(Op, &[String])> = calls.iter().map(|c| (c.op, c.args.as_slice())).collect();
                    let answers = shared.run_batch(&mut conn, &ops).await;
                    for (call, r) in calls.into_iter().zip(answers) {
                        let _ = call.reply.send(r);
                    }
                }
                Job::Relay(payload) => {
                    let mut add = ::redis::cmd("XADD");
                    add.arg(stream).arg("MAXLEN").arg("~").arg(shared.cfg.keep_events).arg("*").arg("r").arg(payload);
                    if let Err(e) = add.query_async::<()>(&mut conn).await {
                        tracing::warn!(error = %e, "could not relay an event to the other nodes");
                    }
                }
            }
        })
    };
    // Writes are pipelined: each is sent as soon as it is asked for, without waiting for the
    // answers to earlier ones, on the one multiplexed connection. A `FuturesUnordered` first
    // polls its futures in the order they were pushed, and each (unconstrained) sends its
    // command in that first poll, so Redis runs them in the order they were asked for; their
    // answers come back in that order, and each is applied (its events published) as it
    // arrives.
    //
    // With the library loaded, the operations already waiting when one is taken (up to
    // `MAX_BATCH`, none waited for) go with it as one batch: one call instead of many under
    // load, and the same single operation otherwise. A relayed event ends a batch, and is sent
    // after it.
    let mut writing = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            job = calls.recv(), if writing.len() < WRITES_IN_FLIGHT => match job {
                Some(job @ Job::Script(_)) if shared.functions.load(Ordering::Relaxed) => {
                    let (mut batch, mut after) = (Vec::new(), None);
                    while batch.len() + 1 < MAX_BATCH {
                        match calls.try_recv() {
                            Ok(Job::Script(call)) => batch.push(call),
                            Ok(relay) => {
                                after = Some(relay);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    writing.push(run(job, Some(batch)));
                    if let Some(relay) = after {
                        writing.push(run(relay, None));
                    }
                }
                Some(job) => writing.push(run(job, None)),
                None => break,
            },
            Some(()) = writing.next(), if !writing.is_empty() => {}
        }
    }
    while writing.next().await.is_some() {}
}

/// How long one `XREAD` waits for an entry before asking again. It answers as soon as one is
/// appended, so this is no polling interval: an idle node sends one command per this long.
const READ_BLOCK: Duration = Duration::from_secs(10);
/// The most entries one `XREAD` returns.
const READ_BATCH: usize = 1024;

/// One stream entry: its id, and its fields and values, flat.
type Entry = (String, Vec<Vec<u8>>);

/// The reader of the namespace's event stream, for as long as the queue lives, on a connection
/// of its own (a blocking read holds its connection). It starts at the stream's end and
/// reads on from the last entry it saw, also after a lost connection: nothing appended
/// meanwhile is missed unless the stream no longer holds it (`keep_events`).
struct Listen {
    shared: Arc<Shared>,
    client: Client,
    stop: CancellationToken,
}

impl Listen {
    fn key(&self) -> String {
        format!("{}events", self.shared.prefix)
    }

    /// Connects, and says where to read from: the stream's end the first time (`last` is
    /// `None`), else after `last`, with a warning when the stream no longer holds it.
    async fn connect(&self, last: Option<&str>) -> Result<(MultiplexedConnection, String), RedisError> {
        let timeout = Duration::from_millis(self.shared.cfg.timeout_ms.max(1));
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(READ_BLOCK + timeout));
        let mut conn = self.client.get_multiplexed_async_connection_with_config(&cfg).await?;
        let first = |order: &str, from: &str, to: &str| {
            let mut c = ::redis::cmd(order);
            c.arg(self.key()).arg(from).arg(to).arg("COUNT").arg(1);
            c
        };
        let Some(last) = last else {
            let end: Vec<Entry> = first("XREVRANGE", "+", "-").query_async(&mut conn).await?;
            return Ok((conn, end.into_iter().next().map_or_else(|| "0-0".to_owned(), |(id, _)| id)));
        };
        // The first entry at or after `last`: `last` itself, unless the stream trimmed it.
        let kept: Vec<Entry> = first("XRANGE", last, "+").query_async(&mut conn).await?;
        if last != "0-0" && kept.first().is_none_or(|(id, _)| id != last) {
            tracing::warn!(
                keep_events = self.shared.cfg.keep_events,
                "the queue's event stream no longer holds the last event this node read: events other nodes \
                 published while it was disconnected may be missing here (tokens, progress; task states are \
                 not affected); raise queue.redis.keep_events to keep more"
            );
        }
        Ok((conn, last.to_owned()))
    }

    /// Reads entries after `last` and applies them, moving `last` on, until the connection
    /// fails.
    async fn read(&self, conn: &mut MultiplexedConnection, last: &mut String) -> RedisError {
        let key = self.key();
        loop {
            let mut read = ::redis::cmd("XREAD");
            read.arg("COUNT").arg(READ_BATCH).arg("BLOCK").arg(READ_BLOCK.as_millis() as u64);
            read.arg("STREAMS").arg(&key).arg(&*last);
            let streams: Option<Vec<(String, Vec<Entry>)>> = match read.query_async(conn).await {
                Ok(r) => r,
                Err(e) => return e,
            };
            for (id, fields) in streams.into_iter().flatten().flat_map(|(_, entries)| entries) {
                for pair in fields.chunks_exact(2) {
                    match pair[0].as_slice() {
                        b"m" => self.shared.heard(&pair[1]),
                        b"r" => self.shared.relayed(&pair[1]),
                        _ => tracing::warn!(entry = %id, "ignored an unknown field in the queue's event stream"),
                    }
                }
                *last = id;
            }
        }
    }

    async fn run(self, ready: oneshot::Sender<Result<(), RedisError>>) {
        let mut ready = Some(ready);
        let mut last: Option<String> = None;
        let mut pause = Duration::from_millis(100);
        loop {
            let connected = tokio::select! {
                c = self.connect(last.as_deref()) => c,
                _ = self.stop.cancelled() => return,
            };
            match connected {
                Ok((mut conn, mut from)) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Ok(()));
                    } else {
                        tracing::info!("reading the queue's event stream again");
                        // What the stream no longer held is missed: parked workers look for themselves.
                        self.shared.wakeup.notify_waiters();
                    }
                    pause = Duration::from_millis(100);
                    let lost = tokio::select! {
                        e = self.read(&mut conn, &mut from) => e,
                        _ = self.stop.cancelled() => return,
                    };
                    last = Some(from);
                    tracing::warn!(error = %lost, "lost the queue's event stream; reconnecting");
                }
                Err(e) => match ready.take() {
                    Some(r) => {
                        let _ = r.send(Err(e));
                        return;
                    }
                    None => tracing::warn!(error = %e, retry_in = ?pause, "cannot read the queue's event stream"),
                },
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.stop.cancelled() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
}

fn lost_conflict(lease: &Lease, answer: &Answer) -> QueueError {
    match (answer.code.as_str(), answer.first().and_then(TaskStatus::parse)) {
        ("conflict", Some(status)) => QueueError::Conflict {
            id: lease.task_id,
            status,
            detail: format!("worker {} no longer holds attempt {}", lease.worker_id, lease.attempt),
        },
        ("notfound", _) => QueueError::NotFound(lease.task_id),
        _ => unexpected(answer),
    }
}

/// What a claim script answered (`claim` or `claim_id`): nothing claimable, or the task now
/// held by `worker`.
fn claimed(answer: &Answer, worker: &WorkerId) -> Result<Option<Claimed>, QueueError> {
    match (answer.code.as_str(), &answer.token) {
        ("none", _) => Ok(None),
        ("ok", Some(cancel)) => {
            let task = answer.task()?;
            let lease = Lease { task_id: task.id, worker_id: worker.clone(), attempt: task.attempts };
            Ok(Some(Claimed { task, lease, cancel: cancel.clone() }))
        }
        _ => Err(unexpected(answer)),
    }
}

fn unexpected(answer: &Answer) -> QueueError {
    QueueError::Corrupt(format!("a queue script answered {:?} {:?}", answer.code, answer.first()))
}

fn lease_args(lease: &Lease) -> Vec<String> {
    vec![lease.task_id.to_string(), lease.worker_id.0.clone(), lease.attempt.to_string()]
}

#[async_trait]
impl TaskStore for RedisQueue {
    async fn submit_bounded(&self, new: NewTask, max_queued: Option<u64>) -> Result<Submitted, QueueError> {
        let cfg = &self.inner.shared.cfg;
        let mut task = Task::from_new(TaskId::new(), new, cfg.max_attempts, 0);
        let args = vec![
            json(&task)?,
            task.id.to_string(),
            task.kind.as_str().to_owned(),
            task.priority.get().to_string(),
            task.max_attempts.to_string(),
            task.idempotency_key.clone().unwrap_or_default(),
            max_queued.map(|n| n.to_string()).unwrap_or_default(),
            json(&task.tags)?,
        ];
        let answer = self.write(Op::Submit, args).await?;
        match answer.code.as_str() {
            "ok" => {
                let now: Millis = answer.first().and_then(|s| s.parse().ok()).ok_or_else(|| unexpected(&answer))?;
                (task.created_at, task.available_at) = (now, now);
                Ok(Submitted { task, created: true })
            }
            "exists" => Ok(Submitted { task: answer.task()?, created: false }),
            "full" => {
                let queued = answer.first().and_then(|s| s.parse().ok()).unwrap_or_default();
                Err(QueueError::Full { queued, limit: max_queued.unwrap_or_default() })
            }
            _ => Err(unexpected(&answer)),
        }
    }

    async fn get(&self, id: TaskId) -> Result<Option<Task>, QueueError> {
        let f: Fields = self.conn().hgetall(self.key(&format!("task:{id}"))).await.map_err(from_redis)?;
        if f.is_empty() { Ok(None) } else { record::task(&f).map(Some) }
    }

    async fn list(&self, q: TaskQuery) -> Result<TaskPage, QueueError> {
        let limit = q.limit.clamp(1, 1000);
        let mut statuses = if q.statuses.is_empty() { TaskStatus::ALL.to_vec() } else { q.statuses.clone() };
        statuses.sort_by_key(|s| s.as_str());
        statuses.dedup();
        let sets: Vec<String> = statuses.iter().map(|s| self.key(&format!("s:{s}"))).collect();
        let before = match &q.before {
            Some(c) => Some(c.as_str().parse::<i64>().map_err(|_| QueueError::BadCursor(c.to_string()))?),
            None => None,
        };
        let tag = q.tag.as_deref().filter(|t| !t.is_empty());
        let search = q.search.as_deref().filter(|s| !s.is_empty()).map(str::to_ascii_lowercase);
        let (tasks, more, total) = if q.kind.is_none() && tag.is_none() && search.is_none() {
            let mut pipe = ::redis::pipe();
            for set in &sets {
                pipe.zcard(set);
            }
            let counts: Vec<u64> = pipe.query_async(&mut self.conn()).await.map_err(from_redis)?;
            let ids = self.newest(&sets, before, Some(limit + 1)).await?;
            let more = ids.len() > limit;
            (self.fetch(&ids[..ids.len().min(limit)]).await?, more, counts.iter().sum())
        } else {
            // A scan, as SQLite's is: every task of the sets is read to count the matches.
            let matches = |t: &Task| {
                q.kind.as_ref().is_none_or(|k| &t.kind == k)
                    && tag.is_none_or(|tag| t.tags.iter().any(|x| x == tag))
                    && search.as_deref().is_none_or(|s| t.prompt.to_ascii_lowercase().contains(s))
            };
            let (mut page, mut more, mut total) = (Vec::new(), false, 0u64);
            for chunk in self.newest(&sets, None, None).await?.chunks(256) {
                for (task, seq) in self.fetch(chunk).await? {
                    if !matches(&task) {
                        continue;
                    }
                    total += 1;
                    if before.is_none_or(|b| seq < b) {
                        if page.len() < limit { page.push((task, seq)) } else { more = true }
                    }
                }
            }
            (page, more, total)
        };
        let next_cursor = if more { tasks.last().map(|(_, seq)| Cursor::new(seq.to_string())) } else { None };
        Ok(TaskPage { tasks: tasks.into_iter().map(|(t, _)| t).collect(), next_cursor, total })
    }

    async fn counts(&self) -> Result<StatusCounts, QueueError> {
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        for s in TaskStatus::ALL {
            pipe.zcard(self.key(&format!("s:{s}")));
        }
        let n: Vec<u64> = pipe.query_async(&mut self.conn()).await.map_err(from_redis)?;
        let [pending, running, retrying, completed, failed, cancelled] = n[..] else {
            return Err(QueueError::Corrupt("counts: Redis answered a short list".into()));
        };
        Ok(StatusCounts { pending, running, retrying, completed, failed, cancelled })
    }

    async fn position(&self, id: TaskId) -> Result<Option<QueuePosition>, QueueError> {
        let answer: ::redis::Value = self
            .inner
            .shared
            .scripts
            .position
            .key(self.key(&format!("task:{id}")))
            .key(self.key("pending"))
            .invoke_async(&mut self.conn())
            .await
            .map_err(from_redis)?;
        match answer {
            ::redis::Value::Int(ahead) => Ok(Some(QueuePosition { ahead: ahead as u64 })),
            ::redis::Value::BulkString(s) if s == b"none" => Ok(None),
            ::redis::Value::BulkString(s) if s == b"notfound" => Err(QueueError::NotFound(id)),
            other => Err(QueueError::Corrupt(format!("position: Redis answered {other:?}"))),
        }
    }

    async fn cancel(&self, id: TaskId) -> Result<Task, QueueError> {
        let answer = self.write(Op::Cancel, vec![id.to_string()]).await?;
        match (answer.code.as_str(), answer.first().and_then(TaskStatus::parse)) {
            ("ok", _) => answer.task(),
            ("notfound", _) => Err(QueueError::NotFound(id)),
            ("conflict", Some(status)) => Err(QueueError::Conflict {
                id,
                status,
                detail: "only pending, retrying or running tasks can be cancelled".into(),
            }),
            _ => Err(unexpected(&answer)),
        }
    }
}

#[async_trait]
impl Dispatch for RedisQueue {
    async fn claim(
        &self,
        worker: &WorkerId,
        caps: &Capabilities,
        lease: Duration,
    ) -> Result<Option<Claimed>, QueueError> {
        if caps.kinds.as_ref().is_some_and(Vec::is_empty) {
            return Ok(None);
        }
        let declared = caps.tags.as_ref().map(json).transpose()?.unwrap_or_default();
        let mut args = vec![worker.0.clone(), lease.as_millis().to_string(), declared];
        args.extend(caps.kinds.iter().flatten().map(|k| k.as_str().to_owned()));
        let answer = self.write(Op::Claim, args).await?;
        claimed(&answer, worker)
    }

    async fn claim_wait(
        &self,
        worker: &WorkerId,
        caps: &Capabilities,
        lease: Duration,
        stop: &CancellationToken,
    ) -> Result<Option<Claimed>, QueueError> {
        park::claim_wait(self, worker, caps, lease, stop).await
    }

    async fn heartbeat(&self, lease: &Lease, ttl: Duration, progress: Progress<'_>) -> Result<LeaseStatus, QueueError> {
        let mut args = lease_args(lease);
        args.extend([
            ttl.as_millis().to_string(),
            opt(progress.backend),
            opt(progress.model),
            opt(progress.partial),
            opt(progress.remote.map(flag)),
        ]);
        let answer = self.write(Op::Heartbeat, args).await?;
        let status = match answer.code.as_str() {
            "held" => return Ok(LeaseStatus::Held),
            "cancelled" => LeaseStatus::Cancelled,
            "lost" => LeaseStatus::Lost,
            "notfound" => return Err(QueueError::NotFound(lease.task_id)),
            _ => return Err(unexpected(&answer)),
        };
        self.inner.shared.drop_claim(lease);
        Ok(status)
    }

    async fn complete(&self, lease: &Lease, done: Completion) -> Result<Task, QueueError> {
        let mut args = lease_args(lease);
        args.extend([
            done.result,
            done.backend,
            done.model,
            json(&done.usage)?,
            if done.warnings.is_empty() { String::new() } else { json(&done.warnings)? },
            flag(done.remote),
            opt(done.cost),
        ]);
        let answer = self.write(Op::Complete, args).await?;
        if answer.code != "ok" {
            return Err(lost_conflict(lease, &answer));
        }
        answer.task()
    }

    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<Task, QueueError> {
        let delay = self.inner.shared.cfg.retry.delay_with_hint(lease.attempt, failure.retry_after);
        let mut args = lease_args(lease);
        args.extend([
            failure.error,
            flag(failure.retryable),
            delay.as_millis().to_string(),
            opt(failure.backend),
            opt(failure.model),
            opt(failure.remote.map(flag)),
            opt(failure.partial),
        ]);
        let answer = self.write(Op::Fail, args).await?;
        if answer.code != "ok" {
            return Err(lost_conflict(lease, &answer));
        }
        answer.task()
    }

    async fn release(&self, lease: &Lease, why: Release) -> Result<(), QueueError> {
        let mut args = lease_args(lease);
        match why {
            Release::Stopping => args.extend([String::new(), String::new()]),
            Release::CannotServe { reason, wait } => args.extend([reason, wait.as_millis().to_string()]),
        }
        let answer = self.write(Op::Release, args).await?;
        if answer.code != "ok" {
            return Err(lost_conflict(lease, &answer));
        }
        Ok(())
    }

    async fn recover_node(&self, node: &str) -> Result<u64, QueueError> {
        let answer = self.write(Op::RecoverNode, vec![node.to_owned()]).await?;
        match answer.first().and_then(|n| n.parse().ok()) {
            Some(n) if answer.code == "ok" => Ok(n),
            _ => Err(unexpected(&answer)),
        }
    }

    async fn housekeep(&self) -> Result<(), QueueError> {
        let answer = self.write(Op::Housekeep, vec![]).await?;
        if answer.code != "ok" {
            return Err(unexpected(&answer));
        }
        Ok(())
    }
}

#[async_trait]
impl Parking for RedisQueue {
    fn wakeup(&self) -> &Notify {
        &self.inner.shared.wakeup
    }

    async fn next_due(&self) -> Result<Option<Millis>, QueueError> {
        self.due().await
    }
}

#[async_trait]
impl Outbox for RedisQueue {
    async fn claim_id(&self, id: TaskId, worker: &WorkerId, lease: Duration) -> Result<Option<Claimed>, QueueError> {
        let args = vec![id.to_string(), worker.0.clone(), lease.as_millis().to_string()];
        let answer = self.write(Op::ClaimId, args).await?;
        claimed(&answer, worker)
    }

    async fn undispatched(&self, limit: usize) -> Result<Vec<Undispatched>, QueueError> {
        let answer = self.write(Op::Outbox, vec![limit.max(1).to_string()]).await?;
        if answer.code != "ok" {
            return Err(unexpected(&answer));
        }
        let extra: Vec<String> = answer.extra.iter().map(|s| s.clone().unwrap_or_default()).collect();
        extra
            .chunks_exact(5)
            .map(|t| {
                let bad = |what: &str| QueueError::Corrupt(format!("outbox entry {}: bad {what}", t[0]));
                Ok(Undispatched {
                    id: t[0].parse().map_err(|_| bad("id"))?,
                    kind: TaskKind::parse(&t[1]).map_err(|_| bad("kind"))?,
                    priority: t[2]
                        .parse::<i64>()
                        .ok()
                        .and_then(|p| Priority::new(p).ok())
                        .ok_or_else(|| bad("priority"))?,
                    claims: t[3].parse().map_err(|_| bad("claim count"))?,
                    tags: serde_json::from_str(&t[4]).map_err(|_| bad("tags"))?,
                })
            })
            .collect()
    }

    async fn mark_dispatched(&self, marks: Vec<(TaskId, u64)>) -> Result<(), QueueError> {
        if marks.is_empty() {
            return Ok(());
        }
        let args = marks.into_iter().flat_map(|(id, claims)| [id.to_string(), claims.to_string()]).collect();
        let answer = self.write(Op::Mark, args).await?;
        if answer.code != "ok" {
            return Err(unexpected(&answer));
        }
        Ok(())
    }

    async fn redeliver(&self) -> Result<u64, QueueError> {
        let answer = self.write(Op::Redeliver, vec![]).await?;
        match answer.first().and_then(|n| n.parse().ok()) {
            Some(n) if answer.code == "ok" => Ok(n),
            _ => Err(unexpected(&answer)),
        }
    }

    async fn next_due(&self) -> Result<Option<Millis>, QueueError> {
        self.due().await
    }
}
