//! Watching one task's events (`Api::watch`, behind GET /task/<id>/events, WebSocket and
//! GraphQL subscriptions) leaves nothing registered once the watch is over, however it ends:
//! an unknown task, a finished one, a client that goes away, the task's own end, a wait that
//! gives up.

use std::time::Duration;

use futures::StreamExt;
use koubou_api::{Api, ApiError, SubmitRequest, TaskView};
use koubou_system::{Config, Home, Koubou, StartOptions};
use koubou_task::{EventKind, NewTask, TaskId, TaskKind};

/// A system without workers: what is submitted stays pending until cancelled.
async fn system(dir: &tempfile::TempDir) -> Koubou {
    let cfg =
        Config::parse("[backends.instant]\nkind = \"echo\"\n[types.general]\nbackend = \"instant\"\n", "test").unwrap();
    let opts = StartOptions { node: "watch-test".into(), workers: false, ..StartOptions::default() };
    Koubou::start(cfg, &Home { dir: dir.path().to_owned() }, opts).await.unwrap()
}

async fn submit(k: &Koubou) -> TaskId {
    let req = SubmitRequest { task: NewTask::new(TaskKind::general(), "wait for me"), sync: false, wait_secs: None };
    k.submit(req).await.unwrap().task_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_watcher_outlives_its_watch() {
    let dir = tempfile::tempdir().unwrap();
    let k = system(&dir).await;
    assert_eq!(k.live().watchers(), 0);

    // An unknown task: an error, and nothing left registered.
    assert!(matches!(k.watch(TaskId::new()).await, Err(ApiError::NotFound(_))));
    assert_eq!(k.live().watchers(), 0, "a watch of an unknown task stayed registered");

    // A client that goes away while its task is still pending.
    let id = submit(&k).await;
    let stream = k.watch(id).await.unwrap();
    assert_eq!(k.live().watchers(), 1);
    drop(stream);
    assert_eq!(k.live().watchers(), 0, "a dropped watch stayed registered");

    // A finished task: one event telling how it ended, and nothing registered even meanwhile.
    k.cancel(id).await.unwrap();
    let mut stream = k.watch(id).await.unwrap();
    assert_eq!(k.live().watchers(), 0, "a watch of a finished task stayed registered");
    let only = stream.next().await.unwrap().unwrap();
    assert!(matches!(only.kind, EventKind::TaskCancelled { .. }), "{only:?}");
    assert!(stream.next().await.is_none());

    // A watch that the task's own end closes.
    let id = submit(&k).await;
    let stream = k.watch(id).await.unwrap();
    k.cancel(id).await.unwrap();
    let events: Vec<_> = tokio::time::timeout(Duration::from_secs(60), stream.collect::<Vec<_>>()).await.unwrap();
    assert!(matches!(events.last().unwrap().as_ref().unwrap().kind, EventKind::TaskCancelled { .. }));
    assert_eq!(k.live().watchers(), 0);

    // A wait that gives up on a task still pending.
    let id = submit(&k).await;
    let v: TaskView = k.wait(id, Duration::from_millis(50), &|_| {}).await.unwrap();
    assert_eq!(v.status.as_str(), "pending");
    assert_eq!(k.live().watchers(), 0, "a wait that timed out left its watch registered");
    k.shutdown(Some(Duration::from_secs(1))).await;
}

/// A watch opened after its task began (a client that submits, then watches) starts with what
/// the log keeps about the task, then goes on live: every token once, in order, and none of
/// another task's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_watch_replays_the_tasks_kept_events_first() {
    use koubou_task::EventLog;
    let dir = tempfile::tempdir().unwrap();
    let k = system(&dir).await;
    let id = submit(&k).await;
    let other = submit(&k).await;
    let token = |task_id, text: &str| EventKind::TaskToken { task_id, text: text.into() };
    k.bus().publish(token(id, "a"));
    k.bus().publish(token(other, "x"));
    k.bus().publish(token(id, "b"));
    let stream = k.watch(id).await.unwrap();
    k.bus().publish(token(id, "c"));
    k.cancel(id).await.unwrap();
    let events: Vec<_> = tokio::time::timeout(Duration::from_secs(60), stream.collect::<Vec<_>>()).await.unwrap();
    let seen: Vec<String> = events
        .into_iter()
        .map(|e| match e.unwrap().kind {
            EventKind::TaskToken { task_id, text } => {
                format!("token {text}{}", if task_id == id { "" } else { " (other)" })
            }
            kind => kind.name().to_owned(),
        })
        .collect();
    assert_eq!(seen, ["task_created", "token a", "token b", "token c", "task_cancelled"]);
    k.shutdown(Some(Duration::from_secs(1))).await;
}
