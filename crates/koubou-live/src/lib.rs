//! Koubou's live faces, all fed by the event bus (nothing polls the database to learn what
//! changed):
//!
//! - [`ws_router`]: the seed's WebSocket (`ws://localhost:8766`); [`ws_handler`] serves the same
//!   protocol at any path (`/ws` on 8765). Protocol: `docs/websocket.md`.
//! - [`graphql_router`]: GraphQL at `/graphql` (port 8767) — POST and GET queries, subscriptions
//!   over graphql-ws (both subprotocols), and GraphiQL for browsers, served from embedded files.
//!   Schema: `docs/schema.graphql`.
//! - [`dashboard_router`]: the web dashboard under `/dashboard` (port 8765), its own JSON
//!   endpoints under `/dashboard/api/` and its WebSocket at `/dashboard/ws`.
//!
//! Every byte a browser loads comes from this binary: no CDN.

pub mod assets;
pub mod dashboard;
pub mod gql;
pub mod graphql;
pub mod metrics;
pub mod prototype;
pub mod ws;

pub use dashboard::dashboard_router;
pub use graphql::graphql_router;
pub use ws::{WsConfig, WsState, ws_handler, ws_router, ws_router_with};
