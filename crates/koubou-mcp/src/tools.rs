//! The tools: names, descriptions written for the master model, input schemas, and the
//! argument readers that turn a call's JSON into typed values with errors naming the field.
//!
//! Schemas are written by hand and kept short: every byte of `tools/list` is paid for in the
//! master's context window on every turn (see `docs/mcp.md` for the measured size).

use std::sync::Arc;

use koubou_api::settings::McpConfig;
use koubou_task::{FieldError, TaskId};
use rmcp::model::{JsonObject, Tool};
use serde_json::{Map, Value, json};

pub const DELEGATE_TASK: &str = "delegate_task";
pub const GET_TASK: &str = "get_task";
pub const WAIT_FOR_TASK: &str = "wait_for_task";
pub const LIST_TASKS: &str = "list_tasks";
pub const CANCEL_TASK: &str = "cancel_task";
pub const SYSTEM_STATUS: &str = "system_status";

/// What the server says about itself at `initialize` / `server/discover` (clients such as
/// Claude Code show it to the model beside the tools).
pub const INSTRUCTIONS: &str = "Koubou runs tasks on local LLMs (craftsmen): cheap, private, slower and less capable \
than you. Delegate self-contained work (boilerplate, tests, docs, translations, summaries of local files) with \
complete instructions; keep work needing judgment across the codebase. Always review answers before using them.";

fn schema(v: Value) -> Arc<JsonObject> {
    match v {
        Value::Object(m) => Arc::new(m),
        _ => unreachable!("tool schemas are objects"),
    }
}

fn task_id_prop() -> Value {
    json!({"type": "string", "description": "From delegate_task"})
}

/// The six tools, with the wait bound of `cfg` written into their descriptions.
pub fn list(cfg: &McpConfig) -> Vec<Tool> {
    let max = cfg.max_wait_secs;
    vec![
        Tool::new(
            DELEGATE_TASK,
            format!(
                "Queue a self-contained task for a local LLM. Good for boilerplate, tests, docs, translations, \
                 summaries of given files; not for work needing judgment across the codebase. The model sees only \
                 prompt and files, so be explicit. Returns task_id; with wait_seconds (max {max}) also the answer \
                 if done by then. Review answers before use."
            ),
            schema(json!({
                "type": "object",
                "properties": {
                    "prompt": {"type": "string", "description": "Complete instructions"},
                    "type": {"type": "string", "description": "Task type: general (default), code, or one listed by system_status"},
                    "priority": {"type": "integer", "minimum": 1, "maximum": 10, "description": "Higher runs first (default 5)"},
                    "model": {"type": "string", "description": "Override the type's model"},
                    "backend": {"type": "string", "description": "Pin a backend listed by system_status"},
                    "tags": {"type": "array", "items": {"type": "string"}, "description": "Labels; confidential keeps the task on local backends"},
                    "json": {"type": "boolean", "description": "The answer must be JSON"},
                    "schema": {"type": "object", "description": "JSON Schema the answer must match"},
                    "files": {"type": "array", "items": {"type": "string"}, "description": "Absolute paths of text files to attach"},
                    "wait_seconds": {"type": "integer", "minimum": 0, "maximum": max, "description": "Wait this long for the answer (default 0)"}
                },
                "required": ["prompt"]
            })),
        ),
        Tool::new(
            GET_TASK,
            "A task's status and answer: result when completed, partial answer while running, queue position and \
             estimated start while pending. A long answer comes in pieces: pass the offset the result gives.",
            schema(json!({
                "type": "object",
                "properties": {
                    "task_id": task_id_prop(),
                    "offset": {"type": "integer", "minimum": 0, "description": "Answer characters to skip (default 0)"}
                },
                "required": ["task_id"]
            })),
        ),
        Tool::new(
            WAIT_FOR_TASK,
            format!(
                "Wait until a task finishes, at most timeout_seconds (max and default {max}), reporting progress. \
                 Returns the answer, or the status so far: then call again."
            ),
            schema(json!({
                "type": "object",
                "properties": {
                    "task_id": task_id_prop(),
                    "timeout_seconds": {"type": "integer", "minimum": 1, "maximum": max}
                },
                "required": ["task_id"]
            })),
        ),
        Tool::new(
            LIST_TASKS,
            "Recent tasks, newest first.",
            schema(json!({
                "type": "object",
                "properties": {
                    "status": {"type": "string", "description": "e.g. active, completed, failed (comma-separated)"},
                    "tag": {"type": "string", "description": "Only tasks with this tag"},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 100, "description": "Default 20"}
                }
            })),
        ),
        Tool::new(
            CANCEL_TASK,
            "Cancel a pending or running task.",
            schema(json!({
                "type": "object",
                "properties": {"task_id": task_id_prop()},
                "required": ["task_id"]
            })),
        ),
        Tool::new(
            SYSTEM_STATUS,
            "Queue counts, workers, backends, and which backend/model serves each task type.",
            schema(json!({"type": "object", "properties": {}})),
        ),
    ]
}

