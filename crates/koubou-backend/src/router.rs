//! Picks backend, model, system prompt, options and timeout for a task, and runs it there: down
//! the type's fallback chain while a backend cannot serve (a backend cooling down after a rate
//! limit is skipped while a later one is not), on local backends only when the task is
//! confidential, checking structured answers, and counting tokens and cost per backend. Every
//! run is bounded in time (the route's timeout) and in size (`max_result_bytes`): past either,
//! the backend is cancelled — a child process is killed with its group — and awaited.
//!
//! The local-only guarantee lives here, in three places: [`Router::with_profiles`] refuses a
//! configuration that routes a type (or its fallback) to a remote backend without the type's
//! `allow_remote`; [`Router::check`] refuses, at submission, a task that pins a backend it may
//! not reach; [`Router::plan`] leaves every remote backend out of a confidential task's chain.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use koubou_task::{GenOptions, MeterReading, NewTask, Spared, Task, Usage};
use parking_lot::Mutex;

use crate::cooldown::Cooldowns;
use crate::{
    Backend, BackendError, CancellationToken, GenerateRequest, Generation, Prices, PricingConfig, ResponseFormat,
    TokenSink, TypeRoute,
    format::{self, Checker},
};

/// Why a configuration or a task cannot be routed. At submission these are the submitter's
/// fault (answered with a 400 naming [`RouteError::field`]); at start they refuse the config.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("unknown task type {kind:?}; configured types: {known}")]
    UnknownKind { kind: String, known: String },
    #[error("unknown backend {backend:?}; configured backends: {known}")]
    UnknownBackend { backend: String, known: String },
    /// Config: a type routes to a remote backend without `allow_remote`.
    #[error(
        "[types.{kind}] routes to backend {backend:?}, which is remote (prompts sent there leave this machine): \
         set allow_remote = true in [types.{kind}] to allow it, or remote = false in [backends.{backend}] if it \
         runs on this machine"
    )]
    RemoteRoute { kind: String, backend: String },
    /// Config: a confidential type with no local backend at all.
    #[error(
        "[types.{kind}] is confidential but every backend of its chain ({chain}) is remote: route it to a local \
         backend"
    )]
    NoLocalRoute { kind: String, chain: String },
    /// A task pins a backend it may not reach.
    #[error("backend {backend:?} is remote and {why}; leave `backend` unset or name a local backend")]
    RemotePinned { backend: String, why: String },
    /// A confidential task whose type has no local backend.
    #[error(
        "the task is confidential ({why}) but type {kind:?} has no local backend in its chain ({chain}): it may \
         not leave this machine, and nothing here can run it"
    )]
    NoLocalBackend { kind: String, chain: String, why: String, tagged: bool },
    #[error("{0}")]
    BadSchema(String),
    /// Config: a type's `schema`, or prices, cannot be used.
    #[error("{0}")]
    Config(String),
}

impl RouteError {
    /// True when the task itself is at fault (its schema cannot be used), so no router
    /// anywhere could run it; false when it is this router's configuration that cannot (another
    /// node's, or this one's after a change, may).
    pub fn is_the_tasks(&self) -> bool {
        matches!(self, RouteError::BadSchema(_))
    }

    /// The submission field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            RouteError::UnknownKind { .. } => "type",
            RouteError::UnknownBackend { .. } | RouteError::RemotePinned { .. } => "backend",
            RouteError::NoLocalBackend { tagged: true, .. } => "tags",
            RouteError::NoLocalBackend { tagged: false, .. } => "type",
            RouteError::BadSchema(_) => "schema",
            RouteError::RemoteRoute { .. } | RouteError::NoLocalRoute { .. } | RouteError::Config(_) => "type",
        }
    }
}

/// What the router knows of a backend besides the backend itself.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Profile {
    /// Prompts sent there leave the machine.
    pub remote: bool,
    pub prices: Prices,
}

/// One backend's running totals.
#[derive(Debug, Default)]
pub struct Meter(Mutex<MeterReading>);

impl Meter {
    fn record(&self, u: &Usage, cost: f64) {
        let mut m = self.0.lock();
        m.answers += 1;
        m.prompt_tokens += u.prompt_tokens;
        m.completion_tokens += u.completion_tokens;
        m.cached_tokens += u.cache_read_tokens.unwrap_or(0);
        m.cost += cost;
    }

    pub fn read(&self) -> MeterReading {
        *self.0.lock()
    }
}

struct Entry {
    backend: Arc<dyn Backend>,
    profile: Profile,
    meter: Arc<Meter>,
}

/// One backend of a plan's chain, with the model to ask it for.
#[derive(Clone)]
pub struct Step {
    pub backend: Arc<dyn Backend>,
    pub model: String,
    pub remote: bool,
    prices: Prices,
    meter: Arc<Meter>,
}

/// Where and how one attempt of a task runs.
#[derive(Clone)]
pub struct Plan {
    /// The backends to try, in order (never empty): the first, then the fallbacks.
    pub steps: Vec<Step>,
    pub system: Option<String>,
    pub options: GenOptions,
    pub timeout: Duration,
    /// Set when the task wants structured output.
    pub checker: Option<Checker>,
    /// Ollama's context window for this type (`[types.NAME] num_ctx`), else the backend's.
    pub num_ctx: Option<u32>,
    /// Which backends are cooling down after a rate limit (shared by every plan).
    pub cooldowns: Arc<Cooldowns>,
    /// The most bytes of answer kept; a backend that produces more is stopped.
    pub max_output: usize,
}

