//! [`ApiError`]: what went wrong, sorted by whose fault it is. Each face renders it its own way
//! (the HTTP crates pick a status and a JSON body; GraphQL sets `extensions.code`), from the
//! same [`ApiError::code`] and [`ApiError::retry_after`].

use koubou_task::FieldError;

/// What went wrong, sorted by whose fault it is.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ApiError {
    /// A field of the request is wrong (the caller's fault; HTTP 400).
    #[error("{0}")]
    Invalid(FieldError),
    /// No such task (HTTP 404).
    #[error("task {0} not found")]
    NotFound(String),
    /// The request does not fit the task's state (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The system cannot take work now: shutting down, queue unreachable (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// The request is fine but cannot be taken now, and nothing of it was stored; sending it
    /// again after `retry_after_secs` may succeed (HTTP 429 or 503 with `Retry-After`).
    #[error("{message}")]
    TryLater { why: Busy, message: String, retry_after_secs: u64 },
    /// Our fault (HTTP 500).
    #[error("{0}")]
    Internal(String),
}

/// Why a request must wait ([`ApiError::TryLater`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    /// `limits.max_pending` tasks are already waiting.
    QueueFull,
    /// The disk holding the queue is full.
    DiskFull,
    /// Another process holds the database locked.
    Locked,
}

impl Busy {
    pub const ALL: [Busy; 3] = [Busy::QueueFull, Busy::DiskFull, Busy::Locked];

    /// Its machine-readable code (`error.code` on the wire).
    pub fn code(self) -> &'static str {
        match self {
            Busy::QueueFull => "queue_full",
            Busy::DiskFull => "disk_full",
            Busy::Locked => "database_locked",
        }
    }

    /// The reason [`Busy::code`] names.
    pub fn from_code(code: &str) -> Option<Busy> {
        Busy::ALL.into_iter().find(|b| b.code() == code)
    }
}

impl ApiError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid(FieldError::new(field, message))
    }

    /// Seconds to wait before trying again, for errors that have one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::TryLater { retry_after_secs, .. } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// A short machine-readable code (`error.code` on the wire).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::TryLater { why, .. } => why.code(),
            ApiError::Internal(_) => "internal",
        }
    }

    /// The request field at fault, for [`ApiError::Invalid`].
    pub fn field(&self) -> Option<&str> {
        match self {
            ApiError::Invalid(f) => Some(&f.field),
            _ => None,
        }
    }
}
