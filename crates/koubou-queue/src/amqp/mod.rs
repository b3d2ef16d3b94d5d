//! `AmqpDispatch`: RabbitMQ hands out the tasks; the store keeps them.
//!
//! The store (SQLite or Redis, anything with an [`Outbox`]) stays the record of every task and
//! the only place a claim is decided (fenced, with a lease). RabbitMQ carries task ids, in a
//! durable classic queue with `x-max-priority` 10 (RabbitMQ 3.x quorum queues have no
//! priority), so claims come in priority order across every node reading the queue.
//!
//! # How a task travels
//! - **submit**: the store commits the task; then its id is published — persistent, at the
//!   task's priority, mandatory — on a channel in confirm mode. Once the broker confirms, the
//!   store records the delivery ([`Outbox::mark_dispatched`]). A publish that fails or is
//!   never confirmed leaves the task in the outbox: `submit` still answers (the task is
//!   stored) and the sweep publishes it.
//! - **claim**: `basic.get` takes the most urgent delivery; the store's fenced
//!   [`Outbox::claim_id`] claims that task; only once it answered is the delivery acked —
//!   claimed, or no longer claimable (cancelled, finished, already running: a stale
//!   duplicate), which drops it — or, if the store failed, handed back. The delivery is never
//!   held while the task runs: AMQP can neither extend nor fence a delivery, and one left
//!   unacked past `consumer_timeout` (30 min) closes its whole channel. The lease in the store
//!   does that job. Each delivery carries the task's kind (`type`) and tags (a `tags` header):
//!   a claim by [`Capabilities`] looks through at most [`KIND_SCAN`] deliveries for a task the
//!   worker serves, handing the others back at their place.
//! - **sweep**: a background task publishes what the outbox holds — unconfirmed publishes,
//!   tasks requeued after a lease ran out or their node restarted, released tasks, retries whose
//!   backoff is over (their earlier delivery was used up by the claim) — at least every
//!   `sweep_ms`, when a retry or lease falls due ([`Outbox::next_due`]), and at once after a
//!   stopping worker's release. Tasks another
//!   node stored but never got confirmed are found the same way, so nothing accepted is
//!   stranded. A task can be published twice (two sweeps, a sweep beside a submit); the
//!   second delivery then finds the task claimed and is dropped.
//! - **parking**: [`Dispatch::claim_wait`] wakes for every confirmed publish here and, through a
//!   fanout exchange every dispatcher listens on, for those of other nodes.
//! - **broker down**: claims fail with [`QueueError::Unavailable`] (passing), submits still
//!   store; the link is made again in the background.

mod broker;
mod config;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use koubou_task::{Millis, NewTask, Task, TaskId, TaskStatus, WorkerId, now_millis};
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use self::broker::{Broker, Taken};
pub use self::config::{AmqpConfig, URL_ENV, redact_url};
use crate::{
    Capabilities, Claimed, Completion, Dispatch, Failure, Lease, LeaseStatus, Progress, QueueError, QueuePosition,
    Release, StatusCounts, Submitted, TaskPage, TaskQuery, TaskStore,
    outbox::{Outbox, Undispatched},
    park::{self, Parking},
};

/// Most deliveries a claim by capabilities looks through before it gives up.
pub const KIND_SCAN: usize = 64;
/// Tasks the sweep reads from the outbox and publishes at once.
const SWEEP_BATCH: usize = 256;
/// Batches one sweep publishes before it lets the others run.
const SWEEP_BATCHES: usize = 16;

/// RabbitMQ as the dispatcher over the store `S`. Cheap to clone; its background tasks stop
/// when the last clone is dropped.
pub struct AmqpDispatch<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for AmqpDispatch<S> {
    fn clone(&self) -> Self {
        AmqpDispatch { inner: self.inner.clone() }
    }
}

struct Inner<S> {
    store: Arc<S>,
    broker: Arc<Broker>,
    sweep: Arc<Sweep>,
    /// Tasks a submit here is publishing: the sweep leaves them alone.
    publishing: Publishing,
    cfg: AmqpConfig,
    _stop: DropGuard,
}

type Publishing = Arc<Mutex<HashSet<TaskId>>>;

