//! A submission as every face receives it, read from JSON field by field so that every error
//! names the field at fault.

use koubou_task::{FieldError, GenOptions, NewTask, Priority, TaskKind};
use serde_json::{Map, Value};

/// The fields [`SubmitRequest::from_json`] reads; any other is refused. `koubou_http`'s `SubmitBody` is their
/// schema, and a test holds the two equal.
pub const SUBMIT_FIELDS: &[&str] = &[
    "type",
    "prompt",
    "content",
    "priority",
    "system",
    "model",
    "backend",
    "max_attempts",
    "timeout_secs",
    "idempotency_key",
    "options",
    "metadata",
    "tags",
    "json",
    "schema",
    "sync",
    "wait_secs",
];

/// A submission as every face receives it (the seed's `POST /task/delegate` body).
#[derive(Clone, Debug, PartialEq)]
pub struct SubmitRequest {
    pub task: NewTask,
    /// Wait for the result and answer with it (bounded by the server's `sync_wait_secs`).
    pub sync: bool,
    /// How long to wait when `sync` (default: the server's bound).
    pub wait_secs: Option<u64>,
}

impl SubmitRequest {
    pub fn new(task: NewTask) -> Self {
        SubmitRequest { task, sync: false, wait_secs: None }
    }

    /// Reads a JSON body field by field, so that every error names the field at fault.
    /// `content` is accepted as an alias of `prompt` (the prototype's clients send it).
    pub fn from_json(v: &Value) -> Result<SubmitRequest, FieldError> {
        let obj = v.as_object().ok_or_else(|| FieldError::new("body", "must be a JSON object"))?;
        if let Some(k) = obj.keys().find(|k| !SUBMIT_FIELDS.contains(&k.as_str())) {
            let known = SUBMIT_FIELDS.join(", ");
            // A key that is the empty string cannot name itself: the body is at fault.
            let (field, what) =
                if k.is_empty() { ("body", "a field named \"\" is unknown") } else { (k.as_str(), "unknown field") };
            return Err(FieldError::new(field, format!("{what}; known fields: {known}")));
        }
        // Both are read, so a wrong `content` beside a `prompt` is refused too; `prompt` wins.
        let content = obj.get("content").map(|c| str_field(c, "content")).transpose()?;
        let prompt = match (obj.get("prompt"), content) {
            (Some(p), _) => str_field(p, "prompt")?,
            (None, Some(c)) => c,
            (None, None) => return Err(FieldError::new("prompt", "is required (the text of the task)")),
        };
        let kind = match obj.get("type") {
            None | Some(Value::Null) => TaskKind::general(),
            Some(v) => TaskKind::parse(&str_field(v, "type")?).map_err(|m| FieldError::new("type", m))?,
        };
        let mut task = NewTask::new(kind, prompt);
        if let Some(v) = present(obj, "priority") {
            let n = v
                .as_i64()
                .filter(|_| v.is_i64() || v.is_u64())
                .ok_or_else(|| FieldError::new("priority", format!("must be an integer from 1 to 10, got {v}")))?;
            task.priority = Priority::new(n).map_err(|m| FieldError::new("priority", m))?;
        }
        task.system = opt_str(obj, "system")?;
        task.model = opt_str(obj, "model")?;
        task.backend = opt_str(obj, "backend")?;
        task.idempotency_key = opt_str(obj, "idempotency_key")?;
        task.max_attempts = opt_u64(obj, "max_attempts")?.map(|n| n.min(u32::MAX as u64) as u32);
        task.timeout_secs = opt_u64(obj, "timeout_secs")?;
        if let Some(v) = present(obj, "options") {
            // serde would read a struct from an array too (`[]` as every default): an object only.
            if !v.is_object() {
                return Err(FieldError::new("options", format!("must be a JSON object, got {v}")));
            }
            task.options = serde_json::from_value::<GenOptions>(v.clone())
                .map_err(|e| FieldError::new("options", format!("{e}")))?;
        }
        if let Some(v) = present(obj, "metadata") {
            task.metadata =
                v.as_object().cloned().ok_or_else(|| FieldError::new("metadata", "must be a JSON object"))?;
        }
        if let Some(v) = present(obj, "tags") {
            task.tags = tags(v)?;
        }
        task.json = match present(obj, "json") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(FieldError::new("json", format!("must be true or false, got {v}"))),
        };
        if let Some(v) = present(obj, "schema") {
            if !v.is_object() {
                return Err(FieldError::new("schema", format!("must be a JSON Schema object, got {v}")));
            }
            task.schema = Some(v.clone());
        }
        let sync = match present(obj, "sync") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(FieldError::new("sync", format!("must be true or false, got {v}"))),
        };
        Ok(SubmitRequest { task, sync, wait_secs: opt_u64(obj, "wait_secs")? })
    }
}

