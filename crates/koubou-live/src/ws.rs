//! The seed's WebSocket protocol (`ws://localhost:8766`, also `/ws` on 8765 and `/dashboard/ws`).
//!
//! Every message either way is one JSON object with a `type`. The client submits, subscribes,
//! cancels and pings; the server answers each request and forwards bus events the connection
//! subscribed to (`docs/websocket.md` lists every message). The prototype's clients speak too:
//! `command` for `type`, `channel` for `topic`, and its messages ([`crate::prototype`]).
//!
//! Each connection has one bus receiver and a bounded outgoing buffer written by its own task.
//! A client that lets that buffer fill, or whose receiver lags behind the bus, is closed with a
//! reason (code 1008) instead of slowing the server or anyone else.
//!
//! [`WsLimits`] bound every WebSocket of a port, this protocol's and GraphQL's alike: a message
//! over `limits.max_ws_message_bytes` closes the connection with code 1009 (read no further than
//! the frame header that announced it), and past `limits.max_ws_connections` open at once an
//! upgrade is answered 503 instead of 101.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::{
        State,
        ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade},
    },
    response::{IntoResponse, Response},
    routing::get,
};
use futures::{SinkExt, StreamExt};
use koubou_api::{Api, ApiError, EventFeed};
use koubou_task::Lagged;
use koubou_task::{Event, EventKind, Limits, TaskId};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

pub use crate::protocol::Topic;
use crate::{
    metrics::{MetricsSample, Sampler},
    protocol::{self, Request, Target},
    prototype,
};

/// The protocol name sent in `welcome`.
pub const PROTOCOL: &str = "koubou-ws/1";

/// Tuning for WebSocket connections.
#[derive(Clone, Debug)]
pub struct WsConfig {
    /// Messages a connection may have waiting to be written before it is dropped as too slow.
    pub buffer: usize,
    /// Topics every new connection starts subscribed to.
    pub default_topics: Vec<Topic>,
    /// The port's limits; `None`: this router's own, from the system's `[limits]`.
    pub limits: Option<WsLimits>,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig { buffer: 1024, default_topics: vec![Topic::System, Topic::Stats], limits: None }
    }
}

/// The WebSocket limits of one port, shared by each of its WebSocket routes (clone it into
/// each): largest message, and connections open at once.
#[derive(Clone, Debug)]
pub struct WsLimits {
    max_message_bytes: usize,
    max_connections: usize,
    open: Arc<Semaphore>,
}

/// An open WebSocket's place under [`WsLimits`]; dropping it frees the place.
#[derive(Debug)]
pub struct WsSlot {
    _open: OwnedSemaphorePermit,
    max_message_bytes: usize,
}

/// The close code for a message over the limit ("message too big").
pub const CLOSE_TOO_BIG: u16 = 1009;

impl WsLimits {
    pub fn new(max_message_bytes: usize, max_connections: usize) -> WsLimits {
        let max_connections = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        WsLimits { max_message_bytes, max_connections, open: Arc::new(Semaphore::new(max_connections)) }
    }

    /// `limits.ws_message_bytes()` and `limits.max_ws_connections`.
    pub fn from_limits(l: &Limits) -> WsLimits {
        WsLimits::new(l.ws_message_bytes(), l.max_ws_connections)
    }

