//! Parking idle workers without polling ([`Dispatch::claim_wait`](crate::Dispatch::claim_wait)
//! for SQLite).
//!
//! A worker that finds nothing to claim sleeps until the queue's wake-up fires (a task was
//! submitted, released or requeued: the writer notifies one parked worker per such task after
//! its commit) or until the queue's next due moment (a retry's backoff ends, a lease runs out) —
//! whichever comes first. The `Notified` future is armed before the claim attempt, so a task
//! submitted between "nothing to claim" and "go to sleep" is never missed.

use std::{pin::pin, time::Duration};

use koubou_task::{WorkerId, now_millis};
use tokio_util::sync::CancellationToken;

use super::SqliteQueue;
use crate::{Capabilities, Claimed, Dispatch, QueueError};

/// Longest a parked worker sleeps without any wake-up: a guard against clocks and against
/// writers the queue cannot see, not a polling interval.
const MAX_PARK: Duration = Duration::from_secs(30);

/// Claims the next task, waiting for one as long as needed; `None` when `stop` fires first.
pub(super) async fn claim_wait(
    queue: &SqliteQueue,
    worker: &WorkerId,
    caps: &Capabilities,
    lease: Duration,
    stop: &CancellationToken,
) -> Result<Option<Claimed>, QueueError> {
    loop {
        if stop.is_cancelled() {
            return Ok(None);
        }
        let mut notified = pin!(queue.shared.wakeup.notified());
        notified.as_mut().enable();
        if let Some(c) = queue.claim(worker, caps, lease).await? {
            return Ok(Some(c));
        }
        let park = match queue.next_due() {
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