/// A task in the publishing set until dropped (even if the submit is abandoned half-way).
struct InFlight<'a> {
    set: &'a Publishing,
    id: TaskId,
}

impl<'a> InFlight<'a> {
    fn new(set: &'a Publishing, id: TaskId) -> InFlight<'a> {
        set.lock().insert(id);
        InFlight { set, id }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.id);
    }
}

/// Asking the sweep to run, and hearing it has.
struct Sweep {
    kick: Notify,
    /// Runs asked for so far.
    requested: AtomicU64,
    /// The requests the last finished run covered.
    done: watch::Sender<u64>,
}

impl<S: Outbox> AmqpDispatch<S> {
    /// Connects to the broker (declaring the queue and the wake-up exchange), starts the
    /// keeper of the connection and the outbox sweep, whose first run publishes whatever the
    /// store holds undispatched.
    pub async fn open(store: Arc<S>, cfg: AmqpConfig) -> Result<AmqpDispatch<S>, QueueError> {
        let resolved = cfg.resolve()?;
        let shown = resolved.shown.clone();
        let (broker, consumers) = Broker::new(&cfg, resolved);
        let broker = Arc::new(broker);
        broker.link().await.map_err(|e| QueueError::Open { path: shown, detail: e.to_string() })?;
        let stop = CancellationToken::new();
        tokio::spawn(broker::keep(broker.clone(), consumers, stop.clone()));
        let publishing = Arc::new(Mutex::new(HashSet::new()));
        // What earlier runs left undispatched goes out before the first submit can race it.
        if let Err(e) = sweep_once(&*store, &broker, &publishing).await {
            tracing::warn!(error = %e, "the first outbox sweep failed; retrying in the background");
        }
        let sweep = Arc::new(Sweep { kick: Notify::new(), requested: AtomicU64::new(0), done: watch::Sender::new(0) });
        let period = Duration::from_millis(cfg.sweep_ms.max(10));
        tokio::spawn(sweep_loop(
            store.clone(),
            broker.clone(),
            sweep.clone(),
            publishing.clone(),
            period,
            stop.clone(),
        ));
        tokio::spawn(audit_loop(store.clone(), broker.clone(), sweep.clone(), period, stop.clone()));
        let inner = Inner { store, broker, sweep, publishing, cfg, _stop: stop.drop_guard() };
        Ok(AmqpDispatch { inner: Arc::new(inner) })
    }

    /// The store the tasks live in.
    pub fn store(&self) -> &Arc<S> {
        &self.inner.store
    }

    pub fn config(&self) -> &AmqpConfig {
        &self.inner.cfg
    }

    /// Runs the outbox sweep now and waits (up to the broker timeout) until it has run.
    pub async fn sweep_now(&self) {
        let sweep = &self.inner.sweep;
        let want = sweep.requested.fetch_add(1, Ordering::AcqRel) + 1;
        let mut done = sweep.done.subscribe();
        sweep.kick.notify_one();
        let timeout = Duration::from_millis(self.inner.cfg.timeout_ms.max(1)) * 2;
        let _ = tokio::time::timeout(timeout, done.wait_for(|d| *d >= want)).await;
    }

    /// Asks the sweep to run soon (and to look again at when the next thing falls due).
    fn kick_sweep(&self) {
        self.inner.sweep.kick.notify_one();
    }

    /// Publishes one task just stored and records its delivery; a failure leaves it to the sweep.
    async fn dispatch(&self, task: &Task) {
        let u = Undispatched {
            id: task.id,
            kind: task.kind.clone(),
            priority: task.priority,
            tags: task.tags.clone(),
            claims: 0,
        };
        let _mine = InFlight::new(&self.inner.publishing, task.id);
        let (confirmed, error) = self.inner.broker.publish(std::slice::from_ref(&u)).await;
        if let Err(e) = self.inner.store.mark_dispatched(confirmed).await {
            tracing::warn!(task = %task.id, error = %e, "could not record a delivery; the sweep publishes the task again");
        }
        if let Some(e) = error {
            tracing::warn!(task = %task.id, error = %e, "task stored but not published; the outbox sweep publishes it");
        }
    }
}

