//! Cool-downs: a backend that answered "slow down" (429, 529, 503 with `Retry-After`) gets no
//! request until the time it asked for has passed.
//!
//! Why it exists: retrying only the task that was refused is not enough — every other queued
//! task would still hit the same backend at once and be refused too. The router consults this
//! before each attempt: a cooling backend is skipped for the fallback when there is one, else
//! waited out; `/health` shows until when and why.

use std::{collections::HashMap, time::Duration};

use koubou_task::{Millis, now_millis};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use crate::{BackendError, CancellationToken};

/// The cool-down after a refusal that did not say how long to wait.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(5);
/// The longest cool-down, whatever the provider asked for.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(600);

/// One backend's cool-down.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Cooling {
    /// When it ends (wall clock, milliseconds since the epoch).
    pub until: Millis,
    /// The refusal that started it.
    pub reason: String,
    #[serde(skip)]
    deadline: Instant,
}

/// The cool-downs of every backend, by name.
#[derive(Debug, Default)]
pub struct Cooldowns {
    by_backend: Mutex<HashMap<String, Cooling>>,
}

impl Cooldowns {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `e` if it is a rate limit: `backend` cools down for the wait it asked for
    /// ([`DEFAULT_COOLDOWN`] when it did not say; at most [`MAX_COOLDOWN`]). An existing, longer
    /// cool-down is kept.
    pub fn note(&self, backend: &str, e: &BackendError) {
        if let BackendError::RateLimited { retry_after, .. } = e {
            let wait = retry_after.unwrap_or(DEFAULT_COOLDOWN).min(MAX_COOLDOWN);
            self.start(backend, wait, e.to_string());
        }
    }

    /// `backend` takes no request for `wait`.
    pub fn start(&self, backend: &str, wait: Duration, reason: String) {
        let deadline = Instant::now() + wait;
        let until = now_millis() + wait.as_millis() as Millis;
        let mut map = self.by_backend.lock();
        if map.get(backend).is_some_and(|c| c.deadline >= deadline) {
            return;
        }
        tracing::warn!(backend, wait_ms = wait.as_millis() as u64, %reason, "backend cooling down");
        map.insert(backend.to_owned(), Cooling { until, reason, deadline });
    }

    /// The cool-down `backend` is in, if any.
    pub fn get(&self, backend: &str) -> Option<Cooling> {
        let mut map = self.by_backend.lock();
        match map.get(backend) {
            Some(c) if c.deadline > Instant::now() => Some(c.clone()),
            Some(_) => {
                map.remove(backend);
                None
            }
            None => None,
        }
    }

    /// Returns once `backend` is not cooling down (at once if it is not), or
    /// [`BackendError::Cancelled`] when `cancel` fires first.
    pub async fn wait(&self, backend: &str, cancel: &CancellationToken) -> Result<(), BackendError> {
        // A loop, because another refusal may extend the cool-down while we sleep.
        while let Some(c) = self.get(backend) {
            tracing::debug!(backend, until = c.until, "waiting out the backend's cool-down");
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(BackendError::Cancelled),
                _ = tokio::time::sleep_until(c.deadline) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(after: Option<u64>) -> BackendError {
        BackendError::RateLimited {
            backend: "b".into(),
            status: 429,
            retry_after: after.map(Duration::from_secs),
            detail: "slow down".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cools_for_the_hint_then_lets_requests_through() {
        let c = Cooldowns::new();
        c.note("b", &BackendError::Failed { backend: "b".into(), detail: "x".into() });
        assert!(c.get("b").is_none(), "only rate limits start a cool-down");
        c.note("b", &limited(Some(30)));
        let cooling = c.get("b").unwrap();
        assert!(cooling.reason.contains("slow down") && cooling.reason.contains("429"), "{}", cooling.reason);
        c.note("b", &limited(Some(1)));
        let start = Instant::now();
        c.wait("b", &CancellationToken::new()).await.unwrap();
        assert_eq!(start.elapsed().as_secs(), 30, "a shorter hint does not cut a longer cool-down");
        assert!(c.get("b").is_none());
        c.note("b", &limited(None));
        c.note("b", &limited(Some(100_000)));
        assert!(c.get("b").unwrap().deadline <= Instant::now() + MAX_COOLDOWN);
        assert!(c.get("other").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_stops_on_cancel() {
        let c = Cooldowns::new();
        c.note("b", &limited(Some(60)));
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(matches!(c.wait("b", &cancel).await, Err(BackendError::Cancelled)));
    }
}
