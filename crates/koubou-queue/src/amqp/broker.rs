//! The connection to RabbitMQ: one AMQP connection per dispatcher, made again when it breaks.
//!
//! Three channels on it: `publish` (confirm mode: tasks' ids into the durable queue), `get`
//! (`basic.get`, the acks, wake-up signals) and one consuming this dispatcher's wake-up queue.
//! Any error or timeout on a channel drops the whole link (closing it hands every unacked
//! delivery back to the queue) and the next operation, or the keeper, connects again; until
//! then operations fail with [`QueueError::Unavailable`].

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use koubou_task::TaskId;
use lapin::{
    BasicProperties, Channel, Confirmation, Connect, Connection, ConnectionProperties, Consumer, ExchangeKind,
    message::Delivery,
    options::{
        BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
        ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    tcp::OwnedTLSConfig,
    types::{AMQPValue, FieldTable},
};
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::config::{AmqpConfig, Resolved, scrub};
use crate::{QueueError, outbox::Undispatched};

/// AMQP's persistent delivery mode: the broker writes the message to disk.
const PERSISTENT: u8 = 2;
/// The header carrying a task's tags (a JSON array), for claims by capabilities.
const TAGS: &str = "tags";
/// After a failed connection attempt, how long callers fail at once before the next attempt.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// One connection and its channels.
pub(crate) struct Link {
    conn: Connection,
    publish: Channel,
    get: Channel,
    /// One `basic.get` at a time on the channel (each is a round trip; their replies must not
    /// interleave).
    get_lock: tokio::sync::Mutex<()>,
}

impl Link {
    fn alive(&self) -> bool {
        self.conn.status().connected() && self.publish.status().connected() && self.get.status().connected()
    }
}

/// What a delivery says of its task.
pub(crate) struct Named<'a> {
    pub id: TaskId,
    /// Its kind (the message's `type`); `None` when the delivery has none: unknown.
    pub kind: Option<&'a str>,
    /// Its tags (the `tags` header); `None` when the delivery has no readable one: unknown.
    pub tags: Option<Vec<String>>,
}

/// A delivery taken with `basic.get`, and the link it came on (its ack goes back there).
/// Dropped without an answer (the claim was abandoned), it is handed back to the queue.
pub(crate) struct Taken {
    link: Arc<Link>,
    delivery: Option<Delivery>,
}

impl Taken {
    /// The task the delivery names, with its kind and tags.
    pub fn task(&self) -> Option<Named<'_>> {
        let d = self.delivery.as_ref()?;
        let id = std::str::from_utf8(&d.data).ok()?.parse().ok()?;
        let tags = match d.properties.headers().as_ref().and_then(|h| h.inner().get(TAGS)) {
            Some(AMQPValue::LongString(s)) => serde_json::from_slice(s.as_bytes()).ok(),
            _ => None,
        };
        Some(Named { id, kind: d.properties.kind().as_ref().map(|k| k.as_str()), tags })
    }

    /// The payload, for messages about a delivery that names no task.
    pub fn data(&self) -> String {
        self.delivery.as_ref().map(|d| String::from_utf8_lossy(&d.data).into_owned()).unwrap_or_default()
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(d) = self.delivery.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move { d.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await });
        }
    }
}

pub(crate) struct Broker {
    resolved: Resolved,
    /// The connection's name on the broker (`koubou <namespace>`), so `rabbitmqctl
    /// list_connections client_properties` and the management UI tell whose it is.
    name: String,
    queue: String,
    wake_exchange: String,
    timeout: Duration,
    link: Mutex<Option<Arc<Link>>>,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    /// When the last attempt failed, and why: for a moment after, callers fail at once
    /// instead of each waiting for a connection timeout of their own.
    refused: Mutex<Option<(Instant, String)>>,
    /// Each new link's wake-up consumer, for the keeper.
    consumers: mpsc::UnboundedSender<(Arc<Link>, Consumer)>,
    /// Fires when a delivery may be waiting (a publish here or elsewhere, a new connection).
    pub wakeup: Notify,
}

