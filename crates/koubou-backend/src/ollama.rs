//! The Ollama provider: Ollama's native `/api/chat` (streamed NDJSON), its model list for health
//! checks, and `/api/pull` for `koubou models pull`.
//!
//! Why it exists: Ollama is the seed's default local LLM runtime (`gemma2:2b`). Its native API
//! reports token counts and `done_reason` exactly and says plainly when a model is not pulled,
//! which the OpenAI-compatible shim does less well; and users set `OLLAMA_HOST` in the forms
//! Ollama itself accepts (`0.0.0.0`, `host:port`, no scheme), so we resolve it the same way.

use std::net::IpAddr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::config::{OllamaConfig, client_options};
use crate::http::{self, Body, HEALTH_TIMEOUT};
use crate::sse::LineSplitter;
use crate::{
    Backend, BackendError, CancellationToken, GenerateRequest, Generation, Health, ResponseFormat, TokenSink, Usage,
};

/// Where Ollama listens when nothing says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:11434";
const DEFAULT_PORT: &str = "11434";
const SERVE_HINT: &str = "is Ollama running? start it with `ollama serve` (or set `url` / OLLAMA_HOST)";
/// Ollama's context window when neither the request nor the server (`OLLAMA_CONTEXT_LENGTH`)
/// sets one.
pub const OLLAMA_DEFAULT_NUM_CTX: u32 = 4096;

/// The base URL to use: the configured `url`, else `$OLLAMA_HOST`, else [`DEFAULT_URL`], each
/// normalized the way Ollama's own client reads `OLLAMA_HOST`.
pub fn resolve_url(cfg_url: Option<&str>) -> String {
    let env = std::env::var("OLLAMA_HOST").ok();
    resolve_url_from(cfg_url, env.as_deref())
}

fn resolve_url_from(cfg_url: Option<&str>, env: Option<&str>) -> String {
    let pick = [cfg_url, env].into_iter().flatten().map(str::trim).find(|s| !s.is_empty());
    match pick {
        Some(s) => normalize_host(s),
        None => DEFAULT_URL.to_owned(),
    }
}

/// Ollama's `envconfig.Host()` rules: no scheme means `http`; no port means 11434 (80/443 when
/// the scheme is given explicitly); a bare IP or name is a host. Then, because we are a client,
/// a wildcard listen address (`0.0.0.0`, `::`) becomes the matching loopback address.
fn normalize_host(s: &str) -> String {
    let (scheme, hostport, default_port) = match s.split_once("://") {
        None => ("http", s, DEFAULT_PORT),
        Some((sch, rest)) => {
            let port = match sch {
                "http" => "80",
                "https" => "443",
                _ => DEFAULT_PORT,
            };
            (sch, rest, port)
        }
    };
    let (hostport, path) = match hostport.split_once('/') {
        Some((hp, p)) => (hp, p.trim_end_matches('/')),
        None => (hostport, ""),
    };
    let (mut host, mut port) = split_host_port(hostport).unwrap_or_else(|| {
        let bare = hostport.trim_start_matches('[').trim_end_matches(']');
        let host = if bare.is_empty() { "127.0.0.1".to_owned() } else { bare.to_owned() };
        (host, default_port.to_owned())
    });
    if port.parse::<u16>().is_err() {
        port = default_port.to_owned();
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        host = match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => "127.0.0.1".to_owned(),
            IpAddr::V6(v6) if v6.is_unspecified() => "[::1]".to_owned(),
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
    }
    let path = if path.is_empty() { String::new() } else { format!("/{path}") };
    format!("{scheme}://{host}:{port}{path}")
}

/// Go's `net.SplitHostPort`, roughly: `host:port` or `[v6]:port`.
fn split_host_port(s: &str) -> Option<(String, String)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((h.to_owned(), port.to_owned()));
    }
    let (h, p) = s.rsplit_once(':')?;
    if h.contains(':') {
        return None; // a bare IPv6 address
    }
    Some((h.to_owned(), p.to_owned()))
}

/// Ollama, over its native API.
pub struct OllamaBackend {
    name: String,
    url: String,
    model: String,
    concurrency: usize,
    keep_alive: Option<String>,
    num_ctx: Option<u32>,
    client: http::Pool,
}

