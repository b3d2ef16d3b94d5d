//! `Koubou`: the running system — queue, router, pool, bus and live state — behind [`Api`].

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures::StreamExt;
use koubou_backend::{Backend, BackendConfig, BackendTable, Health, Profile, Router, TypeRoute};
use koubou_queue::{Node, NodeLoad, QueueError, TaskQuery, TaskQueue};
use koubou_task::{Event, EventBus, EventKind, EventLog, TaskId, TaskKind, TaskStatus, now_millis};
use koubou_worker::{Pool, memory};
use parking_lot::Mutex;

use koubou_api::{
    Api, ApiError, BackendView, Busy, ClusterView, CooldownView, EventFeed, EventStream, HealthView, ListQuery,
    NodeBackendView, NodeView, NodesView, QueueView, Second, SubmitRequest, SubmitResponse, SystemInfo, SystemStatus,
    TaskList, TaskView, WorkerView, WorkersView,
};

use crate::{
    config::{Config, Home},
    live::Live,
};

/// Why the system could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("backend {name}: {detail}")]
    Backend { name: String, detail: String },
    #[error(transparent)]
    Route(#[from] koubou_backend::RouteError),
    #[error(
        "a worker node needs a queue shared with its controllers: set --queue redis://host:port/db (or \
         queue.url); SQLite is one machine's"
    )]
    NotShared,
    #[error(
        "a worker node needs the tasks kept where its controllers keep them: with RabbitMQ (--queue \
         amqp://…) give a Redis store, --store redis://host:port/db (or queue.store); the default, the \
         home's SQLite, is one machine's"
    )]
    NotSharedStore,
    #[error("{0}")]
    Capability(String),
}

/// How to start.
#[derive(Clone, Debug)]
pub struct StartOptions {
    /// Node name; workers are `<node>/<n>`. The node registers with the queue under it, taking
    /// over an earlier run's registration from this host; so only one process on a host may
    /// start a node of a given name at a time (`koubou serve` holds the node's lock for that;
    /// other commands name their node after their process). Running tasks of this node left by
    /// a previous run (crash, kill -9) are requeued at start.
    pub node: String,
    /// Run a worker pool (false for a system that only accepts and reports; `[pool]
    /// max_workers = 0` says the same).
    pub workers: bool,
    /// Refuse a queue other nodes cannot share (SQLite): a worker node's.
    pub shared_only: bool,
    /// Serve only these task kinds (a worker node's `--capabilities`): each must have a route
    /// (`[types.KIND]`, or the built-in `general` and `code`); the others are dropped, so the
    /// node claims none of them. `None`: every kind routed.
    pub kinds: Option<Vec<String>>,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions { node: "serve".into(), workers: true, shared_only: false, kinds: None }
    }
}

struct Inner {
    cfg: Config,
    home: std::path::PathBuf,
    db: std::path::PathBuf,
    /// RabbitMQ, when it hands the tasks out (`SystemInfo::dispatcher`).
    dispatcher: Option<String>,
    queue: Arc<dyn TaskQueue>,
    router: Arc<Router>,
    /// The event log every part publishes to and reads from (on a shared queue, it also relays
    /// what is published here to the other nodes).
    log: Arc<dyn EventLog>,
    /// The in-process bus behind `log`.
    bus: EventBus,
    node: String,
    pool: Option<Arc<Pool>>,
    /// The node registry of the queue's store.
    registry: Arc<dyn koubou_queue::Nodes>,
    membership: crate::node::Membership,
    live: Live,
    started: Instant,
    health: Mutex<HashMap<String, Health>>,
    stop_health: tokio_util::sync::CancellationToken,
}

/// The running system. Cheap to clone.
#[derive(Clone)]
pub struct Koubou {
    inner: Arc<Inner>,
}

/// Builds one configured backend. The embedded kind comes from `koubou-llama` when compiled in.
fn build_backend(name: &str, table: &BackendTable) -> Result<(Arc<dyn Backend>, Profile), StartError> {
    let profile = Profile { remote: table.is_remote(), prices: table.prices };
    Ok((build_provider(name, &table.provider)?, profile))
}