/// A finished generation and who served it.
#[derive(Debug)]
pub struct Served {
    pub generation: Generation,
    pub backend: String,
    pub model: String,
    pub remote: bool,
    /// At the serving backend's prices; `None` when it has none.
    pub cost: Option<f64>,
}

/// The routing table: task types to backends.
pub struct Router {
    backends: BTreeMap<String, Entry>,
    types: BTreeMap<String, TypeRoute>,
    /// Compiled `schema`s of types, by type.
    type_formats: BTreeMap<String, Checker>,
    /// Prices that value local tokens, when configured.
    reference: Option<(Option<String>, Prices)>,
    cooldowns: Arc<Cooldowns>,
    max_output: usize,
}

impl Router {
    /// Every backend local and unpriced (for tests and tools; the server uses
    /// [`Router::with_profiles`]). Checks that every route names a configured backend.
    pub fn new(
        backends: impl IntoIterator<Item = Arc<dyn Backend>>,
        types: BTreeMap<String, TypeRoute>,
    ) -> Result<Router, RouteError> {
        Router::with_profiles(backends.into_iter().map(|b| (b, Profile::default())), types, &PricingConfig::default())
    }

    /// Checks every route: its backends exist; a remote one only where the type has
    /// `allow_remote`; a confidential type has a local backend; schemas and prices are usable.
    pub fn with_profiles(
        backends: impl IntoIterator<Item = (Arc<dyn Backend>, Profile)>,
        types: BTreeMap<String, TypeRoute>,
        pricing: &PricingConfig,
    ) -> Result<Router, RouteError> {
        let backends: BTreeMap<_, _> = backends
            .into_iter()
            .map(|(backend, profile)| {
                (backend.name().to_owned(), Entry { backend, profile, meter: Arc::new(Meter::default()) })
            })
            .collect();
        let mut r = Router {
            backends,
            types,
            type_formats: BTreeMap::new(),
            reference: None,
            cooldowns: Arc::default(),
            max_output: usize::MAX,
        };
        for (name, e) in &r.backends {
            e.profile.prices.check(&format!("[backends.{name}]")).map_err(RouteError::Config)?;
        }
        for (kind, route) in &r.types {
            let mut chain = Vec::new();
            for b in route_names(route) {
                let e = r.entry(b)?;
                if e.profile.remote && !route.allow_remote {
                    return Err(RouteError::RemoteRoute { kind: kind.clone(), backend: b.to_owned() });
                }
                chain.push((b, e.profile.remote));
            }
            if route.confidential && chain.iter().all(|(_, remote)| *remote) {
                let chain = chain.iter().map(|(b, _)| *b).collect::<Vec<_>>().join(", ");
                return Err(RouteError::NoLocalRoute { kind: kind.clone(), chain });
            }
        }
        for (kind, route) in &r.types {
            let format = match (&route.schema, route.json) {
                (Some(s), _) => ResponseFormat::Schema(s.clone()),
                (None, true) => ResponseFormat::Json,
                (None, false) => continue,
            };
            let checker = Checker::new(format).map_err(|e| RouteError::Config(format!("[types.{kind}] schema {e}")))?;
            r.type_formats.insert(kind.clone(), checker);
        }
        let explicit = pricing.prices();
        explicit.check("[pricing]").map_err(RouteError::Config)?;
        r.reference = match &pricing.reference {
            Some(name) => {
                let e = r.entry(name).map_err(|e| RouteError::Config(format!("[pricing] reference: {e}")))?;
                if !e.profile.prices.is_set() && !explicit.is_set() {
                    return Err(RouteError::Config(format!(
                        "[pricing] reference = {name:?}, but [backends.{name}] sets no price_input_per_mtok / \
                         price_output_per_mtok"
                    )));
                }
                Some((Some(name.clone()), overlay(&e.profile.prices, &explicit)))
            }
            None if explicit.is_set() => Some((None, explicit)),
            None => None,
        };
        Ok(r)
    }

    /// Bounds every answer to `bytes` (`limits.max_result_bytes`; unbounded by default).
    pub fn with_max_output(mut self, bytes: usize) -> Router {
        self.max_output = bytes;
        self
    }

    /// The backends cooling down after a rate limit.
    pub fn cooldowns(&self) -> &Cooldowns {
        &self.cooldowns
    }

    fn entry(&self, name: &str) -> Result<&Entry, RouteError> {
        self.backends
            .get(name)
            .ok_or_else(|| RouteError::UnknownBackend { backend: name.to_owned(), known: join_keys(&self.backends) })
    }

    pub fn backends(&self) -> impl Iterator<Item = &Arc<dyn Backend>> {
        self.backends.values().map(|e| &e.backend)
    }

    pub fn types(&self) -> &BTreeMap<String, TypeRoute> {
        &self.types
    }

    pub fn knows_kind(&self, kind: &str) -> bool {
        self.types.contains_key(kind)
    }

