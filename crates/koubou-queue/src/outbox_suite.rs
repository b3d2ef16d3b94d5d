// The outbox an outside dispatcher drives (`crate::outbox`), the same for every store. Included
// after `suite.rs` (whose helpers it uses) by each store's tests module.

use crate::outbox::Outbox;

/// The prompts of the outbox's tasks, in its order.
async fn outbox_prompts<Q: Outbox>(q: &Q) -> Vec<String> {
    let mut prompts = Vec::new();
    for u in q.undispatched(100).await.unwrap() {
        prompts.push(q.get(u.id).await.unwrap().unwrap().prompt);
    }
    prompts
}

#[tokio::test]
async fn the_outbox_holds_what_no_confirmed_delivery_covers() {
    let dir = fixture();
    let q = open(&dir).await;
    let a = q.submit(new("a", 5)).await.unwrap().task;
    let b = q.submit(new("b", 9)).await.unwrap().task;
    let c = q.submit(new("c", 5)).await.unwrap().task;
    let out = q.undispatched(100).await.unwrap();
    assert_eq!(out.iter().map(|u| u.id).collect::<Vec<_>>(), [b.id, a.id, c.id], "most urgent first");
    assert_eq!((out[0].priority.get(), out[0].claims, out[0].kind.as_str()), (9, 0, "general"));
    assert_eq!(q.undispatched(1).await.unwrap().len(), 1);

    q.mark_dispatched(vec![(a.id, 0), (b.id, 0)]).await.unwrap();
    assert_eq!(outbox_prompts(&q).await, ["c"]);

    // A claim uses the delivery up: released, the task needs a new one, and a mark made for
    // the old claim count changes nothing.
    let claimed = q.claim_id(a.id, &w(1), LEASE).await.unwrap().unwrap();
    assert_eq!((claimed.task.id, claimed.task.status, claimed.lease.attempt), (a.id, TaskStatus::Running, 1));
    q.release(&claimed.lease).await.unwrap();
    q.mark_dispatched(vec![(a.id, 0)]).await.unwrap();
    assert_eq!(outbox_prompts(&q).await, ["a", "c"]);
    let again = q.undispatched(100).await.unwrap();
    assert_eq!(again[0].claims, 1);
    q.mark_dispatched(vec![(a.id, 1), (c.id, 0)]).await.unwrap();
    assert!(q.undispatched(100).await.unwrap().is_empty());

    // A cancelled task leaves the outbox.
    let d = q.submit(new("d", 5)).await.unwrap().task;
    q.cancel(d.id).await.unwrap();
    assert!(q.undispatched(100).await.unwrap().is_empty());
}

#[tokio::test]
async fn claim_id_claims_exactly_that_task_when_claimable() {
    let dir = fixture();
    let q = open(&dir).await;
    let mut rx = q.bus().subscribe();
    let a = q.submit(new("a", 1)).await.unwrap().task;
    let b = q.submit(new("b", 9)).await.unwrap().task;
    let c = q.claim_id(a.id, &w(1), LEASE).await.unwrap().unwrap();
    assert_eq!(c.task.id, a.id, "the given task, not the most urgent one");
    assert_eq!(q.queued(), 1);
    assert!(q.claim_id(a.id, &w(2), LEASE).await.unwrap().is_none(), "running: not claimable");
    assert!(q.claim_id(TaskId::new(), &w(2), LEASE).await.unwrap().is_none(), "unknown");
    q.cancel(b.id).await.unwrap();
    assert!(q.claim_id(b.id, &w(2), LEASE).await.unwrap().is_none(), "cancelled");
    let names: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(|e| e.kind.name()).collect();
    assert_eq!(names, ["task_created", "task_created", "task_claimed", "task_cancelled"]);

    // Retrying: not before its backoff is over, then claimable (and in the outbox).
    let after = q.fail(&c.lease, failure(true)).await.unwrap();
    assert_eq!(after.status, TaskStatus::Retrying);
    assert!(q.claim_id(a.id, &w(2), LEASE).await.unwrap().is_none(), "claimed before its backoff ended");
    let out = until("the retry to fall due", async || {
        let out = q.undispatched(10).await.unwrap();
        (!out.is_empty()).then_some(out)
    })
    .await;
    assert_eq!((out[0].id, out[0].claims), (a.id, 1));
    let again = q.claim_id(a.id, &w(2), LEASE).await.unwrap().unwrap();
    assert_eq!(again.task.attempts, 2);
    // Its lease runs out: requeued, in the outbox again, and the old holder is fenced.
    q.heartbeat(&again.lease, Duration::from_millis(1), Progress::default()).await.unwrap();
    let out = until("the lease to run out", async || {
        let out = q.undispatched(10).await.unwrap();
        (!out.is_empty()).then_some(out)
    })
    .await;
    assert_eq!((out[0].id, out[0].claims), (a.id, 2));
    assert!(again.cancel.is_cancelled());
    let third = q.claim_id(a.id, &w(3), LEASE).await.unwrap().unwrap();
    assert_eq!(third.task.attempts, 3);
    assert!(matches!(q.complete(&again.lease, done("late")).await, Err(QueueError::Conflict { .. })));
}