impl Broker {
    pub fn new(cfg: &AmqpConfig, resolved: Resolved) -> (Broker, mpsc::UnboundedReceiver<(Arc<Link>, Consumer)>) {
        let (consumers, rx) = mpsc::unbounded_channel();
        let broker = Broker {
            resolved,
            name: format!("koubou {}", cfg.namespace),
            queue: cfg.queue_name(),
            wake_exchange: cfg.wake_exchange(),
            timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
            link: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            refused: Mutex::new(None),
            consumers,
            wakeup: Notify::new(),
        };
        (broker, rx)
    }

    /// The broker's URL, password hidden.
    pub fn shown(&self) -> &str {
        &self.resolved.shown
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> QueueError {
        let text = format!("RabbitMQ at {}: {what}: {e}", self.resolved.shown);
        QueueError::Unavailable(scrub(text, self.resolved.secret.as_deref()))
    }

    /// Drops `link` if it is the current one (closing it in the background).
    fn broken(&self, link: &Arc<Link>) {
        let mut slot = self.link.lock();
        if slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *slot = None;
            let link = link.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), link.conn.close(320, "koubou: link dropped".into()))
                        .await;
            });
        }
    }

    /// An operation on `link` failed: the link is dropped, the caller told the broker is
    /// unavailable.
    fn lost(&self, link: &Arc<Link>, what: &str, e: impl std::fmt::Display) -> QueueError {
        self.broken(link);
        self.fail(what, e)
    }

    /// Runs `f` with the configured timeout; an error or a timeout drops the link.
    async fn within<T>(
        &self,
        link: &Arc<Link>,
        what: &str,
        f: impl Future<Output = lapin::Result<T>>,
    ) -> Result<T, QueueError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.lost(link, what, e)),
            Err(_) => Err(self.lost(link, what, format_args!("no answer in {:?}", self.timeout))),
        }
    }

    /// The current link, connecting if there is none.
    pub async fn link(&self) -> Result<Arc<Link>, QueueError> {
        if let Some(l) = self.link.lock().as_ref().filter(|l| l.alive()) {
            return Ok(l.clone());
        }
        let _one = self.connecting.lock().await;
        if let Some(l) = self.link.lock().as_ref().filter(|l| l.alive()) {
            return Ok(l.clone());
        }
        if let Some((at, why)) = self.refused.lock().as_ref()
            && at.elapsed() < RECONNECT_PAUSE
        {
            return Err(QueueError::Unavailable(why.clone()));
        }
        let connected = match tokio::time::timeout(self.timeout, self.connect()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(self.fail("cannot connect", e)),
            Err(_) => Err(self.fail("cannot connect", format_args!("no answer in {:?}", self.timeout))),
        };
        let (link, consumer) = match connected {
            Ok(c) => c,
            Err(e) => {
                *self.refused.lock() = Some((Instant::now(), e.to_string()));
                return Err(e);
            }
        };
        *self.refused.lock() = None;
        let link = Arc::new(link);
        if let Some(old) = self.link.lock().replace(link.clone()) {
            tokio::spawn(async move { old.conn.close(200, "koubou: replaced".into()).await });
        }
        let _ = self.consumers.send((link.clone(), consumer));
        // Deliveries may have come while there was no link: parked workers look for themselves.
        self.wakeup.notify_waiters();
        Ok(link)
    }

    async fn connect(&self) -> lapin::Result<(Link, Consumer)> {
        let props = ConnectionProperties::default().with_connection_name(self.name.as_str().into());
        let uri = self.resolved.uri.clone();
        let conn = match &self.resolved.ca_pem {
            Some(pem) => {
                let tls = OwnedTLSConfig { identity: None, cert_chain: Some(pem.clone()) };
                uri.connect_with_config(props, tls, lapin::runtime::default_runtime()?).await?
            }
            None => Connect::connect(uri, props).await?,
        };
        match self.declare(&conn).await {
            Ok((publish, get, consumer)) => {
                Ok((Link { conn, publish, get, get_lock: tokio::sync::Mutex::new(()) }, consumer))
            }
            Err(e) => {
                let _ = conn.close(200, "koubou: setup failed".into()).await;
                Err(e)
            }
        }
    }

    /// The channels, the durable priority queue, the wake-up exchange and this link's
    /// wake-up queue.
    async fn declare(&self, conn: &Connection) -> lapin::Result<(Channel, Channel, Consumer)> {
        let publish = conn.create_channel().await?;
        publish.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut args = FieldTable::default();
        // Classic: RabbitMQ 3.x quorum queues have no message priority.
        args.insert("x-queue-type".into(), AMQPValue::LongString("classic".into()));
        args.insert("x-max-priority".into(), AMQPValue::LongInt(10));
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        publish.queue_declare(self.queue.as_str().into(), durable, args).await?;

        let get = conn.create_channel().await?;
        let exchange = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        get.exchange_declare(self.wake_exchange.as_str().into(), ExchangeKind::Fanout, exchange, FieldTable::default())
            .await?;

        let wake = conn.create_channel().await?;
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(64));
        let own = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let q = wake.queue_declare("".into(), own, args).await?;
        wake.queue_bind(
            q.name().clone(),
            self.wake_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let consume = BasicConsumeOptions { no_ack: true, exclusive: true, ..BasicConsumeOptions::default() };
        let consumer = wake.basic_consume(q.name().clone(), "".into(), consume, FieldTable::default()).await?;
        Ok((publish, get, consumer))
    }

    /// Publishes each task's id (persistent, at the task's priority, mandatory) and waits for
    /// the broker's confirms. Answers the tasks confirmed, and the error that stopped the rest.
    pub async fn publish(&self, tasks: &[Undispatched]) -> (Vec<(TaskId, u64)>, Option<QueueError>) {
        let link = match self.link().await {
            Ok(l) => l,
            Err(e) => return (Vec::new(), Some(e)),
        };
        let mut sent = Vec::with_capacity(tasks.len());
        let mut error = None;
        for t in tasks {
            let mut headers = FieldTable::default();
            let tags = serde_json::to_string(&t.tags).unwrap_or_else(|_| "[]".into());
            headers.insert(TAGS.into(), AMQPValue::LongString(tags.into()));
            let props = BasicProperties::default()
                .with_headers(headers)
                .with_delivery_mode(PERSISTENT)
                .with_priority(t.priority.get())
                .with_type(t.kind.as_str().into())
                .with_content_type("text/plain".into());
            let id = t.id.to_string();
            let publish = link.publish.basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                id.as_bytes(),
                props,
            );
            match self.within(&link, "publish", publish).await {
                Ok(confirm) => sent.push((t, confirm)),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let mut confirmed = Vec::with_capacity(sent.len());
        let deadline = tokio::time::Instant::now() + self.timeout;
        for (t, confirm) in sent {
            match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => confirmed.push((t.id, t.claims)),
                Ok(Ok(Confirmation::Ack(Some(_)))) => {
                    // Returned as unroutable: the queue is gone. A new link declares it again.
                    error.get_or_insert_with(|| self.lost(&link, "publish", "the task queue does not exist"));
                }
                Ok(Ok(other)) => {
                    error.get_or_insert_with(|| self.lost(&link, "publish", format_args!("not confirmed ({other:?})")));
                }
                Ok(Err(e)) => {
                    error.get_or_insert_with(|| self.lost(&link, "publish confirm", e));
                }
                Err(_) => {
                    error.get_or_insert_with(|| {
                        self.lost(&link, "publish confirm", format_args!("no confirm in {:?}", self.timeout))
                    });
                }
            }
        }
        if !confirmed.is_empty() {
            for _ in 0..confirmed.len().min(1024) {
                self.wakeup.notify_one();
            }
            // Other dispatchers' parked workers: one signal with the count (best effort; their
            // workers also look on their own now and then).
            let n = confirmed.len().to_string();
            let signal = link.get.basic_publish(
                self.wake_exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                n.as_bytes(),
                BasicProperties::default(),
            );
            if let Err(e) = self.within(&link, "wake-up signal", signal).await {
                tracing::debug!(error = %e, "could not signal other dispatchers");
            }
        }
        (confirmed, error)
    }

    /// Takes the most urgent delivery (`basic.get`, to be acked), if any.
    pub async fn get(&self) -> Result<Option<Taken>, QueueError> {
        let link = self.link().await?;
        let got = {
            let _one = link.get_lock.lock().await;
            let get = link.get.basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: false });
            self.within(&link, "basic.get", get).await?
        };
        Ok(got.map(|m| Taken { link, delivery: Some(m.delivery) }))
    }

    /// How many deliveries the broker's queue holds ready (not counting those handed out and
    /// not yet acknowledged).
    pub async fn depth(&self) -> Result<u32, QueueError> {
        let link = self.link().await?;
        let _one = link.get_lock.lock().await;
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let declare = link.get.queue_declare(self.queue.as_str().into(), passive, FieldTable::default());
        Ok(self.within(&link, "queue.declare (passive)", declare).await?.message_count())
    }

    /// Acknowledges a delivery: it leaves the queue. If the link broke meanwhile the broker
    /// hands it out again, to be dropped then.
    pub async fn ack(&self, mut taken: Taken) {
        let Some(d) = taken.delivery.take() else { return };
        if let Err(e) = self.within(&taken.link, "ack", d.acker.ack(Default::default())).await {
            tracing::debug!(error = %e, "an ack did not reach the broker; the delivery comes back and is dropped then");
        }
    }

    /// Hands a delivery back to the queue, at its place.
    pub async fn requeue(&self, mut taken: Taken) {
        let Some(d) = taken.delivery.take() else { return };
        let nack = d.acker.nack(BasicNackOptions { requeue: true, multiple: false });
        if let Err(e) = self.within(&taken.link, "nack", nack).await {
            tracing::debug!(error = %e, "a nack did not reach the broker; the link's close requeues the delivery");
        }
    }

    /// Closes the connection (the dispatcher is stopping).
    async fn close(&self) {
        let link = self.link.lock().take();
        if let Some(link) = link {
            let _ = tokio::time::timeout(Duration::from_secs(5), link.conn.close(200, "koubou: stopping".into())).await;
        }
    }
}