    pub fn backend(&self, name: &str) -> Result<&Arc<dyn Backend>, RouteError> {
        self.entry(name).map(|e| &e.backend)
    }

    /// Whether prompts sent to backend `name` leave the machine (unknown names: true).
    pub fn is_remote(&self, name: &str) -> bool {
        self.backends.get(name).is_none_or(|e| e.profile.remote)
    }

    pub fn prices(&self, name: &str) -> Option<Prices> {
        self.backends.get(name).map(|e| e.profile.prices)
    }

    /// Tokens and cost served by backend `name` since start.
    pub fn reading(&self, name: &str) -> MeterReading {
        self.backends.get(name).map(|e| e.meter.read()).unwrap_or_default()
    }

    /// What the local backends spared a paid API (their tokens at the `[pricing]` reference
    /// prices), when a reference is configured.
    pub fn spared(&self) -> Option<Spared> {
        let (reference, prices) = self.reference.clone()?;
        let mut total = MeterReading::default();
        for e in self.backends.values().filter(|e| !e.profile.remote) {
            let m = e.meter.read();
            total.prompt_tokens += m.prompt_tokens;
            total.completion_tokens += m.completion_tokens;
            total.cached_tokens += m.cached_tokens;
        }
        // A paid API would have charged local prompt tokens as fresh input.
        let usage = Usage { cache_read_tokens: None, ..total.usage() };
        Some(Spared {
            reference,
            prompt_tokens: total.prompt_tokens,
            completion_tokens: total.completion_tokens,
            cost: prices.cost(&usage),
        })
    }

    /// Checks a submission before it is queued: its type, the backend it pins, where a
    /// confidential task may run, and its schema.
    pub fn check(&self, task: &NewTask) -> Result<(), RouteError> {
        let route = self.route(task.kind.as_str())?;
        let conf = confidentiality(task.tags.iter().any(|t| t.eq_ignore_ascii_case(koubou_task::CONFIDENTIAL)), route);
        self.chain(task.kind.as_str(), route, task.backend.as_deref(), task.model.as_deref(), conf)?;
        if let Some(s) = &task.schema {
            format::compile(s).map_err(RouteError::BadSchema)?;
        }
        Ok(())
    }

    fn route(&self, kind: &str) -> Result<&TypeRoute, RouteError> {
        self.types
            .get(kind)
            .ok_or_else(|| RouteError::UnknownKind { kind: kind.to_owned(), known: join_keys(&self.types) })
    }

    /// The backends a task may use, in order: the pinned one alone, or the type's chain; for a
    /// confidential task, its local backends only.
    fn chain(
        &self,
        kind: &str,
        route: &TypeRoute,
        pinned: Option<&str>,
        model: Option<&str>,
        confidential: Option<&'static str>,
    ) -> Result<Vec<Step>, RouteError> {
        let step = |name: &str, model: Option<String>| -> Result<Step, RouteError> {
            let e = self.entry(name)?;
            Ok(Step {
                model: model.unwrap_or_else(|| e.backend.default_model().to_owned()),
                backend: e.backend.clone(),
                remote: e.profile.remote,
                prices: e.profile.prices,
                meter: e.meter.clone(),
            })
        };
        if let Some(p) = pinned {
            // Checked even when it names the type's own first backend: a confidential task that
            // asks for a remote backend is refused, not quietly sent elsewhere.
            if self.entry(p)?.profile.remote {
                let why = match confidential {
                    Some(why) => Some(format!("the task is confidential ({why})")),
                    None if !route.allow_remote => Some(format!("type {kind:?} does not have allow_remote = true")),
                    None => None,
                };
                if let Some(why) = why {
                    return Err(RouteError::RemotePinned { backend: p.to_owned(), why });
                }
            }
            if p != route.backend {
                return Ok(vec![step(p, model.map(str::to_owned))?]);
            }
        }
        let mut steps = vec![step(&route.backend, model.map(str::to_owned).or_else(|| route.model.clone()))?];
        for (i, f) in route.fallback.iter().enumerate() {
            if steps.iter().any(|s| s.backend.name() == f) {
                continue;
            }
            steps.push(step(f, if i == 0 { route.fallback_model.clone() } else { None })?);
        }
        let names = steps.iter().map(|s| s.backend.name().to_owned()).collect::<Vec<_>>().join(", ");
        // Remote backends only where the type allows them (the config check makes this a
        // no-op), and never for confidential work.
        steps.retain(|s| !s.remote || (route.allow_remote && confidential.is_none()));
        if steps.is_empty() {
            let why = confidential.unwrap_or("its type allows no remote backend");
            return Err(RouteError::NoLocalBackend {
                kind: kind.to_owned(),
                chain: names,
                why: why.to_owned(),
                tagged: why == TAGGED,
            });
        }
        Ok(steps)
    }

