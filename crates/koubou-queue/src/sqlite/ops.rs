//! The SQL of each queue operation. Writers take a [`Ctx`] (inside the batch transaction) and
//! stage their events; readers take a plain connection.

use std::time::Duration;

use koubou_task::{Cursor, EventKind, Millis, NewTask, Priority, Task, TaskId, TaskKind, TaskStatus, WorkerId};
use rusqlite::{Connection, OptionalExtension, params, params_from_iter, types::Value};
use tokio_util::sync::CancellationToken;

use super::{
    Ctx, Sql,
    rows::{COLUMNS, seq_from_row, task_from_row},
};
use crate::{
    Capabilities, Claimed, Completion, Failure, Lease, LeaseStatus, Node, NodeLoad, QueueError, QueuePosition, Release,
    StatusCounts, Submitted, TaskPage, TaskQuery, outbox::Undispatched,
};

fn json(v: &impl serde::Serialize) -> Option<String> {
    serde_json::to_string(v).ok()
}

fn get_where(conn: &Connection, clause: &str, p: impl rusqlite::Params) -> Result<Option<Task>, QueueError> {
    let sql = format!("SELECT {COLUMNS} FROM tasks WHERE {clause}");
    conn.prepare_cached(&sql).sql()?.query_row(p, task_from_row).optional().sql()
}

pub fn get(conn: &Connection, id: TaskId) -> Result<Option<Task>, QueueError> {
    get_where(conn, "id = ?1", [id.to_string()])
}

fn get_existing(conn: &Connection, id: TaskId) -> Result<Task, QueueError> {
    get(conn, id)?.ok_or(QueueError::NotFound(id))
}

