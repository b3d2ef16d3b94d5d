//! What tool results look like: a structured object (`structuredContent`) and a text rendering
//! of it for the model (`content`), which puts the answer itself in plain text rather than
//! inside escaped JSON.

use koubou_system::api::{HealthView, SystemStatus, TaskList, TaskView, WorkersView};
use koubou_task::TaskStatus;
use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{Map, Value, json};

/// A task as the tools show it: no echo of the prompt, nulls left out, and a `next` hint.
pub(crate) fn task(v: &TaskView, max_wait: u64) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, val: Value| {
        if !val.is_null() {
            m.insert(k.to_owned(), val);
        }
    };
    put("task_id", json!(v.task_id));
    put("status", json!(v.status));
    put("type", json!(v.kind));
    put("priority", json!(v.priority));
    put("result", json!(v.answer()));
    put("partial", json!(v.partial));
    put("error", json!(v.error));
    put("queue_position", json!(v.queue_position));
    put("estimated_start_secs", json!(v.estimated_start_secs));
    put("retry_at", json!(v.retry_at));
    put("backend", json!(v.backend));
    put("model", json!(v.model));
    put("attempts", json!(v.attempts));
    put("usage", json!(v.usage));
    put("duration_ms", json!(v.duration_ms));
    put("created_at", json!(v.created_at));
    put("finished_at", json!(v.finished_at));
    put("next", json!(next(v.status, max_wait)));
    Value::Object(m)
}

/// What the master should do next, for a task that has not finished.
fn next(status: TaskStatus, max_wait: u64) -> Option<String> {
    match status {
        TaskStatus::Pending | TaskStatus::Running | TaskStatus::Retrying => Some(format!(
            "not finished: call wait_for_task with this task_id (waits up to {max_wait} s), or get_task later"
        )),
        _ => None,
    }
}

/// Text for the model: one line of status, then the answer (or error) as is.
pub(crate) fn task_text(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default();
    let mut head = format!("task {} {}", s("task_id"), s("status"));
    if let Some(p) = v.get("queue_position") {
        head += &format!(", {p} ahead in the queue");
    }
    if let Some(e) = v.get("estimated_start_secs") {
        head += &format!(", starts in ~{e} s");
    }
    if !s("model").is_empty() {
        head += &format!(" (model {}", s("model"));
        if let Some(d) = v.get("duration_ms").and_then(Value::as_u64) {
            head += &format!(", {:.1} s", d as f64 / 1000.0);
        }
        head += ")";
    }
    let mut out = head;
    if !s("next").is_empty() {
        out += &format!("\n{}", s("next"));
    }
    for (k, label) in [("result", "result"), ("partial", "partial answer so far"), ("error", "error")] {
        if !s(k).is_empty() {
            out += &format!("\n--- {label} ---\n{}", s(k));
        }
    }
    out
}

pub(crate) fn task_result(v: Value) -> CallToolResult {
    let text = task_text(&v);
    structured(v, text)
}

pub(crate) fn structured(v: Value, text: String) -> CallToolResult {
    let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
    r.structured_content = Some(v);
    r
}

fn preview(s: &str, n: usize) -> String {
    let line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line,
    }
}

pub(crate) fn list(l: &TaskList) -> CallToolResult {
    let tasks: Vec<Value> = l
        .tasks
        .iter()
        .map(|t| {
            let mut o = json!({
                "task_id": t.task_id, "status": t.status, "type": t.kind, "priority": t.priority,
                "prompt": preview(&t.prompt, 80), "created_at": t.created_at,
            });
            if let Some(f) = &t.finished_at {
                o["finished_at"] = json!(f);
            }
            o
        })
        .collect();
    let mut text = format!("{} of {} tasks", tasks.len(), l.total);
    for t in &tasks {
        text += &format!(
            "\n{} {} [{}] {}",
            t["task_id"].as_str().unwrap_or_default(),
            t["status"].as_str().unwrap_or_default(),
            t["type"].as_str().unwrap_or_default(),
            t["prompt"].as_str().unwrap_or_default()
        );
    }
    structured(json!({"tasks": tasks, "total": l.total}), text)
}

pub(crate) fn system(h: &HealthView, w: &WorkersView, s: &SystemStatus) -> CallToolResult {
    let backends: Vec<Value> = h
        .backends
        .iter()
        .map(|b| json!({"name": b.name, "kind": b.kind, "up": b.up, "detail": b.detail, "model": b.default_model, "capacity": b.capacity}))
        .collect();
    let v = json!({
        "status": h.status,
        "version": h.version,
        "queue": h.queue,
        "workers": {"active": w.active, "busy": w.busy, "max": w.max_workers},
        "backends": backends,
        "routes": h.routes,
        "throughput_per_sec": s.throughput_per_sec,
        "tokens_per_sec": s.tokens_per_sec,
        "uptime_secs": s.uptime_secs,
    });
    let q = &h.queue;
    let mut text = format!(
        "koubou {} {}: {} pending, {} running, {} retrying; done {} completed, {} failed, {} cancelled; workers {}/{} \
         busy (max {})",
        h.version,
        h.status,
        q.pending,
        q.running,
        q.retrying,
        q.completed,
        q.failed,
        q.cancelled,
        w.busy,
        w.active,
        w.max_workers
    );
    for b in &h.backends {
        text += &format!(
            "\nbackend {} ({}, {}): {} — {}",
            b.name,
            b.kind,
            b.default_model,
            if b.up { "up" } else { "DOWN" },
            b.detail
        );
    }
    for (k, r) in &h.routes {
        text += &format!("\ntype {k} -> {r}");
    }
    structured(v, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_cuts_on_chars() {
        assert_eq!(preview("a  b\nc", 10), "a b c");
        assert_eq!(preview("日本語のテキスト", 3), "日本語…");
    }
}
