//! The service API: what every face (REST, WebSocket, GraphQL, MCP, the CLI) asks of Koubou, and
//! the shapes of the answers.
//!
//! # Layout
//! - [`service`]: the [`Api`] trait — submit, read, list, cancel, watch, the event feed, health,
//!   status, metrics — which `koubou_system::Koubou` implements in-process and
//!   `koubou_client::Client` over HTTP.
//! - [`submit`]: [`SubmitRequest`], read from a JSON body field by field.
//! - [`view`]: what the service answers ([`TaskView`], [`TaskList`], [`HealthView`], …).
//! - [`error`]: [`ApiError`], sorted by whose fault it is.
//! - [`settings`]: the `[server]` and `[mcp]` sections of `koubou.toml`, which faces read.
//!
//! Architecture invariants: nothing here knows the queue, the pool, a backend or a database — a
//! face that holds an `Arc<dyn Api>` can be served by any system, local or remote; nothing here
//! knows HTTP either (status codes and the JSON error body live in `koubou-http`).

pub mod error;
pub mod service;
pub mod settings;
pub mod submit;
pub mod view;

pub use error::{ApiError, Busy};
pub use service::{Api, EventFeed, EventStream};
pub use submit::{SUBMIT_FIELDS, SubmitRequest, tags};
pub use view::{
    BackendView, ClusterView, CooldownView, DEGRADED, DELEGATED, HEALTHY, HealthView, ListQuery, NodeBackendView,
    NodeView, NodesView, QueueView, Second, SubmitResponse, SystemInfo, SystemStatus, TaskList, TaskResult, TaskView,
    WorkerView, WorkersView,
};
