//! What a WebSocket client may send: every verb of the protocol, read from one text frame in one
//! place, with no I/O. [`parse`] never panics and names the field at fault in every error, so the
//! connection answers a precise `error` and stays open; `fuzz/fuzz_targets/ws_message.rs` holds it
//! to that over arbitrary input.

use koubou_api::{ApiError, ListQuery, SubmitRequest};
use koubou_task::TaskId;
use serde_json::Value;

/// What a connection can subscribe to besides single tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Every event, every token of every task included.
    All,
    /// Life-cycle events of every task (created, claimed, started, completed, failed,
    /// cancelled, requeued): no tokens.
    Tasks,
    /// Workers scaling and changing state, backends going up or down.
    System,
    /// A `metrics` sample every second or two.
    Metrics,
    /// The prototype's channel `task`: a `task_update` for each life-cycle event of any task.
    Task,
    /// The prototype's channel `worker`: a `worker_update` when a worker changes state.
    Worker,
    /// `periodic_stats` every 5 s (on by default, as the prototype sent it to every client).
    Stats,
}

impl Topic {
    pub fn parse(s: &str) -> Option<Topic> {
        Some(match s {
            "all" => Topic::All,
            "tasks" => Topic::Tasks,
            "system" => Topic::System,
            "metrics" => Topic::Metrics,
            "task" => Topic::Task,
            "worker" => Topic::Worker,
            "stats" => Topic::Stats,
            _ => return None,
        })
    }
}

pub const TOPICS: &str = "all, tasks, system, metrics, task, worker or stats";
pub const TYPES: &str =
    "submit_task, subscribe, unsubscribe, cancel_task, get_task, list_tasks, status, get_stats or ping";

/// One client request.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Ping,
    /// The prototype's statistics (`stats`).
    GetStats,
    /// `submit_task` with its `payload` (the REST body's fields; never `sync` over a socket).
    Submit(Box<SubmitRequest>),
    Subscribe(Target),
    Unsubscribe(Target),
    Cancel(TaskId),
    Get(TaskId),
    List(ListQuery),
    Status,
}

/// What a `subscribe` or `unsubscribe` names.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Task(TaskId),
    /// The topic and its name as the client spelled it (echoed in the answer).
    Topic(Topic, String),
}

/// A message as read: its `ref` (echoed in the answer, whatever else is wrong) and the request.
#[derive(Debug)]
pub struct Message {
    pub reference: Option<Value>,
    pub request: Result<Request, ApiError>,
}

/// Reads one text frame.
pub fn parse(text: &str) -> Message {
    let msg = match serde_json::from_str(text) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return unreferenced(ApiError::invalid("message", "must be a JSON object with a \"type\"")),
        Err(e) => return unreferenced(ApiError::invalid("message", format!("not valid JSON: {e}"))),
    };
    Message { reference: msg.get("ref").cloned(), request: request(&msg) }
}

fn unreferenced(e: ApiError) -> Message {
    Message { reference: None, request: Err(e) }
}

fn request(msg: &Value) -> Result<Request, ApiError> {
    // `command` is the prototype's name for `type`.
    let Some(ty) = msg.get("type").or_else(|| msg.get("command")).and_then(Value::as_str) else {
        return Err(ApiError::invalid("type", format!("is required (or `command`): {TYPES}")));
    };
    Ok(match ty {
        "ping" => Request::Ping,
        "get_stats" => Request::GetStats,
        "submit_task" => {
            let payload = msg.get("payload").ok_or_else(|| ApiError::invalid("payload", "is required"))?;
            let mut req = SubmitRequest::from_json(payload).map_err(|mut e| {
                e.field = format!("payload.{}", e.field);
                ApiError::Invalid(e)
            })?;
            // A WebSocket client hears the result as events; never block the connection.
            req.sync = false;
            Request::Submit(Box::new(req))
        }
        "subscribe" => Request::Subscribe(target(msg)?),
        "unsubscribe" => Request::Unsubscribe(target(msg)?),
        "cancel_task" => Request::Cancel(task_id(msg.get("task_id").unwrap_or(&Value::Null))?),
        "get_task" => Request::Get(task_id(msg.get("task_id").unwrap_or(&Value::Null))?),
        "list_tasks" => Request::List(
            serde_json::from_value(msg.get("query").cloned().unwrap_or(Value::Object(Default::default())))
                .map_err(|e| ApiError::invalid("query", e.to_string()))?,
        ),
        "status" => Request::Status,
        other => return Err(ApiError::invalid("type", format!("unknown message type {other:?}; use {TYPES}"))),
    })
}

