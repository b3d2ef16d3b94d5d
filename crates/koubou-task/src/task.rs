//! The task record and its life cycle.
//!
//! ```text
//! pending ──claim──▶ running ──▶ completed
//!    ▲                  │  └───▶ failed      (attempts used up, or an error not worth retrying)
//!    │                  ├──────▶ cancelled   (also from pending / retrying)
//!    └──── retrying ◀───┘        (retryable error or lost lease; waits out its backoff)
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Millis, Priority, TaskId, TaskKind, WorkerId};

/// Where a task is in its life.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Pending,
    Running,
    /// Failed an attempt and waits out its backoff before it can be claimed again.
    Retrying,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Pending,
        TaskStatus::Running,
        TaskStatus::Retrying,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::Retrying => "retrying",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Completed, failed or cancelled: nothing will change it again.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled)
    }

    /// Waiting to be claimed (now or after a backoff).
    pub fn is_queued(self) -> bool {
        matches!(self, TaskStatus::Pending | TaskStatus::Retrying)
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tokens used by one generation, as the backend reported or counted them.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    /// Every prompt token the model read, cached or not.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Of the prompt tokens, those read from the provider's prompt cache, when it says
    /// (Anthropic's `cache_read_input_tokens`, OpenAI's `prompt_tokens_details.cached_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_tokens: Option<u64>,
    /// Of the prompt tokens, those written to the prompt cache (Anthropic's
    /// `cache_creation_input_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
}

impl Usage {
    /// Prompt and completion counts, no cache counts.
    pub const fn new(prompt_tokens: u64, completion_tokens: u64) -> Usage {
        Usage { prompt_tokens, completion_tokens, cache_read_tokens: None, cache_write_tokens: None }
    }
}

/// Sampling and length settings a task may carry; unset fields take the backend's defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

impl GenOptions {
    pub fn is_default(&self) -> bool {
        *self == GenOptions::default()
    }
}

/// What a client asks for. Validated by [`crate::validate`] before it reaches a queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewTask {
    pub kind: TaskKind,
    pub prompt: String,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub priority: Priority,
    /// Pins the model (else the router's choice for the kind).
    #[serde(default)]
    pub model: Option<String>,
    /// Pins the backend (else the router's choice for the kind).
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// A second submit with the same key returns the first task instead of a new one.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub options: GenOptions,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Labels (lower case). `confidential` keeps the task on local backends.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The answer must be JSON.
    #[serde(default)]
    pub json: bool,
    /// The answer must be JSON valid against this JSON Schema (implies `json`).
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
}

/// The tag that keeps a task on local backends.
pub const CONFIDENTIAL: &str = "confidential";

impl NewTask {
    pub fn new(kind: TaskKind, prompt: impl Into<String>) -> Self {
        NewTask {
            kind,
            prompt: prompt.into(),
            system: None,
            priority: Priority::DEFAULT,
            model: None,
            backend: None,
            max_attempts: None,
            timeout_secs: None,
            idempotency_key: None,
            options: GenOptions::default(),
            metadata: Default::default(),
            tags: vec![],
            json: false,
            schema: None,
        }
    }
}

/// The stored record of a task: everything a client can ask about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub kind: TaskKind,
    pub prompt: String,
    pub system: Option<String>,
    pub priority: Priority,
    pub status: TaskStatus,
    pub requested_model: Option<String>,
    pub requested_backend: Option<String>,
    /// Attempts started so far (a claim starts one).
    pub attempts: u32,
    pub max_attempts: u32,
    pub timeout_secs: Option<u64>,
    pub result: Option<String>,
    pub error: Option<String>,
    /// Output so far while running (flushed with heartbeats; live tokens travel on the bus).
    pub partial: Option<String>,
    /// The backend and model that served (or are serving) the task.
    pub backend: Option<String>,
    pub model: Option<String>,
    pub usage: Option<Usage>,
    pub worker_id: Option<WorkerId>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// While retrying: when the task may be claimed again.
    pub available_at: Millis,
    /// While running: when the lease runs out unless renewed.
    pub lease_until: Option<Millis>,
    pub idempotency_key: Option<String>,
    pub options: GenOptions,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// What the owner should know about the answer (e.g. the prompt did not fit the context
    /// window), as the backend said.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub json: bool,
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// Whether the backend that served (or is serving) it is remote: the prompt left the machine.
    #[serde(default)]
    pub remote: Option<bool>,
    /// What the answer cost at the serving backend's prices (unset when it has none).
    #[serde(default)]
    pub cost: Option<f64>,
}

impl Task {
    /// Tagged `confidential` (its type may also make it so; the router knows that).
    pub fn has_confidential_tag(&self) -> bool {
        self.tags.iter().any(|t| t.eq_ignore_ascii_case(CONFIDENTIAL))
    }

    /// A fresh pending task made from a submission.
    pub fn from_new(id: TaskId, new: NewTask, default_max_attempts: u32, now: Millis) -> Task {
        Task {
            id,
            kind: new.kind,
            prompt: new.prompt,
            system: new.system,
            priority: new.priority,
            status: TaskStatus::Pending,
            requested_model: new.model,
            requested_backend: new.backend,
            attempts: 0,
            max_attempts: new.max_attempts.unwrap_or(default_max_attempts).max(1),
            timeout_secs: new.timeout_secs,
            result: None,
            error: None,
            partial: None,
            backend: None,
            model: None,
            usage: None,
            worker_id: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            available_at: now,
            lease_until: None,
            idempotency_key: new.idempotency_key,
            options: new.options,
            metadata: new.metadata,
            warnings: Vec::new(),
            tags: new.tags,
            json: new.json || new.schema.is_some(),
            schema: new.schema,
            remote: None,
            cost: None,
        }
    }

    /// Wall time from submission to the end, once terminal.
    pub fn latency_ms(&self) -> Option<Millis> {
        self.finished_at.map(|f| f - self.created_at)
    }
}
