//! Koubou's live faces, all fed by the event bus (nothing polls the database to learn what
//! changed):
//!
//! - [`ws_router`]: the seed's WebSocket (`ws://localhost:8766`); [`ws_handler`] serves the same
//!   protocol at any path (`/ws` on 8765). Protocol: `docs/websocket.md`.
//! - [`graphql_router`]: GraphQL at `/graphql` (port 8767) — POST and GET queries, subscriptions
//!   over graphql-ws (both subprotocols), and GraphiQL for browsers, served from embedded files.
//!   Schema: `docs/schema.graphql`. Mutations run only from a JSON POST; [`gql_limits`] bounds
//!   a document's depth, complexity and aliases before anything runs.
//! - [`dashboard_router`]: the web dashboard under `/dashboard` (port 8765), its own JSON
//!   endpoints under `/dashboard/api/` and its WebSocket at `/dashboard/ws`.
//! - [`protocol`]: what a WebSocket client may send, parsed in one place with no I/O (fuzzed).
//!
//! Every byte a browser loads comes from this binary: no CDN.

pub mod assets;
pub mod dashboard;
pub mod gql;
pub mod gql_limits;
pub mod graphql;
pub mod metrics;
pub mod protocol;
pub mod prototype;
pub mod ws;

pub use dashboard::{dashboard_router, dashboard_router_with};
pub use graphql::{graphql_router, graphql_router_with};
pub use ws::{WsConfig, WsLimits, WsState, ws_handler, ws_router, ws_router_with};
