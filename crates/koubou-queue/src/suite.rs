// The queue's semantics, the same for every store. Included (`include!`) into each store's
// tests module, which provides `fixture()` (a fresh, empty store location, cleaned up on drop),
// `open(&fixture).await` (the store there, retries after 40 ms) and `open_with(&fixture,
// backoff).await`; opening the same fixture again finds what was stored.

use std::{collections::HashSet, sync::Arc, time::Duration};

use koubou_task::{EventBus, EventKind, NewTask, Priority, TaskKind, TaskStatus, Usage, WorkerId};
use tokio_util::sync::CancellationToken;

use crate::{Completion, Failure, LeaseStatus, Progress, QueueError, TaskQuery, TaskQueue, backoff::Backoff, claim_wait};

fn new(prompt: &str, priority: i64) -> NewTask {
    NewTask { priority: Priority::new(priority).unwrap(), ..NewTask::new(TaskKind::general(), prompt) }
}

fn w(n: usize) -> WorkerId {
    WorkerId::new("test", n)
}

const LEASE: Duration = Duration::from_secs(30);

/// Polls `f` until it yields, with a bound generous enough for a loaded machine.
async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn done(text: &str) -> Completion {
    Completion {
        result: text.into(),
        backend: "b".into(),
        model: "m".into(),
        usage: Usage::new(3, 5),
        warnings: vec![],
        remote: false,
        cost: None,
    }
}

fn failure(retryable: bool) -> Failure {
    Failure {
        error: "boom".into(),
        retryable,
        backend: None,
        model: None,
        remote: None,
        partial: None,
        retry_after: None,
    }
}

#[tokio::test]
async fn priority_then_fifo() {
    let dir = fixture();
    let q = open(&dir).await;
    for (p, prio) in [("a", 5), ("b", 8), ("c", 5), ("d", 10), ("e", 8), ("f", 1)] {
        q.submit(new(p, prio)).await.unwrap();
    }
    let mut order = String::new();
    while let Some(c) = q.claim(&w(1), None, LEASE).await.unwrap() {
        order.push_str(&c.task.prompt);
        assert_eq!(c.task.status, TaskStatus::Running);
        assert_eq!(c.task.attempts, 1);
    }
    assert_eq!(order, "dbeacf");
}

#[tokio::test]
async fn claims_filter_by_kind() {
    let dir = fixture();
    let q = open(&dir).await;
    q.submit(new("g", 5)).await.unwrap();
    q.submit(NewTask::new(TaskKind::parse("code").unwrap(), "c")).await.unwrap();
    let code = [TaskKind::parse("code").unwrap()];
    let c = q.claim(&w(1), Some(&code), LEASE).await.unwrap().unwrap();
    assert_eq!(c.task.prompt, "c");
    assert!(q.claim(&w(1), Some(&code), LEASE).await.unwrap().is_none());
    assert!(q.claim(&w(1), Some(&[]), LEASE).await.unwrap().is_none());
}

/// Many claimers racing over many tasks while many submitters add them: every task is claimed
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_never_double() {
    let dir = fixture();
    let q = Arc::new(open(&dir).await);
    const N: usize = 2000;
    const SUBMITTERS: usize = 16;
    let claimed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let all_claimed = CancellationToken::new();
    let mut claimers = Vec::new();
    for n in 0..32 {
        let (q, claimed, all_claimed) = (q.clone(), claimed.clone(), all_claimed.clone());
        claimers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            // Parked between claims (never giving up on an empty queue while submitters still
            // run) until every task has been claimed by someone.
            while let Some(c) = claim_wait(&*q, &w(n), None, LEASE, &all_claimed).await.unwrap() {
                mine.push(c.task.id);
                q.complete(&c.lease, done("ok")).await.unwrap();
                if claimed.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == N {
                    all_claimed.cancel();
                }
            }
            mine
        }));
    }
    // Submitters start once the claimers are racing, each sending its share all at once.
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|s| {
            let q = q.clone();
            tokio::spawn(async move {
                let mine = (s..N).step_by(SUBMITTERS).map(|i| q.submit(new(&i.to_string(), (i % 10) as i64 + 1)));
                // Polled together: each submit is its own job for the writer's group commit.
                for r in futures::future::join_all(mine).await {
                    r.unwrap();
                }
            })
        })
        .collect();
    let run = async {
        for s in submitters {
            s.await.unwrap();
        }
        let mut seen = HashSet::new();
        for h in claimers {
            for id in h.await.unwrap() {
                assert!(seen.insert(id), "task {id} claimed twice");
            }
        }
        seen
    };
    let seen = tokio::time::timeout(Duration::from_secs(300), run).await.expect("claimers never saw every task");
    assert_eq!(seen.len(), N);
    assert_eq!(q.counts().await.unwrap().completed, N as u64);
}

