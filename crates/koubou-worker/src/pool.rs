//! The pool: between `min_workers` and `max_workers` workers, scaled by queue depth.
//!
//! The scaler wakes on queue events from the bus (and on a slow tick that only decides
//! scale-downs). It scales up to `busy + pending` workers, capped by `max_workers` and by what
//! the backends can serve at once, at most once per `cooldown`, and not at all while free
//! memory is under `min_free_memory_mb`. It scales down one idle worker per cooldown once the
//! queue has been empty for `idle_secs`.

use std::{collections::HashMap, sync::Arc, time::Duration};

use koubou_backend::Router;
use koubou_queue::TaskQueue;
use koubou_task::{EventBus, EventKind, WorkerId};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::{sync::Semaphore, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    memory,
    worker::{self, Shared, Snapshot, Stop, WorkerState},
};

/// `[pool]` in config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    pub min_workers: usize,
    pub max_workers: usize,
    /// Least time between two scaling steps, in milliseconds.
    pub cooldown_ms: u64,
    /// How long the queue must be empty before an idle worker is let go, in seconds.
    pub idle_secs: u64,
    /// No scaling up while `MemAvailable` is below this, in MiB.
    pub min_free_memory_mb: u64,
    /// Lease on a claimed task, in seconds; heartbeats renew it every third of it.
    pub lease_secs: u64,
    /// On shutdown, how long running tasks may take to finish before they are handed back.
    pub shutdown_grace_secs: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_workers: 1,
            max_workers: 8,
            cooldown_ms: 2_000,
            idle_secs: 30,
            min_free_memory_mb: 512,
            lease_secs: 30,
            shutdown_grace_secs: 30,
        }
    }
}

/// One worker as the pool reports it.
pub type WorkerInfo = Snapshot;

struct Member {
    state: Arc<WorkerState>,
    stop: Stop,
    handle: JoinHandle<()>,
}

/// A running pool of workers.
pub struct Pool {
    cfg: PoolConfig,
    shared: Arc<Shared>,
    node: String,
    members: Mutex<Vec<Member>>,
    next_n: Mutex<usize>,
    capacity: usize,
    stop_scaler: CancellationToken,
    scaler: Mutex<Option<JoinHandle<()>>>,
}

impl Pool {
    /// Starts `min_workers` workers named `<node>/<n>` and the scaler.
    pub fn start(
        cfg: PoolConfig,
        node: &str,
        queue: Arc<dyn TaskQueue>,
        router: Arc<Router>,
        bus: EventBus,
    ) -> Arc<Pool> {
        let permits: HashMap<String, Arc<Semaphore>> =
            router.backends().map(|b| (b.name().to_owned(), Arc::new(Semaphore::new(b.capacity().max(1))))).collect();
        // Only backends that some task type reaches count towards what the pool can keep busy.
        let reached: std::collections::BTreeSet<&str> = router
            .types()
            .values()
            .flat_map(|r| std::iter::once(r.backend.as_str()).chain(r.fallback.as_deref()))
            .collect();
        let capacity: usize =
            router.backends().filter(|b| reached.contains(b.name())).map(|b| b.capacity().max(1)).sum::<usize>().max(1);
        let shared =
            Arc::new(Shared { queue, router, bus, lease: Duration::from_secs(cfg.lease_secs.max(1)), permits });
        let pool = Arc::new(Pool {
            cfg,
            shared,
            node: node.to_owned(),
            members: Mutex::new(Vec::new()),
            next_n: Mutex::new(1),
            capacity,
            stop_scaler: CancellationToken::new(),
            scaler: Mutex::new(None),
        });
        let min = pool.ceiling().min(pool.cfg.min_workers.max(1));
        pool.grow(min, "minimum");
        let p = pool.clone();
        *pool.scaler.lock() = Some(tokio::spawn(async move { p.scale_loop().await }));
        pool
    }

    /// The most workers this pool will run: `max_workers`, capped by backend capacity.
    pub fn ceiling(&self) -> usize {
        self.cfg.max_workers.max(1).min(self.capacity)
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    pub fn backend_capacity(&self) -> usize {
        self.capacity
    }

    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.members.lock().iter().map(|m| m.state.snapshot()).collect()
    }

