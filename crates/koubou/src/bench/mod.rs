//! `koubou bench`: pushes tasks through the real HTTP API of a real `koubou serve` (a child
//! process on a free loopback port, with a fresh SQLite home) and prints what it measured.
//!
//! 1. Throughput: `--tasks` tasks, `--concurrency` at a time, each `POST /task/delegate` with
//!    `"sync": true` (answered when the task is done, so each request's time is the task's
//!    submit-to-complete latency), against the in-process `echo` backend: Koubou's own cost.
//! 2. Added latency: one at a time, a task routed to an OpenAI-compatible backend — a tiny SSE
//!    server inside this bench process — against calling that same server directly.
//! 3. The server's peak RSS (`VmHWM` of the child).
//!
//! `--embedded` instead measures the embedded model through the whole system (queue → worker →
//! engine → SSE): one task's generation rate and first token, four tasks at once; `--with-load`
//! again while a `yes` process keeps a core busy; `--compare PY` runs llama-cpp-python's OpenAI
//! server (a child, streamed over HTTP) on the same GGUF and prompt beside it, at its default
//! threads and at koubou's, each run interleaved with koubou's.
//! `--pool` measures how fast the pool scales up: from
//! one worker, `--pool-tasks` tasks at once against a loopback OpenAI-compatible backend of
//! capacity `--pool-capacity` that takes `--pool-task-ms` per task, with `max_workers` equal to
//! that capacity, compared with the ideal (every slot busy from the first moment).

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use axum::{Router, response::IntoResponse, routing::post};
use clap::Args;
use futures::StreamExt;

use crate::Ctx;

mod distributed;

#[derive(Args)]
pub struct BenchArgs {
    /// Tasks for the throughput run.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Tasks for the added-latency run (one at a time).
    #[arg(long, default_value_t = 500)]
    latency_tasks: usize,
    /// Queue durability: normal (survives kill -9) or full (fsync per commit batch).
    #[arg(long, default_value = "normal")]
    durability: String,
    /// Workers in the server.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Instead: measure the embedded model through the whole system (queue, worker, engine,
    /// SSE stream): prompt and generation tokens/s, first-token latency, 1 and 4 tasks at once.
    #[arg(long)]
    embedded: bool,
    /// With --embedded: engine threads (default: the engine's own choice).
    #[arg(long)]
    threads: Option<usize>,
    /// With --embedded: engine threads for batched decodes (default: the engine's own choice).
    #[arg(long)]
    batch_threads: Option<usize>,
    /// With --embedded: `share_cores` (default: the engine's own choice, on).
    #[arg(long)]
    share_cores: Option<bool>,
    /// With --embedded: the weight format served: auto, original, q4_0, q8_0, iq4_nl.
    #[arg(long)]
    weights: Option<String>,
    /// With --embedded: the KV cache type: q8_0 or f16.
    #[arg(long)]
    kv_cache: Option<String>,
    /// With --embedded: measure everything a second time while another process keeps one core
    /// busy (`yes`, bounded by `timeout`).
    #[arg(long)]
    with_load: bool,
    /// With --embedded: a python with llama-cpp-python[server] (scripts/ensure-llama-cpp-python.sh
    /// prints one): its OpenAI server is run on the same GGUF and prompt, at its default threads
    /// and at koubou's thread count, streamed over HTTP, interleaved with koubou's runs.
    #[arg(long)]
    compare: Option<String>,
    /// With --embedded: runs per figure (the median is printed).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Instead: how fast the pool grows to a backlog (from one worker, against a slow backend).
    #[arg(long)]
    pool: bool,
    /// With --pool: tasks submitted at once.
    #[arg(long, default_value_t = 40)]
    pool_tasks: usize,
    /// With --pool: the backend's capacity, and the pool's `max_workers`.
    #[arg(long, default_value_t = 8)]
    pool_capacity: usize,
    /// With --pool: how long the backend takes per task, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pool_task_ms: u64,
    /// Instead: the Redis queue alone (in this process, a submitting handle and a worker node's
    /// handle on one namespace): submit → complete one at a time, and `--tasks` tasks from 64
    /// submitters to 8 workers.
    #[arg(long)]
    redis_queue: bool,
    /// Instead: worker-node processes over Redis, e.g. `1,2,4`: an idle node starting a task,
    /// then throughput with each count of nodes against a slow loopback backend.
    #[arg(long, value_name = "COUNTS")]
    nodes: Option<String>,
    /// The Redis of --redis-queue and --nodes (each run uses a namespace of its own and deletes
    /// it afterwards).
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379/0")]
    redis: String,
    /// With --nodes: how long the backend takes per task, in milliseconds.
    #[arg(long, default_value_t = 50)]
    node_task_ms: u64,
    /// With --nodes: tasks each node's backend takes at once (and the node's max_workers).
    #[arg(long, default_value_t = 4)]
    node_capacity: usize,
    /// With --nodes: tasks per slot in each scaling run (a slot is one task at once on a node).
    #[arg(long, default_value_t = 40)]
    node_rounds: usize,
    /// With --nodes: tasks submitted one at a time to an idle node.
    #[arg(long, default_value_t = 200)]
    idle_tasks: usize,
}

