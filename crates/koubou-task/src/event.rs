//! The event bus: one stream of what happens, read by every face.
//!
//! Producers: the queue (created, claimed, finished, requeued), the worker (tokens), the pool
//! (scaling) and the backend health checker. Consumers: WebSocket, GraphQL subscriptions, the
//! dashboard, MCP progress, metrics, `submit --wait`. Nobody polls the database to learn what
//! changed.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{Millis, Priority, TaskId, TaskKind, TaskStatus, Usage, WorkerId, now_millis};

/// One thing that happened, with when.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
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

/// A cheap, cloneable handle on the in-process bus (a bounded broadcast channel).
///
/// A receiver that falls more than `capacity` events behind gets `RecvError::Lagged`: faces drop
/// such slow clients rather than slowing anyone else down.
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
    taps: Arc<std::sync::RwLock<Vec<Tap>>>,
}

/// A function called synchronously, in order, for every event as it is published: for routing
/// that must not cost a thread hop (per-task watchers). It must be quick and never block.
pub type Tap = Arc<dyn Fn(&Arc<Event>) + Send + Sync>;

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        EventBus { tx: broadcast::channel(capacity.max(16)).0, taps: Default::default() }
    }

    /// Calls every tap, then sends to every current subscriber; with neither, the event is dropped.
    pub fn publish(&self, kind: EventKind) {
        let Ok(taps) = self.taps.read() else { return };
        if taps.is_empty() && self.tx.receiver_count() == 0 {
            return;
        }
        let e = Arc::new(Event { at: now_millis(), kind });
        for tap in taps.iter() {
            tap(&e);
        }
        drop(taps);
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(e);
        }
    }

    /// Adds a [`Tap`].
    pub fn tap(&self, f: Tap) {
        if let Ok(mut t) = self.taps.write() {
            t.push(f);
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Events some current subscriber has not received yet (0 once every subscriber has caught
    /// up: what a test waits for instead of sleeping).
    pub fn backlog(&self) -> usize {
        self.tx.len()
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
        let e = Event { at: 1, kind: EventKind::TaskToken { task_id: id, text: "hi".into() } };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"at":1,"event":"task_token","task_id":"0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60","text":"hi"}"#);
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
        assert_eq!(e.kind.name(), "task_token");
    }

    #[tokio::test]
    async fn slow_subscriber_lags() {
        let bus = EventBus::new(16);
        let mut rx = bus.subscribe();
        for _ in 0..40 {
            bus.publish(EventKind::TaskCancelled { task_id: TaskId::new() });
        }
        assert!(matches!(rx.recv().await, Err(broadcast::error::RecvError::Lagged(_))));
    }
}