/// A call's arguments, read field by field.
pub(crate) struct Args<'a> {
    obj: &'a Map<String, Value>,
}

static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

impl<'a> Args<'a> {
    /// Fails on a field the tool does not know, listing the ones it does.
    pub fn new(obj: Option<&'a Map<String, Value>>, known: &[&str]) -> Result<Self, FieldError> {
        let obj = obj.unwrap_or(&EMPTY);
        if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
            let known = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
            return Err(FieldError::new(k.as_str(), format!("unknown argument; this tool takes: {known}")));
        }
        Ok(Args { obj })
    }

    fn get(&self, k: &str) -> Option<&'a Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }

    pub fn opt_str(&self, k: &str) -> Result<Option<&'a str>, FieldError> {
        self.get(k)
            .map(|v| v.as_str().ok_or_else(|| FieldError::new(k, format!("must be a string, got {v}"))))
            .transpose()
    }

    pub fn task_id(&self) -> Result<TaskId, FieldError> {
        let s = self.opt_str("task_id")?.ok_or_else(|| FieldError::new("task_id", "is required"))?;
        s.parse().map_err(|_| FieldError::new("task_id", format!("{s:?} is not a task id (a UUID from delegate_task)")))
    }

    /// An integer in `lo..=hi`.
    pub fn opt_int(&self, k: &str, lo: u64, hi: u64) -> Result<Option<u64>, FieldError> {
        let Some(v) = self.get(k) else { return Ok(None) };
        match v.as_u64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64)) {
            Some(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
            _ => Err(FieldError::new(k, format!("must be a whole number from {lo} to {hi}, got {v}"))),
        }
    }

    pub fn opt_str_list(&self, k: &str) -> Result<Vec<&'a str>, FieldError> {
        let Some(v) = self.get(k) else { return Ok(vec![]) };
        let bad = || FieldError::new(k, format!("must be an array of strings, got {v}"));
        match v {
            Value::Array(items) => items.iter().map(|i| i.as_str().ok_or_else(bad)).collect(),
            // A lone path is a common slip; accept it.
            Value::String(s) => Ok(vec![s.as_str()]),
            _ => Err(bad()),
        }
    }

    /// The raw value, for fields passed through to `SubmitRequest::from_json` (which checks them).
    pub fn raw(&self, k: &str) -> Option<&'a Value> {
        self.get(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_are_small_objects() {
        let tools = list(&McpConfig::default());
        assert_eq!(tools.len(), 6);
        for t in &tools {
            assert_eq!(t.input_schema["type"], "object", "{}", t.name);
            assert!(t.description.as_ref().unwrap().len() < 400, "{} description too long", t.name);
        }
        let size = serde_json::to_string(&tools).unwrap().len();
        assert!(size < 4500, "tools/list grew to {size} bytes");
        assert!(serde_json::to_string(&tools[0]).unwrap().contains("max 25"));
    }

    #[test]
    fn args_name_the_field() {
        let v = json!({"task_id": "nope", "limit": 0, "files": [1], "extra": true});
        let obj = v.as_object().unwrap();
        assert_eq!(Args::new(Some(obj), &["task_id", "limit", "files"]).err().unwrap().field, "extra");
        let a = Args::new(Some(obj), &["task_id", "limit", "files", "extra"]).unwrap();
        assert!(a.task_id().unwrap_err().message.contains("not a task id"));
        assert_eq!(a.opt_int("limit", 1, 100).unwrap_err().field, "limit");
        assert_eq!(a.opt_str_list("files").unwrap_err().field, "files");
        assert_eq!(a.opt_int("missing", 1, 2).unwrap(), None);
        let none = Args::new(None, &[]).unwrap();
        assert_eq!(none.task_id().unwrap_err().message, "is required");
    }
}
