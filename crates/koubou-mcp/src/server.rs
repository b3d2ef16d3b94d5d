//! [`KoubouMcp`]: the MCP server handler over any [`Api`].

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use koubou_api::{Api, ApiError, ListQuery, SubmitRequest, TaskView, settings::McpConfig};
use koubou_task::{FieldError, TaskId};
use rmcp::{
    ErrorData as McpError, RoleServer, ServerHandler,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation, ListToolsResult,
        PaginatedRequestParams, ProgressNotificationParam, ProgressToken, ServerCapabilities, ServerConfig, Tool,
    },
    service::RequestContext,
};
use serde_json::{Value, json};

use crate::{context, tools, view};

/// The MCP server: six tools over an [`Api`]. Cheap to clone.
#[derive(Clone)]
pub struct KoubouMcp {
    api: Arc<dyn Api>,
    cfg: Arc<McpConfig>,
    tools: Arc<Vec<Tool>>,
    /// Where `files` may come from while `[mcp] allowed_paths` is empty.
    files_default: context::Unconfigured,
}

/// A failed call, as the tool result the caller sees.
enum Failure {
    Field(FieldError),
    Api(ApiError),
}

impl From<FieldError> for Failure {
    fn from(e: FieldError) -> Self {
        Failure::Field(e)
    }
}
impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Api(e)
    }
}

impl Failure {
    fn into_result(self) -> CallToolResult {
        let api = match self {
            Failure::Field(f) => ApiError::Invalid(f),
            Failure::Api(a) => a,
        };
        let hint = match &api {
            ApiError::NotFound(_) => " (list_tasks shows recent tasks)",
            ApiError::Unavailable(_) => " (is `koubou serve` running? system_status tells)",
            ApiError::TryLater { .. } => " (nothing was stored; delegate it again later)",
            _ => "",
        };
        let text = match &api {
            ApiError::Invalid(f) => format!("invalid argument {}: {}", f.field, f.message),
            e => format!("{}: {e}{hint}", e.code()),
        };
        let mut r = CallToolResult::error(vec![ContentBlock::text(text)]);
        r.structured_content = Some(koubou_http::error::body(&api));
        r
    }
}

type Outcome = Result<CallToolResult, Failure>;

impl KoubouMcp {
    pub fn new(api: Arc<dyn Api>, cfg: McpConfig) -> Self {
        let tools = Arc::new(tools::list(&cfg));
        KoubouMcp { api, cfg: Arc::new(cfg), tools, files_default: context::Unconfigured::WorkingDir }
    }

    /// For MCP over HTTP: with `[mcp] allowed_paths` empty no file is attached (any local user
    /// can reach the port); stdio keeps the working directory, the user's own.
    pub(crate) fn remote(mut self) -> Self {
        self.files_default = context::Unconfigured::Nothing;
        self
    }

    /// The tool definitions, as `tools/list` sends them.
    pub fn tools(&self) -> &[Tool] {
        &self.tools
    }

    fn max_wait(&self) -> u64 {
        self.cfg.max_wait_secs.max(1)
    }

    /// The task as a tool result, its answer shown from `offset`.
    fn task_view(&self, v: &TaskView, offset: usize) -> Value {
        view::task(v, self.max_wait(), view::Window { offset, max: self.cfg.max_result_chars.max(1) })
    }

    /// Runs one tool; every failure is a tool result with `isError`.
    pub async fn call(
        &self,
        name: &str,
        args: Option<&serde_json::Map<String, Value>>,
        ctx: Option<&RequestContext<RoleServer>>,
    ) -> CallToolResult {
        let out = match name {
            tools::DELEGATE_TASK => self.delegate(args, ctx).await,
            tools::GET_TASK => self.get(args).await,
            tools::WAIT_FOR_TASK => self.wait_for(args, ctx).await,
            tools::LIST_TASKS => self.list(args).await,
            tools::CANCEL_TASK => self.cancel(args).await,
            tools::SYSTEM_STATUS => self.status(args).await,
            other => {
                let known: Vec<&str> = self.tools.iter().map(|t| t.name.as_ref()).collect();
                Err(FieldError::new("name", format!("unknown tool {other:?}; tools: {}", known.join(", "))).into())
            }
        };
        out.unwrap_or_else(Failure::into_result)
    }

