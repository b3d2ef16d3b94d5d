//! The OpenAI-compatible provider: `POST {base_url}/chat/completions` streamed as server-sent
//! events, and `GET {base_url}/models` for health checks.
//!
//! Why it exists: most local servers (LM Studio, vLLM, llama.cpp's server, llama-cpp-python) and
//! hosted APIs speak this one dialect. Real servers differ in ways that matter here (see
//! `shared/reference/openai-server.md`): some send no usage in streams, and a context overflow
//! or an interrupted request shows up only as a stream ending without `[DONE]` or without a
//! `finish_reason` — so this provider treats exactly that as a failure, never as an answer.
//! Hosted APIs differ in dialect (see `docs/backends.md`): how the key travels (`auth`), extra
//! `headers` and `query` parameters (Azure's `api-version`), whether `stream_options` is accepted
//! (`stream_usage`), what the token cap is called (`max_tokens_field`), and `extra_body`.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::config::{OpenAiConfig, client_options};
use crate::http::{self, Body, HEALTH_TIMEOUT};
use crate::sse::SseParser;
use crate::{
    Backend, BackendError, CancellationToken, GenerateRequest, Generation, Health, ResponseFormat, TokenSink, Usage,
};

/// A server speaking OpenAI's chat-completions API.
pub struct OpenAiBackend {
    name: String,
    base_url: String,
    credentials: http::Credentials,
    model: String,
    concurrency: usize,
    stream_usage: bool,
    max_tokens_field: String,
    extra_body: Map<String, Value>,
    client: http::Pool,
}

impl OpenAiBackend {
    /// Fails when the table cannot work: a bad header, `ca_file` or `proxy`.
    pub fn new(name: impl Into<String>, cfg: &OpenAiConfig) -> Result<Self, BackendError> {
        let name = name.into();
        let base_url = cfg.base_url.trim().trim_end_matches('/').to_owned();
        let credentials = http::Credentials::new(
            &name,
            http::CredentialConfig {
                auth: cfg.auth,
                api_key: &cfg.api_key,
                api_key_env: &cfg.api_key_env,
                headers: &cfg.headers,
                query: &cfg.query,
            },
        )?;
        let field = cfg.max_tokens_field.trim();
        if field.is_empty() {
            return Err(BackendError::Config {
                backend: name,
                detail: "max_tokens_field is empty; use \"max_tokens\" or \"max_completion_tokens\"".into(),
            });
        }
        let client = http::Pool::new(&name, &client_options(&cfg.ca_file, &cfg.proxy), &base_url)?;
        Ok(OpenAiBackend {
            name,
            base_url,
            credentials,
            model: cfg.model.clone(),
            concurrency: cfg.concurrency.max(1),
            stream_usage: cfg.stream_usage,
            max_tokens_field: field.to_owned(),
            extra_body: cfg.extra_body.clone(),
            client,
        })
    }

