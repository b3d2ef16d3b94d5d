//! What tool results look like.
//!
//! The answer travels once, in `structuredContent` (a JSON object): that is what Claude Code
//! hands its model when a result has one — it passes `JSON.stringify(structuredContent)` and
//! drops the text blocks (measured with Claude Code 2.1.328:
//! `claude_code_reads_the_answer_once` in `tests/real_clients.rs`). The text block, which the
//! protocol requires, is a one-line summary for clients that show text: status, where it ran,
//! and how long the answer is, never the answer again.
//!
//! A long answer (or partial answer, or error) is cut at `[mcp] max_result_chars`; the result
//! says so and how to read on (`get_task` with `offset`).

use koubou_api::{HealthView, SystemStatus, TaskList, TaskView, WorkersView};
use koubou_task::TaskStatus;
use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{Map, Value, json};

/// Which part of a long answer to show.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    /// Characters to skip.
    pub offset: usize,
    /// Most characters shown.
    pub max: usize,
}

/// `text` from `offset`, at most `max` characters, and the number of characters in all.
fn cut(text: &str, w: Window) -> (&str, usize) {
    let total = text.chars().count();
    let byte = |n: usize| text.char_indices().nth(n).map_or(text.len(), |(i, _)| i);
    let start = byte(w.offset.min(total));
    let end = byte(w.offset.saturating_add(w.max).min(total));
    (&text[start..end], total)
}

/// A task as the tools show it: no echo of the prompt, nulls left out, and a `next` hint.
pub(crate) fn task(v: &TaskView, max_wait: u64, w: Window) -> Value {
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
    let mut next: Vec<String> = next(v.status, max_wait).into_iter().collect();
    // The answer (or the answer so far), cut to the window.
    for (key, text) in [("result", v.answer()), ("partial", v.partial.as_deref())] {
        let Some(text) = text else { continue };
        let (shown, total) = cut(text, w);
        put(key, json!(shown));
        if w.offset > 0 {
            put("offset", json!(w.offset.min(total)));
        }
        let end = w.offset.min(total) + shown.chars().count();
        if end < total {
            put(&format!("{key}_chars"), json!(total));
            next.push(format!(
                "the {} is cut at character {end} of {total}: call get_task with this task_id and offset={end} for \
                 the rest",
                if key == "result" { "answer" } else { "partial answer" }
            ));
        }
    }
    if let Some(e) = &v.error {
        let (shown, total) = cut(e, Window { offset: 0, ..w });
        put("error", json!(if shown.len() < e.len() { format!("{shown}… ({total} characters)") } else { e.clone() }));
    }
    put("queue_position", json!(v.queue_position));
    put("estimated_start_secs", json!(v.estimated_start_secs));
    put("retry_at", json!(v.retry_at));
    put("backend", json!(v.backend));
    put("model", json!(v.model));
    put("remote", json!(v.remote));
    put("attempts", json!(v.attempts));
    put("usage", json!(v.usage));
    put("cost", json!(v.cost));
    if !v.tags.is_empty() {
        put("tags", json!(v.tags));
    }
    put("duration_ms", json!(v.duration_ms));
    put("created_at", json!(v.created_at));
    put("finished_at", json!(v.finished_at));
    if !next.is_empty() {
        put("next", json!(next.join("; ")));
    }
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

/// The text block: one status line and the hint, saying where the answer is instead of
/// repeating it.
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
        let place = match v.get("remote").and_then(Value::as_bool) {
            Some(true) => ", remote",
            Some(false) => ", local",
            None => "",
        };
        head += &format!(" ({}/{}{place}", s("backend"), s("model"));
        if let Some(d) = v.get("duration_ms").and_then(Value::as_u64) {
            head += &format!(", {:.1} s", d as f64 / 1000.0);
        }
        head += ")";
    }
    for (k, label) in [("result", "the answer"), ("partial", "the answer so far")] {
        if let Some(text) = v.get(k).and_then(Value::as_str) {
            head += &format!("; {label}: {} characters in structuredContent.{k}", text.chars().count());
        }
    }
    let mut out = head;
    if !s("next").is_empty() {
        out += &format!("\n{}", s("next"));
    }
    if !s("error").is_empty() {
        out += &format!("\nerror: {}", s("error"));
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
            if !t.tags.is_empty() {
                o["tags"] = json!(t.tags);
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
        .map(|b| {
            json!({"name": b.name, "kind": b.kind, "remote": b.remote, "up": b.up, "detail": b.detail,
                   "model": b.default_model, "capacity": b.capacity, "served": b.served})
        })
        .collect();
    let v = json!({
        "status": h.status,
        "version": h.version,
        "queue": h.queue,
        "workers": {"active": w.active, "busy": w.busy, "max": w.max_workers},
        "cluster": w.cluster,
        "backends": backends,
        "routes": h.routes,
        "throughput_per_sec": s.throughput_per_sec,
        "tokens_per_sec": s.tokens_per_sec,
        "uptime_secs": s.uptime_secs,
        "spared": h.spared,
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
    let c = &w.cluster;
    if c.nodes_alive + c.nodes_lost > 1 {
        text += &format!(
            "; {} nodes alive ({} lost), their workers {} busy of {}",
            c.nodes_alive, c.nodes_lost, c.busy, c.max_workers
        );
    }
    for b in &h.backends {
        text += &format!(
            "\nbackend {} ({}, {}, {}): {} — {}",
            b.name,
            b.kind,
            b.default_model,
            if b.remote { "remote" } else { "local" },
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

    fn view(result: Option<&str>, status: TaskStatus) -> TaskView {
        let mut t = koubou_task::Task::from_new(
            koubou_task::TaskId::new(),
            koubou_task::NewTask::new(koubou_task::TaskKind::general(), "p"),
            3,
            0,
        );
        t.status = status;
        t.result = result.map(str::to_owned);
        TaskView::from_task(t)
    }

    #[test]
    fn the_answer_appears_once_and_long_ones_are_cut() {
        let answer = format!("{}{}", "日".repeat(1500), "x".repeat(1500));
        let w = Window { offset: 0, max: 1000 };
        let v = task(&view(Some(&answer), TaskStatus::Completed), 25, w);
        assert_eq!(v["result"].as_str().unwrap().chars().count(), 1000);
        assert_eq!(v["result_chars"], 3000);
        assert!(v["next"].as_str().unwrap().contains("offset=1000"), "{v}");
        let text = task_text(&v);
        assert!(!text.contains("日日日"), "the text block does not repeat the answer: {text}");
        assert!(text.contains("1000 characters in structuredContent.result") && text.contains("offset=1000"), "{text}");
        // Reading on: the last piece has no hint.
        let v = task(&view(Some(&answer), TaskStatus::Completed), 25, Window { offset: 2500, max: 1000 });
        assert_eq!(v["result"], "x".repeat(500));
        assert_eq!(v["offset"], 2500);
        assert!(v.get("next").is_none() && v.get("result_chars").is_none(), "{v}");
        // Past the end: an empty piece, not an error.
        let v = task(&view(Some("short"), TaskStatus::Completed), 25, Window { offset: 99, max: 1000 });
        assert_eq!((v["result"].as_str(), v["offset"].as_u64()), (Some(""), Some(5)));
        // Short answers are whole.
        let v = task(&view(Some("short"), TaskStatus::Completed), 25, w);
        assert_eq!(v["result"], "short");
        assert!(v.get("next").is_none());
    }

    #[test]
    fn preview_cuts_on_chars() {
        assert_eq!(preview("a  b\nc", 10), "a b c");
        assert_eq!(preview("日本語のテキスト", 3), "日本語…");
    }
}