impl OllamaBackend {
    /// Fails when `ca_file` or `proxy` cannot work.
    pub fn new(name: impl Into<String>, cfg: &OllamaConfig) -> Result<Self, BackendError> {
        let name = name.into();
        let url = resolve_url(cfg.url.as_deref());
        let client = http::Pool::new(&name, &client_options(&cfg.ca_file, &cfg.proxy), &url)?;
        Ok(OllamaBackend {
            name,
            url,
            model: cfg.model.clone(),
            concurrency: cfg.concurrency.max(1),
            keep_alive: cfg.keep_alive.clone(),
            num_ctx: cfg.num_ctx,
            client,
        })
    }

    /// The base URL in use.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn body(&self, req: &GenerateRequest) -> Value {
        let mut messages = Vec::new();
        if let Some(s) = req.system.as_deref().filter(|s| !s.is_empty()) {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": req.prompt}));
        let o = &req.options;
        let mut options = Map::new();
        if let Some(t) = o.temperature {
            options.insert("temperature".into(), json!(t));
        }
        if let Some(p) = o.top_p {
            options.insert("top_p".into(), json!(p));
        }
        if let Some(s) = o.seed {
            options.insert("seed".into(), json!(s));
        }
        if let Some(n) = o.max_tokens {
            options.insert("num_predict".into(), json!(n));
        }
        if !o.stop.is_empty() {
            options.insert("stop".into(), json!(o.stop));
        }
        if let Some(n) = req.num_ctx.or(self.num_ctx) {
            options.insert("num_ctx".into(), json!(n));
        }
        let mut body = json!({"model": req.model, "messages": messages, "stream": true});
        if !options.is_empty() {
            body["options"] = Value::Object(options);
        }
        if let Some(k) = &self.keep_alive {
            body["keep_alive"] = json!(k);
        }
        match &req.response_format {
            Some(ResponseFormat::Json) => body["format"] = json!("json"),
            Some(ResponseFormat::Schema(s)) => body["format"] = s.clone(),
            None => {}
        }
        body
    }

    fn err_status(&self, refusal: http::Refusal, model: &str) -> BackendError {
        if let Some(limited) = refusal.rate_limited(&self.name) {
            return limited;
        }
        let http::Refusal { status, message: msg, .. } = refusal;
        let lower = msg.to_lowercase();
        if status == 404 && lower.contains("not found") && (lower.contains("model") || lower.contains(model)) {
            return BackendError::ModelMissing {
                backend: self.name.clone(),
                model: model.to_owned(),
                hint: format!("run `ollama pull {model}` ({msg})"),
            };
        }
        match status {
            // Ollama answers 503 "server busy" when its queue (OLLAMA_MAX_QUEUE) is full, without
            // Retry-After: overloaded, so the router cools it down and moves down the chain.
            503 => BackendError::RateLimited { backend: self.name.clone(), status, retry_after: None, detail: msg },
            400..=499 => BackendError::Rejected { backend: self.name.clone(), status, detail: msg },
            _ => BackendError::Failed { backend: self.name.clone(), detail: format!("HTTP {status}: {msg}") },
        }
    }
}

/// One line of `/api/chat`'s stream.
#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatLine {
    model: Option<String>,
    message: Option<ChatMessage>,
    done: bool,
    done_reason: Option<String>,
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
    error: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChatMessage {
    content: String,
}

