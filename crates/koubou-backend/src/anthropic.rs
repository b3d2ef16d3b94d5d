//! The Anthropic provider: `POST {base_url}/v1/messages` streamed as server-sent events, and
//! `GET {base_url}/v1/models` for health checks.
//!
//! Why it exists: Anthropic's API speaks its own dialect (the Messages API: `x-api-key` and
//! `anthropic-version` headers, a required `max_tokens`, typed stream events), and Ollama,
//! llama.cpp's server and LM Studio serve it too. The stream is trusted only when it ends with
//! `message_stop`: one that just stops is a truncated answer, never a complete one; an `error`
//! event mid-stream (`overloaded_error`) is a failure worth retrying, like HTTP 529.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::config::{AnthropicConfig, client_options};
use crate::http::{self, Body, HEALTH_TIMEOUT};
use crate::sse::SseParser;
use crate::{Backend, BackendError, CancellationToken, GenerateRequest, Generation, Health, TokenSink, Usage};

const UNREACHABLE_HINT: &str = "is the server running, and is `base_url` right?";

/// A server speaking Anthropic's Messages API.
pub struct AnthropicBackend {
    name: String,
    /// Without `/v1`.
    base_url: String,
    credentials: http::Credentials,
    version: String,
    model: String,
    max_tokens: u32,
    concurrency: usize,
    extra_body: Map<String, Value>,
    client: http::Pool,
}

impl AnthropicBackend {
    /// Fails when the table cannot work: a bad header, `ca_file` or `proxy`.
    pub fn new(name: impl Into<String>, cfg: &AnthropicConfig) -> Result<Self, BackendError> {
        let name = name.into();
        let trimmed = cfg.base_url.trim().trim_end_matches('/');
        // Accept the base URL with or without `/v1` (SDKs want it without, OpenAI-style configs with).
        let base_url = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_owned();
        let no_query = std::collections::BTreeMap::new();
        let credentials = http::Credentials::new(
            &name,
            http::CredentialConfig {
                auth: cfg.auth,
                api_key: &cfg.api_key,
                api_key_env: &cfg.api_key_env,
                headers: &cfg.headers,
                query: &no_query,
            },
        )?;
        if cfg.max_tokens == 0 {
            return Err(BackendError::Config { backend: name, detail: "max_tokens must be at least 1".into() });
        }
        let client = http::Pool::new(&name, &client_options(&cfg.ca_file, &cfg.proxy), &base_url)?;
        Ok(AnthropicBackend {
            name,
            base_url,
            credentials,
            version: cfg.anthropic_version.trim().to_owned(),
            model: cfg.model.clone(),
            max_tokens: cfg.max_tokens,
            concurrency: cfg.concurrency.max(1),
            extra_body: cfg.extra_body.clone(),
            client,
        })
    }

    fn request(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let rb = self.credentials.apply(rb);
        if self.version.is_empty() { rb } else { rb.header("anthropic-version", &self.version) }
    }

    fn body(&self, req: &GenerateRequest) -> Value {
        let mut body = Value::Object(self.extra_body.clone());
        let o = &req.options;
        body["model"] = json!(req.model);
        body["max_tokens"] = json!(o.max_tokens.unwrap_or(self.max_tokens));
        body["messages"] = json!([{"role": "user", "content": req.prompt}]);
        body["stream"] = json!(true);
        if let Some(s) = req.system.as_deref().filter(|s| !s.is_empty()) {
            body["system"] = json!(s);
        }
        if let Some(t) = o.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(p) = o.top_p {
            body["top_p"] = json!(p);
        }
        if !o.stop.is_empty() {
            body["stop_sequences"] = json!(o.stop);
        }
        body
    }

    fn err_status(&self, refusal: http::Refusal, model: &str) -> BackendError {
        if let Some(limited) = refusal.rate_limited(&self.name) {
            return limited;
        }
        let http::Refusal { status, message: msg, .. } = refusal;
        let lower = msg.to_lowercase();
        match status {
            404 if lower.contains("model") => BackendError::ModelMissing {
                backend: self.name.clone(),
                model: model.to_owned(),
                hint: format!(
                    "the server does not serve it; `GET {}/v1/models` lists what it has ({msg})",
                    self.base_url
                ),
            },
            404 => BackendError::Rejected {
                backend: self.name.clone(),
                status,
                detail: format!("{msg} (is `base_url` right? requests go to {}/v1/messages)", self.base_url),
            },
            401 | 403 => BackendError::Rejected {
                backend: self.name.clone(),
                status,
                detail: format!("{msg} (check the API key and `auth`; sent: {})", self.credentials.source),
            },
            400..=499 => BackendError::Rejected { backend: self.name.clone(), status, detail: msg },
            _ => BackendError::Failed { backend: self.name.clone(), detail: format!("HTTP {status}: {msg}") },
        }
    }

