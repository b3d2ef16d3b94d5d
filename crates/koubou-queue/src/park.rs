//! Parking idle workers without polling: [`Dispatch::claim_wait`](crate::Dispatch::claim_wait)
//! for every queue here, crate-private (callers only see `claim_wait`).
//!
//! A worker that finds nothing to claim sleeps until the queue's wake-up fires (a task was
//! submitted, released or requeued: SQLite's writer notifies one parked worker per such task
//! after its commit; Redis's and RabbitMQ's after the script or the confirmed publish, and on
//! news from other nodes) or until the queue's next due moment (a retry's backoff ends, a lease
//! runs out) — whichever comes first. The `Notified` future is armed before the claim attempt,
//! so a task submitted between "nothing to claim" and "go to sleep" is never missed.

use std::{pin::pin, time::Duration};

use async_trait::async_trait;
use koubou_task::{Millis, WorkerId, now_millis};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{Capabilities, Claimed, Dispatch, QueueError};

/// Longest a parked worker sleeps without any wake-up: a guard against clocks and against
/// writers the queue cannot see, not a polling interval.
const MAX_PARK: Duration = Duration::from_secs(30);

/// What parking needs from a queue besides its claim.
#[async_trait]
pub(crate) trait Parking: Dispatch {
    /// Fires whenever a task may have become claimable.
    fn wakeup(&self) -> &Notify;
    /// The next moment something falls due without any new write (a retry, a lease expiry).
    async fn next_due(&self) -> Result<Option<Millis>, QueueError>;
}

/// Claims the next task, waiting for one as long as needed; `None` when `stop` fires first.
pub(crate) async fn claim_wait<Q: Parking + ?Sized>(
    queue: &Q,
    worker: &WorkerId,
    caps: &Capabilities,
    lease: Duration,
    stop: &CancellationToken,
) -> Result<Option<Claimed>, QueueError> {
    loop {
        if stop.is_cancelled() {
            return Ok(None);
        }
        let mut notified = pin!(queue.wakeup().notified());
        notified.as_mut().enable();
        if let Some(c) = queue.claim(worker, caps, lease).await? {
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
