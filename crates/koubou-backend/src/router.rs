//! Picks backend, model, system prompt, options and timeout for a task, and runs it there,
//! falling back to a second backend when the first cannot be reached. Every run is bounded in
//! time (the route's timeout) and in size (`max_result_bytes`): past either, the backend is
//! cancelled — a child process is killed with its group — and awaited.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use koubou_task::{GenOptions, Task};

use crate::cooldown::Cooldowns;
use crate::{Backend, BackendError, CancellationToken, GenerateRequest, Generation, TokenSink, TypeRoute};

/// Why a task cannot be routed (the submitter's fault: answered with a 4xx).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("unknown task type {kind:?}; configured types: {known}")]
    UnknownKind { kind: String, known: String },
    #[error("unknown backend {backend:?}; configured backends: {known}")]
    UnknownBackend { backend: String, known: String },
}

/// Where and how one attempt of a task runs.
#[derive(Clone)]
pub struct Plan {
    pub backend: Arc<dyn Backend>,
    pub model: String,
    pub fallback: Option<(Arc<dyn Backend>, String)>,
    pub system: Option<String>,
    pub options: GenOptions,
    pub timeout: Duration,
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
}

/// The routing table: task types to backends.
pub struct Router {
    backends: BTreeMap<String, Arc<dyn Backend>>,
    types: BTreeMap<String, TypeRoute>,
    cooldowns: Arc<Cooldowns>,
    max_output: usize,
}

impl Router {
    /// Checks that every route names a configured backend.
    pub fn new(
        backends: impl IntoIterator<Item = Arc<dyn Backend>>,
        types: BTreeMap<String, TypeRoute>,
    ) -> Result<Router, RouteError> {
        let backends: BTreeMap<_, _> = backends.into_iter().map(|b| (b.name().to_owned(), b)).collect();
        let r = Router { backends, types, cooldowns: Arc::default(), max_output: usize::MAX };
        for route in r.types.values() {
            r.backend(&route.backend)?;
            if let Some(f) = &route.fallback {
                r.backend(f)?;
            }
        }
        Ok(r)
    }

    /// Bounds every answer to `bytes` (`limits.max_result_bytes`; unbounded by default).
    pub fn with_max_output(mut self, bytes: usize) -> Router {
        self.max_output = bytes;
        self
    }

    pub fn backends(&self) -> impl Iterator<Item = &Arc<dyn Backend>> {
        self.backends.values()
    }

    pub fn types(&self) -> &BTreeMap<String, TypeRoute> {
        &self.types
    }

    /// The backends cooling down after a rate limit.
    pub fn cooldowns(&self) -> &Cooldowns {
        &self.cooldowns
    }

    pub fn knows_kind(&self, kind: &str) -> bool {
        self.types.contains_key(kind)
    }

    pub fn backend(&self, name: &str) -> Result<&Arc<dyn Backend>, RouteError> {
        self.backends
            .get(name)
            .ok_or_else(|| RouteError::UnknownBackend { backend: name.to_owned(), known: join_keys(&self.backends) })
    }

    /// Checks a submission's type and backend override before it is queued.
    pub fn check(&self, kind: &str, backend: Option<&str>) -> Result<(), RouteError> {
        if !self.knows_kind(kind) {
            return Err(RouteError::UnknownKind { kind: kind.to_owned(), known: join_keys(&self.types) });
        }
        if let Some(b) = backend {
            self.backend(b)?;
        }
        Ok(())
    }

    /// Decides where a task runs. The task's own choices win over its type's, which win over the
    /// backend's defaults.
    pub fn plan(&self, task: &Task) -> Result<Plan, RouteError> {
        let kind = task.kind.as_str();
        let route = self
            .types
            .get(kind)
            .ok_or_else(|| RouteError::UnknownKind { kind: kind.to_owned(), known: join_keys(&self.types) })?;
        let pinned = task.requested_backend.as_deref().filter(|b| *b != route.backend);
        let backend = self.backend(pinned.unwrap_or(&route.backend))?.clone();
        let model = task
            .requested_model
            .clone()
            .or_else(|| if pinned.is_some() { None } else { route.model.clone() })
            .unwrap_or_else(|| backend.default_model().to_owned());
        let fallback = match (&route.fallback, pinned) {
            (Some(f), None) if *f != route.backend => {
                let fb = self.backend(f)?.clone();
                let m = route.fallback_model.clone().unwrap_or_else(|| fb.default_model().to_owned());
                Some((fb, m))
            }
            _ => None,
        };
        Ok(Plan {
            backend,
            model,
            fallback,
            system: task.system.clone().or_else(|| route.system_prompt.clone()),
            options: merge_options(&route.options, &task.options),
            timeout: Duration::from_secs(task.timeout_secs.unwrap_or(route.timeout_secs).max(1)),
            num_ctx: route.num_ctx,
            cooldowns: self.cooldowns.clone(),
            max_output: self.max_output,
        })
    }
}