    /// An `error` event in the stream: overloaded or rate-limited is [`BackendError::RateLimited`]
    /// (the same as HTTP 529 / 429), anything else a retryable failure.
    fn stream_error(&self, err: &Value) -> BackendError {
        let kind = err["type"].as_str().unwrap_or("error");
        let msg = err["message"].as_str().map_or_else(|| err.to_string(), str::to_owned);
        let detail = format!("{kind} mid-stream: {msg}");
        match kind {
            "overloaded_error" => {
                BackendError::RateLimited { backend: self.name.clone(), status: 529, retry_after: None, detail }
            }
            "rate_limit_error" => {
                BackendError::RateLimited { backend: self.name.clone(), status: 429, retry_after: None, detail }
            }
            _ => BackendError::Failed { backend: self.name.clone(), detail },
        }
    }
}

/// Anthropic's stop reasons in the words the rest of Koubou uses (OpenAI's).
fn finish_reason(stop: &str) -> String {
    match stop {
        "end_turn" | "stop_sequence" => "stop",
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        other => other,
    }
    .to_owned()
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(default)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Later counts (`message_delta`'s) replace earlier ones field by field.
    fn update(&mut self, newer: WireUsage) {
        self.input_tokens = newer.input_tokens.or(self.input_tokens);
        self.output_tokens = newer.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens = newer.cache_creation_input_tokens.or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = newer.cache_read_input_tokens.or(self.cache_read_input_tokens);
    }

    /// `prompt_tokens` counts every prompt token, cached or not (Anthropic's `input_tokens`
    /// counts only the uncached ones).
    fn usage(self, deltas: u64) -> Usage {
        let (read, write) = (self.cache_read_input_tokens, self.cache_creation_input_tokens);
        let prompt = self.input_tokens.unwrap_or(0) + read.unwrap_or(0) + write.unwrap_or(0);
        Usage {
            cache_read_tokens: read,
            cache_write_tokens: write,
            ..Usage::new(prompt, self.output_tokens.unwrap_or(deltas))
        }
    }
}

/// What the stream has said so far.
#[derive(Default)]
struct StreamState {
    text: String,
    model: Option<String>,
    usage: WireUsage,
    deltas: u64,
    stop_reason: Option<String>,
    stopped: bool,
}

impl StreamState {
    /// Handles one event's data; `Err` for an `error` event or unreadable data.
    fn event(&mut self, b: &AnthropicBackend, data: &str, sink: &dyn TokenSink) -> Result<(), BackendError> {
        let data = data.trim();
        if data.is_empty() {
            return Ok(());
        }
        let v: Value = serde_json::from_str(data).map_err(|e| BackendError::Failed {
            backend: b.name.clone(),
            detail: format!("unreadable stream event ({e}): {}", http::truncate(data, 200)),
        })?;
        let usage_of = |u: &Value| serde_json::from_value::<WireUsage>(u.clone()).unwrap_or_default();
        match v["type"].as_str().unwrap_or_default() {
            "message_start" => {
                let m = &v["message"];
                self.model = m["model"].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
                self.usage.update(usage_of(&m["usage"]));
            }
            "content_block_start" => {
                let block = &v["content_block"];
                if block["type"] == "text" {
                    self.emit(block["text"].as_str().unwrap_or_default(), sink);
                }
            }
            "content_block_delta" => {
                let d = &v["delta"];
                if d["type"] == "text_delta" {
                    self.emit(d["text"].as_str().unwrap_or_default(), sink);
                }
            }
            "message_delta" => {
                if let Some(r) = v["delta"]["stop_reason"].as_str() {
                    self.stop_reason = Some(r.to_owned());
                }
                self.usage.update(usage_of(&v["usage"]));
            }
            "message_stop" => self.stopped = true,
            "error" => return Err(b.stream_error(&v["error"])),
            _ => {} // ping, content_block_stop, and events added later
        }
        Ok(())
    }

    fn emit(&mut self, text: &str, sink: &dyn TokenSink) {
        if !text.is_empty() {
            sink.token(text);
            self.text.push_str(text);
            self.deltas += 1;
        }
    }
}

#[async_trait]
impl Backend for AnthropicBackend {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "anthropic"
    }
    fn default_model(&self) -> &str {
        &self.model
    }
    fn capacity(&self) -> usize {
        self.concurrency
    }

    async fn health(&self) -> Health {
        if let Err(e) = http::check_url(&self.name, &self.base_url) {
            return Health::down(e.to_string());
        }
        let url = format!("{}/v1/models", self.base_url);
        let rb = self.request(self.client.get().get(&url)).timeout(HEALTH_TIMEOUT);
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Health::down(format!("{url} did not answer within {HEALTH_TIMEOUT:?}")),
            Err(e) => return Health::down(format!("{url} is unreachable: {}", http::describe(&e))),
        };
        let status = resp.status().as_u16();
        let text = match tokio::time::timeout(HEALTH_TIMEOUT, resp.text()).await {
            Ok(Ok(t)) => t,
            _ => return Health::down(format!("{url}: the body did not arrive")),
        };
        match status {
            401 | 403 => Health::down(format!(
                "{url} refused the key (HTTP {status}; sent: {}): {}",
                self.credentials.source,
                http::message_of(&text)
            )),
            404 => {
                Health::up(format!("anthropic at {}; no model list at /v1/models (HTTP 404)", self.base_url), vec![])
            }
            200..=299 => {
                let models: Vec<String> = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| {
                        v["data"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|m| m["id"].as_str().map(str::to_owned)).collect())
                    })
                    .unwrap_or_default();
                Health::up(format!("anthropic at {}; {} model(s)", self.base_url, models.len()), models)
            }
            _ => Health::down(format!("{url} answered HTTP {status}: {}", http::message_of(&text))),
        }
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