    /// Decides where a task runs. The task's own choices win over its type's, which win over the
    /// backend's defaults.
    pub fn plan(&self, task: &Task) -> Result<Plan, RouteError> {
        let kind = task.kind.as_str();
        let route = self.route(kind)?;
        let conf = confidentiality(task.has_confidential_tag(), route);
        let steps =
            self.chain(kind, route, task.requested_backend.as_deref(), task.requested_model.as_deref(), conf)?;
        let checker = match (&task.schema, task.json) {
            (Some(s), _) => Some(Checker::new(ResponseFormat::Schema(s.clone())).map_err(RouteError::BadSchema)?),
            (None, true) => Some(Checker::new(ResponseFormat::Json).map_err(RouteError::BadSchema)?),
            (None, false) => self.type_formats.get(kind).cloned(),
        };
        let mut system = task.system.clone().or_else(|| route.system_prompt.clone());
        if let Some(c) = &checker {
            let line = format::instruction(c.format());
            system = Some(match system.filter(|s| !s.trim().is_empty()) {
                Some(s) => format!("{s}\n\n{line}"),
                None => line,
            });
        }
        Ok(Plan {
            steps,
            system,
            options: merge_options(&route.options, &task.options),
            timeout: Duration::from_secs(task.timeout_secs.unwrap_or(route.timeout_secs).max(1)),
            checker,
            num_ctx: route.num_ctx,
            cooldowns: self.cooldowns.clone(),
            max_output: self.max_output,
        })
    }
}

const TAGGED: &str = "tagged confidential";

/// Why a task is confidential, if it is.
fn confidentiality(tagged: bool, route: &TypeRoute) -> Option<&'static str> {
    if tagged {
        Some(TAGGED)
    } else if route.confidential {
        Some("its type has confidential = true")
    } else {
        None
    }
}

fn route_names(route: &TypeRoute) -> impl Iterator<Item = &str> {
    std::iter::once(route.backend.as_str()).chain(route.fallback.iter().map(String::as_str))
}

/// `over`'s prices where set, else `base`'s.
fn overlay(base: &Prices, over: &Prices) -> Prices {
    Prices {
        price_input_per_mtok: over.price_input_per_mtok.or(base.price_input_per_mtok),
        price_output_per_mtok: over.price_output_per_mtok.or(base.price_output_per_mtok),
        price_cached_input_per_mtok: over.price_cached_input_per_mtok.or(base.price_cached_input_per_mtok),
    }
}

impl Plan {
    /// The backend tried first.
    pub fn first(&self) -> &Step {
        &self.steps[0]
    }

    /// Runs the plan: each backend of the chain in turn, moving on only when one cannot serve
    /// ([`BackendError::falls_back`]); a backend cooling down after a rate limit is skipped while
    /// a later one is not (else waited out). Each try gets the full timeout; when it runs out the
    /// backend is cancelled (so it can kill a child process) and awaited, never just dropped.
    pub async fn run(
        &self,
        task: &Task,
        sink: &dyn TokenSink,
        cancel: &CancellationToken,
    ) -> Result<Served, BackendError> {
        let mut i = 0;
        loop {
            let step = &self.steps[i];
            let later = &self.steps[i + 1..];
            if let Some(c) = self.cooldowns.get(step.backend.name())
                && let Some(next) = later.iter().find(|s| self.cooldowns.get(s.backend.name()).is_none())
            {
                tracing::info!(task = %task.id, backend = step.backend.name(), next = next.backend.name(), reason = %c.reason, "backend cooling down; skipping it");
                i += 1;
                continue;
            }
            match self.try_on(step, task, sink, cancel).await {
                Err(e) if e.falls_back() && !later.is_empty() && !cancel.is_cancelled() => {
                    let next = later[0].backend.name();
                    tracing::warn!(task = %task.id, backend = step.backend.name(), next, error = %e, "falling back");
                    i += 1;
                }
                r => return r,
            }
        }
    }

    async fn try_on(
        &self,
        step: &Step,
        task: &Task,
        sink: &dyn TokenSink,
        cancel: &CancellationToken,
    ) -> Result<Served, BackendError> {
        // A cooling backend gets nothing until its cool-down is over (the caller holds its
        // permit meanwhile, so no other worker sends to it either).
        self.cooldowns.wait(step.backend.name(), cancel).await?;
        let result = self.attempt(step, task, sink, cancel).await;
        if let Err(e) = &result {
            self.cooldowns.note(step.backend.name(), e);
        }
        result
    }

    async fn attempt(
        &self,
        step: &Step,
        task: &Task,
        sink: &dyn TokenSink,
        cancel: &CancellationToken,
    ) -> Result<Served, BackendError> {
        let backend = &step.backend;
        let req = GenerateRequest {
            model: step.model.clone(),
            system: self.system.clone(),
            prompt: task.prompt.clone(),
            options: self.options.clone(),
            timeout: self.timeout,
            task_id: task.id.to_string(),
            task_kind: task.kind.to_string(),
            num_ctx: self.num_ctx,
            response_format: self.checker.as_ref().map(|c| c.format().clone()),
        };
        let child = cancel.child_token();
        let bounded = Bounded::new(sink, self.max_output, child.clone());
        let generation = backend.generate(req, &bounded, child.clone());
        tokio::pin!(generation);
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let mut timed_out = false;
        let result = loop {
            tokio::select! {
                r = &mut generation => break r,
                _ = &mut deadline, if !timed_out => {
                    timed_out = true;
                    child.cancel();
                }
            }
        };
        let too_large = || BackendError::TooLarge { backend: backend.name().to_owned(), limit: self.max_output };
        let generation = match result {
            Err(BackendError::Cancelled) | Ok(_) if timed_out => {
                return Err(BackendError::Timeout { backend: backend.name().to_owned(), timeout: self.timeout });
            }
            Err(_) | Ok(_) if bounded.over() => return Err(too_large()),
            Ok(g) if g.text.len() > self.max_output => return Err(too_large()),
            Ok(g) => g,
            Err(e) => return Err(e),
        };
        // Counted whatever the check below says: the backend did the work (and a paid one
        // charged for it).
        let cost = step.prices.cost(&generation.usage);
        step.meter.record(&generation.usage, cost);
        if let Some(c) = &self.checker {
            c.check(&generation.text)
                .map_err(|detail| BackendError::BadOutput { backend: backend.name().to_owned(), detail })?;
        }
        Ok(Served {
            generation,
            backend: backend.name().to_owned(),
            model: step.model.clone(),
            remote: step.remote,
            cost: step.prices.is_set().then_some(cost),
        })
    }
}