    async fn delegate(
        &self,
        args: Option<&serde_json::Map<String, Value>>,
        ctx: Option<&RequestContext<RoleServer>>,
    ) -> Outcome {
        let a = tools::Args::new(
            args,
            &["prompt", "type", "priority", "model", "backend", "tags", "json", "schema", "files", "wait_seconds"],
        )?;
        let prompt =
            a.opt_str("prompt")?.ok_or_else(|| FieldError::new("prompt", "is required (the task's instructions)"))?;
        if prompt.trim().is_empty() {
            return Err(FieldError::new("prompt", "is empty").into());
        }
        let wait = a.opt_int("wait_seconds", 0, self.max_wait())?.unwrap_or(0);
        let files = context::read(&self.cfg, self.files_default, &a.opt_str_list("files")?)?;
        let mut body = serde_json::Map::new();
        body.insert("prompt".into(), json!(context::compose(prompt, &files)));
        for k in ["type", "priority", "model", "backend", "tags", "json", "schema"] {
            if let Some(v) = a.raw(k) {
                body.insert(k.into(), v.clone());
            }
        }
        let mut meta = json!({"source": "mcp"});
        if !files.is_empty() {
            meta["files"] = json!(files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>());
        }
        body.insert("metadata".into(), meta);
        let req = SubmitRequest::from_json(&Value::Object(body))?;
        let resp = self.api.submit(req).await?;
        let v = if wait > 0 {
            self.wait_with_progress(resp.task_id, Duration::from_secs(wait), ctx).await?
        } else {
            self.api.task(resp.task_id).await?
        };
        let mut out = self.task_view(&v, 0);
        if !resp.created {
            out["note"] = json!("an identical earlier task was returned");
        }
        Ok(view::task_result(out))
    }

    async fn get(&self, args: Option<&serde_json::Map<String, Value>>) -> Outcome {
        let a = tools::Args::new(args, &["task_id", "offset"])?;
        let id = a.task_id()?;
        let offset = a.opt_int("offset", 0, u32::MAX as u64)?.unwrap_or(0) as usize;
        let v = self.api.task(id).await?;
        Ok(view::task_result(self.task_view(&v, offset)))
    }

    async fn wait_for(
        &self,
        args: Option<&serde_json::Map<String, Value>>,
        ctx: Option<&RequestContext<RoleServer>>,
    ) -> Outcome {
        let a = tools::Args::new(args, &["task_id", "timeout_seconds"])?;
        let id = a.task_id()?;
        let secs = a.opt_int("timeout_seconds", 1, self.max_wait())?.unwrap_or(self.max_wait());
        let v = self.wait_with_progress(id, Duration::from_secs(secs), ctx).await?;
        Ok(view::task_result(self.task_view(&v, 0)))
    }

    async fn list(&self, args: Option<&serde_json::Map<String, Value>>) -> Outcome {
        let a = tools::Args::new(args, &["status", "tag", "limit"])?;
        let q = ListQuery {
            status: a.opt_str("status")?.map(str::to_owned),
            tag: a.opt_str("tag")?.map(str::to_owned),
            limit: Some(a.opt_int("limit", 1, 100)?.unwrap_or(20) as usize),
            ..ListQuery::default()
        };
        Ok(view::list(&self.api.tasks(q).await?))
    }

    async fn cancel(&self, args: Option<&serde_json::Map<String, Value>>) -> Outcome {
        let id = tools::Args::new(args, &["task_id"])?.task_id()?;
        let v = self.api.cancel(id).await?;
        Ok(view::task_result(self.task_view(&v, 0)))
    }

    async fn status(&self, args: Option<&serde_json::Map<String, Value>>) -> Outcome {
        tools::Args::new(args, &[])?;
        let (h, w, s) = tokio::try_join!(self.api.health(), self.api.workers(), self.api.status())?;
        Ok(view::system(&h, &w, &s))
    }