/// The answer of the fake OpenAI-compatible server: one content chunk, a finish, `[DONE]`.
const FAKE_SSE: &str = concat!(
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n"
);

/// The instant OpenAI-compatible server.
async fn fake_openai() -> anyhow::Result<SocketAddr> {
    async fn chat() -> impl IntoResponse {
        ([("content-type", "text/event-stream")], FAKE_SSE)
    }
    serve_fake(Router::new().route("/v1/chat/completions", post(chat))).await
}

async fn serve_fake(app: Router) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// CPU time (user + system) the process has used, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10)) // USER_HZ is 100 on Linux
}

fn peak_rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

struct Server {
    child: std::process::Child,
    url: String,
    _home: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `koubou serve` on a free port with `config` (everything but `[server]`).
async fn start_server(config: &str) -> anyhow::Result<Server> {
    start_server_with(config, &[]).await
}

/// [`start_server`], with more arguments to `koubou serve`.
async fn start_server_with(config: &str, args: &[&str]) -> anyhow::Result<Server> {
    // Readable by this user only, as `koubou serve` wants a home holding prompts to be.
    let home = tempfile::Builder::new().permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700)).tempdir()?;
    let port = free_port()?;
    let config = format!("[server]\nport = {port}\nws_port = 0\ngraphql_port = 0\n{config}");
    std::fs::write(home.path().join("koubou.toml"), config)?;
    let exe = std::env::current_exe()?;
    let child = std::process::Command::new(exe)
        .args(["serve", "--home"])
        .arg(home.path())
        .args(args)
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting koubou serve")?;
    let server = Server { child, url: format!("http://127.0.0.1:{port}"), _home: home };
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if http.get(format!("{}/health", server.url)).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(server);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("koubou serve did not become healthy within 30 s")
}

fn http_bench_config(a: &BenchArgs, fake: SocketAddr) -> String {
    format!(
        r#"
[queue]
durability = "{durability}"
[pool]
min_workers = {w}
max_workers = {w}
[backends.instant]
kind = "echo"
reply = "ok"
concurrency = 64
[backends.fake]
kind = "openai"
base_url = "http://{fake}/v1"
model = "fake"
api_key_env = ""
concurrency = 64
[types.general]
backend = "instant"
[types.viafake]
backend = "fake"
"#,
        durability = a.durability,
        w = a.workers,
    )
}

