//! The real RabbitMQ for tests (`KOUBOU_TEST_AMQP`, else guest@127.0.0.1:5672): a namespace of
//! its own per test, its queue and exchange deleted on drop; a TCP proxy that can cut the way
//! to the broker, optionally speaking TLS (for `amqps://`).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use lapin::{
    Connect, ConnectionProperties,
    options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions},
    types::FieldTable,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use super::AmqpConfig;

pub fn broker_url() -> String {
    std::env::var("KOUBOU_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A namespace of its own on the test broker; its queue and exchange are deleted on drop.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    pub fn new() -> Namespace {
        Namespace { name: format!("test-{:016x}", fastrand::u64(..)) }
    }

    pub fn config(&self) -> AmqpConfig {
        AmqpConfig { url: broker_url(), namespace: self.name.clone(), timeout_ms: 5_000, ..AmqpConfig::default() }
    }

    /// Messages ready in the namespace's queue (not counting those delivered and unacked).
    pub async fn ready(&self) -> u32 {
        let conn = broker_url().connect(ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let q = ch.queue_declare(self.config().queue_name().into(), passive, FieldTable::default()).await.unwrap();
        let _ = conn.close(200, "".into()).await;
        q.message_count()
    }
}

impl Namespace {
    /// Drops every ready message of the namespace's queue, as an operator's `purge_queue` (or a
    /// lost disk) would: their tasks stay pending in the store.
    pub async fn purge(&self) -> u32 {
        let conn = broker_url().connect(ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let n = ch.queue_purge(self.config().queue_name().into(), QueuePurgeOptions::default()).await.unwrap();
        let _ = conn.close(200, "".into()).await;
        n
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let cfg = self.config();
        // Its own thread and runtime: drop may run inside (or after) a test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let Ok(Ok(conn)) = tokio::time::timeout(
                    Duration::from_secs(10),
                    broker_url().connect(ConnectionProperties::default()),
                )
                .await
                else {
                    return;
                };
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch.queue_delete(cfg.queue_name().into(), QueueDeleteOptions::default()).await;
                    let _ = ch.exchange_delete(cfg.wake_exchange().into(), ExchangeDeleteOptions::default()).await;
                }
                let _ = conn.close(200, "".into()).await;
            });
        })
        .join();
    }
}

/// A TCP proxy to the broker on a free loopback port. `cut` closes every connection through
/// it and refuses new ones until `resume`; with a TLS acceptor, it is the TLS end.
pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    cut: Arc<parking_lot::Mutex<CancellationToken>>,
    /// Connections being relayed.
    active: Arc<AtomicUsize>,
    _stop: tokio_util::sync::DropGuard,
}

impl Proxy {
    pub async fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target: SocketAddr = {
            let uri: lapin::uri::AMQPUri = broker_url().parse().unwrap();
            tokio::net::lookup_host((uri.authority.host.as_str(), uri.authority.port)).await.unwrap().next().unwrap()
        };
        let open = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(parking_lot::Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let active = Arc::new(AtomicUsize::new(0));
        let (o, c, s, a) = (open.clone(), cut.clone(), stop.clone(), active.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = s.cancelled() => return,
                };
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let (cut, tls, stop) = (c.lock().clone(), tls.clone(), s.clone());
                let relaying = Relaying::new(a.clone());
                tokio::spawn(async move {
                    let _relaying = relaying;
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    match tls {
                        Some(acceptor) => {
                            let Ok(client) = acceptor.accept(client).await else { return };
                            pipe(client, server, cut, stop).await
                        }
                        None => pipe(client, server, cut, stop).await,
                    }
                });
            }
        });
        Proxy { addr, open, cut, active, _stop: stop.drop_guard() }
    }

    /// Closes every connection through the proxy and refuses new ones; returns once every
    /// relay has stopped (nothing more gets through).
    pub async fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        let old = std::mem::replace(&mut *self.cut.lock(), CancellationToken::new());
        old.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.active.load(Ordering::SeqCst) > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the proxy's relays did not stop");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn resume(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// The test broker's URL, through the proxy.
    pub fn url(&self, scheme: &str) -> String {
        let uri: lapin::uri::AMQPUri = broker_url().parse().unwrap();
        let u = &uri.authority.userinfo;
        format!("{scheme}://{}:{}@localhost:{}/%2f", u.username, u.password, self.addr.port())
    }
}

/// Counts a relay while it lives.
struct Relaying(Arc<AtomicUsize>);

impl Relaying {
    fn new(n: Arc<AtomicUsize>) -> Relaying {
        n.fetch_add(1, Ordering::SeqCst);
        Relaying(n)
    }
}

impl Drop for Relaying {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn pipe(
    client: impl AsyncRead + AsyncWrite + Unpin,
    mut server: TcpStream,
    cut: CancellationToken,
    stop: CancellationToken,
) {
    let mut client = client;
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut.cancelled() => {}
        _ = stop.cancelled() => {}
    }
}