#[tokio::test]
async fn retry_with_backoff_then_fail() {
    let dir = fixture();
    let q = open(&dir).await;
    let t = q.submit(NewTask { max_attempts: Some(2), ..new("x", 5) }).await.unwrap().task;
    let c = q.claim(&w(1), None, LEASE).await.unwrap().unwrap();
    let after = q.fail(&c.lease, failure(true)).await.unwrap();
    assert_eq!(after.status, TaskStatus::Retrying);
    assert!(q.claim(&w(1), None, LEASE).await.unwrap().is_none(), "claimable before its backoff ended");
    let due = q.next_due().await.unwrap().unwrap();
    assert!(due >= after.available_at);
    // claim_wait sleeps until the backoff ends, then gets it.
    let c = claim_wait(&q, &w(1), None, LEASE, &CancellationToken::new()).await.unwrap().unwrap();
    assert_eq!((c.task.id, c.task.attempts), (t.id, 2));
    let last = q.fail(&c.lease, failure(true)).await.unwrap();
    assert_eq!(last.status, TaskStatus::Failed);
    assert_eq!(last.error.as_deref(), Some("boom"));
    assert!(last.finished_at.is_some());
}

#[tokio::test]
async fn a_retry_after_hint_delays_the_retry_past_the_backoff_up_to_its_cap() {
    let dir = fixture();
    let q = open_with(&dir, Backoff { base_ms: 40, max_ms: 60_000, jitter: 0.0 }).await;
    let hinted = |secs| Failure { retry_after: Some(Duration::from_secs(secs)), ..failure(true) };
    q.submit(new("x", 5)).await.unwrap();
    let c = q.claim(&w(1), None, LEASE).await.unwrap().unwrap();
    let before = koubou_task::now_millis();
    let after = q.fail(&c.lease, hinted(30)).await.unwrap();
    assert_eq!(after.status, TaskStatus::Retrying);
    assert!(
        after.available_at >= before + 30_000,
        "retry at {} (+{} ms)",
        after.available_at,
        after.available_at - before
    );
    assert!(after.available_at <= koubou_task::now_millis() + 30_000);
    // A hint beyond the cap waits the cap.
    q.submit(new("y", 5)).await.unwrap();
    let c = q.claim(&w(1), None, LEASE).await.unwrap().unwrap();
    let before = koubou_task::now_millis();
    let after = q.fail(&c.lease, hinted(3_600)).await.unwrap();
    assert!((before + 60_000..=koubou_task::now_millis() + 60_000).contains(&after.available_at));
}

#[tokio::test]
async fn completion_keeps_cache_counts_and_warnings() {
    let dir = fixture();
    let q = open(&dir).await;
    let t = q.submit(new("x", 5)).await.unwrap().task;
    let c = q.claim(&w(1), None, LEASE).await.unwrap().unwrap();
    let usage = Usage { cache_read_tokens: Some(100), cache_write_tokens: Some(7), ..Usage::new(120, 5) };
    let warnings = vec!["the prompt may not fit".to_owned()];
    let finished = q.complete(&c.lease, Completion { usage, warnings: warnings.clone(), ..done("ok") }).await.unwrap();
    assert_eq!((finished.usage, finished.warnings.clone()), (Some(usage), warnings.clone()));
    drop(q);
    let q = open(&dir).await;
    let read = q.get(t.id).await.unwrap().unwrap();
    assert_eq!((read.usage, read.warnings), (Some(usage), warnings), "kept across a reopen");
}