fn build_provider(name: &str, cfg: &BackendConfig) -> Result<Arc<dyn Backend>, StartError> {
    let err = |detail: String| StartError::Backend { name: name.to_owned(), detail };
    if let Some(b) = koubou_backend::build(name, cfg).map_err(|e| err(e.to_string()))? {
        return Ok(b);
    }
    match cfg {
        #[cfg(feature = "embedded")]
        BackendConfig::Embedded(e) => {
            let store = koubou_llama::ModelStore::from_env().map_err(|e| err(e.to_string()))?;
            let b = koubou_llama::EmbeddedBackend::new(name, e, &store).map_err(|e| err(e.to_string()))?;
            Ok(Arc::new(b))
        }
        other => Err(err(format!("the {} backend is not compiled into this koubou", other.kind()))),
    }
}

/// With no `[backends]` configured: Ollama when it answers, else the embedded model (when
/// compiled in), with the other as fallback. An Ollama that `OLLAMA_HOST` puts on another
/// machine is never chosen automatically (prompts would leave this machine without anyone
/// having said so): configure it, with `allow_remote`, to use it.
async fn default_backends() -> (BTreeMap<String, BackendTable>, &'static str, Option<&'static str>) {
    let mut backends = BTreeMap::new();
    let ollama_cfg = BackendConfig::Ollama(Default::default());
    let embedded = cfg!(feature = "embedded");
    if embedded {
        backends.insert("embedded".to_owned(), BackendConfig::Embedded(Default::default()).into());
        if ollama_cfg.remote_by_default() {
            tracing::warn!(
                url = %koubou_backend::ollama::resolve_url(None),
                "OLLAMA_HOST is another machine: not used automatically; configure [backends] with \
                 allow_remote = true in [types] to send tasks there"
            );
            return (backends, "embedded", None);
        }
    }
    let ollama = koubou_backend::build("ollama", &ollama_cfg).ok().flatten();
    backends.insert("ollama".to_owned(), ollama_cfg.into());
    let ollama_up = match ollama {
        Some(b) => tokio::time::timeout(Duration::from_secs(2), b.health()).await.is_ok_and(|h| h.up),
        None => false,
    };
    match (ollama_up, embedded) {
        (true, true) => (backends, "ollama", Some("embedded")),
        (false, true) => (backends, "embedded", Some("ollama")),
        _ => (backends, "ollama", None),
    }
}

/// How busy this node is: its workers running a task, and the most it runs (none without a pool).
fn load(pool: Option<&Pool>) -> NodeLoad {
    let Some(pool) = pool else { return NodeLoad::default() };
    let busy = pool.workers().iter().filter(|w| w.state == "busy").count();
    NodeLoad { busy: busy as u32, max_workers: pool.ceiling() as u32 }
}