/// The sweep's loop (after the run `open` made): a run at every kick, every `period`, and when the store
/// says a retry or lease falls due; after a failure, again after a growing pause.
async fn sweep_loop<S: Outbox>(
    store: Arc<S>,
    broker: Arc<Broker>,
    sweep: Arc<Sweep>,
    publishing: Publishing,
    period: Duration,
    stop: CancellationToken,
) {
    let mut failing = Duration::ZERO;
    // `open` ran the first sweep.
    let mut ran = Ok(false);
    loop {
        let wait = match ran {
            Ok(more) => {
                if !failing.is_zero() {
                    tracing::info!("the outbox sweep publishes again");
                }
                failing = Duration::ZERO;
                let due = match store.next_due().await {
                    Ok(Some(at)) => Duration::from_millis((at - now_millis()).max(10) as u64),
                    _ => period,
                };
                if more { Duration::ZERO } else { period.min(due) }
            }
            Err(e) => {
                if failing.is_zero() {
                    tracing::warn!(error = %e, "the outbox sweep failed; retrying");
                }
                failing = (failing * 2).clamp(Duration::from_millis(200), period.max(Duration::from_millis(200)));
                failing
            }
        };
        tokio::select! {
            _ = sweep.kick.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        let covers = sweep.requested.load(Ordering::Acquire);
        ran = tokio::select! {
            r = sweep_once(&*store, &broker, &publishing) => r,
            _ = stop.cancelled() => return,
        };
        sweep.done.send_replace(covers);
    }
}

/// Finds deliveries the broker lost (its queue purged or deleted, its disk lost), which the
/// outbox counts as delivered: every `period`, the broker's queue depth and the store's
/// pending tasks. When the queue has held nothing ready at two looks in a row while tasks were
/// pending at both, those tasks have no delivery left but the ones being claimed right then:
/// every pending task goes back in the outbox and the sweep publishes it again. The few that
/// were only being claimed get a second delivery, which finds them running and is dropped.
async fn audit_loop<S: Outbox>(
    store: Arc<S>,
    broker: Arc<Broker>,
    sweep: Arc<Sweep>,
    period: Duration,
    stop: CancellationToken,
) {
    let mut empty_before = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.cancelled() => return,
        }
        let looked = async {
            let pending = store.counts().await?.pending;
            let depth = broker.depth().await?;
            Ok::<_, QueueError>(pending > 0 && depth == 0)
        };
        let empty = match looked.await {
            Ok(empty) => empty,
            Err(e) => {
                tracing::debug!(error = %e, "the delivery audit could not look; it looks again later");
                false
            }
        };
        if empty && empty_before {
            match store.redeliver().await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(
                        tasks = n,
                        "the broker holds no delivery for pending tasks it had confirmed (its queue purged, deleted \
                         or lost?): publishing them again"
                    );
                    sweep.kick.notify_one();
                }
                Err(e) => tracing::warn!(error = %e, "could not put pending tasks back in the outbox"),
            }
        }
        empty_before = empty;
    }
}

/// Publishes what the outbox holds, batch by batch; true when it stopped with more left.
async fn sweep_once<S: Outbox>(store: &S, broker: &Broker, publishing: &Publishing) -> Result<bool, QueueError> {
    for _ in 0..SWEEP_BATCHES {
        let mut batch = store.undispatched(SWEEP_BATCH).await?;
        let full = batch.len() == SWEEP_BATCH;
        {
            let publishing = publishing.lock();
            batch.retain(|u| !publishing.contains(&u.id));
        }
        if !batch.is_empty() {
            let (confirmed, error) = broker.publish(&batch).await;
            store.mark_dispatched(confirmed).await?;
            if let Some(e) = error {
                return Err(e);
            }
        }
        if !full {
            return Ok(false);
        }
    }
    Ok(true)
}

#[async_trait]
impl<S: Outbox> TaskStore for AmqpDispatch<S> {
    async fn submit_bounded(&self, new: NewTask, max_queued: Option<u64>) -> Result<Submitted, QueueError> {
        let submitted = self.inner.store.submit_bounded(new, max_queued).await?;
        if submitted.created {
            self.dispatch(&submitted.task).await;
        }
        Ok(submitted)
    }

    async fn get(&self, id: TaskId) -> Result<Option<Task>, QueueError> {
        self.inner.store.get(id).await
    }