/// Runs `n` sync submissions of `kind`, `concurrency` at a time; returns latencies and wall time.
async fn drive(url: &str, kind: &str, n: usize, concurrency: usize) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build()?;
    let endpoint = Arc::new(format!("{url}/task/delegate"));
    let started = Instant::now();
    let results: Vec<anyhow::Result<Duration>> = futures::stream::iter(0..n)
        .map(|i| {
            let (http, endpoint) = (http.clone(), endpoint.clone());
            let body = serde_json::json!({ "type": kind, "prompt": format!("task {i}"), "sync": true });
            async move {
                let t = Instant::now();
                let r = http.post(endpoint.as_str()).json(&body).send().await?;
                let v: serde_json::Value = r.json().await?;
                if v["status"] != "completed" {
                    bail!("task did not complete: {v}");
                }
                Ok(t.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let wall = started.elapsed();
    let mut lat = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    lat.sort();
    Ok((lat, wall))
}

pub async fn run(_ctx: &Ctx, a: BenchArgs) -> anyhow::Result<()> {
    crate::logging::init_quiet();
    if a.embedded {
        return embedded(&a).await;
    }
    if a.pool {
        return pool(&a).await;
    }
    if a.redis_queue {
        return distributed::redis_queue(&a).await;
    }
    if a.nodes.is_some() {
        return distributed::nodes(&a).await;
    }
    let fake = fake_openai().await?;
    let server = start_server(&http_bench_config(&a, fake)).await?;
    println!(
        "koubou bench: server pid {}, SQLite durability {}, {} workers, {} cores",
        server.child.id(),
        a.durability,
        a.workers,
        cores()
    );

    // Warm up connections and caches.
    drive(&server.url, "general", 500, a.concurrency).await?;
    let cpu_before = cpu_time(server.child.id());
    let (lat, wall) = drive(&server.url, "general", a.tasks, a.concurrency).await?;
    let server_cpu = cpu_time(server.child.id()).zip(cpu_before).map(|(a, b)| a.saturating_sub(b));
    println!(
        "throughput: {} tasks in {:.2} s = {:.0} tasks/s (concurrency {}); submit-to-complete p50 {} p99 {}",
        a.tasks,
        wall.as_secs_f64(),
        a.tasks as f64 / wall.as_secs_f64(),
        a.concurrency,
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99))
    );
    if let Some(cpu) = server_cpu {
        println!(
            "server CPU: {:.2} s for {} tasks = {:.0} µs per task (the bench client shares the same cores)",
            cpu.as_secs_f64(),
            a.tasks,
            cpu.as_secs_f64() * 1e6 / a.tasks as f64
        );
    }

    // Added latency: the same backend call, direct and through Koubou, one at a time.
    let http = reqwest::Client::new();
    let direct_url = format!("http://{fake}/v1/chat/completions");
    let mut direct = Vec::with_capacity(a.latency_tasks);
    for i in 0..a.latency_tasks + 50 {
        let t = Instant::now();
        let body = serde_json::json!({"model": "fake", "stream": true, "messages": [{"role": "user", "content": format!("task {i}")}]});
        let text = http.post(&direct_url).json(&body).send().await?.text().await?;
        if !text.contains("[DONE]") {
            bail!("the fake backend answered oddly: {text}");
        }
        if i >= 50 {
            direct.push(t.elapsed());
        }
    }
    direct.sort();
    let (echo_seq, _) = drive(&server.url, "general", a.latency_tasks, 1).await?;
    println!(
        "one at a time, echo backend (no backend I/O): submit-to-complete p50 {} p99 {}",
        ms(percentile(&echo_seq, 0.5)),
        ms(percentile(&echo_seq, 0.99))
    );
    drive(&server.url, "viafake", 50, 1).await?;
    let (via, _) = drive(&server.url, "viafake", a.latency_tasks, 1).await?;
    let (d50, v50) = (percentile(&direct, 0.5), percentile(&via, 0.5));
    println!(
        "added latency: backend direct p50 {} p99 {}; through koubou p50 {} p99 {}; added p50 {}",
        ms(d50),
        ms(percentile(&direct, 0.99)),
        ms(v50),
        ms(percentile(&via, 0.99)),
        ms(v50.saturating_sub(d50))
    );
    match peak_rss_kb(server.child.id()) {
        Some(kb) => println!("server peak RSS: {:.1} MiB", kb as f64 / 1024.0),
        None => println!("server peak RSS: unknown"),
    }
    Ok(())
}

/// The same words as the llama-cpp-python comparison script's prompt (system + user), sent as a
/// task: the system applies the model's chat template, which yields the same ChatML.
const EMBEDDED_SYSTEM: &str =
    "You are a helpful assistant who writes clear, detailed and well organised explanations for curious readers.";
const EMBEDDED_PROMPT: &str = "Explain step by step how a bicycle works: describe the frame, the wheels, the chain and \
the gears, the brakes, and how the rider keeps balance while moving. Then give three practical tips for keeping a \
bicycle in good condition through the winter.";
/// Greedy tokens asked for per task.
const EMBEDDED_TOKENS: u32 = 128;

/// What serves a streamed generation: Koubou's task API (queue → worker → engine → SSE), or an
/// OpenAI-compatible server (llama-cpp-python's) streamed as any client would call it.
enum Target {
    Koubou { url: String },
    OpenAi { url: String },
}

/// One streamed generation, as the client saw it.
struct Stream {
    submitted: Instant,
    /// When each generated token's text arrived.
    stamps: Vec<Instant>,
    /// Generated tokens (Koubou's usage; one content chunk per token from the OpenAI server).
    tokens: u64,
    prompt_tokens: Option<u64>,
}

impl Stream {
    fn first(&self) -> Instant {
        self.stamps.first().copied().unwrap_or(self.submitted)
    }

    fn last(&self) -> Instant {
        self.stamps.last().copied().unwrap_or(self.submitted)
    }

    /// Generation tokens/s, from the first token to the last (prompt processing excluded).
    fn gen_rate(&self) -> f64 {
        self.tokens.saturating_sub(1) as f64 / (self.last() - self.first()).as_secs_f64().max(1e-9)
    }
}

/// Reads a `text/event-stream` body, calling `event` with each event's text as it arrives.
async fn read_events(resp: reqwest::Response, mut event: impl FnMut(&str, Instant)) -> anyhow::Result<()> {
    let mut stream = resp.error_for_status()?.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        let now = Instant::now();
        while let Some(end) = buf.find("\n\n") {
            let ev: String = buf.drain(..end + 2).collect();
            event(&ev, now);
        }
    }
    Ok(())
}

