//! Rules for a submission, shared by every face so that REST, WebSocket, GraphQL and MCP reject
//! the same input with the same words.

use serde::Serialize;

/// A rejected field: which one, and why, in words a user can act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

/// Size limits on a submission (config: `[limits]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest prompt (plus system prompt) in bytes.
    pub max_prompt_bytes: usize,
    /// Largest `max_attempts` a client may ask for.
    pub max_attempts_cap: u32,
    /// Longest `timeout_secs` a client may ask for.
    pub max_timeout_secs: u64,
    /// Largest metadata object, serialized, in bytes (also the bound on a `schema`).
    pub max_metadata_bytes: usize,
    /// Most tasks waiting to run (pending or retrying); a submission beyond it is refused (429
    /// with `Retry-After`) and nothing already accepted is dropped.
    pub max_pending: u64,
    /// Largest answer a backend may produce, in bytes: one that streams more is stopped (a child
    /// process's whole group is killed) and the task fails "output too large". The partial
    /// answer kept while it runs never exceeds it either.
    pub max_result_bytes: usize,
    // What the faces let in before a submission exists (enforced by `koubou-http` and
    // `koubou-live`; see `Limits::body_bytes` and `Limits::ws_message_bytes`).
    /// Largest HTTP request body on any port, in bytes (never below a prompt at its limit).
    pub max_body_bytes: usize,
    /// Largest WebSocket message, in bytes (never below a prompt at its limit).
    pub max_ws_message_bytes: usize,
    /// WebSocket connections open at once on one port.
    pub max_ws_connections: usize,
    /// Deepest field nesting a GraphQL document may have.
    pub graphql_max_depth: usize,
    /// Most fields a GraphQL document may select, fragments expanded.
    pub graphql_max_complexity: usize,
    /// Most aliased fields a GraphQL document may have, fragments expanded.
    pub graphql_max_aliases: usize,
    /// Requests per second one client IP may make on average (0 = no rate limit).
    pub rate_limit_per_sec: u32,
    /// Requests one client IP may make at once before the rate applies.
    pub rate_limit_burst: u32,
}

/// Most tags on one task.
pub const MAX_TAGS: usize = 16;
/// Longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = 64;

/// Checks one tag: 1 to 64 bytes of `a-z`, `0-9`, `.`, `_`, `:`, `-`, starting with a letter or
/// digit (faces lower-case what clients send before checking).
pub fn check_tag(tag: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | ':' | '-');
    if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
        return Err(format!("each tag must be 1 to {MAX_TAG_BYTES} bytes, got {tag:?}"));
    }
    if !tag.starts_with(|c: char| c.is_ascii_alphanumeric()) || !tag.chars().all(ok_char) {
        return Err(format!(
            "{tag:?} is not a tag: use lower-case letters, digits and . _ : - (starting with a letter or digit)"
        ));
    }
    Ok(())
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_prompt_bytes: 1 << 20,
            max_attempts_cap: 20,
            max_timeout_secs: 24 * 3600,
            max_metadata_bytes: 64 << 10,
            max_pending: 10_000,
            max_result_bytes: 4 << 20,
            max_body_bytes: (1 << 20) + (256 << 10),
            max_ws_message_bytes: (1 << 20) + (256 << 10),
            max_ws_connections: 256,
            graphql_max_depth: 20,
            graphql_max_complexity: 500,
            graphql_max_aliases: 30,
            rate_limit_per_sec: 0,
            rate_limit_burst: 50,
        }
    }
}

/// Room a request or message needs beyond its prompt (system prompt aside: JSON, metadata).
const ENVELOPE_BYTES: usize = 256 << 10;

impl Limits {
    /// The body limit the faces enforce: `max_body_bytes`, but never less than a prompt at
    /// `max_prompt_bytes` needs, so raising the prompt limit alone keeps prompts sendable.
    pub fn body_bytes(&self) -> usize {
        self.max_body_bytes.max(self.max_prompt_bytes.saturating_add(ENVELOPE_BYTES))
    }

    /// The WebSocket message limit, by the same rule as [`Limits::body_bytes`].
    pub fn ws_message_bytes(&self) -> usize {
        self.max_ws_message_bytes.max(self.max_prompt_bytes.saturating_add(ENVELOPE_BYTES))
    }

