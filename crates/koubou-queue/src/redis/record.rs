//! What is stored in Redis, and what the scripts answer, in Rust terms.
//!
//! A task is one hash. Its `spec` field is the task as submitted, serialized with serde (so
//! every field of [`Task`] is kept, including those added later); the fields a script changes
//! (status, attempts, worker, lease, result, …) are hash fields of their own, written by the
//! scripts as strings and read back here over what `spec` says.
//!
//! Every writing script answers `{code, message, extra…}`; the message ([`Message`]) is the
//! JSON a script also publishes on the namespace's channel.

use std::collections::HashMap;

use koubou_task::{EventKind, Millis, Priority, Task, TaskId, TaskKind, TaskStatus, Usage, WorkerId};
use serde::Deserialize;

use crate::QueueError;

/// A task hash as read (`HGETALL`, or the fields a script returns).
pub type Fields = HashMap<String, String>;

/// The fields a script returns a task by, in this order: their values, nil where the task has
/// none (`TASK_FIELDS` in `lua/prelude.lua`, the same list).
pub const TASK_FIELDS: [&str; 19] = [
    "spec",
    "status",
    "attempts",
    "max",
    "created",
    "available",
    "started",
    "finished",
    "lease",
    "worker",
    "result",
    "error",
    "partial",
    "backend",
    "model",
    "usage",
    "warnings",
    "remote",
    "cost",
];

/// The fields of a task a script returned.
pub fn returned(values: &[Option<String>]) -> Fields {
    TASK_FIELDS.iter().zip(values).filter_map(|(k, v)| Some(((*k).to_owned(), v.clone()?))).collect()
}

fn corrupt(what: impl std::fmt::Display) -> QueueError {
    QueueError::Corrupt(format!("a task in Redis: {what}"))
}

fn num<T: std::str::FromStr>(f: &Fields, name: &str) -> Result<Option<T>, QueueError> {
    f.get(name).map(|v| v.parse().map_err(|_| corrupt(format_args!("{name} = {v:?} is not a number")))).transpose()
}

fn json<T: serde::de::DeserializeOwned>(f: &Fields, name: &str) -> Result<Option<T>, QueueError> {
    f.get(name).map(|v| serde_json::from_str(v).map_err(|e| corrupt(format_args!("{name}: {e}")))).transpose()
}

/// The task a hash describes.
pub fn task(f: &Fields) -> Result<Task, QueueError> {
    let spec: Task = json(f, "spec")?.ok_or_else(|| corrupt("no spec"))?;
    let status = f.get("status").ok_or_else(|| corrupt("no status"))?;
    Ok(Task {
        status: TaskStatus::parse(status).ok_or_else(|| corrupt(format_args!("unknown status {status:?}")))?,
        attempts: num(f, "attempts")?.unwrap_or(0),
        max_attempts: num(f, "max")?.unwrap_or(spec.max_attempts),
        created_at: num(f, "created")?.unwrap_or(spec.created_at),
        available_at: num(f, "available")?.unwrap_or(spec.available_at),
        started_at: num(f, "started")?,
        finished_at: num(f, "finished")?,
        lease_until: num(f, "lease")?,
        worker_id: f.get("worker").cloned().map(WorkerId),
        result: f.get("result").cloned(),
        error: f.get("error").cloned(),
        partial: f.get("partial").cloned(),
        backend: f.get("backend").cloned(),
        model: f.get("model").cloned(),
        usage: json(f, "usage")?,
        warnings: json(f, "warnings")?.unwrap_or_default(),
        remote: f.get("remote").map(|v| v == "1"),
        cost: num(f, "cost")?,
        ..spec
    })
}

/// What one script did, as published on the namespace's channel.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// The queue instance that ran the script: `<node>@<run>` (see [`Message::node`]).
    #[serde(rename = "o")]
    pub origin: String,
    /// The namespace's write version after the script, when it changed what waits: orders the
    /// counts of messages from different sources.
    #[serde(rename = "v", default)]
    pub version: u64,
    /// Tasks waiting (pending or retrying) after the script, when it changed what waits.
    #[serde(rename = "q", default)]
    pub queued: Option<u64>,
    /// Tasks the script made claimable.
    #[serde(rename = "w", default)]
    pub wake: u64,
    /// Events, each a list of strings (see [`Message::events`]).
    #[serde(rename = "n", default)]
    pub notes: Vec<Vec<String>>,
    /// Claims (task id, attempt) whose holders must stop.
    #[serde(rename = "s", default)]
    pub stops: Vec<(String, String)>,
}

impl Message {
    pub fn parse(json: &[u8]) -> Result<Message, QueueError> {
        serde_json::from_slice(json).map_err(|e| QueueError::Corrupt(format!("a message from a queue script: {e}")))
    }

    /// The node whose queue ran the script, which its events name as their `origin`; `None`
    /// from an older queue, whose instance id was the run alone.
    pub fn node(&self) -> Option<&str> {
        self.instance().rsplit_once('@').map(|(node, _)| node)
    }

    /// The queue instance that ran the script (`origin` without the operation's number).
    pub fn instance(&self) -> &str {
        self.origin.split_once('#').map_or(&self.origin, |(instance, _)| instance)
    }

    /// The operation's number in its instance (`<instance>#<n>`); `None` from an older queue.
    pub fn op(&self) -> Option<u64> {
        self.origin.split_once('#').and_then(|(_, n)| n.parse().ok())
    }

    /// The events, in the order the script made them.
    pub fn events(&self) -> Result<Vec<EventKind>, QueueError> {
        self.notes.iter().map(|n| event(n)).collect()
    }

