//! The running system behind the service API the faces call.
//!
//! # Layout
//! - [`config`]: `koubou.toml`, environment overrides, the safe-bind rule, `Home` (file layout).
//! - [`system`]: [`Koubou`], which opens the queue, builds backends and routes, starts the pool
//!   and the backend health checker, and implements [`koubou_api::Api`] in-process.
//! - [`live`]: state kept from the event bus (streaming answers, counters, recent rates).
//! - [`metrics`]: the Prometheus text for `/metrics`.
//! - [`queue`]: which store `[queue] url` selects (SQLite, Redis; or RabbitMQ dispatching the
//!   tasks of `[queue] store`) and opening it with its node registry.
//! - `node`: this process as a node of the queue — registered with a TTL, renewed, and sweeping
//!   nodes that stopped renewing (their running tasks are requeued).
//!
//! Architecture invariant: no face depends on this crate — faces hold an `Arc<dyn Api>` that the
//! binary makes from a [`Koubou`]; nothing here knows about HTTP.

pub mod config;
pub mod live;
pub mod metrics;
mod node;
pub mod queue;
pub mod system;

pub use config::{Config, Home};
pub use system::{Koubou, StartError, StartOptions};
