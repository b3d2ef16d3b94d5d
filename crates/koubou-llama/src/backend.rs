//! [`EmbeddedBackend`]: the [`Backend`] trait over the engine thread.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use koubou_backend::{
    Backend, BackendError, CancellationToken, EmbeddedConfig, GenerateRequest, Generation, Health, TokenSink, Usage,
};
use tokio::sync::OnceCell;

use crate::{
    engine::{Engine, EngineConfig, EngineError, Event, JobSpec, KvCache, ModelInfo, Prompt, Weights, grammar_for},
    models::{ModelError, ModelStore},
};

/// Temperature when a task sets none (llama.cpp's default).
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
/// top-p when a task sets none (llama.cpp's default).
pub const DEFAULT_TOP_P: f32 = 0.95;
/// Most tokens in one decode call.
pub const DEFAULT_BATCH: u32 = 512;

/// Threads for one generating sequence when the configuration sets none. See the crate docs
/// ("Threads"): with `share_cores` they are used only while other processes leave the cores
/// idle, and the decode runs on one thread the moment another process takes one.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    default_threads_for(cores)
}

/// The default for a machine with `cores` logical CPUs: every core on 1–2 cores; on more, all
/// but one (left for the rest of the process and the OS, and as slack so one busy core elsewhere
/// does not send the decode to one thread), capped at 8.
pub fn default_threads_for(cores: usize) -> usize {
    if cores <= 2 { cores.max(1) } else { (cores - 1).min(8) }
}

/// Threads for batched work when the configuration sets none: every core, at most 8 (used only
/// while the cores are otherwise idle, unless `share_cores` is off).
pub fn default_batch_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(8)
}

/// A GGUF model run in-process by llama.cpp, shared by up to `parallel` concurrent generations.
pub struct EmbeddedBackend {
    name: String,
    cfg: EmbeddedConfig,
    store: ModelStore,
    threads: usize,
    batch_threads: usize,
    weights: Weights,
    kv_cache: KvCache,
    /// The resolved file; `None` while the default model is still to be pulled.
    path: Option<PathBuf>,
    /// Why the configured model cannot be used at all (not in the store, no such file).
    problem: Option<String>,
    /// The result of [`crate::check::validate`] on `path` (started when the backend is built).
    checked: Arc<OnceCell<Result<(), String>>>,
    /// Why the last attempt to load the model failed, if it did.
    load_error: Mutex<Option<String>>,
    engine: OnceCell<Arc<Engine>>,
}

/// How long `health()` waits for a model check still running before saying so.
const HEALTH_WAIT: Duration = Duration::from_secs(4);

impl std::fmt::Debug for EmbeddedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBackend")
            .field("name", &self.name)
            .field("model", &self.cfg.model)
            .field("path", &self.path)
            .field("threads", &self.threads)
            .finish()
    }
}

impl EmbeddedBackend {
    /// Checks the configuration and finds the model file. The model is loaded on first use (or
    /// by [`EmbeddedBackend::load`]); the default model, when missing, is pulled on first use.
    pub fn new(name: &str, cfg: &EmbeddedConfig, models: &ModelStore) -> Result<Self, BackendError> {
        let config_err = |detail: String| BackendError::Config { backend: name.to_string(), detail };
        if cfg.parallel == 0 || cfg.parallel > 256 {
            return Err(config_err(format!("parallel must be between 1 and 256, not {}", cfg.parallel)));
        }
        if cfg.context < 64 {
            return Err(config_err(format!("context must be at least 64 tokens, not {}", cfg.context)));
        }
        if cfg.max_tokens == 0 {
            return Err(config_err("max_tokens must be at least 1".into()));
        }
        if cfg.threads == Some(0) {
            return Err(config_err("threads must be at least 1".into()));
        }
        if cfg.batch_threads == Some(0) {
            return Err(config_err("batch_threads must be at least 1".into()));
        }
        let weights = Weights::parse(&cfg.weights).ok_or_else(|| {
            config_err(format!("weights must be auto, original, q4_0, q8_0 or iq4_nl, not {:?}", cfg.weights))
        })?;
        let kv_cache = KvCache::parse(&cfg.kv_cache)
            .ok_or_else(|| config_err(format!("kv_cache must be q8_0 or f16, not {:?}", cfg.kv_cache)))?;
        if (cfg.parallel as u64) * u64::from(cfg.context) > 1 << 24 {
            return Err(config_err(format!(
                "parallel * context = {} tokens is too large",
                cfg.parallel as u64 * u64::from(cfg.context)
            )));
        }
        // A model that cannot be used makes the backend "down, because …", never an error that
        // stops the server: the other backends still serve.
        let (path, problem) = match models.resolve(&cfg.model) {
            Ok(p) => (Some(p), None),
            Err(ModelError::Missing { .. }) if ModelStore::is_default_name(&cfg.model) => (None, None),
            Err(e) => (None, Some(format!("model {:?}: {e}", cfg.model))),
        };
        let b = EmbeddedBackend {
            name: name.into(),
            cfg: cfg.clone(),
            store: models.clone(),
            threads: cfg.threads.unwrap_or_else(default_threads),
            batch_threads: cfg.batch_threads.unwrap_or_else(default_batch_threads),
            weights,
            kv_cache,
            path,
            problem,
            checked: Arc::new(OnceCell::new()),
            load_error: Mutex::new(None),
            engine: OnceCell::new(),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            drop(b.start_check());
        }
        Ok(b)
    }

