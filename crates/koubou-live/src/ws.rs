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
use koubou_system::{
    Api, ApiError, Koubou,
    api::{ListQuery, SubmitRequest},
};
use koubou_task::{Event, EventKind, Limits, TaskId};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast::error::RecvError, mpsc, oneshot, watch};

use crate::{
    metrics::{MetricsSample, Sampler},
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

/// What a connection can subscribe to besides single tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Every event, every token of every task included.
    All,
    /// Life-cycle events of every task (created, claimed, started, completed, failed,
    /// cancelled, requeued): no tokens.
    Tasks,
    /// Workers scaling and changing state, backends going up or down.
    System,
    /// A `metrics` sample every second or two.
    Metrics,
    /// The prototype's channel `task`: a `task_update` for each life-cycle event of any task.
    Task,
    /// The prototype's channel `worker`: a `worker_update` when a worker changes state.
    Worker,
    /// `periodic_stats` every 5 s (on by default, as the prototype sent it to every client).
    Stats,
}

impl Topic {
    fn parse(s: &str) -> Option<Topic> {
        Some(match s {
            "all" => Topic::All,
            "tasks" => Topic::Tasks,
            "system" => Topic::System,
            "metrics" => Topic::Metrics,
            "task" => Topic::Task,
            "worker" => Topic::Worker,
            "stats" => Topic::Stats,
            _ => return None,
        })
    }
}

const TOPICS: &str = "all, tasks, system, metrics, task, worker or stats";
const TYPES: &str = "submit_task, subscribe, unsubscribe, cancel_task, get_task, list_tasks, status, get_stats or ping";

/// State shared by all WebSocket connections of one router.
#[derive(Clone)]
pub struct WsState {
    pub(crate) k: Koubou,
    pub(crate) cfg: Arc<WsConfig>,
    pub(crate) sampler: Sampler,
    pub(crate) limits: WsLimits,
    /// Open connections (the prototype's `active_connections`).
    connections: Arc<AtomicUsize>,
}

impl WsState {
    pub fn new(k: Koubou, cfg: WsConfig) -> WsState {
        let sampler = Sampler::start(k.clone());
        let limits = cfg.limits.clone().unwrap_or_else(|| WsLimits::from_limits(&k.config().limits));
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
pub fn ws_router(k: Koubou) -> Router {
    ws_router_with(k, WsConfig::default())
}

/// [`ws_router`] with other tuning.
pub fn ws_router_with(k: Koubou, cfg: WsConfig) -> Router {
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
        let msg: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return self.error(None, ApiError::invalid("message", "must be a JSON object with a \"type\"")),
            Err(e) => return self.error(None, ApiError::invalid("message", format!("not valid JSON: {e}"))),
        };
        let r = msg.get("ref").cloned();
        // `command` is the prototype's name for `type`.
        let Some(ty) = msg.get("type").or_else(|| msg.get("command")).and_then(Value::as_str) else {
            return self.error(r, ApiError::invalid("type", format!("is required (or `command`): {TYPES}")));
        };
        match self.request(ty, &msg).await {
            Ok(mut v) => {
                if let Some(r) = r {
                    v["ref"] = r;
                }
                self.send(v)
            }
            Err(e) => self.error(r, e),
        }
    }

    fn error(&self, r: Option<Value>, e: ApiError) -> Result<(), Kick> {
        let mut v = e.body();
        v["type"] = "error".into();
        if let Some(r) = r {
            v["ref"] = r;
        }
        self.send(v)
    }

