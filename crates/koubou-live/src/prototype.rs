//! The prototype's WebSocket messages, served on Koubou's own connections (`docs/compat.md`).
//!
//! The Python prototype's clients send `{"command": …, "channel": …}` and read `initial_state`,
//! `subscribed` (with `channel`), `task_update`, `worker_update`, `periodic_stats`, `stats` and
//! `pong`, each with an ISO `timestamp`. Here those messages are built from the same event bus
//! and [`Api`] calls as every other message: `command` is another name for `type`, `channel`
//! for `topic`, and the channels `task`, `worker` and `stats` are topics like the others.

use koubou_api::{Api, ApiError, ListQuery, SystemStatus, WorkersView};
use koubou_task::{Event, EventKind, TaskStatus, now_millis, rfc3339};
use serde::Serialize;
use serde_json::{Value, json};

use crate::metrics::MetricsSample;

/// How often a `stats` subscriber gets `periodic_stats` (the prototype's period).
pub const STATS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Now, as the `timestamp` of the prototype's messages (RFC 3339, UTC).
pub fn timestamp() -> String {
    rfc3339(now_millis())
}

/// Task counts as the prototype reports them (`in_progress` is its name for `running`).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct TaskStats {
    /// Waiting to run: pending and retrying.
    pub pending: u64,
    pub in_progress: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub total: u64,
}

impl TaskStats {
    fn new(pending: u64, running: u64, completed: u64, failed: u64, cancelled: u64) -> TaskStats {
        let total = pending + running + completed + failed + cancelled;
        TaskStats { pending, in_progress: running, running, completed, failed, cancelled, total }
    }

    pub fn of_status(s: &SystemStatus) -> TaskStats {
        TaskStats::new(s.pending_tasks, s.running_tasks, s.completed_tasks, s.failed_tasks, s.cancelled_tasks)
    }

    fn of_sample(m: &MetricsSample) -> TaskStats {
        TaskStats::new(m.queue_depth, m.running, m.completed_tasks, m.failed_tasks, m.cancelled_tasks)
    }
}

/// Worker counts as the prototype reports them: over the workers running now.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct WorkerStats {
    pub total_workers: u64,
    pub busy_workers: u64,
    pub idle_workers: u64,
    /// Tasks the current workers completed.
    pub total_completed: u64,
    /// Tasks the current workers failed.
    pub total_failed: u64,
    /// `total_completed` in percent of all they finished (0 before any).
    pub success_rate: f64,
}

impl WorkerStats {
    pub fn of(w: &WorkersView) -> WorkerStats {
        let count = |state: &str| w.workers.iter().filter(|x| x.state == state).count() as u64;
        let done: u64 = w.workers.iter().map(|x| x.tasks_done).sum();
        let failed: u64 = w.workers.iter().map(|x| x.tasks_failed).sum();
        let finished = done + failed;
        WorkerStats {
            total_workers: w.workers.len() as u64,
            busy_workers: count("busy"),
            idle_workers: count("idle"),
            total_completed: done,
            total_failed: failed,
            success_rate: if finished == 0 { 0.0 } else { done as f64 * 100.0 / finished as f64 },
        }
    }
}

fn stats_data(tasks: TaskStats, workers: &WorkersView) -> Value {
    json!({"tasks": tasks, "workers": WorkerStats::of(workers)})
}

/// The answer to `get_stats`.
pub async fn stats(k: &dyn Api) -> Result<Value, ApiError> {
    let (s, w) = tokio::try_join!(k.status(), k.workers())?;
    Ok(json!({"type": "stats", "timestamp": timestamp(), "data": stats_data(TaskStats::of_status(&s), &w)}))
}

/// `periodic_stats` from the latest shared metrics sample (no query per connection).
pub async fn periodic_stats(k: &dyn Api, m: &MetricsSample, connections: usize) -> Result<Value, ApiError> {
    let w = k.workers().await?;
    let mut data = stats_data(TaskStats::of_sample(m), &w);
    data["active_connections"] = connections.into();
    Ok(json!({"type": "periodic_stats", "timestamp": timestamp(), "data": data}))
}

