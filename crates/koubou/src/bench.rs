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
//! `--embedded` measures the embedded model instead; `--pool` how fast the pool scales up: from
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
    /// With --embedded: a python with llama-cpp-python, to run llama.cpp itself on the same GGUF,
    /// prompt and thread count in the same run (scripts/ensure-llama-cpp-python.sh prints one).
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
    let home = tempfile::tempdir()?;
    let port = free_port()?;
    let config = format!("[server]\nport = {port}\nws_port = 0\ngraphql_port = 0\n{config}");
    std::fs::write(home.path().join("koubou.toml"), config)?;
    let exe = std::env::current_exe()?;
    let child = std::process::Command::new(exe)
        .args(["serve", "--home"])
        .arg(home.path())
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
    let fake = fake_openai().await?;
    let server = start_server(&http_bench_config(&a, fake)).await?;
    println!(
        "koubou bench: server pid {}, SQLite durability {}, {} workers, {} cores",
        server.child.id(),
        a.durability,
        a.workers,
        std::thread::available_parallelism().map_or(0, |n| n.get())
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

/// One task's timings, from its SSE stream.
struct Run {
    first_token: Duration,
    gen_secs: f64,
    tokens: u64,
    prompt_tokens: u64,
    /// When each `task_token` event arrived.
    stamps: Vec<Instant>,
}

async fn one_embedded_task(http: &reqwest::Client, url: &str, tokens: u32) -> anyhow::Result<(Instant, Instant, Run)> {
    let body = serde_json::json!({"prompt": EMBEDDED_PROMPT, "system": EMBEDDED_SYSTEM,
        "options": {"temperature": 0, "max_tokens": tokens}});
    let t0 = Instant::now();
    let v: serde_json::Value = http.post(format!("{url}/task/delegate")).json(&body).send().await?.json().await?;
    let id = v["task_id"].as_str().context("no task_id")?.to_owned();
    let mut stream = http.get(format!("{url}/task/{id}/events")).send().await?.bytes_stream();
    let (mut first, mut last) = (None, t0);
    let mut stamps = Vec::new();
    let mut buf = String::new();
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        let now = Instant::now();
        while let Some(end) = buf.find("\n\n") {
            let ev: String = buf.drain(..end + 2).collect();
            if ev.contains("event: task_token") {
                first.get_or_insert(now);
                last = now;
                stamps.push(now);
            }
        }
    }
    let t: serde_json::Value = http.get(format!("{url}/task/{id}/status")).send().await?.json().await?;
    if t["status"] != "completed" {
        bail!("embedded task did not complete: {t}");
    }
    let first = first.context("no token streamed")?;
    let tokens = t["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    let run = Run {
        first_token: first - t0,
        gen_secs: (last - first).as_secs_f64(),
        tokens,
        prompt_tokens: t["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        stamps,
    };
    Ok((first, last, run))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One condition (idle, or with a competing load): prints its figures, returns one task's
/// generation tokens/s.
async fn embedded_round(a: &BenchArgs, http: &reqwest::Client, url: &str, label: &str) -> anyhow::Result<f64> {
    const TOKENS: u32 = 128;
    let mut rates = Vec::new();
    let mut first = Vec::new();
    let mut runs = Vec::new();
    for _ in 0..a.runs.max(1) {
        let (_, _, r) = one_embedded_task(http, url, TOKENS).await?;
        rates.push((r.tokens.saturating_sub(1)) as f64 / r.gen_secs.max(1e-9));
        first.push(r.first_token.as_secs_f64());
        runs.push(r);
    }
    let gen1 = median(rates);
    let first1 = median(first);
    let r = &runs[0];
    println!(
        "[{label}] 1 task through koubou (queue → worker → engine → SSE): {} prompt tokens, {} generated; \
         generation {gen1:.1} tok/s, first token {:.0} ms (includes prompt processing ≈ {:.0} prompt tok/s); median of {}",
        r.prompt_tokens,
        r.tokens,
        first1 * 1e3,
        r.prompt_tokens as f64 / first1,
        a.runs.max(1)
    );
    let mut agg = Vec::new();
    for _ in 0..a.runs.max(1) {
        let all = futures::future::try_join_all((0..4).map(|_| one_embedded_task(http, url, TOKENS))).await?;
        // Generation only, as for one task (whose rate runs from its first token to its last):
        // from the moment all four are generating (the last first token; before it, prompts are
        // still being processed) to the last token, counting the tokens streamed in between.
        let start = all.iter().map(|(f, _, _)| *f).max().context("no runs")?;
        let end = all.iter().map(|(_, l, _)| *l).max().context("no runs")?;
        let tokens = all.iter().flat_map(|(_, _, r)| &r.stamps).filter(|&&t| t > start).count();
        agg.push(tokens as f64 / (end - start).as_secs_f64().max(1e-9));
    }
    let agg = median(agg);
    println!(
        "[{label}] 4 tasks at once: aggregate generation {agg:.1} tok/s ({:.2}x one task), from when all four \
         generate to the last token; median of {}",
        agg / gen1,
        a.runs.max(1)
    );
    Ok(gen1)
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
    let server = start_server(&config).await?;
    let http = reqwest::Client::new();
    one_embedded_task(&http, &server.url, 16).await?; // load the model, warm caches
    // Backend health is re-checked every 15 s; wait for the one that describes the loaded model.
    for _ in 0..40 {
        let health: serde_json::Value = http.get(format!("{}/health", server.url)).send().await?.json().await?;
        if let Some(detail) = find_string(&health, "embedded llama.cpp").filter(|d| d.contains(" loaded ")) {
            println!("{detail}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let idle = embedded_round(a, &http, &server.url, "idle").await?;
    let loaded = if a.with_load {
        let _load = CpuLoad::start()?;
        Some(embedded_round(a, &http, &server.url, "one core busy").await?)
    } else {
        None
    };
    match peak_rss_kb(server.child.id()) {
        Some(kb) => println!("server peak RSS: {:.1} MiB", kb as f64 / 1024.0),
        None => println!("server peak RSS: unknown"),
    }
    drop(server);
    if let Some(py) = &a.compare {
        let (original, served, t) = engine_files(a)?;
        let mut files = vec![("the same GGUF", original.clone())];
        if served != original {
            files.push(("the copy koubou serves", served));
        }
        for (what, model) in files {
            for (label, koubou, load) in [("idle", Some(idle), false), ("one core busy", loaded, true)] {
                let Some(k) = koubou else { continue };
                let g = llama_cpp_python(py, &model, t, a.runs.max(1), load).await?;
                println!(
                    "[{label}] llama.cpp itself (llama-cpp-python, {t} thread(s), {what}: {}, same prompt): generation {g:.1} tok/s; koubou / llama.cpp: {:.0}%",
                    model.file_name().map(|f| f.to_string_lossy()).unwrap_or_default(),
                    k / g * 100.0
                );
            }
        }
    }
    Ok(())
}

/// Runs scripts/bench-llama-cpp-python.py; returns its generation tokens/s.
async fn llama_cpp_python(
    py: &str,
    model: &std::path::Path,
    threads: usize,
    runs: usize,
    load: bool,
) -> anyhow::Result<f64> {
    const TOKENS: u32 = 128;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench-llama-cpp-python.py");
    let mut cmd = tokio::process::Command::new(py);
    cmd.arg(&script).arg("--model").arg(model).args([
        "--threads",
        &threads.to_string(),
        "--tokens",
        &TOKENS.to_string(),
        "--runs",
        &runs.to_string(),
    ]);
    if load {
        cmd.arg("--load");
    }
    let out = cmd.output().await.context("running llama-cpp-python")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("llama-cpp-python failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
    }
    text.split("gen ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .with_context(|| format!("no generation figure in {text:?}"))
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
/// `weights = "auto"` and a Q4_1 model), and its single-sequence thread count: what llama.cpp
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
        std::thread::available_parallelism().map_or(0, |n| n.get())
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
