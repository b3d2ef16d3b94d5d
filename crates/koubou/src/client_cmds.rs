//! Client commands: `submit`, `status`, `tasks`, `cancel`, `workers`, `health`, and `run`
//! (which is `submit --wait` against an in-process system).

use std::{io::Read, io::Write, time::Duration};

use anyhow::Context;
use clap::Args;
use koubou_api::{Api, ApiError, ListQuery, SubmitRequest, TaskView};
use koubou_system::{Koubou, StartOptions};
use koubou_task::{GenOptions, NewTask, Priority, TaskId, TaskKind, TaskStatus};

use crate::{Ctx, logging, output};

/// How a waited-for task ended, as an error carrying its exit code.
#[derive(Debug)]
pub enum Outcome {
    Failed(String),
    Cancelled,
    StillRunning(TaskId),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Failed(e) => write!(f, "task failed: {e}"),
            Outcome::Cancelled => f.write_str("task was cancelled"),
            Outcome::StillRunning(id) => write!(f, "task {id} is still running; check later with `koubou status {id}`"),
        }
    }
}

impl std::error::Error for Outcome {}

impl Outcome {
    pub fn code(&self) -> u8 {
        match self {
            Outcome::Failed(_) | Outcome::Cancelled => 1,
            Outcome::StillRunning(_) => 6,
        }
    }
}

#[derive(Args)]
pub struct SubmitArgs {
    /// The prompt; read from stdin when absent or "-".
    prompt: Option<String>,
    /// Task type (general, code, or a configured custom type).
    #[arg(long = "type", short = 't', default_value = "general")]
    kind: String,
    /// 1 (lowest) to 10 (highest).
    #[arg(long, short = 'p', default_value_t = 5)]
    priority: i64,
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    backend: Option<String>,
    #[arg(long)]
    max_tokens: Option<u32>,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    idempotency_key: Option<String>,
    /// A tag (repeatable). `confidential` keeps the task on local backends.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// The answer must be JSON (checked; a bad answer fails the attempt and is retried).
    #[arg(long)]
    json_answer: bool,
    /// The answer must match this JSON Schema: a file, or the schema itself as JSON.
    #[arg(long)]
    schema: Option<String>,
    /// Wait for the answer, streaming it as it is generated.
    #[arg(long, short = 'w')]
    wait: bool,
    /// With --wait: give up waiting after this many seconds (the task keeps running).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

impl SubmitArgs {
    fn request(&self) -> anyhow::Result<SubmitRequest> {
        let prompt = match self.prompt.as_deref() {
            Some(p) if p != "-" => p.to_owned(),
            _ => {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).context("reading the prompt from stdin")?;
                s
            }
        };
        let kind = TaskKind::parse(&self.kind).map_err(|m| ApiError::invalid("type", m))?;
        let mut task = NewTask::new(kind, prompt);
        task.priority = Priority::new(self.priority).map_err(|m| ApiError::invalid("priority", m))?;
        task.system = self.system.clone();
        task.model = self.model.clone();
        task.backend = self.backend.clone();
        task.idempotency_key = self.idempotency_key.clone();
        task.tags = koubou_api::tags(&serde_json::json!(self.tags))?;
        task.json = self.json_answer;
        if let Some(s) = &self.schema {
            let text = if s.trim_start().starts_with('{') {
                s.clone()
            } else {
                std::fs::read_to_string(s).with_context(|| format!("reading the schema file {s}"))?
            };
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ApiError::invalid("schema", format!("is not JSON: {e}")))?;
            task.schema = Some(v);
        }
        task.options = GenOptions {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            seed: self.seed,
            ..Default::default()
        };
        Ok(SubmitRequest::new(task))
    }
}

pub async fn submit(ctx: &Ctx, args: SubmitArgs) -> anyhow::Result<()> {
    logging::init_quiet();
    let api = ctx.client()?;
    submit_with(&api, ctx.json, &args).await
}

/// Submits, and with `--wait` streams the answer to stdout (spinner on stderr until it starts).
async fn submit_with(api: &dyn Api, json: bool, args: &SubmitArgs) -> anyhow::Result<()> {
    let r = api.submit(args.request()?).await?;
    if !args.wait {
        if json {
            return output::json(&r);
        }
        println!("{}", r.task_id);
        return Ok(());
    }
    let spinner = (!json).then(|| {
        let s = indicatif::ProgressBar::new_spinner().with_message(format!("task {} queued…", r.task_id));
        s.enable_steady_tick(Duration::from_millis(100));
        s
    });
    let started = std::sync::atomic::AtomicBool::new(false);
    let on_token = |t: &str| {
        if json {
            return;
        }
        if !started.swap(true, std::sync::atomic::Ordering::Relaxed)
            && let Some(s) = &spinner
        {
            s.finish_and_clear();
        }
        print!("{t}");
        let _ = std::io::stdout().flush();
    };
    let v = api.wait(r.task_id, Duration::from_secs(args.timeout), &on_token).await?;
    if let Some(s) = &spinner {
        s.finish_and_clear();
    }
    finish(json, &v, started.load(std::sync::atomic::Ordering::Relaxed))
}

