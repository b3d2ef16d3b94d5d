//! The distributed benchmarks, on a real Redis (`--redis URL`, default the local one), each in a
//! namespace of its own, deleted afterwards.
//!
//! `--redis-queue`: the Redis queue alone, in this process, as two nodes would use it: one
//! `RedisQueue` handle submits (a controller), another claims and completes (a worker node), each
//! with its own connections and subscription, so every wake-up and every completion crosses
//! Redis.
//! 1. One task at a time: a worker parked in `claim_wait`; the submitter stores a task and waits
//!    for its `task_completed` on its own event log. Submit → complete, as the submitter sees it.
//! 2. Throughput: `--tasks` tasks from 64 concurrent submitters while 8 workers claim and
//!    complete them.
//!
//! `--nodes 1,2,4`: real processes. A controller (`koubou serve --workers 0`) and worker nodes
//! (`koubou worker`), against a loopback OpenAI-compatible backend inside this process that
//! takes `--node-task-ms` per task, `--node-capacity` at once per node.
//! 1. An idle worker node starting a task: one node waiting, tasks submitted one at a time with
//!    idle gaps between them; the time from a task's submission to its claim, both on Redis's
//!    clock (the task's `created_at` and `started_at`), and submit → complete as the client saw
//!    it. The Redis commands run while everything stands idle show that nothing polls.
//! 2. Scaling: for each count of nodes, enough tasks to keep every slot busy for a few seconds,
//!    submitted through the controller; tasks/s against the same figure for one node.