impl Target {
    async fn generate(&self, http: &reqwest::Client, tokens: u32) -> anyhow::Result<Stream> {
        match self {
            Target::Koubou { url } => koubou_task(http, url, tokens).await,
            Target::OpenAi { url } => openai_stream(http, url, tokens).await,
        }
    }
}

async fn koubou_task(http: &reqwest::Client, url: &str, tokens: u32) -> anyhow::Result<Stream> {
    let body = serde_json::json!({"prompt": EMBEDDED_PROMPT, "system": EMBEDDED_SYSTEM,
        "options": {"temperature": 0, "max_tokens": tokens}});
    let submitted = Instant::now();
    let v: serde_json::Value = http.post(format!("{url}/task/delegate")).json(&body).send().await?.json().await?;
    let id = v["task_id"].as_str().context("no task_id")?.to_owned();
    let mut stamps = Vec::new();
    let events = http.get(format!("{url}/task/{id}/events")).send().await?;
    read_events(events, |ev, at| {
        if ev.contains("event: task_token") {
            stamps.push(at);
        }
    })
    .await?;
    let t: serde_json::Value = http.get(format!("{url}/task/{id}/status")).send().await?.json().await?;
    if t["status"] != "completed" {
        bail!("embedded task did not complete: {t}");
    }
    if stamps.is_empty() {
        bail!("no token streamed");
    }
    Ok(Stream {
        submitted,
        stamps,
        tokens: t["usage"]["completion_tokens"].as_u64().unwrap_or(0),
        prompt_tokens: t["usage"]["prompt_tokens"].as_u64(),
    })
}

fn openai_body(tokens: u32, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "bench", "stream": stream, "temperature": 0, "max_tokens": tokens,
        "messages": [{"role": "system", "content": EMBEDDED_SYSTEM}, {"role": "user", "content": EMBEDDED_PROMPT}]})
}

