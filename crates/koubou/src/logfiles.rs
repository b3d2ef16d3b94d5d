//! The guide's human-readable log files, beside the JSON `koubou.log`:
//!
//! - `mcp_server.log`: the server and its faces (everything not below);
//! - `worker_pool.log`: the pool (target `koubou_worker::pool`: scaling);
//! - `workers/worker_<id>.log`: each worker — every line logged inside a span that carries a
//!   `worker` field (the worker's task span), or with that field itself. `/` and other
//!   characters unsafe in a file name become `-` (`serve/2` → `worker_serve-2.log`).
//!
//! Lines are formatted on the logging thread and written by one writer thread, through a bounded
//! channel: logging never blocks on the disk, and a writer that falls behind drops lines (and
//! says how many) rather than stalling the server. The writer keeps at most
//! [`MAX_OPEN_WORKER_FILES`] worker files open (least recently used closed first), so workers
//! that come and go never pile up descriptors; a closed file is reopened in append mode when its
//! worker logs again. No rotation: the files grow until removed (the JSON log does the same).

use std::{
    fmt::Write as _,
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::Duration,
};

use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
    span,
};
use tracing_subscriber::{Layer, layer::Context, registry::LookupSpan};

/// Worker files kept open at once.
pub const MAX_OPEN_WORKER_FILES: usize = 16;
/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 8192;

/// Which file a line goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    Server,
    Pool,
    Worker(String),
}

enum Msg {
    Line(Route, String),
    /// Write out everything before this, then answer.
    Sync(std::sync::mpsc::Sender<()>),
}

/// The layer that formats and routes events (add it to the registry).
pub struct FilesLayer {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

/// Flushes the files when dropped (hold it for the life of `main`).
pub struct FilesGuard {
    tx: SyncSender<Msg>,
}

impl Drop for FilesGuard {
    fn drop(&mut self) {
        let (ack, done) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Sync(ack)).is_ok() {
            let _ = done.recv_timeout(Duration::from_secs(2));
        }
    }
}

/// A layer writing into `dir`, and the guard that flushes it.
pub fn layer(dir: &Path) -> (FilesLayer, FilesGuard) {
    layer_with(dir, MAX_OPEN_WORKER_FILES)
}

fn layer_with(dir: &Path, max_open: usize) -> (FilesLayer, FilesGuard) {
    let (tx, rx) = sync_channel(QUEUE);
    let writer = Writer { dir: dir.to_owned(), server: None, pool: None, workers: Vec::new(), max_open };
    std::thread::Builder::new()
        .name("koubou-logfiles".into())
        .spawn(move || writer.run(rx))
        .expect("spawn the log writer thread");
    (FilesLayer { tx: tx.clone(), dropped: Default::default() }, FilesGuard { tx })
}

/// A file name part from a worker id: `serve/2` → `serve-2`.
fn file_part(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' }).collect()
}

struct Writer {
    dir: PathBuf,
    server: Option<BufWriter<File>>,
    pool: Option<BufWriter<File>>,
    /// Open worker files, most recently used last.
    workers: Vec<(String, BufWriter<File>)>,
    max_open: usize,
}

fn open(path: &Path) -> Option<BufWriter<File>> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).ok()?;
    }
    OpenOptions::new().create(true).append(true).open(path).ok().map(BufWriter::new)
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            // Write the whole burst, then flush once: lines reach the files promptly, in few writes.
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    Msg::Line(route, line) => self.write(route, &line),
                    Msg::Sync(ack) => {
                        self.flush();
                        let _ = ack.send(());
                    }
                }
                next = rx.try_recv().ok();
            }
            self.flush();
        }
        self.flush();
    }

    fn file(&mut self, route: Route) -> Option<&mut BufWriter<File>> {
        match route {
            Route::Server => {
                if self.server.is_none() {
                    self.server = open(&self.dir.join("mcp_server.log"));
                }
                self.server.as_mut()
            }
            Route::Pool => {
                if self.pool.is_none() {
                    self.pool = open(&self.dir.join("worker_pool.log"));
                }
                self.pool.as_mut()
            }
            Route::Worker(id) => {
                match self.workers.iter().position(|(w, _)| *w == id) {
                    Some(i) => {
                        let f = self.workers.remove(i);
                        self.workers.push(f);
                    }
                    None => {
                        let path = self.dir.join("workers").join(format!("worker_{}.log", file_part(&id)));
                        let f = open(&path)?;
                        if self.workers.len() >= self.max_open.max(1) {
                            let (_, mut oldest) = self.workers.remove(0);
                            let _ = oldest.flush();
                        }
                        self.workers.push((id, f));
                    }
                }
                self.workers.last_mut().map(|(_, f)| f)
            }
        }
    }

    fn write(&mut self, route: Route, line: &str) {
        if let Some(f) = self.file(route) {
            let _ = f.write_all(line.as_bytes());
        }
    }

    fn flush(&mut self) {
        for f in self.server.iter_mut().chain(self.pool.iter_mut()).chain(self.workers.iter_mut().map(|(_, f)| f)) {
            let _ = f.flush();
        }
    }
}

