//! Mapping between `tasks` rows and [`Task`].

use koubou_task::{Priority, Task, TaskKind, TaskStatus, Usage, WorkerId};
use rusqlite::Row;

/// The column list every `SELECT … FROM tasks` and `RETURNING` uses, in [`task_from_row`]'s order
/// (columns added by later migrations come after `seq`).
pub const COLUMNS: &str = "id, kind, prompt, system, priority, status, requested_model, requested_backend, \
     attempts, max_attempts, timeout_secs, result, error, partial, backend, model, prompt_tokens, \
     completion_tokens, worker_id, created_at, started_at, finished_at, available_at, lease_until, \
     idempotency_key, options, metadata, seq, cache_read_tokens, cache_write_tokens, warnings, tags, json, schema, \
     remote, cost";

fn bad(col: usize, msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, msg.into())
}

pub fn task_from_row(r: &Row<'_>) -> rusqlite::Result<Task> {
    let id: String = r.get(0)?;
    let kind: String = r.get(1)?;
    let status: String = r.get(5)?;
    let prompt_tokens: Option<i64> = r.get(16)?;
    let completion_tokens: Option<i64> = r.get(17)?;
    let options: Option<String> = r.get(25)?;
    let metadata: Option<String> = r.get(26)?;
    let cache_read: Option<i64> = r.get(28)?;
    let cache_write: Option<i64> = r.get(29)?;
    let warnings: Option<String> = r.get(30)?;
    let tags: Option<String> = r.get(31)?;
    let schema: Option<String> = r.get(33)?;
    Ok(Task {
        id: id.parse().map_err(|e: koubou_task::id::BadTaskId| bad(0, e.to_string()))?,
        kind: TaskKind::parse(&kind).map_err(|e| bad(1, e))?,
        prompt: r.get(2)?,
        system: r.get(3)?,
        priority: Priority::new(r.get(4)?).map_err(|e| bad(4, e))?,
        status: TaskStatus::parse(&status).ok_or_else(|| bad(5, format!("unknown status {status:?}")))?,
        requested_model: r.get(6)?,
        requested_backend: r.get(7)?,
        attempts: r.get(8)?,
        max_attempts: r.get(9)?,
        timeout_secs: r.get::<_, Option<i64>>(10)?.map(|v| v as u64),
        result: r.get(11)?,
        error: r.get(12)?,
        partial: r.get(13)?,
        backend: r.get(14)?,
        model: r.get(15)?,
        usage: match (prompt_tokens, completion_tokens) {
            (None, None) => None,
            (p, c) => Some(Usage {
                cache_read_tokens: cache_read.map(|v| v as u64),
                cache_write_tokens: cache_write.map(|v| v as u64),
                ..Usage::new(p.unwrap_or(0) as u64, c.unwrap_or(0) as u64)
            }),
        },
        worker_id: r.get::<_, Option<String>>(18)?.map(WorkerId),
        created_at: r.get(19)?,
        started_at: r.get(20)?,
        finished_at: r.get(21)?,
        available_at: r.get(22)?,
        lease_until: r.get(23)?,
        idempotency_key: r.get(24)?,
        options: match options {
            Some(s) => serde_json::from_str(&s).map_err(|e| bad(25, e.to_string()))?,
            None => Default::default(),
        },
        metadata: match metadata {
            Some(s) => serde_json::from_str(&s).map_err(|e| bad(26, e.to_string()))?,
            None => Default::default(),
        },
        warnings: match warnings {
            Some(s) => serde_json::from_str(&s).map_err(|e| bad(30, e.to_string()))?,
            None => Vec::new(),
        },
        tags: match tags {
            Some(s) => serde_json::from_str(&s).map_err(|e| bad(31, e.to_string()))?,
            None => Vec::new(),
        },
        json: r.get(32)?,
        schema: schema.map(|s| serde_json::from_str(&s)).transpose().map_err(|e| bad(33, e.to_string()))?,
        remote: r.get(34)?,
        cost: r.get(35)?,
    })
}

/// The row's `seq` (pagination cursor), read from the last column of [`COLUMNS`].
pub fn seq_from_row(r: &Row<'_>) -> rusqlite::Result<i64> {
    r.get(27)
}