impl AnthropicBackend {
    async fn stream_answer(
        &self,
        req: GenerateRequest,
        sink: &dyn TokenSink,
        cancel: CancellationToken,
    ) -> Result<Generation, BackendError> {
        http::check_url(&self.name, &self.base_url)?;
        let url = format!("{}/v1/messages", self.base_url);
        let rb =
            self.request(self.client.get().post(&url)).header("accept", "text/event-stream").json(&self.body(&req));
        let resp = self.client.send(&self.name, &url, rb, &cancel, UNREACHABLE_HINT).await?;
        if !resp.status().is_success() {
            let refusal = http::Refusal::read(resp, &cancel).await?;
            return Err(self.err_status(refusal, &req.model));
        }
        let mut body = Body::new(resp);
        let mut parser = SseParser::new();
        let mut st = StreamState::default();
        'read: while let Some(chunk) = body.next(&self.name, &cancel).await? {
            for ev in parser.push(&chunk) {
                st.event(self, &ev.data, sink)?;
                if st.stopped {
                    break 'read;
                }
            }
        }
        if !st.stopped
            && let Some(ev) = parser.finish()
        {
            // A last event cut mid-JSON is a truncated stream, not a protocol error.
            if serde_json::from_str::<Value>(ev.data.trim()).is_ok() {
                st.event(self, &ev.data, sink)?;
            }
        }
        if !st.stopped {
            return Err(BackendError::Truncated {
                backend: self.name.clone(),
                detail: format!(
                    "no message_stop after {} characters (stop reason: {})",
                    st.text.chars().count(),
                    st.stop_reason.as_deref().unwrap_or("none")
                ),
            });
        }
        Ok(Generation {
            usage: st.usage.usage(st.deltas),
            model: st.model.unwrap_or(req.model),
            finish_reason: finish_reason(st.stop_reason.as_deref().unwrap_or("end_turn")),
            text: st.text,
            warnings: vec![],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(cfg: AnthropicConfig) -> AnthropicBackend {
        AnthropicBackend::new("a", &cfg).unwrap()
    }

    #[test]
    fn base_url_with_or_without_v1() {
        let b = |u: &str| backend(AnthropicConfig { base_url: u.into(), ..Default::default() }).base_url;
        assert_eq!(b("http://127.0.0.1:11434"), "http://127.0.0.1:11434");
        assert_eq!(b("http://127.0.0.1:11434/v1/"), "http://127.0.0.1:11434");
        assert_eq!(b("https://api.anthropic.com/"), "https://api.anthropic.com");
    }

    #[test]
    fn request_body() {
        let b = backend(AnthropicConfig {
            max_tokens: 1000,
            extra_body: serde_json::from_value(json!({"metadata": {"user_id": "u"}, "temperature": 1.0})).unwrap(),
            ..Default::default()
        });
        let mut req = GenerateRequest {
            model: "claude-x".into(),
            system: Some("be brief".into()),
            prompt: "hi".into(),
            options: crate::GenOptions { temperature: Some(0.2), stop: vec!["END".into()], ..Default::default() },
            timeout: std::time::Duration::from_secs(1),
            task_id: "t".into(),
            task_kind: "general".into(),
            num_ctx: None,
            response_format: None,
        };
        assert_eq!(
            b.body(&req),
            json!({"model": "claude-x", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}],
                   "stream": true, "system": "be brief", "temperature": 0.2f32, "stop_sequences": ["END"],
                   "metadata": {"user_id": "u"}})
        );
        req.options.max_tokens = Some(5);
        assert_eq!(b.body(&req)["max_tokens"], 5);
    }

    #[test]
    fn stop_reasons() {
        let cases =
            [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls")];
        for (wire, ours) in cases {
            assert_eq!(finish_reason(wire), ours);
        }
        assert_eq!(finish_reason("pause_turn"), "pause_turn");
    }

    #[test]
    fn usage_counts_cached_prompt_tokens_too() {
        let mut u = WireUsage { input_tokens: Some(10), output_tokens: Some(1), ..Default::default() };
        u.update(WireUsage {
            output_tokens: Some(7),
            cache_read_input_tokens: Some(100),
            cache_creation_input_tokens: Some(20),
            ..Default::default()
        });
        let usage = u.usage(0);
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (130, 7));
        assert_eq!((usage.cache_read_tokens, usage.cache_write_tokens), (Some(100), Some(20)));
        assert_eq!(WireUsage::default().usage(3), Usage::new(0, 3));
    }
}