    async fn request(&mut self, ty: &str, msg: &Value) -> Result<Value, ApiError> {
        let k = &self.st.k;
        match ty {
            "ping" => Ok(json!({"type": "pong", "at": koubou_task::now_millis(), "timestamp": prototype::timestamp()})),
            "get_stats" => prototype::stats(k).await,
            "submit_task" => {
                let payload = msg.get("payload").ok_or_else(|| ApiError::invalid("payload", "is required"))?;
                let mut req = SubmitRequest::from_json(payload).map_err(|mut e| {
                    e.field = format!("payload.{}", e.field);
                    ApiError::Invalid(e)
                })?;
                // A WebSocket client hears the result as events; never block the connection.
                req.sync = false;
                let resp = k.submit(req).await?;
                self.tasks.insert(resp.task_id);
                Ok(
                    json!({"type": "task_submitted", "task_id": resp.task_id, "status": resp.task_status, "created": resp.created}),
                )
            }
            "subscribe" | "unsubscribe" => {
                let on = ty == "subscribe";
                if let Some(id) = msg.get("task_id") {
                    let id = task_id(id)?;
                    if on {
                        let task = k.task(id).await?;
                        self.tasks.insert(id);
                        return Ok(json!({"type": "subscribed", "task_id": id, "task": task}));
                    }
                    self.tasks.remove(&id);
                    return Ok(json!({"type": "unsubscribed", "task_id": id}));
                }
                // `channel` is the prototype's name for `topic`.
                let topic =
                    msg.get("topic").or_else(|| msg.get("channel")).and_then(Value::as_str).ok_or_else(|| {
                        ApiError::invalid("topic", format!("give a task_id, or a topic (or `channel`): {TOPICS}"))
                    })?;
                let t = Topic::parse(topic)
                    .ok_or_else(|| ApiError::invalid("topic", format!("unknown topic {topic:?}; use {TOPICS}")))?;
                if on {
                    self.topics.insert(t);
                } else {
                    self.topics.remove(&t);
                }
                Ok(json!({"type": if on { "subscribed" } else { "unsubscribed" }, "topic": topic, "channel": topic,
                    "timestamp": prototype::timestamp()}))
            }
            "cancel_task" => {
                let id = task_id(msg.get("task_id").unwrap_or(&Value::Null))?;
                let task = k.cancel(id).await?;
                Ok(json!({"type": "task", "task": task}))
            }
            "get_task" => {
                let id = task_id(msg.get("task_id").unwrap_or(&Value::Null))?;
                Ok(json!({"type": "task", "task": k.task(id).await?}))
            }
            "list_tasks" => {
                let q: ListQuery = serde_json::from_value(msg.get("query").cloned().unwrap_or(json!({})))
                    .map_err(|e| ApiError::invalid("query", e.to_string()))?;
                Ok(json!({"type": "task_list", "list": k.tasks(q).await?}))
            }
            "status" => Ok(json!({"type": "status", "status": k.status().await?})),
            other => Err(ApiError::invalid("type", format!("unknown message type {other:?}; use {TYPES}"))),
        }
    }
}

fn task_id(v: &Value) -> Result<TaskId, ApiError> {
    let s = v.as_str().ok_or_else(|| ApiError::invalid("task_id", format!("must be a task id string, got {v}")))?;
    s.parse().map_err(|e: koubou_task::id::BadTaskId| ApiError::invalid("task_id", e.to_string()))
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
    let mut bus = st.k.subscribe();
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
        result = match prototype::initial_state(&conn.st.k).await {
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
            e = bus.recv() => match e {
                Ok(e) => {
                    let mut r = Ok(());
                    if conn.wants(&e) {
                        r = conn.send(event_message(&e));
                        if let Some(id) = e.kind.task_id().filter(|_| e.kind.is_terminal()) {
                            conn.tasks.remove(&id);
                        }
                    }
                    r.and_then(|()| conn.send_prototype(&e))
                }
                Err(RecvError::Lagged(n)) => Err(Kick(format!(
                    "too slow: fell {n} events behind the event bus; reconnect and resubscribe"
                ), None)),
                Err(RecvError::Closed) => Err(Kick("server shutting down".into(), None)),
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
                        match prototype::periodic_stats(&conn.st.k, &m, n).await {
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