/// Fields rendered as ` key=value`, the message apart, and a `worker` field noticed.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
    worker: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "worker" {
            self.worker = Some(value.to_owned());
        }
        if field.name() == "message" {
            self.message.push_str(value);
        } else if value.is_empty() || value.contains(char::is_whitespace) {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        } else {
            let _ = write!(self.rest, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

/// What a span contributes to the lines logged inside it.
struct SpanFields {
    text: String,
    worker: Option<String>,
}

impl<S> Layer<S> for FilesLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields { text: f.rest.trim_start().to_owned(), worker: f.worker });
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        values.record(&mut f);
        if let Some(span) = ctx.span(id)
            && let Some(s) = span.extensions_mut().get_mut::<SpanFields>()
        {
            s.text.push_str(&f.rest);
            s.worker = f.worker.or(s.worker.take());
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let mut worker = f.worker.take();
        let mut scope = String::new();
        if let Some(spans) = ctx.event_scope(event) {
            for span in spans.from_root() {
                if let Some(s) = span.extensions().get::<SpanFields>() {
                    let _ = write!(scope, "{}{{{}}}: ", span.name(), s.text);
                    if s.worker.is_some() {
                        worker = worker.or(s.worker.clone());
                    }
                }
            }
        }
        let meta = event.metadata();
        let route = match worker {
            Some(w) => Route::Worker(w),
            None if meta.target().starts_with("koubou_worker::pool") => Route::Pool,
            None => Route::Server,
        };
        let at = koubou_task::rfc3339(koubou_task::now_millis());
        let line = format!("{at} {:>5} {scope}{}: {}{}\n", meta.level(), meta.target(), f.message, f.rest);
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let note = format!("{at}  WARN koubou::logfiles: {dropped} log lines dropped: the writer fell behind\n");
            let _ = self.tx.try_send(Msg::Line(route.clone(), note));
        }
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(route, line)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn open_fds_under(dir: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|p| p.starts_with(dir))
            .count()
    }

    #[test]
    fn routes_by_worker_and_target_and_bounds_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let (layer, guard) = layer_with(&dir, 4);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "koubou_http::rest", addr = "127.0.0.1:8765", "listening");
            tracing::info!(target: "koubou_worker::pool", workers = 3, "pool scaled up");
            for n in 0..40 {
                let span = tracing::info_span!("task", worker = %format!("serve/{n}"), task = "t1");
                let _e = span.enter();
                tracing::info!(target: "koubou_worker::worker", ms = 12, "task completed");
                tracing::debug!(target: "koubou_worker::worker", "detail");
            }
            tracing::warn!(target: "koubou_worker::worker", worker = "serve/0", error = "boom boom", "claim failed");
        });
        drop(guard);
        // At most 4 worker files were open at any time, though 40 workers logged.
        assert!(open_fds_under(&dir.join("workers")) <= 4);
        let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap();
        let server = read("mcp_server.log");
        assert!(server.contains(" INFO koubou_http::rest: listening addr=127.0.0.1:8765"), "{server}");
        assert!(!server.contains("pool scaled") && !server.contains("task completed"));
        assert!(read("worker_pool.log").contains("INFO koubou_worker::pool: pool scaled up workers=3"));
        for n in 0..40 {
            let w = read(&format!("workers/worker_serve-{n}.log"));
            assert!(
                w.contains(&format!("task{{worker=serve/{n} task=t1}}: koubou_worker::worker: task completed ms=12")),
                "{w}"
            );
            assert!(w.contains("DEBUG"), "no level filter here: {w}");
        }
        // Reopened in append mode after being closed: the first line is still there.
        let w0 = read("workers/worker_serve-0.log");
        assert!(
            w0.contains("task completed") && w0.contains("claim failed worker=serve/0 error=\"boom boom\""),
            "{w0}"
        );
    }

    #[test]
    fn unsafe_id_characters_become_dashes() {
        assert_eq!(file_part("serve/2"), "serve-2");
        assert_eq!(file_part("../x y"), "..-x-y");
    }
}