    /// Starts checking the model file (once; later calls join the same check) and returns a
    /// handle to its result. The check runs on its own task, so a caller that stops waiting does
    /// not abandon it.
    fn start_check(&self) -> Option<tokio::task::JoinHandle<Result<(), String>>> {
        let path = self.path.clone()?;
        let checked = self.checked.clone();
        Some(tokio::spawn(async move {
            checked
                .get_or_init(|| async move {
                    let p = path.clone();
                    tokio::task::spawn_blocking(move || {
                        crate::check::validate(&p).map(|_| ()).map_err(|e| e.to_string())
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("the model check did not run: {e}")))
                })
                .await
                .clone()
        }))
    }

    /// The result of checking the model file (waiting for it).
    async fn validated(&self) -> Result<(), String> {
        match self.start_check() {
            Some(h) => h.await.unwrap_or_else(|e| Err(format!("the model check did not run: {e}"))),
            None => Ok(()),
        }
    }

    /// Threads the engine uses for one generating sequence.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Threads the engine uses for batched work (while the cores are free).
    pub fn batch_threads(&self) -> usize {
        self.batch_threads
    }

    /// The loaded model, once loaded.
    pub fn model_info(&self) -> Option<&ModelInfo> {
        self.engine.get().map(|e| e.info())
    }

    /// Loads the model now (pulling the default model first if it is missing).
    pub async fn load(&self) -> Result<&ModelInfo, BackendError> {
        Ok(self.engine().await?.info())
    }

    async fn engine(&self) -> Result<&Arc<Engine>, BackendError> {
        let config_err = |detail: String| BackendError::Config { backend: self.name.clone(), detail };
        if let Some(p) = &self.problem {
            return Err(BackendError::ModelMissing {
                backend: self.name.clone(),
                model: self.cfg.model.clone(),
                hint: p.clone(),
            });
        }
        if let Err(reason) = self.validated().await {
            return Err(config_err(reason));
        }
        let r = self
            .engine
            .get_or_try_init(|| async {
                let name = self.name.clone();
                let store = self.store.clone();
                let path = self.path.clone();
                let cfg = self.cfg.clone();
                let (threads, batch_threads, weights, kv_cache) =
                    (self.threads, self.batch_threads, self.weights, self.kv_cache);
                let join = tokio::task::spawn_blocking(move || -> Result<Engine, BackendError> {
                    let path = match path {
                        Some(p) => p,
                        None => {
                            let p = store
                                .ensure_default(&mut |p| tracing::info!(?p, "pulling the default model"))
                                .map_err(|e| BackendError::ModelMissing {
                                    backend: name.clone(),
                                    model: cfg.model.clone(),
                                    hint: format!("pulling it failed ({e}); run `koubou models pull`"),
                                })?;
                            crate::check::validate(&p)
                                .map_err(|e| BackendError::Config { backend: name.clone(), detail: e.to_string() })?;
                            p
                        }
                    };
                    Engine::start(EngineConfig {
                        model_path: path,
                        threads,
                        batch_threads,
                        parallel: cfg.parallel,
                        context: cfg.context,
                        batch: DEFAULT_BATCH,
                        weights,
                        kv_cache,
                        share_cores: cfg.share_cores,
                        cache_prompts: cfg.cache_prompts,
                        copies_dir: Some(store.copies_dir()),
                    })
                    .map_err(|e| BackendError::Config { backend: name.clone(), detail: e.to_string() })
                });
                match join.await {
                    Ok(r) => r.map(Arc::new),
                    Err(e) => Err(BackendError::Failed { backend: self.name.clone(), detail: format!("loader: {e}") }),
                }
            })
            .await;
        let mut last = self.load_error.lock().unwrap_or_else(|p| p.into_inner());
        *last = r.as_ref().err().map(ToString::to_string);
        r
    }