impl Plan {
    /// Runs the plan: the first backend, then the fallback if the first was unreachable or
    /// rate-limited (a first backend already cooling down is skipped for a fallback that is not).
    /// Each try gets the full timeout; when it runs out the backend is cancelled (so it can kill
    /// a child process) and awaited, never just dropped.
    pub async fn run(
        &self,
        task: &Task,
        sink: &dyn TokenSink,
        cancel: &CancellationToken,
    ) -> Result<Served, BackendError> {
        if let Some((fb, model)) = &self.fallback
            && let Some(c) = self.cooldowns.get(self.backend.name())
            && self.cooldowns.get(fb.name()).is_none()
        {
            tracing::info!(task = %task.id, backend = self.backend.name(), fallback = fb.name(), reason = %c.reason, "backend cooling down; using the fallback");
            return self.try_on(fb, model, task, sink, cancel).await;
        }
        let first = self.try_on(&self.backend, &self.model, task, sink, cancel).await;
        match (first, &self.fallback) {
            (Err(e), Some((fb, model))) if e.wants_fallback() => {
                tracing::warn!(task = %task.id, backend = self.backend.name(), fallback = fb.name(), error = %e, "falling back");
                self.try_on(fb, model, task, sink, cancel).await
            }
            (r, _) => r,
        }
    }

    async fn try_on(
        &self,
        backend: &Arc<dyn Backend>,
        model: &str,
        task: &Task,
        sink: &dyn TokenSink,
        cancel: &CancellationToken,
    ) -> Result<Served, BackendError> {
        // A cooling backend gets nothing until its cool-down is over (the caller holds its
        // permit meanwhile, so no other worker sends to it either).
        self.cooldowns.wait(backend.name(), cancel).await?;
        let result = self.attempt(backend, model, task, sink, cancel).await;
        if let Err(e) = &result {
            self.cooldowns.note(backend.name(), e);
        }
        result
    }