use std::{
    net::SocketAddr,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures::StreamExt;
use koubou_queue::{Capabilities, Completion, Dispatch, RedisConfig, RedisQueue, TaskStore};
use koubou_task::{EventBus, EventKind, NewTask, TaskKind, Usage, WorkerId};
use tokio_util::sync::CancellationToken;

use super::{BenchArgs, InFlight, Server, cores, ms, percentile, slow_openai, start_server_with};

/// Submitters and workers of the throughput run, as the issue sets them.
const SUBMITTERS: usize = 64;
const WORKERS: usize = 8;
const LEASE: Duration = Duration::from_secs(60);

/// A namespace of its own on the bench's Redis, deleted when dropped.
struct Namespace {
    url: String,
    name: String,
}

impl Namespace {
    fn new(url: &str) -> Namespace {
        Namespace { url: url.to_owned(), name: format!("bench-{:016x}", fastrand::u64(..)) }
    }

    fn config(&self) -> RedisConfig {
        RedisConfig { url: self.url.clone(), namespace: self.name.clone(), ..RedisConfig::default() }
    }

    /// `[queue]` selecting this namespace, for a process's koubou.toml.
    fn toml(&self) -> String {
        format!("[queue]\nurl = \"{}\"\n[queue.redis]\nnamespace = \"{}\"\n", self.url, self.name)
    }

    /// The commands the server has run so far (every client's).
    fn commands(&self) -> anyhow::Result<u64> {
        let mut conn = redis::Client::open(self.url.as_str())?.get_connection()?;
        let info: String = redis::cmd("INFO").arg("stats").query(&mut conn)?;
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .context("INFO stats without total_commands_processed")
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let purge = || -> redis::RedisResult<()> {
            let mut conn = redis::Client::open(self.url.as_str())?.get_connection()?;
            let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{{koubou:{}}}:*", self.name)).query(&mut conn)?;
            for chunk in keys.chunks(512) {
                redis::cmd("DEL").arg(chunk).query::<()>(&mut conn)?;
            }
            Ok(())
        };
        if let Err(e) = purge() {
            eprintln!("koubou bench: could not delete the namespace {}: {e}", self.name);
        }
    }
}

fn done() -> Completion {
    Completion {
        result: "ok".into(),
        backend: "bench".into(),
        model: "none".into(),
        usage: Usage::default(),
        warnings: vec![],
        remote: false,
        cost: None,
    }
}

/// A worker of the bench, as `koubou worker`'s loop runs: claims (parked, without polling),
/// and sends each task's completion together with its next claim, until `stop`.
fn worker(
    q: RedisQueue,
    n: usize,
    stop: CancellationToken,
    completed: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (w, any) = (WorkerId::new("bench-node", n), Capabilities::any());
        let mut last: Option<koubou_queue::Lease> = None;
        loop {
            let claim = q.claim_wait(&w, &any, LEASE, &stop);
            let claimed = match last.take() {
                Some(lease) => {
                    let complete = async {
                        if let Err(e) = q.complete(&lease, done()).await {
                            panic!("koubou bench: a completion failed: {e}");
                        }
                        completed.fetch_add(1, SeqCst);
                    };
                    tokio::join!(complete, claim).1
                }
                None => claim.await,
            };
            match claimed {
                Ok(Some(c)) => last = Some(c.lease),
                Ok(None) => return,
                Err(e) => {
                    eprintln!("koubou bench: a claim failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
}

pub(super) async fn redis_queue(a: &BenchArgs) -> anyhow::Result<()> {
    let ns = Namespace::new(&a.redis);
    let open = || RedisQueue::open(ns.config(), Arc::new(EventBus::default()));
    let controller = open().await.context("opening the Redis queue (is Redis running at --redis?)")?;
    let node = open().await?;
    println!(
        "koubou bench --redis-queue: Redis at {}, namespace {}, {} cores; a submitting handle and a worker node's handle",
        node.config().redacted_url(),
        ns.name,
        cores()
    );

    // One at a time: a parked worker; submit → completion seen on the submitter's log.
    let stop = CancellationToken::new();
    let completed = Arc::new(AtomicUsize::new(0));
    let one = worker(node.clone(), 0, stop.clone(), completed.clone());
    let mut cycle = Vec::with_capacity(a.latency_tasks);
    for i in 0..a.latency_tasks + 50 {
        let mut log = controller.bus().subscribe(None);
        let t = Instant::now();
        let id = controller.submit(NewTask::new(TaskKind::general(), format!("one {i}"))).await?.task.id;
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), log.next())
                .await
                .context("no completion within 10 s")?
                .context("the event log ended")?;
            if let Ok(ev) = ev
                && matches!(&ev.kind, EventKind::TaskCompleted { task_id, .. } if *task_id == id)
            {
                break;
            }
        }
        if i >= 50 {
            cycle.push(t.elapsed());
        }
    }
    stop.cancel();
    one.await?;
    cycle.sort();
    println!(
        "one at a time (a parked worker on the other handle): submit → complete p50 {} p99 {} ({} tasks)",
        ms(percentile(&cycle, 0.5)),
        ms(percentile(&cycle, 0.99)),
        cycle.len()
    );

    // Throughput: 64 submitters, 8 workers.
    let stop = CancellationToken::new();
    let completed = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..WORKERS).map(|n| worker(node.clone(), n + 1, stop.clone(), completed.clone())).collect();
    let n = a.tasks;
    let started = Instant::now();
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|s| {
            let q = controller.clone();
            tokio::spawn(async move {
                for i in (s..n).step_by(SUBMITTERS) {
                    q.submit(NewTask::new(TaskKind::general(), format!("x{i}"))).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for s in submitters {
        s.await??;
    }
    let submitted = started.elapsed();
    while completed.load(SeqCst) < n {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("only {} of {n} tasks completed in 10 minutes", completed.load(SeqCst));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let wall = started.elapsed();
    stop.cancel();
    for w in workers {
        w.await?;
    }
    let counts = controller.counts().await?;
    println!(
        "throughput: {n} tasks, {SUBMITTERS} submitters, {WORKERS} workers: all submitted in {:.2} s, all completed in {:.2} s = {:.0} tasks/s (queue says {} completed)",
        submitted.as_secs_f64(),
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64(),
        counts.completed
    );
    Ok(())
}

/// A `koubou worker` child, killed when dropped.
struct NodeProc {
    child: Child,
    _home: tempfile::TempDir,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        // SIGTERM first: the node deregisters.
        let _ = std::process::Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `koubou worker --node-id ID` with `config`, and waits until it says it runs.
fn start_node(id: &str, config: &str) -> anyhow::Result<NodeProc> {
    use std::io::BufRead;
    let home = tempfile::Builder::new().permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700)).tempdir()?;
    std::fs::write(home.path().join("koubou.toml"), config)?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["worker", "--node-id", id, "--home"])
        .arg(home.path())
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting koubou worker")?;
    let mut lines = std::io::BufReader::new(child.stderr.take().context("no stderr")?).lines();
    let running = format!("koubou worker {id} is running");
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(&running) => break,
            Some(Ok(l)) => eprintln!("{id}: {l}"),
            _ => bail!("koubou worker {id} stopped before it ran"),
        }
    }
    // Keep reading what it says, so that it never blocks on a full pipe.
    let id = id.to_owned();
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("{id}: {l}")));
    Ok(NodeProc { child, _home: home })
}