async fn openai_stream(http: &reqwest::Client, url: &str, tokens: u32) -> anyhow::Result<Stream> {
    let submitted = Instant::now();
    let resp = http.post(format!("{url}/v1/chat/completions")).json(&openai_body(tokens, true)).send().await?;
    let (mut stamps, mut finish, mut done, mut bad) = (Vec::new(), None, false, None);
    read_events(resp, |ev, at| {
        for data in ev.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim) {
            if data == "[DONE]" {
                done = true;
                continue;
            }
            match serde_json::from_str::<serde_json::Value>(data) {
                Ok(v) => {
                    let choice = &v["choices"][0];
                    if choice["delta"]["content"].is_string() {
                        stamps.push(at);
                    }
                    if let Some(f) = choice["finish_reason"].as_str() {
                        finish = Some(f.to_owned());
                    }
                }
                Err(e) => bad = Some(format!("{e}: {data}")),
            }
        }
    })
    .await?;
    if let Some(b) = bad {
        bail!("the OpenAI server streamed something that is not JSON: {b}");
    }
    // A stream cut short ends without [DONE] or without a finish_reason (see
    // ../shared/reference/openai-server.md): a failure, not an answer.
    if !done || finish.is_none() || stamps.is_empty() {
        bail!("the OpenAI server's stream ended early ({} tokens, [DONE] {done}, finish {finish:?})", stamps.len());
    }
    let tokens = stamps.len() as u64;
    Ok(Stream { submitted, stamps, tokens, prompt_tokens: None })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// What one target did in one condition (medians over the runs).
#[derive(Default)]
struct Figures {
    /// One task: generation tokens/s, first-token seconds, tokens generated.
    rates: Vec<f64>,
    first: Vec<f64>,
    tokens: u64,
    prompt_tokens: Option<u64>,
    /// Four tasks at once: generation tokens/s from when all four generate to the last token;
    /// and every generated token over the time from submission to the last token.
    agg: Vec<f64>,
    wall: Vec<f64>,
}

impl Figures {
    async fn one(&mut self, target: &Target, http: &reqwest::Client) -> anyhow::Result<()> {
        let r = target.generate(http, EMBEDDED_TOKENS).await?;
        self.rates.push(r.gen_rate());
        self.first.push((r.first() - r.submitted).as_secs_f64());
        self.tokens = r.tokens;
        self.prompt_tokens = self.prompt_tokens.or(r.prompt_tokens);
        Ok(())
    }

    async fn four(&mut self, target: &Target, http: &reqwest::Client) -> anyhow::Result<()> {
        let all = futures::future::try_join_all((0..4).map(|_| target.generate(http, EMBEDDED_TOKENS))).await?;
        // Generation only, as for one task (whose rate runs from its first token to its last):
        // from the moment all four are generating (the last first token; before it, prompts are
        // still being processed) to the last token, counting the tokens streamed in between. A
        // server that runs one request at a time never has four generating: this is then the
        // last one's rate.
        let start = all.iter().map(Stream::first).max().context("no runs")?;
        let end = all.iter().map(Stream::last).max().context("no runs")?;
        let tokens = all.iter().flat_map(|r| &r.stamps).filter(|&&t| t > start).count();
        self.agg.push(tokens as f64 / (end - start).as_secs_f64().max(1e-9));
        let submitted = all.iter().map(|r| r.submitted).min().context("no runs")?;
        let every: u64 = all.iter().map(|r| r.tokens).sum();
        self.wall.push(every as f64 / (end - submitted).as_secs_f64().max(1e-9));
        Ok(())
    }

    fn gen1(&self) -> f64 {
        median(self.rates.clone())
    }

    fn print(&self, label: &str, name: &str) {
        let (gen1, first1, agg, wall) =
            (self.gen1(), median(self.first.clone()), median(self.agg.clone()), median(self.wall.clone()));
        let prompt = self.prompt_tokens.map(|p| format!("{p} prompt tokens, ")).unwrap_or_default();
        println!(
            "[{label}] {name}: 1 task: {prompt}{} generated; generation {gen1:.1} tok/s, first token {:.0} ms \
             (includes prompt processing); median of {}",
            self.tokens,
            first1 * 1e3,
            self.rates.len()
        );
        println!(
            "[{label}] {name}: 4 tasks at once: {agg:.1} tok/s from when all four generate to the last token \
             ({:.2}x one task); {wall:.1} tok/s counting from submission (prompts included); median of {}",
            agg / gen1,
            self.agg.len()
        );
    }
}