/// Passes tokens on until `limit` bytes have gone through; the token that would cross it is
/// dropped and the run cancelled, so what the caller holds never exceeds the limit.
struct Bounded<'a> {
    inner: &'a dyn TokenSink,
    limit: usize,
    used: AtomicUsize,
    over: AtomicBool,
    stop: CancellationToken,
}

impl<'a> Bounded<'a> {
    fn new(inner: &'a dyn TokenSink, limit: usize, stop: CancellationToken) -> Self {
        Bounded { inner, limit, used: AtomicUsize::new(0), over: AtomicBool::new(false), stop }
    }

    fn over(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }
}

impl TokenSink for Bounded<'_> {
    fn token(&self, text: &str) {
        if self.over() {
            return;
        }
        let before = self.used.fetch_add(text.len(), Ordering::AcqRel);
        if before.saturating_add(text.len()) > self.limit {
            self.over.store(true, Ordering::Release);
            self.stop.cancel();
            return;
        }
        self.inner.token(text);
    }

    fn max_bytes(&self) -> Option<usize> {
        Some(self.limit)
    }
}

fn merge_options(base: &GenOptions, task: &GenOptions) -> GenOptions {
    GenOptions {
        max_tokens: task.max_tokens.or(base.max_tokens),
        temperature: task.temperature.or(base.temperature),
        top_p: task.top_p.or(base.top_p),
        seed: task.seed.or(base.seed),
        stop: if task.stop.is_empty() { base.stop.clone() } else { task.stop.clone() },
    }
}