    fn body(&self, req: &GenerateRequest) -> Value {
        let mut messages = Vec::new();
        if let Some(s) = req.system.as_deref().filter(|s| !s.is_empty()) {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": req.prompt}));
        let mut body = Value::Object(self.extra_body.clone());
        body["model"] = json!(req.model);
        body["messages"] = json!(messages);
        body["stream"] = json!(true);
        if self.stream_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let o = &req.options;
        if let Some(n) = o.max_tokens {
            body[self.max_tokens_field.as_str()] = json!(n);
        }
        if let Some(t) = o.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(p) = o.top_p {
            body["top_p"] = json!(p);
        }
        if let Some(s) = o.seed {
            body["seed"] = json!(s);
        }
        if !o.stop.is_empty() {
            body["stop"] = json!(o.stop);
        }
        match &req.response_format {
            Some(ResponseFormat::Json) => body["response_format"] = json!({"type": "json_object"}),
            // Not `strict`: OpenAI's strict mode refuses (400) any schema that does not close
            // every object (`additionalProperties: false`, every property required). The router
            // checks the answer against the schema whatever the server did.
            Some(ResponseFormat::Schema(s)) => {
                body["response_format"] =
                    json!({"type": "json_schema", "json_schema": {"name": crate::format::schema_name(s), "schema": s}});
            }
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
        let about_model = lower.contains("model")
            && (lower.contains("not found") || lower.contains("does not exist") || lower.contains("not exist"));
        match status {
            404 if about_model || lower.contains("model_not_found") => BackendError::ModelMissing {
                backend: self.name.clone(),
                model: model.to_owned(),
                hint: format!("the server does not serve it; `GET {}/models` lists what it has ({msg})", self.base_url),
            },
            404 => BackendError::Rejected {
                backend: self.name.clone(),
                status,
                detail: format!("{msg} (is `base_url` right? it must include the `/v1` prefix: {})", self.base_url),
            },
            401 | 403 => BackendError::Rejected {
                backend: self.name.clone(),
                status,
                detail: format!("{msg} (check the API key and `auth`; sent: {})", self.credentials.source),
            },
            500..=599 => BackendError::Failed { backend: self.name.clone(), detail: format!("HTTP {status}: {msg}") },
            400..=499 => BackendError::Rejected { backend: self.name.clone(), status, detail: msg },
            _ => {
                BackendError::Failed { backend: self.name.clone(), detail: format!("unexpected HTTP {status}: {msg}") }
            }
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Chunk {
    model: Option<String>,
    choices: Vec<Choice>,
    usage: Option<WireUsage>,
    error: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Choice {
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Delta {
    content: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WireUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PromptDetails {
    cached_tokens: Option<u64>,
}

#[async_trait]
impl Backend for OpenAiBackend {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "openai"
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
        let url = format!("{}/models", self.base_url);
        let rb = self.credentials.apply(self.client.get().get(&url)).timeout(HEALTH_TIMEOUT);
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Health::down(format!("{url} did not answer within {HEALTH_TIMEOUT:?}")),
            Err(e) => return Health::down(format!("{url} is unreachable: {}", http::describe(&e))),
        };
        let status = resp.status();
        let text = match tokio::time::timeout(HEALTH_TIMEOUT, resp.text()).await {
            Ok(Ok(t)) => t,
            _ => return Health::down(format!("{url}: the body did not arrive")),
        };
        if status.as_u16() == 401 || status.as_u16() == 403 {
            return Health::down(format!(
                "{url} refused the key (HTTP {status}; sent: {}): {}",
                self.credentials.source,
                http::message_of(&text)
            ));
        }
        if status.as_u16() == 404 {
            // Some servers (Azure's deployment URLs) have no model list; they answered, so they are up.
            return Health::up(
                format!("{} at {}; no model list at /models (HTTP 404)", self.kind(), self.base_url),
                vec![],
            );
        }
        if !status.is_success() {
            return Health::down(format!("{url} answered HTTP {status}: {}", http::message_of(&text)));
        }
        let models: Vec<String> = match serde_json::from_str::<Value>(&text) {
            Ok(v) => v["data"]
                .as_array()
                .map(|a| a.iter().filter_map(|m| m["id"].as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
            Err(_) => return Health::down(format!("{url} did not answer JSON")),
        };
        Health::up(format!("{} at {}; {} model(s)", self.kind(), self.base_url, models.len()), models)
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

impl OpenAiBackend {
    /// One generation, streamed (see [`http::Pool::check`] for why this is wrapped).
    async fn stream_answer(
        &self,
        req: GenerateRequest,
        sink: &dyn TokenSink,
        cancel: CancellationToken,
    ) -> Result<Generation, BackendError> {
        http::check_url(&self.name, &self.base_url)?;
        let url = format!("{}/chat/completions", self.base_url);
        let rb = self
            .credentials
            .apply(self.client.get().post(&url))
            .header("accept", "text/event-stream")
            .json(&self.body(&req));
        let resp = self.client.send(&self.name, &url, rb, &cancel, "is the server running?").await?;
        if !resp.status().is_success() {
            let refusal = http::Refusal::read(resp, &cancel).await?;
            return Err(self.err_status(refusal, &req.model));
        }
        let mut body = Body::new(resp);
        let mut parser = SseParser::new();
        let mut text = String::new();
        let mut model = req.model.clone();
        let mut deltas = 0u64;
        let mut usage: Option<Usage> = None;
        let mut finish: Option<String> = None;
        let mut done = false;
        let truncated = |detail: String| BackendError::Truncated { backend: self.name.clone(), detail };
        let mut handle = |data: &str, at_end: bool| -> Result<bool, BackendError> {
            let data = data.trim();
            if data == "[DONE]" {
                return Ok(true);
            }
            if data.is_empty() {
                return Ok(false);
            }
            let chunk: Chunk = match serde_json::from_str(data) {
                Ok(c) => c,
                Err(_) if at_end => return Err(truncated("the stream ended in the middle of an event".into())),
                Err(e) => {
                    return Err(BackendError::Failed {
                        backend: self.name.clone(),
                        detail: format!("unreadable stream event ({e}): {}", http::truncate(data, 200)),
                    });
                }
            };
            if let Some(err) = &chunk.error {
                let msg = http::json_message(&json!({ "error": err })).unwrap_or_else(|| err.to_string());
                return Err(BackendError::Failed { backend: self.name.clone(), detail: msg });
            }
            if let Some(m) = chunk.model.filter(|m| !m.is_empty()) {
                model = m;
            }
            if let Some(u) = chunk.usage {
                usage = Some(Usage {
                    cache_read_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
                    ..Usage::new(u.prompt_tokens, u.completion_tokens)
                });
            }
            if let Some(choice) = chunk.choices.into_iter().next() {
                if let Some(c) = choice.delta.and_then(|d| d.content).filter(|c| !c.is_empty()) {
                    sink.token(&c);
                    text.push_str(&c);
                    deltas += 1;
                }
                if let Some(f) = choice.finish_reason.filter(|f| !f.is_empty()) {
                    finish = Some(f);
                }
            }
            Ok(false)
        };
        'read: while let Some(chunk) = body.next(&self.name, &cancel).await? {
            for ev in parser.push(&chunk) {
                if handle(&ev.data, false)? {
                    done = true;
                    break 'read;
                }
            }
        }
        if !done && let Some(ev) = parser.finish() {
            done = handle(&ev.data, true)?;
        }
        let chars = text.chars().count();
        let Some(finish_reason) = finish else {
            return Err(truncated(format!(
                "no finish_reason after {chars} characters ({}); the prompt may exceed the context, or the request was interrupted",
                if done { "got [DONE]" } else { "no [DONE] either" }
            )));
        };
        if !done {
            return Err(truncated(format!("no [DONE] after {chars} characters (finish_reason {finish_reason})")));
        }
        Ok(Generation { text, usage: usage.unwrap_or(Usage::new(0, deltas)), model, finish_reason, warnings: vec![] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_body() {
        let b =
            OpenAiBackend::new("o", &OpenAiConfig { base_url: "http://127.0.0.1:1/v1/".into(), ..Default::default() })
                .unwrap();
        assert_eq!(b.base_url, "http://127.0.0.1:1/v1");
        let req = GenerateRequest {
            model: "m".into(),
            system: None,
            prompt: "hi".into(),
            options: crate::GenOptions {
                max_tokens: Some(3),
                seed: Some(1),
                stop: vec!["x".into()],
                ..Default::default()
            },
            timeout: std::time::Duration::from_secs(1),
            task_id: "t".into(),
            task_kind: "general".into(),
            num_ctx: None,
            response_format: None,
        };
        assert_eq!(
            b.body(&req),
            json!({"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,
                   "stream_options":{"include_usage":true},"max_tokens":3,"seed":1,"stop":["x"]})
        );
    }

    #[test]
    fn dialect_options_shape_the_body() {
        let cfg = OpenAiConfig {
            stream_usage: false,
            max_tokens_field: "max_completion_tokens".into(),
            extra_body: serde_json::from_value(json!({"temperature": 0.5, "reasoning_effort": "low", "stream": false}))
                .unwrap(),
            ..Default::default()
        };
        let b = OpenAiBackend::new("o", &cfg).unwrap();
        let mut req = crate::GenerateRequest {
            model: "m".into(),
            system: None,
            prompt: "hi".into(),
            options: crate::GenOptions { max_tokens: Some(9), ..Default::default() },
            timeout: std::time::Duration::from_secs(1),
            task_id: "t".into(),
            task_kind: "general".into(),
            num_ctx: None,
            response_format: None,
        };
        let body = b.body(&req);
        assert_eq!(body["max_completion_tokens"], 9);
        assert!(body.get("max_tokens").is_none() && body.get("stream_options").is_none(), "{body}");
        assert_eq!((body["reasoning_effort"].clone(), body["stream"].clone()), (json!("low"), json!(true)));
        assert_eq!(body["temperature"], 0.5, "extra_body gives defaults");
        req.options.temperature = Some(0.0);
        assert_eq!(b.body(&req)["temperature"], 0.0, "a task's own setting wins");
        let bad = OpenAiConfig { max_tokens_field: " ".into(), ..Default::default() };
        assert!(matches!(OpenAiBackend::new("o", &bad), Err(BackendError::Config { .. })));
    }
}