    fn serves(&self, model: &str) -> bool {
        if model.is_empty() || model == self.cfg.model {
            return true;
        }
        if ModelStore::is_default_name(model) && ModelStore::is_default_name(&self.cfg.model) {
            return true;
        }
        self.path
            .as_ref()
            .is_some_and(|p| p.to_str() == Some(model) || p.file_name().and_then(|f| f.to_str()) == Some(model))
    }

    fn map_err(&self, e: EngineError) -> BackendError {
        let backend = self.name.clone();
        match e {
            EngineError::Cancelled => BackendError::Cancelled,
            EngineError::PromptTooLong { .. } | EngineError::EmptyPrompt | EngineError::Invalid(_) => {
                BackendError::Rejected { backend, status: 400, detail: e.to_string() }
            }
            EngineError::Load(_) => BackendError::Config { backend, detail: e.to_string() },
            EngineError::Decode(_) | EngineError::Stopped => BackendError::Failed { backend, detail: e.to_string() },
        }
    }
}

#[async_trait]
impl Backend for EmbeddedBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn default_model(&self) -> &str {
        &self.cfg.model
    }

    fn capacity(&self) -> usize {
        self.cfg.parallel
    }

    async fn health(&self) -> Health {
        let models = vec![self.cfg.model.clone()];
        if let Some(info) = self.model_info() {
            return Health::up(
                format!(
                    "embedded llama.cpp: {} loaded ({} M params, {} MiB, weights {}, kv cache {}; {} threads for one sequence, {} for batches{}, {} sequences x {} tokens)",
                    info.file_name,
                    info.n_params / 1_000_000,
                    info.size_bytes >> 20,
                    info.weights,
                    info.kv_cache.as_str(),
                    info.threads,
                    info.batch_threads,
                    if self.cfg.share_cores { ", each while the cores are free" } else { "" },
                    info.parallel,
                    info.context
                ),
                models,
            );
        }
        if let Some(p) = &self.problem {
            return Health::down(p.clone());
        }
        if let Some(e) = self.load_error.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Health::down(format!("loading the model failed: {e}"));
        }
        match &self.path {
            Some(p) if p.is_file() => {
                let file = p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                match tokio::time::timeout(HEALTH_WAIT, self.validated()).await {
                    Ok(Ok(())) => Health::up(
                        format!("embedded llama.cpp: {file} checked, loads on first use ({} threads)", self.threads),
                        models,
                    ),
                    Ok(Err(reason)) => Health::down(reason),
                    Err(_) => Health::down(format!(
                        "embedded llama.cpp: still checking {file} (GGUF structure and a trial load in a child process)"
                    )),
                }
            }
            Some(p) => Health::down(format!("model file {} has disappeared", p.display())),
            None => Health::down(format!(
                "model {:?} is not downloaded yet ({}); run `koubou models pull` (the first task pulls it too)",
                self.cfg.model,
                self.store.dir().display()
            )),
        }
    }

    async fn generate(
        &self,
        req: GenerateRequest,
        sink: &dyn TokenSink,
        cancel: CancellationToken,
    ) -> Result<Generation, BackendError> {
        if !self.serves(&req.model) {
            return Err(BackendError::ModelMissing {
                backend: self.name.clone(),
                model: req.model.clone(),
                hint: format!("this embedded backend serves only {:?}", self.cfg.model),
            });
        }
        if cancel.is_cancelled() {
            return Err(BackendError::Cancelled);
        }
        let engine = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(BackendError::Cancelled),
            e = self.engine() => e?,
        };
        let o = &req.options;
        let spec = JobSpec {
            prompt: Prompt::Chat { system: req.system.clone(), user: req.prompt.clone() },
            max_tokens: o.max_tokens.unwrap_or(self.cfg.max_tokens),
            temperature: o.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_p: o.top_p.unwrap_or(DEFAULT_TOP_P),
            seed: o.seed,
            stop: o.stop.clone(),
            ignore_eos: false,
            grammar: req.response_format.as_ref().map(grammar_for).transpose().map_err(|e| self.map_err(e))?,
        };
        let mut rx = engine.submit(spec, cancel.clone()).map_err(|e| self.map_err(e))?;
        let budget = if req.timeout.is_zero() { Duration::from_secs(86_400 * 365) } else { req.timeout };
        let deadline = tokio::time::sleep(budget);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(BackendError::Cancelled),
                _ = &mut deadline => {
                    return Err(BackendError::Timeout { backend: self.name.clone(), timeout: req.timeout });
                }
                ev = rx.recv() => match ev {
                    Some(Event::Token(t)) => {
                        if !t.is_empty() {
                            sink.token(&t);
                        }
                    }
                    Some(Event::Done(f)) => {
                        return Ok(Generation {
                            text: f.text,
                            usage: Usage {
                                cache_read_tokens: Some(u64::from(f.cached_tokens)),
                                ..Usage::new(u64::from(f.prompt_tokens), u64::from(f.completion_tokens))
                            },
                            model: self.cfg.model.clone(),
                            finish_reason: f.finish_reason.as_str().to_string(),
                            warnings: vec![],
                        });
                    }
                    Some(Event::Failed(e)) => return Err(self.map_err(e)),
                    None => return Err(self.map_err(EngineError::Stopped)),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> GenerateRequest {
        GenerateRequest {
            model: String::new(),
            system: None,
            prompt: "hi".into(),
            options: Default::default(),
            timeout: Duration::from_secs(5),
            task_id: "t".into(),
            task_kind: "test".into(),
            num_ctx: None,
            response_format: None,
        }
    }

    #[test]
    fn thread_default() {
        assert_eq!(default_threads_for(0), 1);
        assert_eq!(default_threads_for(1), 1);
        assert_eq!(default_threads_for(2), 2, "a lone sequence uses both cores of a 2-core machine");
        assert_eq!(default_threads_for(3), 2);
        assert_eq!(default_threads_for(4), 3);
        assert_eq!(default_threads_for(64), 8);
    }

    #[test]
    fn config_errors_are_typed() {
        let t = tempfile::tempdir().unwrap();
        let store = ModelStore::new(t.path());
        let bad = EmbeddedConfig { parallel: 0, ..EmbeddedConfig::default() };
        assert!(matches!(EmbeddedBackend::new("e", &bad, &store), Err(BackendError::Config { .. })));
        for bad in [
            EmbeddedConfig { weights: "q4_1".into(), ..EmbeddedConfig::default() },
            EmbeddedConfig { kv_cache: "q4".into(), ..EmbeddedConfig::default() },
            EmbeddedConfig { batch_threads: Some(0), ..EmbeddedConfig::default() },
        ] {
            let err = EmbeddedBackend::new("e", &bad, &store).unwrap_err();
            assert!(matches!(err, BackendError::Config { .. }), "{err}");
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // A model that cannot be used is not an error that stops the server: the backend is down
        // and says why.
        let missing = EmbeddedConfig { model: "not-there".into(), ..EmbeddedConfig::default() };
        let b = EmbeddedBackend::new("e", &missing, &store).unwrap();
        let h = rt.block_on(b.health());
        assert!(!h.up);
        assert!(h.detail.contains("koubou models pull"), "{}", h.detail);
        let err = rt.block_on(b.generate(request(), &koubou_backend::Discard, CancellationToken::new())).unwrap_err();
        assert!(matches!(err, BackendError::ModelMissing { .. }), "{err}");
        assert!(err.falls_back());
        // The default model may be missing: it is pulled on first use, and health says so.
        let b = EmbeddedBackend::new("e", &EmbeddedConfig::default(), &store).unwrap();
        assert_eq!(b.capacity(), 4);
        let h = rt.block_on(b.health());
        assert!(!h.up);
        assert!(h.detail.contains("koubou models pull"), "{}", h.detail);
        // A path that is not GGUF, and a GGUF whose tensor data is cut off.
        let junk = t.path().join("junk.gguf");
        std::fs::write(&junk, b"nope").unwrap();
        let cut = t.path().join("cut.gguf");
        let bytes = crate::gguf::Writer::new().tensor("t", &[1024], 0).build();
        std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
        for (path, why) in [(&junk, "not a GGUF file"), (&cut, "truncated")] {
            let cfg = EmbeddedConfig { model: path.display().to_string(), ..EmbeddedConfig::default() };
            let b = rt.block_on(async { EmbeddedBackend::new("e", &cfg, &store) }).unwrap();
            let h = rt.block_on(b.health());
            assert!(!h.up && h.detail.contains(why), "{}", h.detail);
            let err =
                rt.block_on(b.generate(request(), &koubou_backend::Discard, CancellationToken::new())).unwrap_err();
            assert!(matches!(&err, BackendError::Config { detail, .. } if detail.contains(why)), "{err}");
        }
    }
}