    /// Waits up to `timeout` for task `id`, sending progress notifications when the caller gave a
    /// progress token: every `progress_every_secs`, and at most once a second while the answer
    /// streams. Stops early (the task runs on) when the request is cancelled.
    async fn wait_with_progress(
        &self,
        id: TaskId,
        timeout: Duration,
        ctx: Option<&RequestContext<RoleServer>>,
    ) -> Result<TaskView, ApiError> {
        let chars = AtomicU64::new(0);
        let tail = Mutex::new(String::new());
        let on_token = |t: &str| {
            chars.fetch_add(t.chars().count() as u64, Ordering::Relaxed);
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            tail.push_str(t);
            if tail.len() > 240 {
                let cut = tail.char_indices().map(|(i, _)| i).find(|&i| i >= tail.len() - 120).unwrap_or(0);
                tail.drain(..cut);
            }
        };
        let wait = self.api.wait(id, timeout, &on_token);
        let token = ctx.and_then(|c| c.meta.get_progress_token());
        let heartbeat = async {
            match (token, ctx) {
                (Some(token), Some(ctx)) => self.progress_loop(id, timeout, token, ctx, &chars, &tail).await,
                _ => std::future::pending().await,
            }
        };
        let cancelled = async {
            match ctx {
                Some(c) => c.ct.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            v = wait => v,
            _ = heartbeat => unreachable!("the progress loop never ends"),
            _ = cancelled => {
                tracing::debug!(task = %id, "wait cancelled by the client; the task runs on");
                self.api.task(id).await
            }
        }
    }

    async fn progress_loop(
        &self,
        id: TaskId,
        timeout: Duration,
        token: ProgressToken,
        ctx: &RequestContext<RoleServer>,
        chars: &AtomicU64,
        tail: &Mutex<String>,
    ) -> ! {
        let every = Duration::from_secs(self.cfg.progress_every_secs.max(1));
        let tick = every.min(Duration::from_secs(1));
        let start = Instant::now();
        let mut last_at = start;
        let mut last_chars = 0;
        let mut last_progress = 0.0;
        loop {
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            let n = chars.load(Ordering::Relaxed);
            if n == last_chars && now - last_at < every {
                continue;
            }
            let message = if n > 0 {
                let tail = tail.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let snippet: String = tail.chars().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
                format!("running: {n} chars so far …{}", snippet.replace('\n', " "))
            } else {
                match self.api.task(id).await {
                    Ok(v) => match (v.queue_position, v.estimated_start_secs) {
                        (Some(p), Some(e)) => format!("{}: {p} ahead, starts in ~{e} s", v.status.as_str()),
                        (Some(p), None) => format!("{}: {p} ahead", v.status.as_str()),
                        _ => format!("{}: no answer yet", v.status.as_str()),
                    },
                    Err(e) => format!("waiting ({e})"),
                }
            };
            // Progress must grow with every notification: seconds waited, out of the bound.
            let progress = ((now - start).as_secs_f64() * 10.0).round() / 10.0;
            let progress = if progress > last_progress { progress } else { last_progress + 0.1 };
            last_progress = progress;
            let p = ProgressNotificationParam::new(token.clone(), progress)
                .with_total(timeout.as_secs_f64())
                .with_message(message);
            if let Err(e) = ctx.peer.notify_progress(p).await {
                tracing::debug!(task = %id, "progress notification not sent: {e}");
            }
            last_at = now;
            last_chars = n;
        }
    }
}

impl ServerHandler for KoubouMcp {
    fn get_info(&self) -> ServerConfig {
        let mut info = Implementation::new("koubou", env!("CARGO_PKG_VERSION"));
        info.title = Some("Koubou".into());
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(info)
            .with_instructions(tools::INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.tools.to_vec()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        Ok(self.call(&request.name, request.arguments.as_ref(), Some(&context)).await.into())
    }
}
