//! Real Redis servers for tests: the machine's (`KOUBOU_TEST_REDIS`, else 127.0.0.1:6379 when
//! it answers), or a private `redis-server` on a free port, killed when dropped. Each test
//! works in a namespace of its own, deleted when its [`Namespace`] is dropped.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use super::RedisConfig;

/// A Redis server: the machine's, or a private one this process started.
pub struct Server {
    pub url: String,
    pub port: u16,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

fn answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else { return false };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1)) else { return false };
    redis::cmd("PING").query::<String>(&mut conn).is_ok()
}

impl Server {
    /// A private `redis-server` (no persistence unless `args` ask for it) on a free port.
    pub fn start(args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        Server::start_in(dir, args)
    }

    /// [`Server::start`] with its files in `dir` (a restarted server finds its AOF there).
    pub fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Server {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if let Some(mut server) = Server::start_on(port, dir.path(), args) {
                server._dir = Some(dir);
                return server;
            }
        }
        panic!("could not start a private redis-server");
    }

    /// A private server on `port`, or `None` if it does not come up (the port was taken).
    pub fn start_on(port: u16, dir: &std::path::Path, args: &[&str]) -> Option<Server> {
        Server::start_as(port, dir, args, "")
    }

    /// A private server logged into as `userinfo` (`user:password@`, or `""`), on a free port.
    pub fn start_with_login(args: &[&str], userinfo: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if let Some(mut server) = Server::start_as(port, dir.path(), args, userinfo) {
                server._dir = Some(dir);
                return server;
            }
        }
        panic!("could not start a private redis-server");
    }

    fn start_as(port: u16, dir: &std::path::Path, args: &[&str], userinfo: &str) -> Option<Server> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("redis-server is installed (apt-get install redis-server)");
        let url = format!("redis://{userinfo}127.0.0.1:{port}/0");
        let mut server = Server { url, port, child: Some(child), _dir: None };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if answers(&server.url) {
                return Some(server);
            }
            if server.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The server tests share: `KOUBOU_TEST_REDIS`, else the machine's at 127.0.0.1:6379, else a
    /// private one kept while some test holds it.
    pub fn shared() -> Arc<Server> {
        static SHARED: Mutex<Weak<Server>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap();
        if let Some(s) = shared.upgrade() {
            return s;
        }
        let url = std::env::var("KOUBOU_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
        let s =
            Arc::new(if answers(&url) { Server { port: 0, url, child: None, _dir: None } } else { Server::start(&[]) });
        *shared = Arc::downgrade(&s);
        s
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A namespace of its own on a server; its keys are deleted on drop.
pub struct Namespace {
    pub server: Arc<Server>,
    pub name: String,
}

impl Namespace {
    pub fn new() -> Namespace {
        Namespace::on(Server::shared())
    }

    pub fn on(server: Arc<Server>) -> Namespace {
        Namespace { server, name: format!("test-{:016x}", fastrand::u64(..)) }
    }

    /// A queue config for this namespace, retries after 40 ms.
    pub fn config(&self) -> RedisConfig {
        RedisConfig {
            url: self.server.url.clone(),
            namespace: self.name.clone(),
            retry: crate::backoff::Backoff { base_ms: 40, max_ms: 40, jitter: 0.0 },
            ..RedisConfig::default()
        }
    }

    /// The namespace's keys.
    pub fn keys(&self) -> Vec<String> {
        let mut conn = redis::Client::open(self.server.url.as_str()).unwrap().get_connection().unwrap();
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("*{}*", self.name))
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let keys = std::panic::catch_unwind(|| self.keys()).unwrap_or_default();
        if keys.is_empty() {
            return;
        }
        if let Ok(mut conn) = redis::Client::open(self.server.url.as_str()).and_then(|c| c.get_connection()) {
            for chunk in keys.chunks(500) {
                let _: Result<(), _> = redis::cmd("UNLINK").arg(chunk).query(&mut conn);
            }
        }
    }
}
