//! `cargo bench -p koubou-queue`: the queue alone, on a real SQLite file.
//!
//! - one task at a time: submit → claim → complete, median and p99 of the whole cycle;
//! - throughput: N tasks submitted by 64 concurrent submitters while 8 workers claim and complete.

use std::{sync::Arc, time::Instant};

use koubou_queue::{Capabilities, Completion, Dispatch, SqliteConfig, SqliteQueue, TaskStore};
use koubou_task::{EventBus, NewTask, TaskKind, Usage, WorkerId};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p) as usize]
}

fn done() -> Completion {
    Completion {
        result: "ok".into(),
        backend: "b".into(),
        model: "m".into(),
        usage: Usage::default(),
        warnings: vec![],
        remote: false,
        cost: None,
    }
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let q = Arc::new(
        SqliteQueue::open(dir.path().join("bench.db"), SqliteConfig::default(), Arc::new(EventBus::default())).unwrap(),
    );
    let lease = std::time::Duration::from_secs(30);
    let w = WorkerId::new("bench", 1);

    let mut cycle = Vec::new();
    for i in 0..2000 {
        let t = Instant::now();
        q.submit(NewTask::new(TaskKind::general(), format!("t{i}"))).await.unwrap();
        let c = q.claim(&w, &Capabilities::any(), lease).await.unwrap().unwrap();
        q.complete(&c.lease, done()).await.unwrap();
        cycle.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "sequential submit+claim+complete: p50 {:.0} µs, p99 {:.0} µs",
        pct(&mut cycle, 0.5),
        pct(&mut cycle, 0.99)
    );

    const N: usize = 50_000;
    let started = Instant::now();
    let submitters: Vec<_> = (0..64)
        .map(|s| {
            let q = q.clone();
            tokio::spawn(async move {
                for i in (s..N).step_by(64) {
                    q.submit(NewTask::new(TaskKind::general(), format!("x{i}"))).await.unwrap();
                }
            })
        })
        .collect();
    let workers: Vec<_> = (0..8)
        .map(|n| {
            let q = q.clone();
            tokio::spawn(async move {
                let w = WorkerId::new("bench", n);
                let stop = tokio_util::sync::CancellationToken::new();
                let mut n = 0usize;
                while let Some(c) = tokio::time::timeout(
                    std::time::Duration::from_millis(500),
                    q.claim_wait(&w, &Capabilities::any(), lease, &stop),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
                {
                    q.complete(&c.lease, done()).await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    for s in submitters {
        s.await.unwrap();
    }
    let mut completed = 0;
    for w in workers {
        completed += w.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64() - 0.5;
    println!(
        "throughput: {completed} tasks submitted, claimed and completed in {secs:.2} s = {:.0} tasks/s",
        completed as f64 / secs
    );
}