/// The worker nodes' koubou.toml: one backend, the slow loopback one, `cap` at once.
fn node_config(ns: &Namespace, backend: SocketAddr, cap: usize) -> String {
    format!(
        "{queue}[pool]\nmin_workers = {cap}\nmax_workers = {cap}\n\
         [backends.slow]\nkind = \"openai\"\nbase_url = \"http://{backend}/v1\"\nmodel = \"fake\"\napi_key_env = \"\"\nconcurrency = {cap}\n\
         [types.general]\nbackend = \"slow\"\n",
        queue = ns.toml()
    )
}

async fn controller(ns: &Namespace, backend: SocketAddr, cap: usize) -> anyhow::Result<Server> {
    start_server_with(&node_config(ns, backend, cap), &["--workers", "0", "--node-id", "bench-ctl"]).await
}

/// Waits until `n` worker nodes are registered beside the controller.
async fn nodes_up(http: &reqwest::Client, url: &str, n: usize) -> anyhow::Result<()> {
    for _ in 0..600 {
        let v: serde_json::Value = http.get(format!("{url}/nodes")).send().await?.json().await?;
        let workers = v["nodes"].as_array().map_or(0, |a| a.iter().filter(|n| n["id"] != "bench-ctl").count());
        if workers >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{n} worker nodes did not register within 30 s")
}

/// The node counts of `--nodes`: `1,2,4`.
pub(super) fn node_counts(s: &str) -> Result<Vec<usize>, String> {
    let counts: Vec<usize> = s
        .split(',')
        .map(|w| w.trim().parse::<usize>().map_err(|_| format!("--nodes: {w:?} is not a count of nodes")))
        .collect::<Result<_, _>>()?;
    if counts.is_empty() || counts.iter().any(|&n| n == 0 || n > 64) {
        return Err("--nodes: give counts from 1 to 64, e.g. 1,2,4".into());
    }
    Ok(counts)
}

pub(super) async fn nodes(a: &BenchArgs) -> anyhow::Result<()> {
    let counts = node_counts(&a.nodes.clone().unwrap_or_default()).map_err(anyhow::Error::msg)?;
    let per_task = Duration::from_millis(a.node_task_ms);
    let cap = a.node_capacity.max(1);
    let http = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;
    println!(
        "koubou bench --nodes {}: Redis at {}, backend {} ms per task, {cap} at once per node, {} cores",
        counts.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
        a.redis,
        a.node_task_ms,
        cores()
    );

    // An idle node starting a task.
    {
        let ns = Namespace::new(&a.redis);
        let seen = Arc::new(InFlight::default());
        let backend = slow_openai(Duration::ZERO, seen).await?;
        let ctl = controller(&ns, backend, cap).await?;
        let _node = start_node("bench-w1", &node_config(&ns, backend, cap))?;
        nodes_up(&http, &ctl.url, 1).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = ns.commands()?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle_commands = ns.commands()?.saturating_sub(before);
        let mut claim = Vec::new();
        let mut round = Vec::new();
        for i in 0..a.idle_tasks {
            // Idle between tasks: long enough for any poll to show.
            tokio::time::sleep(Duration::from_millis(fastrand::u64(50..150))).await;
            let t = Instant::now();
            let v: serde_json::Value = http
                .post(format!("{}/task/delegate", ctl.url))
                .json(&serde_json::json!({"prompt": format!("idle {i}"), "sync": true}))
                .send()
                .await?
                .json()
                .await?;
            round.push(t.elapsed());
            if v["status"] != "completed" {
                bail!("task did not complete: {v}");
            }
            let id = v["task_id"].as_str().context("no task_id")?;
            let task: serde_json::Value = http.get(format!("{}/task/{id}", ctl.url)).send().await?.json().await?;
            let at = |f: &str| {
                task[f]
                    .as_str()
                    .and_then(koubou_task::parse_rfc3339)
                    .with_context(|| format!("task without {f}: {task}"))
            };
            claim.push(Duration::from_millis((at("started_at")? - at("created_at")?).max(0) as u64));
        }
        claim.sort();
        round.sort();
        println!(
            "idle worker node: submit → claimed (Redis clock, 1 ms steps) p50 {} p99 {} max {}; submit → complete at the client p50 {} p99 {} ({} tasks, 50–150 ms idle before each)",
            ms(percentile(&claim, 0.5)),
            ms(percentile(&claim, 0.99)),
            ms(claim.last().copied().unwrap_or_default()),
            ms(percentile(&round, 0.5)),
            ms(percentile(&round, 0.99)),
            claim.len()
        );
        println!(
            "  while controller and node stood idle for 2 s, Redis ran {idle_commands} commands from every client on the server (renewals, not polls)"
        );
    }

    // Scaling.
    let mut one = None;
    for &n in &counts {
        let ns = Namespace::new(&a.redis);
        let seen = Arc::new(InFlight::default());
        let backend = slow_openai(per_task, seen.clone()).await?;
        let ctl = controller(&ns, backend, cap).await?;
        let mut procs = Vec::new();
        for k in 0..n {
            procs.push(start_node(&format!("bench-w{}", k + 1), &node_config(&ns, backend, cap))?);
        }
        nodes_up(&http, &ctl.url, n).await?;
        let slots = n * cap;
        // Warm up: every node's connections and workers.
        super::drive(&ctl.url, "general", slots * 2, slots * 2).await?;
        let tasks = slots * a.node_rounds;
        let (lat, wall) = super::drive(&ctl.url, "general", tasks, slots * 4).await?;
        let rate = tasks as f64 / wall.as_secs_f64();
        let ideal = slots as f64 / per_task.as_secs_f64();
        let base = *one.get_or_insert(rate / n as f64);
        println!(
            "{n} node(s), {slots} slots: {tasks} tasks in {:.2} s = {rate:.1} tasks/s; ideal {ideal:.0}/s ({:.0}%); {:.2}x linear from one node; backend saw at most {} at once; submit → complete p50 {} p99 {}",
            wall.as_secs_f64(),
            100.0 * rate / ideal,
            rate / (base * n as f64),
            seen.peak.load(SeqCst),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
        );
        drop(procs);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_counts_are_read_and_checked() {
        assert_eq!(node_counts("1,2,4").unwrap(), [1, 2, 4]);
        assert_eq!(node_counts(" 3 ").unwrap(), [3]);
        for bad in ["", "0", "1,x", "65"] {
            assert!(node_counts(bad).unwrap_err().starts_with("--nodes"), "{bad:?}");
        }
    }
}