/// Prints the end of a waited-for task and turns its status into the exit code.
fn finish(json: bool, v: &TaskView, streamed: bool) -> anyhow::Result<()> {
    if json {
        output::json(v)?;
    } else {
        match (v.status, streamed) {
            (TaskStatus::Completed, false) => println!("{}", v.answer().unwrap_or("")),
            (TaskStatus::Completed, true) => println!(),
            _ => {}
        }
    }
    match v.status {
        TaskStatus::Completed => Ok(()),
        TaskStatus::Failed => Err(Outcome::Failed(v.error.clone().unwrap_or_default()).into()),
        TaskStatus::Cancelled => Err(Outcome::Cancelled.into()),
        _ => Err(Outcome::StillRunning(v.task_id).into()),
    }
}

fn parse_id(id: &str) -> anyhow::Result<TaskId> {
    id.parse().map_err(|e: koubou_task::id::BadTaskId| ApiError::invalid("task_id", e.to_string()).into())
}

fn print_task(v: &TaskView) {
    let mut rows = vec![
        ("task_id", v.task_id.to_string()),
        ("status", v.status.to_string()),
        ("type", v.kind.to_string()),
        ("priority", v.priority.to_string()),
        ("attempts", format!("{}/{}", v.attempts, v.max_attempts)),
        ("created", v.created_at.clone()),
    ];
    let mut opt = |k: &'static str, val: Option<String>| {
        if let Some(val) = val {
            rows.push((k, val));
        }
    };
    opt("queue position", v.queue_position.map(|p| p.to_string()));
    opt("starts in ~", v.estimated_start_secs.map(|s| format!("{s} s")));
    let place = match v.remote {
        Some(true) => " (remote)",
        Some(false) => " (local)",
        None => "",
    };
    opt("backend", v.backend.clone().map(|b| format!("{b} / {}{place}", v.model.clone().unwrap_or_default())));
    opt("tags", (!v.tags.is_empty()).then(|| v.tags.join(", ")));
    opt("worker", v.worker_id.clone());
    opt("finished", v.finished_at.clone());
    opt("tokens", v.usage.map(|u| format!("{} prompt + {} completion", u.prompt_tokens, u.completion_tokens)));
    opt("cost", v.cost.map(|c| format!("{c:.6}")));
    opt("error", v.error.clone());
    for (k, val) in rows {
        println!("{k:>15}  {val}");
    }
    if let Some(text) = v.answer().or(v.partial.as_deref()) {
        println!("\n{text}");
    }
}

pub async fn status(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    logging::init_quiet();
    let v = ctx.client()?.task(parse_id(id)?).await?;
    if ctx.json {
        output::json(&v)
    } else {
        print_task(&v);
        Ok(())
    }
}

#[derive(Args)]
pub struct TasksArgs {
    /// Statuses, comma-separated (pending, running, retrying, completed, failed, cancelled, active).
    #[arg(long)]
    status: Option<String>,
    #[arg(long = "type")]
    kind: Option<String>,
    /// Only tasks whose prompt contains this.
    #[arg(long)]
    search: Option<String>,
    /// Only tasks with this tag.
    #[arg(long)]
    tag: Option<String>,
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Cursor printed at the end of the previous page.
    #[arg(long)]
    before: Option<String>,
}

pub async fn tasks(ctx: &Ctx, a: TasksArgs) -> anyhow::Result<()> {
    logging::init_quiet();
    let q = ListQuery {
        status: a.status,
        kind: a.kind,
        tag: a.tag,
        q: a.search,
        limit: Some(a.limit),
        before: a.before.map(Into::into),
    };
    let page = ctx.client()?.tasks(q).await?;
    if ctx.json {
        return output::json(&page);
    }
    let rows: Vec<Vec<String>> = page
        .tasks
        .iter()
        .map(|t| {
            vec![
                t.task_id.to_string(),
                t.status.to_string(),
                t.kind.to_string(),
                t.priority.to_string(),
                t.created_at.chars().take(19).collect(),
                output::short(&t.prompt, 40),
            ]
        })
        .collect();
    output::table(&["TASK", "STATUS", "TYPE", "PRIO", "CREATED", "PROMPT"], &rows);
    match page.next_cursor {
        Some(c) => println!("({} of {}; next page: --before {c})", page.tasks.len(), page.total),
        None => println!("({} of {})", page.tasks.len(), page.total),
    }
    Ok(())
}

pub async fn cancel(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    logging::init_quiet();
    let v = ctx.client()?.cancel(parse_id(id)?).await?;
    if ctx.json {
        output::json(&v)
    } else {
        println!("{} {}", v.task_id, v.status);
        Ok(())
    }
}

