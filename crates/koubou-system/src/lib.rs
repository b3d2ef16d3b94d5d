//! The running system, and the service API the faces call.
//!
//! # Layout
//! - [`api`]: the [`Api`] trait every face calls, and its request/response shapes and errors.
//! - [`config`]: `koubou.toml`, environment overrides, the safe-bind rule, `Home` (file layout).
//! - [`system`]: [`Koubou`], which opens the queue, builds backends and routes, starts the pool
//!   and the backend health checker, and implements [`Api`] in-process.
//! - [`live`]: state kept from the event bus (streaming answers, counters, recent rates).
//! - [`metrics`]: the Prometheus text for `/metrics`.
//!
//! Architecture invariant: faces reach the queue, the router and the pool only through
//! [`Koubou`]'s methods and the event bus; nothing here knows about HTTP.

pub mod api;
pub mod config;
pub mod live;
pub mod metrics;
pub mod system;

pub use api::{Api, ApiError};
pub use config::{Config, Home};
pub use system::{Koubou, StartError, StartOptions};
