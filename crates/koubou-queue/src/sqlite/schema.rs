//! The schema, as numbered migrations applied in order (`PRAGMA user_version` records how far a
//! file has come). Never edit a released migration: add the next one.

use rusqlite::Connection;

use super::Sql;
use crate::QueueError;

/// Migration `i` brings a file from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: tasks.
    r#"
    CREATE TABLE tasks (
        seq               INTEGER PRIMARY KEY AUTOINCREMENT,
        id                TEXT    NOT NULL UNIQUE,
        kind              TEXT    NOT NULL,
        prompt            TEXT    NOT NULL,
        system            TEXT,
        priority          INTEGER NOT NULL,
        status            TEXT    NOT NULL,
        requested_model   TEXT,
        requested_backend TEXT,
        attempts          INTEGER NOT NULL DEFAULT 0,
        max_attempts      INTEGER NOT NULL,
        timeout_secs      INTEGER,
        result            TEXT,
        error             TEXT,
        partial           TEXT,
        backend           TEXT,
        model             TEXT,
        prompt_tokens     INTEGER,
        completion_tokens INTEGER,
        worker_id         TEXT,
        created_at        INTEGER NOT NULL,
        started_at        INTEGER,
        finished_at       INTEGER,
        available_at      INTEGER NOT NULL,
        lease_until       INTEGER,
        idempotency_key   TEXT UNIQUE,
        options           TEXT,
        metadata          TEXT
    );
    -- The claim order: most urgent first, FIFO within a priority. Partial, so it holds only
    -- what is waiting and stays small however long the history grows.
    CREATE INDEX tasks_claim  ON tasks (priority DESC, seq) WHERE status = 'pending';
    CREATE INDEX tasks_retry  ON tasks (available_at)       WHERE status = 'retrying';
    CREATE INDEX tasks_lease  ON tasks (lease_until)        WHERE status = 'running';
    CREATE INDEX tasks_status ON tasks (status, seq);
    CREATE INDEX tasks_kind   ON tasks (kind, seq);
    "#,
    // 2: prompt-cache token counts, and warnings about an answer (a JSON array of strings).
    r#"
    ALTER TABLE tasks ADD COLUMN cache_read_tokens  INTEGER;
    ALTER TABLE tasks ADD COLUMN cache_write_tokens INTEGER;
    ALTER TABLE tasks ADD COLUMN warnings           TEXT;
    "#,
    // 3: tags, structured output, and where a task ran (local or remote) and what it cost.
    r#"
    ALTER TABLE tasks ADD COLUMN tags          TEXT;    -- JSON array of strings; NULL when none
    ALTER TABLE tasks ADD COLUMN json          INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN schema        TEXT;    -- JSON Schema the answer must match
    ALTER TABLE tasks ADD COLUMN remote        INTEGER; -- 1 when the serving backend is remote
    ALTER TABLE tasks ADD COLUMN cost          REAL;
    "#,
    // 4: the outbox of an outside dispatcher (RabbitMQ): every claim counts, and `dispatched`
    // is the count a confirmed delivery was published for. A pending task whose count moved
    // past it (or that never had one) needs a delivery.
    r#"
    ALTER TABLE tasks ADD COLUMN claims     INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN dispatched INTEGER;
    CREATE INDEX tasks_outbox ON tasks (priority DESC, seq) WHERE status = 'pending' AND dispatched IS NOT claims;
    "#,
    // 5: the nodes running workers over this queue, each registered until `expires_at`.
    r#"
    CREATE TABLE nodes (
        id           TEXT    PRIMARY KEY,
        instance     INTEGER NOT NULL,
        host         TEXT    NOT NULL,
        pid          INTEGER NOT NULL,
        version      TEXT    NOT NULL,
        capabilities TEXT    NOT NULL,  -- JSON: {"kinds": [...] | null, "tags": [...] | null}
        started_at   INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL
    );
    "#,
    // 6: what a node says of itself at each renewal (its backends, its load), and its last
    // heartbeat.
    r#"
    ALTER TABLE nodes ADD COLUMN backends    TEXT    NOT NULL DEFAULT '[]'; -- JSON: [{"name", "kind", "models"}]
    ALTER TABLE nodes ADD COLUMN busy        INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN max_workers INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN last_seen   INTEGER NOT NULL DEFAULT 0;
    "#,
];

/// Migration 1 alone, to build old files in tests.
#[cfg(test)]
pub const MIGRATION_1_FOR_TESTS: &str = MIGRATIONS[0];

/// The version a fully migrated file has.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

pub fn migrate(conn: &mut Connection) -> Result<(), QueueError> {
    migrate_to(conn, VERSION)
}

/// Applies the migrations up to `version` (tests use it to make a file of an older release).
pub(crate) fn migrate_to(conn: &mut Connection, version: i64) -> Result<(), QueueError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).sql()?;
    let have: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).sql()?;
    if have > VERSION {
        return Err(QueueError::Corrupt(format!(
            "the database is at schema version {have}, newer than this koubou ({VERSION}); upgrade koubou"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().take(version as usize).skip(have as usize) {
        tx.execute_batch(sql).sql()?;
        tx.pragma_update(None, "user_version", i as i64 + 1).sql()?;
        tracing::info!(version = i + 1, "applied queue schema migration");
    }
    tx.commit().sql()?;
    Ok(())
}
