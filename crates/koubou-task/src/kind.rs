//! What kind of work a task is, and how urgent.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A task's type: `general`, `code`, or any custom type declared in config.
/// Names are lowercase ASCII letters, digits, `-` and `_`, at most 64 bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskKind(String);

impl TaskKind {
    pub const GENERAL: &'static str = "general";
    pub const CODE: &'static str = "code";

    /// Checks the spelling (not whether the kind is configured: that is the router's business).
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(TaskKind(s.to_owned()))
        } else {
            Err(format!("task type {s:?} is not a valid name (lowercase letters, digits, '-' and '_', 1-64 bytes)"))
        }
    }
    pub fn general() -> Self {
        TaskKind(Self::GENERAL.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskKind({})", self.0)
    }
}

/// Priority 1 (lowest) to 10 (highest); 5 by default. Higher runs first, FIFO within one priority.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "u8")]
pub struct Priority(u8);

impl Priority {
    pub const MIN: u8 = 1;
    pub const MAX: u8 = 10;
    pub const DEFAULT: Priority = Priority(5);

    pub fn new(p: i64) -> Result<Self, String> {
        if (Self::MIN as i64..=Self::MAX as i64).contains(&p) {
            Ok(Priority(p as u8))
        } else {
            Err(format!("priority must be an integer from 1 to 10, got {p}"))
        }
    }
    pub fn get(self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<i64> for Priority {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        Priority::new(v)
    }
}

impl From<Priority> for u8 {
    fn from(p: Priority) -> u8 {
        p.0
    }
}

impl fmt::Debug for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "P{}", self.0)
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_bounds() {
        assert!(Priority::new(0).is_err());
        assert!(Priority::new(11).is_err());
        assert_eq!(Priority::new(10).unwrap().get(), 10);
        assert_eq!(Priority::default().get(), 5);
    }

    #[test]
    fn kind_names() {
        assert!(TaskKind::parse("code").is_ok());
        assert!(TaskKind::parse("my_type-2").is_ok());
        assert!(TaskKind::parse("Code").is_err());
        assert!(TaskKind::parse("").is_err());
        assert!(TaskKind::parse("a b").is_err());
    }
}