impl Koubou {
    /// Opens the queue, builds backends and routes, starts the pool and the health checker.
    pub async fn start(mut cfg: Config, home: &Home, opts: StartOptions) -> Result<Koubou, StartError> {
        cfg.validate()?;
        let bus = EventBus::with_origin(&opts.node, 65_536);
        let local: Arc<dyn EventLog> = Arc::new(bus.clone());
        let live = Live::follow(&*local);
        let selection = cfg.queue.selected().map_err(crate::config::ConfigError::Invalid)?;
        if opts.shared_only && !selection.is_shared() {
            return Err(if selection.broker.is_some() { StartError::NotSharedStore } else { StartError::NotShared });
        }
        let opened = crate::queue::open(&cfg.queue, selection, home, local, &opts.node).await?;
        let (queue, log, registry, db, dispatcher) =
            (opened.queue, opened.log, opened.nodes, opened.place, opened.dispatcher);
        if cfg.backends.is_empty() {
            let (backends, primary, fallback) = default_backends().await;
            tracing::info!(primary, fallback, "no backends configured; chose automatically");
            cfg.backends = backends;
            for kind in [TaskKind::GENERAL, TaskKind::CODE] {
                cfg.types.entry(kind.to_owned()).or_insert_with(|| TypeRoute {
                    backend: primary.to_owned(),
                    fallback: fallback.map(str::to_owned).into_iter().collect(),
                    ..TypeRoute::default()
                });
            }
        }
        let first = cfg.backends.keys().next().cloned().unwrap_or_default();
        for kind in [TaskKind::GENERAL, TaskKind::CODE] {
            cfg.types
                .entry(kind.to_owned())
                .or_insert_with(|| TypeRoute { backend: first.clone(), ..TypeRoute::default() });
        }
        if let Some(kinds) = &opts.kinds {
            if let Some(k) = kinds.iter().find(|k| !cfg.types.contains_key(k.as_str())) {
                return Err(StartError::Capability(format!(
                    "the capabilities name {k:?}, which has no route here: add [types.{k}] to koubou.toml"
                )));
            }
            cfg.types.retain(|k, _| kinds.contains(k));
        }
        // Child processes (codex) never see the keys other backends read.
        koubou_backend::withhold_env(cfg.backends.values().filter_map(|b| b.provider.key_env().map(str::to_owned)));
        let backends = cfg.backends.iter().map(|(n, c)| build_backend(n, c)).collect::<Result<Vec<_>, _>>()?;
        let router = Arc::new(
            Router::with_profiles(backends, cfg.types.clone(), &cfg.pricing)?
                .with_max_output(cfg.limits.max_result_bytes),
        );
        // Registered before its tasks are recovered: from here on no other run of this node
        // can hold them.
        let caps = koubou_worker::worker::capabilities(&router, cfg.pool.tags.as_deref());
        let mut me = Node::this_process(&opts.node, env!("CARGO_PKG_VERSION"), caps);
        me.backends = crate::node::backends(&router);
        let ttl = Duration::from_secs(cfg.pool.node_ttl_secs.max(1));
        let membership = crate::node::Membership::join(registry.clone(), me, ttl).await?;
        let recovered = queue.recover_node(&opts.node).await?;
        if recovered > 0 {
            tracing::warn!(tasks = recovered, node = %opts.node, "requeued tasks left running by a previous run");
        }
        let workers = opts.workers && cfg.pool.max_workers > 0;
        let pool =
            workers.then(|| Pool::start(cfg.pool.clone(), &opts.node, queue.clone(), router.clone(), log.clone()));
        let counted = pool.clone();
        membership.keep(queue.clone(), move || load(counted.as_deref()));
        let k = Koubou {
            inner: Arc::new(Inner {
                cfg,
                home: home.dir.clone(),
                db,
                dispatcher,
                queue,
                router,
                log,
                bus,
                node: opts.node.clone(),
                pool,
                registry,
                membership,
                live,
                started: Instant::now(),
                health: Mutex::new(HashMap::new()),
                stop_health: Default::default(),
            }),
        };
        k.check_backends().await;
        let kk = k.clone();
        tokio::spawn(async move { kk.health_loop().await });
        Ok(k)
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }
    /// The home directory (`--home`, `KOUBOU_HOME`).
    pub fn home_dir(&self) -> &std::path::Path {
        &self.inner.home
    }
    /// The queue's database file (for Redis, its URL without the password).
    pub fn db_path(&self) -> &std::path::Path {
        &self.inner.db
    }
    /// The in-process bus behind the system's event log (tests publish on it and wait for its
    /// backlog to drain).
    pub fn bus(&self) -> &EventBus {
        &self.inner.bus
    }
    pub fn live(&self) -> &Live {
        &self.inner.live
    }
    pub fn router(&self) -> &Router {
        &self.inner.router
    }

    /// Checks every backend once (each within 5 s) and publishes changes.
    pub async fn check_backends(&self) {
        let checks = self.inner.router.backends().map(|b| {
            let b = b.clone();
            async move {
                let h = tokio::time::timeout(Duration::from_secs(5), b.health())
                    .await
                    .unwrap_or_else(|_| Health::down("health check timed out after 5 s"));
                (b.name().to_owned(), h)
            }
        });
        for (name, h) in futures::future::join_all(checks).await {
            let changed = self.inner.health.lock().insert(name.clone(), h.clone()).is_none_or(|old| old.up != h.up);
            if changed {
                self.inner.log.publish(EventKind::BackendHealth { backend: name, up: h.up, detail: h.detail });
            }
        }
    }

