//! One worker: claim → plan → run (streaming) → complete / fail, with heartbeats.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use koubou_backend::{BackendError, Router};
use koubou_queue::{Capabilities, Claimed, Completion, Dispatch, Failure, LeaseStatus, Progress, QueueError, Release};
use koubou_task::{EventKind, EventLog, TaskId, TaskKind, WorkerId, now_millis};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What every worker of a pool shares.
pub struct Shared {
    pub queue: Arc<dyn Dispatch>,
    pub router: Arc<Router>,
    pub bus: Arc<dyn EventLog>,
    /// Lease length; heartbeats renew it at a third of it.
    pub lease: Duration,
    /// One permit per generation a backend serves at once, by backend name.
    pub permits: HashMap<String, Arc<Semaphore>>,
    /// What these workers claim: the kinds their router routes, the tags their node declares.
    pub caps: Capabilities,
}

/// What a worker with `router` can serve: the task kinds it routes; with `tags`, only tasks
/// whose every tag is among them.
pub fn capabilities(router: &Router, tags: Option<&[String]>) -> Capabilities {
    Capabilities {
        kinds: Some(router.types().keys().filter_map(|k| TaskKind::parse(k).ok()).collect()),
        tags: tags.map(|ts| ts.iter().map(|t| t.trim().to_lowercase()).collect()),
    }
}

/// How long a task this worker's router cannot route waits before any worker may claim it
/// again: another node may route it; this one should not claim it over and over.
pub const CANNOT_SERVE_WAIT: Duration = Duration::from_secs(30);

/// A worker's state as shown by `/workers/status`.
#[derive(Debug)]
pub struct WorkerState {
    pub id: WorkerId,
    pub started_at: i64,
    inner: Mutex<StateInner>,
}

#[derive(Debug, Clone)]
struct StateInner {
    state: &'static str,
    /// When `state` last changed.
    since: Instant,
    /// The same moment, in ms since the epoch (for views).
    since_ms: i64,
    current: Option<TaskId>,
    done: u64,
    failed: u64,
}

/// A snapshot of one worker.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: WorkerId,
    pub state: &'static str,
    pub current: Option<TaskId>,
    pub done: u64,
    pub failed: u64,
    pub started_at: i64,
    /// How long the worker has been idle (`None` unless it is).
    pub idle_for: Option<Duration>,
    /// When the state last changed (ms since the epoch).
    pub since: i64,
}