#[tokio::test]
async fn non_retryable_fails_at_once() {
    let dir = fixture();
    let q = open(&dir).await;
    q.submit(new("x", 5)).await.unwrap();
    let c = q.claim(&w(1), None, LEASE).await.unwrap().unwrap();
    assert_eq!(q.fail(&c.lease, failure(false)).await.unwrap().status, TaskStatus::Failed);
}

#[tokio::test]
async fn expired_lease_requeues_and_fences_the_old_worker() {
    let dir = fixture();
    let q = open(&dir).await;
    q.submit(new("x", 5)).await.unwrap();
    let old = q.claim(&w(1), None, Duration::from_millis(30)).await.unwrap().unwrap();
    let c = claim_wait(&q, &w(2), None, LEASE, &CancellationToken::new()).await.unwrap().unwrap();
    assert_eq!(c.task.id, old.task.id);
    assert_eq!(c.task.attempts, 2);
    assert!(old.cancel.is_cancelled(), "the old worker is told to stop");
    assert!(matches!(q.complete(&old.lease, done("late")).await, Err(QueueError::Conflict { .. })));
    assert_eq!(q.heartbeat(&old.lease, LEASE, Progress::default()).await.unwrap(), LeaseStatus::Lost);
    let t = q.complete(&c.lease, done("on time")).await.unwrap();
    assert_eq!(t.result.as_deref(), Some("on time"));
}

#[tokio::test]
async fn lease_expiry_after_last_attempt_fails() {
    let dir = fixture();
    let q = open(&dir).await;
    q.submit(NewTask { max_attempts: Some(1), ..new("x", 5) }).await.unwrap();
    let c = q.claim(&w(1), None, Duration::from_millis(20)).await.unwrap().unwrap();
    // Claims find the expired lease and fail the task (its only attempt is spent): never hand
    // it out again, however long the wait for the expiry takes.
    let t = until("the lease to expire", async || {
        assert!(q.claim(&w(2), None, LEASE).await.unwrap().is_none(), "a task with no attempts left was handed out");
        let t = q.get(c.task.id).await.unwrap().unwrap();
        (t.status == TaskStatus::Failed).then_some(t)
    })
    .await;
    assert!(t.error.unwrap().contains("lease expired"));
}

#[tokio::test]
async fn heartbeat_renews_and_records_progress() {
    let dir = fixture();
    let q = open(&dir).await;
    q.submit(new("x", 5)).await.unwrap();
    let c = q.claim(&w(1), None, Duration::from_millis(200)).await.unwrap().unwrap();
    let claimed_until = q.get(c.task.id).await.unwrap().unwrap().lease_until.unwrap();
    let p = Progress { backend: Some("ollama"), model: Some("gemma2:2b"), remote: Some(false), partial: Some("Hel") };
    let before = koubou_task::now_millis();
    assert_eq!(q.heartbeat(&c.lease, LEASE, p).await.unwrap(), LeaseStatus::Held);
    let t = q.get(c.task.id).await.unwrap().unwrap();
    assert_eq!((t.partial.as_deref(), t.backend.as_deref(), t.remote), (Some("Hel"), Some("ollama"), Some(false)));
    assert!(t.lease_until.unwrap() >= before + LEASE.as_millis() as i64, "renewed for the whole ttl");
    // Past the lease it was claimed with, the renewed one still holds.
    until("the first lease to run out", async || (koubou_task::now_millis() > claimed_until + 50).then_some(())).await;
    assert!(q.claim(&w(2), None, LEASE).await.unwrap().is_none(), "renewed lease must not expire");
}