/// Sent once after `welcome`: counts, the workers, and the tasks running now.
pub async fn initial_state(k: &dyn Api) -> Result<Value, ApiError> {
    let running = ListQuery { status: Some("running".into()), limit: Some(100), ..Default::default() };
    let (s, w, running) = tokio::try_join!(k.status(), k.workers(), k.tasks(running))?;
    let mut data = stats_data(TaskStats::of_status(&s), &w);
    data["active_workers"] = w
        .workers
        .iter()
        .map(|x| json!({"worker_id": x.worker_id, "status": x.state, "current_task": x.current_task}))
        .collect();
    data["active_tasks"] = running
        .tasks
        .iter()
        .map(|t| {
            json!({"task_id": t.task_id, "summary": summary(&t.prompt), "type": t.kind, "status": t.status,
                "assigned_to": t.worker_id, "priority": t.priority, "created_at": t.created_at})
        })
        .collect();
    Ok(json!({"type": "initial_state", "timestamp": timestamp(), "data": data}))
}

/// The first 100 characters of a prompt, with `...` when cut (as the prototype shows it).
fn summary(prompt: &str) -> String {
    match prompt.char_indices().nth(100) {
        Some((i, _)) => format!("{}...", &prompt[..i]),
        None => prompt.to_owned(),
    }
}

/// A task's status after a life-cycle event (None for tokens and non-task events).
fn status_after(kind: &EventKind) -> Option<TaskStatus> {
    Some(match kind {
        EventKind::TaskCreated { .. } | EventKind::TaskRequeued { .. } => TaskStatus::Pending,
        EventKind::TaskClaimed { .. } | EventKind::TaskStarted { .. } => TaskStatus::Running,
        EventKind::TaskCompleted { .. } => TaskStatus::Completed,
        EventKind::TaskFailed { status, .. } => *status,
        EventKind::TaskCancelled { .. } => TaskStatus::Cancelled,
        _ => return None,
    })
}

/// `task_update` (channel `task`): a task's new status, with the bus event as `details` (so a
/// completed task's `details.result` is its answer and a failed one's `details.error` the error).
pub fn task_update(e: &Event) -> Option<Value> {
    let status = status_after(&e.kind)?;
    let details = serde_json::to_value(e).unwrap_or(Value::Null);
    Some(json!({"type": "task_update", "task_id": e.kind.task_id(), "status": status, "details": details,
        "timestamp": rfc3339(e.at)}))
}

/// `worker_update` (channel `worker`): a worker's new state.
pub fn worker_update(e: &Event) -> Option<Value> {
    let EventKind::WorkerState { worker_id, state, task_id } = &e.kind else { return None };
    Some(json!({"type": "worker_update", "worker_id": worker_id, "status": state,
        "details": {"current_task": task_id}, "timestamp": rfc3339(e.at)}))
}

#[cfg(test)]
mod tests {
    use koubou_task::{TaskId, WorkerId};

    use super::*;

    #[test]
    fn updates_carry_status_and_outcome() {
        let id = TaskId::new();
        let event = |kind| Event { seq: 1, origin: "serve".into(), at: 0, kind };
        let done = event(EventKind::TaskCompleted { task_id: id, usage: None, latency_ms: 5, result: "42".into() });
        let u = task_update(&done).unwrap();
        assert_eq!((u["type"].as_str(), u["status"].as_str()), (Some("task_update"), Some("completed")));
        assert_eq!(u["details"]["result"], "42");
        assert_eq!(u["timestamp"], "1970-01-01T00:00:00Z");
        let token = event(EventKind::TaskToken { task_id: id, text: "x".into() });
        assert!(task_update(&token).is_none());
        let w = event(EventKind::WorkerState {
            worker_id: WorkerId::new("serve", 1),
            state: "busy".into(),
            task_id: Some(id),
        });
        let u = worker_update(&w).unwrap();
        assert_eq!((u["worker_id"].as_str(), u["status"].as_str()), (Some("serve/1"), Some("busy")));
    }

    #[test]
    fn summaries_cut_on_characters() {
        assert_eq!(summary("short"), "short");
        let long = "語".repeat(150);
        assert_eq!(summary(&long), format!("{}...", "語".repeat(100)));
    }
}
