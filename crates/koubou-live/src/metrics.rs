//! One metrics sample every [`SAMPLE_EVERY`], shared by every live client of a router.
//!
//! Rates and latencies come from the event bus; queue depth and worker counts from one
//! `status()` per sample — taken only while someone is watching, never once per client.

use std::{
    collections::VecDeque,
    sync::{Arc, Weak},
    time::Duration,
};

use futures::StreamExt;
use koubou_api::{Api, EventFeed};
use koubou_task::{EventKind, Millis, now_millis};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;

/// How often a sample is taken.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept for charts drawn when a page opens.
pub const HISTORY: usize = 300;

/// One point of the dashboard's charts.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MetricsSample {
    /// Milliseconds since the Unix epoch.
    pub at: Millis,
    /// Pending plus retrying tasks.
    pub queue_depth: u64,
    pub running: u64,
    pub completed_tasks: u64,
    pub failed_tasks: u64,
    pub cancelled_tasks: u64,
    pub active_workers: usize,
    pub busy_workers: usize,
    /// Tasks that finished per second since the previous sample.
    pub throughput_per_sec: f64,
    /// Tokens streamed per second since the previous sample.
    pub tokens_per_sec: f64,
    /// Mean submit-to-finish time of tasks completed since the previous sample.
    pub latency_ms: Option<f64>,
    pub rss_bytes: u64,
}

struct Shared {
    tx: watch::Sender<Option<MetricsSample>>,
    history: Mutex<VecDeque<MetricsSample>>,
}

/// Handle on the sampler; it stops when the last handle is dropped.
#[derive(Clone)]
pub struct Sampler {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Window {
    finished: u64,
    tokens: u64,
    latency_sum: f64,
    latency_n: u64,
}

impl Sampler {
    pub fn start(k: Arc<dyn Api>) -> Sampler {
        let shared = Arc::new(Shared { tx: watch::channel(None).0, history: Mutex::new(VecDeque::new()) });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(run(k, weak));
        Sampler { shared }
    }

    pub fn receiver(&self) -> watch::Receiver<Option<MetricsSample>> {
        self.shared.tx.subscribe()
    }

    /// Recent samples, oldest first.
    pub fn history(&self) -> Vec<MetricsSample> {
        self.shared.history.lock().iter().cloned().collect()
    }

    /// Takes a sample now if none was taken yet (so a page that just opened has a point).
    pub async fn latest(&self, k: &dyn Api) -> Option<MetricsSample> {
        if let Some(s) = self.shared.tx.borrow().clone() {
            return Some(s);
        }
        sample(k, &Window::default(), SAMPLE_EVERY).await
    }
}

async fn sample(k: &dyn Api, w: &Window, span: Duration) -> Option<MetricsSample> {
    let s = k.status().await.ok()?;
    let secs = span.as_secs_f64().max(0.001);
    Some(MetricsSample {
        at: now_millis(),
        queue_depth: s.pending_tasks,
        running: s.running_tasks,
        completed_tasks: s.completed_tasks,
        failed_tasks: s.failed_tasks,
        cancelled_tasks: s.cancelled_tasks,
        active_workers: s.active_workers,
        busy_workers: s.busy_workers,
        throughput_per_sec: w.finished as f64 / secs,
        tokens_per_sec: w.tokens as f64 / secs,
        latency_ms: (w.latency_n > 0).then(|| w.latency_sum / w.latency_n as f64),
        rss_bytes: s.rss_bytes,
    })
}

async fn run(k: Arc<dyn Api>, shared: Weak<Shared>) {
    // Without the event feed the samples still carry counts, only no rates.
    let mut bus: EventFeed = k.events(None).await.unwrap_or_else(|_| Box::pin(futures::stream::pending()));
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut w = Window::default();
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            e = bus.next() => match e {
                Some(Ok(e)) => match &e.kind {
                    EventKind::TaskToken { .. } => w.tokens += 1,
                    EventKind::TaskCompleted { latency_ms, .. } => {
                        w.finished += 1;
                        w.latency_sum += *latency_ms as f64;
                        w.latency_n += 1;
                    }
                    EventKind::TaskCancelled { .. } => w.finished += 1,
                    EventKind::TaskFailed { status, .. } if status.is_terminal() => w.finished += 1,
                    _ => {}
                },
                Some(Err(_lagged)) => {}
                None => return,
            },
            _ = tick.tick() => {
                let Some(shared) = shared.upgrade() else { return };
                let span = last.elapsed();
                last = tokio::time::Instant::now();
                let window = std::mem::take(&mut w);
                // Nobody watching: keep no history and ask the database nothing.
                if shared.tx.receiver_count() == 0 {
                    continue;
                }
                if let Some(s) = sample(&*k, &window, span).await {
                    let mut h = shared.history.lock();
                    h.push_back(s.clone());
                    while h.len() > HISTORY {
                        h.pop_front();
                    }
                    drop(h);
                    shared.tx.send_replace(Some(s));
                }
            }
        }
    }
}