/// `tags`: an array of strings (or one string), lower-cased, trimmed and without repeats.
pub fn tags(v: &Value) -> Result<Vec<String>, FieldError> {
    let bad = || FieldError::new("tags", format!("must be an array of strings, got {v}"));
    let items: Vec<&str> = match v {
        Value::Array(items) => items.iter().map(|i| i.as_str().ok_or_else(bad)).collect::<Result<_, _>>()?,
        Value::String(s) => vec![s.as_str()],
        _ => return Err(bad()),
    };
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for t in items {
        let t = t.trim().to_lowercase();
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

fn present<'a>(obj: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    obj.get(k).filter(|v| !v.is_null())
}

fn str_field(v: &Value, field: &str) -> Result<String, FieldError> {
    v.as_str().map(str::to_owned).ok_or_else(|| FieldError::new(field, format!("must be a string, got {v}")))
}

fn opt_str(obj: &Map<String, Value>, k: &str) -> Result<Option<String>, FieldError> {
    present(obj, k).map(|v| str_field(v, k)).transpose()
}

fn opt_u64(obj: &Map<String, Value>, k: &str) -> Result<Option<u64>, FieldError> {
    present(obj, k)
        .map(|v| v.as_u64().ok_or_else(|| FieldError::new(k, format!("must be a positive integer, got {v}"))))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SubmitRequest, FieldError> {
        SubmitRequest::from_json(&serde_json::from_str(s).unwrap())
    }

    #[test]
    fn seed_bodies_parse() {
        let r =
            parse(r#"{"type": "code", "prompt": "Create a Python function for fibonacci", "priority": 8}"#).unwrap();
        assert_eq!((r.task.kind.as_str(), r.task.priority.get()), ("code", 8));
        let r = parse(r#"{"type": "general", "content": "Explain Python decorators"}"#).unwrap();
        assert_eq!(r.task.prompt, "Explain Python decorators");
        assert_eq!(r.task.priority.get(), 5);
    }

    #[test]
    fn errors_name_the_field() {
        let field = |s| parse(s).unwrap_err().field;
        assert_eq!(field(r#"{"type": "code"}"#), "prompt");
        assert_eq!(field(r#"{"prompt": 5}"#), "prompt");
        assert_eq!(field(r#"{"prompt": "x", "priority": 11}"#), "priority");
        assert_eq!(field(r#"{"prompt": "x", "priority": "high"}"#), "priority");
        assert_eq!(field(r#"{"prompt": "x", "priority": 2.5}"#), "priority");
        assert_eq!(field(r#"{"prompt": "x", "type": "Bad Type"}"#), "type");
        assert_eq!(field(r#"{"prompt": "x", "priorty": 3}"#), "priorty");
        assert_eq!(field(r#"{"prompt": "x", "options": {"temp": 1}}"#), "options");
        assert_eq!(field(r#"{"prompt": "x", "sync": "yes"}"#), "sync");
        assert_eq!(field(r#"{"prompt": "x", "content": 5}"#), "content");
        assert_eq!(field(r#"{"prompt": "x", "options": []}"#), "options");
        assert_eq!(field(r#"{"prompt": null, "content": "x"}"#), "prompt");
        assert_eq!(field(r#"[1]"#), "body");
        // Found by the task_json fuzz target: an empty key was named as the field "".
        assert_eq!(field(r#"{"": "x", "prompt": "x"}"#), "body");
        assert_eq!(field(r#"{"prompt": "x", "tags": [1]}"#), "tags");
        assert_eq!(field(r#"{"prompt": "x", "json": "yes"}"#), "json");
        assert_eq!(field(r#"{"prompt": "x", "schema": "object"}"#), "schema");
    }

    #[test]
    fn tags_json_and_schema_parse() {
        let r = parse(r#"{"prompt": "x", "tags": [" Confidential", "team:a", "confidential"], "json": true}"#).unwrap();
        assert_eq!(r.task.tags, ["confidential", "team:a"]);
        assert!(r.task.json);
        let r = parse(r#"{"prompt": "x", "tags": "gpu", "schema": {"type": "object"}}"#).unwrap();
        assert_eq!(r.task.tags, ["gpu"]);
        assert_eq!(r.task.schema.unwrap()["type"], "object");
    }
}