    async fn list(&self, query: TaskQuery) -> Result<TaskPage, QueueError> {
        self.inner.store.list(query).await
    }

    async fn counts(&self) -> Result<StatusCounts, QueueError> {
        self.inner.store.counts().await
    }

    async fn position(&self, id: TaskId) -> Result<Option<QueuePosition>, QueueError> {
        self.inner.store.position(id).await
    }

    async fn cancel(&self, id: TaskId) -> Result<Task, QueueError> {
        // A queued task's delivery is dropped when a claim meets it.
        self.inner.store.cancel(id).await
    }
}

#[async_trait]
impl<S: Outbox> Dispatch for AmqpDispatch<S> {
    async fn claim(
        &self,
        worker: &WorkerId,
        caps: &Capabilities,
        lease: Duration,
    ) -> Result<Option<Claimed>, QueueError> {
        if caps.kinds.as_ref().is_some_and(Vec::is_empty) {
            return Ok(None);
        }
        let broker = &self.inner.broker;
        let mut passed_over: Vec<Taken> = Vec::new();
        let result = loop {
            let taken = match broker.get().await {
                Ok(Some(t)) => t,
                Ok(None) => break Ok(None),
                Err(e) => break Err(e),
            };
            let Some(broker::Named { id, kind, tags }) = taken.task() else {
                tracing::warn!(data = ?taken.data(), "dropped a delivery that names no task");
                broker.ack(taken).await;
                continue;
            };
            if !caps.serves_kind_and_tags(kind, tags.as_deref()) {
                passed_over.push(taken);
                if passed_over.len() >= KIND_SCAN {
                    break Ok(None);
                }
                continue;
            }
            match self.inner.store.claim_id(id, worker, lease).await {
                Ok(Some(claimed)) => {
                    broker.ack(taken).await;
                    break Ok(Some(claimed));
                }
                Ok(None) => broker.ack(taken).await, // not claimable: a stale or cancelled task's delivery
                Err(e) => {
                    broker.requeue(taken).await;
                    break Err(e);
                }
            }
        };
        for taken in passed_over {
            broker.requeue(taken).await;
        }
        if matches!(result, Ok(None)) && self.inner.store.next_due().await?.is_some_and(|due| due <= now_millis()) {
            // Something fell due that no delivery covers yet: the sweep publishes it and the
            // publish wakes the parked workers.
            self.kick_sweep();
        }
        result
    }

    async fn heartbeat(&self, lease: &Lease, ttl: Duration, progress: Progress<'_>) -> Result<LeaseStatus, QueueError> {
        self.inner.store.heartbeat(lease, ttl, progress).await
    }

    async fn complete(&self, lease: &Lease, done: Completion) -> Result<Task, QueueError> {
        self.inner.store.complete(lease, done).await
    }

    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<Task, QueueError> {
        let task = self.inner.store.fail(lease, failure).await?;
        if task.status == TaskStatus::Retrying {
            self.kick_sweep(); // to wake when the backoff is over
        }
        Ok(task)
    }

    async fn release(&self, lease: &Lease, why: Release) -> Result<(), QueueError> {
        let stopping = why == Release::Stopping;
        self.inner.store.release(lease, why).await?;
        if stopping {
            self.sweep_now().await; // claimable at once: published before the answer
        } else {
            self.kick_sweep(); // to publish it when its wait is over
        }
        Ok(())
    }

    async fn recover_node(&self, node: &str) -> Result<u64, QueueError> {
        let n = self.inner.store.recover_node(node).await?;
        if n > 0 {
            self.sweep_now().await;
        }
        Ok(n)
    }

    async fn housekeep(&self) -> Result<(), QueueError> {
        self.inner.store.housekeep().await?;
        self.kick_sweep(); // to publish what it made claimable
        Ok(())
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
}

/// Parked workers wake on confirmed publishes (this node's and, through the wake-up exchange,
/// other nodes'), and when the store says something falls due.
#[async_trait]
impl<S: Outbox> Parking for AmqpDispatch<S> {
    fn wakeup(&self) -> &Notify {
        &self.inner.broker.wakeup
    }

    async fn next_due(&self) -> Result<Option<Millis>, QueueError> {
        self.inner.store.next_due().await
    }
}