#[tokio::test]
async fn cancel_pending_and_running() {
    let dir = fixture();
    let q = open(&dir).await;
    let a = q.submit(new("a", 9)).await.unwrap().task;
    let b = q.submit(new("b", 1)).await.unwrap().task;
    let c = q.claim(&w(1), None, LEASE).await.unwrap().unwrap();
    assert_eq!(c.task.id, a.id);
    assert_eq!(q.cancel(b.id).await.unwrap().status, TaskStatus::Cancelled);
    assert!(q.claim(&w(2), None, LEASE).await.unwrap().is_none(), "a cancelled task is never claimed");
    q.cancel(a.id).await.unwrap();
    assert!(c.cancel.is_cancelled(), "the running worker's token fires");
    assert_eq!(q.heartbeat(&c.lease, LEASE, Progress::default()).await.unwrap(), LeaseStatus::Cancelled);
    assert!(matches!(q.complete(&c.lease, done("x")).await, Err(QueueError::Conflict { .. })));
    assert!(matches!(q.cancel(a.id).await, Err(QueueError::Conflict { status: TaskStatus::Cancelled, .. })));
    assert!(matches!(q.cancel(koubou_task::TaskId::new()).await, Err(QueueError::NotFound(_))));
}

#[tokio::test]
async fn release_gives_the_attempt_back() {
    let dir = fixture();
    let q = open(&dir).await;
    q.submit(new("a", 5)).await.unwrap();
    let c = q.claim(&w(1), None, LEASE).await.unwrap().unwrap();
    q.release(&c.lease).await.unwrap();
    let again = q.claim(&w(2), None, LEASE).await.unwrap().unwrap();
    assert_eq!(again.task.attempts, 1);
}

#[tokio::test]
async fn idempotency_key_returns_the_first_task() {
    let dir = fixture();
    let q = open(&dir).await;
    let mut n = new("a", 5);
    n.idempotency_key = Some("k1".into());
    let first = q.submit(n.clone()).await.unwrap();
    let second = q.submit(n).await.unwrap();
    assert!(first.created && !second.created);
    assert_eq!(first.task.id, second.task.id);
    assert_eq!(q.counts().await.unwrap().pending, 1);
}

#[tokio::test]
async fn recover_node_requeues_its_running_tasks() {
    let dir = fixture();
    let q = open(&dir).await;
    q.submit(new("a", 5)).await.unwrap();
    q.submit(new("b", 5)).await.unwrap();
    q.claim(&WorkerId::new("serve", 1), None, LEASE).await.unwrap().unwrap();
    q.claim(&WorkerId::new("other", 1), None, LEASE).await.unwrap().unwrap();
    assert_eq!(q.recover_node("serve").await.unwrap(), 1);
    let c = q.counts().await.unwrap();
    assert_eq!((c.pending, c.running), (1, 1));
}

#[tokio::test]
async fn survives_reopen() {
    let dir = fixture();
    let id = {
        let q = open(&dir).await;
        q.submit(new("keep me", 5)).await.unwrap().task.id
    };
    let q = open(&dir).await;
    assert_eq!(q.get(id).await.unwrap().unwrap().prompt, "keep me");
}