    /// Takes a place for a new connection and sets the upgrade's message limit, or answers 503
    /// (JSON, naming the setting) when the port has no place left.
    #[allow(clippy::result_large_err)]
    pub fn admit(&self, ws: WebSocketUpgrade) -> Result<(WebSocketUpgrade, WsSlot), Response> {
        let Ok(open) = self.open.clone().try_acquire_owned() else {
            let body = json!({"error": {
                "code": "too_many_connections",
                "message": format!(
                    "this port already has {} WebSocket connections open (limits.max_ws_connections); retry shortly",
                    self.max_connections
                ),
                "field": "limits.max_ws_connections",
            }});
            let mut r = (axum::http::StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
            return Err(r);
        };
        let n = self.max_message_bytes;
        Ok((ws.max_message_size(n).max_frame_size(n), WsSlot { _open: open, max_message_bytes: n }))
    }
}

impl WsSlot {
    /// When `e` (a read error) is a message over the limit: the close frame to answer it with.
    pub fn too_big(&self, e: &axum::Error) -> Option<CloseFrame> {
        use std::error::Error;
        use tungstenite::error::{CapacityError, Error as WsError};
        let mut cause: Option<&(dyn Error + 'static)> = e.source();
        while let Some(c) = cause {
            if let Some(WsError::Capacity(CapacityError::MessageTooLong { size, .. })) = c.downcast_ref::<WsError>() {
                let reason = format!(
                    "message too big: {size} bytes; the limit is {} (limits.max_ws_message_bytes)",
                    self.max_message_bytes
                );
                return Some(CloseFrame { code: CLOSE_TOO_BIG, reason: reason.into() });
            }
            cause = c.source();
        }
        None
    }
}

/// State shared by all WebSocket connections of one router.
#[derive(Clone)]
pub struct WsState {
    pub(crate) k: Arc<dyn Api>,
    pub(crate) cfg: Arc<WsConfig>,
    pub(crate) sampler: Sampler,
    pub(crate) limits: WsLimits,
    /// Open connections (the prototype's `active_connections`).
    connections: Arc<AtomicUsize>,
}

impl WsState {
    pub fn new(k: Arc<dyn Api>, cfg: WsConfig) -> WsState {
        let sampler = Sampler::start(k.clone());
        let limits = cfg.limits.clone().unwrap_or_else(|| WsLimits::from_limits(&k.limits()));
        WsState { k, cfg: Arc::new(cfg), sampler, limits, connections: Default::default() }
    }
}

/// Counts a connection while it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(n: &Arc<AtomicUsize>) -> Open {
        n.fetch_add(1, Ordering::Relaxed);
        Open(n.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Router serving the WebSocket upgrade at `/` (for the seed's port 8766).
pub fn ws_router(k: Arc<dyn Api>) -> Router {
    ws_router_with(k, WsConfig::default())
}

/// [`ws_router`] with other tuning.
pub fn ws_router_with(k: Arc<dyn Api>, cfg: WsConfig) -> Router {
    Router::new().route("/", get(ws_handler)).with_state(WsState::new(k, cfg))
}

/// The upgrade handler; mount it at any path of a router whose state is [`WsState`], e.g.
/// `Router::new().route("/ws", get(ws_handler)).with_state(WsState::new(k, WsConfig::default()))`.
pub async fn ws_handler(State(st): State<WsState>, ws: WebSocketUpgrade) -> Response {
    match st.limits.admit(ws) {
        Ok((ws, slot)) => ws.on_upgrade(move |socket| serve(st, socket, slot)),
        Err(refused) => refused,
    }
}

/// Why the server ends a connection.
const CLOSE_POLICY: u16 = 1008;

struct Conn {
    st: WsState,
    topics: HashSet<Topic>,
    tasks: HashSet<TaskId>,
    out: mpsc::Sender<Message>,
}

/// The reason a connection must end now (code 1008 unless a frame is given).
struct Kick(String, Option<CloseFrame>);

impl Conn {
    /// Queues a message; a full buffer means the client is too slow to keep.
    fn send(&self, v: Value) -> Result<(), Kick> {
        match self.out.try_send(Message::Text(v.to_string().into())) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(Kick(
                format!("too slow: {} messages waiting to be sent; reconnect and resubscribe", self.st.cfg.buffer),
                None,
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Kick("connection closed".into(), None)),
        }
    }

    /// The prototype's `task_update` / `worker_update`, for subscribers of its channels.
    fn send_prototype(&self, e: &Event) -> Result<(), Kick> {
        let update = match &e.kind {
            EventKind::WorkerState { .. } if self.topics.contains(&Topic::Worker) => prototype::worker_update(e),
            _ if self.topics.contains(&Topic::Task) => prototype::task_update(e),
            _ => None,
        };
        update.map_or(Ok(()), |v| self.send(v))
    }

    fn wants(&self, e: &Event) -> bool {
        if self.topics.contains(&Topic::All) {
            return true;
        }
        match &e.kind {
            EventKind::WorkerScaled { .. } | EventKind::BackendHealth { .. } | EventKind::WorkerState { .. } => {
                self.topics.contains(&Topic::System)
            }
            EventKind::TaskToken { task_id, .. } => self.tasks.contains(task_id),
            k => k.task_id().is_some_and(|id| self.tasks.contains(&id)) || self.topics.contains(&Topic::Tasks),
        }
    }

    async fn handle(&mut self, text: &str) -> Result<(), Kick> {
        let protocol::Message { reference, request } = protocol::parse(text);
        let answer = match request {
            Ok(req) => self.request(req).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(mut v) => {
                if let Some(r) = reference {
                    v["ref"] = r;
                }
                self.send(v)
            }
            Err(e) => self.error(reference, e),
        }
    }

    fn error(&self, r: Option<Value>, e: ApiError) -> Result<(), Kick> {
        let mut v = koubou_http::error::body(&e);
        v["type"] = "error".into();
        if let Some(r) = r {
            v["ref"] = r;
        }
        self.send(v)
    }

    async fn request(&mut self, req: Request) -> Result<Value, ApiError> {
        let k = &self.st.k;
        match req {
            Request::Ping => {
                Ok(json!({"type": "pong", "at": koubou_task::now_millis(), "timestamp": prototype::timestamp()}))
            }
            Request::GetStats => prototype::stats(&**k).await,
            Request::Submit(req) => {
                let resp = k.submit(*req).await?;
                self.tasks.insert(resp.task_id);
                Ok(
                    json!({"type": "task_submitted", "task_id": resp.task_id, "status": resp.task_status, "created": resp.created}),
                )
            }
            Request::Subscribe(Target::Task(id)) => {
                let task = k.task(id).await?;
                self.tasks.insert(id);
                Ok(json!({"type": "subscribed", "task_id": id, "task": task}))
            }
            Request::Unsubscribe(Target::Task(id)) => {
                self.tasks.remove(&id);
                Ok(json!({"type": "unsubscribed", "task_id": id}))
            }
            Request::Subscribe(Target::Topic(t, name)) => {
                self.topics.insert(t);
                Ok(json!({"type": "subscribed", "topic": name, "channel": name, "timestamp": prototype::timestamp()}))
            }
            Request::Unsubscribe(Target::Topic(t, name)) => {
                self.topics.remove(&t);
                Ok(json!({"type": "unsubscribed", "topic": name, "channel": name, "timestamp": prototype::timestamp()}))
            }
            Request::Cancel(id) => Ok(json!({"type": "task", "task": k.cancel(id).await?})),
            Request::Get(id) => Ok(json!({"type": "task", "task": k.task(id).await?})),
            Request::List(q) => Ok(json!({"type": "task_list", "list": k.tasks(q).await?})),
            Request::Status => Ok(json!({"type": "status", "status": k.status().await?})),
        }
    }
}

/// An event as sent: its JSON with `type` set to the event's name.
pub fn event_message(e: &Event) -> Value {
    let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
    v["type"] = e.kind.name().into();
    v
}

fn metrics_message(m: &MetricsSample) -> Value {
    let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
    v["type"] = "metrics".into();
    v
}

async fn serve(st: WsState, socket: WebSocket, slot: WsSlot) {
    let _open = Open::new(&st.connections);
    let mut bus: EventFeed = st.k.events(None).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "a WebSocket client gets no events");
        Box::pin(futures::stream::pending())
    });
    let (mut sink, mut stream) = socket.split();
    let (out, mut out_rx) = mpsc::channel::<Message>(st.cfg.buffer.max(1));
    let (close_tx, mut close_rx) = oneshot::channel::<CloseFrame>();

