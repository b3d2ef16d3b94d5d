//! `koubou`: the one binary. Subcommands wire the crates together; no logic of their own lives
//! here beyond argument parsing, output formatting and exit codes.
//!
//! Exit codes (stable, for scripts): 0 success; 1 the task failed or was cancelled; 2 bad
//! usage; 3 not found; 4 server unreachable or unavailable; 5 request rejected (invalid
//! field); 6 still running when `--wait` gave up; 7 conflict (e.g. cancelling a finished task);
//! 10 internal error.

mod bench;
mod client_cmds;
mod logfiles;
mod logging;
mod models;
mod output;
mod serve;
mod version;
mod worker;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use koubou_api::ApiError;
use koubou_system::{
    Config, Home,
    queue::{QueueUrl, Store},
};

#[derive(Parser)]
#[command(name = "koubou", version, about = "工房 Koubou: delegate work from a coding agent to local LLM craftsmen")]
struct Cli {
    /// Koubou's home: database, logs and koubou.toml.
    #[arg(long, global = true, env = "KOUBOU_HOME", default_value = ".koubou")]
    home: PathBuf,
    /// Config file (default: <home>/koubou.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// URL of a running server, for client commands (default: from the config).
    #[arg(long, global = true, env = "KOUBOU_URL")]
    url: Option<String>,
    /// Bearer token for a server that requires one.
    #[arg(long, global = true, env = "KOUBOU_AUTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a documented koubou.toml into the home directory.
    Init {
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Run the system: queue, worker pool, REST (8765), WebSocket (8766), GraphQL (8767), MCP at /mcp.
    Serve(ServeArgs),
    /// Submit a task (prompt as an argument, or on stdin).
    Submit(client_cmds::SubmitArgs),
    /// Show one task.
    Status { id: String },
    /// List tasks, newest first.
    Tasks(client_cmds::TasksArgs),
    /// Cancel a pending or running task.
    Cancel { id: String },
    /// Show the worker pool.
    Workers,
    /// List the nodes registered with the queue (controllers and worker nodes).
    Nodes,
    /// Show queue, workers and each backend's health.
    Health,
    /// Serve MCP over stdio (for `claude mcp add koubou -- koubou mcp`).
    Mcp {
        /// Run an in-process system instead of talking to a running `koubou serve`.
        #[arg(long)]
        embedded: bool,
        #[command(flatten)]
        queue: QueueArgs,
    },
    /// Run a worker node: only the worker pool (no HTTP), over a queue shared with controllers.
    Worker(worker::WorkerArgs),
    /// Manage models: the embedded GGUF files, or Ollama's.
    Models {
        #[command(subcommand)]
        cmd: models::ModelsCmd,
    },
    /// Answer one prompt end to end with an in-process system (queue, worker, backend), then exit.
    Run(client_cmds::RunArgs),
    /// Measure throughput and latency through the HTTP API against an instant backend.
    Bench(bench::BenchArgs),
    /// Print a shell completion script (e.g. `koubou completions bash > ~/.local/share/bash-completion/completions/koubou`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Clone)]
pub struct ServeArgs {
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    /// WebSocket port (0 = off, `any` = a free port, announced on stderr).
    #[arg(long)]
    ws_port: Option<serve::PortFlag>,
    /// GraphQL port (0 = off, `any` = a free port, announced on stderr).
    #[arg(long)]
    graphql_port: Option<serve::PortFlag>,
    #[arg(long)]
    min_workers: Option<usize>,
    #[arg(long)]
    max_workers: Option<usize>,
    /// Local workers at most (`--workers 0`: a controller with none; worker nodes run the tasks).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// This node's name in the queue's registry; its workers are `<node-id>/<n>`.
    #[arg(long, value_name = "ID", default_value = "serve", value_parser = worker::node_id)]
    node_id: String,
    #[command(flatten)]
    queue: QueueArgs,
}

/// Which queue: `--queue URL`, or the guide's `--queue-type`; with RabbitMQ, `--store`.
#[derive(Args, Clone, Default)]
pub struct QueueArgs {
    /// The queue: sqlite:[PATH], a path, redis://host:port/db, rediss://…, or amqp://… /
    /// amqps://… (RabbitMQ hands out the tasks of --store) (default: queue.url, else SQLite in
    /// the home). Read here rather than by clap, whose errors repeat the value whole (a password
    /// in the URL included).
    #[arg(long, value_name = "URL")]
    queue: Option<String>,
    /// The guide's spelling: `redis` (redis://127.0.0.1:6379/0), `rabbitmq` (KOUBOU_AMQP_URL, else
    /// amqp://127.0.0.1:5672/%2f) or `sqlite`.
    #[arg(long, value_name = "TYPE", conflicts_with = "queue", value_parser = QueueUrl::of_type)]
    queue_type: Option<QueueUrl>,
    /// With RabbitMQ: where the tasks are kept, sqlite:[PATH], a path or redis://host:port/db
    /// (default: queue.store, else SQLite in the home; worker nodes need Redis).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
}

impl QueueArgs {
    /// Puts the queue the flags name into `cfg` (`[queue] url` and `store`); a bad URL is an
    /// error naming the flag, without its password.
    pub fn apply(&self, cfg: &mut Config) -> anyhow::Result<()> {
        let chosen = match (&self.queue, &self.queue_type) {
            (Some(u), _) => Some(QueueUrl::parse(u).map_err(|e| anyhow::anyhow!("--queue: {e}"))?),
            (None, t) => t.clone(),
        };
        if let Some(q) = chosen {
            cfg.queue.select(&q);
        }
        if let Some(s) = &self.store {
            Store::parse(s).map_err(|e| anyhow::anyhow!("--store: {e}"))?;
            cfg.queue.store = Some(s.clone());
            // (A queue URL that does not read is reported as such by the config's check.)
            let url = cfg.queue.url.as_deref().map(QueueUrl::parse);
            if !matches!(url, Some(Ok(QueueUrl::Amqp(_)) | Err(_))) {
                anyhow::bail!(
                    "--store: only with a RabbitMQ queue (--queue amqp://…, --queue-type rabbitmq or queue.url); \
                     any other queue URL names its store itself"
                );
            }
        }
        Ok(())
    }

    /// Whether `--queue`, `--queue-type` or `--store` was given.
    pub fn given(&self) -> bool {
        self.queue.is_some() || self.queue_type.is_some() || self.store.is_some()
    }
}

/// Everything a command needs to know about where it runs.
pub struct Ctx {
    pub home: Home,
    pub config_path: PathBuf,
    pub url: Option<String>,
    pub token: Option<String>,
    pub json: bool,
}

impl Ctx {
    pub fn config(&self) -> anyhow::Result<Config> {
        Ok(Config::load(&self.config_path)?)
    }

    /// Creates the home readable by this user only (`Home::prepare`); the answer is a warning to
    /// log when an existing home is open to other users.
    pub fn prepare_home(&self) -> anyhow::Result<Option<String>> {
        use anyhow::Context;
        self.home.prepare().with_context(|| format!("creating {}", self.home.dir.display()))
    }

    /// A client for the running server.
    pub fn client(&self) -> anyhow::Result<koubou_client::Client> {
        let cfg = self.config()?;
        let url = self.url.clone().unwrap_or_else(|| cfg.server.client_url());
        Ok(koubou_client::Client::new(&url, self.token.clone().or(cfg.server.auth_token)))
    }
}

/// Maps an error to the documented exit code.
fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ApiError>() {
        Some(ApiError::Invalid(_)) => 5,
        Some(ApiError::NotFound(_)) => 3,
        Some(ApiError::Conflict(_)) => 7,
        Some(ApiError::Unavailable(_) | ApiError::TryLater { .. }) => 4,
        Some(ApiError::Internal(_)) => 10,
        None => match e.downcast_ref::<client_cmds::Outcome>() {
            Some(o) => o.code(),
            None => 10,
        },
    }
}

/// Parses the command line. `--version` also names the features and the CPU instructions of the
/// embedded engine, which means asking ggml: done only when that is what was asked.
fn parse_cli() -> Cli {
    let mut cmd = Cli::command();
    if std::env::args_os().skip(1).any(|a| a == "--version") {
        cmd = cmd.long_version(version::long());
    }
    let matches = cmd.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Makes every child program a task starts (codex, exec) run under a supervisor — this binary
/// again, see [`koubou_backend::supervise`] — so none outlives this process. `hold` is kept open
/// by every supervisor (the home lock of `koubou serve`).
pub fn supervise_children(hold: Option<std::os::fd::RawFd>) -> anyhow::Result<()> {
    use anyhow::Context;
    koubou_backend::supervise::supervise_children("/proc/self/exe".into(), hold)
        .context("setting up the supervision of child processes")
}

/// Before anything else runs (llama.cpp's C++ static constructors included, which a build for
/// another CPU may already have compiled with instructions this one lacks): a build made with
/// `target-cpu=native` on another machine says so and exits instead of dying with SIGILL.
#[cfg(all(feature = "embedded", target_os = "linux", target_arch = "x86_64"))]
#[used]
#[unsafe(link_section = ".init_array.00200")]
static CHECK_CPU: extern "C" fn() = {
    extern "C" fn check_cpu() {
        if let Err(e) = koubou_llama::cpu::check() {
            eprintln!("koubou: {e}");
            std::process::exit(10);
        }
    }
    check_cpu
};

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == koubou_backend::supervise::SUPERVISE_ARG) {
        koubou_backend::supervise::main(args.collect());
    }
    let cli = parse_cli();
    if let Cmd::Completions { shell } = cli.cmd {
        clap_complete::generate(shell, &mut Cli::command(), "koubou", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    // Model files are trial-loaded in a child (this binary again) before they are trusted.
    models::install_trial_loader();
    let ctx = Ctx {
        config_path: cli.config.clone().unwrap_or_else(|| cli.home.join("koubou.toml")),
        home: Home { dir: cli.home.clone() },
        url: cli.url.clone(),
        token: cli.token.clone(),
        json: cli.json,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("koubou: cannot start the runtime: {e}");
            return ExitCode::from(10);
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Init { force } => serve::init(&ctx, force),
            Cmd::Serve(args) => serve::serve(&ctx, args).await,
            Cmd::Submit(args) => client_cmds::submit(&ctx, args).await,
            Cmd::Status { id } => client_cmds::status(&ctx, &id).await,
            Cmd::Tasks(args) => client_cmds::tasks(&ctx, args).await,
            Cmd::Cancel { id } => client_cmds::cancel(&ctx, &id).await,
            Cmd::Workers => client_cmds::workers(&ctx).await,
            Cmd::Nodes => client_cmds::nodes(&ctx).await,
            Cmd::Health => client_cmds::health(&ctx).await,
            Cmd::Mcp { embedded, queue } => serve::mcp(&ctx, embedded, &queue).await,
            Cmd::Worker(args) => worker::run(&ctx, args).await,
            Cmd::Models { cmd } => models::run(&ctx, cmd).await,
            Cmd::Run(args) => client_cmds::run(&ctx, args).await,
            Cmd::Bench(args) => bench::run(&ctx, args).await,
            Cmd::Completions { .. } => unreachable!("answered before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            if code != 1 && code != 6 {
                eprintln!("koubou: {e:#}");
            }
            ExitCode::from(code)
        }
    }
}
