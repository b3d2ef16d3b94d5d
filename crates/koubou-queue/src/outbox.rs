//! What a dispatcher outside the store needs from it.
//!
//! With RabbitMQ as the dispatcher ([`amqp`](crate::amqp)) the store keeps every task and the
//! broker only carries task ids. Two things then have to live in the store, because the broker
//! can neither be asked what it holds nor fence anything:
//! - the claim of one *given* task ([`Outbox::claim_id`]), fenced like every claim, for the id a
//!   delivery names;
//! - the outbox: which claimable tasks no confirmed delivery covers. Each task counts its claims
//!   and records the count a confirmed publish was made for. A claim uses up a delivery, so
//!   once the count moves (the task was claimed), every earlier delivery is stale and the task,
//!   when claimable again (released, its lease ran out, its retry fell due, its node
//!   restarted), is in the outbox again. A stale delivery that still arrives finds the task
//!   running or finished and is dropped, or finds it claimable and claims it — either way
//!   harmless, so duplicates cost a little work and lose nothing.

use std::time::Duration;

use async_trait::async_trait;
use koubou_task::{Millis, Priority, TaskId, TaskKind, WorkerId};

use crate::{Claimed, QueueError, TaskQueue};

/// A claimable task that no confirmed delivery covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undispatched {
    pub id: TaskId,
    pub kind: TaskKind,
    pub priority: Priority,
    /// Its tags: a claim by [`Capabilities`](crate::Capabilities) passes over a delivery whose
    /// task the worker cannot serve without asking the store.
    pub tags: Vec<String>,
    /// The task's claim count when it was read: a delivery published now is recorded for this
    /// count ([`Outbox::mark_dispatched`]).
    pub claims: u64,
}

/// A store that an outside dispatcher can drive: claim by id, and an outbox of what needs a
/// delivery.
#[async_trait]
pub trait Outbox: TaskQueue {
    /// Claims exactly this task for `lease` if it is claimable now (pending, or retrying with
    /// its backoff over) — the same fenced claim as [`Dispatch::claim`](crate::Dispatch::claim),
    /// whatever the task's kind and tags (the dispatcher checks those); `None` when it is not
    /// (unknown, running, finished, cancelled, or waiting for its retry).
    async fn claim_id(&self, id: TaskId, worker: &WorkerId, lease: Duration) -> Result<Option<Claimed>, QueueError>;

    /// Moves what has fallen due (retries whose backoff is over, leases that ran out), then
    /// returns up to `limit` claimable tasks with no confirmed delivery for their current claim
    /// count, most urgent first (priority, then submission order).
    async fn undispatched(&self, limit: usize) -> Result<Vec<Undispatched>, QueueError>;

    /// Records that the broker confirmed a delivery of each task for that claim count. A task
    /// claimed since (its count moved) keeps needing one.
    async fn mark_dispatched(&self, marks: Vec<(TaskId, u64)>) -> Result<(), QueueError>;

    /// Puts every pending task back in the outbox, whatever deliveries were confirmed for it:
    /// the broker lost them (its queue purged or deleted, its disk lost). Answers how many
    /// tasks that were counted as delivered need a delivery again.
    async fn redeliver(&self) -> Result<u64, QueueError>;

    /// The next moment the outbox may grow without any write (a retry's backoff ends, a lease
    /// runs out), for the dispatcher's sweep and parked workers.
    async fn next_due(&self) -> Result<Option<Millis>, QueueError>;
}