#[tokio::test]
async fn list_filters_and_pages_newest_first() {
    let dir = fixture();
    let q = open(&dir).await;
    for i in 0..25 {
        let kind = if i % 2 == 0 { "general" } else { "code" };
        q.submit(NewTask::new(TaskKind::parse(kind).unwrap(), format!("prompt {i} 100%"))).await.unwrap();
    }
    let page = q.list(TaskQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(page.total, 25);
    assert_eq!(page.tasks[0].prompt, "prompt 24 100%");
    let page2 = q.list(TaskQuery { limit: 10, before: page.next_cursor, ..Default::default() }).await.unwrap();
    assert_eq!(page2.tasks[0].prompt, "prompt 14 100%");
    let page3 = q.list(TaskQuery { limit: 10, before: page2.next_cursor, ..Default::default() }).await.unwrap();
    assert_eq!((page3.tasks.len(), page3.next_cursor), (5, None));
    let code = q
        .list(TaskQuery { limit: 100, kind: Some(TaskKind::parse("code").unwrap()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(code.total, 12);
    let found = q.list(TaskQuery { limit: 100, search: Some("t 7 1".into()), ..Default::default() }).await.unwrap();
    assert_eq!(found.total, 1);
    let pct = q.list(TaskQuery { limit: 100, search: Some("0%".into()), ..Default::default() }).await.unwrap();
    assert_eq!(pct.total, 25, "% is matched literally");
    let pending =
        q.list(TaskQuery { limit: 5, statuses: vec![TaskStatus::Running], ..Default::default() }).await.unwrap();
    assert_eq!(pending.total, 0);
}

#[tokio::test]
async fn position_counts_who_goes_first() {
    let dir = fixture();
    let q = open(&dir).await;
    let a = q.submit(new("a", 5)).await.unwrap().task;
    let b = q.submit(new("b", 5)).await.unwrap().task;
    let c = q.submit(new("c", 9)).await.unwrap().task;
    assert_eq!(q.position(a.id).await.unwrap().unwrap().ahead, 1);
    assert_eq!(q.position(b.id).await.unwrap().unwrap().ahead, 2);
    assert_eq!(q.position(c.id).await.unwrap().unwrap().ahead, 0);
    q.claim(&w(1), None, LEASE).await.unwrap();
    assert_eq!(q.position(c.id).await.unwrap(), None);
}

/// Events are published after commit, in order, with the task's story complete.
#[tokio::test]
async fn events_tell_the_story() {
    let dir = fixture();
    let q = open(&dir).await;
    let mut rx = q.bus().subscribe();
    let t = q.submit(new("a", 5)).await.unwrap().task;
    let c = q.claim(&w(1), None, LEASE).await.unwrap().unwrap();
    q.complete(&c.lease, done("ok")).await.unwrap();
    let mut names = Vec::new();
    for _ in 0..3 {
        let e = rx.recv().await.unwrap();
        assert_eq!(e.kind.task_id(), Some(t.id));
        names.push(e.kind.name());
    }
    assert_eq!(names, ["task_created", "task_claimed", "task_completed"]);
    let snapshot = q.get(t.id).await.unwrap().unwrap();
    insta::assert_json_snapshot!("completed_task", snapshot, {
        ".id" => "[id]", ".created_at" => "[t]", ".started_at" => "[t]", ".finished_at" => "[t]", ".available_at" => "[t]"
    });
}

/// A parked worker wakes as soon as a task arrives.
#[tokio::test]
async fn idle_worker_wakes_on_submit() {
    let dir = fixture();
    let q = Arc::new(open(&dir).await);
    let q2 = q.clone();
    let waiter = tokio::spawn(async move { claim_wait(&*q2, &w(1), None, LEASE, &CancellationToken::new()).await });
    // Give it time to find nothing and park. (Only an absence is asserted: a busy machine can
    // make the pause too short to reach the park, never make the assertion false.)
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "claim_wait returned with nothing to claim");
    let t = q.submit(new("wake", 5)).await.unwrap().task;
    let got = tokio::time::timeout(Duration::from_secs(120), waiter).await.unwrap().unwrap().unwrap().unwrap();
    assert_eq!(got.task.id, t.id);
    let stop = CancellationToken::new();
    stop.cancel();
    assert!(claim_wait(&*q, &w(1), None, LEASE, &stop).await.unwrap().is_none());
    let _ = EventKind::TaskCancelled { task_id: t.id };
}

/// `submit_bounded` counts exactly what waits (pending + retrying), through every change of state.
#[tokio::test]
async fn a_full_queue_refuses_and_the_count_follows_every_state_change() {
    let dir = fixture();
    let q = open(&dir).await;
    let limit = Some(3);
    let mut keyed = new("keyed", 5);
    keyed.idempotency_key = Some("k".into());
    let first = q.submit_bounded(keyed.clone(), limit).await.unwrap();
    q.submit_bounded(new("b", 5), limit).await.unwrap();
    q.submit_bounded(new("c", 1), limit).await.unwrap();
    assert_eq!(q.queued(), 3);
    match q.submit_bounded(new("d", 5), limit).await {
        Err(QueueError::Full { queued: 3, limit: 3 }) => {}
        other => panic!("expected Full, got {other:?}"),
    }
    let again = q.submit_bounded(keyed, limit).await.unwrap();
    assert!(!again.created && again.task.id == first.task.id, "an idempotent resubmission is never refused");
    assert_eq!(q.counts().await.unwrap().total(), 3, "the refused task was not stored");

    let c = q.claim(&w(1), None, LEASE).await.unwrap().unwrap();
    assert_eq!(q.queued(), 2);
    q.submit_bounded(new("d", 5), limit).await.unwrap();
    q.fail(&c.lease, failure(true)).await.unwrap(); // retrying counts as waiting
    assert_eq!(q.queued(), 4);
    let c2 = q.claim(&w(2), None, LEASE).await.unwrap().unwrap();
    q.release(&c2.lease).await.unwrap();
    assert_eq!(q.queued(), 4);
    q.cancel(c2.task.id).await.unwrap();
    let c3 = q.claim(&w(3), None, LEASE).await.unwrap().unwrap();
    q.cancel(c3.task.id).await.unwrap(); // a running task leaves nothing to uncount
    q.recover_node("test").await.unwrap();
    let counts = q.counts().await.unwrap();
    assert_eq!(q.queued(), counts.pending + counts.retrying);
    drop(q);
    assert_eq!(open(&dir).await.queued(), counts.pending + counts.retrying, "counted again on open");
}

#[tokio::test]
async fn tags_format_and_where_it_ran_are_stored_and_filtered() {
    let dir = fixture();
    let q = open(&dir).await;
    let mut a = new("a", 5);
    a.tags = vec!["confidential".into(), "team:a".into()];
    a.schema = Some(serde_json::json!({"type": "object"}));
    let a = q.submit(a).await.unwrap().task;
    assert!(a.json, "a schema implies json");
    let mut b = new("b", 5);
    b.tags = vec!["team:b".into()];
    b.json = true;
    q.submit(b).await.unwrap();
    q.submit(new("c", 5)).await.unwrap();
    let tagged = |tag: &str| {
        let q = &q;
        let tag = tag.to_owned();
        async move {
            let page = q.list(TaskQuery { limit: 10, tag: Some(tag), ..Default::default() }).await.unwrap();
            page.tasks.into_iter().map(|t| t.prompt).collect::<Vec<_>>()
        }
    };
    assert_eq!(tagged("confidential").await, ["a"]);
    assert_eq!(tagged("team:b").await, ["b"]);
    assert!(tagged("team").await.is_empty(), "whole tags only");
    let got = q.get(a.id).await.unwrap().unwrap();
    assert_eq!(got.tags, ["confidential", "team:a"]);
    assert_eq!(got.schema, Some(serde_json::json!({"type": "object"})));
    assert_eq!((got.remote, got.cost), (None, None));

    let c = q.claim(&w(1), None, LEASE).await.unwrap().unwrap();
    let paid = Completion {
        remote: true,
        cost: Some(0.0105),
        usage: Usage { cache_read_tokens: Some(200), ..Usage::new(1000, 500) },
        ..done("ok")
    };
    let t = q.complete(&c.lease, paid).await.unwrap();
    assert_eq!((t.remote, t.cost), (Some(true), Some(0.0105)));
    assert_eq!(t.usage.unwrap().cache_read_tokens, Some(200));
    drop(q);
    let again = open(&dir).await.get(t.id).await.unwrap().unwrap();
    assert_eq!(
        (again.tags.len(), again.json, again.remote, again.cost),
        (2, true, Some(true), Some(0.0105)),
        "kept across a reopen"
    );
}
