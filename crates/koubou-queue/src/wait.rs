//! Parking idle workers without polling.
//!
//! A worker that finds nothing to claim sleeps until the queue's [`TaskQueue::wakeup`] fires (a
//! task was submitted, released or requeued) or until the queue's next due moment (a retry's
//! backoff ends, a lease runs out) — whichever comes first. The `Notified` future is armed
//! before the claim attempt, so a task submitted between "nothing to claim" and "go to sleep"
//! is never missed.

use std::{pin::pin, time::Duration};

use koubou_task::{TaskKind, WorkerId, now_millis};
use tokio_util::sync::CancellationToken;

use crate::{Claimed, QueueError, TaskQueue};

/// Longest a parked worker sleeps without any wake-up: a guard against clocks and against
/// writers the queue cannot see, not a polling interval.
const MAX_PARK: Duration = Duration::from_secs(30);

/// Claims the next task, waiting for one as long as needed; `None` when `stop` fires first.
pub async fn claim_wait<Q: TaskQueue + ?Sized>(
    queue: &Q,
    worker: &WorkerId,
    kinds: Option<&[TaskKind]>,
    lease: Duration,
    stop: &CancellationToken,
) -> Result<Option<Claimed>, QueueError> {
    loop {
        if stop.is_cancelled() {
            return Ok(None);
        }
        let mut notified = pin!(queue.wakeup().notified());
        notified.as_mut().enable();
        if let Some(c) = queue.claim(worker, kinds, lease).await? {
            return Ok(Some(c));
        }
        let park = match queue.next_due().await? {
            Some(due) => Duration::from_millis((due - now_millis()).clamp(1, MAX_PARK.as_millis() as i64) as u64),
            None => MAX_PARK,
        };
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(park) => {}
            _ = stop.cancelled() => return Ok(None),
        }
    }
}
