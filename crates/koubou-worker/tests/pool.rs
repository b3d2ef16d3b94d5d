//! The pool against a real SQLite queue and a scripted slow backend.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use koubou_backend::{
    Backend, BackendError, CancellationToken, GenerateRequest, Generation, Health, Router, TokenSink, TypeRoute,
};
use koubou_queue::{SqliteConfig, SqliteQueue, TaskQueue};
use koubou_task::{EventBus, NewTask, TaskKind, TaskStatus, Usage};
use koubou_worker::{Pool, PoolConfig};

/// Takes `delay` per task, serves `capacity` at once, and honours cancellation.
struct Slow {
    delay: Duration,
    capacity: usize,
}

#[async_trait]
impl Backend for Slow {
    fn name(&self) -> &str {
        "slow"
    }
    fn kind(&self) -> &'static str {
        "exec"
    }
    fn default_model(&self) -> &str {
        "m"
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    async fn health(&self) -> Health {
        Health::up("ok", vec![])
    }
    async fn generate(
        &self,
        req: GenerateRequest,
        sink: &dyn TokenSink,
        cancel: CancellationToken,
    ) -> Result<Generation, BackendError> {
        sink.token("working ");
        tokio::select! {
            _ = tokio::time::sleep(self.delay) => {}
            _ = cancel.cancelled() => return Err(BackendError::Cancelled),
        }
        Ok(Generation {
            text: format!("done: {}", req.prompt),
            usage: Usage::default(),
            model: req.model,
            finish_reason: "stop".into(),
            warnings: vec![],
        })
    }
}

fn setup(delay: Duration, capacity: usize) -> (tempfile::TempDir, Arc<dyn TaskQueue>, Arc<Router>, EventBus) {
    let dir = tempfile::tempdir().unwrap();
    let bus = EventBus::default();
    let q = SqliteQueue::open(dir.path().join("q.db"), SqliteConfig::default(), bus.clone()).unwrap();
    let types = BTreeMap::from([("general".to_string(), TypeRoute { backend: "slow".into(), ..TypeRoute::default() })]);
    let router = Router::new([Arc::new(Slow { delay, capacity }) as Arc<dyn Backend>], types).unwrap();
    (dir, Arc::new(q), Arc::new(router), bus)
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..400 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_up_to_backend_capacity_then_down_when_idle() {
    let (_dir, q, router, bus) = setup(Duration::from_millis(300), 3);
    let cfg = PoolConfig { min_workers: 1, max_workers: 8, cooldown_ms: 50, idle_secs: 1, ..PoolConfig::default() };
    let pool = Pool::start(cfg, "t", q.clone(), router, bus);
    assert_eq!(pool.ceiling(), 3, "capped by what the backend serves at once");
    assert_eq!(pool.workers().len(), 1);
    for i in 0..12 {
        q.submit(NewTask::new(TaskKind::general(), format!("t{i}"))).await.unwrap();
    }
    until("three workers", async || pool.workers().len() == 3).await;
    until("all done", async || q.counts().await.unwrap().completed == 12).await;
    assert!(pool.workers().len() <= 3);
    until("scale down to the minimum", async || pool.workers().len() == 1).await;
    pool.shutdown(Some(Duration::from_secs(1))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_within_grace_or_hands_back() {
    let (_dir, q, router, bus) = setup(Duration::from_secs(30), 2);
    let cfg = PoolConfig { min_workers: 1, max_workers: 1, ..PoolConfig::default() };
    let pool = Pool::start(cfg, "t", q.clone(), router, bus);
    let t = q.submit(NewTask::new(TaskKind::general(), "long")).await.unwrap().task;
    until("running", async || q.get(t.id).await.unwrap().unwrap().status == TaskStatus::Running).await;
    pool.shutdown(Some(Duration::from_millis(200))).await;
    let after = q.get(t.id).await.unwrap().unwrap();
    assert_eq!(after.status, TaskStatus::Pending, "handed back to the queue");
    assert_eq!(after.attempts, 0, "the interrupted attempt does not count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_task_mid_generation() {
    let (_dir, q, router, bus) = setup(Duration::from_secs(30), 1);
    let pool = Pool::start(PoolConfig::default(), "t", q.clone(), router, bus);
    let t = q.submit(NewTask::new(TaskKind::general(), "long")).await.unwrap().task;
    until("running", async || q.get(t.id).await.unwrap().unwrap().status == TaskStatus::Running).await;
    q.cancel(t.id).await.unwrap();
    until("worker free again", async || pool.workers().iter().all(|w| w.state == "idle")).await;
    assert_eq!(q.get(t.id).await.unwrap().unwrap().status, TaskStatus::Cancelled);
    pool.shutdown(Some(Duration::from_millis(100))).await;
}