/// One condition (idle, or with a competing load): the runs of every target interleaved (one
/// task on each in turn, then four tasks on each in turn), so a change in the machine's other
/// work falls on all of them alike.
async fn embedded_round(
    a: &BenchArgs,
    http: &reqwest::Client,
    targets: &[(String, Target)],
    label: &str,
) -> anyhow::Result<Vec<Figures>> {
    let mut figs: Vec<Figures> = targets.iter().map(|_| Figures::default()).collect();
    for _ in 0..a.runs.max(1) {
        for ((_, t), f) in targets.iter().zip(&mut figs) {
            f.one(t, http).await?;
        }
    }
    for _ in 0..a.runs.max(1) {
        for ((_, t), f) in targets.iter().zip(&mut figs) {
            f.four(t, http).await?;
        }
    }
    for ((name, _), f) in targets.iter().zip(&figs) {
        f.print(label, name);
    }
    let koubou = figs[0].gen1();
    for ((name, _), f) in targets.iter().zip(&figs).skip(1) {
        println!(
            "[{label}] koubou / {name}: one task {:.0}%, four tasks {:.0}% (from when all generate), {:.0}% (from submission)",
            koubou / f.gen1() * 100.0,
            median(figs[0].agg.clone()) / median(f.agg.clone()) * 100.0,
            median(figs[0].wall.clone()) / median(f.wall.clone()) * 100.0,
        );
    }
    Ok(figs)
}

/// A process that keeps one core busy until dropped (`timeout` bounds it if we die first).
struct CpuLoad(std::process::Child);

