//! `Client`: [`koubou_api::Api`] over HTTP, against a running `koubou serve`.
//!
//! Errors come back as the same [`ApiError`] the server sent (rebuilt from its JSON body), so a
//! caller cannot tell a local system from a remote one. The HTTP client is built like the
//! backends' ([`koubou_backend::http::ClientSetup`]): a server on loopback is reached directly
//! even when `HTTP_PROXY` / `ALL_PROXY` are set, a remote one through them unless `NO_PROXY`
//! names it, and `https://` works with the bundled and system roots.

use async_trait::async_trait;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use koubou_api::{
    Api, ApiError, EventFeed, EventStream, HealthView, ListQuery, Second, SubmitRequest, SubmitResponse, SystemInfo,
    SystemStatus, TaskList, TaskView, WorkersView,
};
use koubou_http::error::from_body;
use koubou_task::{Event, Limits, TaskId};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// An HTTP client for one server.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base_url: &str, token: Option<String>) -> Client {
        // With no `ca_file` and no configured proxy the setup cannot fail; fall back to a direct
        // client all the same rather than panic.
        let http = koubou_backend::http::ClientSetup::new(&Default::default())
            .ok()
            .and_then(|s| s.builder().build().ok())
            .unwrap_or_else(|| reqwest::Client::builder().no_proxy().build().unwrap_or_default());
        Client { base: base_url.trim_end_matches('/').to_owned(), token, http }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> ApiError {
        ApiError::Unavailable(format!("cannot reach koubou at {}: {e} (is `koubou serve` running?)", self.base))
    }

    async fn send<T: DeserializeOwned>(&self, r: reqwest::RequestBuilder) -> Result<T, ApiError> {
        let resp = r.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.map_err(|e| ApiError::Internal(format!("bad answer from server: {e}")))?;
        if status >= 400 {
            return Err(from_body(status, &body));
        }
        serde_json::from_value(body).map_err(|e| ApiError::Internal(format!("unexpected answer from server: {e}")))
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> Result<String, ApiError> {
        let r = self.req(reqwest::Method::GET, "/metrics").send().await.map_err(|e| self.unreachable(e))?;
        let status = r.status().as_u16();
        if status >= 400 {
            return Err(from_body(status, &r.json().await.unwrap_or(Value::Null)));
        }
        r.text().await.map_err(|e| ApiError::Internal(e.to_string()))
    }
}

fn submit_body(req: &SubmitRequest) -> Value {
    let t = &req.task;
    let mut v = serde_json::json!({ "type": t.kind, "prompt": t.prompt, "priority": t.priority });
    let o = v.as_object_mut().expect("object");
    let mut put = |k: &str, val: Value| {
        if !val.is_null() {
            o.insert(k.into(), val);
        }
    };
    put("system", serde_json::json!(t.system));
    put("model", serde_json::json!(t.model));
    put("backend", serde_json::json!(t.backend));
    put("max_attempts", serde_json::json!(t.max_attempts));
    put("timeout_secs", serde_json::json!(t.timeout_secs));
    put("idempotency_key", serde_json::json!(t.idempotency_key));
    put("wait_secs", serde_json::json!(req.wait_secs));
    if !t.options.is_default() {
        put("options", serde_json::json!(t.options));
    }
    if !t.metadata.is_empty() {
        put("metadata", Value::Object(t.metadata.clone()));
    }
    if !t.tags.is_empty() {
        put("tags", serde_json::json!(t.tags));
    }
    if t.json {
        put("json", Value::Bool(true));
    }
    put("schema", serde_json::json!(t.schema));
    if req.sync {
        put("sync", Value::Bool(true));
    }
    v
}

#[async_trait]
impl Api for Client {
    async fn submit(&self, req: SubmitRequest) -> Result<SubmitResponse, ApiError> {
        self.send(self.req(reqwest::Method::POST, "/task/delegate").json(&submit_body(&req))).await
    }
    async fn task(&self, id: TaskId) -> Result<TaskView, ApiError> {
        self.send(self.req(reqwest::Method::GET, &format!("/task/{id}/status"))).await
    }
    async fn tasks(&self, q: ListQuery) -> Result<TaskList, ApiError> {
        self.send(self.req(reqwest::Method::GET, "/tasks").query(&q)).await
    }
    async fn cancel(&self, id: TaskId) -> Result<TaskView, ApiError> {
        self.send(self.req(reqwest::Method::POST, &format!("/task/{id}/cancel"))).await
    }
    async fn workers(&self) -> Result<WorkersView, ApiError> {
        self.send(self.req(reqwest::Method::GET, "/workers/status")).await
    }
    async fn nodes(&self) -> Result<koubou_api::NodesView, ApiError> {
        self.send(self.req(reqwest::Method::GET, "/nodes")).await
    }
    async fn health(&self) -> Result<HealthView, ApiError> {
        self.send(self.req(reqwest::Method::GET, "/health")).await
    }
    async fn status(&self) -> Result<SystemStatus, ApiError> {
        self.send(self.req(reqwest::Method::GET, "/status")).await
    }
    async fn watch(&self, id: TaskId) -> Result<EventStream, ApiError> {
        let resp = self
            .req(reqwest::Method::GET, &format!("/task/{id}/events"))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        if status >= 400 {
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(from_body(status, &body));
        }
        let events = resp.bytes_stream().eventsource().filter_map(|e| async move {
            match e {
                Ok(ev) if ev.event == "error" => {
                    let body: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                    Some(Err(from_body(500, &body)))
                }
                Ok(ev) => serde_json::from_str::<Event>(&ev.data).ok().map(Ok),
                Err(e) => Some(Err(ApiError::Unavailable(format!("event stream broke: {e}")))),
            }
        });
        Ok(Box::pin(events))
    }

    /// Not served over HTTP: a client relays one task's events ([`Api::watch`]), not the
    /// whole stream.
    async fn events(&self, _after: Option<u64>) -> Result<EventFeed, ApiError> {
        Err(ApiError::Unavailable(format!(
            "{} does not relay its whole event stream over HTTP; watch one task, or use the WebSocket at /ws",
            self.base
        )))
    }
    async fn metrics_text(&self) -> Result<String, ApiError> {
        self.metrics().await
    }
    async fn info(&self) -> Result<SystemInfo, ApiError> {
        self.send(self.req(reqwest::Method::GET, "/system/info")).await
    }
    /// From the dashboard's metrics (`GET /dashboard/api/metrics`, whose `seconds` cover the
    /// last ten minutes).
    async fn history(&self, secs: usize) -> Result<Vec<Second>, ApiError> {
        #[derive(serde::Deserialize)]
        struct Metrics {
            seconds: Vec<Second>,
        }
        let m: Metrics = self.send(self.req(reqwest::Method::GET, "/dashboard/api/metrics")).await?;
        Ok(m.seconds.into_iter().filter(|s| s.within_last(secs)).collect())
    }
    /// The defaults: a client holds nothing to the server's limits (the server does, and says
    /// so in its errors).
    fn limits(&self) -> Limits {
        Limits::default()
    }
}
