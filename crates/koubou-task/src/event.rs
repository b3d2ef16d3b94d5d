//! The event log: one stream of what happens, read by every face.
//!
//! Producers: the queue (created, claimed, finished, requeued), the worker (tokens), the pool
//! (scaling) and the backend health checker. Consumers: WebSocket, GraphQL subscriptions, the
//! dashboard, MCP progress, metrics, `submit --wait`, per-task watchers. Nobody polls the
//! database to learn what changed.
//!
//! [`EventLog`] is what they all hold: every event is numbered (`seq`) by the log that carries it
//! and names the node that published it (`origin`), so a reader can resume after the last event
//! it saw. [`EventBus`] is the in-process log; a log shared by several nodes (a Redis stream)
//! would be another implementation of the same trait.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use futures::{StreamExt, stream::BoxStream};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{Millis, Priority, TaskId, TaskKind, TaskStatus, Usage, WorkerId, now_millis};

/// One thing that happened: where it stands in the log, who published it, and when.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Its number in the log that carried it, from 1, strictly increasing; 0 for an event made up
    /// for one reader (a finished task's ending, told to a late watcher) and never logged.
    #[serde(default)]
    pub seq: u64,
    /// The node that published it (`koubou serve`'s node name).
    #[serde(default)]
    #[schema(value_type = String)]
    pub origin: Arc<str>,
    /// Milliseconds since the Unix epoch.
    #[schema(value_type = i64)]
    pub at: Millis,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened. Serialized with an `event` tag, e.g. `{"event":"task_token","task_id":…}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    TaskCreated {
        task_id: TaskId,
        kind: TaskKind,
        priority: Priority,
    },
    TaskClaimed {
        task_id: TaskId,
        worker_id: WorkerId,
        attempt: u32,
    },
    /// The router chose where the task runs.
    TaskStarted {
        task_id: TaskId,
        worker_id: WorkerId,
        backend: String,
        model: String,
    },
    /// A piece of the answer, as the backend streams it.
    TaskToken {
        task_id: TaskId,
        text: String,
    },
    /// The task's end: `result` is the whole answer, so a client that joined late (or kept no
    /// tokens) has it.
    TaskCompleted {
        task_id: TaskId,
        #[schema(required = true)]
        usage: Option<Usage>,
        #[schema(value_type = i64)]
        latency_ms: Millis,
        #[serde(default)]
        #[schema(required = true)]
        result: String,
    },
    /// An attempt failed; `retry_at` is set when the task will be tried again.
    TaskFailed {
        task_id: TaskId,
        error: String,
        #[schema(required = true, value_type = Option<i64>)]
        retry_at: Option<Millis>,
        status: TaskStatus,
    },
    TaskCancelled {
        task_id: TaskId,
    },
    /// A running task went back to the queue (lease lost, worker shut down).
    TaskRequeued {
        task_id: TaskId,
        reason: String,
    },
    WorkerScaled {
        workers: usize,
        previous: usize,
        reason: String,
    },
    WorkerState {
        worker_id: WorkerId,
        state: String,
        #[schema(required = true)]
        task_id: Option<TaskId>,
    },
    BackendHealth {
        backend: String,
        up: bool,
        detail: String,
    },
}

impl EventKind {
    /// The task this event is about, if any.
    pub fn task_id(&self) -> Option<TaskId> {
        use EventKind::*;
        match self {
            TaskCreated { task_id, .. }
            | TaskClaimed { task_id, .. }
            | TaskStarted { task_id, .. }
            | TaskToken { task_id, .. }
            | TaskCompleted { task_id, .. }
            | TaskFailed { task_id, .. }
            | TaskCancelled { task_id }
            | TaskRequeued { task_id, .. } => Some(*task_id),
            WorkerState { task_id, .. } => *task_id,
            WorkerScaled { .. } | BackendHealth { .. } => None,
        }
    }

    /// The `event` tag this kind serializes with.
    pub fn name(&self) -> &'static str {
        use EventKind::*;
        match self {
            TaskCreated { .. } => "task_created",
            TaskClaimed { .. } => "task_claimed",
            TaskStarted { .. } => "task_started",
            TaskToken { .. } => "task_token",
            TaskCompleted { .. } => "task_completed",
            TaskFailed { .. } => "task_failed",
            TaskCancelled { .. } => "task_cancelled",
            TaskRequeued { .. } => "task_requeued",
            WorkerScaled { .. } => "worker_scaled",
            WorkerState { .. } => "worker_state",
            BackendHealth { .. } => "backend_health",
        }
    }

    /// Ends the task's story: completed, cancelled, or failed for good.
    pub fn is_terminal(&self) -> bool {
        match self {
            EventKind::TaskCompleted { .. } | EventKind::TaskCancelled { .. } => true,
            EventKind::TaskFailed { status, .. } => status.is_terminal(),
            _ => false,
        }
    }
}

/// A reader fell behind and missed this many events (the log keeps only so many for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("fell {0} events behind")]
pub struct Lagged(pub u64);

/// What a reader of the log gets: events in `seq` order; an `Err` says how many it missed (it
/// may read on, or stop); the end means the log is gone.
pub type Subscription = BoxStream<'static, Result<Arc<Event>, Lagged>>;

/// A function called with every event, in order, as it is published: for routing that must not
/// cost a thread hop (per-task watchers). It must be quick, never block and never publish.
pub type Tap = Arc<dyn Fn(&Arc<Event>) + Send + Sync>;

/// The log every producer writes to and every face reads from.
pub trait EventLog: Send + Sync + 'static {
    /// Appends `kind`, stamped with the time, the next `seq` and this node as `origin`.
    fn publish(&self, kind: EventKind);
    /// Appends `kind` as published by node `origin` (an event relayed from another node keeps
    /// the name of the node that produced it), stamped with the time and the next `seq`.
    fn publish_from(&self, origin: &str, kind: EventKind);
    /// The events after `after` that the log still keeps, then every new one; with `None`, only
    /// new ones. When some after `after` are no longer kept, the first item says how many.
    fn subscribe(&self, after: Option<u64>) -> Subscription;
    /// Calls `f` with every event published from now on, in order, before any subscriber sees it.
    fn follow(&self, f: Tap);
    /// The `seq` of the last event published (0 before the first).
    fn head(&self) -> u64;
    /// The node [`EventLog::publish`] names as an event's `origin`.
    fn origin(&self) -> &str;
}

/// The in-process [`EventLog`]: a bounded broadcast to subscribers, the last [`KEPT`] events
/// kept for readers that resume, and synchronous [`Tap`]s. A cheap, cloneable handle.
///
/// A subscriber that falls more than `capacity` events behind gets [`Lagged`]: faces drop such
/// slow clients rather than slowing anyone else down.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<BusInner>,
}

/// How many recent events an [`EventBus`] keeps for readers that resume from a `seq`.
pub const KEPT: usize = 4096;

struct BusInner {
    origin: Arc<str>,
    tx: broadcast::Sender<Arc<Event>>,
    /// Held while an event is numbered, kept, tapped and sent, so that every reader sees the
    /// same order and a subscription made between two events misses and repeats nothing.
    state: Mutex<BusState>,
}

struct BusState {
    seq: u64,
    kept: VecDeque<Arc<Event>>,
    keep: usize,
    taps: Vec<Tap>,
}

impl EventBus {
    /// A bus whose events name the node `local`.
    pub fn new(capacity: usize) -> Self {
        EventBus::with_origin("local", capacity)
    }

    /// A bus whose events name `origin` as the node that published them.
    pub fn with_origin(origin: &str, capacity: usize) -> Self {
        let capacity = capacity.max(16);
        let state = BusState { seq: 0, kept: VecDeque::new(), keep: capacity.min(KEPT), taps: Vec::new() };
        EventBus {
            inner: Arc::new(BusInner {
                origin: origin.into(),
                tx: broadcast::channel(capacity).0,
                state: Mutex::new(state),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BusState> {
        // A tap that panicked leaves the state as consistent as before it ran.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Events some current subscriber has not received yet (0 once every subscriber has caught
    /// up: what a test waits for instead of sleeping).
    pub fn backlog(&self) -> usize {
        self.inner.tx.len()
    }
}

impl EventBus {
    fn append(&self, origin: Arc<str>, kind: EventKind) {
        let mut st = self.state();
        st.seq += 1;
        let e = Arc::new(Event { seq: st.seq, origin, at: now_millis(), kind });
        if st.kept.len() == st.keep {
            st.kept.pop_front();
        }
        st.kept.push_back(e.clone());
        for tap in &st.taps {
            tap(&e);
        }
        if self.inner.tx.receiver_count() > 0 {
            let _ = self.inner.tx.send(e);
        }
    }
}

impl EventLog for EventBus {
    fn publish(&self, kind: EventKind) {
        self.append(self.inner.origin.clone(), kind);
    }

    fn publish_from(&self, origin: &str, kind: EventKind) {
        let origin = if *origin == *self.inner.origin { self.inner.origin.clone() } else { origin.into() };
        self.append(origin, kind);
    }

    fn origin(&self) -> &str {
        &self.inner.origin
    }

    fn subscribe(&self, after: Option<u64>) -> Subscription {
        let st = self.state();
        let rx = self.inner.tx.subscribe();
        let (missed, backlog) = match after {
            Some(after) if after < st.seq => {
                let first = st.kept.front().map_or(st.seq + 1, |e| e.seq);
                let missed = first.saturating_sub(after + 1);
                let backlog: Vec<_> = st.kept.iter().filter(|e| e.seq > after).cloned().map(Ok).collect();
                (missed, backlog)
            }
            _ => (0, Vec::new()),
        };
        drop(st);
        let live = futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(e) => Some((Ok(e), rx)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some((Err(Lagged(n)), rx)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        let missed = (missed > 0).then_some(Err(Lagged(missed)));
        futures::stream::iter(missed.into_iter().chain(backlog)).chain(live).boxed()
    }

    fn follow(&self, f: Tap) {
        self.state().taps.push(f);
    }

    fn head(&self) -> u64 {
        self.state().seq
    }
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new(8192)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape() {
        let id: TaskId = "0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60".parse().unwrap();
        let e = Event {
            seq: 7,
            origin: "serve".into(),
            at: 1,
            kind: EventKind::TaskToken { task_id: id, text: "hi".into() },
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"seq":7,"origin":"serve","at":1,"event":"task_token","task_id":"0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60","text":"hi"}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
        assert_eq!(e.kind.name(), "task_token");
        // What an older server sent (no seq, no origin) still reads.
        let old = r#"{"at":1,"event":"task_cancelled","task_id":"0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60"}"#;
        assert_eq!(serde_json::from_str::<Event>(old).unwrap().seq, 0);
    }

    fn cancelled() -> EventKind {
        EventKind::TaskCancelled { task_id: TaskId::new() }
    }

    #[tokio::test]
    async fn slow_subscriber_lags() {
        let bus = EventBus::new(16);
        let mut rx = bus.subscribe(None);
        for _ in 0..40 {
            bus.publish(cancelled());
        }
        assert!(matches!(rx.next().await, Some(Err(Lagged(_)))));
    }

    /// Every event is numbered and named after its node; a reader that resumes after `seq` gets
    /// exactly what followed, kept events first and then live ones, with nothing missed or
    /// repeated at the seam.
    #[tokio::test]
    async fn readers_resume_after_a_seq() {
        let bus = EventBus::with_origin("node-a", 64);
        assert_eq!(bus.head(), 0);
        for _ in 0..5 {
            bus.publish(cancelled());
        }
        assert_eq!(bus.head(), 5);
        let mut rx = bus.subscribe(Some(2));
        bus.publish(cancelled());
        let seqs: Vec<u64> = rx.by_ref().take(4).map(|e| e.unwrap().seq).collect().await;
        assert_eq!(seqs, [3, 4, 5, 6]);
        let mut now = bus.subscribe(None);
        bus.publish(cancelled());
        let e = now.next().await.unwrap().unwrap();
        assert_eq!((e.seq, &*e.origin, bus.origin()), (7, "node-a", "node-a"));
        // A relayed event keeps the node that produced it, numbered in this log.
        bus.publish_from("node-b", cancelled());
        let e = now.next().await.unwrap().unwrap();
        assert_eq!((e.seq, &*e.origin), (8, "node-b"));
    }

    /// A reader asking for events the bus no longer keeps is told how many it missed, then gets
    /// the oldest kept one on.
    #[tokio::test]
    async fn resuming_past_what_is_kept_says_what_was_missed() {
        let bus = EventBus::new(16);
        for _ in 0..20 {
            bus.publish(cancelled());
        }
        let mut rx = bus.subscribe(Some(1));
        assert_eq!(rx.next().await.unwrap(), Err(Lagged(3)));
        assert_eq!(rx.next().await.unwrap().unwrap().seq, 5);
    }

    /// Taps see every event, in order, before subscribers do.
    #[tokio::test]
    async fn taps_follow_in_order() {
        let bus = EventBus::new(16);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        bus.follow(Arc::new(move |e| s.lock().unwrap().push(e.seq)));
        for _ in 0..3 {
            bus.publish(cancelled());
        }
        assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
    }
}