    /// The claims to stop, parsed.
    pub fn stops(&self) -> Result<Vec<(TaskId, u32)>, QueueError> {
        self.stops.iter().map(|(id, attempt)| Ok((task_id(id)?, parse(attempt, "attempt")?))).collect()
    }
}

fn parse<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, QueueError> {
    s.parse().map_err(|_| QueueError::Corrupt(format!("{what} {s:?} is not a number")))
}

pub fn task_id(s: &str) -> Result<TaskId, QueueError> {
    s.parse().map_err(|e: koubou_task::id::BadTaskId| QueueError::Corrupt(e.to_string()))
}

/// One note of a script: `[name, task id, …]`, the strings a script wrote for that event.
fn event(note: &[String]) -> Result<EventKind, QueueError> {
    let bad = || QueueError::Corrupt(format!("an event from a queue script: {note:?}"));
    let [name, id, rest @ ..] = note else { return Err(bad()) };
    let task_id = task_id(id)?;
    Ok(match (name.as_str(), rest) {
        ("created", [kind, priority]) => EventKind::TaskCreated {
            task_id,
            kind: TaskKind::parse(kind).map_err(QueueError::Corrupt)?,
            priority: Priority::new(parse(priority, "priority")?).map_err(QueueError::Corrupt)?,
        },
        ("claimed", [worker, attempt]) => {
            EventKind::TaskClaimed { task_id, worker_id: WorkerId(worker.clone()), attempt: parse(attempt, "attempt")? }
        }
        ("completed", [usage, latency, result]) => EventKind::TaskCompleted {
            task_id,
            usage: Some(serde_json::from_str::<Usage>(usage).map_err(|_| bad())?),
            latency_ms: parse::<Millis>(latency, "latency")?,
            result: result.clone(),
        },
        ("failed", [error, retry_at, status]) => EventKind::TaskFailed {
            task_id,
            error: error.clone(),
            retry_at: (!retry_at.is_empty()).then(|| parse(retry_at, "retry time")).transpose()?,
            status: TaskStatus::parse(status).ok_or_else(bad)?,
        },
        ("cancelled", []) => EventKind::TaskCancelled { task_id },
        ("requeued", [reason]) => EventKind::TaskRequeued { task_id, reason: reason.clone() },
        _ => return Err(bad()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_reads_its_changing_fields_over_its_spec() {
        let spec = Task::from_new(TaskId::new(), koubou_task::NewTask::new(TaskKind::general(), "hi"), 3, 0);
        let mut f: Fields = [
            ("spec", serde_json::to_string(&spec).unwrap()),
            ("status", "completed".into()),
            ("attempts", "2".into()),
            ("created", "1000".into()),
            ("finished", "1500".into()),
            ("usage", r#"{"prompt_tokens":3,"completion_tokens":5}"#.into()),
            ("remote", "0".into()),
            ("cost", "0.0105".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let t = task(&f).unwrap();
        assert_eq!((t.status, t.attempts, t.created_at, t.latency_ms()), (TaskStatus::Completed, 2, 1000, Some(500)));
        assert_eq!(
            (t.usage, t.remote, t.cost, t.prompt.as_str()),
            (Some(Usage::new(3, 5)), Some(false), Some(0.0105), "hi")
        );
        f.insert("attempts".into(), "x".into());
        assert!(matches!(task(&f), Err(QueueError::Corrupt(_))));
    }

    #[test]
    fn the_lua_prelude_returns_a_task_by_the_same_fields() {
        let prelude = include_str!("lua/prelude.lua");
        let list = prelude.split("local TASK_FIELDS = {").nth(1).and_then(|s| s.split('}').next()).unwrap();
        let lua: Vec<&str> = list.split(',').map(|f| f.trim().trim_matches('\'')).collect();
        assert_eq!(lua, TASK_FIELDS);
        let values: Vec<Option<String>> =
            TASK_FIELDS.iter().map(|f| (*f != "error").then(|| format!("{f}!"))).collect();
        let f = returned(&values);
        assert_eq!((f.len(), f.get("cost").map(String::as_str), f.get("error")), (18, Some("cost!"), None));
    }

    #[test]
    fn messages_carry_events_and_stops() {
        let id = TaskId::new();
        let json = format!(
            r#"{{"o":"a","v":7,"q":1,"w":1,"n":[["created","{id}","code","9"],["failed","{id}","boom","","failed"]],"s":[["{id}","2"]]}}"#
        );
        let m = Message::parse(json.as_bytes()).unwrap();
        assert_eq!((m.origin.as_str(), m.version, m.queued, m.wake), ("a", 7, Some(1), 1));
        let names: Vec<_> = m.events().unwrap().iter().map(EventKind::name).collect();
        assert_eq!(names, ["task_created", "task_failed"]);
        assert_eq!(m.stops().unwrap(), [(id, 2)]);
        assert_eq!(m.node(), None, "an older queue's instance names no node");
        let quiet = Message::parse(br#"{"o":"gpu@01@ab12"}"#).unwrap();
        assert!(quiet.events().unwrap().is_empty() && quiet.stops().unwrap().is_empty());
        assert_eq!((quiet.queued, quiet.wake), (None, 0), "a script that changed nothing that waits counts nothing");
        assert_eq!(quiet.node(), Some("gpu@01"), "the run is what follows the last @");
        let numbered = Message::parse(br#"{"o":"gpu@01@ab12#42"}"#).unwrap();
        assert_eq!((numbered.instance(), numbered.node(), numbered.op()), ("gpu@01@ab12", Some("gpu@01"), Some(42)));
        assert_eq!((quiet.instance(), quiet.op()), ("gpu@01@ab12", None));
    }
}
