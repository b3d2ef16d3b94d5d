//! Real Redis servers for tests (this crate's, and other crates' with the `testing` feature):
//! the machine's (`KOUBOU_TEST_REDIS`, else 127.0.0.1:6379 when it answers), or a private
//! `redis-server` on a free port, killed when dropped, which can be killed and started again on
//! the same port and files. Each test works in a namespace of its own, deleted when its
//! [`Namespace`] is dropped.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use super::RedisConfig;

/// A Redis server: the machine's, or a private one this process started.
pub struct Server {
    pub url: String,
    pub port: u16,
    /// How a private server was started, to start it again ([`Server::restart`]).
    launch: Option<Launch>,
    child: Option<Child>,
}

/// A private server's addresses, arguments and files.
struct Launch {
    bind: String,
    args: Vec<String>,
    dir: PathBuf,
    _owned: Option<tempfile::TempDir>,
}

fn answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else { return false };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1)) else { return false };
    redis::cmd("PING").query::<String>(&mut conn).is_ok()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Server {
    /// A private `redis-server` on 127.0.0.1 (no persistence unless `args` ask for it) on a
    /// free port.
    pub fn start(args: &[&str]) -> Server {
        Server::start_bound("127.0.0.1", args)
    }

    /// [`Server::start`] listening on `bind` (addresses separated by spaces, 127.0.0.1 first).
    pub fn start_bound(bind: &str, args: &[&str]) -> Server {
        Server::start_free(bind, tempfile::tempdir().unwrap(), args, "")
    }

    /// [`Server::start`] with its files in `dir` (a restarted server finds its AOF there).
    pub fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Server {
        Server::start_free("127.0.0.1", dir, args, "")
    }

    /// A private server logged into as `userinfo` (`user:password@`, or `""`), on a free port.
    pub fn start_with_login(args: &[&str], userinfo: &str) -> Server {
        Server::start_free("127.0.0.1", tempfile::tempdir().unwrap(), args, userinfo)
    }

    fn start_free(bind: &str, dir: tempfile::TempDir, args: &[&str], userinfo: &str) -> Server {
        let path = dir.path().to_owned();
        let mut launch = Some(Launch {
            bind: bind.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: path,
            _owned: Some(dir),
        });
        for _ in 0..5 {
            let mut server = Server { url: String::new(), port: free_port(), launch: launch.take(), child: None };
            if server.spawn(userinfo) {
                return server;
            }
            server.kill();
            launch = server.launch.take();
        }
        panic!("could not start a private redis-server");
    }

    /// A private server on `port`, or `None` if it does not come up (the port was taken).
    pub fn start_on(port: u16, dir: &std::path::Path, args: &[&str]) -> Option<Server> {
        let launch = Launch {
            bind: "127.0.0.1".into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: dir.to_owned(),
            _owned: None,
        };
        let mut server = Server { url: String::new(), port, launch: Some(launch), child: None };
        server.spawn("").then_some(server)
    }

    /// Starts the private server on its port and files; false if it did not answer.
    fn spawn(&mut self, userinfo: &str) -> bool {
        let launch = self.launch.as_ref().expect("a private server");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind"])
            .args(launch.bind.split_whitespace())
            .args(["--protected-mode", "no", "--save", "", "--daemonize", "no", "--dir"])
            .arg(&launch.dir)
            .args(&launch.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("redis-server is installed (apt-get install redis-server)"));
        self.url = format!("redis://{userinfo}127.0.0.1:{}/0", self.port);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if answers(&self.url) {
                return true;
            }
            if self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Starts a killed private server again on its port and files; false if it did not come
    /// back.
    pub fn restart(&mut self) -> bool {
        self.kill();
        let userinfo =
            self.url.split_once("://").and_then(|(_, rest)| rest.split_once('@')).map(|(u, _)| format!("{u}@"));
        self.spawn(&userinfo.unwrap_or_default())
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
        let s = Arc::new(if answers(&url) {
            Server { port: 0, url, launch: None, child: None }
        } else {
            Server::start(&[])
        });
        *shared = Arc::downgrade(&s);
        s
    }

    /// Runs one command on a new connection.
    pub fn query(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut conn = redis::Client::open(self.url.as_str())?.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn)
    }

    /// Kills a private server at once (SIGKILL), as a crash would.
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
    /// The server's URL.
    pub url: String,
    pub name: String,
}

impl Default for Namespace {
    fn default() -> Self {
        Namespace::new()
    }
}

impl Namespace {
    /// A namespace on the server tests share ([`Server::shared`]).
    pub fn new() -> Namespace {
        Namespace::on(Server::shared())
    }

    pub fn on(server: Arc<Server>) -> Namespace {
        Namespace { url: server.url.clone(), server, name: format!("test-{:016x}", fastrand::u64(..)) }
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

    /// The `[queue.redis]` table of a `koubou.toml` selecting this namespace.
    pub fn toml(&self) -> String {
        format!("[queue.redis]\nnamespace = \"{}\"\n", self.name)
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
