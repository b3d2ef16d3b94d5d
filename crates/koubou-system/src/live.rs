//! What the system learns from its event log: the answers of running tasks as they stream,
//! counters and histograms for `/metrics`, and recent throughput for estimates and charts.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use futures::StreamExt;
use koubou_api::Second;
use koubou_task::{Event, EventKind, EventLog, Lagged, Millis, TaskId};
use parking_lot::Mutex;
use tokio::sync::mpsc;

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// A Prometheus-style cumulative histogram.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, secs: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; LATENCY_BUCKETS.len()];
        }
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }
}

/// Counters since start.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub created: u64,
    pub completed: u64,
    pub failed: u64,
    pub retried: u64,
    pub cancelled: u64,
    pub requeued: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency: Histogram,
    pub run_time: Histogram,
    pub backend_up: HashMap<String, bool>,
}

/// A watch's number and where its task's events go.
type Watcher = (u64, mpsc::UnboundedSender<Arc<Event>>);

#[derive(Default)]
struct State {
    /// Per-task subscribers (`watch`): events are routed here once, not fanned out to every
    /// waiter through the broadcast channel. Each is numbered so that its [`Watch`] can take it
    /// out when dropped.
    watchers: HashMap<TaskId, Vec<Watcher>>,
    next_watcher: u64,
    partials: HashMap<TaskId, String>,
    started: HashMap<TaskId, Millis>,
    counters: Counters,
    seconds: VecDeque<Second>,
}

/// Live state kept from the bus.
#[derive(Clone, Default)]
pub struct Live {
    state: Arc<Mutex<State>>,
}

const HISTORY_SECS: usize = 600;

/// One task's events, as [`Live::watch_task`] hands them out; unregisters itself when dropped.
pub struct Watch {
    rx: mpsc::UnboundedReceiver<Arc<Event>>,
    live: Live,
    task: TaskId,
    n: u64,
}

impl futures::Stream for Watch {
    type Item = Arc<Event>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Arc<Event>>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.live.unwatch(self.task, self.n);
    }
}

impl Live {
    /// Starts following the log.
    pub fn follow(log: &dyn EventLog) -> Live {
        let live = Live::default();
        // Watchers are served as the log publishes (in-process: no hop through this task).
        let l = live.clone();
        log.follow(Arc::new(move |e| l.route(e)));
        let mut rx = log.subscribe(None);
        let l = live.clone();
        tokio::spawn(async move {
            while let Some(e) = rx.next().await {
                match e {
                    Ok(e) => l.apply(&e),
                    Err(Lagged(n)) => tracing::warn!(missed = n, "live state fell behind the event log"),
                }
            }
        });
        live
    }

    /// Delivers an event to the watchers of its task; a terminal event ends their watch.
    fn route(&self, e: &Arc<Event>) {
        let Some(id) = e.kind.task_id() else { return };
        let mut s = self.state.lock();
        if let Some(ws) = s.watchers.get_mut(&id) {
            ws.retain(|(_, w)| w.send(e.clone()).is_ok());
            if e.kind.is_terminal() || ws.is_empty() {
                s.watchers.remove(&id);
            }
        }
    }

    /// Events about `id` from now on, until its terminal event (or until the [`Watch`] is
    /// dropped, which unregisters it: a watch of a finished or unknown task costs nothing after).
    pub fn watch_task(&self, id: TaskId) -> Watch {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.state.lock();
        let n = s.next_watcher;
        s.next_watcher += 1;
        s.watchers.entry(id).or_default().push((n, tx));
        Watch { rx, live: self.clone(), task: id, n }
    }

    /// Watches registered and not yet ended (for tests and `/metrics`).
    pub fn watchers(&self) -> usize {
        self.state.lock().watchers.values().map(Vec::len).sum()
    }

    fn unwatch(&self, id: TaskId, n: u64) {
        let mut s = self.state.lock();
        if let Some(ws) = s.watchers.get_mut(&id) {
            ws.retain(|(m, _)| *m != n);
            if ws.is_empty() {
                s.watchers.remove(&id);
            }
        }
    }

    fn apply(&self, e: &Event) {
        let mut s = self.state.lock();
        let sec = e.at / 1000 * 1000;
        if s.seconds.back().is_none_or(|b| b.at != sec) {
            s.seconds.push_back(Second { at: sec, ..Default::default() });
            while s.seconds.len() > HISTORY_SECS {
                s.seconds.pop_front();
            }
        }
        match &e.kind {
            EventKind::TaskCreated { .. } => s.counters.created += 1,
            EventKind::TaskStarted { task_id, .. } => {
                s.started.insert(*task_id, e.at);
                s.partials.insert(*task_id, String::new());
            }
            EventKind::TaskToken { task_id, text } => {
                if let Some(p) = s.partials.get_mut(task_id) {
                    p.push_str(text);
                }
                if let Some(b) = s.seconds.back_mut() {
                    b.tokens += 1;
                }
            }
            EventKind::TaskCompleted { task_id, usage, latency_ms, .. } => {
                s.counters.completed += 1;
                if let Some(u) = usage {
                    s.counters.prompt_tokens += u.prompt_tokens;
                    s.counters.completion_tokens += u.completion_tokens;
                }
                s.counters.latency.observe(*latency_ms as f64 / 1000.0);
                self.finish(&mut s, *task_id, e.at);
            }
            EventKind::TaskFailed { task_id, status, .. } => {
                if status.is_terminal() {
                    s.counters.failed += 1;
                } else {
                    s.counters.retried += 1;
                }
                self.finish(&mut s, *task_id, e.at);
            }
            EventKind::TaskCancelled { task_id } => {
                s.counters.cancelled += 1;
                self.finish(&mut s, *task_id, e.at);
            }
            EventKind::TaskRequeued { task_id, .. } => {
                s.counters.requeued += 1;
                s.partials.remove(task_id);
                s.started.remove(task_id);
            }
            EventKind::BackendHealth { backend, up, .. } => {
                s.counters.backend_up.insert(backend.clone(), *up);
            }
            _ => {}
        }
    }

    fn finish(&self, s: &mut State, id: TaskId, at: Millis) {
        s.partials.remove(&id);
        if let Some(start) = s.started.remove(&id) {
            s.counters.run_time.observe((at - start) as f64 / 1000.0);
        }
        if let Some(b) = s.seconds.back_mut() {
            b.finished += 1;
        }
    }

    /// The answer so far of a running task.
    pub fn partial(&self, id: TaskId) -> Option<String> {
        self.state.lock().partials.get(&id).cloned()
    }

    pub fn counters(&self) -> Counters {
        self.state.lock().counters.clone()
    }

    /// Per-second history, oldest first, over the last `secs` seconds.
    pub fn history(&self, secs: usize) -> Vec<Second> {
        self.state.lock().seconds.iter().filter(|s| s.within_last(secs)).copied().collect()
    }

    /// Tasks finished and tokens generated per second over the last minute.
    pub fn rates(&self) -> (f64, f64) {
        let h = self.history(60);
        let (f, t) = h.iter().fold((0, 0), |(f, t), s| (f + s.finished, t + s.tokens));
        (f as f64 / 60.0, t as f64 / 60.0)
    }

    /// Mean run time of recent tasks, in seconds.
    pub fn mean_run_secs(&self) -> Option<f64> {
        let c = &self.state.lock().counters.run_time;
        (c.count > 0).then(|| c.sum / c.count as f64)
    }
}
