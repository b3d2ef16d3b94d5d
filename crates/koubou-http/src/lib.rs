//! The REST face on port 8765, and the guard every HTTP port shares.
//!
//! # Layout
//! - [`rest`]: the seed's routes (`POST /task/delegate`, `GET /task/{id}/status`, …) plus
//!   listing, cancelling, workers, health, metrics, and `GET /task/{id}/events` (SSE).
//! - [`guard`]: bearer-token auth and the Origin check (browsers only; a request without an
//!   Origin header — curl, Claude Code, the MCP Inspector — passes).
//! - [`error`]: every error leaves as JSON `{"error": {"code", "message", "field"?}}`.
//!
//! Architecture invariant: handlers call `Koubou`'s [`koubou_system::Api`] and nothing else.

pub mod error;
pub mod guard;
pub mod rest;

pub use guard::{Guard, guard};
pub use rest::router;