    // The writer: drains the buffer; on a close request, sends the close frame (if the socket
    // takes it within a second) and ends.
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                frame = &mut close_rx => {
                    if let Ok(frame) = frame {
                        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(Some(frame)))).await;
                    }
                    break;
                }
                m = out_rx.recv() => {
                    let Some(m) = m else { break };
                    tokio::select! {
                        biased;
                        frame = &mut close_rx => {
                            if let Ok(frame) = frame {
                                let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(Some(frame)))).await;
                            }
                            break;
                        }
                        r = sink.send(m) => if r.is_err() { break },
                    }
                }
            }
        }
        let _ = sink.close().await;
    });

    let mut metrics: watch::Receiver<Option<MetricsSample>> = st.sampler.receiver();
    let mut stats_tick =
        tokio::time::interval_at(tokio::time::Instant::now() + prototype::STATS_EVERY, prototype::STATS_EVERY);
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let topics = st.cfg.default_topics.iter().copied().collect();
    let mut conn = Conn { st, topics, tasks: HashSet::new(), out };
    let welcome = json!({"type": "welcome", "protocol": PROTOCOL, "version": env!("CARGO_PKG_VERSION"),
        "topics": conn.topics.iter().map(|t| format!("{t:?}").to_lowercase()).collect::<Vec<_>>()});
    let mut result = conn.send(welcome);
    if result.is_ok() {
        result = match prototype::initial_state(&*conn.st.k).await {
            Ok(v) => conn.send(v),
            Err(e) => {
                tracing::debug!(error = %e, "no initial_state for a new WebSocket client");
                Ok(())
            }
        };
    }

    while result.is_ok() {
        result = tokio::select! {
            m = stream.next() => match m {
                Some(Ok(Message::Text(t))) => conn.handle(t.as_str()).await,
                Some(Ok(Message::Binary(b))) => match std::str::from_utf8(&b) {
                    Ok(t) => conn.handle(t).await,
                    Err(_) => conn.error(None, ApiError::invalid("message", "binary messages must be UTF-8 JSON")),
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
                Some(Err(e)) => match slot.too_big(&e) {
                    Some(frame) => Err(Kick(frame.reason.to_string(), Some(frame))),
                    None => Err(Kick(String::new(), None)),
                },
                Some(Ok(Message::Close(_))) | None => Err(Kick(String::new(), None)),
            },
            e = bus.next() => match e {
                Some(Ok(e)) => {
                    let mut r = Ok(());
                    if conn.wants(&e) {
                        r = conn.send(event_message(&e));
                        if let Some(id) = e.kind.task_id().filter(|_| e.kind.is_terminal()) {
                            conn.tasks.remove(&id);
                        }
                    }
                    r.and_then(|()| conn.send_prototype(&e))
                }
                Some(Err(Lagged(n))) => Err(Kick(format!(
                    "too slow: fell {n} events behind the event bus; reconnect and resubscribe"
                ), None)),
                None => Err(Kick("server shutting down".into(), None)),
            },
            _ = metrics.changed() => {
                let sample = metrics.borrow_and_update().clone();
                match sample {
                    Some(m) if conn.topics.contains(&Topic::Metrics) => conn.send(metrics_message(&m)),
                    _ => Ok(()),
                }
            }
            _ = stats_tick.tick() => {
                let sample = metrics.borrow().clone();
                match sample {
                    Some(m) if conn.topics.contains(&Topic::Stats) => {
                        let n = conn.st.connections.load(Ordering::Relaxed);
                        match prototype::periodic_stats(&*conn.st.k, &m, n).await {
                            Ok(v) => conn.send(v),
                            Err(_) => Ok(()),
                        }
                    }
                    _ => Ok(()),
                }
            }
        };
    }
    if let Err(Kick(reason, frame)) = result
        && !reason.is_empty()
    {
        tracing::info!(%reason, "closing WebSocket client");
        let _ = close_tx.send(frame.unwrap_or(CloseFrame { code: CLOSE_POLICY, reason: reason.into() }));
    }
    drop(conn);
    // Read on while the close frame goes out, so that what the client still sends (the rest of
    // an oversized message) does not reset the connection before it reads the frame.
    let drain = async { while let Some(Ok(_)) = stream.next().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), futures::future::join(writer, drain)).await;
    drop(slot);
}