/// A node's backends as `name (model model)`, comma-separated; `-` for none.
fn backends(list: &[koubou_api::NodeBackendView]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    let one = |b: &koubou_api::NodeBackendView| format!("{} ({})", b.name, b.models.join(" "));
    list.iter().map(one).collect::<Vec<_>>().join(", ")
}

pub async fn nodes(ctx: &Ctx) -> anyhow::Result<()> {
    logging::init_quiet();
    let v = ctx.client()?.nodes().await?;
    if ctx.json {
        return output::json(&v);
    }
    let list = |l: &Option<Vec<String>>| l.as_ref().map_or_else(|| "any".to_owned(), |l| l.join(" "));
    let rows: Vec<Vec<String>> = v
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                format!("{}:{}", n.host, n.pid),
                list(&n.kinds),
                list(&n.tags),
                backends(&n.backends),
                format!("{}/{}", n.busy, n.max_workers),
                n.version.clone(),
                if n.lost { "lost".into() } else { "alive".into() },
                n.last_seen.clone(),
            ]
        })
        .collect();
    let head = ["NODE", "HOST:PID", "KINDS", "TAGS", "BACKENDS (MODELS)", "BUSY/MAX", "VERSION", "STATE", "LAST SEEN"];
    output::table(&head, &rows);
    Ok(())
}

pub async fn workers(ctx: &Ctx) -> anyhow::Result<()> {
    logging::init_quiet();
    let w = ctx.client()?.workers().await?;
    if ctx.json {
        return output::json(&w);
    }
    let rows: Vec<Vec<String>> = w
        .workers
        .iter()
        .map(|x| {
            vec![
                x.worker_id.clone(),
                x.state.clone(),
                x.current_task.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                x.tasks_done.to_string(),
                x.tasks_failed.to_string(),
            ]
        })
        .collect();
    output::table(&["WORKER", "STATE", "TASK", "DONE", "FAILED"], &rows);
    println!(
        "({} workers, {} busy; scales {}..{}, backend capacity {})",
        w.active, w.busy, w.min_workers, w.max_workers, w.backend_capacity
    );
    for warning in &w.warnings {
        println!("note: {warning}");
    }
    Ok(())
}

pub async fn health(ctx: &Ctx) -> anyhow::Result<()> {
    logging::init_quiet();
    let h = ctx.client()?.health().await?;
    if ctx.json {
        return output::json(&h);
    }
    println!("status: {}   version: {}   workers: {}", h.status, h.version, h.workers);
    let q = h.queue;
    println!(
        "queue: {} pending, {} running, {} retrying, {} completed, {} failed, {} cancelled",
        q.pending, q.running, q.retrying, q.completed, q.failed, q.cancelled
    );
    let rows: Vec<Vec<String>> = h
        .backends
        .iter()
        .map(|b| {
            vec![
                b.name.clone(),
                b.kind.clone(),
                if b.remote { "remote".into() } else { "local".into() },
                if b.up { "up".into() } else { "DOWN".into() },
                b.default_model.clone(),
                b.serves.join(","),
                output::short(&b.detail, 60),
            ]
        })
        .collect();
    output::table(&["BACKEND", "KIND", "WHERE", "STATE", "MODEL", "SERVES", "DETAIL"], &rows);
    // The table cuts details short; a backend that is down says in full why.
    for b in h.backends.iter().filter(|b| !b.up) {
        println!("  {} is down: {}", b.name, b.detail);
    }
    for (kind, route) in &h.routes {
        println!("  type {kind:<12} → {route}");
    }
    if let Some(s) = &h.spared {
        println!(
            "local backends spared ≈ {:.4} at {} prices ({} prompt + {} completion tokens since start)",
            s.cost,
            s.reference.as_deref().unwrap_or("[pricing]"),
            s.prompt_tokens,
            s.completion_tokens
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    submit: SubmitArgs,
    #[command(flatten)]
    queue: crate::QueueArgs,
}

/// Starts an in-process system (no ports), submits, streams the answer, shuts down.
pub async fn run(ctx: &Ctx, mut a: RunArgs) -> anyhow::Result<()> {
    logging::init_quiet();
    if let Some(w) = ctx.prepare_home()? {
        tracing::warn!("{w}");
    }
    crate::supervise_children(None)?;
    let mut cfg = ctx.config()?;
    a.queue.apply(&mut cfg)?;
    crate::models::prepare(&cfg).await?;
    let k = Koubou::start(
        cfg,
        &ctx.home,
        StartOptions { node: format!("run-{}", std::process::id()), workers: true, ..StartOptions::default() },
    )
    .await?;
    a.submit.wait = true;
    let r = submit_with(&k, ctx.json, &a.submit).await;
    k.shutdown(Some(Duration::from_secs(2))).await;
    r
}