    async fn health_loop(&self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(15)) => self.check_backends().await,
                _ = self.inner.stop_health.cancelled() => return,
            }
        }
    }

    /// Stops the pool (finishing or handing back running tasks) and the health checker.
    pub async fn shutdown(&self, grace: Option<Duration>) {
        self.inner.stop_health.cancel();
        if let Some(p) = &self.inner.pool {
            p.shutdown(grace).await;
        }
        self.inner.membership.leave().await;
    }

    fn view(&self, t: koubou_task::Task) -> TaskView {
        let live = (t.status == TaskStatus::Running).then(|| self.inner.live.partial(t.id)).flatten();
        let mut v = TaskView::from_task(t);
        if let Some(p) = live.filter(|p| !p.is_empty()) {
            v.partial = Some(p);
        }
        v
    }

    /// Every registered node's workers: this node's as they are now, the others' as of their
    /// last heartbeat.
    async fn cluster(&self) -> Result<ClusterView, ApiError> {
        let now = now_millis();
        let mut cluster = ClusterView::default();
        for n in self.inner.registry.nodes().await.map_err(queue_error)? {
            if n.expires_at <= now {
                cluster.nodes_lost += 1;
                continue;
            }
            cluster.nodes_alive += 1;
            let load = if n.id == self.inner.node { load(self.inner.pool.as_deref()) } else { n.load };
            cluster.busy += load.busy;
            cluster.max_workers += load.max_workers;
        }
        Ok(cluster)
    }

    pub(crate) async fn counts(&self) -> Result<koubou_queue::StatusCounts, ApiError> {
        self.inner.queue.counts().await.map_err(queue_error)
    }

    pub(crate) fn pool(&self) -> Option<&Arc<Pool>> {
        self.inner.pool.as_ref()
    }

    pub(crate) fn backend_health(&self) -> HashMap<String, Health> {
        self.inner.health.lock().clone()
    }

    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }
}

pub(crate) fn queue_error(e: QueueError) -> ApiError {
    match e {
        QueueError::NotFound(id) => ApiError::NotFound(id.to_string()),
        QueueError::BadCursor(_) => ApiError::invalid("before", e.to_string()),
        QueueError::Conflict { .. } => ApiError::Conflict(e.to_string()),
        QueueError::Closed | QueueError::Sync(_) | QueueError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
        QueueError::Full { .. } => try_later(&e, Busy::QueueFull, FULL_RETRY_SECS, ""),
        QueueError::DiskFull(_) => {
            try_later(&e, Busy::DiskFull, 10, "free space on the disk holding the database, then ")
        }
        QueueError::Locked(_) => try_later(&e, Busy::Locked, 2, "another program holds the database; "),
        e => ApiError::Internal(e.to_string()),
    }
}

fn try_later(e: &QueueError, why: Busy, retry_after_secs: u64, hint: &str) -> ApiError {
    ApiError::TryLater { why, message: format!("{e}; {hint}try again in {retry_after_secs} s"), retry_after_secs }
}

/// `Retry-After` for a full queue when the recent throughput says nothing.
const FULL_RETRY_SECS: u64 = 5;

/// Seconds until `excess` waiting tasks have run at `per_sec`, as a `Retry-After` (1–60 s).
fn drain_secs(excess: u64, per_sec: f64) -> u64 {
    if per_sec > 0.0 { ((excess as f64 / per_sec).ceil() as u64).clamp(1, 60) } else { FULL_RETRY_SECS }
}

/// A synthetic event that tells a watcher how a finished task ended (never logged: `seq` 0).
/// The events about task `id` that `log` still keeps (its last [`koubou_task::KEPT`]), up to
/// and including `head`, in order.
fn kept_events(log: &dyn EventLog, head: u64, id: TaskId) -> Vec<Event> {
    use futures::FutureExt;
    let mut kept = log.subscribe(Some(0));
    let mut past = Vec::new();
    // The kept events come at once, ahead of the live ones (which may be pending: then the
    // backlog is over).
    while let Some(Some(next)) = kept.next().now_or_never() {
        match next {
            Ok(e) if e.seq > head => break,
            Ok(e) if e.kind.task_id() == Some(id) => past.push((*e).clone()),
            _ => {}
        }
    }
    past
}

