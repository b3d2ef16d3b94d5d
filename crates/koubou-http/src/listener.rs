//! Serving one port: HTTP/1.1 through hyper, with the limits a listener needs so that clients
//! that never finish a request cannot take the server from everyone else.
//!
//! - A header-read timeout (`server.header_read_timeout_secs`, at most 30 s): a client that has
//!   not sent a whole request head by then — a slowloris sending a byte at a time, or an idle
//!   kept-alive connection — is disconnected. (The deadline is for the whole head, not reset by
//!   each byte.) Bodies have their own deadline, in [`crate::body`].
//! - A cap on open connections (`server.max_connections`): one more is answered at once with a
//!   503 naming the setting and closed, without being read. An upgraded WebSocket leaves this
//!   count (its own cap is `limits.max_ws_connections`).
//! - Graceful shutdown: on `stop`, no new connections; open ones finish their request in flight.
//!
//! Each request carries `ConnectInfo<SocketAddr>` (the client's address) for the guard.

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// Connections being refused at once (each is answered and closed within [`REFUSE_WITHIN`]);
/// past this a connection over the cap is closed without an answer.
const REFUSING: usize = 64;
const REFUSE_WITHIN: Duration = Duration::from_secs(2);

/// Serves `app` on `listener` until `stop` is cancelled and the open connections have finished.
pub async fn serve(listener: TcpListener, app: Router, opts: Listen, stop: CancellationToken) {
    let max = opts.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(opts.header_read_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e, &stop).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refuse(stream, max, &refusing);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = app.clone().map_request(move |mut req: axum::http::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req
        });
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc)).with_upgrades();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut stopping = false;
            let r = loop {
                tokio::select! {
                    r = conn.as_mut() => break r,
                    _ = stop.cancelled(), if !stopping => {
                        conn.as_mut().graceful_shutdown();
                        stopping = true;
                    }
                }
            };
            if let Err(e) = r {
                // A header-read timeout, a reset, a malformed request: the client's doing.
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    // Every connection holds a slot until it ends: having them all back means all are done.
    let _ = slots.acquire_many(max as u32).await;
}

/// Accepting fails on a connection reset before it was accepted (nothing to do) or when the
/// process is out of file descriptors (wait a little instead of spinning).
async fn accept_failed(e: std::io::Error, stop: &CancellationToken) {
    use std::io::ErrorKind::*;
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted) {
        return;
    }
    tracing::warn!(error = %e, "cannot accept a connection; retrying in a second");
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
}

/// Answers a connection over the cap with a 503 and closes it. The request is not parsed; what
/// the client sent is read and thrown away so that closing does not reset the connection
/// before the client has read the answer.
fn refuse(mut stream: TcpStream, max: usize, refusing: &Arc<Semaphore>) {
    let Ok(permit) = refusing.clone().try_acquire_owned() else { return };
    tokio::spawn(async move {
        let body = serde_json::json!({"error": {
            "code": "too_many_connections",
            "message": format!("this port already has {max} connections open (server.max_connections); retry shortly"),
            "field": "server.max_connections",
        }})
        .to_string();
        let head = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             retry-after: 1\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let _ = tokio::time::timeout(REFUSE_WITHIN, async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            while stream.read(&mut sink).await? > 0 {}
            std::io::Result::Ok(())
        })
        .await;
        drop(permit);
    });
}