    async fn attempt(
        &self,
        backend: &Arc<dyn Backend>,
        model: &str,
        task: &Task,
        sink: &dyn TokenSink,
        cancel: &CancellationToken,
    ) -> Result<Served, BackendError> {
        let req = GenerateRequest {
            model: model.to_owned(),
            system: self.system.clone(),
            prompt: task.prompt.clone(),
            options: self.options.clone(),
            timeout: self.timeout,
            task_id: task.id.to_string(),
            task_kind: task.kind.to_string(),
            num_ctx: self.num_ctx,
            response_format: None,
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
        match result {
            Err(BackendError::Cancelled) | Ok(_) if timed_out => {
                Err(BackendError::Timeout { backend: backend.name().to_owned(), timeout: self.timeout })
            }
            Err(_) | Ok(_) if bounded.over() => Err(too_large()),
            Ok(g) if g.text.len() > self.max_output => Err(too_large()),
            Ok(generation) => Ok(Served { generation, backend: backend.name().to_owned(), model: model.to_owned() }),
            Err(e) => Err(e),
        }
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

    /// A backend whose behaviour each test sets: answer, refuse to connect, or hang.
    struct Scripted {
        name: &'static str,
        mode: &'static str,
        calls: std::sync::atomic::AtomicUsize,
    }

    fn scripted(name: &'static str, mode: &'static str) -> Arc<Scripted> {
        Arc::new(Scripted { name, mode, calls: Default::default() })
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
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match self.mode {
                "limited" => Err(BackendError::RateLimited {
                    backend: self.name.into(),
                    status: 429,
                    retry_after: Some(Duration::from_secs(10)),
                    detail: "slow down".into(),
                }),
                "down" => Err(BackendError::Unreachable { backend: self.name.into(), detail: "refused".into() }),
                "hang" => {
                    cancel.cancelled().await;
                    Err(BackendError::Cancelled)
                }
                // Streams until told to stop (a runaway program).
                "flood" => loop {
                    sink.token("0123456789");
                    if cancel.is_cancelled() {
                        return Err(BackendError::Cancelled);
                    }
                    tokio::task::yield_now().await;
                },
                // Says nothing while it runs, then hands over one large answer.
                "lump" => Ok(Generation {
                    text: "x".repeat(100),
                    usage: Usage::default(),
                    model: req.model,
                    finish_reason: "stop".into(),
                    warnings: vec![],
                }),
                _ => {
                    sink.token("hi");
                    Ok(Generation {
                        text: format!("{}:{}:{}", self.name, req.model, req.system.unwrap_or_default()),
                        usage: Usage::default(),
                        model: req.model,
                        finish_reason: "stop".into(),
                        warnings: vec![],
                    })
                }
            }
        }
    }

    fn router(primary: &'static str) -> Router {
        let types = BTreeMap::from([(
            "code".to_string(),
            TypeRoute {
                backend: "a".into(),
                model: Some("coder".into()),
                system_prompt: Some("be terse".into()),
                fallback: Some("b".into()),
                timeout_secs: 1,
                num_ctx: Some(16384),
                ..TypeRoute::default()
            },
        )]);
        let backends: Vec<Arc<dyn Backend>> = vec![scripted("a", primary), scripted("b", "ok")];
        Router::new(backends, types).unwrap()
    }

    fn task(kind: &str) -> Task {
        Task::from_new(TaskId::new(), NewTask::new(TaskKind::parse(kind).unwrap(), "p"), 3, 0)
    }

    #[test]
    fn unknown_names_are_refused() {
        let r = router("ok");
        assert!(matches!(r.plan(&task("general")), Err(RouteError::UnknownKind { .. })));
        assert!(r.check("code", Some("zzz")).is_err());
        let bad = BTreeMap::from([("x".to_string(), TypeRoute { backend: "nope".into(), ..TypeRoute::default() })]);
        assert!(Router::new(Vec::<Arc<dyn Backend>>::new(), bad).is_err());
    }

    #[tokio::test]
    async fn routes_by_type_and_task_overrides() {
        let r = router("ok");
        let t = task("code");
        let plan = r.plan(&t).unwrap();
        assert_eq!(plan.num_ctx, Some(16384), "the type's num_ctx travels with the plan");
        let s = plan.run(&t, &crate::Discard, &CancellationToken::new()).await.unwrap();
        assert_eq!(s.generation.text, "a:coder:be terse");
        let mut t = task("code");
        t.requested_backend = Some("b".into());
        t.system = Some("mine".into());
        let s = r.plan(&t).unwrap().run(&t, &crate::Discard, &CancellationToken::new()).await.unwrap();
        assert_eq!((s.backend.as_str(), s.generation.text.as_str()), ("b", "b:m0:mine"));
    }

    #[tokio::test]
    async fn falls_back_when_unreachable() {
        let r = router("down");
        let t = task("code");
        let s = r.plan(&t).unwrap().run(&t, &crate::Discard, &CancellationToken::new()).await.unwrap();
        assert_eq!(s.backend, "b");
        assert_eq!(s.model, "m0");
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
            assert!(e.to_string().contains("output too large") && !e.is_retryable() && !e.wants_fallback());
            assert_eq!(got.lock().unwrap().len(), streamed, "{mode}: only whole tokens within the limit pass");
        }
        let t = task("code");
        let plan = router("ok").with_max_output(55).plan(&t).unwrap();
        let ok = plan.run(&t, &crate::Discard, &CancellationToken::new()).await.unwrap();
        assert_eq!(ok.generation.text, "a:coder:be terse", "an answer within the limit passes");
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_cancels_the_backend() {
        let r = router("hang");
        let t = task("code");
        let e = r.plan(&t).unwrap().run(&t, &crate::Discard, &CancellationToken::new()).await.unwrap_err();
        assert!(matches!(e, BackendError::Timeout { .. }), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limited_backend_cools_down_and_its_tasks_go_to_the_fallback_or_wait() {
        let a = scripted("a", "limited");
        let b = scripted("b", "ok");
        let types = BTreeMap::from([
            ("code".to_string(), TypeRoute { backend: "a".into(), fallback: Some("b".into()), ..TypeRoute::default() }),
            ("solo".to_string(), TypeRoute { backend: "a".into(), ..TypeRoute::default() }),
        ]);
        let r = Router::new([a.clone() as Arc<dyn Backend>, b.clone()], types).unwrap();
        let calls = |s: &Scripted| s.calls.load(std::sync::atomic::Ordering::SeqCst);
        let t = task("code");
        let s = r.plan(&t).unwrap().run(&t, &crate::Discard, &CancellationToken::new()).await.unwrap();
        assert_eq!((s.backend.as_str(), calls(&a), calls(&b)), ("b", 1, 1), "the refusal falls back at once");
        let cooling = r.cooldowns().get("a").expect("a cools down");
        assert!(cooling.reason.contains("429"), "{}", cooling.reason);
        let s = r.plan(&t).unwrap().run(&t, &crate::Discard, &CancellationToken::new()).await.unwrap();
        assert_eq!((s.backend.as_str(), calls(&a)), ("b", 1), "a cooling backend is not asked again");
        // No fallback: the attempt waits out the cool-down, then asks `a`.
        let pinned = task("solo");
        let start = tokio::time::Instant::now();
        let e = r.plan(&pinned).unwrap().run(&pinned, &crate::Discard, &CancellationToken::new()).await.unwrap_err();
        assert!(matches!(e, BackendError::RateLimited { .. }), "{e}");
        assert!(start.elapsed() >= Duration::from_secs(9), "waited {:?}", start.elapsed());
        assert_eq!(calls(&a), 2);
    }
}