    /// Checks a submission against the limits (type names are checked by the router).
    pub fn check(&self, t: &crate::NewTask) -> Result<(), FieldError> {
        if t.prompt.trim().is_empty() {
            return Err(FieldError::new("prompt", "must not be empty"));
        }
        let size = t.prompt.len() + t.system.as_ref().map_or(0, String::len);
        if size > self.max_prompt_bytes {
            return Err(FieldError::new(
                "prompt",
                format!("is {size} bytes; the limit is {} bytes (limits.max_prompt_bytes)", self.max_prompt_bytes),
            ));
        }
        if let Some(n) = t.max_attempts
            && (n == 0 || n > self.max_attempts_cap)
        {
            return Err(FieldError::new(
                "max_attempts",
                format!("must be from 1 to {}, got {n}", self.max_attempts_cap),
            ));
        }
        if let Some(s) = t.timeout_secs
            && (s == 0 || s > self.max_timeout_secs)
        {
            return Err(FieldError::new(
                "timeout_secs",
                format!("must be from 1 to {}, got {s}", self.max_timeout_secs),
            ));
        }
        if let Some(k) = &t.idempotency_key
            && (k.is_empty() || k.len() > 256)
        {
            return Err(FieldError::new("idempotency_key", "must be 1 to 256 bytes"));
        }
        for (field, v) in [("model", &t.model), ("backend", &t.backend)] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > 256)
            {
                return Err(FieldError::new(field, "must be 1 to 256 bytes"));
            }
            if let Some(v) = v
                && v.starts_with('-')
            {
                return Err(FieldError::new(field, format!("must not start with '-' (got {v:?})")));
            }
        }
        let o = &t.options;
        if let Some(v) = o.temperature
            && !(0.0..=5.0).contains(&v)
        {
            return Err(FieldError::new("options.temperature", format!("must be from 0 to 5, got {v}")));
        }
        if let Some(v) = o.top_p
            && !(v > 0.0 && v <= 1.0)
        {
            return Err(FieldError::new("options.top_p", format!("must be in (0, 1], got {v}")));
        }
        if o.max_tokens == Some(0) {
            return Err(FieldError::new("options.max_tokens", "must be at least 1"));
        }
        if o.stop.len() > 16 || o.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(FieldError::new("options.stop", "at most 16 strings of 1 to 256 bytes"));
        }
        if t.tags.len() > MAX_TAGS {
            return Err(FieldError::new("tags", format!("at most {MAX_TAGS} tags, got {}", t.tags.len())));
        }
        for tag in &t.tags {
            check_tag(tag).map_err(|m| FieldError::new("tags", m))?;
        }
        if let Some(s) = &t.schema {
            let n = serde_json::to_vec(s).map_or(0, |v| v.len());
            if n > self.max_metadata_bytes {
                return Err(FieldError::new(
                    "schema",
                    format!(
                        "is {n} bytes serialized; the limit is {} (limits.max_metadata_bytes)",
                        self.max_metadata_bytes
                    ),
                ));
            }
        }
        if !t.metadata.is_empty() {
            let n = serde_json::to_vec(&t.metadata).map_or(0, |v| v.len());
            if n > self.max_metadata_bytes {
                return Err(FieldError::new(
                    "metadata",
                    format!("is {n} bytes serialized; the limit is {}", self.max_metadata_bytes),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewTask, TaskKind};

    #[test]
    fn transport_limits_never_shut_out_a_prompt_at_its_limit() {
        let mut l = Limits::default();
        assert_eq!((l.body_bytes(), l.ws_message_bytes()), (l.max_body_bytes, l.max_ws_message_bytes));
        l.max_prompt_bytes = 8 << 20;
        assert_eq!(l.body_bytes(), (8 << 20) + ENVELOPE_BYTES);
        l.max_body_bytes = 64 << 20;
        assert_eq!(l.body_bytes(), 64 << 20);
        assert_eq!(l.ws_message_bytes(), (8 << 20) + ENVELOPE_BYTES);
    }

    #[test]
    fn rejects_and_names_the_field() {
        let l = Limits { max_prompt_bytes: 10, ..Limits::default() };
        let mut t = NewTask::new(TaskKind::general(), "   ");
        assert_eq!(l.check(&t).unwrap_err().field, "prompt");
        t.prompt = "x".repeat(11);
        assert!(l.check(&t).unwrap_err().message.contains("limit is 10"));
        t.prompt = "ok".into();
        t.max_attempts = Some(0);
        assert_eq!(l.check(&t).unwrap_err().field, "max_attempts");
        t.max_attempts = Some(3);
        assert!(l.check(&t).is_ok());
        t.model = Some("--yolo".into());
        let e = l.check(&t).unwrap_err();
        assert_eq!(e.field, "model");
        assert!(e.message.contains("must not start with '-'"), "{e}");
        t.model = None;
        t.tags = vec!["confidential".into(), "team:a-1".into()];
        assert!(l.check(&t).is_ok());
        for bad in ["", "Upper", "-x", "a b", "ü"] {
            t.tags = vec![bad.into()];
            assert_eq!(l.check(&t).unwrap_err().field, "tags", "{bad:?}");
        }
        t.tags = (0..17).map(|i| format!("t{i}")).collect();
        assert!(l.check(&t).unwrap_err().message.contains("at most 16"));
    }
}