fn final_event(t: &koubou_task::Task, origin: &str) -> Event {
    let kind = match t.status {
        TaskStatus::Completed => EventKind::TaskCompleted {
            task_id: t.id,
            usage: t.usage,
            latency_ms: t.latency_ms().unwrap_or_default(),
            result: t.result.clone().unwrap_or_default(),
        },
        TaskStatus::Cancelled => EventKind::TaskCancelled { task_id: t.id },
        _ => EventKind::TaskFailed {
            task_id: t.id,
            error: t.error.clone().unwrap_or_default(),
            retry_at: None,
            status: t.status,
        },
    };
    Event { seq: 0, origin: origin.into(), at: t.finished_at.unwrap_or_else(now_millis), kind }
}

#[async_trait]
impl Api for Koubou {
    async fn submit(&self, req: SubmitRequest) -> Result<SubmitResponse, ApiError> {
        let SubmitRequest { task, sync, wait_secs } = req;
        self.inner.cfg.limits.check(&task).map_err(ApiError::Invalid)?;
        self.inner.router.check(&task).map_err(|e| ApiError::invalid(e.field(), e.to_string()))?;
        let (kind, priority) = (task.kind.clone(), task.priority);
        let limit = self.inner.cfg.limits.max_pending;
        // A synchronous submission reveals the task only through the wait below, whose events
        // and final read come after the write is durable: it need not wait for the disk twice.
        let submitted = if sync {
            self.inner.queue.submit_then_watch(task, Some(limit)).await
        } else {
            self.inner.queue.submit_bounded(task, Some(limit)).await
        };
        let submitted = submitted.map_err(|e| match e {
            QueueError::Full { queued, limit } => {
                let secs = drain_secs(queued.saturating_sub(limit) + 1, self.inner.live.rates().0);
                try_later(&e, Busy::QueueFull, secs, "")
            }
            e => queue_error(e),
        })?;
        let id = submitted.task.id;
        if submitted.created {
            tracing::info!(task = %id, %kind, priority = priority.get(), sync, "task accepted");
        } else {
            tracing::info!(task = %id, "repeated submission: returned the earlier task");
        }
        let mut resp = SubmitResponse {
            task_id: id,
            status: koubou_api::DELEGATED.into(),
            task_status: submitted.task.status,
            created: submitted.created,
            task: None,
            result: None,
        };
        if sync {
            let bound = self.inner.cfg.server.sync_wait_secs;
            let wait = Duration::from_secs(wait_secs.unwrap_or(bound).min(bound));
            let v = self.wait(id, wait, &|_| {}).await?;
            resp.status = v.status.as_str().into();
            resp.task_status = v.status;
            resp.result = v.result.clone();
            resp.task = Some(v);
        }
        Ok(resp)
    }

    async fn task(&self, id: TaskId) -> Result<TaskView, ApiError> {
        let t =
            self.inner.queue.get(id).await.map_err(queue_error)?.ok_or_else(|| ApiError::NotFound(id.to_string()))?;
        let queued = t.status.is_queued();
        let mut v = self.view(t);
        if queued && let Some(p) = self.inner.queue.position(id).await.map_err(queue_error)? {
            v.queue_position = Some(p.ahead);
            let workers = self.inner.pool.as_ref().map_or(1, |p| p.ceiling()).max(1) as f64;
            v.estimated_start_secs =
                self.inner.live.mean_run_secs().map(|m| ((p.ahead as f64 / workers).ceil() * m * 10.0).round() / 10.0);
        }
        Ok(v)
    }

