//! Identifiers.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// A task's id: a UUIDv7, so ids sort by creation time and never collide across nodes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(uuid::Uuid);

impl TaskId {
    pub fn new() -> Self {
        TaskId(uuid::Uuid::now_v7())
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", self.0)
    }
}

/// Error for a string that is not a task id.
#[derive(Debug, thiserror::Error)]
#[error("not a task id (expected a UUID such as 0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60): {0:?}")]
pub struct BadTaskId(pub String);

impl FromStr for TaskId {
    type Err = BadTaskId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s.trim()).map(TaskId).map_err(|_| BadTaskId(s.to_owned()))
    }
}

/// A worker's id: `<node>/<n>`, e.g. `serve-4f2a/3`. Free text so remote nodes can name themselves.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub String);

impl WorkerId {
    pub fn new(node: &str, n: usize) -> Self {
        WorkerId(format!("{node}/{n}"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The node part of the id (before the last `/`).
    pub fn node(&self) -> &str {
        self.0.rsplit_once('/').map_or(&self.0, |(n, _)| n)
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkerId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_creation() {
        let a = TaskId::new();
        let b = TaskId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<TaskId>().unwrap(), a);
        assert!("task-123".parse::<TaskId>().is_err());
    }

    #[test]
    fn worker_node() {
        assert_eq!(WorkerId::new("serve-1", 3).node(), "serve-1");
    }
}