impl CpuLoad {
    fn start() -> anyhow::Result<CpuLoad> {
        let child = std::process::Command::new("timeout")
            .args(["1800", "yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the competing load (timeout yes)")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(CpuLoad(child))
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        // SIGTERM, which `timeout` forwards to `yes` (SIGKILL would orphan it).
        let _ = std::process::Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

/// llama-cpp-python's OpenAI server, a child process on a free loopback port.
struct OpenAiServer {
    _child: tokio::process::Child,
    url: String,
}

/// Starts `PY -m llama_cpp.server` on `model`, with `threads` = (n_threads, n_threads_batch) or
/// its own defaults, and waits until it serves.
async fn start_llama_cpp_server(
    py: &str,
    model: &std::path::Path,
    threads: Option<usize>,
    http: &reqwest::Client,
) -> anyhow::Result<OpenAiServer> {
    let port = free_port()?;
    let mut cmd = tokio::process::Command::new(py);
    cmd.args(["-m", "llama_cpp.server", "--model"])
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--verbose", "false"])
        // Four tasks at once queue instead of cutting each other short (its default would).
        .args(["--interrupt_requests", "false"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(t) = threads {
        cmd.args(["--n_threads", &t.to_string(), "--n_threads_batch", &t.to_string()]);
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {py} -m llama_cpp.server"))?;
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..1200 {
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            bail!("llama_cpp.server exited ({status}) before serving: {err}");
        }
        if http.get(format!("{url}/v1/models")).send().await.is_ok_and(|r| r.status().is_success()) {
            // Warm up (and learn the prompt's length from a non-streamed answer's usage).
            let v: serde_json::Value = http
                .post(format!("{url}/v1/chat/completions"))
                .json(&openai_body(16, false))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            if v["usage"]["prompt_tokens"].as_u64().is_none() {
                bail!("llama_cpp.server answered oddly: {v}");
            }
            drop(child.stderr.take()); // nothing reads it from here on
            return Ok(OpenAiServer { _child: child, url });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("llama_cpp.server did not serve within 60 s")
}

async fn embedded(a: &BenchArgs) -> anyhow::Result<()> {
    let mut settings = String::new();
    if let Some(t) = a.threads {
        settings += &format!("threads = {t}\n");
    }
    if let Some(t) = a.batch_threads {
        settings += &format!("batch_threads = {t}\n");
    }
    if let Some(b) = a.share_cores {
        settings += &format!("share_cores = {b}\n");
    }
    if let Some(w) = &a.weights {
        settings += &format!("weights = {}\n", toml_str(w));
    }
    if let Some(k) = &a.kv_cache {
        settings += &format!("kv_cache = {}\n", toml_str(k));
    }
    let config = format!(
        "[pool]\nmin_workers = 4\nmax_workers = 4\n[backends.embedded]\nkind = \"embedded\"\nparallel = 4\n{settings}\
         [types.general]\nbackend = \"embedded\"\ntimeout_secs = 600\n"
    );
    println!(
        "koubou bench --embedded: {} cores; load average {}",
        cores(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let server = start_server(&config).await?;
    let http = reqwest::Client::new();
    let koubou = Target::Koubou { url: server.url.clone() };
    koubou.generate(&http, 16).await?; // load the model, warm caches
    // Backend health is re-checked every 15 s; wait for the one that describes the loaded model.
    for _ in 0..40 {
        let health: serde_json::Value = http.get(format!("{}/health", server.url)).send().await?.json().await?;
        if let Some(detail) = find_string(&health, "embedded llama.cpp").filter(|d| d.contains(" loaded ")) {
            println!("{detail}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("koubou's llama.cpp: {}", build_info());

    // The references: llama-cpp-python's server on the same GGUF (and on the copy koubou serves,
    // when it re-encodes), at its default threads and at koubou's thread count.
    let mut targets = vec![("koubou".to_string(), koubou)];
    let mut reference_servers = Vec::new();
    if let Some(py) = &a.compare {
        let (original, served, threads) = engine_files(a)?;
        if let Ok(info) = std::process::Command::new(py)
            .args(["-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"])
            .output()
        {
            println!("llama-cpp-python's llama.cpp: {}", String::from_utf8_lossy(&info.stdout).trim());
        }
        let mut files = vec![("the same GGUF", original.clone())];
        if served != original {
            files.push(("the copy koubou serves", served));
        }
        for (what, model) in files {
            let name = model.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            for t in [None, Some(threads)] {
                let s = start_llama_cpp_server(py, &model, t, &http).await?;
                let how = match t {
                    None => "its default threads".to_string(),
                    Some(t) => format!("--n_threads {t} --n_threads_batch {t}"),
                };
                targets.push((
                    format!("llama-cpp-python server ({how}; {what}: {name})"),
                    Target::OpenAi { url: s.url.clone() },
                ));
                reference_servers.push(s);
            }
        }
    }

    embedded_round(a, &http, &targets, "idle").await?;
    if a.with_load {
        let _load = CpuLoad::start()?;
        embedded_round(a, &http, &targets, "one core busy").await?;
    }
    match peak_rss_kb(server.child.id()) {
        Some(kb) => println!("koubou server peak RSS: {:.1} MiB", kb as f64 / 1024.0),
        None => println!("koubou server peak RSS: unknown"),
    }
    Ok(())
}

/// ggml's account of the CPU features compiled into this binary, and whether it is a build for
/// this CPU.
#[cfg(feature = "embedded")]
fn build_info() -> String {
    let exts = koubou_llama::cpu::extensions();
    format!("{}; {}", koubou_llama::cpu::system_info(), koubou_llama::cpu::describe(&exts))
}

#[cfg(not(feature = "embedded"))]
fn build_info() -> String {
    "not built in".into()
}

fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// The first string inside `v` that contains `needle`.
fn find_string<'a>(v: &'a serde_json::Value, needle: &str) -> Option<&'a str> {
    match v {
        serde_json::Value::String(s) if s.contains(needle) => Some(s),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_string(x, needle)),
        serde_json::Value::Object(o) => o.values().find_map(|x| find_string(x, needle)),
        _ => None,
    }
}

/// The GGUF the embedded backend is configured with, the file it serves (a re-encoded copy, with
/// `weights = "auto"` and a Q4_1 model), and its thread count for one sequence: what llama.cpp
/// itself is run on.
#[cfg(feature = "embedded")]
fn engine_files(a: &BenchArgs) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf, usize)> {
    let store = koubou_llama::ModelStore::from_env()?;
    let model: std::path::PathBuf = match std::env::var_os("KOUBOU_TEST_MODEL") {
        Some(p) => p.into(),
        None => store.default_path(),
    };
    let default = koubou_backend::EmbeddedConfig::default().weights;
    let weights = koubou_llama::Weights::parse(a.weights.as_deref().unwrap_or(&default)).context("--weights")?;
    let (served, _) = koubou_llama::transcode::resolve(&model, weights, Some(&store.copies_dir()), 2)?;
    Ok((model, served, a.threads.unwrap_or_else(koubou_llama::backend::default_threads)))
}

#[cfg(not(feature = "embedded"))]
fn engine_files(_: &BenchArgs) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf, usize)> {
    bail!("this koubou was built without the embedded engine")
}

/// Requests in flight at the slow fake backend: now, and the most at once.
#[derive(Default)]
struct InFlight {
    now: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

/// An OpenAI-compatible server that takes `delay` per request, as many at once as asked.
async fn slow_openai(delay: Duration, seen: Arc<InFlight>) -> anyhow::Result<SocketAddr> {
    use std::sync::atomic::Ordering::SeqCst;
    let chat = move || {
        let seen = seen.clone();
        async move {
            let n = seen.now.fetch_add(1, SeqCst) + 1;
            seen.peak.fetch_max(n, SeqCst);
            tokio::time::sleep(delay).await;
            seen.now.fetch_sub(1, SeqCst);
            ([("content-type", "text/event-stream")], FAKE_SSE)
        }
    };
    serve_fake(Router::new().route("/v1/chat/completions", post(chat))).await
}

/// `--pool`: a backlog against a fresh pool of one worker, timed from the first submission to
/// the last completion, beside the ideal `ceil(tasks / capacity) × per task`.
async fn pool(a: &BenchArgs) -> anyhow::Result<()> {
    let cap = a.pool_capacity.max(1);
    let per_task = Duration::from_millis(a.pool_task_ms);
    let seen = Arc::new(InFlight::default());
    let fake = slow_openai(per_task, seen.clone()).await?;
    let config = format!(
        "[pool]\nmin_workers = 1\nmax_workers = {cap}\n\
         [backends.slow]\nkind = \"openai\"\nbase_url = \"http://{fake}/v1\"\nmodel = \"fake\"\napi_key_env = \"\"\nconcurrency = {cap}\n\
         [types.general]\nbackend = \"slow\"\n"
    );
    let server = start_server(&config).await?;
    let http = reqwest::Client::new();
    let workers = |http: reqwest::Client, url: String| async move {
        let v: serde_json::Value = http.get(format!("{url}/workers/status")).send().await?.json().await?;
        anyhow::Ok(v["active"].as_u64().unwrap_or(0) as usize)
    };
    let before = workers(http.clone(), server.url.clone()).await?;
    // When the pool first has as many workers as the backend has slots.
    let started = Instant::now();
    let watch = {
        let (http, url) = (http.clone(), server.url.clone());
        tokio::spawn(async move {
            loop {
                if workers(http.clone(), url.clone()).await.is_ok_and(|n| n >= cap) {
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let (lat, wall) = drive(&server.url, "general", a.pool_tasks, a.pool_tasks).await?;
    let full = tokio::time::timeout(Duration::from_secs(1), watch).await.ok().and_then(Result::ok);
    let ideal = per_task * a.pool_tasks.div_ceil(cap) as u32;
    println!(
        "koubou bench --pool: {} tasks at once, backend capacity {cap}, {} ms per task, max_workers {cap}, {before} worker(s) at start, {} cores",
        a.pool_tasks,
        a.pool_task_ms,
        cores()
    );
    println!(
        "all done in {:.2} s; ideal {:.2} s; {:.3}x the ideal; the backend saw at most {} at once; {} workers after {}",
        wall.as_secs_f64(),
        ideal.as_secs_f64(),
        wall.as_secs_f64() / ideal.as_secs_f64(),
        seen.peak.load(std::sync::atomic::Ordering::SeqCst),
        cap,
        full.map_or("(never reached)".to_owned(), ms)
    );
    println!("submit-to-complete p50 {} p99 {}", ms(percentile(&lat, 0.5)), ms(percentile(&lat, 0.99)));
    Ok(())
}