    fn grow(&self, n: usize, reason: &str) {
        if n == 0 {
            return;
        }
        let mut members = self.members.lock();
        let before = members.len();
        for _ in 0..n {
            let id = {
                let mut next = self.next_n.lock();
                *next += 1;
                WorkerId::new(&self.node, *next - 1)
            };
            let state = Arc::new(WorkerState::new(id));
            let stop = Stop::default();
            let handle = tokio::spawn(worker::run(self.shared.clone(), state.clone(), stop.clone()));
            members.push(Member { state, stop, handle });
        }
        let after = members.len();
        drop(members);
        tracing::info!(workers = after, previous = before, reason, "pool scaled up");
        self.shared.bus.publish(EventKind::WorkerScaled { workers: after, previous: before, reason: reason.into() });
    }

    /// Stops one idle worker (the newest), if any.
    fn shrink_one(&self, reason: &str) -> bool {
        let mut members = self.members.lock();
        if members.len() <= self.cfg.min_workers.max(1) {
            return false;
        }
        let Some(i) = members.iter().rposition(|m| m.state.snapshot().state == "idle") else { return false };
        let m = members.remove(i);
        m.stop.stop.cancel();
        let (before, after) = (members.len() + 1, members.len());
        drop(members);
        tracing::info!(workers = after, previous = before, reason, "pool scaled down");
        self.shared.bus.publish(EventKind::WorkerScaled { workers: after, previous: before, reason: reason.into() });
        true
    }

    async fn scale_loop(self: Arc<Self>) {
        let mut events = self.shared.bus.subscribe();
        let cooldown = Duration::from_millis(self.cfg.cooldown_ms);
        let mut last_step = Instant::now() - cooldown;
        let mut empty_since: Option<Instant> = None;
        let mut tick = tokio::time::interval(cooldown.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop_scaler.cancelled() => return,
                e = events.recv() => match e {
                    Ok(e) if matches!(e.kind, EventKind::TaskCreated { .. } | EventKind::TaskRequeued { .. }) => {}
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                },
                _ = tick.tick() => {}
            }
            if last_step.elapsed() < cooldown {
                // Decide again when the cooldown ends (the tick does that).
                continue;
            }
            let counts = match self.shared.queue.counts().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "scaler could not read the queue");
                    continue;
                }
            };
            let current = self.members.lock().len();
            let busy = self.workers().iter().filter(|w| w.state == "busy").count();
            let want = (busy as u64 + counts.pending).min(self.ceiling() as u64) as usize;
            if counts.pending > 0 {
                empty_since = None;
            } else if empty_since.is_none() {
                empty_since = Some(Instant::now());
            }
            if want > current {
                let floor = self.cfg.min_free_memory_mb * 1024 * 1024;
                match memory::available_bytes() {
                    Some(free) if free < floor => {
                        tracing::warn!(
                            free_mb = free >> 20,
                            floor_mb = self.cfg.min_free_memory_mb,
                            "not scaling up: memory is short"
                        );
                        continue;
                    }
                    _ => {}
                }
                self.grow(want - current, &format!("{} tasks pending", counts.pending));
                last_step = Instant::now();
            } else if empty_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(self.cfg.idle_secs))
                && self.shrink_one("queue idle")
            {
                last_step = Instant::now();
            }
        }
    }

    /// Stops claiming, lets running tasks finish within the grace period, then cuts the rest
    /// short and hands them back to the queue.
    pub async fn shutdown(&self, grace: Option<Duration>) {
        self.stop_scaler.cancel();
        if let Some(h) = self.scaler.lock().take() {
            h.abort();
        }
        let members: Vec<Member> = std::mem::take(&mut *self.members.lock());
        for m in &members {
            m.stop.stop.cancel();
        }
        let grace = grace.unwrap_or(Duration::from_secs(self.cfg.shutdown_grace_secs));
        let deadline = Instant::now() + grace;
        for m in members {
            let mut handle = m.handle;
            tokio::select! {
                _ = &mut handle => {}
                _ = tokio::time::sleep_until(deadline) => {
                    m.stop.abort.cancel();
                    let _ = handle.await;
                }
            }
        }
    }
}