fn target(msg: &Value) -> Result<Target, ApiError> {
    if let Some(id) = msg.get("task_id") {
        return Ok(Target::Task(task_id(id)?));
    }
    // `channel` is the prototype's name for `topic`.
    let topic =
        msg.get("topic").or_else(|| msg.get("channel")).and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid("topic", format!("give a task_id, or a topic (or `channel`): {TOPICS}"))
        })?;
    let t = Topic::parse(topic)
        .ok_or_else(|| ApiError::invalid("topic", format!("unknown topic {topic:?}; use {TOPICS}")))?;
    Ok(Target::Topic(t, topic.to_owned()))
}

fn task_id(v: &Value) -> Result<TaskId, ApiError> {
    let s = v.as_str().ok_or_else(|| ApiError::invalid("task_id", format!("must be a task id string, got {v}")))?;
    s.parse().map_err(|e: koubou_task::id::BadTaskId| ApiError::invalid("task_id", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(text: &str) -> String {
        match parse(text).request {
            Err(ApiError::Invalid(f)) => f.field,
            other => panic!("{text}: expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn every_verb_and_its_aliases() {
        assert_eq!(parse(r#"{"type":"ping","ref":7}"#).request, Ok(Request::Ping));
        assert_eq!(parse(r#"{"type":"ping","ref":7}"#).reference, Some(Value::from(7)));
        assert_eq!(parse(r#"{"command":"get_stats"}"#).request, Ok(Request::GetStats));
        assert_eq!(parse(r#"{"type":"status"}"#).request, Ok(Request::Status));
        let Ok(Request::Submit(s)) = parse(r#"{"type":"submit_task","payload":{"content":"hi","sync":true}}"#).request
        else {
            panic!("submit_task")
        };
        assert_eq!(s.task.prompt, "hi");
        assert!(!s.sync, "a socket never waits for the result");
        assert_eq!(
            parse(r#"{"type":"subscribe","channel":"task"}"#).request,
            Ok(Request::Subscribe(Target::Topic(Topic::Task, "task".into())))
        );
        let id = TaskId::new();
        assert_eq!(
            parse(&format!(r#"{{"type":"unsubscribe","task_id":"{id}"}}"#)).request,
            Ok(Request::Unsubscribe(Target::Task(id)))
        );
        assert_eq!(parse(&format!(r#"{{"type":"cancel_task","task_id":"{id}"}}"#)).request, Ok(Request::Cancel(id)));
        assert_eq!(parse(&format!(r#"{{"type":"get_task","task_id":"{id}"}}"#)).request, Ok(Request::Get(id)));
        assert!(matches!(parse(r#"{"type":"list_tasks"}"#).request, Ok(Request::List(_))));
    }

    #[test]
    fn each_mistake_names_its_field() {
        assert_eq!(field("not json"), "message");
        assert_eq!(field("[1]"), "message");
        assert_eq!(field(r#"{"ref":1}"#), "type");
        assert_eq!(field(r#"{"type":"dance"}"#), "type");
        assert_eq!(field(r#"{"type":"submit_task"}"#), "payload");
        assert_eq!(field(r#"{"type":"submit_task","payload":{"prompt":"x","priority":11}}"#), "payload.priority");
        assert_eq!(field(r#"{"type":"subscribe"}"#), "topic");
        assert_eq!(field(r#"{"type":"subscribe","topic":"weather"}"#), "topic");
        assert_eq!(field(r#"{"type":"get_task","task_id":"nope"}"#), "task_id");
        assert_eq!(field(r#"{"type":"cancel_task"}"#), "task_id");
        assert_eq!(field(r#"{"type":"list_tasks","query":{"limit":"x"}}"#), "query");
        // The reference comes back even when the request is wrong.
        assert_eq!(parse(r#"{"type":"dance","ref":"r1"}"#).reference, Some(Value::from("r1")));
    }
}
