//! Workers: the craftsmen (職人) who take tasks from the queue and run them on a backend.
//!
//! # Layout
//! - [`worker`]: one worker's loop — claim (parked until there is work), plan the route, stream
//!   the answer onto the bus, heartbeat the lease, complete or fail — and its shutdown.
//! - [`pool`]: `Pool`, which keeps between `min_workers` and `max_workers` workers: up at once
//!   to the queue's depth, down one long-idle worker per cooldown, never past what the backends
//!   can serve at once, and not up when free memory is below the floor.
//! - [`memory`]: free memory, read from `/proc/meminfo`.
//!
//! Architecture invariant: workers know the queue only through `Dispatch` (the scaler counts
//! through `TaskStore`) and the backends only through `Router`; they never talk to a face.

pub mod memory;
pub mod pool;
pub mod worker;

pub use pool::{Pool, PoolConfig, WorkerInfo};