impl WorkerState {
    pub fn new(id: WorkerId) -> Self {
        let started_at = now_millis();
        WorkerState {
            id,
            started_at,
            inner: Mutex::new(StateInner {
                state: "idle",
                since: Instant::now(),
                since_ms: started_at,
                current: None,
                done: 0,
                failed: 0,
            }),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let i = self.inner.lock().clone();
        Snapshot {
            id: self.id.clone(),
            state: i.state,
            current: i.current,
            done: i.done,
            failed: i.failed,
            started_at: self.started_at,
            idle_for: (i.state == "idle").then(|| i.since.elapsed()),
            since: i.since_ms,
        }
    }

    fn set(&self, bus: &dyn EventLog, state: &'static str, current: Option<TaskId>) {
        {
            let mut i = self.inner.lock();
            i.state = state;
            i.since = Instant::now();
            i.since_ms = now_millis();
            i.current = current;
        }
        bus.publish(EventKind::WorkerState { worker_id: self.id.clone(), state: state.into(), task_id: current });
    }
}

/// Tokens to stop a worker: `stop` ends claiming (it finishes its task), `abort` also cuts the
/// running task short and gives it back to the queue.
#[derive(Clone, Default)]
pub struct Stop {
    pub stop: CancellationToken,
    pub abort: CancellationToken,
}

/// A task's final write, left for the worker to send together with its next claim.
type Deferred<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Runs one worker until it is stopped.
pub async fn run(shared: Arc<Shared>, state: Arc<WorkerState>, stop: Stop) {
    tracing::info!(worker = %state.id, "worker started");
    let mut last_write: Option<Deferred<'_>> = None;
    loop {
        // The last task's outcome and the next claim reach the writer together, so they share
        // one commit (one fsync with durability = "full") instead of waiting for two in a row.
        let claim = shared.queue.claim_wait(&state.id, &shared.caps, shared.lease, &stop.stop);
        let claimed = match last_write.take() {
            Some(write) => tokio::join!(write, claim).1,
            None => claim.await,
        };
        let claimed = match claimed {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(QueueError::Closed) => break,
            Err(e) => {
                tracing::error!(worker = %state.id, error = %e, "claim failed; retrying in 1 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.stop.cancelled() => break,
                }
            }
        };
        state.set(&*shared.bus, "busy", Some(claimed.task.id));
        // Every log line about this task carries the worker and task ids (JSON log fields).
        let span = tracing::info_span!("task", worker = %state.id, task = %claimed.task.id, kind = %claimed.task.kind);
        let (ok, write) = process(&shared, claimed, &stop.abort).instrument(span).await;
        last_write = write;
        {
            let mut i = state.inner.lock();
            if ok { i.done += 1 } else { i.failed += 1 }
        }
        state.set(&*shared.bus, "idle", None);
    }
    if let Some(write) = last_write {
        write.await;
    }
    state.set(&*shared.bus, "stopped", None);
    tracing::info!(worker = %state.id, "worker stopped");
}

/// Runs one claimed task to its end. True when it completed; the write that records a
/// backend's outcome is returned, not awaited (the caller sends it with its next claim).
async fn process<'a>(shared: &'a Shared, claimed: Claimed, abort: &CancellationToken) -> (bool, Option<Deferred<'a>>) {
    let Claimed { task, lease, cancel } = claimed;
    let id = task.id;
    tracing::info!(attempt = lease.attempt, priority = task.priority.get(), "task claimed");
    let began = std::time::Instant::now();
    let plan = match shared.router.plan(&task) {
        Ok(p) => p,
        Err(e) if !e.is_the_tasks() => {
            // Another node (or this one, configured otherwise) may route it: hand it back.
            tracing::warn!(error = %e, "cannot route the task here; released for another worker");
            let why = Release::CannotServe { reason: format!("not routable here: {e}"), wait: CANNOT_SERVE_WAIT };
            log_write(id, shared.queue.release(&lease, why).await);
            return (false, None);
        }
        Err(e) => {
            let f = Failure {
                error: e.to_string(),
                retryable: false,
                backend: None,
                model: None,
                remote: None,
                partial: None,
                retry_after: None,
            };
            log_write(id, shared.queue.fail(&lease, f).await.map(|_| ()));
            return (false, None);
        }
    };
    let backend = plan.first().backend.name().to_owned();
    let model = plan.first().model.clone();
    let remote = plan.first().remote;
    let partial = Arc::new(Mutex::new(String::new()));
    let sink = {
        let (partial, bus) = (partial.clone(), shared.bus.clone());
        move |text: &str| {
            partial.lock().push_str(text);
            bus.publish(EventKind::TaskToken { task_id: id, text: text.to_owned() });
        }
    };
    let run_cancel = cancel.child_token();
    // The lease is renewed from the claim on, the wait for the backend's permit included: a task
    // queued behind a busy backend must not pass for one whose worker stopped answering.
    //
    // The worker also keeps its own count of the lease: once it has run out without a renewal
    // (the queue unreachable, this process stopped or cut off), the queue may have given the
    // task to another worker, so this attempt stops, and two attempts of one task never run at
    // the same time. The count starts when the claim answered and, after each renewal, when that
    // renewal was asked; `margin` covers the time the claim's answer took to arrive.
    let heartbeat = async {
        let every = shared.lease / 3;
        let margin = (shared.lease / 10).max(Duration::from_millis(100)).min(shared.lease / 2);
        let mut held_until = tokio::time::Instant::now() + shared.lease;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = abort.cancelled() => { run_cancel.cancel(); std::future::pending::<()>().await; }
            }
            let text = partial.lock().clone();
            let progress =
                Progress { backend: Some(&backend), model: Some(&model), remote: Some(remote), partial: Some(&text) };
            let asked = tokio::time::Instant::now();
            let renewal = shared.queue.heartbeat(&lease, shared.lease, progress);
            match tokio::time::timeout_at(held_until - margin, renewal).await {
                Ok(Ok(LeaseStatus::Held)) => held_until = asked + shared.lease,
                Ok(Ok(LeaseStatus::Cancelled)) => run_cancel.cancel(),
                Ok(Ok(LeaseStatus::Lost)) => {
                    tracing::warn!(task = %id, "the lease was lost: the task is another worker's now; stopping this attempt");
                    run_cancel.cancel();
                }
                Ok(Err(e)) if tokio::time::Instant::now() + every < held_until - margin => {
                    tracing::warn!(task = %id, error = %e, "heartbeat failed; retrying while the lease holds")
                }
                Ok(Err(_)) | Err(_) => {
                    tracing::warn!(task = %id, "the lease ran out before it could be renewed; stopping this attempt");
                    run_cancel.cancel();
                }
            }
            if run_cancel.is_cancelled() {
                std::future::pending::<()>().await;
            }
        }
    };
    let work = async {
        // Wait for a free slot on the backend; a cancel, an abort or a lost lease ends the wait.
        let permit = match shared.permits.get(&backend) {
            Some(sem) => tokio::select! {
                p = sem.clone().acquire_owned() => p.ok(),
                _ = run_cancel.cancelled() => return Err(BackendError::Cancelled),
            },
            None => None,
        };
        tracing::debug!(backend = %backend, model = %model, attempt = lease.attempt, "task started");
        shared.bus.publish(EventKind::TaskStarted {
            task_id: id,
            worker_id: lease.worker_id.clone(),
            backend: backend.clone(),
            model: model.clone(),
        });
        let result = plan.run(&task, &sink, &run_cancel).await;
        drop(permit);
        result
    };
    let result = tokio::select! {
        r = work => r,
        _ = heartbeat => unreachable!("the heartbeat loop never ends"),
    };
    let partial = std::mem::take(&mut *partial.lock());
    match result {
        Ok(served) => {
            let done = Completion {
                result: served.generation.text,
                backend: served.backend,
                model: served.model,
                usage: served.generation.usage,
                warnings: served.generation.warnings,
                remote: served.remote,
                cost: served.cost,
            };
            tracing::info!(
                ms = began.elapsed().as_millis() as u64,
                tokens = done.usage.completion_tokens,
                "task completed"
            );
            let write = async move {
                let r = outlast_transient(shared, || shared.queue.complete(&lease, done.clone())).await;
                log_write(id, r.map(|_| ()));
            };
            (true, Some(Box::pin(write)))
        }
        Err(BackendError::Cancelled) => {
            if abort.is_cancelled() && !cancel.is_cancelled() {
                log_write(id, shared.queue.release(&lease, Release::Stopping).await);
            }
            (false, None)
        }
        Err(e) => {
            tracing::warn!(task = %id, backend = %backend, error = %e, "attempt failed");
            // The backend the chain ended on, which may be a fallback of the first.
            let (backend, model, remote) = match e.backend().filter(|b| *b != backend) {
                Some(other) => (other.to_owned(), None, shared.router.is_remote(other)),
                None => (backend, Some(model), remote),
            };
            let f = Failure {
                error: e.to_string(),
                retryable: e.is_retryable(),
                backend: Some(backend),
                model,
                remote: Some(remote),
                partial: (!partial.is_empty()).then_some(partial),
                retry_after: e.retry_after(),
            };
            let write = async move {
                let r = outlast_transient(shared, || shared.queue.fail(&lease, f.clone())).await;
                log_write(id, r.map(|_| ()));
            };
            (false, Some(Box::pin(write)))
        }
    }
}

/// Retries a task's final write while the queue reports a passing condition (a full disk, a
/// lock held by another process), for as long as the lease would still hold: a finished answer
/// is kept rather than dropped and the task run again.
async fn outlast_transient<T, F, Fut>(shared: &Shared, mut write: F) -> Result<T, QueueError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let give_up = tokio::time::Instant::now() + shared.lease;
    let mut pause = Duration::from_millis(100);
    loop {
        match write().await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() + pause < give_up => {
                tracing::warn!(error = %e, retry_in = ?pause, "cannot record the outcome yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// A worker's final write can lose a race with a cancel or a lease expiry: that is expected and
/// only logged.
fn log_write(id: TaskId, r: Result<(), QueueError>) {
    match r {
        Ok(()) => {}
        Err(QueueError::Conflict { status, .. }) => {
            tracing::info!(task = %id, %status, "task changed under its worker")
        }
        Err(e) => tracing::error!(task = %id, error = %e, "could not record the task's outcome"),
    }
}