pub fn submit(ctx: &mut Ctx<'_>, new: NewTask, max_queued: Option<u64>) -> Result<Submitted, QueueError> {
    if let Some(key) = &new.idempotency_key
        && let Some(task) = get_where(ctx.conn, "idempotency_key = ?1", [key])?
    {
        return Ok(Submitted { task, created: false });
    }
    if let Some(limit) = max_queued
        && ctx.queued >= limit as i64
    {
        return Err(QueueError::Full { queued: ctx.queued as u64, limit });
    }
    let task = Task::from_new(TaskId::new(), new, ctx.cfg.max_attempts, ctx.now);
    ctx.conn
        .prepare_cached(
            "INSERT INTO tasks (id, kind, prompt, system, priority, status, requested_model, requested_backend, \
             max_attempts, timeout_secs, created_at, available_at, idempotency_key, options, metadata, tags, json, \
             schema) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7, ?8, ?9, ?10, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )
        .sql()?
        .execute(params![
            task.id.to_string(),
            task.kind.as_str(),
            task.prompt,
            task.system,
            task.priority.get(),
            task.requested_model,
            task.requested_backend,
            task.max_attempts,
            task.timeout_secs.map(|v| v as i64),
            task.created_at,
            task.idempotency_key,
            (!task.options.is_default()).then(|| json(&task.options)).flatten(),
            (!task.metadata.is_empty()).then(|| json(&task.metadata)).flatten(),
            (!task.tags.is_empty()).then(|| json(&task.tags)).flatten(),
            task.json,
            task.schema.as_ref().and_then(json),
        ])
        .sql()?;
    ctx.events.push(EventKind::TaskCreated { task_id: task.id, kind: task.kind.clone(), priority: task.priority });
    ctx.wake += 1;
    ctx.queued += 1;
    Ok(Submitted { task, created: true })
}

/// Promotes retries whose backoff is over and requeues tasks whose lease ran out. Runs inside
/// claims, only when something is due, so an idle queue does no work.
fn housekeeping(ctx: &mut Ctx<'_>) -> Result<(), QueueError> {
    if ctx.now < ctx.next_due {
        return Ok(());
    }
    let promoted = ctx
        .conn
        .prepare_cached("UPDATE tasks SET status = 'pending' WHERE status = 'retrying' AND available_at <= ?1")
        .sql()?
        .execute([ctx.now])
        .sql()?;
    ctx.wake += promoted;
    let expired: Vec<(String, u32, u32, Option<String>)> = ctx
        .conn
        .prepare_cached(
            "SELECT id, attempts, max_attempts, worker_id FROM tasks WHERE status = 'running' AND lease_until <= ?1",
        )
        .sql()?
        .query_map([ctx.now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .sql()?
        .collect::<Result<_, _>>()
        .sql()?;
    for (id, attempts, max, worker) in expired {
        let id: TaskId = id.parse().map_err(|_| QueueError::Corrupt(format!("bad task id {id:?}")))?;
        let reason = format!("lease expired (worker {} stopped answering)", worker.as_deref().unwrap_or("?"));
        requeue_lost(ctx, id, attempts, max, &reason)?;
    }
    let due = next_due_from_table(ctx.conn)?;
    ctx.due_recomputed = Some(due);
    ctx.next_due = due;
    Ok(())
}

/// [`Dispatch::housekeep`](crate::Dispatch::housekeep): what a claim does first.
pub fn housekeep(ctx: &mut Ctx<'_>) -> Result<(), QueueError> {
    housekeeping(ctx)
}

/// A running task whose worker is gone: back to the queue, or failed if its attempts are used up.
fn requeue_lost(ctx: &mut Ctx<'_>, id: TaskId, attempts: u32, max: u32, reason: &str) -> Result<(), QueueError> {
    ctx.cancels.push(id);
    if attempts >= max {
        let error = format!("{reason}; gave up after {attempts} attempts");
        ctx.conn
            .prepare_cached(
                "UPDATE tasks SET status = 'failed', error = ?2, finished_at = ?3, lease_until = NULL WHERE id = ?1",
            )
            .sql()?
            .execute(params![id.to_string(), error, ctx.now])
            .sql()?;
        ctx.events.push(EventKind::TaskFailed { task_id: id, error, retry_at: None, status: TaskStatus::Failed });
    } else {
        ctx.conn
            .prepare_cached(
                "UPDATE tasks SET status = 'pending', worker_id = NULL, lease_until = NULL, available_at = ?2 \
                 WHERE id = ?1",
            )
            .sql()?
            .execute(params![id.to_string(), ctx.now])
            .sql()?;
        ctx.events.push(EventKind::TaskRequeued { task_id: id, reason: reason.to_owned() });
        ctx.wake += 1;
        ctx.queued += 1;
    }
    Ok(())
}

/// Tasks waiting to run (pending or retrying).
pub fn queued_from_table(conn: &Connection) -> Result<u64, QueueError> {
    let n: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM tasks WHERE status IN ('pending', 'retrying')")
        .sql()?
        .query_row([], |r| r.get(0))
        .sql()?;
    Ok(n as u64)
}

/// The earliest retry or lease expiry in the table (`Millis::MAX` if none).
pub fn next_due_from_table(conn: &Connection) -> Result<Millis, QueueError> {
    let due: Option<Millis> = conn
        .prepare_cached(
            "SELECT MIN(t) FROM (SELECT MIN(available_at) AS t FROM tasks WHERE status = 'retrying' \
             UNION ALL SELECT MIN(lease_until) FROM tasks WHERE status = 'running')",
        )
        .sql()?
        .query_row([], |r| r.get(0))
        .sql()?;
    Ok(due.unwrap_or(Millis::MAX))
}

/// The claim query's order comes from the partial index `tasks_claim`. Named explicitly:
/// left to itself SQLite's planner prefers `tasks_status` and sorts every pending task on each
/// claim, which made a 50,000-task backlog drain at ~500 tasks/s.
pub fn claim(
    ctx: &mut Ctx<'_>,
    worker: &WorkerId,
    caps: &Capabilities,
    lease: Duration,
) -> Result<Option<Claimed>, QueueError> {
    housekeeping(ctx)?;
    let lease_until = ctx.now + lease.as_millis() as Millis;
    let mut args: Vec<Value> = vec![worker.0.clone().into(), ctx.now.into(), lease_until.into()];
    let mut marks = |values: Vec<String>| {
        let first = args.len() + 1;
        let n = values.len();
        args.extend(values.into_iter().map(Value::from));
        (first..first + n).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ")
    };
    let mut kind_filter = match &caps.kinds {
        Some(ks) if ks.is_empty() => return Ok(None),
        Some(ks) => format!("AND kind IN ({})", marks(ks.iter().map(|k| k.as_str().to_owned()).collect())),
        None => String::new(),
    };
    if let Some(tags) = &caps.tags {
        // Every tag of the task is one the worker declares (an untagged task has none to check).
        kind_filter.push_str(&format!(
            " AND NOT EXISTS (SELECT 1 FROM json_each(tasks.tags) WHERE json_each.value NOT IN ({}))",
            marks(tags.clone())
        ));
    }
    let sql = format!(
        "UPDATE tasks SET {CLAIM_SET} \
         WHERE seq = (SELECT seq FROM tasks INDEXED BY tasks_claim WHERE status = 'pending' {kind_filter} \
         ORDER BY priority DESC, seq LIMIT 1) \
         RETURNING {COLUMNS}"
    );
    let task =
        ctx.conn.prepare_cached(&sql).sql()?.query_row(params_from_iter(args), task_from_row).optional().sql()?;
    Ok(task.map(|task| claimed(ctx, task, worker, lease_until)))
}

/// What a claim changes (`?1` worker, `?2` now, `?3` lease end); `claims` counts every claim for
/// the outbox (see [`crate::outbox`]).
const CLAIM_SET: &str = "status = 'running', attempts = attempts + 1, claims = claims + 1, worker_id = ?1, \
     started_at = ?2, lease_until = ?3, finished_at = NULL";

/// Claims exactly task `id` if it is pending (after housekeeping, which promotes a retry whose
/// backoff is over and requeues an expired lease).
pub fn claim_id(
    ctx: &mut Ctx<'_>,
    id: TaskId,
    worker: &WorkerId,
    lease: Duration,
) -> Result<Option<Claimed>, QueueError> {
    housekeeping(ctx)?;
    let lease_until = ctx.now + lease.as_millis() as Millis;
    let task = ctx
        .conn
        .prepare_cached(&format!(
            "UPDATE tasks SET {CLAIM_SET} WHERE id = ?4 AND status = 'pending' RETURNING {COLUMNS}"
        ))
        .sql()?
        .query_row(params![worker.0, ctx.now, lease_until, id.to_string()], task_from_row)
        .optional()
        .sql()?;
    Ok(task.map(|task| claimed(ctx, task, worker, lease_until)))
}

/// After a claim's UPDATE: the lease, the token, the event.
fn claimed(ctx: &mut Ctx<'_>, task: Task, worker: &WorkerId, lease_until: Millis) -> Claimed {
    ctx.queued -= 1;
    let lease = Lease { task_id: task.id, worker_id: worker.clone(), attempt: task.attempts };
    let cancel = CancellationToken::new();
    ctx.claimed.push((task.id, cancel.clone()));
    ctx.due = ctx.due.min(lease_until);
    ctx.events.push(EventKind::TaskClaimed { task_id: task.id, worker_id: worker.clone(), attempt: task.attempts });
    Claimed { task, lease, cancel }
}

/// Housekeeping, then the pending tasks no confirmed delivery covers, most urgent first.
pub fn undispatched(ctx: &mut Ctx<'_>, limit: usize) -> Result<Vec<Undispatched>, QueueError> {
    housekeeping(ctx)?;
    let rows: Vec<(String, String, i64, i64, Option<String>)> = ctx
        .conn
        .prepare_cached(
            "SELECT id, kind, priority, claims, tags FROM tasks INDEXED BY tasks_outbox \
             WHERE status = 'pending' AND dispatched IS NOT claims ORDER BY priority DESC, seq LIMIT ?1",
        )
        .sql()?
        .query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .sql()?
        .collect::<Result<_, _>>()
        .sql()?;
    rows.into_iter()
        .map(|(id, kind, priority, claims, tags)| {
            let bad = |what: &str| QueueError::Corrupt(format!("task {id}: bad {what}"));
            Ok(Undispatched {
                id: id.parse().map_err(|_| bad("id"))?,
                kind: TaskKind::parse(&kind).map_err(|_| bad("kind"))?,
                priority: Priority::new(priority).map_err(|_| bad("priority"))?,
                tags: tags.map(|t| serde_json::from_str(&t)).transpose().map_err(|_| bad("tags"))?.unwrap_or_default(),
                claims: claims as u64,
            })
        })
        .collect()
}

/// Records confirmed deliveries, each for the claim count it was published for.
pub fn mark_dispatched(ctx: &mut Ctx<'_>, marks: &[(TaskId, u64)]) -> Result<(), QueueError> {
    let mut stmt = ctx.conn.prepare_cached("UPDATE tasks SET dispatched = ?2 WHERE id = ?1 AND claims = ?2").sql()?;
    for (id, claims) in marks {
        stmt.execute(params![id.to_string(), *claims as i64]).sql()?;
    }
    Ok(())
}

/// Every pending task back in the outbox (the broker lost its deliveries): how many were
/// counted as delivered.
pub fn redeliver(ctx: &mut Ctx<'_>) -> Result<u64, QueueError> {
    let n = ctx
        .conn
        .execute("UPDATE tasks SET dispatched = NULL WHERE status = 'pending' AND dispatched IS NOT NULL", [])
        .sql()?;
    Ok(n as u64)
}

const FENCE: &str = "id = ?1 AND status = 'running' AND worker_id = ?2 AND attempts = ?3";

/// Why a fenced write matched nothing.
fn lost(conn: &Connection, lease: &Lease) -> Result<(LeaseStatus, Task), QueueError> {
    let task = get_existing(conn, lease.task_id)?;
    let status = if task.status == TaskStatus::Cancelled { LeaseStatus::Cancelled } else { LeaseStatus::Lost };
    Ok((status, task))
}

fn lost_error(conn: &Connection, lease: &Lease) -> QueueError {
    match lost(conn, lease) {
        Ok((_, task)) => QueueError::Conflict {
            id: lease.task_id,
            status: task.status,
            detail: format!("worker {} no longer holds attempt {}", lease.worker_id, lease.attempt),
        },
        Err(e) => e,
    }
}

/// What a heartbeat records, owned (it crosses to the writer thread).
pub struct OwnedProgress {
    pub backend: Option<String>,
    pub model: Option<String>,
    pub remote: Option<bool>,
    pub partial: Option<String>,
}

pub fn heartbeat(ctx: &mut Ctx<'_>, lease: &Lease, ttl: Duration, p: OwnedProgress) -> Result<LeaseStatus, QueueError> {
    let until = ctx.now + ttl.as_millis() as Millis;
    let n = ctx
        .conn
        .prepare_cached(&format!(
            "UPDATE tasks SET lease_until = ?4, backend = COALESCE(?5, backend), model = COALESCE(?6, model), \
             partial = COALESCE(?7, partial), remote = COALESCE(?8, remote) WHERE {FENCE}"
        ))
        .sql()?
        .execute(params![
            lease.task_id.to_string(),
            lease.worker_id.0,
            lease.attempt,
            until,
            p.backend,
            p.model,
            p.partial,
            p.remote,
        ])
        .sql()?;
    if n == 1 {
        // A shorter ttl than the lease had brings its expiry forward: the next due moment too.
        ctx.due = ctx.due.min(until);
        return Ok(LeaseStatus::Held);
    }
    Ok(lost(ctx.conn, lease)?.0)
}

pub fn complete(ctx: &mut Ctx<'_>, lease: &Lease, done: Completion) -> Result<Task, QueueError> {
    let task = ctx
        .conn
        .prepare_cached(&format!(
            "UPDATE tasks SET status = 'completed', result = ?4, backend = ?5, model = ?6, prompt_tokens = ?7, \
             completion_tokens = ?8, finished_at = ?9, lease_until = NULL, partial = NULL, error = NULL, \
             cache_read_tokens = ?10, cache_write_tokens = ?11, warnings = ?12, remote = ?13, cost = ?14 \
             WHERE {FENCE} RETURNING {COLUMNS}"
        ))
        .sql()?
        .query_row(
            params![
                lease.task_id.to_string(),
                lease.worker_id.0,
                lease.attempt,
                done.result,
                done.backend,
                done.model,
                done.usage.prompt_tokens as i64,
                done.usage.completion_tokens as i64,
                ctx.now,
                done.usage.cache_read_tokens.map(|v| v as i64),
                done.usage.cache_write_tokens.map(|v| v as i64),
                (!done.warnings.is_empty()).then(|| json(&done.warnings)).flatten(),
                done.remote,
                done.cost,
            ],
            task_from_row,
        )
        .optional()
        .sql()?;
    let task = task.ok_or_else(|| lost_error(ctx.conn, lease))?;
    ctx.events.push(EventKind::TaskCompleted {
        task_id: task.id,
        usage: task.usage,
        latency_ms: task.latency_ms().unwrap_or_default(),
        result: task.result.clone().unwrap_or_default(),
    });
    Ok(task)
}

pub fn fail(ctx: &mut Ctx<'_>, lease: &Lease, failure: Failure) -> Result<Task, QueueError> {
    let retry = failure.retryable && lease.attempt < get_existing(ctx.conn, lease.task_id)?.max_attempts;
    let (status, retry_at) = if retry {
        let delay = ctx.cfg.retry.delay_with_hint(lease.attempt, failure.retry_after);
        (TaskStatus::Retrying, Some(ctx.now + delay.as_millis() as Millis))
    } else {
        (TaskStatus::Failed, None)
    };
    let task = ctx
        .conn
        .prepare_cached(&format!(
            "UPDATE tasks SET status = ?4, error = ?5, backend = COALESCE(?6, backend), model = COALESCE(?7, model), \
             partial = ?8, available_at = COALESCE(?9, available_at), lease_until = NULL, \
             finished_at = CASE WHEN ?9 IS NULL THEN ?10 ELSE NULL END, remote = COALESCE(?11, remote) \
             WHERE {FENCE} RETURNING {COLUMNS}"
        ))
        .sql()?
        .query_row(
            params![
                lease.task_id.to_string(),
                lease.worker_id.0,
                lease.attempt,
                status.as_str(),
                failure.error,
                failure.backend,
                failure.model,
                failure.partial,
                retry_at,
                ctx.now,
                failure.remote,
            ],
            task_from_row,
        )
        .optional()
        .sql()?;
    let task = task.ok_or_else(|| lost_error(ctx.conn, lease))?;
    if let Some(at) = retry_at {
        ctx.due = ctx.due.min(at);
        ctx.queued += 1;
    }
    ctx.events.push(EventKind::TaskFailed { task_id: task.id, error: failure.error, retry_at, status });
    Ok(task)
}

pub fn release(ctx: &mut Ctx<'_>, lease: &Lease, why: Release) -> Result<(), QueueError> {
    // Stopping: pending at once. Cannot serve: retrying until `wait` has passed, the reason kept.
    let (status, available_at, error, reason) = match why {
        Release::Stopping => (TaskStatus::Pending, ctx.now, None, "released by a stopping worker".to_owned()),
        Release::CannotServe { reason, wait } => {
            let at = ctx.now + wait.as_millis() as Millis;
            (
                TaskStatus::Retrying,
                at,
                Some(reason.clone()),
                format!("released by worker {}: {reason}", lease.worker_id),
            )
        }
    };
    let n = ctx
        .conn
        .prepare_cached(&format!(
            "UPDATE tasks SET status = ?4, attempts = attempts - 1, worker_id = NULL, lease_until = NULL, \
             partial = NULL, available_at = ?5, error = COALESCE(?6, error) WHERE {FENCE}"
        ))
        .sql()?
        .execute(params![
            lease.task_id.to_string(),
            lease.worker_id.0,
            lease.attempt,
            status.as_str(),
            available_at,
            error
        ])
        .sql()?;
    if n == 0 {
        return Err(lost_error(ctx.conn, lease));
    }
    ctx.cancels.push(lease.task_id);
    ctx.events.push(EventKind::TaskRequeued { task_id: lease.task_id, reason });
    if status == TaskStatus::Pending {
        ctx.wake += 1;
    } else {
        ctx.due = ctx.due.min(available_at);
    }
    ctx.queued += 1;
    Ok(())
}

pub fn cancel(ctx: &mut Ctx<'_>, id: TaskId) -> Result<Task, QueueError> {
    let before = get_existing(ctx.conn, id)?;
    if before.status.is_terminal() {
        return Err(QueueError::Conflict {
            id,
            status: before.status,
            detail: "only pending, retrying or running tasks can be cancelled".into(),
        });
    }
    let task = ctx
        .conn
        .prepare_cached(&format!(
            "UPDATE tasks SET status = 'cancelled', finished_at = ?2, lease_until = NULL WHERE id = ?1 \
             RETURNING {COLUMNS}"
        ))
        .sql()?
        .query_row(params![id.to_string(), ctx.now], task_from_row)
        .sql()?;
    if before.status == TaskStatus::Running {
        ctx.cancels.push(id);
    }
    if before.status.is_queued() {
        ctx.queued -= 1;
    }
    ctx.events.push(EventKind::TaskCancelled { task_id: id });
    Ok(task)
}

pub fn recover_node(ctx: &mut Ctx<'_>, node: &str) -> Result<u64, QueueError> {
    let pattern = format!("{}/%", node.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
    let orphans: Vec<(String, u32, u32)> = ctx
        .conn
        .prepare_cached(
            "SELECT id, attempts, max_attempts FROM tasks WHERE status = 'running' AND worker_id LIKE ?1 ESCAPE '\\'",
        )
        .sql()?
        .query_map([pattern], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .sql()?
        .collect::<Result<_, _>>()
        .sql()?;
    for (id, attempts, max) in &orphans {
        let id: TaskId = id.parse().map_err(|_| QueueError::Corrupt(format!("bad task id {id:?}")))?;
        requeue_lost(ctx, id, *attempts, *max, &format!("node {node} restarted while the task ran"))?;
    }
    Ok(orphans.len() as u64)
}

pub fn counts(conn: &Connection) -> Result<StatusCounts, QueueError> {
    let mut c = StatusCounts::default();
    let mut stmt = conn.prepare_cached("SELECT status, COUNT(*) FROM tasks GROUP BY status").sql()?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).sql()?;
    for row in rows {
        let (status, n) = row.sql()?;
        let n = n as u64;
        match TaskStatus::parse(&status) {
            Some(TaskStatus::Pending) => c.pending = n,
            Some(TaskStatus::Running) => c.running = n,
            Some(TaskStatus::Retrying) => c.retrying = n,
            Some(TaskStatus::Completed) => c.completed = n,
            Some(TaskStatus::Failed) => c.failed = n,
            Some(TaskStatus::Cancelled) => c.cancelled = n,
            None => return Err(QueueError::Corrupt(format!("unknown status {status:?}"))),
        }
    }
    Ok(c)
}

pub fn position(conn: &Connection, id: TaskId) -> Result<Option<QueuePosition>, QueueError> {
    let Some(task) = get(conn, id)? else { return Err(QueueError::NotFound(id)) };
    if !task.status.is_queued() {
        return Ok(None);
    }
    let seq: i64 = conn
        .prepare_cached("SELECT seq FROM tasks WHERE id = ?1")
        .sql()?
        .query_row([id.to_string()], |r| r.get(0))
        .sql()?;
    let ahead: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM tasks INDEXED BY tasks_claim WHERE status = 'pending' \
             AND (priority > ?1 OR (priority = ?1 AND seq < ?2))",
        )
        .sql()?
        .query_row(params![task.priority.get(), seq], |r| r.get(0))
        .sql()?;
    Ok(Some(QueuePosition { ahead: ahead as u64 }))
}

pub fn list(conn: &Connection, q: &TaskQuery) -> Result<TaskPage, QueueError> {
    let mut clauses: Vec<String> = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    let arg = |args: &mut Vec<Value>, v: Value| {
        args.push(v);
        format!("?{}", args.len())
    };
    if !q.statuses.is_empty() {
        let marks: Vec<String> =
            q.statuses.iter().map(|s| arg(&mut args, Value::from(s.as_str().to_owned()))).collect();
        clauses.push(format!("status IN ({})", marks.join(", ")));
    }
    if let Some(k) = &q.kind {
        clauses.push(format!("kind = {}", arg(&mut args, Value::from(k.as_str().to_owned()))));
    }
    if let Some(t) = q.tag.as_deref().filter(|t| !t.is_empty()) {
        let mark = arg(&mut args, Value::from(t.to_owned()));
        clauses.push(format!("EXISTS (SELECT 1 FROM json_each(tasks.tags) WHERE json_each.value = {mark})"));
    }
    if let Some(s) = q.search.as_deref().filter(|s| !s.is_empty()) {
        let escaped = s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
        clauses.push(format!("prompt LIKE {} ESCAPE '\\'", arg(&mut args, Value::from(format!("%{escaped}%")))));
    }
    let filter = if clauses.is_empty() { "1".to_owned() } else { clauses.join(" AND ") };
    let total: i64 = conn
        .prepare(&format!("SELECT COUNT(*) FROM tasks WHERE {filter}"))
        .sql()?
        .query_row(params_from_iter(&args), |r| r.get(0))
        .sql()?;
    let mut page_clause = filter;
    if let Some(before) = &q.before {
        let seq: i64 = before.as_str().parse().map_err(|_| QueueError::BadCursor(before.to_string()))?;
        page_clause = format!("{page_clause} AND seq < {}", arg(&mut args, Value::from(seq)));
    }
    let limit = q.limit.clamp(1, 1000);
    let sql = format!("SELECT {COLUMNS} FROM tasks WHERE {page_clause} ORDER BY seq DESC LIMIT {}", limit + 1);
    let mut stmt = conn.prepare(&sql).sql()?;
    let mut rows = stmt.query(params_from_iter(&args)).sql()?;
    let mut tasks = Vec::with_capacity(limit);
    let mut last_seq = None;
    let mut more = false;
    while let Some(row) = rows.next().sql()? {
        if tasks.len() == limit {
            more = true;
            break;
        }
        last_seq = Some(seq_from_row(row).sql()?);
        tasks.push(task_from_row(row).sql()?);
    }
    let next_cursor = last_seq.filter(|_| more).map(|seq| Cursor::new(seq.to_string()));
    Ok(TaskPage { tasks, next_cursor, total: total as u64 })
}

const NODE_COLUMNS: &str =
    "id, instance, host, pid, version, capabilities, started_at, expires_at, backends, busy, max_workers, last_seen";

fn json_column<T: serde::de::DeserializeOwned>(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<T> {
    let text: String = r.get(i)?;
    serde_json::from_str(&text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.to_string().into()))
}

fn node_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Node> {
    Ok(Node {
        id: r.get(0)?,
        instance: r.get::<_, i64>(1)? as u64,
        host: r.get(2)?,
        pid: r.get(3)?,
        version: r.get(4)?,
        capabilities: json_column(r, 5)?,
        started_at: r.get(6)?,
        expires_at: r.get(7)?,
        backends: json_column(r, 8)?,
        load: NodeLoad { busy: r.get(9)?, max_workers: r.get(10)? },
        last_seen: r.get(11)?,
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, QueueError> {
    serde_json::to_string(v).map_err(|e| QueueError::Corrupt(e.to_string()))
}

pub fn register(ctx: &mut Ctx<'_>, node: &Node, ttl: Duration, replace: Option<u64>) -> Result<(), QueueError> {
    let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?1");
    let held = ctx.conn.prepare_cached(&sql).sql()?.query_row([&node.id], node_from_row).optional().sql()?;
    if let Some(held) = held
        && held.instance != node.instance
        && held.expires_at > ctx.now
        && replace != Some(held.instance)
    {
        return Err(QueueError::NodeTaken(Box::new(held)));
    }
    let sql = format!(
        "INSERT OR REPLACE INTO nodes ({NODE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    );
    ctx.conn
        .prepare_cached(&sql)
        .sql()?
        .execute(params![
            node.id,
            node.instance as i64,
            node.host,
            node.pid,
            node.version,
            to_json(&node.capabilities)?,
            node.started_at,
            ctx.now + ttl.as_millis() as Millis,
            to_json(&node.backends)?,
            node.load.busy,
            node.load.max_workers,
            ctx.now,
        ])
        .sql()?;
    Ok(())
}

pub fn renew(ctx: &mut Ctx<'_>, node: &Node, ttl: Duration) -> Result<bool, QueueError> {
    let n = ctx
        .conn
        .prepare_cached(
            "UPDATE nodes SET expires_at = ?3, backends = ?4, busy = ?5, max_workers = ?6, last_seen = ?7 \
             WHERE id = ?1 AND instance = ?2",
        )
        .sql()?
        .execute(params![
            node.id,
            node.instance as i64,
            ctx.now + ttl.as_millis() as Millis,
            to_json(&node.backends)?,
            node.load.busy,
            node.load.max_workers,
            ctx.now,
        ])
        .sql()?;
    Ok(n == 1)
}

pub fn nodes(conn: &Connection) -> Result<Vec<Node>, QueueError> {
    let sql = format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY started_at, id");
    conn.prepare_cached(&sql).sql()?.query_map([], node_from_row).sql()?.collect::<Result<_, _>>().sql()
}

pub fn expire(ctx: &mut Ctx<'_>) -> Result<Vec<Node>, QueueError> {
    let sql = format!("DELETE FROM nodes WHERE expires_at <= ?1 RETURNING {NODE_COLUMNS}");
    ctx.conn.prepare_cached(&sql).sql()?.query_map([ctx.now], node_from_row).sql()?.collect::<Result<_, _>>().sql()
}

pub fn deregister(ctx: &mut Ctx<'_>, id: &str, instance: u64) -> Result<(), QueueError> {
    ctx.conn
        .prepare_cached("DELETE FROM nodes WHERE id = ?1 AND instance = ?2")
        .sql()?
        .execute(params![id, instance as i64])
        .sql()?;
    Ok(())
}