fn join_keys<V>(m: &BTreeMap<String, V>) -> String {
    if m.is_empty() { "(none)".into() } else { m.keys().map(String::as_str).collect::<Vec<_>>().join(", ") }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use koubou_task::{NewTask, TaskId, TaskKind, Usage};

    use super::*;
    use crate::Health;

    /// A backend whose behaviour each test sets: answer (`ok`, or `text:…` for a fixed answer),
    /// refuse to connect (`down`), be rate-limited (`busy`, or `limited` asking for 10 s),
    /// refuse the request (`bad`), hang, stream without end (`flood`) or hand over one large
    /// answer (`lump`). Counts its calls.
    struct Scripted {
        name: &'static str,
        mode: &'static str,
        calls: AtomicUsize,
    }

    fn scripted(name: &'static str, mode: &'static str) -> Arc<Scripted> {
        Arc::new(Scripted { name, mode, calls: AtomicUsize::new(0) })
    }

    #[async_trait]
    impl Backend for Scripted {
        fn name(&self) -> &str {
            self.name
        }
        fn kind(&self) -> &'static str {
            "exec"
        }
        fn default_model(&self) -> &str {
            "m0"
        }
        fn capacity(&self) -> usize {
            1
        }
        async fn health(&self) -> Health {
            Health::up("ok", vec![])
        }
        async fn generate(
            &self,
            req: GenerateRequest,
            sink: &dyn TokenSink,
            cancel: CancellationToken,
        ) -> Result<Generation, BackendError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let backend = self.name.to_owned();
            match self.mode {
                "down" => Err(BackendError::Unreachable { backend, detail: "refused".into() }),
                "busy" => {
                    Err(BackendError::RateLimited { backend, status: 529, retry_after: None, detail: "busy".into() })
                }
                "limited" => Err(BackendError::RateLimited {
                    backend,
                    status: 429,
                    retry_after: Some(Duration::from_secs(10)),
                    detail: "slow down".into(),
                }),
                "bad" => Err(BackendError::Rejected { backend, status: 400, detail: "no".into() }),
                "hang" => {
                    cancel.cancelled().await;
                    Err(BackendError::Cancelled)
                }
                "flood" => loop {
                    sink.token("0123456789");
                    if cancel.is_cancelled() {
                        return Err(BackendError::Cancelled);
                    }
                    tokio::task::yield_now().await;
                },
                "lump" => Ok(Generation {
                    text: "x".repeat(100),
                    usage: Usage::default(),
                    model: req.model,
                    finish_reason: "stop".into(),
                    warnings: vec![],
                }),
                mode => {
                    sink.token("hi");
                    let text = match mode.strip_prefix("text:") {
                        Some(t) => t.to_owned(),
                        None => format!("{}:{}:{}", self.name, req.model, req.system.unwrap_or_default()),
                    };
                    Ok(Generation {
                        text,
                        usage: Usage::new(1000, 500),
                        model: req.model,
                        finish_reason: "stop".into(),
                        warnings: vec![],
                    })
                }
            }
        }
    }

    fn route(backend: &str, fallback: &[&str]) -> TypeRoute {
        TypeRoute {
            backend: backend.into(),
            fallback: fallback.iter().map(|s| s.to_string()).collect(),
            timeout_secs: 1,
            ..TypeRoute::default()
        }
    }

    fn router(primary: &'static str) -> Router {
        let types = BTreeMap::from([(
            "code".to_string(),
            TypeRoute {
                model: Some("coder".into()),
                system_prompt: Some("be terse".into()),
                num_ctx: Some(16384),
                ..route("a", &["b"])
            },
        )]);
        let backends: Vec<Arc<dyn Backend>> = vec![scripted("a", primary), scripted("b", "ok")];
        Router::new(backends, types).unwrap()
    }

    fn task(kind: &str) -> Task {
        Task::from_new(TaskId::new(), NewTask::new(TaskKind::parse(kind).unwrap(), "p"), 3, 0)
    }

    async fn run(r: &Router, t: &Task) -> Result<Served, BackendError> {
        r.plan(t).unwrap().run(t, &crate::Discard, &CancellationToken::new()).await
    }

    /// Backends `local` (answers), `paid` (remote, priced, answers) with `types` over them.
    fn mixed(types: Vec<(&str, TypeRoute)>) -> (Router, Arc<Scripted>, Arc<Scripted>) {
        let (local, paid) = (scripted("local", "ok"), scripted("paid", "ok"));
        let prices = Prices {
            price_input_per_mtok: Some(3.0),
            price_output_per_mtok: Some(15.0),
            price_cached_input_per_mtok: None,
        };
        let backends: Vec<(Arc<dyn Backend>, Profile)> =
            vec![(local.clone(), Profile::default()), (paid.clone(), Profile { remote: true, prices })];
        let types = types.into_iter().map(|(k, r)| (k.to_owned(), r)).collect();
        let pricing = PricingConfig { reference: Some("paid".into()), ..PricingConfig::default() };
        (Router::with_profiles(backends, types, &pricing).unwrap(), local, paid)
    }

    #[test]
    fn unknown_names_are_refused() {
        let r = router("ok");
        assert!(matches!(r.plan(&task("general")), Err(RouteError::UnknownKind { .. })));
        let mut t = NewTask::new(TaskKind::parse("code").unwrap(), "p");
        t.backend = Some("zzz".into());
        assert_eq!(r.check(&t).unwrap_err().field(), "backend");
        let bad = BTreeMap::from([("x".to_string(), TypeRoute { backend: "nope".into(), ..TypeRoute::default() })]);
        assert!(Router::new(Vec::<Arc<dyn Backend>>::new(), bad).is_err());
        let bad_fallback = BTreeMap::from([("x".to_string(), route("a", &["nope"]))]);
        assert!(Router::new(vec![scripted("a", "ok") as Arc<dyn Backend>], bad_fallback).is_err());
    }

    #[tokio::test]
    async fn routes_by_type_and_task_overrides() {
        let r = router("ok");
        assert_eq!(r.plan(&task("code")).unwrap().num_ctx, Some(16384), "the type's num_ctx travels with the plan");
        let s = run(&r, &task("code")).await.unwrap();
        assert_eq!(s.generation.text, "a:coder:be terse");
        let mut t = task("code");
        t.requested_backend = Some("b".into());
        t.system = Some("mine".into());
        let s = run(&r, &t).await.unwrap();
        assert_eq!((s.backend.as_str(), s.generation.text.as_str()), ("b", "b:m0:mine"));
    }

    #[tokio::test]
    async fn falls_back_when_unreachable() {
        let s = run(&router("down"), &task("code")).await.unwrap();
        assert_eq!(s.backend, "b");
        assert_eq!(s.model, "m0");
    }

    #[tokio::test]
    async fn a_chain_is_walked_until_one_answers_but_not_past_a_bad_request() {
        let (a, b, c) = (scripted("a", "down"), scripted("b", "busy"), scripted("c", "ok"));
        let types = BTreeMap::from([("general".to_string(), route("a", &["b", "c"]))]);
        let r = Router::new(vec![a.clone() as Arc<dyn Backend>, b.clone(), c.clone()], types).unwrap();
        let s = run(&r, &task("general")).await.unwrap();
        assert_eq!(s.backend, "c");
        assert_eq!([&a, &b, &c].map(|x| x.calls.load(Ordering::SeqCst)), [1, 1, 1]);

        let (bad, spare) = (scripted("bad", "bad"), scripted("spare", "ok"));
        let types = BTreeMap::from([("general".to_string(), route("bad", &["spare"]))]);
        let r = Router::new(vec![bad as Arc<dyn Backend>, spare.clone()], types).unwrap();
        let e = run(&r, &task("general")).await.unwrap_err();
        assert!(matches!(e, BackendError::Rejected { .. }), "{e}");
        assert_eq!(spare.calls.load(Ordering::SeqCst), 0, "a bad request does not fall back");
    }

    #[tokio::test]
    async fn output_past_the_limit_stops_the_backend_and_keeps_no_more() {
        let got = std::sync::Mutex::new(String::new());
        let sink = |t: &str| got.lock().unwrap().push_str(t);
        for (mode, streamed) in [("flood", 50), ("lump", 0)] {
            got.lock().unwrap().clear();
            let r = router(mode).with_max_output(55);
            let t = task("code");
            let e = r.plan(&t).unwrap().run(&t, &sink, &CancellationToken::new()).await.unwrap_err();
            assert!(matches!(e, BackendError::TooLarge { limit: 55, .. }), "{mode}: {e}");
            assert!(e.to_string().contains("output too large") && !e.is_retryable() && !e.falls_back());
            assert_eq!(got.lock().unwrap().len(), streamed, "{mode}: only whole tokens within the limit pass");
        }
        let t = task("code");
        let plan = router("ok").with_max_output(55).plan(&t).unwrap();
        let ok = plan.run(&t, &crate::Discard, &CancellationToken::new()).await.unwrap();
        assert_eq!(ok.generation.text, "a:coder:be terse", "an answer within the limit passes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limited_backend_cools_down_and_its_tasks_go_down_the_chain_or_wait() {
        let (a, b) = (scripted("a", "limited"), scripted("b", "ok"));
        let types = BTreeMap::from([
            ("code".to_string(), route("a", &["b"])),
            ("solo".to_string(), TypeRoute { timeout_secs: 300, ..route("a", &[]) }),
        ]);
        let r = Router::new([a.clone() as Arc<dyn Backend>, b.clone()], types).unwrap();
        let calls = |s: &Scripted| s.calls.load(Ordering::SeqCst);
        let s = run(&r, &task("code")).await.unwrap();
        assert_eq!((s.backend.as_str(), calls(&a), calls(&b)), ("b", 1, 1), "the refusal falls back at once");
        let cooling = r.cooldowns().get("a").expect("a cools down");
        assert!(cooling.reason.contains("429"), "{}", cooling.reason);
        let s = run(&r, &task("code")).await.unwrap();
        assert_eq!((s.backend.as_str(), calls(&a)), ("b", 1), "a cooling backend is not asked again");
        // Nothing later in the chain: the attempt waits out the cool-down, then asks `a`.
        let start = tokio::time::Instant::now();
        let e = run(&r, &task("solo")).await.unwrap_err();
        assert!(matches!(e, BackendError::RateLimited { .. }), "{e}");
        assert!(start.elapsed() >= Duration::from_secs(9), "waited {:?}", start.elapsed());
        assert_eq!(calls(&a), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_cancels_the_backend_and_falls_back() {
        let r = router("hang");
        let s = run(&r, &task("code")).await.unwrap();
        assert_eq!(s.backend, "b", "a timeout moves to the next backend");
        let types = BTreeMap::from([("code".to_string(), route("a", &[]))]);
        let r = Router::new(vec![scripted("a", "hang") as Arc<dyn Backend>], types).unwrap();
        let e = run(&r, &task("code")).await.unwrap_err();
        assert!(matches!(e, BackendError::Timeout { .. }), "{e}");
    }

    #[test]
    fn a_remote_route_needs_allow_remote() {
        let profiles = || -> Vec<(Arc<dyn Backend>, Profile)> {
            vec![
                (scripted("local", "ok"), Profile::default()),
                (scripted("paid", "ok"), Profile { remote: true, ..Profile::default() }),
            ]
        };
        let build = |r: TypeRoute| {
            Router::with_profiles(profiles(), BTreeMap::from([("code".to_string(), r)]), &PricingConfig::default())
        };
        let e = build(route("paid", &[])).err().unwrap();
        assert!(e.to_string().contains("allow_remote = true in [types.code]"), "{e}");
        let e = build(route("local", &["paid"])).err().unwrap();
        assert!(matches!(&e, RouteError::RemoteRoute { backend, .. } if backend == "paid"), "a remote fallback: {e}");
        assert!(build(TypeRoute { allow_remote: true, ..route("local", &["paid"]) }).is_ok());
        let e = build(TypeRoute { allow_remote: true, confidential: true, ..route("paid", &[]) }).err().unwrap();
        assert!(e.to_string().contains("confidential"), "{e}");
    }

    #[tokio::test]
    async fn confidential_work_never_reaches_a_remote_backend() {
        let (r, local, paid) = mixed(vec![
            ("general", TypeRoute { allow_remote: true, ..route("paid", &["local"]) }),
            ("cloud", TypeRoute { allow_remote: true, ..route("paid", &[]) }),
            ("secret", TypeRoute { allow_remote: true, confidential: true, ..route("paid", &["local"]) }),
        ]);
        // Not confidential: the remote backend first.
        assert_eq!(run(&r, &task("general")).await.unwrap().backend, "paid");
        // Tagged confidential, or of a confidential type: the local backend of the chain.
        let mut t = task("general");
        t.tags = vec!["confidential".into()];
        let s = run(&r, &t).await.unwrap();
        assert_eq!((s.backend.as_str(), s.remote), ("local", false));
        assert_eq!(run(&r, &task("secret")).await.unwrap().backend, "local");
        assert_eq!(paid.calls.load(Ordering::SeqCst), 1, "only the non-confidential task went out");
        assert_eq!(local.calls.load(Ordering::SeqCst), 2);
        // No local backend at all: refused at submission (naming the tags) and at planning.
        let mut new = NewTask::new(TaskKind::parse("cloud").unwrap(), "p");
        new.tags = vec!["confidential".into()];
        let e = r.check(&new).unwrap_err();
        assert_eq!(e.field(), "tags", "{e}");
        let mut t = task("cloud");
        t.tags = vec!["Confidential".into()];
        assert!(r.plan(&t).is_err(), "the tag is read whatever its case");
        // Pinning the remote backend: refused for a confidential task, naming `backend`.
        let mut new = NewTask::new(TaskKind::general(), "p");
        new.tags = vec!["confidential".into()];
        new.backend = Some("paid".into());
        let e = r.check(&new).unwrap_err();
        assert_eq!(e.field(), "backend");
        assert!(e.to_string().contains("confidential"), "{e}");
        let mut new = NewTask::new(TaskKind::parse("secret").unwrap(), "p");
        new.backend = Some("paid".into());
        assert_eq!(r.check(&new).unwrap_err().field(), "backend");
        assert_eq!(paid.calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn pinning_a_remote_backend_needs_allow_remote() {
        let (r, _, _) = mixed(vec![("general", route("local", &[]))]);
        let mut new = NewTask::new(TaskKind::general(), "p");
        new.backend = Some("paid".into());
        let e = r.check(&new).unwrap_err();
        assert!(e.field() == "backend" && e.to_string().contains("allow_remote"), "{e}");
    }

    #[tokio::test]
    async fn cost_and_meters() {
        let (r, _, _) = mixed(vec![
            ("general", TypeRoute { allow_remote: true, ..route("paid", &[]) }),
            ("code", route("local", &[])),
        ]);
        let s = run(&r, &task("general")).await.unwrap();
        // 1000 in × 3 + 500 out × 15, per million.
        let want = (1000.0 * 3.0 + 500.0 * 15.0) / 1e6;
        assert!((s.cost.unwrap() - want).abs() < 1e-12, "{:?}", s.cost);
        let s = run(&r, &task("code")).await.unwrap();
        assert_eq!(s.cost, None, "an unpriced backend gives no cost");
        run(&r, &task("code")).await.unwrap();
        let paid = r.reading("paid");
        assert_eq!((paid.answers, paid.prompt_tokens, paid.completion_tokens), (1, 1000, 500));
        assert!((paid.cost - want).abs() < 1e-12);
        assert_eq!(r.reading("local").answers, 2);
        let spared = r.spared().unwrap();
        assert_eq!((spared.prompt_tokens, spared.completion_tokens), (2000, 1000));
        assert!((spared.cost - 2.0 * want).abs() < 1e-12, "local tokens at the reference prices");
        assert_eq!(spared.reference.as_deref(), Some("paid"));
    }

    #[tokio::test]
    async fn structured_answers_are_checked() {
        let types = BTreeMap::from([
            ("general".to_string(), TypeRoute { json: true, ..route("prose", &[]) }),
            ("code".to_string(), route("json", &[])),
        ]);
        let backends: Vec<Arc<dyn Backend>> =
            vec![scripted("prose", "text:Here you go: {}"), scripted("json", "text:{\"n\": 1}")];
        let r = Router::new(backends, types).unwrap();
        let e = run(&r, &task("general")).await.unwrap_err();
        assert!(matches!(&e, BackendError::BadOutput { detail, .. } if detail.contains("not JSON")), "{e}");
        assert!(e.is_retryable() && !e.falls_back());
        let mut t = task("code");
        t.schema = Some(serde_json::json!({"type": "object", "required": ["n"]}));
        t.json = true;
        let plan = r.plan(&t).unwrap();
        assert!(plan.system.as_deref().unwrap().contains("JSON Schema"), "the model is told");
        assert!(run(&r, &t).await.is_ok());
        t.schema = Some(serde_json::json!({"type": "object", "required": ["missing"]}));
        assert!(matches!(run(&r, &t).await, Err(BackendError::BadOutput { .. })));
        let mut new = NewTask::new(TaskKind::parse("code").unwrap(), "p");
        new.schema = Some(serde_json::json!({"type": 5}));
        assert_eq!(r.check(&new).unwrap_err().field(), "schema");
    }

    #[test]
    fn pricing_must_be_usable() {
        let backends = || vec![(scripted("local", "ok") as Arc<dyn Backend>, Profile::default())];
        let types = || BTreeMap::from([("general".to_string(), route("local", &[]))]);
        let pricing = PricingConfig { reference: Some("local".into()), ..PricingConfig::default() };
        let e = Router::with_profiles(backends(), types(), &pricing).err().unwrap();
        assert!(e.to_string().contains("sets no price"), "{e}");
        let pricing = PricingConfig { reference: Some("nope".into()), ..PricingConfig::default() };
        assert!(Router::with_profiles(backends(), types(), &pricing).is_err());
        let explicit = PricingConfig { price_output_per_mtok: Some(10.0), ..PricingConfig::default() };
        let r = Router::with_profiles(backends(), types(), &explicit).unwrap();
        assert_eq!(r.spared().unwrap().reference, None);
    }
}
