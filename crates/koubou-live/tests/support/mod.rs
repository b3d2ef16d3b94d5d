//! A real in-process Koubou behind a real server on an ephemeral 127.0.0.1 port. The "LLM" is an
//! `exec` backend running `craftsman.py` (streams words; "slow" prompts hang, "explode" fails).
#![allow(dead_code)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::{SinkExt, StreamExt};
use koubou_api::Api;
use koubou_system::{Config, Home, Koubou, StartOptions};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

pub struct Server {
    pub k: Koubou,
    pub addr: SocketAddr,
    pub _home: tempfile::TempDir,
}

impl Server {
    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    pub fn ws(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }
}

/// Starts Koubou with the fake craftsman and serves `make(k)` on 127.0.0.1:0.
pub async fn start(make: impl FnOnce(Arc<dyn Api>) -> axum::Router) -> Server {
    let home = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/craftsman.py");
    let toml = format!(
        r#"
[pool]
min_workers = 2
max_workers = 4
cooldown_ms = 100

[backends.craftsman]
kind = "exec"
argv = ["python3", "{script}"]
model = "craftsman-1"
concurrency = 4

[types.general]
backend = "craftsman"

[types.code]
backend = "craftsman"
"#
    );
    std::fs::write(home.path().join("koubou.toml"), toml).unwrap();
    let h = Home { dir: home.path().to_owned() };
    std::fs::create_dir_all(h.db_file().parent().unwrap()).unwrap();
    let cfg = Config::load(&h.config_file()).unwrap();
    let k = Koubou::start(cfg, &h, StartOptions::default()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = make(Arc::new(k.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { k, addr, _home: home }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn connect(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The least any wait here allows, whatever a test asks: the bounds only catch hangs, and a
/// machine busy with other work must not turn a slow answer into a failure.
const MIN_WAIT_SECS: u64 = 60;

/// Next JSON message, skipping none; panics after `secs` (at least [`MIN_WAIT_SECS`]).
pub async fn next_json(ws: &mut Ws, secs: u64) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(secs.max(MIN_WAIT_SECS)), ws.next())
            .await
            .expect("timed out waiting for a message")
            .expect("connection ended")
            .expect("websocket error");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// Reads until a message matches `pred`, returning it and everything read before it.
pub async fn until(ws: &mut Ws, secs: u64, pred: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs.max(MIN_WAIT_SECS));
    let mut seen = vec![];
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now()).as_secs().max(1);
        let v = next_json(ws, left).await;
        if pred(&v) {
            return (v, seen);
        }
        assert!(tokio::time::Instant::now() < deadline, "gave up; saw {seen:#?}");
        seen.push(v);
    }
}