    async fn tasks(&self, q: ListQuery) -> Result<TaskList, ApiError> {
        let mut statuses = Vec::new();
        for s in q.status.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
            match s {
                "active" => statuses.extend([TaskStatus::Pending, TaskStatus::Retrying, TaskStatus::Running]),
                _ => statuses.push(TaskStatus::parse(s).ok_or_else(|| {
                    ApiError::invalid(
                        "status",
                        format!("unknown status {s:?}; use pending, running, retrying, completed, failed, cancelled or active"),
                    )
                })?),
            }
        }
        let kind = q.kind.as_deref().map(TaskKind::parse).transpose().map_err(|m| ApiError::invalid("type", m))?;
        let limit = q.limit.unwrap_or(50);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid("limit", format!("must be from 1 to 1000, got {limit}")));
        }
        let page = self
            .inner
            .queue
            .list(TaskQuery {
                statuses,
                kind,
                tag: q.tag.map(|t| t.trim().to_lowercase()),
                search: q.q,
                before: q.before,
                limit,
            })
            .await
            .map_err(queue_error)?;
        Ok(TaskList {
            tasks: page.tasks.into_iter().map(|t| self.view(t)).collect(),
            total: page.total,
            next_cursor: page.next_cursor,
        })
    }

    async fn cancel(&self, id: TaskId) -> Result<TaskView, ApiError> {
        self.inner.queue.cancel(id).await.map(TaskView::from_task).map_err(queue_error)
    }

    async fn workers(&self) -> Result<WorkersView, ApiError> {
        let cluster = self.cluster().await?;
        let Some(pool) = &self.inner.pool else {
            return Ok(WorkersView {
                cluster,
                active: 0,
                busy: 0,
                min_workers: 0,
                max_workers: 0,
                backend_capacity: 0,
                configured_max_workers: 0,
                warnings: vec![],
                workers: vec![],
            });
        };
        let workers: Vec<WorkerView> = pool
            .workers()
            .into_iter()
            .map(|w| WorkerView {
                worker_id: w.id.0,
                state: w.state.into(),
                status: w.state.into(),
                current_task: w.current,
                tasks_done: w.done,
                tasks_failed: w.failed,
                started_at: koubou_task::rfc3339(w.started_at),
                last_heartbeat: koubou_task::rfc3339(w.since),
            })
            .collect();
        Ok(WorkersView {
            active: workers.len(),
            busy: workers.iter().filter(|w| w.state == "busy").count(),
            min_workers: pool.config().min_workers,
            max_workers: pool.ceiling(),
            backend_capacity: pool.backend_capacity(),
            configured_max_workers: pool.config().max_workers,
            warnings: pool.warnings(),
            workers,
            cluster,
        })
    }

    async fn nodes(&self) -> Result<NodesView, ApiError> {
        let now = now_millis();
        let nodes = self.inner.registry.nodes().await.map_err(queue_error)?;
        let nodes = nodes
            .into_iter()
            .map(|n| {
                let lost = n.expires_at <= now;
                NodeView {
                    lost,
                    state: if lost { NodeView::LOST } else { NodeView::ALIVE }.to_owned(),
                    kinds: n.capabilities.kinds.map(|ks| ks.iter().map(|k| k.as_str().to_owned()).collect()),
                    tags: n.capabilities.tags,
                    backends: n
                        .backends
                        .into_iter()
                        .map(|b| NodeBackendView { name: b.name, kind: b.kind, models: b.models })
                        .collect(),
                    busy: n.load.busy,
                    max_workers: n.load.max_workers,
                    started_at: koubou_task::rfc3339(n.started_at),
                    last_seen: koubou_task::rfc3339(n.last_seen),
                    expires_at: koubou_task::rfc3339(n.expires_at),
                    id: n.id,
                    host: n.host,
                    pid: n.pid,
                    version: n.version,
                }
            })
            .collect();
        Ok(NodesView { nodes })
    }

    async fn health(&self) -> Result<HealthView, ApiError> {
        let c = self.counts().await?;
        let health = self.backend_health();
        let router = &self.inner.router;
        let backends: Vec<BackendView> = router
            .backends()
            .map(|b| {
                let h = health.get(b.name()).cloned().unwrap_or_else(|| Health::down("not checked yet"));
                BackendView {
                    name: b.name().to_owned(),
                    kind: b.kind().to_owned(),
                    remote: router.is_remote(b.name()),
                    prices: router.prices(b.name()).unwrap_or_default(),
                    served: router.reading(b.name()),
                    up: h.up,
                    detail: h.detail,
                    default_model: b.default_model().to_owned(),
                    capacity: b.capacity(),
                    models: h.models,
                    serves: router
                        .types()
                        .iter()
                        .filter(|(_, r)| r.backend == b.name())
                        .map(|(k, _)| k.clone())
                        .collect(),
                    cooldown: router
                        .cooldowns()
                        .get(b.name())
                        .map(|c| CooldownView { until: koubou_task::rfc3339(c.until), reason: c.reason }),
                }
            })
            .collect();
        let routes = router
            .types()
            .iter()
            .map(|(k, r)| {
                let model =
                    r.model.clone().or_else(|| router.backend(&r.backend).ok().map(|b| b.default_model().to_owned()));
                let fb = if r.fallback.is_empty() {
                    String::new()
                } else {
                    format!(" (fallback {})", r.fallback.join(", "))
                };
                let remote = if router.is_remote(&r.backend) { " [remote]" } else { "" };
                let conf = if r.confidential { " [confidential]" } else { "" };
                (k.clone(), format!("{}/{}{remote}{fb}{conf}", r.backend, model.unwrap_or_default()))
            })
            .collect();
        let served: Vec<&str> = router.types().values().map(|r| r.backend.as_str()).collect();
        let degraded = backends.iter().any(|b| !b.up && served.contains(&b.name.as_str()));
        Ok(HealthView {
            status: if degraded { koubou_api::DEGRADED } else { koubou_api::HEALTHY }.into(),
            server: "koubou".into(),
            timestamp: koubou_task::rfc3339(now_millis()),
            version: env!("CARGO_PKG_VERSION").into(),
            queue: QueueView {
                pending: c.pending,
                running: c.running,
                retrying: c.retrying,
                completed: c.completed,
                failed: c.failed,
                cancelled: c.cancelled,
            },
            workers: self.inner.pool.as_ref().map_or(0, |p| p.workers().len()),
            cluster: self.cluster().await?,
            backends,
            routes,
            spared: router.spared(),
        })
    }

    async fn status(&self) -> Result<SystemStatus, ApiError> {
        let c = self.counts().await?;
        let workers = self.inner.pool.as_ref().map(|p| p.workers()).unwrap_or_default();
        let (throughput, tokens) = self.inner.live.rates();
        Ok(SystemStatus {
            active_workers: workers.len(),
            busy_workers: workers.iter().filter(|w| w.state == "busy").count(),
            pending_tasks: c.pending + c.retrying,
            running_tasks: c.running,
            completed_tasks: c.completed,
            failed_tasks: c.failed,
            cancelled_tasks: c.cancelled,
            throughput_per_sec: throughput,
            tokens_per_sec: tokens,
            uptime_secs: self.uptime().as_secs(),
            rss_bytes: memory::rss_bytes().unwrap_or(0),
        })
    }

    async fn watch(&self, id: TaskId) -> Result<EventStream, ApiError> {
        // Register before reading: events are published only after they commit, so whatever
        // the read misses reaches the watcher, and whatever ended before it shows in the read.
        let rx = self.inner.live.watch_task(id);
        let t =
            self.inner.queue.get(id).await.map_err(queue_error)?.ok_or_else(|| ApiError::NotFound(id.to_string()))?;
        if t.status.is_terminal() {
            return Ok(Box::pin(futures::stream::iter([Ok(final_event(&t, &self.inner.node))])));
        }
        // What the log still keeps about the task comes first, so a watch opened after the
        // task began (a client that submits, then watches) misses none of its tokens; the live
        // events then start after the last one replayed (the watch was registered before
        // `head` was read, so an event may reach both: it is sent once).
        let head = self.inner.log.head();
        let past = kept_events(&*self.inner.log, head, id);
        let live = rx.filter(move |e| futures::future::ready(e.seq > head)).map(|e| (*e).clone());
        let events = futures::stream::iter(past)
            .chain(live)
            .filter(|e| futures::future::ready(!matches!(e.kind, EventKind::WorkerState { .. })))
            .map(Ok);
        Ok(Box::pin(events))
    }

    async fn events(&self, after: Option<u64>) -> Result<EventFeed, ApiError> {
        Ok(self.inner.log.subscribe(after))
    }

    async fn metrics_text(&self) -> Result<String, ApiError> {
        crate::metrics::render(self).await
    }

    async fn info(&self) -> Result<SystemInfo, ApiError> {
        Ok(SystemInfo {
            server_type: "koubou".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            koubou_home: self.inner.home.clone(),
            db_path: self.inner.db.clone(),
            dispatcher: self.inner.dispatcher.clone(),
            logs_dir: self.inner.home.join("logs"),
            timestamp: koubou_task::rfc3339(now_millis()),
        })
    }

    async fn history(&self, secs: usize) -> Result<Vec<Second>, ApiError> {
        Ok(self.inner.live.history(secs))
    }

    fn limits(&self) -> koubou_task::Limits {
        self.inner.cfg.limits
    }
}