/// Keeps a link up while the dispatcher lives: runs each link's wake-up consumer (every
/// signal wakes that many parked workers) and, when the link breaks, connects again with a
/// growing pause.
pub(crate) async fn keep(
    broker: Arc<Broker>,
    mut consumers: mpsc::UnboundedReceiver<(Arc<Link>, Consumer)>,
    stop: CancellationToken,
) {
    loop {
        let (link, mut consumer) = tokio::select! {
            c = consumers.recv() => match c { Some(c) => c, None => return },
            _ = stop.cancelled() => break,
        };
        loop {
            tokio::select! {
                d = consumer.next() => match d {
                    Some(Ok(d)) => {
                        let n: usize = std::str::from_utf8(&d.data).ok().and_then(|s| s.parse().ok()).unwrap_or(1);
                        for _ in 0..n.clamp(1, 1024) {
                            broker.wakeup.notify_one();
                        }
                    }
                    _ => break,
                },
                _ = stop.cancelled() => {
                    broker.close().await;
                    return;
                }
            }
        }
        if !link.alive() || broker.link.lock().as_ref().is_some_and(|l| Arc::ptr_eq(l, &link)) {
            broker.broken(&link);
            tracing::warn!(broker = broker.shown(), "lost the connection to RabbitMQ; connecting again");
        }
        let mut pause = Duration::from_millis(100);
        let since = Instant::now();
        loop {
            match broker.link().await {
                Ok(_) => {
                    if since.elapsed() > Duration::from_secs(1) {
                        tracing::info!(broker = broker.shown(), "connected to RabbitMQ again");
                    }
                    break;
                }
                Err(e) => tracing::warn!(error = %e, retry_in = ?pause, "cannot reach RabbitMQ"),
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
    broker.close().await;
}
