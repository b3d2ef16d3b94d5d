//! The vocabulary every other Koubou crate speaks.
//!
//! # Layout
//! - [`id`]: `TaskId` (UUIDv7: unique and sortable by creation time) and `WorkerId`.
//! - [`kind`]: `TaskKind` (`general`, `code`, or a configured custom type) and `Priority` (1–10).
//! - [`task`]: `Task` (the stored record), `NewTask` (what a client submits), `TaskStatus`, `Usage`.
//! - [`cursor`]: `Cursor`, an opaque page cursor made by a task store.
//! - [`cost`]: `Prices`, `MeterReading`, `Spared`: what tokens cost and what was served.
//! - [`event`]: `Event`, the one message type of the event log; `EventLog`, the log's trait;
//!   `EventBus`, the in-process log.
//! - [`validate`]: the rules a submitted task must pass, shared by every face.
//! - [`schema`]: JSON Schemas of the newtypes, for the REST API's OpenAPI document.
//!
//! Architecture invariant: this crate does no I/O, knows no database, no HTTP and no LLM.

pub mod cost;
pub mod cursor;
pub mod event;
pub mod id;
pub mod kind;
pub mod schema;
pub mod task;
pub mod validate;

pub use cost::{MeterReading, Prices, Spared};
pub use cursor::Cursor;
pub use event::{Event, EventBus, EventKind, EventLog, Lagged, Subscription, Tap};
pub use id::{TaskId, WorkerId};
pub use kind::{Priority, TaskKind};
pub use task::{CONFIDENTIAL, GenOptions, NewTask, Task, TaskStatus, Usage};
pub use validate::{FieldError, Limits};

/// Milliseconds since the Unix epoch: the one clock format stored and sent.
pub type Millis = i64;

/// Now, in [`Millis`].
pub fn now_millis() -> Millis {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as Millis
}

/// RFC 3339 rendering of a [`Millis`] timestamp, for humans and JSON.
pub fn rfc3339(ms: Millis) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// [`rfc3339`] read back: the [`Millis`] an RFC 3339 timestamp names.
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as Millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_reads_back_what_it_writes() {
        let ms: Millis = 1_796_550_411_469;
        assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        assert_eq!(parse_rfc3339("2026-12-06T09:46:51.469Z"), Some(1_796_550_411_469));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