#[async_trait]
impl Backend for OllamaBackend {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "ollama"
    }
    fn default_model(&self) -> &str {
        &self.model
    }
    fn capacity(&self) -> usize {
        self.concurrency
    }

    async fn health(&self) -> Health {
        if let Err(e) = http::check_url(&self.name, &self.url) {
            return Health::down(e.to_string());
        }
        let url = format!("{}/api/tags", self.url);
        let resp = match self.client.get().get(&url).timeout(HEALTH_TIMEOUT).send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Health::down(format!("ollama at {} did not answer within {HEALTH_TIMEOUT:?}", self.url));
            }
            Err(e) => {
                return Health::down(format!("ollama at {} is down: {}; {SERVE_HINT}", self.url, http::describe(&e)));
            }
        };
        let status = resp.status();
        let body = tokio::time::timeout(HEALTH_TIMEOUT, resp.text()).await;
        let text = match body {
            Ok(Ok(t)) => t,
            _ => return Health::down(format!("ollama at {}: /api/tags body did not arrive", self.url)),
        };
        if !status.is_success() {
            return Health::down(format!(
                "ollama at {}: /api/tags answered {status}: {}",
                self.url,
                http::message_of(&text)
            ));
        }
        let models: Vec<String> = match serde_json::from_str::<Value>(&text) {
            Ok(v) => v["models"]
                .as_array()
                .map(|a| a.iter().filter_map(|m| m["name"].as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
            Err(_) => {
                return Health::down(format!("ollama at {}: /api/tags did not answer JSON (not Ollama?)", self.url));
            }
        };
        let has_default =
            models.iter().any(|m| *m == self.model || m.strip_suffix(":latest") == Some(self.model.as_str()));
        let mut detail = format!("ollama at {}; {} model(s)", self.url, models.len());
        if !has_default {
            detail
                .push_str(&format!("; default model {} is not pulled (run `ollama pull {}`)", self.model, self.model));
        }
        Health::up(detail, models)
    }

    async fn generate(
        &self,
        req: GenerateRequest,
        sink: &dyn TokenSink,
        cancel: CancellationToken,
    ) -> Result<Generation, BackendError> {
        self.client.check(self.stream_answer(req, sink, cancel).await)
    }
}

impl OllamaBackend {
    /// One generation, streamed (see [`http::Pool::check`] for why this is wrapped).
    async fn stream_answer(
        &self,
        req: GenerateRequest,
        sink: &dyn TokenSink,
        cancel: CancellationToken,
    ) -> Result<Generation, BackendError> {
        http::check_url(&self.name, &self.url)?;
        let url = format!("{}/api/chat", self.url);
        let rb = self.client.get().post(&url).json(&self.body(&req));
        let resp = self.client.send(&self.name, &url, rb, &cancel, SERVE_HINT).await?;
        if !resp.status().is_success() {
            let refusal = http::Refusal::read(resp, &cancel).await?;
            return Err(self.err_status(refusal, &req.model));
        }
        let mut body = Body::new(resp);
        let mut lines = LineSplitter::new();
        let mut text = String::new();
        let mut model = req.model.clone();
        let mut deltas = 0u64;
        let mut done: Option<ChatLine> = None;
        let mut handle = |line: String, done: &mut Option<ChatLine>| -> Result<(), BackendError> {
            let line = line.trim();
            if line.is_empty() || done.is_some() {
                return Ok(());
            }
            let parsed: ChatLine = serde_json::from_str(line).map_err(|e| BackendError::Failed {
                backend: self.name.clone(),
                detail: format!("unreadable stream line ({e}): {}", http::truncate(line, 200)),
            })?;
            if let Some(err) = &parsed.error {
                let msg = match err {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                return Err(BackendError::Failed { backend: self.name.clone(), detail: msg });
            }
            if let Some(m) = &parsed.model {
                model.clone_from(m);
            }
            if let Some(msg) = &parsed.message
                && !msg.content.is_empty()
            {
                sink.token(&msg.content);
                text.push_str(&msg.content);
                deltas += 1;
            }
            if parsed.done {
                *done = Some(parsed);
            }
            Ok(())
        };
        while let Some(chunk) = body.next(&self.name, &cancel).await? {
            for line in lines.push(&chunk) {
                handle(line, &mut done)?;
            }
        }
        if let Some(line) = lines.finish() {
            // A last line cut mid-JSON is a truncated stream, not a protocol error.
            if done.is_none() && serde_json::from_str::<Value>(line.trim()).is_err() {
                return Err(BackendError::Truncated {
                    backend: self.name.clone(),
                    detail: "the stream ended in the middle of a line".into(),
                });
            }
            handle(line, &mut done)?;
        }
        let Some(last) = done else {
            return Err(BackendError::Truncated {
                backend: self.name.clone(),
                detail: format!("no `done: true` line after {} characters", text.chars().count()),
            });
        };
        let estimate = (req.system.as_deref().map_or(0, str::len) + req.prompt.len()) as u64 / 4;
        let warnings =
            context_warning(req.num_ctx.or(self.num_ctx), last.prompt_eval_count, estimate).into_iter().collect();
        Ok(Generation {
            text,
            usage: Usage::new(last.prompt_eval_count.unwrap_or(0), last.eval_count.unwrap_or(deltas)),
            model,
            finish_reason: last.done_reason.unwrap_or_else(|| "stop".into()),
            warnings,
        })
    }
}

/// A warning when the prompt (probably) did not fit the context window, so Ollama dropped its
/// start: it read exactly `num_ctx` prompt tokens, or the prompt's size (about 4 bytes a token)
/// is more than the window. With no `num_ctx` sent, the window is Ollama's default, unless the
/// count shows the server runs a larger one.
fn context_warning(num_ctx: Option<u32>, prompt_eval: Option<u64>, estimate: u64) -> Option<String> {
    let read = prompt_eval.unwrap_or(0);
    let (window, whose) = match num_ctx {
        Some(n) => (u64::from(n), format!("num_ctx = {n}")),
        None if read > u64::from(OLLAMA_DEFAULT_NUM_CTX) => return None,
        None => (
            u64::from(OLLAMA_DEFAULT_NUM_CTX),
            format!("Ollama's default of {OLLAMA_DEFAULT_NUM_CTX} tokens, as no num_ctx is set"),
        ),
    };
    let filled = read >= window;
    if !filled && estimate <= window {
        return None;
    }
    Some(format!(
        "the prompt may not fit the context window ({whose}): Ollama read {read} prompt tokens, the prompt is about \
         {estimate}; Ollama drops the start of a prompt that does not fit. Set a larger num_ctx for this backend or type"
    ))
}

/// One progress line of `/api/pull`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PullProgress {
    /// e.g. "pulling manifest", "pulling 6a0746a1ec1a", "verifying sha256 digest", "success".
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Bytes in the layer being pulled, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Bytes of it pulled so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed: Option<u64>,
}

/// Pulls `model` into the Ollama at `url` (a base URL; pass it through [`resolve_url`] first),
/// calling `progress` with each status line. Succeeds only when Ollama says `success`.
pub async fn pull(url: &str, model: &str, progress: impl Fn(PullProgress)) -> Result<(), BackendError> {
    const NAME: &str = "ollama";
    let url = url.trim_end_matches('/');
    http::check_url(NAME, url)?;
    let endpoint = format!("{url}/api/pull");
    let never = CancellationToken::new();
    let setup = http::ClientSetup::new(&http::ClientOptions::default())
        .map_err(|e| BackendError::Config { backend: NAME.into(), detail: e.to_string() })?;
    let rb = setup.client().post(&endpoint).json(&json!({"model": model, "stream": true}));
    let resp = http::send(NAME, &endpoint, rb, &never, SERVE_HINT).await?;
    let status = resp.status().as_u16();
    if !resp.status().is_success() {
        let msg = http::error_message(resp, &never).await?;
        return Err(match status {
            404 => BackendError::ModelMissing {
                backend: NAME.into(),
                model: model.into(),
                hint: format!("no such model in the Ollama library ({msg})"),
            },
            400..=499 => BackendError::Rejected { backend: NAME.into(), status, detail: msg },
            _ => BackendError::Failed { backend: NAME.into(), detail: format!("HTTP {status}: {msg}") },
        });
    }
    let mut body = Body::new(resp);
    let mut lines = LineSplitter::new();
    let mut success = false;
    let mut handle = |line: String| -> Result<(), BackendError> {
        let line = line.trim();
        if line.is_empty() {
            return Ok(());
        }
        let v: Value = serde_json::from_str(line).map_err(|e| BackendError::Failed {
            backend: NAME.into(),
            detail: format!("unreadable pull progress ({e}): {}", http::truncate(line, 200)),
        })?;
        if let Some(msg) = v.get("error").and_then(|e| http::json_message(&json!({ "error": e }))) {
            let lower = msg.to_lowercase();
            return Err(if lower.contains("file does not exist") || lower.contains("not found") {
                BackendError::ModelMissing {
                    backend: NAME.into(),
                    model: model.into(),
                    hint: format!("no such model in the Ollama library ({msg})"),
                }
            } else {
                BackendError::Failed { backend: NAME.into(), detail: msg }
            });
        }
        let p: PullProgress = serde_json::from_value(v).unwrap_or_default();
        if p.status == "success" {
            success = true;
        }
        progress(p);
        Ok(())
    };
    while let Some(chunk) = body.next(NAME, &never).await? {
        for line in lines.push(&chunk) {
            handle(line)?;
        }
    }
    if let Some(line) = lines.finish() {
        handle(line)?;
    }
    if success {
        Ok(())
    } else {
        Err(BackendError::Truncated {
            backend: NAME.into(),
            detail: format!("pulling {model} ended without `success`"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_resolve_like_ollama() {
        let r = |cfg: Option<&str>, env: Option<&str>| resolve_url_from(cfg, env);
        assert_eq!(r(None, None), "http://127.0.0.1:11434");
        assert_eq!(r(None, Some("")), "http://127.0.0.1:11434");
        assert_eq!(r(None, Some("0.0.0.0")), "http://127.0.0.1:11434");
        assert_eq!(r(None, Some("0.0.0.0:8080")), "http://127.0.0.1:8080");
        assert_eq!(r(None, Some("::")), "http://[::1]:11434");
        assert_eq!(r(None, Some("[::1]:9000")), "http://[::1]:9000");
        assert_eq!(r(None, Some("example.internal")), "http://example.internal:11434");
        assert_eq!(r(None, Some("gpu-box:11500")), "http://gpu-box:11500");
        assert_eq!(r(None, Some("http://10.0.0.5")), "http://10.0.0.5:80");
        assert_eq!(r(None, Some("https://ollama.example/")), "https://ollama.example:443");
        assert_eq!(r(None, Some("http://h:1234/prefix/")), "http://h:1234/prefix");
        assert_eq!(r(None, Some("h:notaport")), "http://h:11434");
        assert_eq!(r(Some("http://127.0.0.1:5000/"), Some("0.0.0.0")), "http://127.0.0.1:5000");
        assert_eq!(r(Some("  "), Some("127.0.0.1:7")), "http://127.0.0.1:7");
    }

    #[test]
    fn request_body_carries_options_and_keep_alive() {
        let cfg = OllamaConfig {
            url: Some("127.0.0.1:1".into()),
            keep_alive: Some("5m".into()),
            num_ctx: Some(8192),
            ..Default::default()
        };
        let b = OllamaBackend::new("o", &cfg).unwrap();
        let req = GenerateRequest {
            model: "gemma2:2b".into(),
            system: Some("sys".into()),
            prompt: "hi".into(),
            options: crate::GenOptions {
                max_tokens: Some(7),
                temperature: Some(0.0),
                top_p: Some(0.5),
                seed: Some(42),
                stop: vec!["\n".into()],
            },
            timeout: std::time::Duration::from_secs(1),
            task_id: "t".into(),
            task_kind: "general".into(),
            num_ctx: None,
            response_format: None,
        };
        let body = b.body(&req);
        assert_eq!(
            body,
            json!({
                "model": "gemma2:2b",
                "messages": [{"role":"system","content":"sys"},{"role":"user","content":"hi"}],
                "stream": true,
                "options": {"temperature": 0.0, "top_p": 0.5, "seed": 42, "num_predict": 7, "stop": ["\n"], "num_ctx": 8192},
                "keep_alive": "5m"
            })
        );
        assert_eq!(b.url(), "http://127.0.0.1:1");
        let per_type = crate::GenerateRequest { num_ctx: Some(32768), ..req };
        assert_eq!(b.body(&per_type)["options"]["num_ctx"], 32768, "the type's num_ctx wins");
    }

    #[test]
    fn context_warnings() {
        assert_eq!(context_warning(Some(8192), Some(100), 50), None);
        let w = context_warning(Some(8192), Some(8192), 50).unwrap();
        assert!(w.contains("num_ctx = 8192") && w.contains("8192 prompt tokens"), "{w}");
        assert!(context_warning(Some(8192), Some(10), 9000).is_some(), "a cached prompt still warns by its size");
        let w = context_warning(None, Some(4096), 6000).unwrap();
        assert!(w.contains("default"), "{w}");
        assert_eq!(context_warning(None, Some(12_000), 13_000), None, "the server runs a larger window");
        assert_eq!(context_warning(None, Some(100), 4000), None);
        assert!(context_warning(None, Some(4096), 10).is_some(), "the default window was filled");
    }
}
